#!/usr/bin/env python3
"""Turn scripts/bench.sh's results.tsv into the printed table and the JSON file.

usage: report.py RESULTS_TSV OUT_JSON PROXY_CPU LOAD_CPU SECONDS ELAPSED [SAMPLES_TSV ROUNDS]
"""

import datetime
import json
import os
import platform
import subprocess
import sys


def busy_rows(key):
    """The two CPU-busy rows under a workload's headline row."""
    return [
        (f"{key}_busy_proxy", "  proxy CPU busy (median)", False, None),
        (f"{key}_busy_load", "  load CPU busy (median)", False, None),
    ]


def cpu_rows(key, unit, kernel=True):
    """CPU per unit of work (and the kernel's share), then the busy rows."""
    rows = [(f"{key}_cpu", f"  proxy CPU per {unit} (median)", False, None)]
    if kernel:
        rows.append((f"{key}_cpu_kernel", "    of which kernel (median)", False, None))
    return rows + busy_rows(key)


ROWS = [
    # key, label, higher is better, (compare to, minimum ratio) target
    ("tcp_stream_x1", "iperf3 TCP, 1 stream", True, ("direct", 0.8)),
    *busy_rows("tcp_stream_x1"),
    ("tcp_stream_x8", "iperf3 TCP, 8 streams", True, None),
    ("new_conns", "new TCP conns (wrk, Connection: close)", True, ("haproxy", 1.2)),
    *cpu_rows("new_conns", "new conn"),
    ("udp_req_resp", "UDP req/resp (dnsperf -> dnsmasq)", True, ("nginx", 2.0)),
    *cpu_rows("udp_req_resp", "UDP query"),
    ("dns_server", "DNS server (dnsperf)", True, ("dnsmasq", 1.0)),
    ("dns_forward", "DNS forwarded to an upstream, no caches (dnsperf)", True, None),
    *cpu_rows("dns_forward", "query", kernel=False),
    ("dns_forward_cached", "DNS forwarded, 1,000 names, caches on (dnsperf)", True, None),
    *cpu_rows("dns_forward_cached", "query", kernel=False),
    ("idle_conns_held", "idle TCP conns held (reached the backend)", True, None),
    ("idle_conn_mem", "memory (RSS) per idle TCP conn", False, None),
    ("idle_conn_fds", "descriptors per idle TCP conn", False, None),
    ("propagation_p50", "propagation Marathon event -> new backend, p50", False, None),
    ("propagation_p99", "propagation Marathon event -> new backend, p99", False, None),
]
ABSOLUTE = {"idle_conn_mem": 10.0, "propagation_p99": 200.0}
# "l4lb": the default data plane (auto); "proxy": l4lb --data-plane proxy.
COLS = ["direct", "dnsmasq", "l4lb", "proxy", "haproxy", "nginx", "base"]


def num(s):
    try:
        return float(s)
    except ValueError:
        return None


def limits(data):
    """What the ratio targets ask of the proxy's one core, next to what the kernel's work alone
    costs there: a rate whose CPU budget per unit is below the kernel's share cannot be reached
    by any change to user space. Also how busy both CPUs were during l4lb's runs: a saturated
    load CPU bounds every path, the direct one included."""

    def get(key, target):
        return data.get(key, {}).get(target)

    def busy(key):
        p, l = get(f"{key}_busy_proxy", "l4lb"), get(f"{key}_busy_load", "l4lb")
        if p is None or l is None:
            return ""
        return f" During l4lb's runs: proxy CPU {p:.0f}% busy, load CPU {l:.0f}%."

    out = ["What the targets ask (from this run's figures):"]
    for key, other, want, unit in (
        ("new_conns", "haproxy", 1.2, "conn"),
        ("udp_req_resp", "nginx", 2.0, "query"),
    ):
        peer, direct = get(key, other), get(key, "direct")
        kernel = {t: get(f"{key}_cpu_kernel", t) for t in ("l4lb", "haproxy", "nginx")}
        if not peer or not direct or kernel["l4lb"] is None:
            continue
        goal = want * peer
        peers = ", ".join(f"{t} {v:.1f}" for t, v in kernel.items() if t != "l4lb" and v is not None)
        out.append(
            f"  {key}: {want:g}x {other} = {goal:.0f}/s = {goal / direct:.2f}x direct. One core at "
            f"that rate has {1e6 / goal:.1f} µs per {unit}; the kernel's work alone costs l4lb "
            f"{kernel['l4lb']:.1f} ({peers}).{busy(key)}"
        )
    x1 = data.get("tcp_stream_x1", {})
    if x1.get("direct") and x1.get("l4lb"):
        out.append(
            f"  tcp_stream_x1: 0.8x direct = {0.8 * x1['direct']:.2f} Gbit/s; l4lb "
            f"{x1['l4lb']:.2f}.{busy('tcp_stream_x1')}"
        )
    return out if len(out) > 1 else []


def main() -> int:
    tsv, out, proxy_cpu, load_cpu, seconds, elapsed = sys.argv[1:7]
    samples = {}
    if len(sys.argv) > 7:
        for line in open(sys.argv[7]):
            key, target, value = line.rstrip("\n").split("\t")
            samples.setdefault(key, {}).setdefault(target, []).append(num(value))
    rounds = int(sys.argv[8]) if len(sys.argv) > 8 else 1
    data = {}
    units = {}
    for line in open(tsv):
        key, target, value, unit = line.rstrip("\n").split("\t")
        data.setdefault(key, {})[target] = num(value)
        units[key] = unit

    def fmt(v):
        if v is None:
            return "n/a"
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"

    results = []
    lines = []
    has_base = any("base" in row for row in data.values())
    # 'proxy': l4lb with --data-plane proxy, beside the default data plane's 'l4lb'.
    has_proxy = any("proxy" in row for row in data.values())
    cols = [c for c in COLS if (c != "base" or has_base) and (c != "proxy" or has_proxy)]
    head = f"{'workload':<50} {'unit':<9}" + "".join(f"{c:>9}" for c in cols)
    head += f"  {'l4lb/direct':>11} {'l4lb/haproxy':>12} {'l4lb/nginx':>10}"
    if has_proxy:
        head += f" {'prx/direct':>10} {'prx/haproxy':>11}"
    head += f" {'l4lb/base':>9}  target" if has_base else "  target"
    lines.append(head)
    lines.append("-" * len(head))
    for key, label, higher, target in ROWS:
        if key not in data:
            continue
        row = data[key]
        # Rows only l4lb's proxy has (idle connections) judge the proxy.
        l4 = row.get("l4lb", row.get("proxy"))
        ratios = {}
        for other in [] if units[key] == "%" else ("direct", "haproxy", "nginx", "dnsmasq", "base"):
            o = row.get(other)
            if l4 is not None and o:
                ratios[other] = l4 / o
        verdict = ""
        if target:
            other, want = target
            r = ratios.get(other)
            verdict = f"l4lb >= {want}x {other}: " + (
                "n/a" if r is None else ("MET" if r >= want else f"MISSED ({r:.2f}x)")
            )
        elif key in ABSOLUTE:
            limit = ABSOLUTE[key]
            verdict = f"l4lb <= {limit:g} {units[key]}: " + (
                "n/a" if l4 is None else ("MET" if l4 <= limit else "MISSED")
            )
        cells = "".join(f"{fmt(row.get(c)) if c in row else '':>9}" for c in cols)
        prx = row.get("proxy")
        prx_ratios = {}
        for other in [] if units[key] == "%" else ("direct", "haproxy"):
            o = row.get(other)
            if prx is not None and o:
                prx_ratios[other] = prx / o

        if "direct" not in ratios and "dnsmasq" in ratios:
            # The DNS row: the baseline is dnsmasq serving the same names.
            ratios_shown = dict(ratios, direct=ratios["dnsmasq"])
        else:
            ratios_shown = ratios

        def rc(k, w):
            return f"{ratios_shown[k]:>{w}.2f}" if k in ratios_shown else f"{'':>{w}}"

        lines.append(
            f"{label:<50} {units[key]:<9}{cells}  {rc('direct', 11)} {rc('haproxy', 12)} {rc('nginx', 10)}"
            + (
                "".join(
                    f" {prx_ratios[k]:>{w}.2f}" if k in prx_ratios else f" {'':>{w}}"
                    for k, w in (("direct", 10), ("haproxy", 11))
                )
                if has_proxy
                else ""
            )
            + (f" {rc('base', 9)}" if has_base else "")
            + f"  {verdict}"
        )
        results.append(
            {
                "workload": key,
                "label": label,
                "unit": units[key],
                "higher_is_better": higher,
                "values": row,
                "rounds": samples.get(key),
                "ratios_l4lb_to": ratios,
                "ratios_proxy_to": prx_ratios,
                "target": verdict or None,
            }
        )
    lines.append("")
    lines.extend(limits(data))
    lines.append("")
    lines.append(
        f"proxies (l4lb --worker-threads 1, haproxy nbthread 1, nginx worker_processes 1) "
        f"pinned to CPU {proxy_cpu}; load generators and backends pinned to CPU {load_cpu}; "
        f"{seconds} s per measurement, best of {rounds} interleaved rounds; whole run {elapsed} s."
    )
    lines.append("DNS row: 'dnsmasq' is dnsmasq serving the same names; its l4lb/direct column is l4lb/dnsmasq.")
    if has_base:
        lines.append("'base' is the BENCH_BASE binary, measured in the same rounds as l4lb.")
    if os.environ.get("BENCH_AB_PLANE", "auto") == "proxy":
        lines.append(
            "'l4lb' and 'base' run --data-plane proxy (BENCH_AB_PLANE=proxy): an A/B of the proxy."
        )
    else:
        lines.append(
            "'l4lb' is l4lb as installed (--data-plane auto: the kernel path translates the VIP in "
            "connect()/sendmsg() where it loads, no proxy in the path; its cpu rows measure the "
            "proxy CPU, where nothing runs per connection then)."
        )
    if has_proxy:
        lines.append("'proxy' is l4lb --data-plane proxy (the splice forwarder); idle rows are its.")
    table = "\n".join(lines)
    print(table)

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "proxy_cpu": int(proxy_cpu),
        "load_cpu": int(load_cpu),
        "seconds_per_measurement": float(seconds),
        "rounds": rounds,
        "elapsed_seconds": int(elapsed),
        "results": results,
        "table": table,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
