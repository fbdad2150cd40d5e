#!/usr/bin/env bash
# Run regcache's benchmark suite (needs root): bench/run.sh [python -m bench options]
# Uses $PYTHON if set, else the first of .venv, /tmp/venv311 with regcache and mitmdump installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for c in .venv/bin/python /tmp/venv311/bin/python; do
        if [ -x "$c" ] && [ -x "$(dirname "$c")/mitmdump" ]; then PY=$c; break; fi
    done
fi
[ -n "$PY" ] || { echo "no Python with mitmproxy + regcache found: ./test.sh sets up .venv, or set PYTHON" >&2; exit 2; }
# py-spy profiles missed targets; install it into the same environment if it is missing
[ -x "$(dirname "$PY")/py-spy" ] || command -v py-spy >/dev/null || "$PY" -m pip install -q --disable-pip-version-check py-spy || echo "py-spy unavailable: profiles are skipped" >&2
# BENCH_MODULE: bench (the suite) or bench.soak (bench/soak.sh)
MODULE=${BENCH_MODULE:-bench}
export BENCH_COMMAND="${BENCH_COMMAND_NAME:-bench/run.sh}${*:+ $*}"
exec "$PY" -m "$MODULE" "$@"
