#!/usr/bin/env bash
# ceph-s3.sh up|down|env|status|rgw-stop|rgw-start
#
# The test world's S3 endpoint (tests/world/tier.py runs it in the store namespace); adapted
# from the proven recipe. rgw-stop/rgw-start stop and start only radosgw (an object store
# outage, the cluster stays).
# Single-node Ceph (1 mon, 1 osd, no mgr) + radosgw as an S3 endpoint, run as plain
# background processes (no systemd, no containers). Everything lives in $S3LAB_DIR.
#
# Needs (Debian 12):  apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw
#
# Tunables (env):
#   S3LAB_DIR        cluster work dir            (default ${TMPDIR:-/tmp}/ceph-s3)
#   S3LAB_BIND       address radosgw listens on  (default 127.0.0.1)
#   S3LAB_RGW_PORT   S3 port                     (default 7480)
#   S3LAB_MON_PORT   mon msgr2 port              (default 13300)
#   S3LAB_OSD_PORTS  OSD port range "min-max"    (default 16800-16899)
#   S3LAB_STORE      bluestore | memstore        (default bluestore, sparse file)
#   S3LAB_OSD_SIZE   bluestore file / memstore size in bytes (default 10 GiB / 2 GiB)
#   S3LAB_ACCESS_KEY / S3LAB_SECRET_KEY  S3 credentials (default: random)
#   S3LAB_TIMEOUT    seconds to wait for each daemon (default 60)
set -euo pipefail

D=${S3LAB_DIR:-${TMPDIR:-/tmp}/ceph-s3}
BIND=${S3LAB_BIND:-127.0.0.1}
RGW_PORT=${S3LAB_RGW_PORT:-7480}
MON_PORT=${S3LAB_MON_PORT:-13300}
OSD_PORTS=${S3LAB_OSD_PORTS:-16800-16899}
STORE=${S3LAB_STORE:-bluestore}
TIMEOUT=${S3LAB_TIMEOUT:-60}
CONF=$D/ceph.conf
RGW_NAME=client.rgw.s3
DAEMONS="mon.a osd.0 $RGW_NAME"   # start order; stopped in reverse

log() { printf '[ceph-s3 %s] %s\n' "$(date +%T)" "$*" >&2; }

die() { # print the log tails, stop what `up` started (keep $D for post-mortem), exit 1
    log "ERROR: $*"
    local f n
    for f in "$D"/log/*.log; do
        [ -s "$f" ] || continue
        case $f in *audit*) continue ;; esac
        n=8; case "$*" in *"$(basename "$f" .log)"*) n=40 ;; esac
        echo "----- tail -n $n $f -----" >&2
        tail -n "$n" "$f" >&2
    done
    if [ "${UP_IN_PROGRESS:-0}" = 1 ]; then
        log "stopping daemons started by this 'up' (logs kept in $D; next 'up' or 'down' removes it)"
        stop_daemons
    fi
    exit 1
}

is_alive() { # running and not a zombie (orphans are reaped by PID 1, which may be slow)
    [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

pid_of() { # pid of a daemon of ours if alive, else empty
    local pf=$D/run/$1.pid pid
    [ -s "$pf" ] || return 0
    pid=$(cat "$pf")
    # must be alive AND be a ceph/radosgw binary (guards against pid reuse)
    if is_alive "$pid" && grep -qE '^(ceph-mon|ceph-osd|radosgw)$' "/proc/$pid/comm" 2>/dev/null; then
        echo "$pid"
    fi
}

authtool() { ceph-authtool "$@" >/dev/null || die "ceph-authtool $*"; }

rgw_ready() { # our radosgw alive, bound (no bind error in its log) and answering S3
    [ -n "$(pid_of "$RGW_NAME")" ] &&
    ! grep -q 'failed to bind' "$D/log/$RGW_NAME.log" 2>/dev/null &&
    curl -sS --noproxy '*' -m 5 "http://$BIND:$RGW_PORT/" 2>/dev/null | grep -q ListAllMyBucketsResult
}

port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

osd_up() { ceph_ osd dump | grep -q '^osd\.0 up'; }

ceph_() { timeout 30 ceph --conf "$CONF" --connect-timeout 10 "$@"; }

wait_for() { # wait_for <desc> <daemon-or-""> <cmd...>
    local desc=$1 daemon=$2; shift 2
    local t0=$SECONDS
    until "$@" >/dev/null 2>&1; do
        # a daemon writes its pid file a moment after it forks (later still on a busy machine):
        # no pid file yet is not death during the first seconds
        if [ -n "$daemon" ] && [ -z "$(pid_of "$daemon")" ] && [ $((SECONDS - t0)) -ge 10 ]; then
            die "$daemon died while waiting for: $desc"
        fi
        [ $((SECONDS - t0)) -lt "$TIMEOUT" ] || die "timeout (${TIMEOUT}s) waiting for: $desc"
        sleep 0.5
    done
    log "$desc: ok ($((SECONDS - t0))s)"
}

write_conf() {
    local fsid=$1 osd_mem_opts
    if [ "$STORE" = memstore ]; then
        osd_mem_opts="memstore_device_bytes = ${S3LAB_OSD_SIZE:-2147483648}"
    else
        osd_mem_opts="bluestore_block_path = \$osd_data/block.img
bluestore_block_size = ${S3LAB_OSD_SIZE:-10737418240}
bluestore_block_create = true
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
osd_memory_target = 1073741824
bluestore_cache_autotune = false
bluestore_cache_size = 134217728"
    fi
    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$MON_PORT
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_port_min = ${OSD_PORTS%-*}
ms_bind_port_max = ${OSD_PORTS#*-}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = $D/run
crash_dir = $D/crash
log_file = $D/log/\$name.log
pid_file = $D/run/\$name.pid
admin_socket = $D/run/\$name.\$pid.asok
mon_cluster_log_file = $D/log/cluster.\$channel.log
# single node, single replica
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
osd_crush_chooseleaf_type = 0
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
auth_allow_insecure_global_id_reclaim = false
# keep it small
ms_async_op_threads = 2
debug_ms = 0
debug_rocksdb = 0/0
debug_bluefs = 0/0
debug_bluestore = 0/0
log_to_stderr = false
err_to_stderr = true

[mon]
mon_data = $D/mon/\$name
mon_data_avail_warn = 2
mon_data_avail_crit = 1
paxos_propose_interval = 0.1

[osd]
osd_data = $D/osd/\$name
keyring = \$osd_data/keyring
osd_objectstore = $STORE
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_crush_update_on_start = true
$osd_mem_opts

[client]
keyring = $D/keyring.\$name

[$RGW_NAME]
rgw_frontends = beast endpoint=$BIND:$RGW_PORT
rgw_data = $D/rgw
rgw_thread_pool_size = 64
rgw_enable_usage_log = false
rgw_dns_name = localhost
EOF
}

cmd_up() {
    command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && command -v radosgw >/dev/null ||
        { log "missing binaries: apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw"; exit 1; }

    local running=0 d
    for d in $DAEMONS; do [ -n "$(pid_of "$d")" ] && running=$((running + 1)); done
    if [ "$running" -eq 3 ] && [ -s "$D/s3.env" ] && rgw_ready; then
        log "already up"; cmd_env; return 0
    fi
    [ -e "$D" ] && { log "stale/partial cluster in $D -> tearing down first"; cmd_down; }
    # a leftover daemon from a deleted work dir would otherwise answer in place of ours
    local hp
    for hp in "127.0.0.1 $MON_PORT" "$BIND $RGW_PORT"; do
        # shellcheck disable=SC2086
        if port_busy $hp; then log "ERROR: ${hp/ /:} is already in use (leftover daemon? other service?)"; exit 1; fi
    done

    local t_start=$SECONDS
    UP_IN_PROGRESS=1
    mkdir -p "$D"/{run,log,crash,mon,osd/osd.0,rgw}
    local fsid osd_uuid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$fsid"

    # --- keys: mon., client.admin, osd.0, client.rgw; all imported into the mon at mkfs
    authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
    authtool --create-keyring "$D/keyring.client.admin" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
    authtool --create-keyring "$D/osd/osd.0/keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
    authtool --create-keyring "$D/keyring.$RGW_NAME" --gen-key -n "$RGW_NAME" \
        --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw'
    local k
    for k in "$D/keyring.client.admin" "$D/osd/osd.0/keyring" "$D/keyring.$RGW_NAME"; do
        authtool "$D/mon.keyring" --import-keyring "$k"
    done

    # --- mon
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
    ceph-mon --conf "$CONF" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring" \
        >>"$D/log/mkfs.log" 2>&1 || die "ceph-mon --mkfs failed"
    ceph-mon --conf "$CONF" -i a >>"$D/log/daemon-stderr.log" 2>&1 || die "ceph-mon failed to start"
    wait_for "mon quorum" mon.a ceph_ mon stat

    # --- osd (register id 0 with its uuid; key already in auth db via mon mkfs)
    ceph_ osd create "$osd_uuid" 0 >/dev/null || die "osd create failed"
    ceph-osd --conf "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$D/log/mkfs.log" 2>&1 ||
        die "ceph-osd --mkfs failed"
    ceph-osd --conf "$CONF" -i 0 >>"$D/log/daemon-stderr.log" 2>&1 || die "ceph-osd failed to start"
    wait_for "osd.0 up" osd.0 osd_up

    # --- radosgw
    radosgw --conf "$CONF" -n "$RGW_NAME" >>"$D/log/daemon-stderr.log" 2>&1 || die "radosgw failed to start"
    wait_for "radosgw http://$BIND:$RGW_PORT" "$RGW_NAME" rgw_ready

    # --- S3 user
    local ak=${S3LAB_ACCESS_KEY:-$(od -An -tx1 -N10 /dev/urandom | tr -d ' \n' | tr a-f A-F)}
    local sk=${S3LAB_SECRET_KEY:-$(od -An -tx1 -N20 /dev/urandom | tr -d ' \n')}
    timeout 60 radosgw-admin --conf "$CONF" user create --uid=s3test --display-name="s3 test user" \
        --access-key="$ak" --secret-key="$sk" >"$D/user.json" 2>>"$D/log/radosgw-admin.log" ||
        die "radosgw-admin user create failed"
    cat >"$D/s3.env" <<EOF
export AWS_ACCESS_KEY_ID=$ak
export AWS_SECRET_ACCESS_KEY=$sk
export AWS_DEFAULT_REGION=us-east-1
export S3_ENDPOINT_URL=http://$BIND:$RGW_PORT
export AWS_ENDPOINT_URL=http://$BIND:$RGW_PORT
export NO_PROXY=\${NO_PROXY:+\$NO_PROXY,}$BIND,localhost
export no_proxy=\${no_proxy:+\$no_proxy,}$BIND,localhost
export CEPH_CONF=$CONF
EOF
    UP_IN_PROGRESS=0
    log "S3 ready at http://$BIND:$RGW_PORT in $((SECONDS - t_start))s (dir $D)"
    cmd_env
}

stop_group() { # TERM the given daemons, wait <=5 s, KILL leftovers, wait until they are gone
    local d pid pids=() i alive
    for d in "$@"; do
        pid=$(pid_of "$d")
        [ -n "$pid" ] || continue
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    for i in $(seq 1 100); do
        alive=0
        for pid in "${pids[@]}"; do
            if is_alive "$pid"; then
                alive=1
                [ "$i" = 50 ] && { log "pid $pid still alive 5 s after TERM -> KILL"; kill -KILL "$pid" 2>/dev/null || true; }
            fi
        done
        [ "$alive" = 1 ] || break
        sleep 0.1
    done
    log "stopped $* (pids ${pids[*]})"
}

stop_daemons() {
    # one at a time, clients first: rgw needs the OSD to shut down cleanly, and an OSD tells
    # the mon it is going down and waits (osd_mon_shutdown_timeout) for the ack
    stop_group "$RGW_NAME"
    stop_group osd.0
    stop_group mon.a
}

cmd_down() {
    stop_daemons
    rm -rf "$D"
    log "removed $D"
}

cmd_env() {
    [ -s "$D/s3.env" ] || { log "not up (no $D/s3.env)"; exit 1; }
    cat "$D/s3.env"
}

cmd_status() {
    local d
    for d in $DAEMONS; do printf '%-18s pid=%s\n' "$d" "$(pid_of "$d")"; done
    [ -f "$CONF" ] && ceph_ -s || true
}

cmd_rgw_start() {
    rm -f "$D/run/$RGW_NAME.pid"
    radosgw --conf "$CONF" -n "$RGW_NAME" >>"$D/log/daemon-stderr.log" 2>&1 || die "radosgw failed to start"
    wait_for "radosgw http://$BIND:$RGW_PORT" "$RGW_NAME" rgw_ready
}

case ${1:-} in
    up) cmd_up ;;
    rgw-stop) stop_group "$RGW_NAME" ;;
    rgw-start) cmd_rgw_start ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|env|status|rgw-stop|rgw-start" >&2; exit 2 ;;
esac
