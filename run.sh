#!/usr/bin/env bash
# Set up (once) and run regcache with its embedded defaults: a cache directory ./regcache-cache,
# HTTPS_PROXY listener on :8080, registry mirror on :5000 (Docker Hub by default, ?ns= for others),
# fast blob path on :5080. Extra arguments go to mitmdump (e.g. --set regcache_offline=true); a
# --set of confdir or regcache_dir among them replaces the default instead of repeating it
# (mitmproxy refuses an option given twice, and would then not load regcache at all).
#
#   PYTHON          the interpreter that creates the virtualenv [python3]; >= 3.11
#   REGCACHE_VENV   the virtualenv regcache runs from, created when missing [.venv next to run.sh]
#   REGCACHE_DIR    the cache directory when no --set regcache_dir= is given [regcache-cache next to run.sh]
set -euo pipefail
# No cd: relative paths in the arguments mean what they mean where run.sh was started.
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}  # Python >= 3.11 (3.11: mitmproxy 11; >= 3.12: mitmproxy 12)
VENV=${REGCACHE_VENV:-$HERE/.venv}

# option_is_set NAME ARGS...: true if ARGS hold --set NAME[=...] or --set=NAME[=...]
option_is_set() {
    local name=$1 arg after_set=0
    shift
    for arg in "$@"; do
        if [ "$after_set" = 1 ] && [[ $arg == "$name" || $arg == "$name="* ]]; then return 0; fi
        if [[ $arg == "--set=$name" || $arg == "--set=$name="* ]]; then return 0; fi
        after_set=0
        if [ "$arg" = --set ]; then after_set=1; fi
    done
    return 1
}

defaults=()
option_is_set confdir "$@" || defaults+=(--set "confdir=$HERE/certs")
option_is_set regcache_dir "$@" || defaults+=(--set "regcache_dir=${REGCACHE_DIR:-$HERE/regcache-cache}")

if [ ! -x "$VENV/bin/mitmdump" ]; then
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "regcache needs Python >= 3.11 (set PYTHON=...)" >&2
        exit 2
    fi
    "$PY" -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check -e "$HERE"
fi
# The CA clients trust, named for regcache (mitmdump would name one it creates "mitmproxy").
if ! option_is_set confdir "$@" && [ ! -f "$HERE/certs/mitmproxy-ca.pem" ]; then
    "$VENV/bin/regcache" ca create --certs "$HERE/certs" --organization "${REGCACHE_CA_ORGANIZATION:-regcache}" >&2
fi
# glibc otherwise keeps freed per-request buffers (64-256 KiB) in its heap and RSS creeps up
# under steady load; a fixed mmap threshold hands them back (see bench/memwatch.py).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-65536}
exec "$VENV/bin/mitmdump" -s "$HERE/addons/regcache.py" \
    --mode regular@8080 \
    --mode reverse:https://registry-1.docker.io@5000 \
    "${defaults[@]}" \
    "$@"
