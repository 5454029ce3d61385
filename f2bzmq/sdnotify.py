"""systemd's notification protocol, spoken directly: no library, one datagram a message.

Under a unit of `Type=notify`, systemd gives the daemon a unix datagram socket in
$NOTIFY_SOCKET (a name starting with '@' is in the abstract namespace) and, with
`WatchdogSec=`, the watchdog's period in $WATCHDOG_USEC. The daemon sends `READY=1`
once it serves, so `systemctl start` returns only then and units ordered after it
find it working; and `WATCHDOG=1` at least every half period from its poll loop, so
a loop that is stuck (not only a process that died) gets the daemon restarted.
Outside such a unit nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("f2bzmq")


class Notifier:
    """What the daemon tells systemd. `tick()` from the loop sends the watchdog's
    keep-alive when it is due; `wait()` is how long the loop may sleep before then."""

    def __init__(self, address: str | None = None, watchdog: float | None = None) -> None:
        # A name starting with '@' is an abstract socket: a NUL byte, then the rest.
        self.name = address  # as systemd wrote it, for messages
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self.socket: socket.socket | None = None
        self.interval = watchdog / 2 if self.address and watchdog else None
        self.next_keepalive = 0.0  # time.monotonic() when WATCHDOG=1 is next due
        self.serving = False  # READY=1 said: systemd arms the watchdog only then
        self.failure: str | None = None  # why the last message could not be sent

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asks for, if any. The variables are removed, as
        sd_notify(3) advises, so that no child process talks to systemd in our name."""
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET")
        watchdog = None
        pid = environ.get("WATCHDOG_PID")
        if pid is None or pid == str(os.getpid()):
            try:
                watchdog = int(environ.get("WATCHDOG_USEC", "")) / 1e6
            except ValueError:
                watchdog = None
        if environ is os.environ:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, watchdog if watchdog and watchdog > 0 else None)

    def ready(self, status: str = "") -> None:
        """The daemon serves: its sockets are bound and its loop is about to run."""
        self.serving = True
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def tick(self, now: float) -> None:
        """From the poll loop, with time.monotonic(): WATCHDOG=1 when it is due."""
        if self.interval is not None and self.serving and now >= self.next_keepalive:
            self.next_keepalive = now + self.interval
            self.send("WATCHDOG=1")

    def wait(self, now: float) -> float | None:
        """Seconds the loop may sleep before the next keep-alive is due (None: no watchdog)."""
        if self.interval is None:
            return None
        return max(0.0, self.next_keepalive - now)

    def send(self, message: str) -> None:
        if self.address is None:
            return
        try:
            if self.socket is None:
                self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.socket.sendto(message.encode(), self.address)
        except OSError as error:
            # Said once: systemd's own log says what a missing keep-alive does.
            if self.failure is None:
                log.error("cannot notify systemd at %s: %s", self.name, error)
            self.failure = str(error)
            return
        self.failure = None

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
