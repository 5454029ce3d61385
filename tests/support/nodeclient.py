"""A node as the hub sees it, driven by hand from a test or a benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import zmq
import zmq.auth

from f2bzmq import protocol
from f2bzmq.keys import HUB
from f2bzmq.protocol import BanEvent


class NodeClient:
    """A node as the hub sees it, driven by hand: a monitor's DEALER, a subscriber's SUB and
    snapshot DEALER, with the node's CURVE keys (or none, `secure=False`). Its SUB takes the
    plain update stream, as subscribers before the packed one did, or `stream`."""

    def __init__(
        self,
        ports: list[int],
        keys_dir: Path | None,
        node: str = "node1",
        address: str = "127.0.0.1",
        hub_key: Path | None = None,
        stream: bytes = protocol.PROTOCOL,
    ) -> None:
        self.context = zmq.Context()
        self.stream = stream
        self.keys_dir = keys_dir
        self.hub_key = hub_key or (keys_dir / f"{HUB}.key" if keys_dir else None)
        self.ports = ports
        self.node = node
        self.reports = self.secure(self.context.socket(zmq.DEALER))
        self.reports.connect(f"tcp://{address}:{ports[0]}")
        self.updates = self.secure(self.context.socket(zmq.SUB))
        self.updates.setsockopt(zmq.SUBSCRIBE, stream)
        self.updates.connect(f"tcp://{address}:{ports[1]}")
        self.snapshots_endpoint = f"tcp://{address}:{ports[2]}"
        self.received: list[tuple[dict, BanEvent]] = []  # updates of a message not yet read
        for sock in (self.reports, self.updates):
            sock.rcvtimeo = 10000
            sock.sndtimeo = 10000  # a refused handshake must not block a send for ever
            sock.linger = 0

    def secure(self, sock: zmq.Socket) -> zmq.Socket:
        """A node's CURVE client socket, as the monitor and the subscriber make them."""
        if self.keys_dir is None:
            return sock
        public, secret = zmq.auth.load_certificate(self.keys_dir / f"{self.node}.key_secret")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = zmq.auth.load_certificate(self.hub_key)[0]
        return sock

    def report(self, *frames: bytes) -> tuple[bytes, dict]:
        """Send one report (one event body, or several); the kind and first body of the hub's
        first reply (zmq.Again after rcvtimeo)."""
        self.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT, *frames])
        _, kind, body, *_ = self.reports.recv_multipart()
        return kind, json.loads(body)

    def next_update(self) -> tuple[dict, BanEvent]:
        """The next update, skipping heartbeats; its header carries its own sequence."""
        for _ in range(100):
            if self.received:
                return self.received.pop(0)
            frames = self.updates.recv_multipart()
            assert frames[0] == self.stream
            if frames[1] == protocol.UPDATE:
                header = json.loads(frames[2])
                body = frames[3]
                if self.stream == protocol.PACKED:
                    body = protocol.unpack(body, protocol.MAX_PACKED)
                self.received = [
                    (dict(header, seq=header["seq"] + offset), BanEvent.from_object(item))
                    for offset, item in enumerate(json.loads(body))
                ]
        raise AssertionError("only heartbeats")

    def snapshot(self) -> tuple[dict, list[BanEvent]]:
        """The hub's whole table: the last part's header and every event."""
        sock = self.secure(self.context.socket(zmq.DEALER))
        sock.rcvtimeo = 10000
        sock.linger = 0
        sock.connect(self.snapshots_endpoint)
        sock.send_multipart([protocol.PROTOCOL, protocol.SNAPSHOT_REQUEST, b"{}"])
        events = []
        while True:
            _, kind, header, body = sock.recv_multipart()
            assert kind == protocol.SNAPSHOT
            header = json.loads(header)
            events += [BanEvent.from_object(item) for item in json.loads(body)]
            if header["last"]:
                sock.close()
                return header, events

    def close(self):
        self.context.destroy(linger=0)
