"""What every benchmark shares: the machine it ran on, percentiles, a table, a JSON file.

A benchmark prints its figures and never fails on speed; it exits non-zero only
when the run itself went wrong (a ban never arrived, a process died).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402


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
