"""What every benchmark shares: the machine it ran on, percentiles, a table, a JSON file.

A benchmark prints its figures and never fails on speed; it exits non-zero only
when the run itself went wrong (a ban never arrived, a process died).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from pathlib import Path

# The repository: the benchmarks import the package and the tests' helpers (tests.support).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402


class BenchError(Exception):
    """The run itself went wrong (a process died, an event was never answered): says what."""


def machine() -> dict:
    """Cores and the versions that decide the figures."""
    version = subprocess.run(
        ["fail2ban-client", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "fail2ban": version,
    }


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: `share` 0.5 is the median, 0.99 the p99."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def spread(values: list[float]) -> dict:
    """p50/p90/p99/max/mean of a list of figures."""
    return {
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "max": max(values),
        "mean": statistics.fmean(values),
        "count": len(values),
    }


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table; floats get one decimal."""
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    for row in cells:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def report(name: str, result: dict, text: str, json_path: str | None) -> None:
    """Print the machine and the table; write machine + figures as JSON when asked."""
    result = {"benchmark": name, "machine": machine(), **result}
    print(f"# {name}  machine: {json.dumps(result['machine'])}")
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")


def storage(path: str | os.PathLike) -> str:
    """The file system a folder is on (the hub's fsync costs depend on it): 'ext4 /dev/vda'."""
    target = os.path.realpath(path)
    best, found = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, point, kind = line.split()[:3]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, found = point, f"{kind} {device}"
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time per thread name of a process (libzmq names its I/O threads ZMQbg/IO/n)."""
    found: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # a thread that just ended
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        found[name] = found.get(name, 0.0) + seconds
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in kB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def wakeups(pid: int) -> int:
    """Context switches of every thread of a process so far: how often it woke up."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue  # a thread that just ended
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def stop_on_sigterm() -> None:
    """SIGTERM ends the benchmark like Ctrl-C: every `finally` and `with` cleans up."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
