"""The cluster console run as an operator runs it: `python3 -m f2bzmq cluster -c CONFIG …`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from f2bzmq.lab import child_environment


def console(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "f2bzmq", "cluster", "-c", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=child_environment(),
        check=False,
    )


def ok(config: Path, *args: str, stdin: str | None = None) -> str:
    """The command's output; it must succeed."""
    done = console(config, *args, stdin=stdin)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout
