#!/usr/bin/env bash
# Sets up a fresh machine: a virtualenv in .venv with preact and its pinned
# dependencies, and Debian's Fashion-MNIST files for the offline default.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${PREACT_EXTRAS:-test,bench}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import preact, flax, tensorflow_datasets, pytest, xdist, torch' 2>/dev/null \
    || [ setup.cfg -nt .venv/.preact-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  touch .venv/.preact-installed
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
echo "setup: ok (.venv, Fashion-MNIST in $FMNIST)"
