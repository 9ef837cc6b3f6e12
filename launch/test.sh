#!/usr/bin/env bash
# Set up, then run the test suite on both cores.
#   bash launch/test.sh            # everything (what CI runs)
#   bash launch/test.sh --fast     # the edit-test loop: all but the tests marked slow
#   bash launch/test.sh tests/test_models.py -k scan   # pytest's own arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
PREACT_EXTRAS=${PREACT_EXTRAS:-test,bench} bash launch/setup.sh
select=()
if [ "${1:-}" = --fast ]; then
  shift
  select=(-m "not slow")
fi
.venv/bin/python -m pytest -n 2 --dist worksteal -q "${select[@]}" "$@"   # paths: setup.cfg testpaths
