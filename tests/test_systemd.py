"""The shipped systemd units are valid for systemd itself (systemd-analyze verify)."""

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parent.parent / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[unit.name for unit in UNITS])
def test_unit_verifies(tmp_path, unit):
    analyze = shutil.which("systemd-analyze")
    role = unit.stem.removeprefix("fail2ban-")
    program = shutil.which(f"f2bzmq-{role}")
    if analyze is None or program is None:
        pytest.skip("needs systemd-analyze and f2bzmq installed")
    text = unit.read_text()
    assert f"ExecStart=/usr/bin/f2bzmq-{role} " in text and " run\n" in text
    # The unit names the Debian package's path (tests/test_debian_package.py verifies it
    # installed); here, verify it against wherever the program is on this machine.
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"/usr/bin/f2bzmq-{role}", program))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SYSTEMD_LOG_LEVEL": "warning", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_there_is_a_unit_per_role():
    assert [unit.name for unit in UNITS] == [
        "fail2ban-monitor.service",
        "fail2ban-publisher.service",
        "fail2ban-subscriber.service",
    ]
