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
                 job_name: str = 'preact', repo_dir: str = '.') -> str:
  """An sbatch script: one task per node, each over its node's GPUs; jax.distributed
  reads the job layout from SLURM's environment."""
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={job_name}',
           f'#SBATCH --nodes={nodes}',
           '#SBATCH --ntasks-per-node=1',
           f'#SBATCH --gpus-per-node={gpus_per_node}',
           f'#SBATCH --time={time}',
           '#SBATCH --output=%x-%j.out',
           '#SBATCH --signal=TERM@120  # preemption: preact-train saves on SIGTERM',
           '#SBATCH --requeue']
  if partition:
    lines.append(f'#SBATCH --partition={partition}')
  lines += ['set -euo pipefail', f'cd {shlex.quote(repo_dir)}',
            'srun ' + _join(train_args(config, workdir, extra, distributed=nodes > 1)), '']
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


def execute(commands: list[list[str]], dry_run: bool, parallel: bool = False) -> int:
  """Prints (dry run) or runs the commands; in parallel when they go to several hosts.
  Returns the number of commands that failed."""
  if dry_run:
    for c in commands:
      print(_join(c), flush=True)
    return 0
  if parallel:
    procs = [subprocess.Popen(c) for c in commands]
    return sum(p.wait() != 0 for p in procs)
  failed = 0
  for c in commands:
    print('+ ' + _join(c), file=sys.stderr, flush=True)
    failed += subprocess.run(c).returncode != 0
  return failed
