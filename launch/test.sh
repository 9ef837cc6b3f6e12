#!/usr/bin/env bash
# Set up, then run the test suite on both cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PREACT_EXTRAS=${PREACT_EXTRAS:-test,bench} bash launch/setup.sh
.venv/bin/python -m pytest -n 2 --dist loadfile -q tests "$@"
