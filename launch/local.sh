#!/usr/bin/env bash
# One machine, start to finish: set up, train, evaluate the saved checkpoint, report.
#   bash launch/local.sh                                   # the embedded default
#   bash launch/local.sh experiments/table2.py:full_preact,depth=164 runs/t2 --config.seed=1
# Re-running resumes the run in WORKDIR from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-experiments/fashion_mnist.py}
WORKDIR=${2:-runs/fashion_mnist}
shift $(( $# > 2 ? 2 : $# ))
bash launch/setup.sh
.venv/bin/preact-train --config="$CONFIG" --workdir="$WORKDIR" "$@"
.venv/bin/preact-eval --workdir="$WORKDIR"
if [ -x .venv/bin/preact-report ]; then
  .venv/bin/preact-report "$WORKDIR" --out="$WORKDIR/report"
fi
