"""One file the log path named (a *generation*), read in whole lines from where we stopped.

A file is known by its device, inode and first line: ``copytruncate`` keeps the inode,
so only the first line tells the old content from the new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass

# The follower's logger: its records keep one name, whichever of its modules logs them.
log = logging.getLogger("f2bzmq.tail")

READ_CHUNK = 256 * 1024
# The identity of a file's content is its first line, capped so that a huge first line
# (or one still being written) hashes the same however much more is appended.
HEAD_BYTES = 4096
# A line longer than this is returned in pieces, so the buffer stays bounded.
MAX_LINE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LogPosition:
    """Where reading stopped: the file's identity and the byte offset after the last complete
    line returned."""

    device: int
    inode: int
    head_hash: str  # sha1 hex of the file's first line; "" while it has none
    offset: int

    def to_json(self) -> str:
        """Encode for the caller's state store."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LogPosition:
        """Decode what ``to_json`` wrote; ValueError if it is not a position."""
        try:
            data = json.loads(text)
            position = cls(
                device=data["device"],
                inode=data["inode"],
                head_hash=data["head_hash"],
                offset=data["offset"],
            )
        except (TypeError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"not a log position: {text!r}") from err
        ints = (position.device, position.inode, position.offset)
        if not all(type(v) is int and v >= 0 for v in ints) or type(position.head_hash) is not str:
            raise ValueError(f"not a log position: {text!r}")
        return position


NO_POSITION = LogPosition(device=0, inode=0, head_hash="", offset=0)


def head_hash(fd: int) -> str:
    """sha1 hex of the file's first line (at most HEAD_BYTES), "" until that line is whole."""
    return head_hash_of(os.pread(fd, HEAD_BYTES, 0))


def head_hash_of(data: bytes) -> str:
    """``head_hash`` of content already in memory, such as a decompressed rotated copy."""
    data = data[:HEAD_BYTES]
    end = data.find(b"\n")
    if end >= 0:
        data = data[: end + 1]
    elif len(data) < HEAD_BYTES:
        return ""
    return hashlib.sha1(data).hexdigest()


class Generation:
    """One file the log path named: its descriptor, identity and read state."""

    def __init__(self, fd: int | None, device: int, inode: int, head: str) -> None:
        self.fd = fd  # None for a truncated remnant whose rest lives only in `pending`
        self.device = device
        self.inode = inode
        self.head_hash = head
        self.offset = 0  # just after the last line returned
        self.pending = bytearray()  # read past `offset`: unreturned whole lines, then a partial
        self.complete = False  # nobody writes to it any more (a copytruncate copy, a remnant)
        self.quiet_since = time.monotonic()  # when it last gave us bytes, for rotate_grace
        self.seen_mtime_ns = 0  # for check(): a rewrite to the same size still changes mtime
        self.name = ""  # a rotated copy's file name, for what was rotated after it

    @classmethod
    def open(cls, path: str) -> Generation | None:
        """Open a regular file from offset 0, or None if it is not there."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ValueError(f"{path} is not a regular file")
        generation = cls(fd, st.st_dev, st.st_ino, head_hash(fd))
        generation.seen_mtime_ns = st.st_mtime_ns
        return generation

    @property
    def read_offset(self) -> int:
        return self.offset + len(self.pending)

    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd is not None else self.read_offset

    def has_data(self) -> bool:
        return self.offset > 0 or bool(self.pending) or self.size() > 0

    def has_unread(self) -> bool:
        return b"\n" in self.pending or self.size() > self.read_offset

    def position(self) -> LogPosition:
        return LogPosition(self.device, self.inode, self.head_hash, self.offset)

    def take_lines(self, limit: int) -> list[bytes]:
        """Up to ``limit`` whole lines, reading in big chunks; a partial last line stays pending."""
        lines: list[bytes] = []
        start = 0
        while True:
            while len(lines) < limit:
                end = self.pending.find(b"\n", start)
                if end < 0:
                    break
                lines.append(bytes(self.pending[start:end]))
                start = end + 1
            if len(lines) >= limit or self.fd is None:
                break
            self._consume(start)
            start = 0
            if len(self.pending) >= MAX_LINE_BYTES:
                log.warning("line longer than %d bytes returned in pieces", MAX_LINE_BYTES)
                lines.append(bytes(self.pending[:MAX_LINE_BYTES]))
                start = MAX_LINE_BYTES
                continue
            chunk = os.pread(self.fd, READ_CHUNK, self.read_offset)
            if not chunk:
                break
            self.pending += chunk
            self.quiet_since = time.monotonic()
        self._consume(start)
        if lines and not self.head_hash and self.fd is not None:
            self.head_hash = head_hash(self.fd)
        return lines

    def _consume(self, count: int) -> None:
        del self.pending[:count]
        self.offset += count

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
