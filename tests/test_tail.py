"""LogFollower on real files, with real watchdog and the real logrotate program."""

from __future__ import annotations

import errno
import gzip
import logging
import os
import re
import select
import shlex
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from f2bzmq.inotify import FileWatch
from f2bzmq.runtime import Wakeup
from f2bzmq.tail import LogFollower, LogPosition
from tests.support.logrotate import logrotate

WAIT = 20.0  # generous bound for anything asynchronous; tests never assert speed


def line(n: int) -> str:
    """A numbered line about as long as fail2ban's."""
    ip = f"10.0.{n // 256}.{n % 256}"
    return f"2024-05-01 12:00:00,000 fail2ban.actions [1]: NOTICE  [sshd] Ban {ip} #{n:06d}"


WHOLE = re.compile(r"#\d{6}$")  # a line written whole ends with its six digits


def number(text: str) -> int:
    return int(text.rsplit("#", 1)[1])


def append(path: Path, *numbers: int) -> None:
    with open(path, "a") as log:
        log.write("".join(line(n) + "\n" for n in numbers))


class Writer:
    """Writes like fail2ban: an O_APPEND descriptor held open, one write() per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, *numbers: int) -> None:
        for n in numbers:
            os.write(self.fd, (line(n) + "\n").encode())

    def reopen(self) -> None:
        """What `fail2ban-client flushlogs` makes fail2ban do."""
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        os.close(self.fd)


def read_all(follower: LogFollower) -> list[int]:
    """Everything readable now, in as many calls as has_more() asks for."""
    numbers = [number(text) for text in follower.read_lines()]
    while follower.has_more():
        numbers += [number(text) for text in follower.read_lines()]
    return numbers


class Wakes:
    """How the monitor waits: on its wake-up pipe (directory events, check()) and on the
    follower's fileno() (writes to the files it reads)."""

    def __init__(self) -> None:
        self.pipe = Wakeup()

    def wait(self, follower: LogFollower, timeout: float) -> bool:
        """True if woken within ``timeout`` seconds."""
        written = follower.fileno()
        watched = [self.pipe.read_fd] + ([written] if written is not None else [])
        ready, _, _ = select.select(watched, [], [], timeout)
        self.pipe.drain()
        return bool(ready)

    @staticmethod
    def written(follower: LogFollower, timeout: float) -> bool:
        """True if a file the follower reads was written within ``timeout`` seconds."""
        return bool(select.select([follower.fileno()], [], [], timeout)[0])

    def close(self) -> None:
        self.pipe.close()


@pytest.fixture
def wakes() -> Iterator[Wakes]:
    wakes = Wakes()
    yield wakes
    wakes.close()


def follow_until(
    follower: LogFollower, wakes: Wakes, done: Callable[[list[int]], bool]
) -> list[int]:
    """A monitor-like loop: read, wait for a wake (bounded), run the safety check."""
    numbers: list[int] = []
    deadline = time.monotonic() + WAIT
    while not done(numbers) and time.monotonic() < deadline:
        numbers += [number(text) for text in follower.read_lines()]
        if not follower.has_more() and not done(numbers):
            wakes.wait(follower, 0.5)
            follower.check()
    return numbers


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "fail2ban.log"


def test_appends_in_order_and_partial_line_held_back(log_path: Path) -> None:
    append(log_path, 1, 2)
    with open(log_path, "a") as log:
        log.write("partial")
    follower = LogFollower(log_path)
    assert read_all(follower) == [1, 2]
    assert follower.read_lines() == []
    with open(log_path, "a") as log:
        log.write(" line\n")
    append(log_path, 3)
    assert follower.read_lines() == ["partial line", line(3)]
    assert follower.position().offset == log_path.stat().st_size
    follower.stop()


def test_invalid_utf8_is_replaced_not_fatal(log_path: Path) -> None:
    log_path.write_bytes(b"caf\xe9\n")
    follower = LogFollower(log_path)
    assert follower.read_lines() == ["caf\ufffd"]
    follower.stop()


def test_from_end_skips_history_but_not_a_line_being_written(log_path: Path) -> None:
    append(log_path, *range(1, 101))
    with open(log_path, "a") as log:
        log.write(line(101)[:10])
    follower = LogFollower(log_path, from_end=True)
    assert follower.read_lines() == []
    with open(log_path, "a") as log:
        log.write(line(101)[10:] + "\n")
    append(log_path, 102)
    assert read_all(follower) == [101, 102]
    follower.stop()


def test_append_wakes_and_reading_quiets(log_path: Path, wakes: Wakes) -> None:
    append(log_path, 1)
    follower = LogFollower(log_path, wake=wakes.pipe.wake)
    assert read_all(follower) == [1]
    follower.start()
    try:
        assert not wakes.wait(follower, 0)
        append(log_path, 2)
        assert wakes.wait(follower, WAIT)
        assert read_all(follower) == [2]
        assert not wakes.wait(follower, 0)  # read_lines consumed the write's event
    finally:
        follower.stop()


def test_writes_to_other_files_in_the_directory_do_not_wake(log_path: Path, wakes: Wakes) -> None:
    append(log_path, 1)
    neighbour = log_path.parent / "syslog"
    follower = LogFollower(log_path, wake=wakes.pipe.wake)
    assert read_all(follower) == [1]
    follower.start()
    try:
        with open(neighbour, "a") as other:
            for n in range(200):
                other.write(f"neighbour {n}\n")
                other.flush()
        assert not wakes.wait(follower, 0.5)
        append(log_path, 2)
        assert wakes.wait(follower, WAIT)
        assert read_all(follower) == [2]
    finally:
        follower.stop()


def test_rotated_file_wakes_until_retired(log_path: Path, wakes: Wakes) -> None:
    writer = Writer(log_path)
    writer.write(1)
    follower = LogFollower(log_path, wake=wakes.pipe.wake, rotate_grace=0.2)
    follower.start()
    try:
        assert read_all(follower) == [1]
        os.rename(log_path, f"{log_path}.1")
        assert wakes.wait(follower, WAIT)  # the rename, through the directory watch
        log_path.touch()
        assert read_all(follower) == []
        writer.write(2)  # a late line to the renamed file, before flushlogs
        assert wakes.written(follower, WAIT)  # its own watch, not the touch's directory event
        assert read_all(follower) == [2]
        writer.reopen()
        writer.write(3)
        assert follow_until(follower, wakes, lambda got: 3 in got) == [3]
        for _ in range(50):  # settle: the touch's directory event, anything else pending
            if not wakes.wait(follower, 0.2):
                break
            read_all(follower)
        # The renamed file is retired: its writes no longer concern us.
        with open(f"{log_path}.1", "a") as old:
            old.write(line(99) + "\n")
        assert not wakes.wait(follower, 0.5)
    finally:
        writer.close()
        follower.stop()


def refuse_inotify_watch(self: FileWatch, fd: int, identity: tuple[int, int]) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")  # fs.inotify.max_user_watches


def refuse_inotify_instance(self: FileWatch) -> None:
    raise OSError(errno.EMFILE, "Too many open files")  # fs.inotify.max_user_instances


@pytest.mark.parametrize(
    "method, refusal, reason",
    [
        ("add", refuse_inotify_watch, "No space left on device"),
        ("__init__", refuse_inotify_instance, "Too many open files"),
    ],
    ids=["no watch left", "no instance left"],
)
def test_without_inotify_the_periodic_check_still_finds_new_lines(
    log_path: Path,
    wakes: Wakes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
    refusal: Callable[..., None],
    reason: str,
) -> None:
    # Using up the user's inotify watches or instances can't be done for this test alone
    # without starving every other process of the machine: the refusal is a stand-in.
    monkeypatch.setattr(FileWatch, method, refusal)
    append(log_path, 1)
    follower = LogFollower(log_path, wake=wakes.pipe.wake)
    with caplog.at_level(logging.WARNING, logger="f2bzmq.tail"):
        follower.start()
        try:
            assert read_all(follower) == [1]
            append(log_path, 2)
            assert not wakes.wait(follower, 0.3)  # nothing tells of the write
            follower.check()  # what the monitor runs every few seconds
            assert wakes.wait(follower, 0)
            assert read_all(follower) == [2]
        finally:
            follower.stop()
    warnings = [r.getMessage() for r in caplog.records if "cannot watch" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0]


def test_file_created_after_start(log_path: Path, wakes: Wakes) -> None:
    follower = LogFollower(log_path, wake=wakes.pipe.wake, from_end=True)
    follower.start()
    try:
        assert follower.read_lines() == []
        append(log_path, 1, 2)
        assert wakes.wait(follower, WAIT)
        assert follow_until(follower, wakes, lambda got: len(got) >= 2) == [1, 2]
    finally:
        follower.stop()


def test_check_wakes_only_on_change(log_path: Path) -> None:
    append(log_path, 1)
    wakes: list[None] = []
    follower = LogFollower(log_path, wake=lambda: wakes.append(None))
    read_all(follower)
    follower.check()
    assert wakes == []
    append(log_path, 2)
    follower.check()
    assert len(wakes) == 1
    follower.stop()


def test_max_lines_and_has_more(log_path: Path) -> None:
    append(log_path, *range(1, 2501))
    follower = LogFollower(log_path)
    first = follower.read_lines(max_lines=1000)
    assert [number(t) for t in first] == list(range(1, 1001))
    assert follower.has_more()
    assert [number(t) for t in follower.read_lines(max_lines=1000)] == list(range(1001, 2001))
    assert follower.has_more()
    assert [number(t) for t in follower.read_lines(max_lines=1000)] == list(range(2001, 2501))
    assert not follower.has_more()
    follower.stop()


def test_position_counts_returned_lines_not_buffered_ones(log_path: Path) -> None:
    append(log_path, 1, 2, 3)
    follower = LogFollower(log_path)
    assert [number(t) for t in follower.read_lines(max_lines=1)] == [1]
    saved = follower.position().to_json()
    follower.stop()
    restarted = LogFollower(log_path, position=LogPosition.from_json(saved))
    assert read_all(restarted) == [2, 3]
    restarted.stop()


def test_position_json_round_trip_and_rejects_garbage() -> None:
    position = LogPosition(device=2049, inode=77, head_hash="ab" * 20, offset=123)
    assert LogPosition.from_json(position.to_json()) == position
    for text in (
        "",
        "[]",
        '{"device": 1}',
        '{"device": -1, "inode": 1, "head_hash": "", "offset": 0}',
    ):
        with pytest.raises(ValueError):
            LogPosition.from_json(text)


def test_resume_after_restart_with_lines_appended_while_down(log_path: Path) -> None:
    append(log_path, 1, 2)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1, 2]
    saved = follower.position().to_json()
    follower.stop()
    append(log_path, 3, 4)
    with open(log_path, "a") as log:
        log.write(line(5)[:7])
    restarted = LogFollower(log_path, position=LogPosition.from_json(saved), from_end=True)
    assert read_all(restarted) == [3, 4]
    with open(log_path, "a") as log:
        log.write(line(5)[7:] + "\n")
    assert read_all(restarted) == [5]
    restarted.stop()


def test_rename_create_rotation_with_late_writes_to_old_file(log_path: Path) -> None:
    writer = Writer(log_path)
    writer.write(1, 2, 3)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1, 2, 3]
    # logrotate's rename + create; fail2ban still writes to the renamed file
    os.rename(log_path, f"{log_path}.1")
    log_path.touch()
    writer.write(4, 5)
    assert read_all(follower) == [4, 5]
    writer.write(6)
    assert read_all(follower) == [6]
    writer.write(7)
    writer.reopen()  # flushlogs
    writer.write(8, 9)
    assert read_all(follower) == [7, 8, 9]
    writer.write(10)
    assert read_all(follower) == [10]
    assert follower.position().inode == log_path.stat().st_ino
    writer.close()
    follower.stop()


def test_rotation_noticed_only_after_both_files_were_written(log_path: Path) -> None:
    writer = Writer(log_path)
    writer.write(1)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1]
    os.rename(log_path, f"{log_path}.1")
    log_path.touch()
    writer.write(2, 3)
    writer.reopen()
    writer.write(4, 5)
    assert read_all(follower) == [2, 3, 4, 5]
    writer.close()
    follower.stop()


def test_max_lines_across_rotation_then_restart(log_path: Path) -> None:
    writer = Writer(log_path)
    writer.write(1)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1]
    os.rename(log_path, f"{log_path}.1")
    log_path.touch()
    writer.write(2, 3)
    writer.reopen()
    writer.write(4, 5)
    assert [number(t) for t in follower.read_lines(max_lines=1)] == [2]
    assert follower.has_more()
    saved = follower.position()
    follower.stop()
    restarted = LogFollower(log_path, position=saved)
    assert read_all(restarted) == [3, 4, 5]
    writer.close()
    restarted.stop()


def test_deleted_file_is_read_to_the_end_then_its_replacement(log_path: Path) -> None:
    writer = Writer(log_path)
    writer.write(1)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1]
    log_path.unlink()
    writer.write(2)
    assert read_all(follower) == [2]
    assert read_all(follower) == []
    writer.reopen()
    writer.write(3)
    assert read_all(follower) == [3]
    writer.close()
    follower.stop()


@pytest.mark.parametrize("rotated_name", ["fail2ban.log.1", "fail2ban.log-20240501"])
def test_rotation_while_stopped_drains_rotated_file_first(
    log_path: Path, rotated_name: str
) -> None:
    append(log_path, 1, 2)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1, 2]
    saved = follower.position()
    follower.stop()
    append(log_path, 3, 4)
    os.rename(log_path, log_path.with_name(rotated_name))
    append(log_path, 5, 6)
    with gzip.open(log_path.with_name("fail2ban.log.2.gz"), "wt") as older:
        older.write(line(0) + "\n")
    restarted = LogFollower(log_path, position=saved)
    assert read_all(restarted) == [3, 4, 5, 6]
    restarted.stop()


def test_rotation_while_stopped_of_a_file_that_was_empty(log_path: Path) -> None:
    log_path.touch()
    follower = LogFollower(log_path)
    assert follower.read_lines() == []
    saved = follower.position()
    follower.stop()
    append(log_path, 1, 2)
    os.rename(log_path, f"{log_path}.1")
    append(log_path, 3)
    restarted = LogFollower(log_path, position=saved)
    assert read_all(restarted) == [1, 2, 3]
    restarted.stop()


def test_rotated_file_gone_while_stopped_reads_new_file_from_start(log_path: Path) -> None:
    append(log_path, 1, 2)
    follower = LogFollower(log_path)
    read_all(follower)
    saved = follower.position()
    follower.stop()
    rotated = log_path.with_name("fail2ban.log.1")
    os.rename(log_path, rotated)
    with open(rotated, "rb") as plain, gzip.open(f"{rotated}.gz", "wb") as packed:
        shutil.copyfileobj(plain, packed)
    rotated.unlink()
    append(log_path, 3, 4)
    restarted = LogFollower(log_path, position=saved)
    assert read_all(restarted) == [3, 4]
    restarted.stop()


def copytruncate(path: Path) -> None:
    """logrotate's copytruncate: copy to .1, then truncate in place."""
    shutil.copyfile(path, f"{path}.1")
    os.truncate(path, 0)


def test_copytruncate_reads_unread_rest_from_the_copy(log_path: Path) -> None:
    writer = Writer(log_path)
    writer.write(1, 2, 3)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1, 2, 3]
    writer.write(4, 5)
    copytruncate(log_path)
    writer.write(6, 7)
    assert read_all(follower) == [4, 5, 6, 7]
    writer.close()
    follower.stop()


def test_copytruncate_detected_when_file_regrew_past_our_offset(log_path: Path) -> None:
    writer = Writer(log_path)
    writer.write(1, 2)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1, 2]
    old_offset = follower.position().offset
    copytruncate(log_path)
    writer.write(*range(10, 20))
    # same inode and a size beyond what we read: only the first line tells it apart
    assert log_path.stat().st_size > old_offset
    assert read_all(follower) == list(range(10, 20))
    writer.close()
    follower.stop()


def test_truncation_without_copy_keeps_lines_already_read(log_path: Path) -> None:
    writer = Writer(log_path)
    writer.write(1, 2, 3)
    follower = LogFollower(log_path)
    assert [number(t) for t in follower.read_lines(max_lines=1)] == [1]
    os.truncate(log_path, 0)
    writer.write(4)
    assert read_all(follower) == [2, 3, 4]
    writer.close()
    follower.stop()


def test_copytruncate_while_stopped(log_path: Path) -> None:
    writer = Writer(log_path)
    writer.write(1, 2)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1, 2]
    saved = follower.position()
    follower.stop()
    writer.write(3)
    copytruncate(log_path)
    writer.write(*range(10, 20))
    restarted = LogFollower(log_path, position=saved)
    assert read_all(restarted) == [3, *range(10, 20)]
    writer.close()
    restarted.stop()


# --- the real logrotate, while a writer appends a burst of numbered lines ---

TOTAL = 5000
AHEAD = 200  # the writer keeps about this close to the follower, so rotations land mid-burst
ROTATIONS = 3


class Progress:
    """Line numbers written and seen, shared by the writer, the rotator and the follower."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.written = 0
        self.seen = 0
        self.aborted = False

    def update(self, written: int | None = None, seen: int | None = None) -> None:
        with self.changed:
            self.written = written if written is not None else self.written
            self.seen = seen if seen is not None else self.seen
            self.changed.notify_all()

    def abort(self) -> None:
        with self.changed:
            self.aborted = True
            self.changed.notify_all()

    def wait_seen(self, at_least: int, timeout: float = WAIT) -> bool:
        with self.changed:
            self.changed.wait_for(lambda: self.seen >= at_least or self.aborted, timeout)
            return self.seen >= at_least

    def require_seen(self, at_least: int) -> None:
        if not self.wait_seen(at_least):
            raise TimeoutError(f"follower did not reach line {at_least}")


def run_in_thread(
    target: Callable[[], None], errors: list[BaseException], progress: Progress
) -> threading.Thread:
    def guarded() -> None:
        try:
            target()
        except BaseException as err:
            errors.append(err)
            progress.abort()

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread


def burst_with_rotations(
    log_path: Path, rotate: Callable[[], None], reopen_flag: Path | None
) -> list[int]:
    """Write TOTAL lines while logrotate runs ROTATIONS times; return what the follower read."""
    progress = Progress()
    rotated = threading.Event()
    errors: list[BaseException] = []
    wakes = Wakes()
    writer = Writer(log_path)
    follower = LogFollower(log_path, wake=wakes.pipe.wake)
    follower.start()

    def write() -> None:
        for n in range(1, TOTAL + 1):
            # postrotate leaves the flag, standing in for `fail2ban-client flushlogs`; until
            # then lines still go to the renamed file
            if reopen_flag is not None and reopen_flag.exists():
                reopen_flag.unlink()
                writer.reopen()
            # Bounded, not required: copytruncate can lose the very lines we would wait for.
            progress.wait_seen(n - AHEAD, timeout=1.0)
            writer.write(n)
            progress.update(written=n)

    def rotations() -> None:
        for i in range(1, ROTATIONS + 1):
            progress.require_seen(i * TOTAL // (ROTATIONS + 1))
            rotate()
            # Line written+2 went to the new file (or after the truncation): once the follower
            # has it, it has moved on, so the next rotation cannot skip a whole file.
            progress.require_seen(min(progress.written + 2, TOTAL))
        rotated.set()

    threads = [run_in_thread(write, errors, progress), run_in_thread(rotations, errors, progress)]
    numbers: list[int] = []
    deadline = time.monotonic() + 3 * WAIT
    try:
        while not errors and time.monotonic() < deadline:
            numbers += [number(text) for text in follower.read_lines()]
            if numbers:
                progress.update(seen=numbers[-1])
            if numbers and numbers[-1] == TOTAL and rotated.is_set():
                break
            if not follower.has_more():
                wakes.wait(follower, 0.5)
                follower.check()
    finally:
        progress.abort()
        for thread in threads:
            thread.join(WAIT)
        follower.stop()
        writer.close()
        wakes.close()
    assert not errors, errors
    assert rotated.is_set()
    return numbers


def lines_on_disk(log_path: Path) -> set[int]:
    numbers: set[int] = set()
    for path in log_path.parent.glob(log_path.name + "*"):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as log:
            # copytruncate tears the file under a writer: the NULs of the hole its next
            # write leaves are no line, nor is a line cut short without its number.
            texts = (text.strip("\x00\n") for text in log)
            numbers.update(number(text) for text in texts if WHOLE.search(text))
    return numbers


def test_logrotate_create_delaycompress_during_burst(tmp_path: Path, log_path: Path) -> None:
    flag = tmp_path / "flushlogs"
    directives = (
        "    create\n    compress\n    delaycompress\n"
        f"    postrotate\n        touch {shlex.quote(str(flag))}\n    endscript\n"
    )
    rotate = logrotate(tmp_path, log_path, directives, ROTATIONS, WAIT)
    numbers = burst_with_rotations(log_path, rotate, flag)
    assert numbers == list(range(1, TOTAL + 1))
    assert lines_on_disk(log_path) == set(numbers)
    assert len(list(tmp_path.glob("fail2ban.log.*.gz"))) == ROTATIONS - 1


def test_logrotate_copytruncate_during_burst(tmp_path: Path, log_path: Path) -> None:
    rotate = logrotate(tmp_path, log_path, "    copytruncate\n", ROTATIONS, WAIT)
    numbers = burst_with_rotations(log_path, rotate, None)
    # copytruncate's own race: a line appended after logrotate copied the end of the file and
    # before it truncated it is in no file. We return it only if we happened to read it in
    # that window. Guaranteed: no line twice, order kept, and every line that exists in the
    # log or one of its copies was returned (the unread rest comes from the copy).
    assert numbers == sorted(set(numbers))
    assert numbers[-1] == TOTAL
    assert lines_on_disk(log_path) <= set(numbers)


def test_copytruncate_with_immediate_compress_reads_the_rest_from_the_gz_copy(
    tmp_path: Path, log_path: Path
) -> None:
    """Without delaycompress the copy is gzipped before we read it: read it decompressed."""
    append(log_path, 1, 2, 3)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1, 2, 3]
    append(log_path, 4, 5, 6)  # written, not read yet: the monitor is a little behind
    logrotate(tmp_path, log_path, "copytruncate\ncompress\n", ROTATIONS, WAIT)()
    append(log_path, 7)
    assert read_all(follower) == [4, 5, 6, 7]
    follower.stop()


def test_down_across_two_compressed_rotations_reads_every_file_in_order(
    tmp_path: Path, log_path: Path
) -> None:
    append(log_path, 1)
    follower = LogFollower(log_path)
    assert read_all(follower) == [1]
    saved = follower.position()
    follower.stop()
    append(log_path, 2)  # unread when the monitor stopped
    rotate = logrotate(tmp_path, log_path, "create\ncompress\ndelaycompress\n", ROTATIONS, WAIT)
    for n in (3, 4):
        rotate()
        append(log_path, n)
    restarted = LogFollower(log_path, position=saved)
    assert read_all(restarted) == [2, 3, 4]
    restarted.stop()
