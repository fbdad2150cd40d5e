#!/bin/bash
# Container entrypoint: prepare the cache dir and the CA, then run mitmdump with the regcache
# addon as an unprivileged user. Extra arguments go to mitmdump; a --set of confdir,
# regcache_dir, regcache_metrics or regcache_config among them replaces the value below instead
# of repeating it (mitmproxy refuses an option given twice, and would then not load regcache).
#
# Environment (defaults in brackets):
#   REGCACHE_DIR            cache directory [/var/lib/regcache/cache]
#   REGCACHE_CERTS          CA directory, mitmproxy confdir format [/var/lib/regcache/certs];
#                           the CA is created there on first start (key mode 0600)
#   REGCACHE_CA_ORGANIZATION  the organisation a CA created on first start is issued for [regcache]
#   REGCACHE_METRICS        metrics + status page listener [0.0.0.0:9090]
#   REGCACHE_MODES          mitmdump listeners [--mode regular@8080 --mode reverse:https://registry-1.docker.io@5000]
#   REGCACHE_CONFIG         a regcache_config YAML; if unset one is written from:
#     REGCACHE_FASTPATH_HOST  address clients reach this host by (enables the fast path on :5080;
#                             without it blob bodies go through the proxy ports)
#     REGCACHE_SIZE_LIMIT     store size limit [50GiB]
#   REGCACHE_USER           user to run as when started as root [regcache]
#   REGCACHE_ADDON          the addon shim [/opt/regcache/addons/regcache.py]
set -euo pipefail

REGCACHE_DIR=${REGCACHE_DIR:-/var/lib/regcache/cache}
REGCACHE_CERTS=${REGCACHE_CERTS:-/var/lib/regcache/certs}
REGCACHE_METRICS=${REGCACHE_METRICS:-0.0.0.0:9090}
REGCACHE_MODES=${REGCACHE_MODES:---mode regular@8080 --mode reverse:https://registry-1.docker.io@5000}
REGCACHE_USER=${REGCACHE_USER:-regcache}
REGCACHE_ADDON=${REGCACHE_ADDON:-/opt/regcache/addons/regcache.py}
RUNTIME=${REGCACHE_RUNTIME:-/run/regcache}

# option_value NAME ARGS...: the value of the last --set NAME=VALUE (or --set=NAME=VALUE) in
# ARGS; false if there is none
option_value() {
    local name=$1 arg after_set=0 found=1 value=""
    shift
    for arg in "$@"; do
        if [ "$after_set" = 1 ] && [[ $arg == "$name="* ]]; then value=${arg#"$name="}; found=0; fi
        if [[ $arg == "--set=$name="* ]]; then value=${arg#"--set=$name="}; found=0; fi
        after_set=0
        if [ "$arg" = --set ]; then after_set=1; fi
    done
    printf '%s' "$value"
    return "$found"
}

own_sets=()  # the --set options the arguments do not give themselves
if user_dir=$(option_value regcache_dir "$@"); then
    REGCACHE_DIR=$user_dir  # the directory to prepare is the one regcache will use
else
    own_sets+=(--set "regcache_dir=$REGCACHE_DIR")
fi
option_value regcache_metrics "$@" >/dev/null || own_sets+=(--set "regcache_metrics=$REGCACHE_METRICS")

mkdir -p "$REGCACHE_DIR" "$RUNTIME"
if [ ! -f "$REGCACHE_CERTS/mitmproxy-ca.pem" ]; then
    echo "regcache: creating the CA in $REGCACHE_CERTS" >&2
    regcache ca create --certs "$REGCACHE_CERTS" --organization "${REGCACHE_CA_ORGANIZATION:-regcache}" >&2
fi

confdir=$REGCACHE_CERTS
drop=()
if [ "$(id -u)" = 0 ] && id "$REGCACHE_USER" >/dev/null 2>&1; then
    # The CA directory may be a bind mount owned by someone else, with its key 0600: give
    # the unprivileged user a private copy instead of changing the operator's files.
    confdir=$RUNTIME/certs
    install -d -m 0700 -o "$REGCACHE_USER" "$confdir"
    for f in "$REGCACHE_CERTS"/mitmproxy-*; do
        install -m 0600 -o "$REGCACHE_USER" "$f" "$confdir/"
    done
    if [ "$(stat -c %U "$REGCACHE_DIR")" != "$REGCACHE_USER" ]; then
        echo "regcache: giving $REGCACHE_DIR to user $REGCACHE_USER" >&2
        chown -R "$REGCACHE_USER" "$REGCACHE_DIR"
    fi
    chown "$REGCACHE_USER" "$RUNTIME"
    drop=(setpriv --reuid="$REGCACHE_USER" --regid="$(id -g "$REGCACHE_USER")" --init-groups --)
fi

config=()
if option_value regcache_config "$@" >/dev/null; then
    : # the arguments name it
elif [ -n "${REGCACHE_CONFIG:-}" ]; then
    config=(--set "regcache_config=$REGCACHE_CONFIG")
else
    generated=$RUNTIME/regcache.yml
    {
        echo "# written by entrypoint.sh from the environment"
        echo "size_limit: ${REGCACHE_SIZE_LIMIT:-50GiB}"
        if [ -n "${REGCACHE_FASTPATH_HOST:-}" ]; then
            echo "fastpath: true"
            echo "fastpath_host: \"$REGCACHE_FASTPATH_HOST\""
        else
            # inside a container the address a client connected to is the container's own,
            # which other hosts cannot reach: no fast-path redirects without an explicit host
            echo "fastpath: false"
        fi
    } >"$generated"
    chmod 0644 "$generated"
    config=(--set "regcache_config=$generated")
fi
option_value confdir "$@" >/dev/null || own_sets+=(--set "confdir=$confdir")

# shellcheck disable=SC2086 # REGCACHE_MODES is a list of arguments
exec "${drop[@]}" mitmdump -s "$REGCACHE_ADDON" \
    "${own_sets[@]}" \
    "${config[@]}" \
    $REGCACHE_MODES \
    "$@"
