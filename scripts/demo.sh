#!/usr/bin/env bash
# The five-minute tour: backends that say who they are, a Marathon-shaped apps file with a
# named VIP and an IP VIP (TCP) and a UDP VIP, `l4lb run` on it, then dig, curl, a UDP client
# and `l4lb vips`; then a backend is scaled away by editing the file and traffic moves.
# Everything runs in a network namespace this script creates and removes on exit.
# Usage (as root): scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh needs root: it creates a network namespace and installs VIP addresses (CAP_NET_ADMIN)." >&2
  echo "Run: sudo scripts/demo.sh" >&2
  exit 2
fi
# Install what the tour uses (Debian/Ubuntu): its packages are named in scripts/packages.
missing=()
for tool in ip dig curl socat; do
  command -v "$tool" >/dev/null || missing+=("$(sed -n "s/^$tool://p" scripts/packages)")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    echo "==> installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing ${missing[*]} (and no apt-get to install them)" >&2
    exit 2
  fi
fi

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=$(l4lb_bin)
NS=l4lb-demo-$$
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  # SIGTERM first (l4lb drains and removes its addresses), then whatever is left in the netns.
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  ns_teardown "$NS" "$WORK"
}
trap cleanup EXIT INT TERM
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "network namespace $NS (VIPs from 198.18.128.0/17, never routed out)"
ip netns add "$NS"
in_ns ip link set lo up

say "backends: three HTTP tasks on 127.0.0.1:18081-18083, two UDP tasks on 18091-18092"
for i in 1 2 3; do
  http_task "$WORK/task$i.sh" "hello from task $i (127.0.0.1:1808$i)"
  ip netns exec "$NS" socat TCP-LISTEN:1808$i,bind=127.0.0.1,fork,reuseaddr EXEC:"/bin/sh $WORK/task$i.sh" &
  PIDS+=($!)
done
# The UDP tasks read the datagram before answering too (socat resets a handler that exits
# before taking its input, and the answer is lost).
for i in 1 2; do
  printf '#!/bin/sh\nread -r _ask\necho "udp task %s"\n' "$i" >"$WORK/udp$i.sh"
  ip netns exec "$NS" socat UDP-RECVFROM:1809$i,bind=127.0.0.1,fork EXEC:"/bin/sh $WORK/udp$i.sh" &
  PIDS+=($!)
done

for i in 1 2 3; do
  for _ in $(seq 1 50); do in_ns curl -sf "http://127.0.0.1:1808$i/" >/dev/null && break; sleep 0.05; done
done

cp examples/apps.json "$WORK/apps.json"
say "the apps file (Marathon /v2/apps?embed=apps.tasks shape): labels VIP_0=/hello:80, VIP_1=198.18.5.5:80, /echo:5000 (udp)"
grep -E '"VIP_[0-9]"' "$WORK/apps.json"

# The default data plane (auto): the kernel path where it loads, else the proxy. Inside the
# demo's namespace it acts on the namespace's sockets only (--bpf-netns-only), and pins into a
# BPF filesystem of the demo's own, so a host's l4lb is left alone.
mkdir "$WORK/bpffs"
mount -t bpf bpf "$WORK/bpffs"
say "l4lb run --apps-file apps.json --vip-cidr 198.18.128.0/17 (--data-plane auto, the default)"
ip netns exec "$NS" "$BIN" run --apps-file "$WORK/apps.json" --vip-cidr 198.18.128.0/17 \
  --bpf-netns-only --bpffs "$WORK/bpffs" --bpf-instance "demo-$$" \
  --dns-listen 127.0.0.1:5454 --api-listen 127.0.0.1:62080 --shutdown-grace 1s 2>"$WORK/l4lb.log" &
PIDS+=($!)
for _ in $(seq 1 100); do
  in_ns curl -sf http://127.0.0.1:62080/ready >/dev/null 2>&1 && break
  sleep 0.1
done
in_ns curl -sf http://127.0.0.1:62080/ready >/dev/null || { cat "$WORK/l4lb.log"; exit 1; }
echo "ready; $(grep -o 'data plane chosen.*' "$WORK/l4lb.log" | head -1)"
echo "VIP addresses on the minuteman interface:"
in_ns ip -brief addr show dev minuteman

say "dig @127.0.0.1 -p 5454 hello.marathon.l4lb.thisdcos.directory"
VIP=$(in_ns dig +short -p 5454 @127.0.0.1 hello.marathon.l4lb.thisdcos.directory)
echo "$VIP"
say "dig SRV _hello._tcp.marathon.l4lb.thisdcos.directory"
in_ns dig +short -p 5454 @127.0.0.1 SRV _hello._tcp.marathon.l4lb.thisdcos.directory

say "curl http://hello.marathon.l4lb.thisdcos.directory ($VIP), six times"
for _ in 1 2 3 4 5 6; do in_ns curl -sf "http://$VIP/"; done
say "curl the IP VIP http://198.18.5.5/, three times"
for _ in 1 2 3; do in_ns curl -sf http://198.18.5.5/; done

ECHO=$(in_ns dig +short -p 5454 @127.0.0.1 echo.marathon.l4lb.thisdcos.directory)
say "UDP to echo.marathon.l4lb.thisdcos.directory:5000 ($ECHO)"
# UDP is datagrams: like any DNS or statsd client, ask again if no answer came (a loaded
# machine can be slow to fork the backend's handler).
udp_ask() {
  local out=""
  for _ in 1 2 3; do
    out=$(echo ping | in_ns socat -t2 - "UDP:$ECHO:5000" || true)
    [ -n "$out" ] && break
  done
  [ -n "$out" ] || { echo "no UDP answer from $ECHO:5000" >&2; return 1; }
  echo "$out"
}
for _ in 1 2; do udp_ask; done

say "l4lb vips"
in_ns "$BIN" vips --api http://127.0.0.1:62080

say "scale /hello to two tasks by editing the file (task 3 leaves)"
cp examples/apps-scaled.json "$WORK/apps.json.new" && mv "$WORK/apps.json.new" "$WORK/apps.json"
for _ in $(seq 1 50); do
  n=$(in_ns curl -s http://127.0.0.1:62080/v1/vips | grep -o '"port":1808[0-9]' | sort -u | wc -l)
  [ "$n" -eq 2 ] && break
  sleep 0.1
done
for _ in 1 2 3 4 5 6; do in_ns curl -sf "http://$VIP/"; done

say "done; cleaning up (SIGTERM drains and removes the VIP addresses)"
