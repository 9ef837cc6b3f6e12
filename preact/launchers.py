"""Launch commands for Cloud TPU VM pods, multi-GPU hosts, SLURM clusters and seed
sweeps, built as argument lists so that ``--dry-run`` prints exactly what would run
(and the tests check it). Every host runs the same ``preact-train``; with several
hosts, ``--config.distributed=True`` makes each call jax.distributed.initialize(), which
finds its peers from the TPU or SLURM environment.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from typing import Sequence

def train_args(config: str, workdir: str, extra: Sequence[str] = (), distributed=False,
               python: str = '.venv/bin/preact-train') -> list[str]:
  args = [python, f'--config={config}', f'--workdir={workdir}', *extra]
  if distributed:
    args.append('--config.distributed=True')
  return args


def _join(args) -> str:
  return ' '.join(shlex.quote(a) for a in args)


# --------------------------------------------------------------------------------------
# Cloud TPU VM pods.


def tpu_commands(action: str, name: str, zone: str, config: str = '', workdir: str = '',
                 accelerator: str = 'v4-32', version: str = 'tpu-ubuntu2204-base',
                 project: str = '', repo: str = '', ref: str = 'main',
                 extra: Sequence[str] = (), local_dir: str = 'results') -> list[list[str]]:
  """gcloud commands for create | setup | run | fetch | delete | all."""
  where = [f'--zone={zone}'] + ([f'--project={project}'] if project else [])
  tpu = ['gcloud', 'compute', 'tpus', 'tpu-vm']

  def on_all(command):
    return [*tpu, 'ssh', name, *where, '--worker=all', f'--command={command}']

  steps = {
      'create': [[*tpu, 'create', name, *where, f'--accelerator-type={accelerator}',
                  f'--version={version}']],
      'setup': [on_all(f'(test -d preact || git clone {shlex.quote(repo)} preact) && '
                       f'cd preact && git fetch -q origin && git checkout -q {shlex.quote(ref)} '
                       '&& PREACT_EXTRAS=test,tpu bash launch/setup.sh')],
      'run': [on_all('cd preact && ' + _join(train_args(config, workdir, extra, True)))],
      'fetch': [['gcloud', 'storage', 'cp', '-r', workdir, local_dir]
                if workdir.startswith('gs://') else
                [*tpu, 'scp', '--recurse', f'{name}:preact/{workdir}', local_dir, *where,
                 '--worker=0']],
      'delete': [[*tpu, 'delete', name, *where, '--quiet']],
  }
  if action not in steps and action != 'all':
    raise ValueError(f'unknown action {action!r}; valid: {", ".join(steps)}, all')
  if action in ('setup', 'all') and not repo:
    raise ValueError(f'{action} needs --repo: the git URL the workers clone')
  if action in ('run', 'fetch', 'all') and not workdir:
    raise ValueError(f'{action} needs --workdir (a gs:// path on a pod)')
  if action in ('run', 'all') and not config:
    raise ValueError(f'{action} needs --config')
  if action == 'all':
    return [c for a in ('create', 'setup', 'run', 'fetch', 'delete') for c in steps[a]]
  return steps[action]


# --------------------------------------------------------------------------------------
# GPU hosts.


def gpu_host_commands(config: str, workdir: str, host: str = '', gpus: str = '',
                      extra: Sequence[str] = (), repo_dir: str = 'preact') -> list[list[str]]:
  """One process over all of a host's GPUs (pmap over them); on another host via ssh."""
  env = [f'CUDA_VISIBLE_DEVICES={gpus}'] if gpus else []
  args = train_args(config, workdir, extra)
  if not host:
    return [['env', *env, *args] if env else args]
  remote = f'cd {shlex.quote(repo_dir)} && ' + _join([*env, *args])
  return [['ssh', host, remote]]


def slurm_script(config: str, workdir: str, nodes: int, gpus_per_node: int,
                 extra: Sequence[str] = (), time: str = '48:00:00', partition: str = '',
                 job_name: str = 'preact', repo_dir: str = '.', notice_s: int = 180) -> str:
  """An sbatch script: one task per GPU on every node, requeued at its time limit.

  One task per GPU because that is the layout JAX's SLURM detection assumes: under
  SLURM, ``jax.distributed.initialize()`` gives each process the GPU numbered by its
  ``SLURM_LOCALID`` (``local_device_ids``), so one task per node would train on one GPU
  of each node (jax-ml/jax#16788). Every task sees all its node's GPUs (no
  ``--gpus-per-task``, which would renumber each task's GPU as 0).

  ``notice_s`` seconds before the time limit SLURM signals the batch shell (USR1), which
  passes SIGTERM to the tasks: all of them stop at the same step, save one checkpoint
  and exit 143; the script then requeues the job, which resumes from that checkpoint.
  """
  train = train_args(config, workdir, extra, distributed=nodes * gpus_per_node > 1)
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={job_name}',
           f'#SBATCH --nodes={nodes}',
           f'#SBATCH --ntasks-per-node={gpus_per_node}  # one task per GPU: JAX takes GPU '
           'SLURM_LOCALID',
           f'#SBATCH --gpus-per-node={gpus_per_node}',
           f'#SBATCH --time={time}',
           '#SBATCH --output=%x-%j.out',
           f'#SBATCH --signal=B:USR1@{notice_s}  # to this script, before the time limit',
           '#SBATCH --requeue']
  if partition:
    lines.append(f'#SBATCH --partition={partition}')
  lines += ['set -u', f'cd {shlex.quote(repo_dir)}',
            'requeue() {',
            '  echo "time limit near: saving a checkpoint, then requeueing" >&2',
            '  scancel --signal=TERM "$SLURM_JOB_ID"  # every task of the step, not this shell',
            '  wait "$train"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            '  exit 0',
            '}',
            'trap requeue USR1',
            'srun ' + _join(train) + ' &',
            'train=$!',
            'wait "$train"', '']
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------
# Seed sweeps: the paper reports medians of 5 runs.


def sweep_commands(config: str, workdir: str, seeds: Sequence[int], hosts: Sequence[str] = (),
                   extra: Sequence[str] = (), repo_dir: str = 'preact') -> list[list[str]]:
  """One preact-train per seed into WORKDIR/seed<k>; round-robin over hosts via ssh."""
  out = []
  for i, seed in enumerate(seeds):
    args = train_args(config, f'{workdir}/seed{seed}', [f'--config.seed={seed}', *extra])
    if hosts:
      host = hosts[i % len(hosts)]
      out.append(['ssh', host, f'cd {shlex.quote(repo_dir)} && ' + _join(args)])
    else:
      out.append(args)
  return out


def execute(commands: list[list[str]], dry_run: bool, per_host: bool = False) -> int:
  """Prints (dry run) or runs the commands. With ``per_host``, each ssh host works
  through its own commands one at a time, the hosts side by side: a host never runs two
  jobs at once. Returns the number of commands that failed."""
  if dry_run:
    for c in commands:
      print(_join(c), flush=True)
    return 0
  queues: dict[str, list[list[str]]] = {}
  for c in commands:
    queues.setdefault(c[1] if per_host and c[0] == 'ssh' else '', []).append(c)
  failures = []

  def work(queue):
    for c in queue:
      print('+ ' + _join(c), file=sys.stderr, flush=True)
      failures.append(subprocess.run(c).returncode != 0)

  threads = [threading.Thread(target=work, args=(q,)) for q in queues.values()]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return sum(failures)
