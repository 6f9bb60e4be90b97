#!/usr/bin/env python3
"""Open N idle TCP connections to HOST:PORT and hold them.

Prints "open <n>" once every connection is established, then holds them until stdin closes
(or the process is killed). Used by scripts/bench.sh to measure a proxy's memory per idle
connection.
"""

import resource
import socket
import sys


def main() -> int:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    socks = []
    failed = 0
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    print(f"open {len(socks)} failed {failed}", flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
