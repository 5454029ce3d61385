"""Writes to the files we read, as one descriptor a poll loop can watch: Linux inotify.

A directory watch (what watchdog gives) reports every write to every file in the
directory, each through watchdog's threads; in /var/log that is every line of syslog,
mail.log and the rest. An inotify watch on the file's own inode reports only its
writes, follows it when logrotate renames it, and needs no thread: the poll loop waits
on ``fileno()`` and calls ``drain()`` before it reads.
"""

from __future__ import annotations

import ctypes
import errno
import os

IN_MODIFY = 0x00000002  # the file was written or truncated

# The C library Python itself runs on: no library search (find_library runs ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def _checked(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class FileWatch:
    """Watches open files for writes; readable (``fileno()``) when one was written."""

    def __init__(self) -> None:
        self._fd = _checked(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
        self._watches: dict[tuple[int, int], int] = {}  # (device, inode) -> watch descriptor

    def fileno(self) -> int:
        return self._fd

    def add(self, fd: int, identity: tuple[int, int]) -> None:
        """Watch the file open as ``fd`` (its (device, inode) is ``identity``): that very
        inode, whatever its name is now. Known identities cost nothing, not even a stat."""
        if identity in self._watches:
            return
        # The /proc link names the open file itself, so a rename between our open and this
        # call cannot make us watch the next file at the path instead.
        path = f"/proc/self/fd/{fd}".encode()
        self._watches[identity] = _checked(
            _libc.inotify_add_watch(self._fd, path, IN_MODIFY), "inotify_add_watch"
        )

    def keep_only(self, identities: set[tuple[int, int]]) -> None:
        """Stop watching every file not in ``identities`` (the ones we closed)."""
        for identity in set(self._watches) - identities:
            # EINVAL: the kernel dropped the watch itself when the deleted file was closed.
            _libc.inotify_rm_watch(self._fd, self._watches.pop(identity))

    def drain(self) -> None:
        """Consume what is waiting, so a level-triggered poll does not report it again."""
        for _ in range(1000):
            try:
                if not os.read(self._fd, 64 * 1024):
                    break
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._watches.clear()
