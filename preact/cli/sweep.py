"""preact-sweep: one experiment over several seeds (the paper reports medians of 5).

  preact-sweep --config=experiments/table2.py:full_preact,depth=164 --workdir=runs/t2 \
      [--seeds=0,1,2,3,4] [--hosts=gpu1,gpu2,...] [--dry_run] [-- extra preact-train flags]

Locally the seeds run one after another (a failed seed does not stop the rest); with
--hosts, the seeds are dealt round-robin to the hosts over ssh, and each host runs its
seeds one after another, the hosts side by side. Each seed trains into WORKDIR/seed<k>;
`preact-report WORKDIR` then gives the median.
"""

from __future__ import annotations

import sys

from absl import flags

from preact.cli import common

_CONFIG = flags.DEFINE_string('config', None, 'Experiment config (file[:arg]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Parent directory of the seed runs.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2', '3', '4'], 'Seeds.')
_HOSTS = flags.DEFINE_list('hosts', [], 'ssh hosts; seeds dealt round-robin, one job at a '
                           'time per host.')
_REPO_DIR = flags.DEFINE_string('repo_dir', 'preact', 'The checkout on the hosts.')
_DRY = flags.DEFINE_bool('dry_run', False, 'Print the commands only.')
_PREACT_TRAIN = flags.DEFINE_string('preact_train', None, 'preact-train to call locally '
                                    '(default: the one beside this Python).')


@common.main('preact-sweep')
def main(argv):
  if not _CONFIG.value or not _WORKDIR.value:
    raise common.UserError('--config and --workdir are required')
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise common.UserError(f'--seeds takes integers, got {",".join(_SEEDS.value)}') from None
  import os
  from preact import launchers
  commands = launchers.sweep_commands(_CONFIG.value, _WORKDIR.value, seeds, _HOSTS.value,
                                      argv[1:], _REPO_DIR.value)
  if not _HOSTS.value:
    exe = _PREACT_TRAIN.value or os.path.join(os.path.dirname(sys.executable), 'preact-train')
    commands = [[exe, *c[1:]] for c in commands]
  failed = launchers.execute(commands, _DRY.value, per_host=bool(_HOSTS.value))
  if not _DRY.value:
    _summary(_WORKDIR.value, seeds)
  if failed:
    print(f'preact-sweep: {failed} of {len(commands)} seeds did not complete (their '
          'outcome.json says why)', file=sys.stderr)
    sys.exit(1)


def _summary(workdir: str, seeds: list[int]) -> None:
  """One line per seed: its recorded outcome."""
  import json
  import os
  print(f'{"seed":>4}  {"status":<12} {"step":>7}  test error', flush=True)
  for seed in seeds:
    path = os.path.join(workdir, f'seed{seed}', 'outcome.json')
    try:
      with open(path) as f:
        o = json.load(f)
    except (OSError, ValueError):
      o = {'status': 'no outcome'}
    err = o.get('test_error')
    print(f'{seed:>4}  {o.get("status", "?"):<12} {o.get("step", "–")!s:>7}  '
          f'{"–" if err is None else f"{100 * err:.2f}%"}', flush=True)


def run():
  common.run(main)


if __name__ == '__main__':
  run()
