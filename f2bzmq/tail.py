"""Follow fail2ban's log file: complete new lines, across rotation and restarts.

The monitor's poll loop owns the timing: a watchdog observer of the log's directory
only calls ``wake()`` when a file is created, renamed or deleted there, an inotify
watch on each file we read makes ``fileno()`` readable when it is written, and the
loop calls ``LogFollower.read_lines()``. Nothing here sleeps or loops on a timer.

Each file the log path has named while we followed it is a *generation* (``generation.py``);
finding the files a rotation left behind is ``rotation.py``'s. Rotation rules:

* ``read_lines`` compares ``os.stat(path)`` with the identity of the file it reads. When the
  path names a new file, the old generation is *retired*, not closed: with ``create`` rotation
  fail2ban keeps writing to the renamed file until ``fail2ban-client flushlogs``.
* Generations are read strictly in order: a newer one is read only once every older one
  is closed, so lines come out in the order fail2ban wrote them.
* A retired generation is closed once it is at end of file and either it is known to be
  complete (the rest of a truncated file, a compressed copy, a copy rotated after the one
  we stopped in), the next generation already had data before that last drain (fail2ban
  writes the new file only after its last write to the old one, so the old one is
  complete) or it has been quiet for ``rotate_grace`` seconds (fail2ban reopened but
  logged nothing, or was never told to).
* ``copytruncate`` keeps the inode: a size below what we read, or a changed first line
  (the file regrew past our offset before we looked), means truncation. The rest of the
  old content is read from the rotated copy before the file is read again from 0; with
  no copy, the bytes we read but had not returned are all there is of it.
* A restart from a persisted ``LogPosition`` resumes in the file at the path if it still
  holds that position. Otherwise it drains the file it stopped in (rotated away, or the
  copy ``copytruncate`` made of it) and every file rotated after that one, then reads
  the current file from 0.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Callable

from watchdog.events import (
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from .generation import NO_POSITION, READ_CHUNK, Generation, LogPosition, head_hash
from .inotify import FileWatch
from .rotation import RotatedFiles

log = logging.getLogger(__name__)

# Directory events that can mean a new file at the log path. Writes are not among them:
# the directory's other files (syslog, fail2ban's database) write far more than fail2ban.log,
# and watchdog would hand each write to our threads; FileWatch sees only the log's own.
DIRECTORY_EVENTS = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent]
# watchdog >= 4 drops the other events in its own thread; with an older one (Debian 12
# ships 2.2) every write in the directory still reaches our handler, which drops it.
WATCHDOG_FILTERS = "event_filter" in inspect.signature(Observer.schedule).parameters


def _end_of_last_line(fd: int, size: int) -> int:
    """Offset just after the last newline before ``size``: where a reader skipping history
    starts, so a line being written right now is still returned whole."""
    end = size
    while end > 0:
        start = max(0, end - READ_CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


class _WakeOnLogEvents(FileSystemEventHandler):
    """Calls wake() for events about the log file or a file rotated from it."""

    def __init__(self, basename: str, wake: Callable[[], None]) -> None:
        super().__init__()
        self._basename = basename
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or not isinstance(event, tuple(DIRECTORY_EVENTS)):
            return
        # Before watchdog 4 only a move has a dest_path.
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path and os.path.basename(os.fsdecode(path)).startswith(self._basename):
                self._wake()
                return


class LogFollower:
    """Returns the complete new lines of one log file, losing and repeating none across
    rotation and restarts. All methods but ``wake`` belong to the caller's thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        position: LogPosition | None = None,
        wake: Callable[[], None] | None = None,
        from_end: bool = False,
        rotate_grace: float = 2.0,
    ) -> None:
        """Resume at ``position`` (persisted by the caller) if given; otherwise start at the
        current end (``from_end``, so a first start does not replay history) or at 0. A file
        that does not exist yet is read from 0 once it appears. ``rotate_grace`` is how long
        a rotated-away file that no newer file has superseded stays open for late lines."""
        self._path = os.path.abspath(os.fspath(path))
        self._wake = wake if wake is not None else _ignore
        self._rotate_grace = rotate_grace
        self._current: Generation | None = None  # what the path names, or where we resume
        self._retired: list[Generation] = []  # older generations still draining, oldest first
        # where the lines we had not read went when the file was truncated or rotated away
        self._rotated = RotatedFiles(os.path.dirname(self._path), os.path.basename(self._path))
        self._position = position if position is not None else NO_POSITION
        self._more = False  # the last read_lines stopped at max_lines with lines left
        self._observer: Observer | None = None
        self._file_watch: FileWatch | None = None
        self._watch_failed = False  # an inotify watch could not be added (warned once)
        self._stopped = False
        # Rotation can lose lines: copytruncate those written between its copy and its
        # truncation, and fail2ban itself a line logged while flushlogs swaps its log handler.
        # The count of rotations finished tells the caller when to check with fail2ban itself.
        self.rotations = 0
        if position is not None:
            self._resume(position)
            return
        self._current = Generation.open(self._path)
        if self._current is not None:
            if from_end:
                self._current.offset = _end_of_last_line(self._current.fd, self._current.size())
            self._position = self._current.position()

    def start(self) -> None:
        """Watch the files we read for writes (see fileno()) and the log's directory for
        files created, renamed or deleted (through watchdog, calling wake())."""
        if self._observer is not None:
            return
        try:
            self._file_watch = FileWatch()
        except OSError as error:  # the user's inotify instances are used up
            self._watch_unavailable(error)
        self._watch_generations()
        handler = _WakeOnLogEvents(os.path.basename(self._path), self._wake)
        self._observer = Observer()
        only = {"event_filter": DIRECTORY_EVENTS} if WATCHDOG_FILTERS else {}
        self._observer.schedule(handler, os.path.dirname(self._path), recursive=False, **only)
        self._observer.start()

    def fileno(self) -> int | None:
        """A descriptor that polls readable when a file we read was written (after start());
        None when inotify could not give us one: then check() finds new lines."""
        return None if self._file_watch is None else self._file_watch.fileno()

    def stop(self) -> None:
        """Stop and join the observer and close the files; position() stays valid."""
        self._stopped = True
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        if self._file_watch is not None:
            self._file_watch.close()
            self._file_watch = None
        for generation in self._generations():
            generation.close()
        self._retired.clear()
        self._current = None

    def position(self) -> LogPosition:
        """Position after the last line returned by read_lines, for the caller to persist."""
        return self._position

    def has_more(self) -> bool:
        """True when the last read_lines stopped at max_lines and more lines are ready."""
        return self._more

    def check(self) -> None:
        """Call wake() if a cheap stat shows something to do: watchdog can drop events."""
        if self._needs_read():
            self._wake()

    def read_lines(self, max_lines: int = 1000) -> list[str]:
        """Up to max_lines new complete lines, without newline, decoded as UTF-8."""
        if max_lines < 1:
            raise ValueError(f"max_lines must be at least 1, not {max_lines}")
        if self._stopped:
            raise RuntimeError("LogFollower.read_lines after stop()")
        if self._file_watch is not None:
            self._file_watch.drain()  # first: a write after this wakes the loop again
        self._follow_path()
        self._detect_truncation()
        self._watch_generations()  # before reading a new file, so no write falls between
        lines: list[bytes] = []
        last: Generation | None = None
        generations = self._generations()
        for index, generation in enumerate(generations):
            successor = generations[index + 1] if index + 1 < len(generations) else None
            # Looked at before the final drain: data in the successor means every write to
            # this generation happened before now and the drain below sees it.
            finished = generation.complete or (successor is not None and successor.has_data())
            taken = generation.take_lines(max_lines - len(lines))
            if taken:
                lines.extend(taken)
                last = generation
            if len(lines) >= max_lines or successor is None:
                break
            quiet_for = time.monotonic() - generation.quiet_since
            if not (finished or quiet_for >= self._rotate_grace):
                break  # it may still get lines, and newer ones must wait for them
            if generation.pending:
                # fail2ban writes whole lines; a cut one could name the wrong address
                log.warning("dropping an unfinished last line of %d bytes", len(generation.pending))
            generation.close()
            self._retired.remove(generation)
            self.rotations += 1
        if last is not None:
            self._position = last.position()
        if self._file_watch is not None:
            self._file_watch.keep_only(
                {(g.device, g.inode) for g in self._generations() if g.fd is not None}
            )
        self._more = len(lines) >= max_lines and any(g.has_unread() for g in self._generations())
        return [line.decode("utf-8", errors="replace") for line in lines]

    def _watch_generations(self) -> None:
        if self._file_watch is None:
            return
        for generation in self._generations():
            if generation.fd is None:
                continue
            try:
                self._file_watch.add(generation.fd, (generation.device, generation.inode))
            except OSError as error:  # out of inotify watches, or no /proc
                self._watch_unavailable(error)

    def _watch_unavailable(self, error: OSError) -> None:
        """check() still finds new lines, at its pace. Said once, not at every read."""
        if not self._watch_failed:
            log.warning(
                "cannot watch %s for writes (%s): new lines are found by the periodic check only",
                self._path,
                error.strerror or error,
            )
        self._watch_failed = True

    def _generations(self) -> list[Generation]:
        current = [self._current] if self._current is not None else []
        return [*self._retired, *current]

    def _stat_path(self) -> os.stat_result | None:
        try:
            return os.stat(self._path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _needs_read(self) -> bool:
        if self._stopped:
            return False
        if self._more or self._retired:
            return True
        st = self._stat_path()
        current = self._current
        if current is None or current.fd is None:
            return st is not None
        if st is not None and (st.st_dev, st.st_ino) != (current.device, current.inode):
            return True
        fst = os.fstat(current.fd)
        return fst.st_size != current.read_offset or fst.st_mtime_ns != current.seen_mtime_ns

    def _follow_path(self) -> None:
        """Switch to the file the path names now, retiring the one we read."""
        st = self._stat_path()
        current = self._current
        if st is None:
            return  # deleted and not recreated yet: keep reading what we hold
        if current is not None and (st.st_dev, st.st_ino) == (current.device, current.inode):
            return
        new = Generation.open(self._path)
        if new is None:
            return
        if current is not None:
            if (new.device, new.inode) == (current.device, current.inode):
                new.close()
                return
            log.info("log rotation detected for %s", self._path)
            current.quiet_since = time.monotonic()
            self._retired.append(current)
        self._current = new

    def _detect_truncation(self) -> None:
        """Notice copytruncate: a size below what we read, or a different first line."""
        current = self._current
        if current is None or current.fd is None:
            return
        st = os.fstat(current.fd)
        current.seen_mtime_ns = st.st_mtime_ns
        old_head = current.head_hash
        now_head = head_hash(current.fd)
        if st.st_size >= current.read_offset and (not old_head or now_head == old_head):
            current.head_hash = now_head
            return
        log.info("log truncation detected for %s", self._path)
        self.rotations += 1
        rest = self._rotated.find_copy(old_head, current.offset, bytes(current.pending))
        if rest is None:
            # no copy: what we already read is all there is of the old content
            rest = Generation(None, current.device, current.inode, old_head)
            rest.offset = current.offset
        if rest.fd is None:
            # A remnant stands for the truncated file: a restart resumes by that identity.
            rest.device, rest.inode = current.device, current.inode
        rest.pending = current.pending + rest.pending
        rest.complete = True
        self._retired.append(rest)
        current.offset = 0
        current.pending = bytearray()
        current.head_hash = now_head

    def _resume(self, position: LogPosition) -> None:
        """Start from a persisted position, draining a file rotated while we were down."""
        current = Generation.open(self._path)
        if current is not None and (current.device, current.inode) == (
            position.device,
            position.inode,
        ):
            self._current = current
            if position.offset == 0 or (
                current.size() >= position.offset and current.head_hash == position.head_hash
            ):
                current.offset = position.offset
                return
            # Truncated (copytruncate), or rotated with the inode reused by the new file.
            log.info("%s was truncated or replaced while we were down", self._path)
            self.rotations += 1
            self._retired = self._rotated.copied_from(position)
            return
        if current is not None:
            current.close()
        # The file we stopped in and those rotated after it; the first read opens the path.
        self._retired = self._rotated.rotated_from(position)
        if not self._retired:
            self._current = Generation.open(self._path)


def _ignore() -> None:
    """Default wake: a caller that only polls has nothing to wake."""
