#!/bin/bash
# Transparent-mode entrypoint (network_mode: host, cap_add: NET_ADMIN): install iptables rules
# that redirect outgoing HTTPS (port 443) to regcache's transparent listener, run regcache
# (docker/entrypoint.sh) as the unprivileged user, and remove the rules again on exit.
#
# regcache's own connections to the real registries must not be redirected back to itself:
# locally generated traffic is exempted by socket owner (iptables -m owner ! --uid-owner).
#
#   REGCACHE_TRANSPARENT_PORT  transparent listener [8081]
#   REGCACHE_UID               uid regcache runs as, exempted [uid of $REGCACHE_USER, else 10001]
#   REGCACHE_CLIENT_IFACES     interfaces whose forwarded traffic is redirected, space separated
#                              (e.g. "docker0 cni0 eth1"); empty: every interface but lo
#   REGCACHE_IPV6              1: install the same rules with ip6tables
#   REGCACHE_EXEC              what to run [/usr/local/bin/entrypoint.sh]
#
# Arguments go to entrypoint.sh, and on to mitmdump (a --set there replaces entrypoint.sh's own).
#
# Sourcing this file defines install_rules / remove_rules without running anything.
set -euo pipefail

CHAIN=REGCACHE
PORT=${REGCACHE_TRANSPARENT_PORT:-8081}
IFACES=${REGCACHE_CLIENT_IFACES:-}
if [ -z "${REGCACHE_UID:-}" ]; then
    REGCACHE_UID=$(id -u "${REGCACHE_USER:-regcache}" 2>/dev/null || echo 10001)
fi

tables() {
    echo iptables
    if [ "${REGCACHE_IPV6:-0}" = 1 ]; then echo ip6tables; fi
}

install_rules() {
    remove_rules # leftovers of a run that was killed
    local ipt iface
    for ipt in $(tables); do
        "$ipt" -t nat -N "$CHAIN"
        "$ipt" -t nat -A "$CHAIN" -p tcp --dport 443 -j REDIRECT --to-ports "$PORT"
        # traffic routed through this host (containers, other machines using it as gateway)
        if [ -n "$IFACES" ]; then
            for iface in $IFACES; do
                "$ipt" -t nat -A PREROUTING -i "$iface" -p tcp --dport 443 -j "$CHAIN"
            done
        else
            "$ipt" -t nat -A PREROUTING ! -i lo -p tcp --dport 443 -j "$CHAIN"
        fi
        # this host's own processes, except regcache itself
        "$ipt" -t nat -A OUTPUT -p tcp --dport 443 -m owner ! --uid-owner "$REGCACHE_UID" -j "$CHAIN"
    done
}

remove_rules() {
    local ipt hook rule spec
    for ipt in $(tables); do
        # every jump to our chain, however many runs left one behind
        for hook in PREROUTING OUTPUT; do
            while rule=$("$ipt" -t nat -S "$hook" 2>/dev/null | grep -m1 -E -- "-j $CHAIN( |\$)"); do
                # iptables -S prints the rule as it was added: "-A HOOK spec..." -> "-D HOOK spec..."
                read -r -a spec <<<"${rule#-A }"
                "$ipt" -t nat -D "${spec[@]}"
            done
        done
        "$ipt" -t nat -F "$CHAIN" 2>/dev/null || true
        "$ipt" -t nat -X "$CHAIN" 2>/dev/null || true
    done
}

main() {
    install_rules
    echo "regcache: redirecting port 443 to :$PORT (uid $REGCACHE_UID exempt)" >&2
    local child=""
    trap 'remove_rules; echo "regcache: iptables rules removed" >&2' EXIT
    trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi' TERM INT HUP
    export REGCACHE_MODES="${REGCACHE_MODES:---mode transparent@$PORT --mode reverse:https://registry-1.docker.io@5000}"
    "${REGCACHE_EXEC:-/usr/local/bin/entrypoint.sh}" "$@" &
    child=$!
    local status=0
    # wait returns early when a trapped signal arrives: keep waiting for the child itself
    while kill -0 "$child" 2>/dev/null; do
        if wait "$child"; then status=0; else status=$?; fi
    done
    return "$status"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
