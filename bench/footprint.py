"""Footprint: memory of each daemon idle and under load, and CPU of idle daemons.

Runs a hub and two real fail2ban nodes on 127.0.0.1 (the lab, with the shipped
defaults for heartbeats and timeouts) and reads /proc for each daemon: resident
memory (VmRSS) once idle, its peak (VmHWM) while node1's fail2ban bans BURST
addresses at once and node2 applies them, and, over IDLE seconds of nothing
happening, CPU time (utime + stime) and wake-ups (context switches of all its
threads). Then, for --neighbour-seconds, another log in fail2ban.log's directory
gets --neighbour-rate lines a second (as syslog or mail.log do in /var/log) while
fail2ban logs nothing: the CPU each daemon spends on writes that are not its business.

In the same run, and measured the same way, two naive ways of following
fail2ban.log: a Python process with ZeroMQ loaded that reads the log and, at its
end, sleeps a second and looks again, as the old tool's monitor did; and a watchdog
observer of the log's directory that reads the log when an event names it (what
this monitor did before it watched the file itself).

    python3 bench/footprint.py --idle-seconds 60 --burst 2000 --json result.json

A benchmark, not a test: it prints figures and never fails on speed; it exits
non-zero only when the run went wrong (a ban never arrived, a process died).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BenchError,
    cpu_seconds,
    memory_kb,
    report,
    stop_on_sigterm,
    table,
    wakeups,
)

from f2bzmq.fail2ban_client import Fail2banClient
from f2bzmq.lab import Cluster, child_environment

# The old tool's way of following a log: read to the end, then sleep a second and retry.
NAIVE_FOLLOWER = """
import os, re, sys, time
import zmq  # the old monitor held a ZeroMQ context per report; its import is part of its size
path, lifetime = sys.argv[1], float(sys.argv[2])
ban = re.compile(r".*\\[(.*)\\] (Ban|Un[bB]an) (.*)")
ends = time.monotonic() + lifetime
log = open(path)
log.seek(0, 2)
while time.monotonic() < ends:
    where = log.tell()
    line = log.readline()
    if not line:
        if os.stat(path).st_size < where:
            log.close()
            log = open(path)
        else:
            time.sleep(1)
            log.seek(where)
    else:
        ban.match(line)
"""
# A watchdog observer of the log's directory, waking its loop for events that name the log.
NAIVE_DIRECTORY_WATCH = """
import os, select, sys, time
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
path, lifetime = sys.argv[1], float(sys.argv[2])
name = os.path.basename(path)
wake_r, wake_w = os.pipe()
class Wake(FileSystemEventHandler):
    def on_any_event(self, event):
        if os.path.basename(os.fsdecode(event.src_path)).startswith(name):
            os.write(wake_w, b"x")
observer = Observer()
observer.schedule(Wake(), os.path.dirname(path))
observer.start()
log = open(path)
log.seek(0, 2)
ends = time.monotonic() + lifetime
while time.monotonic() < ends:
    if select.select([wake_r], [], [], 1.0)[0]:
        os.read(wake_r, 4096)
        log.read()
observer.stop()
"""
SETTLE = 3.0  # seconds after start-up before anything counts as idle
LOAD_TIMEOUT = 120.0
SAMPLE_INTERVAL = 0.05


class Watched:
    """One process whose memory and CPU are read from /proc."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.figures: dict[str, float] = {}
        self.peak_sampled_kb = 0

    def sample(self) -> None:
        self.peak_sampled_kb = max(self.peak_sampled_kb, memory_kb(self.pid)["VmRSS"])


def run(
    idle_seconds: float = 60.0,
    burst: int = 2000,
    directory: str | None = None,
    neighbour_rate: int = 1000,
    neighbour_seconds: float = 10.0,
) -> dict:
    """Footprint of the hub, a monitor and a subscriber (and node1's fail2ban, for scale)."""
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-footprint-", dir=directory))
    try:
        return measure(root, idle_seconds, burst, (neighbour_rate, neighbour_seconds))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# The hub's settings that differ from the shipped defaults: node1's burst is never told to
# wait (the table says so).
RATE_LIMITS = {"rate_limit": "100000", "rate_burst": "100000", "rate_peak": "100000"}


def measure(root: Path, idle_seconds: float, burst: int, neighbour: tuple[int, float]) -> dict:
    cluster = Cluster(
        root,
        size=2,
        fail2ban={"jails": quiet_jails},
        general={"loglevel": "INFO"},
        # The shipped defaults: the lab's are shorter, to make its tests quick.
        monitor={"ack_timeout": "5"},
        publisher={"heartbeat_interval": "1", **RATE_LIMITS},
        subscriber={"heartbeat_timeout": "5"},
    )
    # The naive followers end by themselves at the latest then.
    lifetime = SETTLE + idle_seconds + neighbour[1] + 2 * LOAD_TIMEOUT
    with cluster:
        node1, node2 = cluster["node1"], cluster["node2"]
        naive, naive_watch = (
            subprocess.Popen(
                [sys.executable, "-c", program, str(node1.fail2ban.log), str(lifetime)],
                stdin=subprocess.DEVNULL,
                env=child_environment(),
            )
            for program in (NAIVE_FOLLOWER, NAIVE_DIRECTORY_WATCH)
        )
        try:
            watched = [
                Watched("publisher (hub)", cluster.hub.publisher.process.pid),
                Watched("monitor (node1)", node1.monitor.process.pid),
                Watched("subscriber (node1)", node1.subscriber.process.pid),
                Watched("subscriber (node2)", node2.subscriber.process.pid),
                Watched("naive: log poller, 1 s sleep", naive.pid),
                Watched("naive: watchdog on the log's directory", naive_watch.pid),
                Watched("fail2ban-server (node1)", int(node1.fail2ban.pidfile.read_text())),
            ]
            time.sleep(SETTLE)
            for process in watched:
                process.figures["idle_rss_kb"] = memory_kb(process.pid)["VmRSS"]
                process.figures["cpu_before"] = cpu_seconds(process.pid)
                process.figures["wakeups_before"] = wakeups(process.pid)
            time.sleep(idle_seconds)
            for process in watched:
                cpu = cpu_seconds(process.pid) - process.figures.pop("cpu_before")
                woke = wakeups(process.pid) - process.figures.pop("wakeups_before")
                process.figures["idle_cpu_percent"] = 100 * cpu / idle_seconds
                process.figures["idle_wakeups_per_s"] = woke / idle_seconds
            busy_neighbour(node1.fail2ban.directory / "syslog", *neighbour, watched)
            load_seconds = load(node1, node2, burst, watched)
            for process in watched:
                process.figures["load_peak_rss_kb"] = max(
                    process.peak_sampled_kb, memory_kb(process.pid)["VmHWM"]
                )
            if naive.poll() is not None or naive_watch.poll() is not None:
                raise BenchError("a naive log follower died")
        finally:
            for process in (naive, naive_watch):
                process.kill()
                process.wait(10)
    return {
        "idle_seconds": idle_seconds,
        "neighbour_rate": neighbour[0],
        "neighbour_seconds": neighbour[1],
        "burst": burst,
        "burst_seconds": load_seconds,
        "processes": {process.name: process.figures for process in watched},
    }


def quiet_jails(server) -> str:
    """The lab's jails without actions: the burst costs fail2ban no process per ban."""
    return "\n".join(
        line
        for line in server.default_jails(3600, 86400).splitlines()
        if not line.startswith("action =")
    )


def busy_neighbour(path: Path, rate: int, seconds: float, watched: list[Watched]) -> None:
    """Write `rate` lines a second to another log of the directory for `seconds`,
    one write() per line like a syslog daemon; record each process's CPU meanwhile."""
    before = {process.name: cpu_seconds(process.pid) for process in watched}
    started = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        for written in range(max(1, int(rate * seconds))):
            os.write(fd, b"Nov 23 12:00:00 host postfix/smtpd[4242]: connect from unknown\n")
            ahead = started + (written + 1) / rate - time.monotonic()
            if ahead > 0.001:
                time.sleep(ahead)
    finally:
        os.close(fd)
    elapsed = time.monotonic() - started
    for process in watched:
        used = cpu_seconds(process.pid) - before[process.name]
        process.figures["neighbour_cpu_percent"] = 100 * used / elapsed


def load(node1, node2, burst: int, watched: list[Watched]) -> float:
    """node1's fail2ban bans `burst` addresses at once; sample memory until node2 has them."""
    ips = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(burst)]
    wanted = set(ips)
    started = time.monotonic()
    with Fail2banClient(str(node1.fail2ban.socket), timeout=60) as origin:
        for start in range(0, len(ips), 500):
            origin.ban("sshd", ips[start : start + 500])
            for process in watched:
                process.sample()
    with Fail2banClient(str(node2.fail2ban.socket), timeout=60) as target:
        deadline = time.monotonic() + LOAD_TIMEOUT
        polled = 0.0
        while True:
            for process in watched:
                process.sample()
            now = time.monotonic()
            if now >= polled + 0.5:
                polled = now
                if wanted <= set(target.banned("cluster")):
                    break
            if now > deadline:
                raise BenchError(f"node2 did not hold all {burst} bans within {LOAD_TIMEOUT:g} s")
            time.sleep(SAMPLE_INTERVAL)
    return time.monotonic() - started


def text(result: dict) -> str:
    """The table of one run."""
    rows = [
        [
            name,
            figures["idle_rss_kb"] / 1024,
            figures["load_peak_rss_kb"] / 1024,
            f"{figures['idle_cpu_percent']:.2f}",
            figures["idle_wakeups_per_s"],
            f"{figures['neighbour_cpu_percent']:.2f}",
        ]
        for name, figures in result["processes"].items()
    ]
    out = table(
        [
            "process",
            "RSS idle MB",
            "peak RSS load MB",
            "CPU idle %",
            "wake-ups/s",
            "CPU % neighbour busy",
        ],
        rows,
    )
    out += (
        f"\nidle: {result['idle_seconds']:g} s with nothing to do; neighbour busy: another log"
        f" in fail2ban.log's directory gets {result['neighbour_rate']} lines/s for"
        f" {result['neighbour_seconds']:g} s; load: node1 bans"
        f" {result['burst']} addresses at once, node2 holds them all after"
        f" {result['burst_seconds']:.1f} s (peak RSS: the highest sampled every"
        f" {SAMPLE_INTERVAL * 1000:g} ms, or the kernel's VmHWM)"
        f"\nsettings off the shipped defaults: the hub's"
        f" {', '.join(f'{key} {value}' for key, value in RATE_LIMITS.items())};"
        " the monitors' start_at beginning (the lab's)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window (60)")
    parser.add_argument("--burst", type=int, default=2000, help="bans of the load (2000)")
    parser.add_argument(
        "--neighbour-rate", type=int, default=1000, help="lines/s of the neighbouring log (1000)"
    )
    parser.add_argument(
        "--neighbour-seconds", type=float, default=10.0, help="how long it is written (10)"
    )
    parser.add_argument("--dir", help="where the nodes live (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.idle_seconds <= 3600 or not 1 <= args.burst <= 60000:
        parser.error("--idle-seconds must be 1..3600 and --burst 1..60000")
    if not 1 <= args.neighbour_rate <= 100000 or not 0.1 <= args.neighbour_seconds <= 600:
        parser.error("--neighbour-rate must be 1..100000 and --neighbour-seconds 0.1..600")
    stop_on_sigterm()
    try:
        result = run(
            args.idle_seconds, args.burst, args.dir, args.neighbour_rate, args.neighbour_seconds
        )
    except BenchError as error:
        print(f"footprint: {error}", file=sys.stderr)
        return 1
    report("footprint", result, text(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
