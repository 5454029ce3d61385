"""What every daemon's poll loop shares: a wake-up pipe, stop signals, logging, a clock."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import logging.handlers
import os
import resource
import signal
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import zmq

NOTICE = 25  # fail2ban's level between INFO and WARNING
logging.addLevelName(NOTICE, "NOTICE")


class Wakeup:
    """A self-pipe a poll loop watches, so threads and signal handlers can wake it."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        # A full pipe means the loop is awake already.
        with contextlib.suppress(BlockingIOError):
            os.write(self.write_fd, b"x")

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


# Plain ints: pyzmq's send_multipart/recv_multipart combine enum flags for every
# frame, which costs more than the send itself (12 µs against 4 for a 4-frame ACK).
_MORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = _MORE | _NOBLOCK


def drain(
    sock: zmq.Socket, limit: int, copy: bool = True, max_frames: int | None = None
) -> Iterator[list]:
    """Every message waiting on sock, at most `limit`, without blocking: one poll, one batch.
    Each message is a list of bytes, or of zmq.Frame with copy=False, of at most
    `max_frames` frames: the rest of a longer one is read and dropped, so a peer's
    millions of empty frames cost no memory (the kept part is still too long to pass)."""
    recv = sock.recv
    for _ in range(limit):
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return
        frames = [frame]
        while frame.more:  # the other parts of a message arrive with its first
            frame = recv(_NOBLOCK, copy=False)
            if max_frames is None or len(frames) < max_frames:
                frames.append(frame)
        yield [frame.bytes for frame in frames] if copy else frames


def send_frames(sock: zmq.Socket, frames: list) -> None:
    """sock.send_multipart(frames), at a third of its cost."""
    send = sock.send
    for frame in frames[:-1]:
        send(frame, _MORE)
    send(frames[-1])


class Watched:
    """Sockets a poller watches that their owner may replace (a link renews a DEALER the
    hub refused, and its handshake monitor with it): `update()` after anything that may
    have replaced one, wherever that was, swaps it in the poller."""

    def __init__(self, poller: zmq.Poller, sockets: Callable[[], tuple[zmq.Socket, ...]]) -> None:
        self.poller = poller
        self.sockets = sockets
        self.watched = sockets()
        for sock in self.watched:
            poller.register(sock, zmq.POLLIN)

    def update(self) -> None:
        now = self.sockets()
        for old, new in zip(self.watched, now):
            if new is not old:
                self.poller.unregister(old)
                self.poller.register(new, zmq.POLLIN)
        self.watched = now


def try_send_frames(sock: zmq.Socket, frames: list) -> bool:
    """send_frames without blocking: False, and nothing sent, when the socket can't queue.
    A DEALER whose hub refused its CURVE handshake has no pipe left (libzmq does not
    reconnect it) and a blocking send there waits for ever. Only the first frame can
    find the socket full: libzmq counts a message against the high-water mark whole."""
    send = sock.send
    try:
        for frame in frames[:-1]:
            send(frame, _MORE_NOBLOCK)
        send(frames[-1], _NOBLOCK)
    except zmq.Again:
        return False
    return True


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard one and return it. Every connection
    holds a descriptor, a stranger's idle ones too: at systemd's default soft limit of
    1,024 about 1,100 of them left libzmq unable to accept (its I/O thread spinning)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return soft


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give the C heap's free memory back to the system. libzmq holds a message's frames
    in many small allocations until its last frame; freed, they stay in the process
    (a node's message of 4,000 frames of 60 kB left the hub 250 MB larger for good)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class StopSignals:
    """SIGTERM and SIGINT ask the loop to finish its work and stop; SIGHUP asks it to reload."""

    def __init__(self, wakeup: Wakeup) -> None:
        self.stopping = False
        self.reload = False
        self.wakeup = wakeup
        # The kernel may deliver a signal to any thread (zmq's, watchdog's, the key
        # checker's); Python runs the handler in the main thread only once it runs
        # bytecode, and zmq_poll there would sleep on. The C-level handler writes to this
        # pipe from whatever thread took the signal, so the poll wakes at once.
        signal.set_wakeup_fd(wakeup.write_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)

    def _stop(self, signum, frame) -> None:
        self.stopping = True
        self.wakeup.wake()

    def _reload(self, signum, frame) -> None:
        self.reload = True
        self.wakeup.wake()


class RateLimitedLog:
    """Logs a repeated problem once per interval, then says how many were left unsaid."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self.last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args) -> None:
        now = time.monotonic()
        logged_at, suppressed = self.last.get(key, (0.0, 0))
        if logged_at and now - logged_at < self.interval:
            self.last[key] = (logged_at, suppressed + 1)
            return
        if suppressed:
            message += f" ({suppressed} more like it not logged)"
        self.logger.warning(message, *args)
        self.last[key] = (now, 0)
        if len(self.last) > 10000:  # a hostile peer must not grow this without bound
            self.last.clear()


DATABASE_MODE = 0o600  # bans, node names, addresses, the log position: the daemon's own
LOG_MODE = 0o640  # as Debian keeps logs: the owner writes, its group (adm) may read


def private_file(path: str | os.PathLike, mode: int, create: bool = True) -> None:
    """Make the file at `path` (if `create`, when missing) readable by no more than `mode`
    allows: SQLite and logging create files with the umask's mode, 0644 under the usual
    022, so any local user could read them. A mode set narrower by hand is kept."""
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, mode)
    except FileNotFoundError:
        return
    try:
        _narrow(fd, mode)
    finally:
        os.close(fd)


def private_database(path: str | os.PathLike) -> None:
    """An SQLite file, and the WAL and shared-memory files SQLite keeps beside it (it makes
    new ones with the database's mode), DATABASE_MODE; before SQLite opens it."""
    private_file(path, DATABASE_MODE)
    for suffix in ("-wal", "-shm"):
        private_file(f"{os.fspath(path)}{suffix}", DATABASE_MODE, create=False)


def _narrow(fd: int, mode: int) -> None:
    current = stat.S_IMODE(os.fstat(fd).st_mode)
    if current & ~mode:
        with contextlib.suppress(PermissionError):  # not ours to change: leave it
            os.fchmod(fd, current & mode)


PLACEHOLDER = "\0"  # where the message goes in a line formatted once for many


class LinesWriter:
    """What a handler that writes to a stream needs for `log_lines`: many lines of one
    record's level and time stamp, formatted once, in one write."""

    def emit_lines(self, record: logging.LogRecord, messages: Sequence[str]) -> None:
        line = self.format(record)  # record.msg is the placeholder: where a message goes
        if PLACEHOLDER not in line:  # a format without the message: a record each
            for message in messages:
                self.handle(_with_message(record, message))
            return
        head, tail = line.split(PLACEHOLDER, 1)
        end = tail + self.terminator
        with self.lock:
            text = "".join([head + message + end for message in messages])
            self.write_lines(text, len(messages), record)

    def write_lines(self, text: str, lines: int, record: logging.LogRecord) -> None:
        try:
            self.stream.write(text)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class LinesStreamHandler(LinesWriter, logging.StreamHandler):
    """stderr (the journal under systemd), with `log_lines`."""


def _with_message(record: logging.LogRecord, message: str) -> logging.LogRecord:
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args = message, ()
    return copy


def log_lines(logger: logging.Logger, level: int, messages: Sequence[str]) -> None:
    """A line per message at `level`, as logger.log(level, "%s", message) would write
    each, for the cost of one record: the lines share its time stamp. (A record per ban
    was a fifth of the hub's time per event.) A handler that can't write lines at once
    (syslog) gets a record per line."""
    if not messages or logger.disabled or not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, "(lines)", 0, PLACEHOLDER, (), None)
    if not logger.filter(record):
        return
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level < handler.level or not handler.filter(record):
                continue
            if isinstance(handler, LinesWriter):
                handler.emit_lines(record, messages)
            else:
                for message in messages:
                    handler.handle(_with_message(record, message))
        current = current.parent if current.propagate else None


class BatchedFileHandler(LinesWriter, logging.handlers.WatchedFileHandler):
    """A log file that logrotate may move (like WatchedFileHandler), written in batches.

    Every daemon logs a line per ban; writing and flushing each line, and checking with
    a stat whether the file was rotated, cost the hub a third of its time per event. Inside
    `batched_logging()` lines gather in the stream's buffer and are written, with
    one rotation check, when the batch ends: milliseconds later, before the loop
    waits again. Outside a batch (other threads, start-up, errors) every line is
    written at once, as before.

    A file that can't be written (a full disk) never stops the daemon: the lines are
    lost, the daemon's `status` says so (`log_problems`), and the first line written
    again says how many were lost and why.
    """

    batching = False
    failure: str | None = None  # why lines are lost, until one is written again
    lost = 0  # lines lost since

    def _open(self):
        """The log file, created (or kept) LOG_MODE: at start and after each rotation."""
        fd = os.open(
            self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE
        )
        try:
            _narrow(fd, LOG_MODE)
        except BaseException:
            os.close(fd)
            raise
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self.batching:  # no stat per line in a batch; flush() waits
                self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
            logging.StreamHandler.emit(self, record)
        except RecursionError:
            raise
        except Exception as error:
            self._lose(error)

    def handleError(self, record: logging.LogRecord) -> None:
        self._lose(sys.exc_info()[1])

    def write_lines(self, text: str, lines: int, record: logging.LogRecord) -> None:
        try:
            if not self.batching:
                self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(text)
            if self.batching:
                return  # end_batch() flushes
            logging.StreamHandler.flush(self)
        except RecursionError:
            raise
        except Exception as error:
            self._lose(error, lines=lines)
            return
        if self.failure is not None:
            self._say_lost()

    def flush(self) -> None:
        if self.batching:
            return
        try:
            super().flush()
        except Exception as error:
            self._lose(error)
            return
        if self.failure is not None and self.stream is not None:
            self._say_lost()

    def end_batch(self) -> None:
        with self.lock:
            self.batching = False
            self.flush()
            try:
                self.reopenIfNeeded()  # the next line goes to the new file after a rotation
            except Exception as error:
                self._lose(error)

    def close(self) -> None:
        try:
            super().close()
        except OSError as error:  # the last lines, buffered, could not be written
            self._lose(error)

    def retry(self) -> None:
        """Try the file again (for `status`, which must not say a problem is still there
        when the space is back and the daemon has had nothing to log since)."""
        with self.lock:
            if self.failure is None:
                return
            try:
                if self.stream is None:
                    self.stream = self._open()
                logging.StreamHandler.flush(self)
            except Exception as error:
                self._lose(error, lines=0)
                return
            self._say_lost()

    def _lose(self, error: BaseException | None, lines: int = 1) -> None:
        self.lost += lines
        if self.failure is None:
            self.failure = getattr(error, "strerror", None) or str(error)
            # Said once, where a person may see it: a daemon's stderr is the journal.
            print(f"cannot write the log {self.baseFilename}: {self.failure}", file=sys.stderr)
        if self.stream is not None and self.stream.closed:
            self.stream = None  # a close that failed half-way: open the file again next time

    def _say_lost(self) -> None:
        record = logging.makeLogRecord(
            {
                "name": "f2bzmq",
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": f"{self.lost} log lines were lost: {self.failure}",
            }
        )
        self.failure, self.lost = None, 0
        try:
            self.stream.write(self.format(record) + self.terminator)
            super().flush()
        except Exception as error:
            self._lose(error)


def log_problems() -> list[str]:
    """What a daemon's `status` says of its log: a file that can't be written."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, BatchedFileHandler)]
    for handler in handlers:
        handler.retry()
    return [
        f"cannot write the log {handler.baseFilename}: {handler.failure} "
        f"({handler.lost} lines lost so far)"
        for handler in handlers
        if handler.failure is not None
    ]


@contextlib.contextmanager
def batched_logging() -> Iterator[None]:
    """Lines logged inside go out in one write when it ends (file logs only)."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, BatchedFileHandler)]
    for handler in handlers:
        with handler.lock:
            handler.batching = True
    try:
        yield
    finally:
        for handler in handlers:
            handler.end_batch()


def setup_logging(role: str, target: str, level: int, foreground: bool) -> None:
    """fail2ban-like lines to stderr, syslog or a file; 'AUTO' is stderr in the foreground."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # The hub logs a line per ban: skip what no format here uses (the logging HOWTO's
    # "Optimization"): the caller's frame, thread and multiprocessing names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    name = f"f2bzmq.{role}"
    if target == "AUTO":
        target = "STDERR" if foreground else f"/var/log/fail2ban-cluster/{role}.log"
    if target == "STDERR":
        handler: logging.Handler = LinesStreamHandler(sys.stderr)
        fmt = f"%(asctime)s {name:<20} [%(process)d]: %(levelname)-7s %(message)s"
    elif target == "SYSLOG":
        handler = logging.handlers.SysLogHandler("/dev/log")
        fmt = f"{name}[%(process)d]: %(levelname)-7s %(message)s"
    else:
        path = Path(target.replace("{role}", role))
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = BatchedFileHandler(path)
        fmt = f"%(asctime)s {name:<20} [%(process)d]: %(levelname)-7s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    # watchdog logs every inotify event at DEBUG; with our log beside fail2ban's,
    # each of those lines would be another event: keep it to warnings.
    logging.getLogger("watchdog").setLevel(max(level, logging.WARNING))


def clock(epoch: float | None) -> str | None:
    """A unix time as the local 'YYYY-MM-DD HH:MM:SS' fail2ban users read in logs."""
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


# A WAL file grows until a checkpoint copies it into the database; SQLite's default
# (1,000 pages, 4 MiB) then leaves the file at that size, which a nearly full disk may
# not have. Checkpoints every 256 pages and a WAL cut back to 1 MiB after each keep a
# daemon's state folder within a few MiB of its database.
WAL_PAGES = 256
WAL_LIMIT = 1024 * 1024


def bound_wal(db: sqlite3.Connection) -> None:
    """Keep db's write-ahead log small: see WAL_PAGES and WAL_LIMIT."""
    db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
    db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")


def empty_wal(db: sqlite3.Connection) -> None:
    """Copy the write-ahead log into the database and cut it to nothing: an idle daemon
    holds no more space than its data needs, and takes none it could not get back."""
    with contextlib.suppress(sqlite3.Error):  # busy, or no room to copy: next time
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def rollback(db: sqlite3.Connection) -> None:
    """End a transaction that failed, if SQLite has not: a COMMIT that fails for want of
    space leaves it open, and the next BEGIN would fail for that."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.rollback()
