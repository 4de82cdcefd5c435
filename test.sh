#!/usr/bin/env bash
# Set up (or reuse) .venv and run the test suite. Extra arguments go to pytest,
# e.g. ./test.sh -k tokenizer -x
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
export LMLAB_NO_PROGRESS=1
exec "$VENV/bin/python" -m pytest -q -ra --durations=25 "$@"
