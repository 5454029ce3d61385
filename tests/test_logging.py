"""The daemons' log file: lines of one loop pass written together, and logrotate followed."""

from __future__ import annotations

import logging
import logging.handlers
import shutil

import pytest

from f2bzmq.runtime import NOTICE, batched_logging, log_lines, log_problems, setup_logging
from tests.support.logrotate import logrotate


@pytest.fixture
def logging_restored():
    """The root logger's handlers and level as they were, after the test set them up."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


@pytest.fixture
def file_log(tmp_path, logging_restored):
    """The publisher's logging set up to a file, as `start` does."""
    path = tmp_path / "publisher.log"
    setup_logging("publisher", str(path), logging.INFO, foreground=False)
    return path, logging.getLogger("f2bzmq.publisher")


BANS = ["[sshd] Ban 192.0.2.1 from node1", "[sshd] Ban 2001:db8::1 from node2; 100% sure"]


def without_time(line: str) -> str:
    return line.split(" ", 2)[2]  # the date and the time of day go


def test_log_lines_writes_the_lines_a_record_each_would(file_log):
    path, log = file_log
    for message in BANS:
        log.log(NOTICE, "%s", message)
    log_lines(log, NOTICE, BANS)
    log_lines(log, logging.DEBUG, ["below the level"])
    log_lines(log, NOTICE, [])
    one, two, three, four = path.read_text().splitlines()
    assert [without_time(three), without_time(four)] == [without_time(one), without_time(two)]
    assert two.endswith("NOTICE  " + BANS[1])
    assert three[:23] == four[:23]  # one record: one time stamp
    with batched_logging():
        log_lines(log, NOTICE, BANS)
        assert len(path.read_text().splitlines()) == 4  # waiting for the end of the pass
    assert len(path.read_text().splitlines()) == 6


def test_log_lines_gives_other_handlers_a_record_each(file_log, capsys):
    _, log = file_log
    kept = logging.handlers.BufferingHandler(capacity=100)  # as syslog would, a record each
    log.addHandler(kept)
    try:
        log_lines(log, NOTICE, BANS)
    finally:
        log.removeHandler(kept)
    assert [(r.levelno, r.getMessage()) for r in kept.buffer] == [(NOTICE, m) for m in BANS]

    setup_logging("publisher", "STDERR", logging.INFO, foreground=True)
    log_lines(log, NOTICE, BANS)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("NOTICE  ")[-1] for line in lines] == BANS
    assert all("f2bzmq.publisher" in line for line in lines)


def test_lines_of_a_batch_are_written_when_it_ends_and_others_at_once(file_log):
    path, log = file_log
    log.info("before")
    assert "before" in path.read_text()
    with batched_logging():
        log.info("[sshd] Ban 192.0.2.1 from node1")
        log.info("[sshd] Ban 192.0.2.2 from node1")
        assert "192.0.2.1" not in path.read_text()  # waiting for the end of the pass
    lines = path.read_text().splitlines()
    assert [line.split("INFO    ")[-1] for line in lines] == [
        "before",
        "[sshd] Ban 192.0.2.1 from node1",
        "[sshd] Ban 192.0.2.2 from node1",
    ]
    log.info("after")
    assert path.read_text().splitlines()[-1].endswith("after")


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="needs logrotate")
def test_after_logrotate_the_lines_go_to_the_new_file_and_none_is_lost(file_log, tmp_path):
    path, log = file_log
    rotate = logrotate(tmp_path, path, "    create 0600\n", rotate=2, timeout=60)
    log.info("first")
    rotate()
    rotated = tmp_path / "publisher.log.1"
    assert rotated.exists() and path.read_text() == ""
    with batched_logging():
        log.info("in a batch")  # the handler still holds the old file: written there
    log.info("next")
    log.info("last")
    # Written once the pass ended, to the file it had open: the rotated one; then reopened.
    assert [line.split("INFO    ")[-1] for line in rotated.read_text().splitlines()] == [
        "first",
        "in a batch",
    ]
    assert [line.split("INFO    ")[-1] for line in path.read_text().splitlines()] == [
        "next",
        "last",
    ]


def test_a_log_that_cannot_be_written_loses_lines_not_the_daemon(capsys, logging_restored):
    """/dev/full fails every write with ENOSPC, as a full disk does: inside and outside a
    batch, the daemon logs on, says it once on stderr, and `status` names the problem."""
    setup_logging("monitor", "/dev/full", logging.INFO, foreground=False)
    log = logging.getLogger("f2bzmq.monitor")
    for number in range(3):
        log.info("line %d", number)
        with batched_logging():
            for ban in range(2000):  # more than the stream's buffer
                log.info("[sshd] Ban 192.0.2.%d", ban % 250)
    (problem,) = log_problems()
    assert problem.startswith("cannot write the log /dev/full: No space left on device (")
    assert capsys.readouterr().err == "cannot write the log /dev/full: No space left on device\n"
    lost = int(problem.split("(")[1].split()[0])
    log_lines(log, NOTICE, BANS)  # written at once, outside a batch: both lost
    (problem,) = log_problems()
    assert problem.endswith(f"({lost + len(BANS)} lines lost so far)")
