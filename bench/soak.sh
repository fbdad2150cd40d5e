#!/usr/bin/env bash
# regcache's soak run (issue 10; needs root): bench/soak.sh [--minutes N] [python -m bench.soak options]
# The same Python as bench/run.sh (its $PYTHON, .venv, /tmp/venv311).
set -euo pipefail
BENCH_MODULE=bench.soak BENCH_COMMAND_NAME=bench/soak.sh exec "$(dirname "$0")/run.sh" "$@"
