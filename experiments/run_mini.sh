#!/usr/bin/env bash
# The small-scale reproduction of Tables 1 and 2 on Fashion-MNIST: every row in the
# `mini` setting (preact/paper.py: ResNet-20 basic for 110, ResNet-20 bottleneck for
# 164, 300 steps of 64), each seed of SEEDS, JOBS rows at a time, then the report and
# curves. Re-running resumes unfinished runs and skips finished ones.
# Usage: bash experiments/run_mini.sh [RUNS_DIR] [SEEDS] [JOBS] [TABLES]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/mini}
SEEDS=${2:-0,1}
JOBS=${3:-2}
TABLES=${4:-table1,table2}
rows() { .venv/bin/python -c "import importlib.util as u; s=u.spec_from_file_location('t','experiments/$1.py'); m=u.module_from_spec(s); s.loader.exec_module(m); print(' '.join(m.ROWS))"; }
{
  case ",$TABLES," in *,table2,*)
    for depth in 110 164; do
      for row in $(rows table2); do
        echo "experiments/table2.py:$row,depth=$depth,mini $RUNS/table2/${row}_$depth"
      done
    done;; esac
  case ",$TABLES," in *,table1,*)
    for row in $(rows table1); do
      echo "experiments/table1.py:$row,mini $RUNS/table1/$row"
    done;; esac
} | xargs -P "$JOBS" -L 1 sh -c 'mkdir -p "$(dirname "$1")"; .venv/bin/preact-sweep --config="$0" --workdir="$1" \
      --seeds='"$SEEDS"' -- --config.progress=log > "$1.log" 2>&1 || echo "failed: $1"' 
dirs=(); for t in ${TABLES//,/ }; do dirs+=("$RUNS/$t"); done
.venv/bin/preact-report "${dirs[@]}" --out=experiments/results/mini
