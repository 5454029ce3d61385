"""A small tmpfs for a daemon's folder, filled up on demand: a full disk without a real one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from f2bzmq.lab import run_command

FILLER = ".filler"


def missing_requirements() -> str | None:
    """Why a tmpfs can't be mounted here, or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount and umount are not installed"
    return None


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's size=, e.g. "4m") mounted on folder until the block ends;
    whatever a test left open in it, it is unmounted (lazily if it must)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        run_command("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder))
    except RuntimeError as error:  # root without the right to mount, as in some containers
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    try:
        yield folder
    finally:
        try:
            run_command("umount", str(folder))
        except RuntimeError:
            run_command("umount", "-l", str(folder))


def fill(folder: Path) -> int:
    """Take every free byte of folder's file system with one file; how many it took."""
    taken = 0
    chunk = b"\0" * 65536
    with (folder / FILLER).open("wb", buffering=0) as filler:
        for _ in range(1 << 20):  # 64 GiB at most: a tmpfs is far smaller
            try:
                taken += filler.write(chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                break
        for _ in range(16):  # the last pages a 64 KiB write could not take
            try:
                taken += filler.write(b"\0" * 4096)
            except OSError:
                break
    return taken


def free(folder: Path) -> None:
    """Give the space back."""
    (folder / FILLER).unlink(missing_ok=True)
