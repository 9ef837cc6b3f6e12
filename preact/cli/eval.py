"""preact-eval: restore a run's checkpoint with the run's own config and evaluate.

  preact-eval --workdir=runs/fmnist [--step=N] [--split=test]

Prints one JSON line (step, split, loss, error, accuracy, examples) and appends it to
WORKDIR/eval.jsonl.
"""

from __future__ import annotations

import json

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
  from preact import train
  result = train.evaluate_checkpoint(_WORKDIR.value, _STEP.value, _SPLIT.value)
  print(json.dumps(result), flush=True)


def run():
  common.run(main)


if __name__ == '__main__':
  run()
