"""ZeroMQ's own proxy in a thread: one hub's update stream in, the same bytes out.

`Forwarder` runs libzmq's `zmq_proxy_steerable` between a SUB connected to the hub (both
streams, plain and packed) and the relay's PUB: every message leaves as it came, frame for
frame, sequence numbers, state ids and heartbeats included, and each downstream node gets
the stream it subscribed to from the relay's PUB. It is a one-way device: a PUB takes no
messages from its subscribers, so nothing a node sends to a relay goes further. An
XSUB/XPUB pair would pass every subscription a node sends up to the hub.

The proxy's thread owns both sockets while it runs; the relay's loop talks to it only
through the control pair (statistics, and terminate to renew the SUB).
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading

import zmq

from . import protocol
from .keys import Security

log = logging.getLogger("f2bzmq.relay")

_NUMBERS = itertools.count()
STATISTICS_TIMEOUT_MS = 1000


class Forwarder:
    """The hub's update stream (`endpoint`) forwarded unchanged to `downstream`, a bound PUB."""

    def __init__(
        self, context: zmq.Context, endpoint: str, security: Security, downstream: zmq.Socket
    ) -> None:
        self.context = context
        self.endpoint = endpoint
        self.security = security
        self.downstream = downstream
        # Frames forwarded by the proxies before the running one (each starts from zero).
        self.before = {"messages": 0, "bytes": 0}
        self.thread: threading.Thread | None = None
        self.upstream: zmq.Socket | None = None
        self.control: zmq.Socket | None = None
        self.error: str | None = None  # why the proxy stopped on its own, if it did

    def start(self) -> None:
        address = f"inproc://f2bzmq-forwarder-{next(_NUMBERS)}"
        self.control = self.context.socket(zmq.PAIR)
        self.control.linger = 0
        self.control.bind(address)
        steering = self.context.socket(zmq.PAIR)
        steering.linger = 0
        steering.connect(address)
        upstream = self.context.socket(zmq.SUB)
        self.security.client(upstream)
        upstream.maxmsgsize = protocol.MAX_NODE_FRAME  # what a node takes, at most
        upstream.rcvhwm = 1_000_000
        upstream.linger = 0
        for stream in (protocol.PROTOCOL, protocol.PACKED):
            upstream.setsockopt(zmq.SUBSCRIBE, stream)
        upstream.connect(self.endpoint)
        self.upstream = upstream
        self.error = None
        self.thread = threading.Thread(
            target=self._run, args=(upstream, steering), name="forwarder", daemon=True
        )
        self.thread.start()

    def _run(self, upstream: zmq.Socket, steering: zmq.Socket) -> None:
        try:
            zmq.proxy_steerable(upstream, self.downstream, None, steering)
        except zmq.ZMQError as error:
            if error.errno != zmq.ETERM:
                self.error = str(error)
                log.error("the forwarder of %s stopped: %s", self.endpoint, error)
        finally:
            steering.close()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def statistics(self) -> dict[str, int]:
        """Messages and bytes forwarded so far. libzmq counts frames: a message is 3 or 4."""
        figures = dict(self.before)
        if not self.alive or self.control is None:
            return figures
        self.control.send(b"STATISTICS")
        if not self.control.poll(STATISTICS_TIMEOUT_MS):
            return figures
        # Frontend received messages and bytes, sent messages and bytes; backend likewise.
        counts = [struct.unpack("=Q", frame)[0] for frame in self.control.recv_multipart()]
        figures["messages"] += counts[0]
        figures["bytes"] += counts[1]
        return figures

    def stop(self) -> None:
        """End the proxy and close its SUB; the downstream PUB stays bound."""
        if self.alive and self.control is not None:
            self.before = self.statistics()
            self.control.send(b"TERMINATE")
            self.thread.join(5)
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.upstream is not None and not self.alive:  # the thread owns it while it runs
            self.upstream.close()
            self.upstream = None
        self.thread = None

    def renew(self) -> None:
        """A fresh SUB: libzmq gives a connection up for good after an oversized frame
        or a refused handshake."""
        self.stop()
        self.start()
