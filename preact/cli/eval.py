"""preact-eval: restore a run's checkpoint with the run's own config and evaluate.

  preact-eval --workdir=runs/fmnist [--step=N] [--split=test]

Prints one JSON line (step, split, loss, error, accuracy, examples, run_status) and
appends it to WORKDIR/eval.jsonl. Exits 3 when the run diverged (the result is then
that of its last finite checkpoint).
"""

from __future__ import annotations

import sys

from absl import flags

from preact.cli import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'A preact-train workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_SPLIT = flags.DEFINE_string('split', None, "TFDS split (default: the dataset's test split).")
common.define_distributed_flags()


@common.main('preact-eval')
def main(argv):
  common.no_arguments(argv)
  if not _WORKDIR.value:
    raise common.UserError('--workdir is required: the directory of a preact-train run')
  common.init_distributed(False)
  from preact import runrecord, train
  result = train.evaluate_checkpoint(_WORKDIR.value, _STEP.value, _SPLIT.value)
  print(runrecord.to_json(result, indent=None), flush=True)
  try:
    train.record_eval(_WORKDIR.value, result)
  except OSError as e:
    print(f'preact-eval: warning: the result was not appended to eval.jsonl ({e})',
          file=sys.stderr, flush=True)
  if result['run_status'] == 'diverged':
    print(f'preact-eval: the run diverged ({result["run_reason"]}); step '
          f'{result["step"]} is its last finite checkpoint', file=sys.stderr, flush=True)
    sys.exit(train.EXIT_CODES['diverged'])


def run():
  common.run(main)


if __name__ == '__main__':
  run()
