#!/usr/bin/env bash
# Set up (once) and run regcache with its embedded defaults: a cache directory ./regcache-cache,
# HTTPS_PROXY listener on :8080, registry mirror on :5000 (Docker Hub by default, ?ns= for others),
# fast blob path on :5080. Extra arguments go to mitmdump (e.g. --set regcache_offline=true).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}  # Python >= 3.11 (3.11: mitmproxy 11; >= 3.12: mitmproxy 12)
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "regcache needs Python >= 3.11 (set PYTHON=...)" >&2; exit 2; }
[ -x .venv/bin/mitmdump ] || { "$PY" -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check -e .; }
# the CA clients trust, named for regcache (mitmdump would name one it creates "mitmproxy")
[ -f certs/mitmproxy-ca.pem ] || .venv/bin/regcache ca create --certs "$PWD/certs" --organization "${REGCACHE_CA_ORGANIZATION:-regcache}" >&2
exec .venv/bin/mitmdump -s addons/regcache.py \
    --set confdir="$PWD/certs" \
    --mode regular@8080 \
    --mode reverse:https://registry-1.docker.io@5000 \
    --set regcache_dir="${REGCACHE_DIR:-$PWD/regcache-cache}" \
    "$@"
