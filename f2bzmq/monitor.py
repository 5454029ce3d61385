"""The node's reporter: fail2ban.log lines in, events to every hub, kept until ACKed.

One poll loop over a wake-up pipe (woken by the log follower's inotify thread and
by signals) and one DEALER per hub (`reporters`). Every event is in the outbox on
disk before it is sent; a DEALER lets many events be in flight, each ACKed by id,
and a hub that stays silent past `ack_timeout` gets a fresh socket and the events
again, after a capped exponential backoff (a duplicate is harmless: hubs drop
event ids they have seen).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import zmq

from . import protocol
from .config import Config
from .control import ControlSocket
from .keys import Security
from .metrics import DelayHistogram, counter, gauge, histogram
from .outbox import Outbox
from .protocol import ProtocolError
from .reporting import LogReporter
from .runtime import NOTICE, RateLimitedLog, StopSignals, Wakeup, clock, drain, send_frames

log = logging.getLogger("f2bzmq.monitor")

MAX_BACKOFF = 30.0
SAFETY_CHECK = 5.0  # inotify can drop events under load: stat the log this often
UNHEALTHY_AFTER = 60.0  # seconds a hub may leave waiting events unACKed before `status` warns

Row = tuple[int, str, bytes]  # an outbox row: (row number, event id, event body)


def reports(rows: list[Row]) -> Iterator[list[Row]]:
    """Outbox rows, in order, grouped into reports of at most MAX_REPORT_EVENTS events and
    MAX_REPORT bytes (a single event of up to MAX_BODY is always a report of its own)."""
    report: list[Row] = []
    size = 0
    for row in rows:
        if report and (
            len(report) == protocol.MAX_REPORT_EVENTS or size + len(row[2]) > protocol.MAX_REPORT
        ):
            yield report
            report, size = [], 0
        report.append(row)
        size += len(row[2])
    if report:
        yield report


class HubReporter:
    """One hub: its DEALER socket and the events sent to it but not yet answered."""

    def __init__(self, context: zmq.Context, endpoint: str, security: Security) -> None:
        self.context = context
        self.security = security
        self.endpoint = endpoint
        self.in_flight: dict[str, tuple[int, float]] = {}  # event id -> (outbox row, sent at)
        self.cursor = 0  # last outbox row sent
        self.failures = 0  # consecutive timeouts, for the backoff
        self.paused_until = 0.0
        self.last_ack: float | None = None
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        self.security.client(sock)
        sock.linger = 0
        sock.sndhwm = 100000
        sock.connect(self.endpoint)
        return sock

    def reset(self, now: float) -> None:
        """The hub did not answer in time: new socket, resend all after a backoff."""
        self.socket.close()
        self.socket = self._connect()
        self.in_flight.clear()
        self.cursor = 0
        self.failures += 1
        self.paused_until = now + min(MAX_BACKOFF, 0.5 * 2 ** (self.failures - 1))

    def oldest(self) -> float | None:
        return min((sent for _, sent in self.in_flight.values()), default=None)


class Monitor:
    """The node's reactor: log lines to the outbox, the outbox to the hubs."""

    def __init__(self, config: Config, control_path: Path | None = None) -> None:
        self.config = config
        self.node = config.node
        self.ack_timeout = config.monitor.ack_timeout
        self.window = config.monitor.in_flight
        config.state_path("").mkdir(parents=True, exist_ok=True)
        endpoints = config.endpoints("report_port")
        self.outbox = Outbox(config.state_path("monitor.sqlite3"), endpoints)
        self.wakeup = Wakeup()  # the log follower's thread and the signals wake the loop
        self.signals = StopSignals(self.wakeup)
        self.reporting = LogReporter(config, self.outbox, self.wakeup.wake)
        self.refusals = RateLimitedLog(log)
        self.counters = {"acked": 0, "refused": 0}
        security = Security.for_role(config, "monitor")
        self.context = zmq.Context()
        self.hubs = [HubReporter(self.context, endpoint, security) for endpoint in endpoints]
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
                if hub.socket in ready:
                    self.handle_replies(hub)
                oldest = hub.oldest()
                if oldest is not None and now - oldest > self.ack_timeout:
                    log.warning(
                        "no answer from %s for %.1f s: %d events wait in the outbox; retrying",
                        hub.endpoint,
                        now - oldest,
                        self.outbox.depth(hub.endpoint),
                    )
                    poller.unregister(hub.socket)
                    hub.reset(now)
                    poller.register(hub.socket, zmq.POLLIN)
            if now >= next_check:
                follower.check()
                next_check = now + SAFETY_CHECK
        self.close()

    def _timeout_ms(self) -> int:
        now = time.monotonic()
        deadlines = [now + SAFETY_CHECK]
        for hub in self.hubs:
            oldest = hub.oldest()
            if oldest is not None:
                deadlines.append(oldest + self.ack_timeout)
            if hub.paused_until > now:
                deadlines.append(hub.paused_until)
        return max(1, int((min(deadlines) - now) * 1000) + 1)

    def send_pending(self) -> None:
        now = time.monotonic()
        for hub in self.hubs:
            if hub.paused_until > now:
                continue
            room = self.window - len(hub.in_flight)
            if room <= 0:
                continue
            for report in reports(self.outbox.pending(hub.endpoint, room, hub.cursor)):
                send_frames(hub.socket, protocol.encode_report(r[2] for r in report))
                for row, event_id, _ in report:
                    hub.in_flight[event_id] = (row, now)
                hub.cursor = report[-1][0]

    def handle_replies(self, hub: HubReporter) -> None:
        answered: list[str] = []  # ACKed or refused for good: out of the outbox together
        for frames in drain(hub.socket, 10000, max_frames=protocol.MAX_REPORT_EVENTS + 3):
            try:
                answers, problems = protocol.decode_reply(frames)
            except ProtocolError as error:
                problems, answers = [str(error)], []
            for problem in problems:
                self.refusals.warning("reply", "odd reply from %s: %s", hub.endpoint, problem)
            for answer in answers:
                event_id = self.take_reply(hub, answer)
                if event_id is not None:
                    answered.append(event_id)
        if answered:
            self.outbox.ack(hub.endpoint, answered)

    def take_reply(self, hub: HubReporter, answer: protocol.Answer) -> str | None:
        """One event's ACK or NAK; its id when it leaves the outbox (ACKed or refused)."""
        event_id, reason = answer.id, answer.reason
        if event_id not in hub.in_flight:
            if not answer.stored:
                # A whole report refused (an older hub takes one event a report) or a
                # stale answer: the events stay in the outbox and go again after ack_timeout.
                self.refusals.warning("nak", "%s refused a report: %s", hub.endpoint, reason)
            return None
        _, sent = hub.in_flight.pop(event_id)
        self.ack_delays.observe(time.monotonic() - sent)
        hub.failures = 0
        hub.last_ack = time.time()
        if not answer.stored:
            if answer.retry:
                # The hub is throttling this node: send again from the outbox, later.
                self.refusals.warning("retry", "%s asks to wait: %s", hub.endpoint, reason)
                hub.cursor = 0
                hub.paused_until = time.monotonic() + 1.0
                return None
            self.counters["refused"] += 1
            log.error("%s refused event %s: %s; dropped", hub.endpoint, event_id, reason)
        else:
            self.counters["acked"] += 1
        return event_id

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
                    "in flight": len(hub.in_flight),
                    "last ACK": clock(hub.last_ack),
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
            hub.socket.close()
        if self.control:
            self.control.close()
        self.context.term()
        self.outbox.close()
        self.wakeup.close()
        log.log(NOTICE, "monitor %s stopped", self.node)
