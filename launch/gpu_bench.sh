#!/usr/bin/env bash
# The prepared GPU check (one run, under 8 minutes): preact-bench on one GPU for
# ResNet-164 and ResNet-1001 in float32 and bfloat16, each beside the PyTorch
# reference, plus the 164-vs-1001 compile times. JSON files land in $OUT (default
# bench_gpu/). Needs jax with CUDA, flax, optax, orbax, torch; no TensorFlow (the
# bench never imports it). ml_collections is pure Python: if the machine lacks it,
# put its wheel in .whl/ (pip download ml_collections==1.1.0 -d .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_gpu}
mkdir -p "$OUT"
if ! python3 -c 'import ml_collections' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.csv" 2>&1
for depth in 164 1001; do
  for dtype in float32 bfloat16; do
    timeout 100 python3 -m preact.cli.bench --depth="$depth" --block=bottleneck --batch=128 \
      --dtype="$dtype" --torch --steps=20 --json > "$OUT/step_${depth}_${dtype}.json" \
      2> "$OUT/step_${depth}_${dtype}.log" || echo "depth $depth $dtype failed (see log)"
  done
done
timeout 120 python3 -m preact.cli.bench --mode=compile --json > "$OUT/compile.json" \
  2> "$OUT/compile.log" || echo "compile benchmark failed (see log)"
cat "$OUT"/*.json
