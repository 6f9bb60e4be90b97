#!/usr/bin/env bash
# Data-plane benchmarks of l4lb against a direct connection, HAProxy and nginx `stream`, in the
# same run, printed as a table of ratios and written as JSON. Column "l4lb" is what a user gets
# by default (`--data-plane auto`: the kernel path where it loads, else the proxy); column
# "proxy" is l4lb with `--data-plane proxy` (the splice forwarder).
#
#   scripts/bench.sh                  # full run: 2 rounds x 4 s per measurement, ~4 minutes
#   BENCH_SECONDS=2 scripts/bench.sh  # shorter
#
# Environment:
#   BENCH_SECONDS   seconds per measurement (default 4)
#   BENCH_ROUNDS    interleaved rounds per throughput workload, best one counts (default 2)
#   BENCH_IDLE      idle connections for the memory test (default 10000)
#   BENCH_CHANGES   backend changes for the propagation test (default 100)
#   BENCH_OUT       JSON output (default bench-results/latest.json)
#   BENCH_NO_BUILD  set to skip `cargo build --release`
#   BENCH_KEEP      set to keep the work directory (logs, configs)
#   BENCH_ONLY      comma-separated workloads to run (tcp, conns, udp, dns, dnsfwd, idle,
#                   propagation);
#                   default all. A partial run still writes the JSON, with only those rows.
#   BENCH_BASE      path to another l4lb binary (say, a build of the previous commit) measured
#                   in the same run as column "base" (VIP 198.18.5.6, the same data-plane
#                   flags as column "l4lb") for the TCP, new-connection
#                   and UDP workloads: an A/B on a noisy machine, under the same scheduler
#                   group as everything else (start the two side by side by hand and the
#                   session's autogroup alone skews a stream by ~20%)
#   BENCH_AB_PLANE  the data plane of columns "l4lb" and "base" (default auto): `proxy` makes
#                   the A/B one of the splice proxy (a change to its connect path)
#   BENCH_HOLD      set to keep the lab up after the workloads (with BENCH_ONLY=none: set it up
#                   only) until interrupted, for perf/strace by hand; prints the namespaces
#   BENCH_PERF      set to `perf record -g` l4lb during its TCP, new-connection, UDP and DNS
#                   runs; reports go to bench-results/perf-<workload>.txt (perf.data beside)
#
# Topology (root needed; everything lives in two throw-away network namespaces, addresses in
# 198.18.0.0/15 only, no default route, so nothing can leave the machine):
#
#   ns "client" 198.18.0.1/30 ==veth== 198.18.0.2/30 ns "server"
#     load generators (CPU 1)            iperf3 -s, nginx HTTP (tiny body), dnsmasq (CPU 1)
#     proxy under test (CPU 0):
#       l4lb   VIP 198.18.5.7 on its "l4lbauto" bridge, default data plane (auto; its
#              programs act on this namespace's sockets only), --worker-threads 1
#       l4lb   VIP 198.18.5.5 on its "minuteman" bridge, --data-plane proxy (column "proxy";
#              also the DNS server and forwarder measured), --worker-threads 1
#       haproxy  198.18.0.1:1xxxx  (mode tcp, nbthread 1)
#       nginx    198.18.0.1:2xxxx  (stream, worker_processes 1; also UDP)
#
# As on a real agent, the client and the proxy share a host and the backend is one veth hop
# away. "direct" is the client talking to the backend over that same veth.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$ROOT/scripts/bench"
T=${BENCH_SECONDS:-4}
ROUNDS=${BENCH_ROUNDS:-2}
IDLE=${BENCH_IDLE:-10000}
CHANGES=${BENCH_CHANGES:-100}
OUT=${BENCH_OUT:-$ROOT/bench-results/latest.json}
PROXY_CPU=0
LOAD_CPU=1
if [ "$(nproc)" -lt 2 ]; then LOAD_CPU=0; fi

ONLY=${BENCH_ONLY:-tcp,conns,udp,dns,dnsfwd,idle,propagation}
want() { [[ ",$ONLY," == *",$1,"* ]]; }

START=$(date +%s)
log() { printf '[bench %3ds] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, VIP addresses)"

# --- tools -----------------------------------------------------------------------------------
need_pkgs=()
for pair in iperf3:iperf3 wrk:wrk haproxy:haproxy nginx:nginx dnsperf:dnsperf dnsmasq:dnsmasq-base \
    socat:socat ip:iproute2 dig:bind9-dnsutils curl:curl taskset:util-linux python3:python3; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need_pkgs+=(libnginx-mod-stream)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if [ -z "${BENCH_NO_BUILD:-}" ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet)
fi
L4LB="$ROOT/target/release/l4lb"
[ -x "$L4LB" ] || die "no $L4LB"

# --- namespaces and cleanup ------------------------------------------------------------------
WORK=$(mktemp -d /tmp/l4lb-bench.XXXXXX)
NSC="l4lbbench-c-$$"
NSS="l4lbbench-s-$$"
PIDS=()

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    sleep 0.3
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    ip netns del "$NSC" 2>/dev/null
    ip netns del "$NSS" 2>/dev/null
    if [ -n "${BENCH_KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT INT TERM

ip netns add "$NSC"
ip netns add "$NSS"
ip link add bench-c netns "$NSC" type veth peer name bench-s netns "$NSS"
for ns in "$NSC" "$NSS"; do
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" \
        net.ipv4.tcp_tw_reuse=1 net.core.somaxconn=8192 net.ipv4.tcp_max_syn_backlog=8192
done
ip -n "$NSC" addr add 198.18.0.1/30 dev bench-c
ip -n "$NSS" addr add 198.18.0.2/30 dev bench-s
ip -n "$NSC" link set bench-c up
ip -n "$NSS" link set bench-s up

C() { ip netns exec "$NSC" "$@"; }
S() { ip netns exec "$NSS" "$@"; }

# start NAME NS CPU CMD...: run CMD in the background in namespace NS pinned to CPU; its PID
# (ip netns exec and taskset both exec) goes to PIDS and to $WORK/NAME.pid, output to NAME.log.
start() {
    local name=$1 ns=$2 cpu=$3
    shift 3
    ip netns exec "$ns" taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    echo "$pid" >"$WORK/$name.pid"
}
pid_of() { cat "$WORK/$1.pid"; }

# wait_port NS PROTO ADDR:PORT
wait_tcp() {
    local ns=$1 hostport=$2
    for _ in $(seq 1 100); do
        if ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/${hostport%:*}/${hostport#*:}" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on $hostport in $ns"
}

# As many descriptors as we may have (containers often cap the hard limit): each idle
# connection costs a proxy two.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
MAXFD=$(ulimit -n)
[ "$MAXFD" != unlimited ] || MAXFD=1000000
if [ "$IDLE" -gt $(((MAXFD - 1300) / 2)) ]; then
    log "open-file limit $MAXFD: idle connections capped at $(((MAXFD - 1300) / 2)) (asked $IDLE)"
    IDLE=$(((MAXFD - 1300) / 2))
fi

# --- backends (server namespace, load CPU) ---------------------------------------------------
start iperf3 "$NSS" "$LOAD_CPU" iperf3 -s -B 198.18.0.2 -p 5201
# nginx_head NAME: the settings both nginx instances share (one worker, in the foreground).
nginx_head() {
    cat <<EOF
worker_processes 1;
master_process off;
daemon off;
worker_rlimit_nofile $MAXFD;
pid $WORK/$1.pid.nginx;
error_log $WORK/$1.err warn;
events { worker_connections $((MAXFD - 100)); }
EOF
}
{
    nginx_head backend-nginx
    cat <<EOF
http {
    access_log off;
    client_header_timeout 300s;
    keepalive_timeout 300s;
    server {
        listen 198.18.0.2:8080 backlog=8192 reuseport;
        location / { return 200 "ok\n"; }
    }
}
EOF
} >"$WORK/backend-nginx.conf"
start backend-nginx "$NSS" "$LOAD_CPU" nginx -p "$WORK" -c "$WORK/backend-nginx.conf"
# --local-ttl: the answers carry a TTL as a real upstream's do (dnsmasq's default is 0, which
# no cache keeps).
start backend-dnsmasq "$NSS" "$LOAD_CPU" dnsmasq -k -C /dev/null -u root --no-resolv --no-hosts \
    --bind-interfaces --listen-address=198.18.0.2 --port=5300 --pid-file= \
    --address=/bench.test/198.18.9.9 --local-ttl=300
wait_tcp "$NSS" 198.18.0.2:5201
wait_tcp "$NSS" 198.18.0.2:8080

# --- proxies (client namespace, proxy CPU) ---------------------------------------------------
# l4lb --data-plane proxy (process "l4lb", column "proxy"): IP VIP 198.18.5.5 for each
# workload, plus named VIPs for the DNS comparison.
python3 - "$WORK/apps.json" <<'EOF'
import json, sys
def app(i, label, vips, proto, port):
    return {"id": i, "portDefinitions": [{"port": 0, "protocol": proto,
            "labels": {f"VIP_{n}": v for n, v in enumerate(vips)}}],
            "tasks": [{"id": f"{i[1:]}.1", "appId": i, "host": "198.18.0.2", "ports": [port],
                       "state": "TASK_RUNNING"}]}
apps = [
    app("/iperf", "iperf", ["198.18.5.5:5201", "/iperf:5201"], "tcp", 5201),
    app("/web", "web", ["198.18.5.5:8080", "/web:80"], "tcp", 8080),
    app("/dns", "dns", ["198.18.5.5:5300", "/dns:53"], "udp", 5300),
]
json.dump({"apps": apps}, open(sys.argv[1], "w"))
EOF
start l4lb "$NSC" "$PROXY_CPU" env RUST_LOG=warn,l4lb=info "$L4LB" --worker-threads 1 run \
    --apps-file "$WORK/apps.json" --interface-kind auto --api-listen 127.0.0.1:62080 \
    --dns-listen 127.0.0.1:5454 --vip-cidr 198.18.128.0/17 --dns-upstream 198.18.0.2:5300 \
    --data-plane proxy
for _ in $(seq 1 100); do
    grep -q "first table applied; ready" "$WORK/l4lb.log" 2>/dev/null && break
    kill -0 "$(pid_of l4lb)" 2>/dev/null || die "l4lb exited: $(tail -5 "$WORK/l4lb.log")"
    sleep 0.1
done
grep -q "first table applied; ready" "$WORK/l4lb.log" || die "l4lb not ready: $(tail -5 "$WORK/l4lb.log")"
# l4lb without its cache of forwarded answers, for the forwarding row (DNS only: no VIPs).
echo '{"apps": []}' >"$WORK/no-apps.json"
start l4lb-nocache "$NSC" "$PROXY_CPU" env RUST_LOG=warn,l4lb=info "$L4LB" --worker-threads 1 run \
    --apps-file "$WORK/no-apps.json" --interface-kind none --api-listen 127.0.0.1:62083 \
    --dns-listen 127.0.0.1:5458 --dns-upstream 198.18.0.2:5300 --dns-cache-size 0
# l4lb with the default data plane (process "l4lb-auto", column "l4lb"): the same apps on
# 198.18.5.7. Where the programs load, the kernel path serves the VIPs (attached to the cgroup2
# root, acting only on this client namespace's sockets: --bpf-netns-only, as any lab with
# several agents on one kernel needs); where they cannot, the proxy does, and the log says why.
# The auto-or-not choice is the flag's default: the other flags only scope the kernel path.
AUTO_FLAGS=(--bpf-netns-only --data-plane "${BENCH_AB_PLANE:-auto}")
sed 's/198\.18\.5\.5/198.18.5.7/g' "$WORK/apps.json" >"$WORK/apps-auto.json"
start l4lb-auto "$NSC" "$PROXY_CPU" env RUST_LOG=warn,l4lb=info "$L4LB" --worker-threads 1 run \
    --apps-file "$WORK/apps-auto.json" --interface l4lbauto --interface-kind auto \
    --api-listen 127.0.0.1:62082 --dns-listen 127.0.0.1:5474 --vip-cidr 198.18.32.0/19 \
    "${AUTO_FLAGS[@]}" --bpf-instance "bench-$$"
for _ in $(seq 1 100); do
    grep -q "first table applied; ready" "$WORK/l4lb-auto.log" 2>/dev/null && break
    kill -0 "$(pid_of l4lb-auto)" 2>/dev/null || die "l4lb (auto) exited: $(tail -5 "$WORK/l4lb-auto.log")"
    sleep 0.1
done
grep -q "first table applied; ready" "$WORK/l4lb-auto.log" || die "l4lb (auto) not ready: $(tail -5 "$WORK/l4lb-auto.log")"
log "l4lb (default data plane): $(grep -o 'data plane chosen.*' "$WORK/l4lb-auto.log" | head -1)"
sleep 1 # the kernel path follows the applied table
BASE=${BENCH_BASE:-}
if [ -n "$BASE" ]; then
    [ -x "$BASE" ] || die "BENCH_BASE: no executable $BASE"
    sed 's/198\.18\.5\.5/198.18.5.6/g' "$WORK/apps.json" >"$WORK/apps-base.json"
    # The base runs with column l4lb's data plane, whatever its own default (explicit).
    start l4lb-base "$NSC" "$PROXY_CPU" env RUST_LOG=warn,l4lb=info "$BASE" --worker-threads 1 run \
        --apps-file "$WORK/apps-base.json" --interface l4lbbase --interface-kind auto \
        --api-listen 127.0.0.1:62081 --dns-listen 127.0.0.1:5464 --vip-cidr 198.18.64.0/18 \
        "${AUTO_FLAGS[@]}" --bpf-instance "bench-base-$$"
    for _ in $(seq 1 100); do
        grep -q "first table applied; ready" "$WORK/l4lb-base.log" 2>/dev/null && break
        sleep 0.1
    done
    grep -q "first table applied; ready" "$WORK/l4lb-base.log" || die "base l4lb not ready: $(tail -5 "$WORK/l4lb-base.log")"
fi

cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $(((MAXFD - 1100) / 2))
    maxpipes 256
defaults
    mode tcp
    # l4lb splices; let HAProxy splice too (it does not by default).
    option splice-auto
    timeout connect 1s
    timeout client 600s
    timeout server 600s
listen iperf
    bind 198.18.0.1:15201
    server s1 198.18.0.2:5201
listen web
    bind 198.18.0.1:18080
    server s1 198.18.0.2:8080
EOF
start haproxy "$NSC" "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg"

{
    echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    nginx_head proxy-nginx
    cat <<EOF
stream {
    proxy_timeout 600s;
    server { listen 198.18.0.1:25201 backlog=8192; proxy_pass 198.18.0.2:5201; }
    server { listen 198.18.0.1:28080 backlog=8192; proxy_pass 198.18.0.2:8080; }
    server { listen 198.18.0.1:25300 udp; proxy_pass 198.18.0.2:5300; proxy_timeout 30s; }
}
EOF
} >"$WORK/proxy-nginx.conf"
start proxy-nginx "$NSC" "$PROXY_CPU" nginx -p "$WORK" -c "$WORK/proxy-nginx.conf"

# dnsmasq serving the same names as l4lb's embedded DNS, for the DNS comparison.
mapfile -t NAMES < <(C curl -s http://127.0.0.1:62080/v1/vips |
    python3 -c 'import json,sys; [print(v["name"]+" "+v["ip"]) for v in json.load(sys.stdin) if v["name"]]')
[ ${#NAMES[@]} -gt 0 ] || die "l4lb /v1/vips shows no named VIP"
records=()
: >"$WORK/names.txt"
for n in "${NAMES[@]}"; do
    records+=("--host-record=${n% *},${n#* }")
    echo "${n% *} A" >>"$WORK/names.txt"
done
start dnsmasq "$NSC" "$PROXY_CPU" dnsmasq -k -C /dev/null -u root --no-resolv --no-hosts \
    --bind-interfaces --listen-address=127.0.0.1 --port=5455 --pid-file= "${records[@]}"
echo "bench.test A" >"$WORK/bench-query.txt"
# Forwarded names: 20,000 distinct ones (the upstream answers every name under bench.test), so
# that dnsmasq cannot merge identical queries in flight, which one repeated name lets it do.
seq 1 20000 | sed 's/.*/q&.bench.test A/' >"$WORK/forward-query.txt"
# dnsmasq forwarding to the same upstream as l4lb (the UDP backend's dnsmasq), without a cache
# so that it forwards every query as l4lb does.
start dnsmasq-fwd "$NSC" "$PROXY_CPU" dnsmasq -k -C /dev/null -u root --no-resolv --no-hosts \
    --bind-interfaces --listen-address=127.0.0.1 --port=5456 --pid-file= --cache-size=0 \
    --server=198.18.0.2#5300
# Both with their caches on (l4lb's default 10,000 entries; dnsmasq's the same), for the
# cached row: 1,000 names, each asked again and again as a host's programs do.
seq 1 1000 | sed 's/.*/c&.bench.test A/' >"$WORK/cached-query.txt"
start dnsmasq-cache "$NSC" "$PROXY_CPU" dnsmasq -k -C /dev/null -u root --no-resolv --no-hosts \
    --bind-interfaces --listen-address=127.0.0.1 --port=5457 --pid-file= --cache-size=10000 \
    --server=198.18.0.2#5300

wait_tcp "$NSC" 198.18.5.5:8080
wait_tcp "$NSC" 198.18.5.7:8080
wait_tcp "$NSC" 198.18.0.1:18080
wait_tcp "$NSC" 198.18.0.1:28080
sleep 0.5
C dig +short +time=1 +tries=3 @127.0.0.1 -p 5454 "${NAMES[0]% *}" >/dev/null || die "embedded DNS does not answer"
C dig +short +time=1 +tries=3 @127.0.0.1 -p 5455 "${NAMES[0]% *}" >/dev/null || die "dnsmasq does not answer"
C dig +short +time=1 +tries=3 @198.18.5.5 -p 5300 bench.test | grep -q 198.18.9.9 || die "UDP VIP does not answer"
C dig +short +time=1 +tries=3 @127.0.0.1 -p 5454 bench.test | grep -q 198.18.9.9 || die "l4lb does not forward"
C dig +short +time=1 +tries=3 @127.0.0.1 -p 5456 bench.test | grep -q 198.18.9.9 || die "dnsmasq does not forward"
C dig +short +time=1 +tries=3 @127.0.0.1 -p 5457 bench.test | grep -q 198.18.9.9 || die "caching dnsmasq does not forward"
C dig +short +time=1 +tries=3 @127.0.0.1 -p 5458 bench.test | grep -q 198.18.9.9 || die "l4lb without a cache does not forward"
log "up: l4lb $(pid_of l4lb-auto) (default data plane), l4lb $(pid_of l4lb) (proxy), haproxy $(pid_of haproxy), nginx $(pid_of proxy-nginx) on CPU $PROXY_CPU; load generators and backends on CPU $LOAD_CPU"

RES="$WORK/results.tsv"
: >"$RES"
PERF_DIR=$(dirname "$OUT")
mkdir -p "$PERF_DIR"
# perf_on NAME / perf_off: profile l4lb --data-plane proxy (call graphs, cpu-clock: VMs often lack PMU counters).
perf_on() {
    PERF_PID=
    [ -n "${BENCH_PERF:-}" ] || return 0
    command -v perf >/dev/null || { log "BENCH_PERF: no perf (apt-get install -y linux-perf)"; return 0; }
    PERF_NAME=$1
    perf record -q -e cpu-clock -F 1999 -g -p "$(pid_of l4lb)" -o "$PERF_DIR/perf-$1.data" \
        >/dev/null 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.3
}
perf_off() {
    [ -n "${PERF_PID:-}" ] || return 0
    kill -INT "$PERF_PID" 2>/dev/null
    wait "$PERF_PID" 2>/dev/null || true
    {
        echo "### self time"
        perf report -i "$PERF_DIR/perf-$PERF_NAME.data" --stdio --no-children -g none \
            --sort symbol --percent-limit 0.8 2>/dev/null | grep -v '^#' | grep -v '^$' | head -45 || true
        echo "### inclusive (children)"
        perf report -i "$PERF_DIR/perf-$PERF_NAME.data" --stdio --children -g none \
            --sort symbol --percent-limit 3 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60 || true
    } >"$PERF_DIR/perf-$PERF_NAME.txt"
    log "profile: $PERF_DIR/perf-$PERF_NAME.txt"
    PERF_PID=
}
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RES"; log "$1 $2: $3 $4"; }
L() { C taskset -c "$LOAD_CPU" "$@"; }

declare -A TCP_DST=([direct]=198.18.0.2:5201 [l4lb]=198.18.5.7:5201 [proxy]=198.18.5.5:5201 [haproxy]=198.18.0.1:15201 [nginx]=198.18.0.1:25201 [base]=198.18.5.6:5201)
declare -A WEB_DST=([direct]=198.18.0.2:8080 [l4lb]=198.18.5.7:8080 [proxy]=198.18.5.5:8080 [haproxy]=198.18.0.1:18080 [nginx]=198.18.0.1:28080 [base]=198.18.5.6:8080)
TARGETS=(direct l4lb proxy haproxy nginx)
UDP_TARGETS=(direct l4lb proxy nginx)
if [ -n "$BASE" ]; then TARGETS+=(base); UDP_TARGETS+=(base); fi

# Every throughput workload runs ROUNDS times, the targets interleaved (direct, l4lb, haproxy,
# nginx, direct, ...), and the best round counts: interference from other work on the machine
# only ever lowers a figure. Every round is kept in the JSON.
SAMPLES="$WORK/samples.tsv"
: >"$SAMPLES"
# CPU accounting, from /proc/stat clock ticks. Busy is user+nice+system+irq+softirq (not idle,
# iowait or steal); "kernel" is system+irq+softirq. Only the proxy under test runs on the proxy
# CPU, and the kernel's work for the packets it sends (the receiver's side included: veth and
# loopback deliver in the sender's softirq) lands there too, so its busy time per unit of work
# is what the proxy costs, whatever else the machine does. The load CPU's busy share says
# whether the load generators and backends, rather than the proxy, set the pace.
# cpu_snap prints: proxy-CPU user ticks, proxy-CPU kernel ticks, load-CPU busy ticks, time in µs.
cpu_snap() {
    awk -v p="cpu$PROXY_CPU" -v l="cpu$LOAD_CPU" -v now="$(date +%s%6N)" '
        $1 == p { pu = $2 + $3; pk = $4 + $7 + $8 }
        $1 == l { lb = $2 + $3 + $4 + $7 + $8 }
        END { print pu, pk, lb, now }' /proc/stat
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# cpu_rows W T VALUE SCALE "SNAP0" "SNAP1": per-round CPU samples of one measurement:
#   W_busy_proxy, W_busy_load   busy share of each CPU over the measurement, %
#   W_cpu, W_cpu_kernel         proxy-CPU busy and kernel time per unit of work, µs x SCALE
#                               (only with SCALE, and not for "direct": no proxy)
cpu_rows() {
    local w=$1 t=$2 v=$3 scale=$4
    python3 - "$w" "$t" "$v" "$scale" "$TICK_US" "$T" $5 $6 >>"$SAMPLES" <<'PY'
import sys
w, t, v, scale, tick, secs = sys.argv[1:7]
pu0, pk0, lb0, t0, pu1, pk1, lb1, t1 = map(float, sys.argv[7:15])
tick, wall = float(tick), max(t1 - t0, 1.0)
print(f"{w}_busy_proxy\t{t}\t{100 * (pu1 - pu0 + pk1 - pk0) * tick / wall:.1f}")
print(f"{w}_busy_load\t{t}\t{100 * (lb1 - lb0) * tick / wall:.1f}")
if scale and t != "direct" and v not in ("", "null"):
    units = float(v) * float(secs) * float(scale)
    print(f"{w}_cpu\t{t}\t{(pu1 - pu0 + pk1 - pk0) * tick / units:.2f}")
    print(f"{w}_cpu_kernel\t{t}\t{(pk1 - pk0) * tick / units:.2f}")
PY
}

# rounds WORKLOAD UNIT FN [COST_UNIT COST_SCALE] -- TARGETS...: run FN for every target, ROUNDS
# times interleaved, and record the best value of each. Every measurement also samples the CPU
# (cpu_rows); the medians over the rounds are recorded as WORKLOAD_busy_proxy and
# WORKLOAD_busy_load (%), and with a cost unit as WORKLOAD_cpu and WORKLOAD_cpu_kernel
# (µs-per-unit x COST_SCALE, in COST_UNIT).
rounds() {
    local w=$1 unit=$2 fn=$3 cunit='' cscale='' r t v best s0 s1 suffix u
    shift 3
    if [ "$1" != -- ]; then cunit=$1 cscale=$2; shift 2; fi
    shift
    for r in $(seq 1 "$ROUNDS"); do
        for t in "$@"; do
            if [ "$t" = proxy ] && [ "$r" = 1 ]; then perf_on "$w"; fi
            s0=$(cpu_snap)
            v=$("$fn" "$t")
            s1=$(cpu_snap)
            perf_off
            printf '%s\t%s\t%s\n' "$w" "$t" "${v:-null}" >>"$SAMPLES"
            log "$w $t round $r: ${v:-null} $unit"
            cpu_rows "$w" "$t" "${v:-null}" "$cscale" "$s0" "$s1"
            sleep 0.5
        done
    done
    for t in "$@"; do
        best=$(awk -F'\t' -v w="$w" -v t="$t" '$1 == w && $2 == t && $3 != "null" {
            if (!n || $3 + 0 > b + 0) b = $3; n++ } END { print n ? b : "null" }' "$SAMPLES")
        record "$w" "$t" "$best" "$unit"
    done
    for suffix in busy_proxy busy_load ${cunit:+cpu cpu_kernel}; do
        u=%
        case $suffix in cpu*) u=$cunit ;; esac
        for t in "$@"; do
            case $suffix in cpu*) [ "$t" != direct ] || continue ;; esac
            best=$(awk -F'\t' -v w="${w}_$suffix" -v t="$t" '$1 == w && $2 == t { print $3 }' "$SAMPLES" |
                sort -n | awk '{ a[NR] = $1 } END { print NR ? a[int((NR + 1) / 2)] : "null" }')
            record "${w}_$suffix" "$t" "$best" "$u"
        done
    done
}

# --- 1. iperf3: one stream, eight streams ----------------------------------------------------
iperf() {
    local dst=$1 par=$2
    L iperf3 -c "${dst%:*}" -p "${dst#*:}" -t "$T" -P "$par" -J 2>/dev/null |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' ||
        echo null
}
m_tcp1() { iperf "${TCP_DST[$1]}" 1; }
m_tcp8() { iperf "${TCP_DST[$1]}" 8; }
if want tcp; then
    rounds tcp_stream_x1 Gbit/s m_tcp1 -- "${TARGETS[@]}"
    rounds tcp_stream_x8 Gbit/s m_tcp8 -- "${TARGETS[@]}"
fi

# --- 2. new TCP connections per second ------------------------------------------------------
m_conns() {
    L wrk -t1 -c64 -d"${T}s" -H 'Connection: close' "http://${WEB_DST[$1]}/" 2>&1 |
        awk '/Requests\/sec/ {printf "%.0f", $2}'
}
if want conns; then rounds new_conns conn/s m_conns "µs/conn" 1 -- "${TARGETS[@]}"; fi

# --- 3. UDP request/response (dnsperf -> dnsmasq) ------------------------------------------
dnsperf_qps() {
    local host=$1 port=$2 file=$3
    L dnsperf -s "$host" -p "$port" -d "$file" -l "$T" -c 8 -q 200 -t 1 2>&1 |
        awk '/Queries per second/ {printf "%.0f", $4}'
}
declare -A UDP_DST=([direct]=198.18.0.2:5300 [l4lb]=198.18.5.7:5300 [proxy]=198.18.5.5:5300 [nginx]=198.18.0.1:25300 [base]=198.18.5.6:5300)
m_udp() { dnsperf_qps "${UDP_DST[$1]%:*}" "${UDP_DST[$1]#*:}" "$WORK/bench-query.txt"; }
if want udp; then
    rounds udp_req_resp q/s m_udp "µs/query" 1 -- "${UDP_TARGETS[@]}"
    record udp_req_resp haproxy null q/s
fi

# --- 4. embedded DNS vs dnsmasq --------------------------------------------------------------
declare -A DNS_PORT=([l4lb]=5454 [dnsmasq]=5455)
m_dns() { dnsperf_qps 127.0.0.1 "${DNS_PORT[$1]}" "$WORK/names.txt"; }
if want dns; then rounds dns_server q/s m_dns -- l4lb dnsmasq; fi

# --- 4b. forwarded names: l4lb vs dnsmasq, both to the same upstream -------------------------
# Without caches (l4lb --dns-cache-size 0, dnsmasq --cache-size=0): the forwarding path itself,
# 20,000 distinct names so that neither merges identical queries in flight.
declare -A FWD_PORT=([l4lb]=5458 [dnsmasq]=5456)
m_dnsfwd() { dnsperf_qps 127.0.0.1 "${FWD_PORT[$1]}" "$WORK/forward-query.txt"; }
# With caches (both 10,000 entries), 1,000 names asked over and over: after the first pass
# (the first round warms both) every answer comes from the cache.
declare -A CACHED_PORT=([l4lb]=5454 [dnsmasq]=5457)
m_dnscached() { dnsperf_qps 127.0.0.1 "${CACHED_PORT[$1]}" "$WORK/cached-query.txt"; }
if want dnsfwd; then
    rounds dns_forward q/s m_dnsfwd "µs/query" 1 -- l4lb dnsmasq
    rounds dns_forward_cached q/s m_dnscached "µs/query" 1 -- l4lb dnsmasq
fi

# --- 5. memory per idle connection ----------------------------------------------------------
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
idle_per_conn() {
    local pid=$1 dst=$2 before after opened
    before=$(rss_kib "$pid")
    local fd_before fd_after
    fd_before=$(ls "/proc/$pid/fd" | wc -l)
    # Not named IDLE: a coproc's name becomes an array, which would hide the global $IDLE.
    coproc IDLER { exec ip netns exec "$NSC" taskset -c "$LOAD_CPU" python3 "$HERE/idle_conns.py" "${dst%:*}" "${dst#*:}" "$IDLE"; }
    local cpid=$IDLER_PID
    PIDS+=("$cpid")
    read -r line <&"${IDLER[0]}"
    sleep 2
    # Count what reached the backend: a proxy out of descriptors accepts (in the kernel's
    # backlog) more than it forwards.
    opened=$(ip netns exec "$NSS" ss -Htn state established '( sport = :8080 )' | wc -l)
    after=$(rss_kib "$pid")
    fd_after=$(ls "/proc/$pid/fd" | wc -l)
    python3 -c "print('%.2f' % (($fd_after - $fd_before) / max($opened, 1)))" >"$WORK/idle-fds-$pid"
    eval "exec ${IDLER[1]}>&-"
    wait "$cpid" 2>/dev/null || true
    log "idle $dst: client $line; $opened reached the backend; RSS ${before} -> ${after} KiB"
    echo "$opened" >"$WORK/idle-reached-$pid"
    python3 -c "print('%.2f' % (($after - $before) / max($opened, 1)))"
    sleep 2
}
# The proxies' memory: l4lb's proxy (in the kernel path a connection holds nothing in l4lb).
if want idle; then
    record idle_conn_mem proxy "$(idle_per_conn "$(pid_of l4lb)" 198.18.5.5:8080)" KiB/conn
    record idle_conn_mem haproxy "$(idle_per_conn "$(pid_of haproxy)" 198.18.0.1:18080)" KiB/conn
    record idle_conn_mem nginx "$(idle_per_conn "$(pid_of proxy-nginx)" 198.18.0.1:28080)" KiB/conn
    for pair in l4lb:proxy haproxy:haproxy proxy-nginx:nginx; do
        p=${pair%%:*} t=${pair#*:}
        record idle_conns_held "$t" "$(cat "$WORK/idle-reached-$(pid_of "$p")")" "of $IDLE"
        record idle_conn_fds "$t" "$(cat "$WORK/idle-fds-$(pid_of "$p")")" fd/conn
    done
fi

# --- 6. propagation: Marathon event -> first connection on the new backend ------------------
if want propagation; then
    log "propagation ($CHANGES changes, loopback, fake Marathon)"
    if prop=$(cd "$ROOT" && BENCH_CHANGES=$CHANGES L4LB_BIN="$L4LB" taskset -c "$LOAD_CPU" \
        cargo bench --quiet --bench propagation 2>"$WORK/propagation.err" | tail -1); then
        echo "$prop" >"$WORK/propagation.json"
        record propagation_p50 l4lb "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["p50_ms"])' "$WORK/propagation.json")" ms
        record propagation_p99 l4lb "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["p99_ms"])' "$WORK/propagation.json")" ms
    else
        log "propagation failed: $(tail -5 "$WORK/propagation.err")"
        record propagation_p50 l4lb null ms
        record propagation_p99 l4lb null ms
    fi
fi

if [ -n "${BENCH_HOLD:-}" ]; then
    log "holding: ip netns exec $NSC ... (client, proxies: l4lb $(pid_of l4lb), haproxy $(pid_of haproxy), nginx $(pid_of proxy-nginx)); ip netns exec $NSS ... (backends); Ctrl-C or kill -TERM $$ ends"
    while :; do sleep 3600 & wait $!; done
fi

# --- report ----------------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
python3 "$HERE/report.py" "$RES" "$OUT" "$PROXY_CPU" "$LOAD_CPU" "$T" "$(($(date +%s) - START))" \
    "$SAMPLES" "$ROUNDS"
