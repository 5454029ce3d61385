"""ZMTP 3.0 NULL byte by byte, without a socket: what a plain peer may send, and what not."""

import struct

import pytest

from f2bzmq.zmtp import (
    GREETING,
    Message,
    ZmtpError,
    ZmtpPeer,
    command,
    frame,
    message,
    properties,
    ready_command,
)

REQ_READY = command(
    b"READY",
    b"\x0bSocket-Type" + struct.pack(">I", 3) + b"REQ" + b"\x08Identity" + struct.pack(">I", 0),
)


def peer(max_frames: int = 4) -> ZmtpPeer:
    return ZmtpPeer(b"ROUTER", frozenset({b"REQ", b"DEALER"}), 4096, max_frames)


def test_a_req_peer_greets_says_ready_and_sends_a_request_in_any_pieces():
    data = GREETING + REQ_READY + message([b"", b"web1|sshd|Ban|192.0.2.7"])
    for cut in range(1, len(data), 7):
        for step in (1, cut):
            zmtp = peer()
            got = []
            for start in range(0, len(data), step):
                got += zmtp.feed(data[start : start + step])
            assert zmtp.ready
            assert got == [Message([b"", b"web1|sshd|Ban|192.0.2.7"])]


def test_our_greeting_and_ready_name_the_null_mechanism_and_our_type():
    hello = peer().hello()
    assert hello[:10] == b"\xff" + bytes(8) + b"\x7f" and hello[10:12] == b"\x03\x00"
    assert hello[12:32] == b"NULL" + bytes(16) and len(GREETING) == 64
    assert hello[64:] == ready_command(b"ROUTER")
    assert properties(hello[64 + 2 + 6 :]) == {b"socket-type": b"ROUTER"}


def test_a_message_keeps_its_first_frames_and_counts_the_rest():
    zmtp = peer(max_frames=2)
    zmtp.feed(GREETING + REQ_READY)
    got = zmtp.feed(message([b"x" * 4000] * 10_000) + message([b"", b"ok"]))
    assert got == [Message([b"x" * 4000] * 2, 9998), Message([b"", b"ok"])]
    assert len(zmtp.buffer) == 0 and zmtp.frames == []


def test_a_long_frame_header_is_read_and_sizes_are_held_to_the_limit():
    zmtp = peer()
    zmtp.feed(GREETING + REQ_READY)
    assert zmtp.feed(frame(b"y" * 300)) == [Message([b"y" * 300])]
    with pytest.raises(ZmtpError, match="a frame of 4097 bytes"):
        zmtp.feed(frame(b"z" * 4097))
    with pytest.raises(ZmtpError, match="a frame of 18446744073709551615 bytes"):
        peer_ = peer()
        peer_.feed(GREETING + REQ_READY + b"\x02" + b"\xff" * 8)


def test_a_ping_is_answered_and_other_commands_are_handed_on():
    zmtp = peer()
    zmtp.feed(GREETING + REQ_READY)
    zmtp.feed(command(b"PING", b"\x00\x0acontext") + command(b"SUBSCRIBE", b"topic"))
    assert bytes(zmtp.replies) == command(b"PONG", b"context")
    assert zmtp.commands == [(b"SUBSCRIBE", b"topic")]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x01\x00", "no signature"),  # ZMTP 1.0: a frame straight away
        (b"\xff" + bytes(8) + b"\x7f\x01\x05", "ZMTP 1.x: only 3.x"),  # ZMTP 2.0
        (GREETING[:12] + b"CURVE".ljust(20, b"\x00") + GREETING[32:], "mechanism b'CURVE'"),
        (GREETING + message([b"early"]), "a message before the handshake"),
        (GREETING + command(b"PING", b"\x00\x00"), "command b'PING' before READY"),
        (GREETING + REQ_READY + REQ_READY, "READY twice"),
        (GREETING + command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 3) + b"PUB"), "PUB"),
        (GREETING + command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 9)), "cut short"),
        (GREETING + REQ_READY + b"\x08\x00", "reserved frame flags 0x8"),
        (GREETING + b"\x04\x00", "a command without a name"),
    ],
)
def test_what_breaks_the_protocol_closes_the_connection(data, reason):
    with pytest.raises(ZmtpError, match=reason):
        peer().feed(data)
