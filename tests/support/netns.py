"""Network namespaces for tests and benchmarks whose fail2ban must change a real firewall.

A `Fail2banServer(netns=...)` runs inside one of them, so its ban actions change that
namespace's firewall and nothing of the host's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from f2bzmq.lab import process_alive, run_command, wait_until


class Namespaces:
    """Network namespaces named `<label>-PID-RANDOM-<name>`, for a real ban action to change
    only their firewalls; `close()` ends every process still inside (`ip netns delete`
    alone would leave them running) and removes every one."""

    def __init__(self, label: str = "f2bzmq") -> None:
        self.prefix = f"{label}-{os.getpid()}-{os.urandom(3).hex()}-"
        self.created: list[str] = []

    def add(self, name: str) -> str:
        namespace = self.prefix + name
        run_command("ip", "netns", "add", namespace)
        self.created.append(namespace)
        return namespace

    def close(self) -> None:
        errors = []
        for namespace in reversed(self.created):
            try:
                self._kill_processes(namespace)
                run_command("ip", "netns", "delete", namespace)
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                errors.append(error)  # keep removing the others
        self.created.clear()
        if errors:
            raise errors[0]

    @staticmethod
    def _kill_processes(namespace: str) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(pid) for pid in run_command("ip", "netns", "pids", namespace).split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if wait_until(lambda pids=pids: not any(map(process_alive, pids)), 5):
                return
        raise RuntimeError(f"processes in {namespace} survived SIGKILL")


def netns_holds(namespace: str, pid: int) -> bool:
    """True when process pid runs in the named network namespace (so not in the host's)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{namespace}").st_ino
    except OSError:
        return False
