"""ZMTP 3.0 with the NULL mechanism (rfc.zeromq.org/spec/23), byte by byte, for plain peers.

The hub's old-format endpoints speak it themselves over raw TCP (a ZeroMQ STREAM socket,
see legacy.py): libzmq keeps every frame of a message before the application sees the
first, however many there are, and a stranger's one message of 60,000 frames held half
a gigabyte. Here a peer's bytes are read as they arrive: a message keeps at most
`max_frames` frames of at most `max_frame` bytes and counts the rest, so a connection
holds a few kB whatever it sends. Nothing here touches a socket: bytes in, messages and
bytes to send out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SIGNATURE_START, SIGNATURE_END = 0xFF, 0x7F  # bytes 0 and 9 of a ZMTP 2.0+ greeting
GREETING_SIZE = 64
MECHANISM = b"NULL".ljust(20, b"\x00")
# Ours: signature, version 3.0, NULL, not a server (NULL has none), filler.
GREETING = (
    bytes([SIGNATURE_START]) + bytes(8) + bytes([SIGNATURE_END]) + b"\x03\x00" + MECHANISM
) + bytes(GREETING_SIZE - 32)
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
MAX_COMMAND = 4096  # bytes of a command: a READY holds a few short properties


class ZmtpError(Exception):
    """The peer broke the protocol or a limit: close its connection; the text says why."""


@dataclass(frozen=True)
class Message:
    """A whole message of the peer: its first frames, and how many more it had."""

    frames: list[bytes]
    dropped: int = 0


def command(name: bytes, data: bytes = b"") -> bytes:
    """A command frame: the name's length, the name, its data."""
    return frame(bytes([len(name)]) + name + data, COMMAND)


def ready_command(socket_type: bytes) -> bytes:
    """The NULL mechanism's READY command, naming our socket type."""
    name = b"Socket-Type"
    property_ = bytes([len(name)]) + name + struct.pack(">I", len(socket_type)) + socket_type
    return command(b"READY", property_)


def frame(body: bytes, flags: int = 0) -> bytes:
    """One frame: flags, a size of one byte or eight, the body."""
    if len(body) > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def message(frames: list[bytes]) -> bytes:
    """A message as the bytes of its frames, MORE on every frame but the last."""
    last = len(frames) - 1
    return b"".join(frame(body, MORE if n < last else 0) for n, body in enumerate(frames))


def properties(data: bytes) -> dict[bytes, bytes]:
    """The metadata of a READY command: name (1-byte size), value (4-byte size), repeated."""
    found = {}
    offset = 0
    while offset < len(data):
        size = data[offset]
        name = data[offset + 1 : offset + 1 + size]
        offset += 1 + size
        if offset + 4 > len(data):
            raise ZmtpError("a READY property is cut short")
        (length,) = struct.unpack_from(">I", data, offset)
        value = data[offset + 4 : offset + 4 + length]
        offset += 4 + length
        if len(value) != length or len(name) != size:
            raise ZmtpError("a READY property is cut short")
        found[name.lower()] = value
    return found


class ZmtpPeer:
    """One connection: the greeting, the READY exchange, then the peer's messages.

    `hello()` is what to send first; `feed(data)` takes what the peer sent and returns its
    whole messages, keeping at most `max_frames` frames each; `replies` gathers what the
    protocol itself must answer (a PONG), for the shell to send.
    """

    def __init__(
        self, socket_type: bytes, peer_types: frozenset[bytes], max_frame: int, max_frames: int
    ) -> None:
        self.socket_type = socket_type
        self.peer_types = peer_types  # the socket types that may talk to ours
        self.max_frame = max_frame
        self.max_frames = max_frames
        self.state = "greeting"  # then "ready" (waiting for its READY), then "traffic"
        self.buffer = bytearray()
        self.frames: list[bytes] = []  # the first frames of the message being read
        self.dropped = 0  # and how many more it had so far
        self.commands: list[tuple[bytes, bytes]] = []  # (name, data) of commands since fed
        self.replies = bytearray()

    @property
    def ready(self) -> bool:
        """The handshake is done: messages may flow both ways."""
        return self.state == "traffic"

    def hello(self) -> bytes:
        return GREETING + ready_command(self.socket_type)

    def feed(self, data: bytes) -> list[Message]:
        """The peer's bytes: its whole messages so far; ZmtpError to close the connection."""
        self.buffer += data
        messages: list[Message] = []
        if self.state == "greeting" and not self._greeting():
            return messages
        while True:
            parsed = self._frame()
            if parsed is None:
                return messages
            flags, body = parsed
            if flags & COMMAND:
                self._command(body)
            elif self.state != "traffic":
                raise ZmtpError("a message before the handshake")
            else:
                if len(self.frames) < self.max_frames:
                    self.frames.append(body)
                else:
                    self.dropped += 1
                if not flags & MORE:
                    messages.append(Message(self.frames, self.dropped))
                    self.frames, self.dropped = [], 0

    def _greeting(self) -> bool:
        buffer = self.buffer
        if buffer[:1] and buffer[0] != SIGNATURE_START:
            raise ZmtpError("not a ZMTP 3 peer (no signature)")
        if len(buffer) >= 10 and buffer[9] & 1 != 1:
            raise ZmtpError("not a ZMTP 3 peer (bad signature)")
        if len(buffer) >= 11 and buffer[10] < 3:
            raise ZmtpError(f"ZMTP {buffer[10]}.x: only 3.x is spoken here")
        if len(buffer) < GREETING_SIZE:
            return False
        if bytes(buffer[12:32]) != MECHANISM:
            mechanism = bytes(buffer[12:32]).rstrip(bytes(1))
            raise ZmtpError(f"mechanism {mechanism!r}, not NULL")
        del buffer[:GREETING_SIZE]
        self.state = "ready"
        return True

    def _frame(self) -> tuple[int, bytes] | None:
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        flags = buffer[0]
        if flags & ~(MORE | LONG | COMMAND):
            raise ZmtpError(f"reserved frame flags {flags:#x}")
        if flags & LONG:
            if len(buffer) < 9:
                return None
            (size,) = struct.unpack_from(">Q", buffer, 1)
            start = 9
        else:
            size, start = buffer[1], 2
        limit = MAX_COMMAND if flags & COMMAND else self.max_frame
        if size > limit:
            raise ZmtpError(f"a frame of {size} bytes (at most {limit})")
        if len(buffer) < start + size:
            return None
        body = bytes(buffer[start : start + size])
        del buffer[: start + size]
        return flags, body

    def _command(self, body: bytes) -> None:
        if not body or len(body) < 1 + body[0]:
            raise ZmtpError("a command without a name")
        name, data = body[1 : 1 + body[0]], body[1 + body[0] :]
        if name == b"READY":
            if self.state != "ready":
                raise ZmtpError("READY twice")
            peer_type = properties(data).get(b"socket-type", b"")
            if peer_type not in self.peer_types:
                kind = peer_type.decode(errors="replace")
                raise ZmtpError(f"a {kind!r} socket can't talk to ours")
            self.state = "traffic"
        elif self.state != "traffic":
            raise ZmtpError(f"command {name!r} before READY")
        elif name == b"PING" and len(data) >= 2:
            self.replies += command(b"PONG", data[2:18])  # the context, at most 16 bytes
        else:
            self.commands.append((name, data))  # SUBSCRIBE, CANCEL (ZMTP 3.1) for the shell
