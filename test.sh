#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian 12 machine, then run it.
#   ./test.sh                 whole suite (unit + end-to-end), on Python 3.11 and, if present, 3.12
#   ./test.sh -m 'not slow'   fast set only (any pytest arguments are passed through)
# End-to-end tests need root (network namespaces, iptables); without root they are skipped.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(docker-registry skopeo podman containerd docker.io iptables nginx-light openssl curl uidmap faketime iproute2 chromium docker-compose shellcheck systemd tinyproxy squid redis-server ceph-mon ceph-osd radosgw)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
fi

# venv_for PYTHON DIR: a virtualenv with regcache and its test dependencies
venv_for() {
    local python=$1 dir=$2
    [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check -e ".[test]"
}

PY311=$(command -v python3.11 || command -v python3)
# A Python >= 3.12 for mitmproxy 12: the first candidate that really runs (pyenv's shims
# exist on PATH even for versions that are not selected, and then fail).
PY312=""
candidates=(python3.12)
if command -v pyenv >/dev/null; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9](\.[0-9]+)?$' | sort -V); do
        candidates+=("$(pyenv root)/versions/$v/bin/python")
    done
fi
for c in "${candidates[@]}"; do
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
        PY312=$c; break
    fi
done

status=0
echo "== Python $("$PY311" -V 2>&1) (mitmproxy 11): whole suite"
venv_for "$PY311" .venv
.venv/bin/python -m pytest "$@" || status=$?

if [ -n "$PY312" ]; then
    echo "== $("$PY312" -V 2>&1) (mitmproxy 12): unit tests and the fast end-to-end set"
    venv_for "$PY312" .venv312
    .venv312/bin/python -m pytest -m 'not slow' "$@" || status=$?
else
    echo "== no Python >= 3.12 found: mitmproxy 12 not tested"
fi
exit $status
