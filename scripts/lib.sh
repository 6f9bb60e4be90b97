# shellcheck shell=bash
# Shared by the scripts that run l4lb in a throw-away network namespace (demo.sh, soak.sh).
# Source it after `cd` to the repository root; it defines functions only.

# The l4lb binary to run: $L4LB_BIN, else the release build (built when missing).
l4lb_bin() {
  local bin=${L4LB_BIN:-target/release/l4lb}
  if [ ! -x "$bin" ]; then
    echo "==> building l4lb (cargo build --release)" >&2
    cargo build --release --locked -q
  fi
  realpath "$bin"
}

# Run a command inside the namespace $NS.
in_ns() { ip netns exec "$NS" "$@"; }

# Remove what a run left in namespace $1 with work directory $2, after its processes were
# sent SIGTERM: kill what is left in the namespace, delete it, unmount the run's own BPF
# file system (a killed agent's pins, and so its programs, go with it) and the directory.
ns_teardown() {
  local ns=$1 work=$2
  sleep 0.5
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  mountpoint -q "$work/bpffs" 2>/dev/null && umount "$work/bpffs"
  rm -rf "$work"
}

# Write to $1 a one-connection HTTP task for socat's EXEC: it reads the whole request (up to
# the blank line) and only then answers $2 with a length and a close, so no client sees a reset.
http_task() {
  local body=$2
  cat >"$1" <<TASK
#!/bin/sh
cr=\$(printf '\\r')
while IFS= read -r line; do
  [ -z "\$line" ] || [ "\$line" = "\$cr" ] && break
done
printf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s\\n' $((${#body} + 1)) "$body"
TASK
}
