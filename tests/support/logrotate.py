"""The real logrotate program, run on demand on one log with a configuration of its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from f2bzmq.lab import run_command


def logrotate(
    folder: Path, log: Path, directives: str, rotate: int, timeout: float = 120
) -> Callable[[], None]:
    """A function that runs `logrotate -f` once on log, keeping `rotate` old files, with
    `directives` (lines of the log's block: create, copytruncate, compress, postrotate, …).
    Its configuration and state files live in folder."""
    config = folder / "logrotate.conf"
    config.write_text(f'"{log}" {{\n    rotate {rotate}\n    missingok\n{directives}}}\n')
    config.chmod(0o644)  # logrotate ignores a configuration others can write
    state = folder / "logrotate.state"

    def run() -> None:
        run_command("logrotate", "-s", str(state), "-f", str(config), timeout=timeout)

    return run
