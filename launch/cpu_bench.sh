#!/usr/bin/env bash
# The CPU figures of docs/performance.md, each ratio measured in one run
# (ours, then the PyTorch reference, in the same process tree). About 25 minutes on
# 2 cores; run it on a quiet machine. JSON files land in $OUT (default
# experiments/results/bench_cpu). Usage: bash launch/cpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results/bench_cpu}
mkdir -p "$OUT"
BENCH=".venv/bin/preact-bench --json"
run() {  # name, flags...
  local name=$1; shift
  echo "== $name: preact-bench $*" >&2
  $BENCH "$@" > "$OUT/$name.json" 2> "$OUT/$name.log" || echo "$name failed (see $OUT/$name.log)" >&2
}
lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | sed 's/Flags:.*avx512_bf16.*/Flags: ... avx512_bf16 .../' > "$OUT/cpu.txt"
# ResNet-164, batch 128: as shipped (on oneDNN's conv and BN where built, scan=auto
# unrolls it and remat=auto is then off), then scanned with remat (--scan=on), scanned
# storing activations, on XLA's CPU formulations (--cpu_kernels=xla: scan=auto scans),
# those unrolled; then bfloat16, unrolled and scanned; ResNet-20, the embedded default's
# net, unrolled and scanned. (Plain XLA convs, --cpu_kernels=off, are compared per conv by
# --mode=ops: a whole scanned step with them takes minutes.)
run step_164_f32 --depth=164 --batch=128 --dtype=float32 --torch --steps=5
run step_164_f32_scan_remat --depth=164 --batch=128 --scan=on --torch --steps=5
run step_164_f32_noremat --depth=164 --batch=128 --scan=on --remat=off --torch --steps=5
run step_164_f32_xla --depth=164 --batch=128 --dtype=float32 --cpu_kernels=xla --torch --steps=5
run step_164_f32_xla_unrolled --depth=164 --batch=128 --scan=off --remat=off --cpu_kernels=xla --torch --steps=5
run step_164_bf16 --depth=164 --batch=128 --dtype=bfloat16 --torch --steps=5
run step_164_bf16_scan_remat --depth=164 --batch=128 --dtype=bfloat16 --scan=on --torch --steps=5
run step_20_f32 --depth=20 --block=basic --batch=128 --torch --steps=10
run step_20_f32_scan --depth=20 --block=basic --batch=128 --scan=on --torch --steps=10
run profile_164 --mode=profile --depth=164 --batch=128 --torch
run profile_164_scan_remat --mode=profile --depth=164 --batch=128 --scan=on --torch
run profile_164_bf16 --mode=profile --depth=164 --batch=128 --dtype=bfloat16 --torch
run profile_164_bf16_scan_remat --mode=profile --depth=164 --batch=128 --dtype=bfloat16 --scan=on --torch
run compile --mode=compile
run ops --mode=ops --steps=6
run ops_bf16 --mode=ops --dtype=bfloat16 --steps=6
run pipeline --mode=pipeline --steps=5
run sweep --mode=sweep --depths=20,56,110,164,1001 --steps=6
.venv/bin/python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob('step_*.json')):
  try:
    r = json.loads(f.read_text())
  except ValueError:
    continue
  t = r.get('torch', {})
  print(f"{f.stem:<26} ours {r['images_per_s']:6.1f} img/s  torch {t.get('images_per_s', float('nan')):6.1f}"
        f"  ratio {r.get('ratio_vs_torch', float('nan')):.2f}"
        f" (vs the faster run {r.get('ratio_vs_faster_torch', float('nan')):.2f})"
        f"  mfu {r.get('mfu', float('nan')):.3f}")
from preact import profile as op_profile
for name in ('profile_164', 'profile_164_scan_remat', 'profile_164_bf16',
             'profile_164_bf16_scan_remat'):
  profile = out / f'{name}.json'
  if profile.exists() and profile.stat().st_size:
    table = op_profile.table(json.loads(profile.read_text().strip().splitlines()[-1]))
    (out / f'{name}.txt').write_text(table + '\n')
PY
