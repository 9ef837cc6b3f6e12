"""The commands as users run them, on the real Fashion-MNIST: train, evaluate, survive
SIGKILL and SIGTERM, run as two processes, and refuse bad input with exit status 2; then
sweep and report, probe, models and bench."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, params_of, run_cli
from preact import models, train, units
from preact.cli import common

pytestmark = pytest.mark.slow  # every test here starts command-line processes

TINY = ['--config=experiments/fashion_mnist.py', '--config.model.depth=8',
        '--config.batch_size=32', '--config.total_steps=12', '--config.checkpoint_every=3',
        '--config.eval_every=1000', '--config.log_every=3', '--config.eval_batch_size=1000',
        '--config.probe_every=4', '--config.progress=log']


def tiny(workdir, data_dir, *extra):
  return [*TINY, f'--workdir={workdir}', f'--config.data_dir={data_dir}', *extra]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, fmnist_dir):
  """An uninterrupted tiny run."""
  workdir = tmp_path_factory.mktemp('reference')
  run_cli('train', *tiny(workdir, fmnist_dir), check=True)
  return workdir


def test_train_writes_its_workdir_and_eval_restores_it(reference):
  outcome = json.loads((reference / 'outcome.json').read_text())
  assert outcome['status'] == 'completed' and outcome['step'] == 12
  rows = [json.loads(l) for l in (reference / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [3, 6, 9, 12]
  for key in ('train_loss', 'train_error', 'lr', 'images_per_s'):
    assert all(key in r for r in rows)
  assert 'test_error' in rows[-1]
  events = list((reference / 'tensorboard').glob('events.out.tfevents.*'))
  assert events
  # The run's settings as TensorBoard hparams, beside its scalars.
  from tensorflow.core.util import event_pb2
  from tensorflow.python.lib.io import tf_record
  plugins = {v.metadata.plugin_data.plugin_name for e in events
             for r in tf_record.tf_record_iterator(str(e))
             for v in event_pb2.Event.FromString(r).summary.value}
  assert {'hparams', 'images'} <= plugins, plugins  # images: the probes' profiles
  probes = [json.loads(l) for l in (reference / 'probes.jsonl').read_text().splitlines()]
  assert [r['step'] for r in probes] == [0, 4, 8, 12] and len(probes[0]['units']) == 3
  config = json.loads((reference / 'config.json').read_text())
  assert config['model']['depth'] == 8 and config['dataset'] == 'fashion_mnist'
  assert config['experiment'] == 'fashion_mnist'  # the file it came from

  proc = run_cli('eval', f'--workdir={reference}', check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['step'] == 12 and result['examples'] == 10000 and result['split'] == 'test'
  assert result['error'] == pytest.approx(outcome['test_error'])
  assert result['accuracy'] == pytest.approx(1 - result['error'])
  logged = [json.loads(l) for l in (reference / 'eval.jsonl').read_text().splitlines()]
  assert logged[-1] == result

  proc = run_cli('eval', f'--workdir={reference}', '--step=6', '--split=train[:1000]', check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['step'] == 6 and result['examples'] == 1000


def test_eval_prints_its_result_first_when_eval_jsonl_cannot_be_appended(reference, tmp_path):
  import shutil
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns('eval.jsonl'))
  (workdir / 'eval.jsonl').mkdir()  # unwritable as a file, even for root
  proc = run_cli('eval', f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])['step'] == 12
  # Data loading imports TensorFlow: its start-up notices must not reach the user either.
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and re.match(
      r'preact-eval: warning: the result was not appended to eval.jsonl \(.*Is a directory',
      lines[0]), proc.stderr[-2000:]


def test_training_a_finished_run_again_changes_nothing(reference, fmnist_dir):
  before = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
  proc = run_cli('train', *tiny(reference, fmnist_dir), check=True)
  after = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
  assert before == after
  assert 'step 12: test error' in proc.stdout


def _wait_for_checkpoint(workdir, at_least, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()]
    if steps and max(steps) >= at_least:
      return
    if proc.poll() is not None:
      raise AssertionError(f'run ended early:\n{proc.stderr.read()[-3000:]}')
    time.sleep(0.02)
  raise AssertionError('no checkpoint appeared')


def _start(args):
  return subprocess.Popen([sys.executable, '-m', 'preact.cli.train', *args], cwd=REPO,
                          env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def test_sigkill_mid_training_then_resume_is_bit_identical(reference, tmp_path, fmnist_dir):
  args = tiny(tmp_path, fmnist_dir)
  proc = _start(args)
  _wait_for_checkpoint(tmp_path, 3, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / 'outcome.json').exists()  # killed before it finished
  run_cli('train', *args, check=True)
  want, got = params_of(reference), params_of(tmp_path)
  assert int(got['step']) == 12
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  # Each probe row once, and the same numbers as the uninterrupted run's.
  assert (tmp_path / 'probes.jsonl').read_text() == (reference / 'probes.jsonl').read_text()


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, fmnist_dir):
  proc = _start(tiny(tmp_path, fmnist_dir, '--config.total_steps=100000',
                     '--config.checkpoint_every=50000'))
  # Wait until training runs (metrics appear every 3 steps), then preempt.
  deadline = time.time() + 300
  while not (tmp_path / 'metrics.jsonl').exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  outcome = json.loads((tmp_path / 'outcome.json').read_text())
  assert outcome['status'] == 'preempted'
  assert int(params_of(tmp_path)['step']) == outcome['step'] > 0


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_process(tmp_path, fmnist_dir):
  # Under pmap, whose state is host-local with several processes (parallel.Replicas);
  # the default shard_map runs two processes below.
  steps = ['--config.total_steps=3', '--config.log_every=1', '--config.checkpoint_every=3',
           '--config.parallelism=pmap', '--config.probe_every=0']
  run_cli('train', *tiny(tmp_path / 'one', fmnist_dir, *steps), devices=2, check=True)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'preact.cli.train', *tiny(tmp_path / 'two', fmnist_dir, *steps),
       f'--coordinator=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  one, two = params_of(tmp_path / 'one'), params_of(tmp_path / 'two')
  assert int(two['step']) == 3
  # Bit for bit: a sum over two replicas is the same in either order.
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_array_equal(a, b)
  # Only process 0 wrote the logs.
  rows = (tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(r)['step'] for r in rows] == [1, 2, 3]


def _two_processes(workdir, fmnist_dir, *extra):
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, '-m', 'preact.cli.train', *tiny(workdir, fmnist_dir, *extra),
       f'--coordinator=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _finish(procs, timeout=600):
  for p in procs:
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, fmnist_dir):
  """A preempted host must not leave the others waiting in a collective: both processes
  stop at the same step, save one checkpoint and exit 143; resumed, the run ends where
  an uninterrupted one does, bit for bit (one process on two devices: two replicas'
  sums do not depend on where they run)."""
  # Signalled at step 1 or so, the processes agree to stop at step 10 (STOP_CHECK_EVERY).
  steps = ['--config.total_steps=20', '--config.log_every=1', '--config.probe_every=15',
           '--config.checkpoint_every=1000', '--config.eval_every=1000']
  procs = _two_processes(tmp_path / 'cut', fmnist_dir, *steps)
  deadline = time.time() + 300
  while not (tmp_path / 'cut' / 'metrics.jsonl').exists() and time.time() < deadline:
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only
  signalled = time.time()
  for p in procs:
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-3000:]
  assert time.time() - signalled < 60
  outcome = json.loads((tmp_path / 'cut' / 'outcome.json').read_text())
  assert (outcome['status'], outcome['step']) == ('preempted', train.STOP_CHECK_EVERY)
  assert int(params_of(tmp_path / 'cut')['step']) == outcome['step']

  _finish(_two_processes(tmp_path / 'cut', fmnist_dir, *steps))
  run_cli('train', *tiny(tmp_path / 'whole', fmnist_dir, *steps), devices=2, check=True)
  resumed, whole = params_of(tmp_path / 'cut'), params_of(tmp_path / 'whole')
  assert int(resumed['step']) == 20
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('tool,args,match', [
    ('train', ['--config.model.deepth=3'],
     r'unknown config key in --config.model.deepth \(did you mean --config.model.depth\?\)'),
    ('train', ['--config.model.depth=100'], r'depth 100 does not fit basic units'),
    ('train', ['--config.dataset=mnist'], "dataset='mnist' is not one of"),
    ('train', ['--config=experiments/nope.py'], 'cannot load --config'),
    ('eval', [], 'holds no run'),
    ('models', ['--units=full_preactt'], "unknown unit 'full_preactt'"),
    ('models', ['--depths=21'], 'depth 21 fits no CIFAR unit'),
])
def test_bad_input_exits_2_with_one_line(tmp_path, tool, args, match):
  base = {'train': [*TINY, f'--workdir={tmp_path / "w"}'], 'models': []}.get(
      tool, [f'--workdir={tmp_path / "w"}'])
  proc = run_cli(tool, *base, *args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith(f'preact-{tool}: error:')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr
  assert re.search(match, errors[0]), errors[0]
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_probe_a_trained_run_on_its_own_data(reference, tmp_path):
  out = tmp_path / 'probe'
  proc = run_cli('probe', f'--workdir={reference}', '--batch=8', f'--out={out}', check=True)
  doc = json.loads((out / 'probe.json').read_text())
  (probe,) = doc['probes']
  assert probe['unit'] == 'full_preact' and probe['step'] == 12 and probe['bn'] == 'eval'
  assert len(probe['units']) == 3 and all(u['grad_norm'] > 0 for u in probe['units'])
  assert (out / 'grad_norm.png').exists() and 'first/last' in proc.stdout


def test_probe_over_training_from_probes_jsonl_or_from_checkpoints(reference, tmp_path):
  out = tmp_path / 'flow'
  proc = run_cli('probe', f'--workdir={reference}', '--over_training', f'--out={out}',
                 check=True)
  assert (out / 'probes.jsonl').read_text() == (reference / 'probes.jsonl').read_text()
  for name in ('probe_ratio.png', 'probe_act_norm.png', 'probe_profiles.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG'
  assert 'min cosine' in proc.stdout and len(proc.stdout.splitlines()) >= 5
  # A run trained without probes: every kept checkpoint is probed as the run would have.
  bare = tmp_path / 'bare'
  shutil.copytree(reference, bare)
  (bare / 'probes.jsonl').unlink()
  run_cli('probe', f'--workdir={bare}', '--over_training', f'--out={tmp_path / "bare_out"}',
          check=True)
  rows = [json.loads(l) for l in
          (tmp_path / 'bare_out' / 'probes.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [6, 9, 12]  # the three checkpoints it keeps
  in_training = json.loads((reference / 'probes.jsonl').read_text().splitlines()[-1])
  assert rows[-1] == in_training  # bit for bit, from another process


def test_a_single_runs_report_is_titled_by_its_experiment(reference, tmp_path):
  text = run_cli('report', str(reference), f'--out={tmp_path}', check=True).stdout
  assert '### fashion_mnist\n' in text and '| fashion_mnist full_preact 8 basic |' in text
  assert '## Gradient flow over training' in text  # it probed itself: probe_every=4
  assert (tmp_path / 'curves_fashion_mnist.png').exists()


def test_help_of_every_command_shows_its_own_flags():
  """As installed (.venv/bin/preact-…), where absl's --help would otherwise list the
  flags of the console script, which defines none."""
  flags_of = {'train': '--workdir', 'eval': '--split', 'probe': '--[no]over_training',
              'sweep': '--seeds', 'report': '--out', 'models': '--depths',
              'bench': '--probe_every'}
  for tool, flag in flags_of.items():
    script = os.path.join(os.path.dirname(sys.executable), f'preact-{tool}')
    proc = subprocess.run([script, '--help'], capture_output=True, text=True, cwd=REPO,
                          env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f'preact-{tool}: '), proc.stdout[:200]  # its docstring
    assert f'  {flag}' in proc.stdout, (tool, proc.stdout[-1500:])


def test_a_wheel_installed_elsewhere_launches_a_table_row_from_any_directory(tmp_path,
                                                                             fmnist_dir):
  """pip install of a built wheel (not the checkout): the configs ship inside it, so a
  row is named without a path, from a directory that holds nothing of preact."""
  wheels, site, elsewhere = tmp_path / 'wheels', tmp_path / 'site', tmp_path / 'elsewhere'
  elsewhere.mkdir()
  pip = [sys.executable, '-m', 'pip', '-q', '--disable-pip-version-check']
  subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', str(wheels),
                  str(REPO)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
  (wheel,) = wheels.glob('preact-*.whl')
  subprocess.run([*pip, 'install', '--no-deps', '--target', str(site), str(wheel)],
                 check=True, capture_output=True, timeout=300)
  env = {**cli_env(), 'PYTHONPATH': str(site)}
  where = subprocess.run([sys.executable, '-c', 'import preact; print(preact.__file__)'],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(site)), where.stdout
  proc = subprocess.run(
      [sys.executable, '-m', 'preact.cli.train', '--config=table2:full_preact,depth=164,mini',
       '--config.model.depth=11',  # the row's units, one per stage: a test compiles less
       '--workdir=run', f'--config.data_dir={fmnist_dir}', '--config.total_steps=2',
       '--config.optimizer.warmup_steps=0', '--config.eval_every=2',
       '--config.eval_batch_size=1000', '--config.probe_every=0', '--config.progress=log'],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((elsewhere / 'run' / 'config.json').read_text())
  assert config['paper']['row'] == 'full_preact@164' and config['model']['block'] == 'bottleneck'
  assert json.loads((elsewhere / 'run' / 'outcome.json').read_text())['step'] == 2


# --------------------------------------------------------------------------------------
# The other commands: sweep and report, probe, models, bench.


def test_preact_bench_command_prints_ours_beside_pytorch():
  pytest.importorskip('torch')
  out = run_cli('bench', '--depth=8', '--block=basic', '--batch=8', '--steps=2', '--torch',
                '--json', check=True, fast_compile=False).stdout
  r = json.loads(out.strip().splitlines()[-1])
  assert r['torch']['params'] == r['params'] == 75_290
  assert r['ratio_vs_torch'] == pytest.approx(r['images_per_s'] / r['torch']['images_per_s'])
  assert r['probe_every'] == 1000 and r['probe_ms'] > 0  # the in-training probe's cost
  assert r['probe_overhead_pct'] == pytest.approx(100 * r['probe_ms'] / (1000 * r['step_ms']))
  before, after = r['torch_runs']  # PyTorch on either side of ours; the ratio uses the mean
  assert r['torch']['images_per_s'] == pytest.approx(
      (before['images_per_s'] + after['images_per_s']) / 2)
  assert r['ratio_vs_faster_torch'] == pytest.approx(
      r['images_per_s'] / max(before['images_per_s'], after['images_per_s']))
  out = run_cli('bench', '--mode=ops', '--depth=11', '--batch=2', '--steps=2', '--json',
                check=True).stdout
  r = json.loads(out.strip().splitlines()[-1])
  assert sum(c['count'] for c in r['convs']) == 13  # ResNet-11's convs, by shape
  assert r['total_ms']['xla_fwd_ms'] > 0 and r['total_ms']['torch_fwd_ms'] > 0
  if 'onednn_add_fused_fwd_ms' in r['total_ms']:  # the 3 units' last convs only
    assert sum(c.get('last_count', 0) for c in r['convs']) == 3
  out = run_cli('bench', '--mode=compile', '--depths=8,14', '--block=basic', '--batch=8',
                '--json', check=True, fast_compile=False).stdout
  r = json.loads(out.strip().splitlines()[-1])
  assert set(r['compile_s']) == {'8', '14'} and r['ratio'] > 0


def test_preact_bench_profile_prints_both_columns():
  pytest.importorskip('torch')
  out = run_cli('bench', '--mode=profile', '--depth=11', '--batch=4', '--torch', '--json',
                check=True, fast_compile=False).stdout
  r = json.loads(out.strip().splitlines()[-1])
  assert set(r['torch']['ms_by_kind']) <= set(r['ours']['ms_by_kind'])
  assert r['ours']['step_ms'] > 0 and r['torch']['step_ms'] > 0


def test_bad_row_on_the_command_line_exits_2(tmp_path):
  proc = run_cli('train', '--config=experiments/table1.py:nope', f'--workdir={tmp_path}')
  assert proc.returncode == 2
  assert "preact-train: error: cannot load --config: unknown row 'nope'" in proc.stderr


def test_sweep_runs_seeds_and_report_renders_real_runs(tmp_path, fmnist_dir):
  # A relative workdir (orbax itself needs absolute paths; preact resolves them).
  relative = os.path.relpath(tmp_path, REPO)
  proc = run_cli('sweep', '--config=experiments/table1.py:original,mini',
                 f'--workdir={relative}', '--seeds=0,1', '--', f'--config.data_dir={fmnist_dir}',
                 '--config.total_steps=4', '--config.optimizer.warmup_steps=0',
                 '--config.eval_every=4', '--config.model.depth=8', '--config.progress=log',
                 timeout=900, fast_compile=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for seed in (0, 1):
    assert json.loads((tmp_path / f'seed{seed}' / 'outcome.json').read_text())['step'] == 4
  text = run_cli('report', str(tmp_path), f'--out={tmp_path / "report"}', check=True).stdout
  assert '### table1 (mini)' in text and '| original | original | 8 |' in text
  assert '| 2 | 6.61 |' in text
  # Mini runs probe themselves: the report draws their gradient flow over training.
  assert '## Gradient flow over training' in text
  assert (tmp_path / 'report' / 'probes' / 'original_seed1' / 'probe_ratio.png').exists()


def test_preact_models_json_lists_every_variant():
  out = run_cli('models', '--json', '--depths=8,11', check=True)  # one unit a stage
  rows = json.loads(out.stdout)
  got = {(r['depth'], r['block'], r['unit']) for r in rows}
  for u in units.UNITS:
    assert (11, 'bottleneck', u) in got and (8, 'basic', u) in got
  assert (11, 'basic', 'original') not in got  # 9 is not a multiple of 6
  r = next(r for r in rows if (r['depth'], r['block'], r['unit']) ==
           (11, 'bottleneck', 'full_preact'))
  model = models.cifar_resnet(11, 'full_preact', 'bottleneck')
  assert (r['params'], r['flops']) == models.size_and_flops(model, (32, 32, 3))


def test_preact_probe_command_writes_json_and_plots(tmp_path, fmnist_dir):
  out = tmp_path / 'out'
  proc = run_cli('probe', '--units=full_preact,constant_scaling', '--depth=20', '--batch=4',
                 f'--out={out}', '--config=experiments/fashion_mnist.py',
                 f'--config.data_dir={fmnist_dir}', check=True)
  doc = json.loads((out / 'probe.json').read_text())
  assert [p['unit'] for p in doc['probes']] == ['full_preact', 'constant_scaling']
  assert len(doc['probes'][0]['units']) == 9
  assert set(doc['probes'][0]['units'][0]) == {'index', 'stage', 'grad_norm', 'ratio',
                                              'cosine', 'act_norm'}
  assert doc['identity']['full_preact@20'] == [0.0, 0.0, 0.0]
  for name in ('grad_norm.png', 'act_norm.png', 'identity.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG'
  assert 'first/last' in proc.stdout


_MALLOC_PROBE = '''
import ctypes, os, resource, sys, threading
from preact.cli import common
common.tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
faults = []
def step():  # as XLA:CPU's temporaries: a large block, malloc'ed, written, freed
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(ctypes.c_size_t(n))
    ctypes.memset(p, 1, n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    if len(faults) == 1:
      huge.extend(l for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:'))
    libc.free(ctypes.c_void_p(p))
huge = []
t = threading.Thread(target=step)  # a worker thread, with its own arena by default
t.start(); t.join()
print(os.getpid(), int(huge[0].split()[1]) << 10, faults[1],
      *os.environ.get('GLIBC_TUNABLES', '').split(':'))
'''


@pytest.mark.parametrize('setting', ['1', '0'])
def test_commands_restart_with_malloc_tuned_for_xla(setting):
  """A command restarts itself in place (same pid) with glibc's malloc tunables: its
  large blocks sit on transparent huge pages, and on a CPU a block a thread frees is
  reused without a page fault; PREACT_TUNE_MALLOC=0 opts out."""
  if common._glibc() is None:
    pytest.skip('glibc tunables need Linux with glibc')
  env = {k: v for k, v in cli_env().items() if k != 'GLIBC_TUNABLES'}
  env.update(PREACT_TUNE_MALLOC=setting, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', _MALLOC_PROBE], cwd=REPO, text=True,
                          env=env, stdout=subprocess.PIPE)
  pid, huge, refaults, *tunables = proc.communicate(timeout=60)[0].split()
  assert proc.returncode == 0 and int(pid) == proc.pid
  huge_pages = common.huge_pages_offered() and setting == '1'
  assert ('glibc.malloc.hugetlb=1' in tunables) is huge_pages
  assert (int(huge) >= 128 << 20) is huge_pages
  if setting == '1':
    assert tunables == [t for t in ['glibc.malloc.hugetlb=1'] if huge_pages] + list(
        common._CPU_TUNABLES)
    assert int(refaults) < 16  # the second block is the first one, already mapped
  else:
    assert tunables == [] and int(refaults) >= 128  # mapped afresh: 128 huge pages or more
