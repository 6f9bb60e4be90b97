#!/usr/bin/env python3
"""Open N idle TCP connections to HOST:PORT and hold them.

Prints "open <n>" once every connection is established, then holds them until stdin closes
(or the process is killed). Used by scripts/bench.sh to measure a proxy's memory per idle
connection.
"""

import resource
import socket
import sys
import time


def main() -> int:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    socks = []
    failed = 0
    # A proxy out of descriptors leaves connections in its listen backlog and then the
    # handshake hangs: give up after a few failures in a row or half a minute in all.
    deadline = time.monotonic() + 30
    in_a_row = 0
    for _ in range(count):
        if in_a_row >= 3 or time.monotonic() > deadline:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1)
        try:
            s.connect((host, port))
            socks.append(s)
            in_a_row = 0
        except OSError:
            failed += 1
            in_a_row += 1
            s.close()
    print(f"open {len(socks)} failed {failed}", flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
