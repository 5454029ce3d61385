"""The daemon's local control socket: how `status` and the metrics endpoint ask it.

Each daemon binds a ZeroMQ ROUTER on ipc://RUN_DIR/ROLE.sock, readable and writable by
its owner only, and answers on its own poll loop. An answer is the daemon's figures at
that moment, taken by the loop that owns them, so no lock and no stale file; a daemon
that is alive but stuck does not answer, and `status` says so.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from .config import MAX_SOCKET_PATH
from .runtime import drain

MAX_REQUEST = 64  # bytes; the only requests are short words
STATUS = b"status"
RELOAD = b"reload"  # read the configuration and the keys again (as SIGHUP does)


class ControlError(Exception):
    """The daemon did not answer; str() says why in one line."""


class ControlSocket:
    """The daemon's side: answers `status` with `answer()`, a JSON-able dict, and
    `reload` with `reload()`, what the reload did."""

    def __init__(
        self,
        context: zmq.Context,
        path: Path,
        answer: Callable[[], dict],
        reload: Callable[[], dict] | None = None,
    ) -> None:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ValueError(f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
        self.path = Path(path)
        self.answer = answer
        self.reload = reload
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.socket = context.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.maxmsgsize = MAX_REQUEST
        # Created 0600 under a 077 umask: the status names nodes and endpoints, and no one
        # else should be able to keep the daemon's loop busy answering.
        previous = os.umask(0o077)
        try:
            # libzmq replaces a socket file left by a killed daemon; the PID file has
            # already made sure no other instance of this role is running.
            self.socket.bind(f"ipc://{self.path}")
        finally:
            os.umask(previous)

    def handle(self) -> None:
        """Answer every waiting request (REQ envelope: peer, empty frame, request)."""
        for frames in drain(self.socket, 100):
            if len(frames) != 3 or frames[1]:
                continue  # not a REQ peer: nothing sensible to answer
            if frames[2] == STATUS:
                reply = dict(self.answer(), pid=os.getpid(), time=time.time())
            elif frames[2] == RELOAD and self.reload is not None:
                reply = dict(self.reload(), pid=os.getpid())
            else:
                reply = {"error": f"unknown request {frames[2][:20]!r}; try 'status'"}
            self.socket.send_multipart([frames[0], b"", json.dumps(reply, default=str).encode()])

    def close(self) -> None:
        self.socket.close()
        self.path.unlink(missing_ok=True)


def ask(path: Path, request: bytes = STATUS, timeout: float = 5.0) -> dict:
    """The client's side: one request, one JSON answer, or ControlError."""
    if not Path(path).exists():
        raise ControlError(f"no control socket at {path}")
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(f"ipc://{path}")
        sock.send(request)
        if not sock.poll(int(timeout * 1000)):
            raise ControlError(f"the daemon did not answer on {path} within {timeout:g} s")
        try:
            reply = json.loads(sock.recv())
        except ValueError as error:
            raise ControlError(f"unreadable answer on {path}: {error}") from None
    finally:
        sock.close()
        context.term()
    if not isinstance(reply, dict):
        raise ControlError(f"unreadable answer on {path}: not an object")
    if "error" in reply:
        raise ControlError(f"the daemon refused {request!r}: {reply['error']}")
    return reply
