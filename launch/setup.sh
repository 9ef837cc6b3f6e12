#!/usr/bin/env bash
# Sets up a fresh machine: a virtualenv in .venv with preact, the exact dependency set
# it is tested with (requirements.lock), the extras in PREACT_EXTRAS (comma-separated:
# test, bench = PyTorch for the benchmark's reference, cuda, tpu), oneDNN's CPU kernels,
# and Debian's Fashion-MNIST files for the offline default, when apt can install them.
# Idempotent: a second run with the same or fewer extras only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${PREACT_EXTRAS:-}
MARK=.venv/.preact-installed  # one line per extra installed (and "base")
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
missing=""
for extra in base ${EXTRAS//,/ }; do
  grep -qx "$extra" "$MARK" 2>/dev/null || missing="$missing $extra"
done
if [ -n "$missing" ] || [ setup.cfg -nt "$MARK" ] || [ requirements.lock -nt "$MARK" ] \
    || ! .venv/bin/python -c 'import preact' 2>/dev/null; then
  # The lock pins every package of the tested set; extras outside it (cuda, tpu) come
  # from setup.cfg's ranges. pip's warnings go to a log, shown if it fails.
  { .venv/bin/python -m pip install -q --upgrade pip \
      && .venv/bin/python -m pip install -q -c requirements.lock -e ".${EXTRAS:+[$EXTRAS]}"; } \
    2> .venv/pip.log || { cat .venv/pip.log >&2; echo "setup: pip install failed" >&2; exit 1; }
  { cat "$MARK" 2>/dev/null || true; echo base; tr ',' '\n' <<< "$EXTRAS"; } \
    | grep -v '^$' | sort -u > "$MARK.new"
  mv "$MARK.new" "$MARK"
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"  # never prompts: no password, no apt
apt_install() {  # quietly, as root or with password-less sudo; one update on a miss
  command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; } \
    && { $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 \
         || { $SUDO apt-get update -q >/dev/null 2>&1 \
              && $SUDO apt-get install -y -q "$@" >/dev/null 2>&1; }; }
}
# oneDNN's CPU kernels (preact.onednn): Debian's headers and library, and the FFI
# library built against them; without them CPU runs take XLA's kernels.
[ -f /usr/include/oneapi/dnnl/dnnl.hpp ] || apt_install libdnnl-dev || true
kernels="oneDNN CPU kernels"
onednn=$(.venv/bin/python -m preact.onednn.build 2> .venv/onednn-build.log) \
  || { kernels="XLA's CPU kernels"
       echo "setup: oneDNN kernels not built ($onednn; see .venv/onednn-build.log);" \
            "CPU runs use XLA's" >&2; }
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && ! apt_install dataset-fashion-mnist; then
  echo "setup: Fashion-MNIST is not in $FMNIST and apt cannot install it here; TFDS" \
       "downloads it on first use if this machine reaches the internet, or put the four" \
       "upstream .gz files (github.com/zalandoresearch/fashion-mnist) in a folder and" \
       "pass --config.manual_dir=FOLDER" >&2
  echo "setup: ok (.venv, $kernels; Fashion-MNIST not installed)"
  exit 0
fi
# Into TFDS's data_dir, decoded once (preact.data.load_arrays): the first run and the
# tests start on it.
.venv/bin/python -c 'from preact import data
for split in ("train", "test"): data.load_arrays("fashion_mnist", split)' \
  2> .venv/prepare.log \
  || { echo "setup: Fashion-MNIST not prepared (see .venv/prepare.log); the first run" \
            "prepares it" >&2; }
echo "setup: ok (.venv, $kernels, Fashion-MNIST in $FMNIST)"
