#!/usr/bin/env bash
# regcache's soak run (issue 10; needs root): bench/soak.sh [--minutes N] [python -m bench.soak options]
# Uses $PYTHON if set, else the first of .venv, /tmp/venv311 with mitmdump installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for c in .venv/bin/python /tmp/venv311/bin/python; do
        if [ -x "$c" ] && [ -x "$(dirname "$c")/mitmdump" ]; then PY=$c; break; fi
    done
fi
[ -n "$PY" ] || { echo "no Python with mitmproxy found: ./test.sh sets up .venv, or set PYTHON" >&2; exit 2; }
export BENCH_COMMAND="bench/soak.sh${*:+ $*}"
exec "$PY" -m bench.soak "$@"
