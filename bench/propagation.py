"""Propagation latency: from fail2ban's Ban line on node1 to the ban applied on node2.

Runs a hub and two real fail2ban nodes on 127.0.0.1 (the lab), makes node1's
fail2ban ban COUNT addresses paced over time, and reads both ends from the logs'
own millisecond timestamps: node1's fail2ban.log `[sshd] Ban ip` and node2's
subscriber log `[cluster] Ban ip` (written when fail2ban's banip call returned).
In the same run it times the naive way of applying one ban on another server: one
`fail2ban-client set cluster banip IP` process per address.

    python3 bench/propagation.py --count 200 --json result.json

This is a benchmark, not a test: it prints figures and never fails on speed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import percentile, report, spread, table

from f2bzmq.lab import Cluster, wait_until

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*\] Ban (\S+)$", re.M)


def stamps(text: str, jail: str) -> dict[str, float]:
    """ip -> time of the first `[jail] Ban ip` line."""
    found: dict[str, float] = {}
    for match in STAMP.finditer(text):
        if f"[{jail}] Ban " not in match.group(0):
            continue
        when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
        found.setdefault(match.group(3), when + int(match.group(2)) / 1000)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="bans (default 200)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between bans")
    parser.add_argument("--naive", type=int, default=20, help="fail2ban-client runs to time")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-bench-"))
    try:
        return run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> int:
    addresses = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(args.count)]
    jails = {"jails": lambda server: server.default_jails(3600, 86400)}
    with Cluster(root, size=2, fail2ban=jails, general={"loglevel": "INFO"}) as cluster:
        node1, node2 = cluster["node1"], cluster["node2"]
        for ip in addresses:
            node1.fail2ban.attack(ip)
            time.sleep(args.interval)
        wanted = set(addresses)
        if not wait_until(lambda: wanted <= set(node2.fail2ban.banned("cluster")), 120, 0.5):
            print("not every ban arrived within 120 s", file=sys.stderr)
            return 1
        origin = stamps(node1.fail2ban.log.read_text(), "sshd")
        applied = stamps(node2.log_text("subscriber"), "cluster")
        delays = [(applied[ip] - origin[ip]) * 1000 for ip in addresses]

        naive = []
        for i in range(args.naive):
            started = time.perf_counter()
            subprocess.run(
                [
                    "fail2ban-client",
                    "-s",
                    str(node2.fail2ban.socket),
                    "set",
                    "cluster",
                    "banip",
                    f"198.19.0.{i + 1}",
                ],
                capture_output=True,
                check=True,
            )
            naive.append((time.perf_counter() - started) * 1000)
    result = {
        "bans": args.count,
        "propagation_ms": spread(delays),
        "naive_fail2ban_client_ms": {"runs": args.naive, "p50": percentile(naive, 0.50)},
    }
    p = result["propagation_ms"]
    rows = [
        ["f2bzmq: node1 Ban line -> applied on node2 (ms)", p["p50"], p["p90"], p["p99"], p["max"]],
        ["naive: one fail2ban-client process per ban (ms)", percentile(naive, 0.5), "", "", ""],
    ]
    text = table(["what", "p50", "p90", "p99", "max"], rows)
    text += "\n(timestamps have 1 ms resolution; the naive figure is the apply step alone)"
    report("propagation", result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
