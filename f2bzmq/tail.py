"""Follow fail2ban's log file: complete new lines, across rotation and restarts.

The monitor's poll loop owns the timing: a watchdog observer of the log's directory
only calls ``wake()`` when a file is created, renamed or deleted there, an inotify
watch on each file we read makes ``fileno()`` readable when it is written, and the
loop calls ``LogFollower.read_lines()``. Nothing here sleeps or loops on a timer.

Each file the log path has named while we followed it is a *generation*. Rotation rule:

* ``read_lines`` compares ``os.stat(path)`` with the identity of the file it reads. When the
  path names a new file, the old generation is *retired*, not closed: with ``create`` rotation
  fail2ban keeps writing to the renamed file until ``fail2ban-client flushlogs``.
* Generations are read strictly in order: a newer one is read only once every older one
  is closed, so lines come out in the order fail2ban wrote them.
* A retired generation is closed once it is at end of file and either the next generation
  already had data before that last drain (fail2ban writes the new file only after its
  last write to the old one, so the old one is complete) or it has been quiet for
  ``rotate_grace`` seconds (fail2ban reopened but logged nothing, or was never told to).
* ``copytruncate`` keeps the inode: a size below what we read, or a changed first line
  (the file regrew past our offset before we looked), means truncation. The rest of the
  old content is read from the rotated copy (found by its first line) before the file
  is read again from 0.
* A restart from a persisted ``LogPosition`` finds its file by inode among the rotated
  siblings (or, after ``copytruncate``, its copy by first line), drains it, then reads the
  current file from 0.
"""

from __future__ import annotations

import bz2
import gzip
import inspect
import logging
import lzma
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

from .generation import NO_POSITION, READ_CHUNK, Generation, LogPosition, head_hash, head_hash_of
from .inotify import FileWatch

log = logging.getLogger(__name__)

COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".Z", ".zip")
# Rotated copies we can read back when logrotate compressed them before we finished them.
DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".lzma": lzma.open}
MAX_DECOMPRESSED = 256 * 1024 * 1024
UNNUMBERED = 1 << 30  # rotation order of a sibling without a .N number
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
        rest = self._find_copy(old_head, current.offset, bytes(current.pending))
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
            copy = self._find_copy(position.head_hash, position.offset, b"")
            if copy is not None:
                copy.complete = True
                self._retired = [copy, *self._rotated_after(copy.name)]
            return
        if current is not None:
            current.close()
        found = self._find_rotated(position)
        if found is None:
            self._current = Generation.open(self._path)
            return
        # The file we stopped in, then every file rotated after it (it may have been
        # rotated more than once while we were down), then the file the path names now.
        generation, name = found
        self._retired = [generation, *self._rotated_after(name)]
        self._current = None

    def _siblings(self, prefix_only: bool, compressed: bool = False) -> list[os.DirEntry[str]]:
        """Uncompressed (or, with ``compressed``, compressed) files next to the log,
        ``path.1`` first, then in order of rotation number."""
        directory, basename = os.path.split(self._path)
        try:
            with os.scandir(directory) as entries:
                found = [
                    entry
                    for entry in entries
                    if entry.name != basename
                    and entry.name.endswith(COMPRESSED_SUFFIXES) == compressed
                    and (entry.name.startswith(basename) or not prefix_only)
                ]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda entry: _rotation_order(basename, entry.name))

    def _find_rotated(self, position: LogPosition) -> tuple[Generation, str] | None:
        """The file rotated away from the path that holds ``position`` and its name: found by
        inode, or by first line among compressed copies (with the rest read into memory)."""
        if position.inode == 0:
            return None
        for entry in self._siblings(prefix_only=False):
            if entry.inode() != position.inode or not entry.is_file(follow_symlinks=False):
                continue
            generation = Generation.open(entry.path)
            if generation is None:
                continue
            if (
                (generation.device, generation.inode) == (position.device, position.inode)
                and generation.size() >= position.offset
                and (position.offset == 0 or generation.head_hash == position.head_hash)
            ):
                log.info("resuming in %s, rotated while we were down", entry.path)
                generation.offset = position.offset
                return generation, entry.name
            generation.close()
        if not position.head_hash:
            return None
        for path, data in self._compressed_siblings():
            if head_hash_of(data) == position.head_hash and len(data) >= position.offset:
                log.info("resuming in %s, rotated and compressed while we were down", path)
                remnant = _remnant(position.head_hash, position.offset, data[position.offset :])
                remnant.device, remnant.inode = position.device, position.inode
                return remnant, os.path.basename(path)
        return None

    def _rotated_after(self, name: str) -> list[Generation]:
        """Whole files rotated later than ``name`` (after .3.gz: .2.gz, then .1), oldest first."""
        basename = os.path.basename(self._path)
        rank = _rotation_order(basename, name)[0]
        if rank == UNNUMBERED:
            return []  # dated names (dateext) say nothing about what came after
        later = []
        for compressed in (False, True):
            for entry in self._siblings(prefix_only=True, compressed=compressed):
                number = _rotation_order(basename, entry.name)[0]
                if 0 < number < rank:
                    later.append((number, entry))
        generations = []
        for _, entry in sorted(later, key=lambda item: -item[0]):
            if entry.name.endswith(COMPRESSED_SUFFIXES):
                data = _decompress(entry.path)
                if data is None:
                    continue
                generation = _remnant(head_hash_of(data), 0, data)
            else:
                generation = Generation.open(entry.path)
                if generation is None:
                    continue
                generation.complete = True
            log.info("also reading %s, rotated while we were down", entry.path)
            generations.append(generation)
        return generations

    def _find_copy(self, head: str, offset: int, pending: bytes) -> Generation | None:
        """The copy copytruncate made: same first line, and our unreturned ``pending`` bytes
        at ``offset``. Positioned at ``offset``; the caller hands it ``pending``."""
        if not head:
            return None
        for entry in self._siblings(prefix_only=True):
            if not entry.is_file(follow_symlinks=False):
                continue
            generation = Generation.open(entry.path)
            if generation is None:
                continue
            if (
                generation.head_hash == head
                and generation.size() >= offset + len(pending)
                and os.pread(generation.fd, len(pending), offset) == pending
            ):
                log.info("reading the rest of the truncated log from %s", entry.path)
                generation.offset = offset
                generation.name = entry.name
                return generation
            generation.close()
        # logrotate may have compressed the copy already (compress without delaycompress).
        for path, data in self._compressed_siblings():
            if (
                head_hash_of(data) == head
                and len(data) >= offset + len(pending)
                and data[offset : offset + len(pending)] == pending
            ):
                log.info("reading the rest of the truncated log from %s", path)
                remnant = _remnant(head, offset, data[offset + len(pending) :])
                remnant.name = os.path.basename(path)
                return remnant
        return None

    def _compressed_siblings(self) -> list[tuple[str, bytes]]:
        """(path, content) of rotated copies we can decompress, newest rotation first."""
        found = []
        for entry in self._siblings(prefix_only=True, compressed=True):
            data = _decompress(entry.path) if entry.is_file(follow_symlinks=False) else None
            if data is not None:
                found.append((entry.path, data))
        return found


def _rotation_order(basename: str, name: str) -> tuple[int, str]:
    """fail2ban.log.1 before fail2ban.log.2.gz before anything not numbered."""
    number = name[len(basename) + 1 :].split(".")[0] if name.startswith(basename + ".") else ""
    return (int(number) if number.isdigit() else UNNUMBERED, name)


def _decompress(path: str) -> bytes | None:
    """A compressed rotated copy's content, or None if we can't read that kind or that file."""
    opener = DECOMPRESSORS.get(os.path.splitext(path)[1])
    if opener is None:
        return None
    try:
        with opener(path, "rb") as handle:
            return handle.read(MAX_DECOMPRESSED)
    except (OSError, EOFError, lzma.LZMAError) as error:
        log.warning("cannot read %s: %s", path, error)
        return None


def _remnant(head: str, offset: int, rest: bytes) -> Generation:
    """A finished generation held in memory: the unread rest of a decompressed copy."""
    generation = Generation(None, 0, 0, head)
    generation.offset = offset
    generation.pending = bytearray(rest)
    generation.complete = True
    return generation


def _ignore() -> None:
    """Default wake: a caller that only polls has nothing to wake."""
