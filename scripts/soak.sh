#!/usr/bin/env bash
# Soak (issue 13): a controller and an agent in a throw-away network namespace while clients
# keep connecting through an IP VIP and a named VIP, and faults come every few seconds, in a
# loop: task churn (1-3 of 3 live backends in the table), a flapping source (the apps file
# replaced by garbage, then restored), the agent SIGKILLed and restarted, the agent SIGTERMed
# and restarted, the controller SIGKILLed and restarted, `ip addr flush dev minuteman`, and
# the agent upgraded in place: a new one started with `--take-over` takes its sockets, lock,
# table and kernel path, and the old one finishes its connections and exits 0.
# Prints failed client connections (overall, by the fault before them, and those while a data
# plane existed: all but a SIGTERM's stop-and-start and, with the proxy, a SIGKILL's restart,
# when the agent process is the data plane), RSS and descriptors of both processes over
# time, the take-overs' exit codes, and the addresses left on the link at the end. A
# take-over must lose nothing: its failures are never excused.
# The agent runs the kernel path where it loads (`--data-plane auto`, restricted to the soak's
# namespace, pins in a BPF filesystem of the soak's own), so a SIGKILLed agent's programs keep
# serving until the next agent takes over; SOAK_DATA_PLANE=proxy soaks the proxy alone.
# Usage (as root): scripts/soak.sh [seconds, default 120]   (L4LB_BIN to pick the binary)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "soak.sh needs root (network namespace, VIP addresses)." >&2
  exit 2
fi
for tool in ip socat curl python3; do
  command -v "$tool" >/dev/null || { echo "soak.sh needs $tool" >&2; exit 2; }
done
DURATION=${1:-120}
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=$(l4lb_bin)
NS=l4lb-soak-$$
WORK=$(mktemp -d)
PLANE=${SOAK_DATA_PLANE:-auto}
CTL_API=127.0.0.1:62190
AGENT_API=127.0.0.1:62191
PIDS=()
CTL=0
AGENT=0
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -d "$WORK" ]; then
    echo "soak.sh failed ($rc); last lines of the logs:" >&2
    tail -n 5 "$WORK"/agent.log "$WORK"/controller.log >&2 || true
  fi
  for p in "${PIDS[@]}" "$CTL" "$AGENT"; do [ "$p" -gt 0 ] && kill "$p" 2>/dev/null || true; done
  ns_teardown "$NS" "$WORK"
}
trap cleanup EXIT INT TERM
now_ms() { date +%s%3N; }
event() { echo "$(now_ms) $*" >>"$WORK/events"; }

# The agent's pins: a file system outside its `ip netns exec` mount namespace (whose /sys is
# its own), so they outlive a killed agent as /sys/fs/bpf does on a host.
mkdir "$WORK/bpffs"
mount -t bpf bpf "$WORK/bpffs"
ip netns add "$NS"
in_ns ip link set lo up
in_ns ip link add eth0 type bridge
in_ns ip addr add 198.18.0.1/15 dev eth0
in_ns ip link set eth0 up

# Three backends that read the request, then answer and close.
for i in 1 2 3; do
  http_task "$WORK/task$i.sh" "task $i"
  ip netns exec "$NS" socat TCP-LISTEN:1808$i,bind=127.0.0.1,fork,reuseaddr EXEC:"/bin/sh $WORK/task$i.sh" &
  PIDS+=($!)
done

# The apps file: /soak with VIP_0=/soak:80 and VIP_1=198.18.5.5:80, tasks = the given ports.
write_apps() {
  python3 - "$WORK/apps.json" "$@" <<'PY'
import json, sys, os
path, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
app = json.load(open("examples/apps.json"))["apps"][0]
app["id"] = "/soak"
app["portDefinitions"][0]["labels"] = {"VIP_0": "/soak:80", "VIP_1": "198.18.5.5:80"}
tmpl = app["tasks"][0]
app["tasks"] = []
for i, p in enumerate(ports):
    t = dict(tmpl, id=f"soak.{p:08x}-6ca8-11e7-beb2-0e2beceebfcc", appId="/soak", ports=[p])
    app["tasks"].append(t)
app["instances"] = app["tasksRunning"] = len(ports)
tmp = path + ".new"
json.dump({"apps": [app]}, open(tmp, "w"))
os.replace(tmp, path)
PY
}
write_apps 18081 18082 18083

start_controller() {
  # `ip netns exec` execs the program: $! is l4lb itself (a function would add a subshell).
  ip netns exec "$NS" "$BIN" controller --apps-file "$WORK/apps.json" --apps-file-poll 100ms \
    --vip-cidr 198.18.128.0/17 --api-listen "$CTL_API" 2>>"$WORK/controller.log" &
  CTL=$!
}
# Extra flags (`--take-over`) go after the usual ones.
start_agent() {
  ip netns exec "$NS" "$BIN" agent --controller "http://$CTL_API/" --api-listen "$AGENT_API" \
    --dns-listen 127.0.0.1:5454 --drain-timeout 2s --shutdown-grace 1s \
    --data-plane "$PLANE" --bpf-netns-only --bpffs "$WORK/bpffs" "$@" 2>>"$WORK/agent.log" &
  AGENT=$!
}
wait_ready() {
  for _ in $(seq 1 200); do
    in_ns curl -sf "http://$1/ready" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "not ready: $1" >&2
  return 1
}
start_controller
wait_ready "$CTL_API"
start_agent
wait_ready "$AGENT_API"
PLANE_RUNNING=$(in_ns curl -s "http://$AGENT_API/metrics" | grep -o 'data_plane{plane="[a-z]*"} 1' | grep -o '"[a-z]*"' | tr -d '"' || true)
NAMED=$(in_ns "$BIN" vips --api "http://$AGENT_API" | grep -o '198\.18\.[0-9.]*:80' | grep -v 198.18.5.5 | head -1)
echo "==> soak for ${DURATION}s: IP VIP 198.18.5.5:80, named VIP soak.marathon ($NAMED), data plane ${PLANE_RUNNING:-?}, binary $BIN"

# Clients: one connection after another through each VIP, each with a 2 s budget.
client() {
  local target=$1 out=$2
  while :; do
    local t
    t=$(now_ms)
    if in_ns curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$target/" 2>/dev/null | grep -q 200; then
      echo "$t ok" >>"$out"
    else
      echo "$t fail" >>"$out"
    fi
  done
}
client 198.18.5.5:80 "$WORK/client-ip" &
PIDS+=($!)
client "$NAMED" "$WORK/client-named" &
PIDS+=($!)

# Samples of RSS (KiB) and descriptors are taken by the fault loop, which knows the PIDs.
START=$(now_ms)

restart_agent() {
  local sig=$1
  event "agent_down_start $sig"
  kill -"$sig" "$AGENT" 2>/dev/null || true
  wait "$AGENT" 2>/dev/null || true
  start_agent
  wait_ready "$AGENT_API"
  event "agent_down_end $sig"
}

# Upgrade in place: the old agent must exit 0 by itself once the new one serves.
take_over() {
  local old=$AGENT rc=0
  event "agent_takeover_start"
  start_agent --take-over
  wait "$old" || rc=$?
  wait_ready "$AGENT_API"
  event "agent_takeover_end $rc"
  echo "$rc" >>"$WORK/takeovers"
}

step=0
END=$(( START + DURATION * 1000 ))
while [ "$(now_ms)" -lt "$END" ]; do
  # The sampler reads $CTL/$AGENT, which change: sample inline instead of in the background.
  line="$(( ($(now_ms) - START) / 1000 ))"
  for p in $CTL $AGENT; do
    line="$line $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo -) $(ls "/proc/$p/fd" 2>/dev/null | wc -l)"
  done
  echo "$line" >>"$WORK/samples"
  case $(( step % 7 )) in
    0) event churn
       mapfile -t live < <(shuf -e 18081 18082 18083 | head -n $(( RANDOM % 3 + 1 )))
       write_apps "${live[@]}" ;;
    1) event flap; cp "$WORK/apps.json" "$WORK/good.json"
       echo '{"apps": [garbage' >"$WORK/apps.json.new" && mv "$WORK/apps.json.new" "$WORK/apps.json"
       sleep 2; mv "$WORK/good.json" "$WORK/apps.json" ;;
    2) restart_agent KILL ;;
    3) event controller_kill; kill -KILL "$CTL"; wait "$CTL" 2>/dev/null || true
       sleep 1; start_controller; wait_ready "$CTL_API" ;;
    4) event flush; in_ns ip addr flush dev minuteman ;;
    5) restart_agent TERM ;;
    6) take_over ;;
  esac
  step=$(( step + 1 ))
  sleep 3
done
write_apps 18081 18082 18083
sleep 1

# Failures by the fault before them, and which fell while no data plane existed: a SIGTERM's
# stop-and-start (stopping means stopping) and, with the proxy alone, a SIGKILL's restart.
report() {
  python3 - "$WORK" "$PLANE_RUNNING" <<'PY'
import sys
w, plane = sys.argv[1], sys.argv[2]
down, start, events = [], None, []
for l in open(f"{w}/events"):
    t, ev = l.split()[:2]
    sig = l.split()[2] if len(l.split()) > 2 else ""
    events.append((int(t), ev + (f"_{sig}" if sig else "")))
    if ev == "agent_down_start": start = (int(t), sig)
    if ev == "agent_down_end" and start is not None:
        if start[1] == "TERM" or plane != "bpf":
            down.append((start[0], int(t) + 500))
        start = None
total_unexcused = 0
for name in ("client-ip", "client-named"):
    ok = fail = excused = 0
    after = {}
    for l in open(f"{w}/{name}"):
        t, r = l.split()
        if r == "ok":
            ok += 1
            continue
        fail += 1
        prev = [ev for (te, ev) in events if te <= int(t) + 2000]
        k = prev[-1] if prev else "start"
        after[k] = after.get(k, 0) + 1
        # A connection started while no data plane existed could reach nothing.
        if any(a - 2000 <= int(t) <= b for a, b in down): excused += 1
    total_unexcused += fail - excused
    print(f"{name}: {ok + fail} connections, {fail} failed (by the fault before them: "
          f"{after or 'none'}), {fail - excused} while a data plane existed")
print(f"failed while a data plane existed: {total_unexcused}")
PY
}
touch "$WORK/takeovers"
echo "==> take-overs: $(wc -l <"$WORK/takeovers"), old agents' exit codes: $(sort "$WORK/takeovers" | uniq -c | tr -s ' ' | tr '\n' ',')"
echo "==> events: $(awk '{print $2}' "$WORK/events" | sort | uniq -c | tr -s ' ' | tr '\n' ',')"
echo "==> clients"
report
echo "==> t(s)  controller RSS(KiB) fds   agent RSS(KiB) fds"
awk '{printf "%6s %12s %5s %12s %5s\n", $1, $2, $3, $4, $5}' "$WORK/samples"
kill "$AGENT" "$CTL" 2>/dev/null || true
wait "$AGENT" 2>/dev/null || true
wait "$CTL" 2>/dev/null || true
AGENT=0
CTL=0
left=$(in_ns ip -o addr show dev minuteman 2>/dev/null | grep -c 'inet' || true)
echo "==> addresses left on minuteman after SIGTERM: $left"
