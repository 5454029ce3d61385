"""The node's reporter: fail2ban.log lines in, events to every hub, kept until ACKed.

One poll loop over a wake-up pipe (woken by the log follower's inotify thread and
by signals) and one DEALER per hub (`hubs`). Every event is in the outbox on disk
before it is sent (`reporting`); each hub's `DeliveryWindow` says which events go
now, what the answers mean and when the link starts afresh (`delivery`). Nothing
here decides; it moves events between the log, the outbox and the sockets.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq

from . import protocol
from .config import Config
from .control import ControlSocket
from .delivery import DeliveryWindow, Row
from .handshake import HandshakeWatch, KeyCheck, key_problem, log_key_change
from .keys import Security
from .metrics import DelayHistogram, counter, gauge, histogram
from .outbox import Outbox
from .protocol import Answer, ProtocolError
from .reporting import LogReporter
from .runtime import NOTICE, RateLimitedLog, StopSignals, Wakeup, clock, drain, try_send_frames

log = logging.getLogger("f2bzmq.monitor")

SAFETY_CHECK = 5.0  # inotify can drop events under load: stat the log this often
UNHEALTHY_AFTER = 60.0  # seconds a hub may leave waiting events unACKed before `status` warns


class HubLink:
    """One hub: its DEALER socket, its delivery window, and what the hub answers this
    node's key (the socket's handshakes, read from its monitor)."""

    def __init__(
        self, context: zmq.Context, endpoint: str, security: Security, window: DeliveryWindow
    ) -> None:
        self.context = context
        self.security = security
        self.endpoint = endpoint
        self.window = window
        self.last_ack: float | None = None  # wall clock, for `status`
        self.key = KeyCheck()
        self.socket = self._connect()
        self.watch = HandshakeWatch(self.socket)

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        self.security.client(sock)
        sock.linger = 0
        sock.sndhwm = 100000
        sock.connect(self.endpoint)
        return sock

    def reconnect(self) -> None:
        self.close()
        self.socket = self._connect()
        self.watch = HandshakeWatch(self.socket)

    def close(self) -> None:
        self.watch.close()
        self.socket.close()

    def send(self, reports: list[list[Row]], now: float) -> None:
        """Each report, never blocking: what the socket can't take goes back to the window."""
        for number, report in enumerate(reports):
            if not try_send_frames(self.socket, protocol.encode_report(r[2] for r in report)):
                self.window.unsent(reports[number:], now)
                return


class Monitor:
    """The node's reactor: log lines to the outbox, the outbox to the hubs."""

    def __init__(self, config: Config, control_path: Path | None = None) -> None:
        self.config = config
        self.node = config.node
        config.state_path("").mkdir(parents=True, exist_ok=True)
        endpoints = config.endpoints("report_port")
        self.outbox = Outbox(config.state_path("monitor.sqlite3"), endpoints)
        self.wakeup = Wakeup()  # the log follower's thread and the signals wake the loop
        self.signals = StopSignals(self.wakeup)
        self.reporting = LogReporter(config, self.outbox, self.wakeup.wake)
        self.refusals = RateLimitedLog(log)
        self.counters = {"acked": 0, "refused": 0}
        self.security = security = Security.for_role(config, "monitor")
        self.context = zmq.Context()
        self.hubs = [
            HubLink(
                self.context,
                endpoint,
                security,
                DeliveryWindow(config.monitor.in_flight, config.monitor.ack_timeout),
            )
            for endpoint in endpoints
        ]
        self.control = control_path and ControlSocket(self.context, control_path, self.status)
        self.started = time.monotonic()
        self.ack_delays = DelayHistogram()  # an event sent -> its ACK, per hub

    def run(self) -> None:
        log.log(
            NOTICE,
            "monitor %s started: following %s, reporting to %s, %d events waiting",
            self.node,
            self.config.monitor.logpath,
            " ".join(hub.endpoint for hub in self.hubs),
            self.outbox.depth(),
        )
        follower = self.reporting.follower
        follower.start()
        poller = zmq.Poller()
        poller.register(self.wakeup.read_fd, zmq.POLLIN)
        written = follower.fileno()  # None without inotify: the safety check reads
        if written is not None:
            poller.register(written, zmq.POLLIN)
        for hub in self.hubs:
            poller.register(hub.socket, zmq.POLLIN)
            poller.register(hub.watch.socket, zmq.POLLIN)
        if self.control:
            poller.register(self.control.socket, zmq.POLLIN)
        next_check = 0.0
        self.reporting.read(self.send_pending)
        while not self.signals.stopping:
            self.send_pending()
            ready = dict(poller.poll(self._timeout_ms()))
            if self.wakeup.read_fd in ready:
                self.wakeup.drain()
            if self.wakeup.read_fd in ready or written in ready:
                self.reporting.read(self.send_pending)
            if self.control and self.control.socket in ready:
                self.control.handle()
            now = time.monotonic()
            for hub in self.hubs:
                if hub.watch.socket in ready:
                    for event in hub.watch.events():
                        state = hub.key.on_event(event)
                        if state is not None:
                            log_key_change(log, hub.endpoint, state, self.security)
                if hub.socket in ready:
                    self.handle_replies(hub, now)
                self.check_link(hub, poller, now)
            if now >= next_check:
                follower.check()
                next_check = now + SAFETY_CHECK
        self.close()

    def _timeout_ms(self) -> int:
        now = time.monotonic()
        deadlines = [hub.window.next_deadline(now) for hub in self.hubs]
        deadline = min([now + SAFETY_CHECK, *(d for d in deadlines if d is not None)])
        return max(1, int((deadline - now) * 1000) + 1)

    def send_pending(self) -> None:
        now = time.monotonic()
        for hub in self.hubs:
            room = hub.window.room(now)
            while room:
                rows = self.outbox.pending(hub.endpoint, room, hub.window.cursor)
                hub.send(hub.window.take(rows, now), now)
                # Rows still in flight after a retry NAK are skipped: read on while rows come.
                room = hub.window.room(now) if len(rows) == room else 0

    def handle_replies(self, hub: HubLink, now: float) -> None:
        answers: list[Answer] = []
        for frames in drain(hub.socket, 10000, max_frames=protocol.MAX_REPORT_EVENTS + 3):
            try:
                found, problems = protocol.decode_reply(frames)
            except ProtocolError as error:
                found, problems = [], [str(error)]
            for problem in problems:
                self.refusals.warning(
                    f"reply {hub.endpoint}", "odd reply from %s: %s", hub.endpoint, problem
                )
            answers += found
        answered = hub.window.on_answers(answers, now)
        for answer in answered.stray:
            self.refusals.warning(
                f"nak {hub.endpoint}", "%s refused a report: %s", hub.endpoint, answer.reason
            )
        for answer in answered.throttled:
            self.refusals.warning(
                f"retry {hub.endpoint}", "%s asks to wait: %s", hub.endpoint, answer.reason
            )
        for answer in answered.refused:
            log.error("%s refused event %s: %s; dropped", hub.endpoint, answer.id, answer.reason)
        for delay in answered.delays:
            self.ack_delays.observe(delay)
        if answered.delays:
            hub.last_ack = time.time()
        self.counters["acked"] += answered.acked
        self.counters["refused"] += len(answered.refused)
        if answered.leave:  # ACKed or refused for good: out of the outbox together
            self.outbox.ack(hub.endpoint, answered.leave)

    def check_link(self, hub: HubLink, poller: zmq.Poller, now: float) -> None:
        """A hub that left events waiting past ack_timeout gets a new socket."""
        reset = hub.window.on_tick(now)
        if reset is None:
            return
        # A blocked link has lost its connection for good (libzmq does not reconnect after
        # a failed handshake); a silent one may have a hub that is down or overloaded.
        no_connection = ", and no connection (does it know this node's key?)"
        log.warning(
            "no answer from %s for %.1f s%s: %d events wait in the outbox; retrying",
            hub.endpoint,
            reset.waited,
            no_connection if reset.blocked else "",
            self.outbox.depth(hub.endpoint),
        )
        poller.unregister(hub.socket)
        poller.unregister(hub.watch.socket)
        hub.reconnect()
        poller.register(hub.socket, zmq.POLLIN)
        poller.register(hub.watch.socket, zmq.POLLIN)

    def status(self) -> dict:
        waiting = {hub.endpoint: self.outbox.depth(hub.endpoint) for hub in self.hubs}
        position = self.reporting.follower.position().offset
        return {
            "role": "monitor",
            "node": self.node,
            "Log file": str(self.config.monitor.logpath),
            "Log position": position,
            "Events reported": self.reporting.reported,
            "Events ACKed": self.counters["acked"],
            "Events refused": self.counters["refused"],
            "Outbox depth": self.outbox.depth(),
            "Hubs": {
                hub.endpoint: {
                    "waiting": waiting[hub.endpoint],
                    "in flight": len(hub.window.in_flight),
                    "last ACK": clock(hub.last_ack),
                    "key": hub.key.state,
                }
                for hub in self.hubs
            },
            "problems": self.problems(waiting),
            "metrics": {
                "events_reported": counter("events read from the log", self.reporting.reported),
                "events_acked": counter("hub ACKs received", self.counters["acked"]),
                "events_refused": counter("events a hub refused", self.counters["refused"]),
                "outbox_depth": gauge("events waiting for a hub", waiting, "hub"),
                "log_position": gauge("offset read in the log", position),
                "ack_delay_seconds": histogram("event sent -> hub ACK", self.ack_delays),
            },
        }

    def problems(self, waiting: dict[str, int]) -> list[str]:
        """What makes the monitor unhealthy: a hub that ACKs nothing while events wait."""
        found = []
        now = time.time()
        for hub in self.hubs:
            problem = key_problem(hub.key.state, self.security.public_key, self.node)
            if problem is not None:
                found.append(f"{hub.endpoint}: {problem}")
            silent_since = hub.last_ack or now - (time.monotonic() - self.started)
            if waiting[hub.endpoint] and now - silent_since > UNHEALTHY_AFTER:
                found.append(
                    f"{hub.endpoint}: {waiting[hub.endpoint]} events waiting, "
                    f"no ACK for {now - silent_since:.0f} s"
                )
        return found

    def close(self) -> None:
        self.reporting.close()
        for hub in self.hubs:
            hub.close()
        if self.control:
            self.control.close()
        self.context.term()
        self.outbox.close()
        self.wakeup.close()
        log.log(NOTICE, "monitor %s stopped", self.node)
