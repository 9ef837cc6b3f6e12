"""preact-train: train and evaluate one config in one workdir, resuming if it can.

  preact-train --config=experiments/fashion_mnist.py --workdir=runs/fmnist
  preact-train --config=experiments/table2.py:full_preact,depth=164 --workdir=gs://b/r \\
      --config.batch_size=64
"""

from __future__ import annotations

import sys

from absl import flags

from preact.cli import common

_CONFIG = common.config_flag('Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the run lives (local or gs://).')
common.define_distributed_flags()


@common.main('preact-train')
def main(argv):
  common.no_arguments(argv)
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    raise common.UserError('--config and --workdir are required, e.g. '
                           '--config=experiments/fashion_mnist.py --workdir=runs/fmnist')
  common.init_distributed(config.distributed)
  from preact import train
  outcome = train.train_and_evaluate(config, _WORKDIR.value)
  status = outcome['status']
  if outcome['test_error'] is not None:
    print(f'step {outcome["step"]}: test error {100 * outcome["test_error"]:.2f}% '
          f'({status})', flush=True)
  if status == 'failed':
    print(f'preact-train: error: {outcome["reason"]}', file=sys.stderr, flush=True)
  elif status != 'completed':
    print(f'preact-train: {status} at step {outcome["step"]}: {outcome["reason"]}',
          file=sys.stderr, flush=True)
  # 0 completed, 3 diverged, 1 failed (a write), 130 interrupted (SIGINT), 143 preempted
  # (SIGTERM): the last two as if the signal had ended the process.
  sys.exit(train.EXIT_CODES[status])


def run():
  common.run(main)


if __name__ == '__main__':
  run()
