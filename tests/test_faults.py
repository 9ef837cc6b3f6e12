"""Bad input and faults, one table: each case is what a person does, the one-line error
it must get (or the outcome it must record), and the files that must stay as they were.

In-process cases call the library (errors are UserError, which the CLI turns into one
line and exit 2); the CLI cases run the commands as a user does."""

import errno
import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import REPO, cli_env, run_cli, tiny_config
from preact import checkpoint, runrecord, train
from preact import config as config_lib
from preact.errors import UserError



def _hashes(workdir):
  """Every file below workdir → its sha256 (the run record and the checkpoints)."""
  if not workdir.exists():
    return None
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob('*')) if p.is_file()}


def _train(config, workdir):
  with tfds.testing.mock_data(num_examples=48):
    return train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 2-step run whose record the cases copy and damage."""
  workdir = tmp_path_factory.mktemp('trained')
  _train(tiny_config(total_steps=2, checkpoint_every=1, log_every=1), workdir)
  return workdir


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def _edit_config(key_path, value=None, drop=False):
  def edit(w):
    d = json.loads((w / 'config.json').read_text())
    node = d
    *parents, leaf = key_path.split('.')
    for p in parents:
      node = node[p]
    if drop:
      del node[leaf]
    else:
      node[leaf] = value
    (w / 'config.json').write_text(json.dumps(d))
  return edit


def _write(name, text):
  return lambda w: (w / name).write_text(text)


def _remove(name):
  return lambda w: (w / name).unlink()


def _lock_by(pid, host=None):
  import socket
  return _write('.lock', json.dumps({'host': host or socket.gethostname(), 'pid': pid}))


# (id, how the trained workdir is damaged, config overrides of the new command,
#  regex of the one error line)
RECORD_CASES = [
    ('config_missing_with_checkpoints', _remove('config.json'), {},
     r'holds checkpoints \(steps 1, 2\) but no config.json'),
    ('config_empty_object', _write('config.json', '{}'), {},
     r'config.json is not a complete run config \(it lacks augment'),
    ('config_partial', _edit_config('model.shortcut', drop=True), {},
     r'not a complete run config \(it lacks model.shortcut\)'),
    ('config_not_json', _write('config.json', '{"dataset": '), {},
     r'config.json is not valid JSON'),
    ('config_a_list', _write('config.json', '[1, 2]'), {}, r'config.json holds no config'),
    ('config_bad_value', _edit_config('model.unit', 'preact'), {},
     r"config.json: model.unit='preact' is not one of"),
    ('another_seed', None, {'seed': 1}, r'holds a different run \(config seed: 0 → 1\)'),
    ('another_lr', None, {'optimizer.lr': 0.5},
     r'holds a different run \(config optimizer.lr: 0.1 → 0.5\)'),
    ('another_unit', None, {'model.unit': 'original'},
     r"holds a different run \(config model.unit: 'full_preact' → 'original'\)"),
    ('locked_by_a_live_process', _lock_by(1), {},
     r'is in use by another preact-train \(host .+, pid 1\)'),
    ('locked_on_another_host', _lock_by(4242, host='gpu7'), {},
     r'is in use by another preact-train \(host gpu7, pid 4242\)'),
]


@pytest.mark.slow
@pytest.mark.parametrize('name,damage,overrides,error', RECORD_CASES,
                         ids=[c[0] for c in RECORD_CASES])
def test_a_bad_run_record_is_refused_and_left_alone(trained, tmp_path, name, damage,
                                                    overrides, error):
  workdir = _copy(trained, tmp_path / 'run')
  if damage:
    damage(workdir)
  before = _hashes(workdir)
  with pytest.raises(UserError, match=error):
    _train(tiny_config(total_steps=2, checkpoint_every=1, **overrides), workdir)
  assert _hashes(workdir) == before


# (id, config overrides, regex of the one error line): refused before the workdir exists.
CONFIG_CASES = [
    ('negative_lr', {'optimizer.lr': -0.1}, r'optimizer.lr must be a number in \(0, ∞\]'),
    ('nan_lr', {'optimizer.lr': float('nan')}, r'optimizer.lr must be a number in .*got nan'),
    ('zero_lr', {'optimizer.lr': 0.0}, r'optimizer.lr must be a number in \(0'),
    ('momentum_one', {'optimizer.momentum': 1.0}, r'optimizer.momentum must be .*\[0, 1\)'),
    ('negative_weight_decay', {'optimizer.weight_decay': -1e-4}, r'optimizer.weight_decay'),
    ('decay_factor_zero', {'optimizer.decay_factor': 0.0}, r'optimizer.decay_factor'),
    ('warmup_longer_than_run', {'optimizer.warmup_steps': 3},
     r'optimizer.warmup_steps \(3\) must be shorter than the run \(total_steps 3\)'),
    ('negative_warmup', {'optimizer.warmup_steps': -1}, r'optimizer.warmup_steps must be'),
    ('boundaries_decrease', {'optimizer.boundaries': (5, 2)}, r'boundaries must be positive'),
    ('boundary_zero', {'optimizer.boundaries': (0, 2)}, r'boundaries must be positive'),
    ('negative_epochs', {'total_epochs': -2.0}, r'total_epochs must be'),
    ('zero_batch', {'batch_size': 0}, r'batch_size must be a positive integer'),
    ('zero_eval_every', {'eval_every': 0}, r'eval_every must be a positive integer'),
    ('unknown_unit', {'model.unit': 'preact'}, r"model.unit='preact' is not one of"),
    ('unknown_shortcut', {'model.shortcut': 'identity'}, r"model.shortcut='identity'"),
    ('dropout_rate_one', {'model.unit': 'dropout_shortcut', 'model.unit_args.rate': 1.0},
     r'dropout rate must be in \[0, 1\)'),
    ('negative_padding', {'augment.crop_padding': -4}, r'augment.crop_padding'),
    ('batch_not_divisible', {'batch_size': 12}, r'batch_size 12 is not divisible by the 8'),
    ('profile_steps_reversed', {'profile_steps': (3, 2)},
     r'profile_steps must be \(\) or \(first, last\) with 1 <= first <= last, got \(3, 2\)'),
]


@pytest.mark.parametrize('name,overrides,error', CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_is_one_error_and_creates_nothing(tmp_path, name, overrides, error):
  workdir = tmp_path / 'new'
  with pytest.raises(UserError, match=error):
    with tfds.testing.mock_data(num_examples=48):
      train.train_and_evaluate(tiny_config(**overrides), workdir)
  assert not workdir.exists()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  _lock_by(2 ** 22 + 12345)(workdir)  # a trainer killed on this host: no such process
  out = _train(tiny_config(total_steps=2), workdir)
  assert out['status'] == 'completed' and not (workdir / '.lock').exists()


@pytest.mark.slow
def test_resume_drops_metric_rows_past_the_restored_step(trained, tmp_path):
  workdir = _copy(trained, tmp_path / 'run')
  ckpt = workdir / 'checkpoints' / '2'
  import shutil
  shutil.rmtree(ckpt)  # as if killed after logging step 2 but before its save committed
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2]
  (workdir / 'outcome.json').unlink()
  _train(tiny_config(total_steps=2, checkpoint_every=1), workdir)
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2]


@pytest.mark.slow
def test_divergence_stops_at_the_first_bad_step_and_saves_no_bad_state(tmp_path):
  c = tiny_config(total_steps=12, log_every=10, checkpoint_every=5)
  c.optimizer.lr, c.optimizer.schedule = 1e30, 'step'  # step 2 applies an overflowed update
  out = _train(c, tmp_path)
  assert out['status'] == 'diverged' and out['test_error'] is None
  bad = out['step']
  assert 1 <= bad <= 3 and f'not finite at step {bad}' in out['reason']
  saved = json.loads((tmp_path / 'outcome.json').read_text())
  assert saved == out
  # Every checkpoint is finite and older than the bad step.
  for step in runrecord.checkpoint_steps(tmp_path):
    assert step < bad
    ck = checkpoint.Checkpoints(tmp_path)
    arrays = ck.restore_arrays(step)
    ck.close()
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(arrays['params']))
  text = (tmp_path / 'metrics.jsonl').read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  # Again: the recorded outcome, no training, nothing rewritten.
  before = _hashes(tmp_path)
  assert _train(c, tmp_path) == out
  assert _hashes(tmp_path) == before


@pytest.mark.slow
def test_a_failed_save_stops_the_run_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
  real = checkpoint.Checkpoints.save

  def save(self, step, state, meta):
    if step == 3:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(self, step, state, meta)

  monkeypatch.setattr(checkpoint.Checkpoints, 'save', save)
  out = _train(tiny_config(total_steps=6, checkpoint_every=1), tmp_path)
  assert out['status'] == 'failed' and out['step'] == 3
  assert 'No space left on device' in out['reason']
  assert runrecord.checkpoint_steps(tmp_path) == [1, 2]
  assert json.loads((tmp_path / 'outcome.json').read_text())['status'] == 'failed'
  assert train.EXIT_CODES['failed'] != 0


def test_outcome_json_never_holds_nan():
  text = runrecord.to_json({'status': 'diverged', 'test_error': float('nan'),
                            'x': [float('inf'), 1.0]})
  assert json.loads(text) == {'status': 'diverged', 'test_error': None, 'x': [None, 1.0]}


# --------------------------------------------------------------------------------------
# As a user runs the commands.

def _tiny_args(workdir, fmnist_dir, *extra):
  return ['--config=experiments/fashion_mnist.py', f'--workdir={workdir}',
          f'--config.data_dir={fmnist_dir}', '--config.model.depth=8',
          '--config.batch_size=16', '--config.eval_batch_size=1000',
          '--config.log_every=3', '--config.checkpoint_every=6', '--config.progress=log',
          *extra]


@pytest.mark.slow
def test_sigint_saves_and_exits_130(tmp_path, fmnist_dir):
  proc = subprocess.Popen([sys.executable, '-m', 'preact.cli.train',
                           *_tiny_args(tmp_path, fmnist_dir, '--config.total_steps=100000',
                                       '--config.checkpoint_every=50000')],
                          cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (tmp_path / 'metrics.jsonl').exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
  outcome = json.loads((tmp_path / 'outcome.json').read_text())
  assert outcome['status'] == 'interrupted'
  assert runrecord.checkpoint_steps(tmp_path)[-1:] == [outcome['step']], (outcome, err[-3000:])


def test_a_record_from_before_a_runtime_key_still_reads():
  record = config_lib.base().to_dict()
  record['profile_steps'] = (3, 4)
  assert config_lib.from_dict(record, source='config.json').profile_steps == (3, 4)
  for key in config_lib.RUNTIME_KEYS:
    del record[key]
  restored = config_lib.from_dict(record, source='config.json')
  complete = config_lib.from_dict(config_lib.base().to_dict(), source='config.json')
  assert restored.profile_steps == () and restored.to_dict() == complete.to_dict()
  del record['seed']  # a key that changes results is never filled in
  with pytest.raises(UserError, match=r'it lacks seed\)'):
    config_lib.from_dict(record, source='config.json')


def test_eval_checks_the_record_before_reading_data(tmp_path):
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(UserError, match='not a complete run config'):
    train.evaluate_checkpoint(tmp_path)  # no mock data: reading any would fail otherwise


CONFIG_FILES = {  # a config file a person got wrong → where the one line points
    'syntax.py': ('def get_config(:\n  pass\n', r'syntax.py:1: SyntaxError: invalid syntax'),
    'name.py': ('def get_config():\n  return confg.base()\n',
                r"name.py:2: NameError: name 'confg' is not defined"),
    'raises.py': ('def get_config():\n  raise ValueError("lr schedule unknown")\n',
                  r'raises.py:2: ValueError: lr schedule unknown'),
    'noget.py': ('X = 1\n', r'noget.py defines no get_config\(\)'),
    'imports.py': ('import nonexistent_module\n',
                   r"imports.py:1: ModuleNotFoundError: No module named 'nonexistent_module"),
}

# (tool, arguments with {tmp} and {cfg} filled in, exit code, regex of the one stderr line)
CLI_CASES = [
    *[('train', [f'--config={{cfg}}/{name}', '--workdir={tmp}/w'], 2,
       rf'^preact-train: error: cannot load --config: .*{error}')
      for name, (_, error) in CONFIG_FILES.items()],
    ('train', ['--config={tmp}/missing.py', '--workdir={tmp}/w'], 2,
     r'cannot load --config: no such config file .*missing.py \(the packaged experiments '
     r'are fashion_mnist, table1, table2, table3, table4, table5\)$'),
    ('train', ['--config=experiments/table1.py:nope', '--workdir={tmp}/w'], 2,
     r"cannot load --config: unknown row 'nope'; rows: original"),
    ('train', ['--config=experiments/fashion_mnist.py', '--config.model.deepth=3',
               '--workdir={tmp}/w'], 2, r'unknown config key in --config.model.deepth'),
    ('train', ['--config=experiments/fashion_mnist.py', '--config.optimizer.lr=-0.1',
               '--workdir={tmp}/w'], 2, r'optimizer.lr must be a number in \(0, ∞\]'),
    ('train', ['--config=experiments/fashion_mnist.py', '--config.optimizer.lr=fast',
               '--workdir={tmp}/w'], 2, r'--config.optimizer.lr=fast'),
    ('train', ['--config=experiments/fashion_mnist.py'], 2, r'--config and --workdir are required'),
    ('train', ['--config=experiments/fashion_mnist.py', '--workdir={tmp}/w', 'extra'], 2,
     r'unexpected arguments extra'),
    ('eval', ['--workdir={tmp}'], 2, r'holds no run \(no config.json\)'),
    ('eval', [], 2, r'--workdir is required'),
    ('bench', ['--batch=0'], 2, r'--batch must be a positive integer'),
    ('bench', ['--steps=-3'], 2, r'--steps must be a positive integer'),
    ('bench', ['--depth=0'], 2, r'--depth must be a positive integer'),
    ('bench', ['--mode=compile', '--depths=164,x'], 2, r'--depths takes positive integers'),
    ('models', ['--arch=imagenet', '--depths=20'], 2,
     r'no imagenet network has depth 20; ImageNet depths: 18, 34, 50'),
    ('models', ['--depths=100'], 2, r'depth 100 fits no CIFAR unit'),
    ('models', ['--units=preact'], 2, r"unknown unit 'preact'"),
    ('report', [], 2, r'name at least one run directory'),
    ('report', ['{tmp}', '--out={cfg}/syntax.py'], 2, r'--out .*syntax.py is a file'),
    ('report', ['{tmp}/nothing', '--out={tmp}/r'], 2, r'no runs'),
    ('sweep', ['--config=experiments/fashion_mnist.py', '--workdir={tmp}/s', '--seeds=a'], 2,
     r'--seeds takes integers'),
]


@pytest.mark.slow
@pytest.mark.parametrize('tool,args,code,error', CLI_CASES,
                         ids=[f'{c[0]}-{i}' for i, c in enumerate(CLI_CASES)])
def test_cli_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, tool, args, code, error):
  cfg = tmp_path / 'cfg'
  cfg.mkdir()
  for name, (text, _) in CONFIG_FILES.items():
    (cfg / name).write_text(text)
  before = _hashes(tmp_path)
  proc = run_cli(tool, *[a.format(tmp=tmp_path, cfg=cfg) for a in args], timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == code, proc.stderr[-2000:]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert re.search(error, lines[0]), lines[0]
  assert _hashes(tmp_path) == before  # nothing written, nothing changed


def test_offline_download_fails_in_seconds_with_the_remedy(tmp_path, monkeypatch):
  import socket

  def unreachable(*args, **kwargs):
    raise socket.gaierror(-2, 'Name or service not known')

  monkeypatch.setattr(socket, 'create_connection', unreachable)
  c = tiny_config(data_dir=str(tmp_path / 'tfds'))
  t = time.time()
  with pytest.raises(UserError, match=r'cifar10 is not prepared in .*tfds and its source '
                     r'www.cs.toronto.edu is unreachable .*tfds build cifar10 --data_dir=DIR'):
    train.train_and_evaluate(c, tmp_path / 'w', devices=jax.devices()[:1])
  assert time.time() - t < 10
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_report_skips_a_broken_run_with_a_warning(trained, tmp_path, capsys):
  from preact import report
  good = _copy(trained, tmp_path / 'runs' / 'good')
  broken = tmp_path / 'runs' / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_text('{"model": ')
  text = report.write([tmp_path / 'runs'], tmp_path / 'out')
  err = capsys.readouterr().err
  assert f'preact-report: warning: skipping {broken}' in err and str(good) not in err
  assert (tmp_path / 'out' / 'report.md').exists() and '| full_preact |' in text.replace(
      'basic', '')
