"""The paper's tables as configs, the report against the paper, sweeps and launchers."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest
import tensorflow_datasets as tfds

from conftest import REPO, run_cli
from preact import config as config_lib, launchers, models, report, step as step_lib, train, units
from preact.errors import UserError

TABLES = ('table1', 'table2', 'table3', 'table4', 'table5')


def load(table):
  spec = importlib.util.spec_from_file_location(table, REPO / 'experiments' / f'{table}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def all_rows():
  """(table, arg) for every row the paper reports, at each depth it reports."""
  out = []
  for table in TABLES:
    m = load(table)
    for name, row in m.ROWS.items():
      if isinstance(row.error, dict):
        out.extend((table, f'{name},depth={d}') for d in row.error)
      else:
        out.append((table, name))
  return out


def test_every_paper_row_has_a_config_with_its_published_number():
  rows = all_rows()
  published = {}
  for table, arg in rows:
    c = load(table).get_config(arg)
    config_lib.validate(c)
    published[table, arg] = 'fail' if c.paper.fail else c.paper.error
  # Spot checks against the paper's tables.
  assert published['table1', 'original'] == 6.61
  assert published['table1', 'constant_scaling_0_1'] == 'fail'  # "a plain net"
  assert published['table1', 'exclusive_gating_b6'] == 8.70
  assert published['table1', 'dropout_shortcut'] == 'fail'
  assert published['table2', 'full_preact,depth=164'] == 5.46
  assert published['table2', 'bn_after_addition,depth=110'] == 8.17
  assert published['table3', 'c10_1001_original'] == 7.61
  assert published['table3', 'c100_1001_full_preact'] == 22.71
  assert published['table4', 'c10_1001_batch64'] == 4.62
  assert published['table5', 'resnet200_preact_scale_aspect_320'] == 20.1


def test_rows_carry_the_papers_settings():
  t1 = load('table1')
  c = t1.get_config('constant_scaling_0.5_1,seed=3')
  assert (c.model.unit, c.model.depth, c.model.block) == ('constant_scaling', 110, 'basic')
  assert (c.model.unit_args.scale, c.model.unit_args.branch_scale) == (0.5, 1.0)
  assert c.seed == 3
  c = t1.get_config('constant_scaling_0_1')
  assert (c.model.unit_args.scale, c.model.unit_args.branch_scale) == (0.0, 1.0)
  c = load('table2').get_config('full_preact,depth=110')
  assert c.total_steps == 64_000 and c.optimizer.boundaries == (32_000, 48_000)
  assert c.optimizer.decay == 'all' and c.optimizer.nesterov and c.batch_size == 128
  c = load('table3').get_config('c10_110_1layer_full_preact')
  assert c.model.block == 'one_layer' and c.model.depth == 110
  c = load('table4').get_config('c100_1001')
  assert (c.dataset, c.model.depth, c.model.block) == ('cifar100', 1001, 'bottleneck')
  c = config_lib.validate(load('table5').get_config('resnet152_original_320'))
  assert (c.model.arch, c.augment.eval_crop, c.augment.eval_resize) == ('imagenet', 320, 320)
  assert c.paper.error_top5 == 5.5
  assert c.optimizer.boundaries == (30 * 5005, 60 * 5005) and c.total_steps == 90 * 5005
  # The real networks of the rows build at their real depths.
  m = models.from_config(load('table4').get_config('c10_1001'), 10)
  assert models.count_params(models.init_shapes(m, (32, 32, 3))['params']) == 10_327_706


@pytest.mark.parametrize('table,arg', all_rows())
def test_every_cifar_row_warms_up_and_imagenet_rows_do_not(table, arg):
  """Appendix: "for all CIFAR experiments we warm up the training by using a smaller
  learning rate of 0.01 at the beginning 400 iterations"; on ImageNet, no warm-up."""
  c = load(table).get_config(arg)
  o = c.optimizer
  if c.model.arch == 'imagenet':
    assert o.warmup_steps == 0
  else:
    assert (o.warmup_steps, o.warmup_lr, o.lr) == (400, 0.01, 0.1)
    schedule = step_lib.make_schedule(o, c.total_steps)
    assert float(schedule(0)) == float(schedule(399)) == pytest.approx(0.01)
    assert float(schedule(400)) == pytest.approx(0.1)


def test_basic_nets_use_option_a_and_bottlenecks_project():
  for table, arg in all_rows():
    c = load(table).get_config(arg)
    m = models.from_config(c, 10)
    want = 'projection' if c.model.block == 'bottleneck' or c.model.arch == 'imagenet' \
        else 'zero_pad'
    assert m.shortcut == want, (table, arg)


def test_resnet_1001_batch_64_runs_the_authors_200_epochs():
  """resnet-1k-layers README: `-batchSize 64 ... -nEpochs 200`; fb.resnet.torch's CIFAR
  schedule divides the lr by 10 from epoch 81 and 122 (1-based). An epoch is
  ceil(50000 / 64) = 782 iterations."""
  c = config_lib.validate(load('table4').get_config('c10_1001_batch64'))
  assert c.batch_size == 64
  assert c.total_steps == 200 * 782 == 156_400
  assert c.optimizer.boundaries == (80 * 782, 121 * 782)
  assert c.optimizer.warmup_steps == 400


@pytest.mark.parametrize('arg,match', [
    ('nope', "unknown row 'nope'; rows: original, constant_scaling_0_1"),
    ('original,depth=56', 'no published result at depth 56'),
    ('original,colour=red', 'unknown option'),
])
def test_bad_rows_say_which_rows_exist(arg, match):
  with pytest.raises(ValueError, match=match):
    load('table2' if 'depth' in arg else 'table1').get_config(arg)


# An ImageNet net of one bottleneck unit per stage (not a paper net: tests add it).
IMAGENET_14 = 14


def _shrunk(c):
  """The row's config on a network small enough to train in a test: same unit, shortcut
  parameters, block form, dataset and recipe; fewest units per stage; tiny images."""
  c.model.depth = IMAGENET_14 if c.model.arch == 'imagenet' else (
      {'bottleneck': 11, 'one_layer': 5, 'basic': 8}[c.model.block])
  c.batch_size = c.eval_batch_size = 8
  c.total_steps, c.total_epochs, c.log_every = 2, 0.0, 1
  c.optimizer.boundary_epochs = ()
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, 1)
  c.augment.image_size = 32
  c.augment.scale_range = (32, 40)
  c.augment.eval_resize = c.augment.eval_crop = 32 if c.augment.eval_crop == 224 else 40
  # The in-training probe is tested on its own (test_probes.py); one streaming (ImageNet)
  # row keeps it, for the probe batch read beside the training stream.
  c.probe_every = 1 if c.paper.row == 'resnet101_bn_after_addition' else 0
  return c


def _distinct_rows():
  seen, out = set(), []
  for table, arg in all_rows():
    c = _shrunk(load(table).get_config(arg))
    key = json.dumps({k: v for k, v in c.to_dict().items() if k != 'paper'},
                     sort_keys=True, default=list)
    if key not in seen:
      seen.add(key)
      out.append((table, arg))
  return out


@pytest.mark.slow
@pytest.mark.parametrize('table,arg', _distinct_rows())
def test_every_row_trains_a_few_steps_and_evaluates(tmp_path, table, arg, monkeypatch):
  monkeypatch.setitem(models.IMAGENET_NETS, IMAGENET_14, ('bottleneck', (1, 1, 1, 1)))
  c = _shrunk(load(table).get_config(arg))
  with tfds.testing.mock_data(num_examples=16):
    out = train.train_and_evaluate(c, tmp_path, devices=jax.devices()[:1])
    assert out['status'] == 'completed' and out['step'] == 2
    result = train.evaluate_checkpoint(tmp_path, devices=jax.devices()[:1])
  assert result['examples'] == 16 and 0.0 <= result['error'] <= 1.0
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['step'] == 2 and 'test_error' in rows[-1]


def test_mini_setting_is_fashion_mnist_at_small_scale():
  c = load('table2').get_config('original,depth=164,mini')
  assert (c.dataset, c.model.depth, c.model.block, c.paper.mini) == \
      ('fashion_mnist', 20, 'bottleneck', True)
  assert c.paper.error == 5.93 and c.total_steps == 300
  c = load('table1').get_config('constant_scaling_0.5_0.5,mini,seed=1')
  assert (c.model.depth, c.model.block, c.seed) == (20, 'basic', 1)


@pytest.mark.parametrize('table', TABLES)
def test_every_row_has_a_mini_network(table):
  """Every row shrinks to a ResNet-20 of its own unit (ImageNet rows and one-layer units
  included)."""
  m = load(table)
  for name in m.ROWS:
    c = m.get_config(f'{name},mini')
    config_lib.validate(c)
    model = models.from_config(c, 10)
    assert (c.dataset, model.unit) == ('fashion_mnist', c.model.unit)
    convs = len(units.BLOCKS[model.block])
    assert sum(model.stage_sizes) * convs + 2 == 20 and model.block == c.model.block


# --------------------------------------------------------------------------------------
# The report.

def _fake_run(path, table, row, seed, errors, status='completed', unit='full_preact',
              paper=5.46, fail=False, mini=False):
  """A run directory as the trainer writes it."""
  c = config_lib.base()
  c.seed, c.model.unit, c.paper.mini = seed, unit, mini
  c.paper.table, c.paper.row, c.paper.error, c.paper.fail = table, row, paper, fail
  path.mkdir(parents=True)
  (path / 'config.json').write_text(config_lib.to_json(c))
  lines = [{'step': 100 * (i + 1), 'train_loss': 1.0 / (i + 1), 'train_error': 0.5,
            'test_error': e} for i, e in enumerate(errors)]
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  (path / 'outcome.json').write_text(json.dumps({'status': status, 'step': 100 * len(errors),
                                                 'reason': 'x' if status != 'completed' else ''}))


def test_report_takes_medians_and_marks_failures(tmp_path):
  for seed, final in enumerate((0.060, 0.055, 0.050)):
    _fake_run(tmp_path / f'fp/seed{seed}', 'table2', 'full_preact@164', seed, [0.2, final])
  _fake_run(tmp_path / 'ds/seed0', 'table1', 'dropout_shortcut', 0, [0.9, 0.85],
            unit='dropout_shortcut', paper=-1, fail=True)
  _fake_run(tmp_path / 'cs/seed0', 'table1', 'constant_scaling_0.5_0.5', 0, [0.3],
            status='diverged', unit='constant_scaling', paper=12.35)
  text = report.write([tmp_path], tmp_path / 'out')
  assert ('| full_preact@164 | full_preact | 164 | 5.50 | 0.41 | 5.00 – 6.00 | 3 | 5.46 '
          '| +0.04 | 1 / 1 |') in text
  assert ('| dropout_shortcut | dropout_shortcut | 164 | fail | – | fail – fail | 1 | fail '
          '| – | 1 / 2 |') in text
  assert '| constant_scaling_0.5_0.5 | constant_scaling | 164 | fail (diverged) |' in text
  assert '| 1 | 12.35 | – | 1 / 1 |' in text  # both fail: tied
  assert (tmp_path / 'out' / 'report.md').read_text().startswith('# Results')
  for name in ('curves_table2.png', 'curves_table1.png'):
    assert (tmp_path / 'out' / name).read_bytes()[:4] == b'\x89PNG'


def test_mini_runs_fail_only_by_diverging(tmp_path):
  _fake_run(tmp_path / 'a', 'table1', 'original', 0, [0.35], unit='original', mini=True,
            paper=6.61)
  text = report.write([tmp_path], tmp_path / 'out')
  assert '### table1 (mini)' in text
  assert '| original | original | 164 | 35.00 | – | 35.00 – 35.00 | 1 | 6.61 | +28.39 | 1 / 1 |' in text


def test_report_of_no_runs_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='no runs'):
    report.write([tmp_path], tmp_path / 'out')


# --------------------------------------------------------------------------------------
# Launchers and sweeps: the exact commands.

def test_tpu_pod_commands():
  cmds = launchers.tpu_commands('all', 'pod', 'us-central2-b', 'experiments/table4.py:c10_1001',
                                'gs://b/r', accelerator='v4-32', repo='https://x/preact.git',
                                extra=['--config.seed=2'])
  text = [' '.join(c) for c in cmds]
  assert text[0] == ('gcloud compute tpus tpu-vm create pod --zone=us-central2-b '
                     '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base')
  assert '--worker=all' in cmds[1] and 'launch/setup.sh' in cmds[1][-1]
  assert cmds[2][-1] == ('--command=cd preact && .venv/bin/preact-train '
                         '--config=experiments/table4.py:c10_1001 --workdir=gs://b/r '
                         '--config.seed=2 --config.distributed=True')
  assert text[3] == 'gcloud storage cp -r gs://b/r results'
  assert text[4] == 'gcloud compute tpus tpu-vm delete pod --zone=us-central2-b --quiet'
  with pytest.raises(ValueError, match='needs --repo'):
    launchers.tpu_commands('setup', 'pod', 'z')
  with pytest.raises(ValueError, match='all needs --repo'):
    launchers.tpu_commands('all', 'pod', 'z', 'experiments/table4.py:c10_1001', 'gs://b/r')
  with pytest.raises(ValueError, match='all needs --workdir'):
    launchers.tpu_commands('all', 'pod', 'z', 'experiments/table4.py:c10_1001',
                           repo='https://x/preact.git')


def test_launch_scripts_dry_run_print_the_commands():
  def script(name, *args):
    return subprocess.run([sys.executable, f'launch/{name}', '--dry-run', *args], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()
  out = script('gpu_host.py', '--config=experiments/table2.py:full_preact,depth=164',
               '--workdir=runs/x', '--host=gpu7', '--gpus=0,1', '--', '--config.seed=1')
  assert out == ("ssh gpu7 'cd preact && CUDA_VISIBLE_DEVICES=0,1 .venv/bin/preact-train "
                 "--config=experiments/table2.py:full_preact,depth=164 "
                 "--workdir=runs/x --config.seed=1'")
  out = script('slurm.py', '--config=experiments/table4.py:c10_1001', '--workdir=/s/r',
               '--nodes=2', '--gpus_per_node=8')
  assert '#SBATCH --nodes=2' in out and '#SBATCH --gpus-per-node=8' in out
  # One task per GPU (JAX gives each the GPU SLURM_LOCALID), all GPUs visible to each.
  assert '#SBATCH --ntasks-per-node=8 ' in out and 'gpus-per-task' not in out
  assert 'srun .venv/bin/preact-train --config=experiments/table4.py:c10_1001 ' \
         '--workdir=/s/r --config.distributed=True &' in out
  # Before the time limit: signal the tasks, wait for their checkpoint, requeue.
  assert '#SBATCH --signal=B:USR1@180' in out and 'trap requeue USR1' in out
  body = out[out.index('requeue() {'):]
  assert body.index('scancel --signal=TERM "$SLURM_JOB_ID"') < body.index('wait "$train"') \
      < body.index('scontrol requeue "$SLURM_JOB_ID"')
  assert out.endswith('sbatch preact.sbatch')
  out = script('tpu_pod.py', 'delete', '--name=p', '--zone=z')
  assert out == 'gcloud compute tpus tpu-vm delete p --zone=z --quiet'


def test_sweep_commands():
  local = launchers.sweep_commands('experiments/table1.py:original', 'runs/t1', [0, 1])
  assert local[1] == ['.venv/bin/preact-train', '--config=experiments/table1.py:original',
                      '--workdir=runs/t1/seed1', '--config.seed=1']
  remote = launchers.sweep_commands('e.py', 'runs/t', [0, 1, 2], hosts=['a', 'b'])
  assert [c[1] for c in remote] == ['a', 'b', 'a']
  proc = run_cli('sweep', '--config=experiments/table1.py:original', '--workdir=runs/t1',
                 '--seeds=3,4', '--hosts=h1', '--dry_run', check=True)
  assert proc.stdout.splitlines() == [
      "ssh h1 'cd preact && .venv/bin/preact-train --config=experiments/table1.py:original "
      "--workdir=runs/t1/seed3 --config.seed=3'",
      "ssh h1 'cd preact && .venv/bin/preact-train --config=experiments/table1.py:original "
      "--workdir=runs/t1/seed4 --config.seed=4'"]


def test_slurm_script_saves_and_requeues_at_the_time_limit_notice(tmp_path):
  """The sbatch script run by bash with stand-ins for srun, scancel and scontrol: on
  SLURM's USR1 notice it stops the tasks (they save and exit 143), waits for them, and
  requeues the job."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  stand_ins = {
      # A task that saves and exits 143 on SIGTERM, as preact-train does.
      'srun': f'echo $$ > {tmp_path}/task.pid\n'
              f'trap "echo saved > {tmp_path}/saved; exit 143" TERM\n'
              'while true; do sleep 0.05; done',
      'scancel': f'echo "$@" > {tmp_path}/scancel.args; kill -TERM $(cat {tmp_path}/task.pid)',
      'scontrol': f'echo "$@" > {tmp_path}/requeued',
  }
  for name, body in stand_ins.items():
    (bin_dir / name).write_text(f'#!/bin/bash\n{body}\n')
    (bin_dir / name).chmod(0o755)
  script = tmp_path / 'job.sbatch'
  script.write_text(launchers.slurm_script('e.py', '/s/r', 2, 8, repo_dir=str(tmp_path)))
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_JOB_ID': '77'}
  job = subprocess.Popen(['bash', str(script)], env=env)
  deadline = time.time() + 30
  while not (tmp_path / 'task.pid').exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)  # the trap is set before the task starts
  job.send_signal(signal.SIGUSR1)
  assert job.wait(timeout=30) == 0
  assert (tmp_path / 'saved').exists()
  assert (tmp_path / 'scancel.args').read_text().split() == ['--signal=TERM', '77']
  assert (tmp_path / 'requeued').read_text().split() == ['requeue', '77']


def test_sweep_over_hosts_runs_one_job_at_a_time_per_host(tmp_path, monkeypatch):
  """Seeds dealt round-robin to two hosts: each host's jobs run one after another, the
  hosts side by side; a failed job is counted (a stand-in ssh records when each ran)."""
  log = tmp_path / 'log'
  ssh = tmp_path / 'ssh'
  ssh.write_text('#!/bin/bash\n'
                 f'echo "$1 start $(date +%s.%N)" >> {log}\n'
                 'sleep 0.4\n'
                 f'echo "$1 end $(date +%s.%N)" >> {log}\n'
                 'case "$2" in *seed2*) exit 3;; esac\n')
  ssh.chmod(0o755)
  monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
  commands = launchers.sweep_commands('e.py', 'runs/t', [0, 1, 2, 3], hosts=['a', 'b'])
  assert launchers.execute(commands, dry_run=False, per_host=True) == 1  # seed 2 failed
  spans = {}
  for line in log.read_text().splitlines():
    host, what, t = line.split()
    spans.setdefault(host, []).append(float(t))
  for host in ('a', 'b'):
    a0, a1, b0, b1 = spans[host]  # start, end of its first job, then of its second
    assert a1 <= b0, host  # never two at once on one host
  assert spans['a'][0] < spans['b'][1] and spans['b'][0] < spans['a'][1]  # side by side
