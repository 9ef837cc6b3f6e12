#!/usr/bin/env bash
# The small-scale reproduction of Tables 1 and 2 on Fashion-MNIST: every row in the
# `mini` setting (preact/paper.py: ResNet-20 basic for 110, ResNet-20 bottleneck for
# 164, 300 steps of 64), each seed of SEEDS, JOBS rows at a time, then the report and
# curves. A run takes about 4 minutes on one of 2 CPU cores' worth of work; re-running
# skips finished runs. Usage: bash experiments/run_mini.sh [RUNS_DIR] [SEEDS] [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/mini}
SEEDS=${2:-0,1}
JOBS=${3:-2}
rows() { .venv/bin/python -c "import importlib.util as u; s=u.spec_from_file_location('t','experiments/$1.py'); m=u.module_from_spec(s); s.loader.exec_module(m); print(' '.join(m.ROWS))"; }
{
  for depth in 110 164; do
    for row in $(rows table2); do
      echo "experiments/table2.py:$row,depth=$depth,mini $RUNS/table2/${row}_$depth"
    done
  done
  for row in $(rows table1); do
    echo "experiments/table1.py:$row,mini $RUNS/table1/$row"
  done
} | xargs -P "$JOBS" -L 1 sh -c 'mkdir -p "$(dirname "$1")"; .venv/bin/preact-sweep --config="$0" --workdir="$1" \
      --seeds='"$SEEDS"' -- --config.progress=log > "$1.log" 2>&1 || echo "failed: $1"' 
.venv/bin/preact-report "$RUNS/table1" "$RUNS/table2" --out=experiments/results/mini
