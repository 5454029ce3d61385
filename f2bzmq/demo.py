"""A local demo cluster: a hub and three fail2ban nodes on 127.0.0.1, an attack, and the result.

Everything lives in a temporary folder and is stopped and removed at the end,
including after Ctrl-C. Addresses used are documentation ranges (RFC 5737/3849):
nothing is sent anywhere but loopback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .lab import Cluster

ATTACKER = "203.0.113.66"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m f2bzmq demo",
        description="Run a hub and three fail2ban nodes on this machine, attack node1, "
        "and show the ban arriving on node2 and node3; then clean everything up.",
    )
    parser.add_argument("--nodes", type=int, default=3, choices=range(2, 10), metavar="N")
    parser.add_argument("--keep", action="store_true", help="keep the folder with all logs")
    args = parser.parse_args(argv)
    if shutil.which("fail2ban-client") is None:
        print("the demo needs fail2ban: apt-get install fail2ban", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-demo-"))
    try:
        return run_demo(root, args.nodes)
    finally:
        if args.keep:
            print(f"\nlogs and state kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_demo(root: Path, size: int) -> int:
    step(f"starting a hub and {size} nodes (each: fail2ban-server, monitor, subscriber)")
    with Cluster(root, size=size, general={"loglevel": "INFO"}) as cluster:
        others = [name for name in cluster.nodes if name != "node1"]
        for name, node in cluster.nodes.items():
            print(f"   {name}: fail2ban socket {node.fail2ban.socket}")
        step(f"attack: {ATTACKER} fails to log in to node1's sshd twice")
        cluster["node1"].fail2ban.attack(ATTACKER)
        cluster["node1"].fail2ban.wait_banned("sshd", ATTACKER)
        show(cluster, "node1", "sshd")
        for name in others:
            cluster[name].fail2ban.wait_banned("cluster", ATTACKER)
            show(cluster, name, "cluster", delay(cluster, name, "Ban"))
        step(f"node1 lifts its ban: fail2ban-client set sshd unbanip {ATTACKER}")
        with cluster["node1"].fail2ban.client() as client:
            client.unban("sshd", [ATTACKER])
        for name in others:
            cluster[name].fail2ban.wait_banned("cluster", ATTACKER, present=False)
            show(cluster, name, "cluster", delay(cluster, name, "Unban"))
        step("the hub's log")
        for line in cluster.hub.log_text().splitlines():
            if "] Ban " in line or "] Unban " in line:
                print("   " + line)
        step("stopping everything")
    print("done: the demo cluster is stopped and its files are removed.")
    return 0


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(cluster: Cluster, name: str, jail: str, note: str = "") -> None:
    banned = cluster[name].fail2ban.banned(jail)
    print(f"   {name}: fail2ban-client get {jail} banip -> {' '.join(banned) or '(none)'}{note}")


def delay(cluster: Cluster, name: str, verb: str) -> str:
    """How long after node1's fail2ban logged it the subscriber on `name` applied it."""
    origin = last_stamp(cluster["node1"].fail2ban.log.read_text(), f"[sshd] {verb} {ATTACKER}")
    applied = last_stamp(cluster[name].log_text("subscriber"), f"[cluster] {verb} {ATTACKER}")
    if origin is None or applied is None:
        return ""
    return f"   ({(applied - origin) * 1000:.0f} ms after node1's fail2ban logged the {verb})"


def last_stamp(text: str, needle: str) -> float | None:
    """The timestamp of the last log line containing needle ('2026-11-23 10:13:40,972 …')."""
    for line in reversed(text.splitlines()):
        if needle in line:
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
            return stamp + int(line[20:23]) / 1000
    return None
