"""Where the lines we had not read yet went: the files a rotation left beside the log.

The log follower asks here when the file it reads was truncated, and after a restart when
the file it stopped in no longer holds its position at the log path. Rules for finding it:

* Rotated copies are the files next to the log whose names start with its name, in
  order of their rotation number: ``fail2ban.log.1`` (the newest) before
  ``fail2ban.log.2.gz``, and names without a number (``dateext``) last.
* After ``copytruncate``, the copy is the rotated file with the same first line as the
  truncated one and, just after the last line we returned, the bytes we had read past it.
* After a restart, the file we stopped in is found by its inode among the directory's
  files (after ``copytruncate``, as its copy), or, once logrotate compressed it, by its
  first line among compressed copies. The copies numbered below it were rotated after
  it: they are read too, oldest first. A copy named by date says nothing about what
  came after it.
* Compressed copies (gzip, bzip2, xz, lzma) are read back into memory, since logrotate
  may compress a copy before we finished it; other kinds are skipped.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os

from .generation import Generation, LogPosition, head_hash_of

# The follower's logger: its records keep one name, whichever of its modules logs them.
log = logging.getLogger("f2bzmq.tail")

COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".Z", ".zip")
# Rotated copies we can read back when logrotate compressed them before we finished them.
DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".lzma": lzma.open}
MAX_DECOMPRESSED = 256 * 1024 * 1024
UNNUMBERED = 1 << 30  # rotation order of a sibling without a .N number


class RotatedFiles:
    """The rotated copies of one log file, found as generations to read."""

    def __init__(self, directory: str, basename: str) -> None:
        self._directory = directory  # the log's: copies moved elsewhere (olddir) are not seen
        self._basename = basename  # the log's file name, which a copy's name starts with

    def find_copy(self, head: str, offset: int, pending: bytes) -> Generation | None:
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

    def rotated_from(self, position: LogPosition) -> list[Generation]:
        """The file rotated away from the path that holds ``position``, read from there, then
        every file rotated after it (it may have been rotated more than once while we were
        down), oldest first; [] when no file holds it."""
        found = self._find_rotated(position)
        if found is None:
            return []
        generation, name = found
        return [generation, *self._rotated_after(name)]

    def copied_from(self, position: LogPosition) -> list[Generation]:
        """After a copytruncate while we were down: the copy of the truncated file, read from
        ``position``, then every file rotated after the copy, oldest first; [] without one."""
        copy = self.find_copy(position.head_hash, position.offset, b"")
        if copy is None:
            return []
        copy.complete = True
        return [copy, *self._rotated_after(copy.name)]

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
        rank = _rotation_order(self._basename, name)[0]
        if rank == UNNUMBERED:
            return []  # dated names (dateext) say nothing about what came after
        later = []
        for compressed in (False, True):
            for entry in self._siblings(prefix_only=True, compressed=compressed):
                number = _rotation_order(self._basename, entry.name)[0]
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

    def _siblings(self, prefix_only: bool, compressed: bool = False) -> list[os.DirEntry[str]]:
        """Uncompressed (or, with ``compressed``, compressed) files next to the log,
        ``path.1`` first, then in order of rotation number."""
        try:
            with os.scandir(self._directory) as entries:
                found = [
                    entry
                    for entry in entries
                    if entry.name != self._basename
                    and entry.name.endswith(COMPRESSED_SUFFIXES) == compressed
                    and (entry.name.startswith(self._basename) or not prefix_only)
                ]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda entry: _rotation_order(self._basename, entry.name))

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
