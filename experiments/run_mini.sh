#!/usr/bin/env bash
# The small-scale reproduction of Tables 1 and 2 on Fashion-MNIST: every row in the
# `mini` setting (preact/paper.py: ResNet-20 basic for 110, ResNet-20 bottleneck for
# 164, 300 steps of 64), two seeds each, then the report and curves. About an hour on
# 2 CPU cores. Usage: bash experiments/run_mini.sh [RUNS_DIR] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/mini}
SEEDS=${2:-0,1}
rows() { .venv/bin/python -c "import importlib.util as u; s=u.spec_from_file_location('t','experiments/$1.py'); m=u.module_from_spec(s); s.loader.exec_module(m); print(' '.join(m.ROWS))"; }
for row in $(rows table1); do
  .venv/bin/preact-sweep --config="experiments/table1.py:$row,mini" \
    --workdir="$RUNS/table1/$row" --seeds="$SEEDS" -- --config.progress=log
done
for depth in 110 164; do
  for row in $(rows table2); do
    .venv/bin/preact-sweep --config="experiments/table2.py:$row,depth=$depth,mini" \
      --workdir="$RUNS/table2/${row}_$depth" --seeds="$SEEDS" -- --config.progress=log
  done
done
.venv/bin/preact-report "$RUNS/table1" "$RUNS/table2" --out=experiments/results/mini
