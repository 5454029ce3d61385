"""The node's reporter: fail2ban.log lines in, events to every hub, kept until ACKed.

One poll loop over a wake-up pipe (woken by the log follower's inotify thread and
by signals) and one DEALER per hub (`hubs`). Every event is in the outbox on disk
before it is sent (`reporting`); each hub's `DeliveryWindow` says which events go
now, what the answers mean and when the link starts afresh, and its `Greeting` when
to say hello and whether a hub's state is new, so that the node's bans go to it
again (`delivery`). Nothing here decides; it moves events between the log, the
outbox and the sockets. An outbox that can't be written (a full disk) stops the
reading of the log, not the loop: it goes on by itself when it can.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import zmq

from . import __version__, protocol
from .collection import Collector
from .config import Config, ConfigError
from .control import ControlSocket
from .delivery import (
    ADOPT,
    FRESH,
    REREPORT,
    REREPORT_BANS,
    DeliveryWindow,
    Greeting,
    Row,
)
from .fail2ban_client import Fail2banClient, Fail2banError
from .handshake import HandshakeWatch, KeyCheck, key_problem, log_key_change, pending_problem
from .health import logpath_problems
from .keys import Security
from .metrics import DelayHistogram, counter, gauge, histogram
from .outbox import Outbox
from .protocol import Answer, ProtocolError, Welcome
from .reload import LOGLEVEL, node_keys, reread
from .reporting import STORE_RETRY, LogReporter
from .runtime import (
    NOTICE,
    RateLimitedLog,
    StopSignals,
    Wakeup,
    clock,
    drain,
    log_problems,
    try_send_frames,
)
from .sdnotify import Notifier

log = logging.getLogger("f2bzmq.monitor")

SAFETY_CHECK = 5.0  # inotify can drop events under load: stat the log this often
UNHEALTHY_AFTER = 60.0  # seconds a hub may leave waiting events unACKed before `status` warns
# What a reload changes at once; any other key of [general] and [monitor] needs a restart.
LIVE_KEYS = frozenset({LOGLEVEL, ("monitor", "ignore_jails"), ("monitor", "outbox_max")})


class HubLink:
    """One hub: its DEALER socket, its delivery window, and what the hub answers this
    node's key (the socket's handshakes, read from its monitor)."""

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        security: Security,
        window: DeliveryWindow,
        greeting: Greeting,
    ) -> None:
        self.context = context
        self.security = security
        self.endpoint = endpoint
        self.window = window
        self.greeting = greeting
        self.rebuilding = False  # the node's bans wait in the re-report lane for a new state
        self.pending: str | None = None  # the key's fingerprint while the hub does not accept it
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

    def send(self, reports: list[list[Row]], now: float, lane: int = FRESH) -> None:
        """Each report, never blocking: what the socket can't take goes back to the window.
        Re-reports go as such only to a hub that answers hellos (an older one refuses them)."""
        rereport = lane == REREPORT and self.greeting.welcomed
        for number, report in enumerate(reports):
            message = protocol.encode_report((r[2] for r in report), rereport)
            if not try_send_frames(self.socket, message):
                self.window.unsent(reports[number:], now, lane)
                return

    def hello(self, rebuilt: str | None, node: str, now: float) -> None:
        """Ask the hub's state, saying who this is (for a hub that does not know the key yet);
        a hello that can't leave now waits for HELLO_RETRY."""
        try_send_frames(self.socket, protocol.encode_hello(rebuilt, node, __version__))
        self.greeting.hello_sent(now)


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
                Greeting(self.outbox.hub_state(endpoint)),
            )
            for endpoint in endpoints
        ]
        self.control = control_path and ControlSocket(
            self.context, control_path, self.status, self.reload
        )
        self.started = time.monotonic()
        self.ack_delays = DelayHistogram()  # an event sent -> its ACK, per hub
        # ACKed events the outbox could not forget yet (it can't be written): hub -> ids
        self.unforgotten: dict[str, list[str]] = {}
        self.outbox_failure: str | None = None  # the outbox's failure as last logged
        # Where fail2ban says it writes its log, asked at start and with each safety check
        # (a socket command, never the client program: fail2ban may be down for long).
        self.fail2ban = Fail2banClient(
            config.general.fail2ban_socket, timeout=2.0, client_program=None
        )
        self.log_target: str | None = None  # None: fail2ban could not be asked
        self.log_warnings: list[str] = []  # the log's problems, as last logged
        self.notifier = Notifier()  # systemd's, when the daemon runs under its unit
        self.garbage = Collector()  # its full collections: see collection
        self.reporting.progress = lambda: self.notifier.tick(time.monotonic())

    def run(self) -> None:
        log.log(
            NOTICE,
            "monitor %s started: following %s, reporting to %s, %d events waiting",
            self.node,
            self.config.monitor.logpath,
            " ".join(hub.endpoint for hub in self.hubs),
            self.outbox.depth(),
        )
        self.check_log()
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
        self.notifier.ready(f"{self.outbox.depth()} events waiting")
        while not self.signals.stopping:
            self.notifier.tick(time.monotonic())
            if self.signals.reload:
                self.signals.reload = False
                self.reload()
            self.send_pending()
            self.say_hello()
            ready = dict(poller.poll(self._timeout_ms()))
            self.garbage.tick(time.monotonic(), not ready)
            if self.wakeup.read_fd in ready:
                self.wakeup.drain()
            now = time.monotonic()
            retry = self.reporting.retry_at is not None and now >= self.reporting.retry_at
            if self.wakeup.read_fd in ready or written in ready or retry:
                self.reporting.read(self.send_pending)
            self.reporting.store_failures(self.send_pending)
            if self.control and self.control.socket in ready:
                self.control.handle()
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
                self.check_log()
                next_check = now + SAFETY_CHECK
                self.forget_acked()
                self.outbox.tidy()
            self.watch_outbox()
        self.close()

    def _timeout_ms(self) -> int:
        now = time.monotonic()
        deadlines = [hub.window.next_deadline(now) for hub in self.hubs]
        deadlines += [hub.greeting.next_deadline() for hub in self.hubs]
        deadlines.append(self.reporting.retry_at)
        keepalive = self.notifier.wait(now)
        deadlines.append(None if keepalive is None else now + keepalive)
        deadlines.append(self.reporting.failures_deadline())
        deadline = min([now + SAFETY_CHECK, *(d for d in deadlines if d is not None)])
        return max(1, int((deadline - now) * 1000) + 1)

    def send_pending(self) -> None:
        """Fresh events first; re-reports in the room they leave."""
        now = time.monotonic()
        for hub in self.hubs:
            for lane in (FRESH, REREPORT):
                room = hub.window.room(now, lane)
                while room:
                    cursor = hub.window.lane_cursor(lane)
                    rows = self.outbox.pending(hub.endpoint, room, cursor, lane)
                    hub.send(hub.window.take(rows, now, lane), now, lane)
                    # Rows still in flight after a retry NAK are skipped: read on while rows come.
                    room = hub.window.room(now, lane) if len(rows) == room else 0

    def say_hello(self) -> None:
        """A hello to each hub that is due one, saying whether this node's bans are all
        reported to the hub's state."""
        now = time.monotonic()
        for hub in self.hubs:
            if hub.greeting.hello_due(now):
                known = hub.greeting.known
                waiting = self.outbox.depth(hub.endpoint, REREPORT)
                hub.hello(known if known is not None and not waiting else None, self.node, now)

    def on_pending(self, hub: HubLink, frames: list[bytes], now: float) -> None:
        """The hub does not accept this node's key yet: say so once, and wait."""
        hub.greeting.on_pending(now)
        key_print = protocol.decode_pending(frames)
        if hub.pending != key_print:
            log.warning(
                "%s does not accept this node's key yet (fingerprint %s): an operator admits "
                "it with `nodes accept %s` on a hub; events wait in the outbox",
                hub.endpoint,
                key_print,
                self.node,
            )
        hub.pending = key_print

    def on_welcome(self, hub: HubLink, welcome: Welcome, now: float) -> None:
        """The hub's state: a new one (it lost its table) gets every ban the node holds."""
        if hub.pending is not None:
            hub.pending = None
            log.log(NOTICE, "%s accepts this node's key: sending what waits", hub.endpoint)
            hub.window.restart(now)
        action = hub.greeting.on_welcome(welcome, now)
        if action is None:
            return
        state = {hub.endpoint: welcome.publisher}
        try:
            if action == ADOPT:
                self.outbox.add_rereports([], [hub.endpoint], state)
            else:
                why = f"{hub.endpoint} has a new state {welcome.publisher[:8]}"
                if not self.reporting.report_current_bans(why, [hub.endpoint], state):
                    return  # fail2ban can't say: asked again at the next welcome
        except sqlite3.Error:
            return  # the outbox can't be written: the same, at the next welcome
        hub.greeting.reported(welcome.publisher)
        if action == REREPORT_BANS:
            hub.rebuilding = True
            self.check_rebuilt(hub)
            self.send_pending()

    def check_rebuilt(self, hub: HubLink) -> None:
        """Every ban re-reported to a new state is ACKed: tell the hub at once."""
        if hub.rebuilding and not self.outbox.depth(hub.endpoint, REREPORT):
            hub.rebuilding = False
            hub.greeting.hello_soon()

    def handle_replies(self, hub: HubLink, now: float) -> None:
        answers: list[Answer] = []
        for frames in drain(hub.socket, 10000, max_frames=protocol.MAX_REPORT_EVENTS + 3):
            try:
                if protocol.is_welcome(frames):
                    self.on_welcome(hub, protocol.decode_welcome(frames), now)
                    continue
                if protocol.is_pending(frames):
                    self.on_pending(hub, frames, now)
                    continue
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
            self.forget(hub.endpoint, answered.leave)
            self.check_rebuilt(hub)

    def forget(self, endpoint: str, event_ids: list[str]) -> None:
        """Out of the outbox; kept in memory while it can't be written, and sent again only
        if the monitor restarts meanwhile (a duplicate costs the hub nothing)."""
        try:
            self.outbox.ack(endpoint, event_ids)
        except sqlite3.Error:
            self.unforgotten.setdefault(endpoint, []).extend(event_ids)

    def forget_acked(self) -> None:
        for endpoint, event_ids in list(self.unforgotten.items()):
            try:
                self.outbox.ack(endpoint, event_ids)
            except sqlite3.Error:
                return
            del self.unforgotten[endpoint]

    def watch_outbox(self) -> None:
        """Log once when the outbox can't be written, and once when it can again."""
        failure = self.outbox.failure
        if failure == self.outbox_failure:
            return
        self.outbox_failure = failure
        if failure is not None:
            log.error(
                "cannot write the outbox %s: %s; reading %s stops until it can (trying "
                "every %g s), events read and ACKs wait in memory",
                self.config.state_path("monitor.sqlite3"),
                failure,
                self.config.monitor.logpath,
                STORE_RETRY,
            )
        else:
            log.log(NOTICE, "the outbox can be written again: reading the log on")

    def reload(self) -> dict:
        """SIGHUP or `monitor reload`: the configuration and keys read again."""
        try:
            self.config, reloaded = reread(self.config, "monitor", LIVE_KEYS, log)
        except ConfigError as error:
            return {"failed": str(error)}
        self.reporting.outbox_max = self.config.monitor.outbox_max
        ignored = set(self.config.monitor.ignore_jails) | self.config.sync_jails()
        self.reporting.judge.ignore_jails = frozenset(ignored)
        reloaded.keys = node_keys(self.security, self.config, "monitor")
        log.log(NOTICE, "reloaded %s: %s", self.config.path, reloaded.describe())
        return reloaded.as_dict()

    def check_log(self) -> None:
        """Ask fail2ban where it writes its log; warn once when the log the monitor
        follows is not that one, or does not exist."""
        try:
            self.log_target = self.fail2ban.logtarget()
        except (Fail2banError, OSError):
            self.log_target = None  # the subscriber's status says fail2ban is away
        problems = self.log_problems()
        for problem in problems:
            if problem not in self.log_warnings:
                log.warning("%s", problem)
        if self.log_warnings and not problems:
            log.log(NOTICE, "following fail2ban's log %s", self.config.monitor.logpath)
        self.log_warnings = problems

    def log_problems(self) -> list[str]:
        logpath = os.path.realpath(self.config.monitor.logpath)
        target = self.log_target
        if target is not None and target.startswith("/"):
            target = os.path.realpath(target)
        return logpath_problems(logpath, os.path.exists(logpath), target)

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
        hub.greeting.hello_soon()  # a hello queued on the old socket went with it
        poller.register(hub.socket, zmq.POLLIN)
        poller.register(hub.watch.socket, zmq.POLLIN)

    def status(self) -> dict:
        waiting = {hub.endpoint: self.outbox.depth(hub.endpoint) for hub in self.hubs}
        position = self.reporting.follower.position().offset
        return {
            "role": "monitor",
            "node": self.node,
            "Log file": str(self.config.monitor.logpath),
            "fail2ban writes to": self.log_target or "unknown (fail2ban not reachable)",
            "Log position": position,
            "Events reported": self.reporting.reported,
            "Failures reported": self.reporting.failures_reported,
            "Events ACKed": self.counters["acked"],
            "Events refused": self.counters["refused"],
            "Outbox depth": self.outbox.depth(),
            "Hubs": {
                hub.endpoint: {
                    "waiting": waiting[hub.endpoint],
                    "in flight": len(hub.window.in_flight),
                    "last ACK": clock(hub.last_ack),
                    "state": _state(hub.greeting)
                    if hub.pending is None
                    else f"this node's key is not accepted yet ({hub.pending})",
                    "key": hub.key.state,
                }
                for hub in self.hubs
            },
            "problems": self.problems(waiting),
            "metrics": {
                "events_reported": counter("events read from the log", self.reporting.reported),
                "failures_reported": counter(
                    "failures found in jails a cluster jail counts, reported",
                    self.reporting.failures_reported,
                ),
                "events_acked": counter("hub ACKs received", self.counters["acked"]),
                "events_refused": counter("events a hub refused", self.counters["refused"]),
                "outbox_depth": gauge("events waiting for a hub", waiting, "hub"),
                "log_position": gauge("offset read in the log", position),
                "ack_delay_seconds": histogram("event sent -> hub ACK", self.ack_delays),
            },
        }

    def problems(self, waiting: dict[str, int]) -> list[str]:
        """What makes the monitor unhealthy: fail2ban's log missing or elsewhere, an
        outbox it can't write, a log it can't write, a hub that ACKs nothing while events
        wait."""
        found = self.log_problems()
        if self.outbox.failure is not None:
            unstored = self.reporting.unstored
            found.append(
                f"cannot write the outbox {self.config.state_path('monitor.sqlite3')}: "
                f"{self.outbox.failure}; {len(unstored[0]) if unstored else 0} events read "
                f"wait in memory and {self.config.monitor.logpath} is not read on until it can"
            )
        found += log_problems()
        now = time.time()
        for hub in self.hubs:
            problem = key_problem(hub.key.state, self.security.public_key, self.node)
            if hub.pending is not None:
                problem = pending_problem(hub.pending, self.security.public_key, self.node)
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
        self.notifier.stopping()
        self.reporting.close()
        self.fail2ban.close()
        for hub in self.hubs:
            hub.close()
        if self.control:
            self.control.close()
        self.context.term()
        self.outbox.close()
        self.wakeup.close()
        self.notifier.close()
        log.log(NOTICE, "monitor %s stopped", self.node)


def _state(greeting: Greeting) -> str | None:
    """The hub's state as `status` shows it: its id's first characters, young or not."""
    if greeting.state is None:
        return None
    return greeting.state[:8] + (" (young: rebuilding)" if greeting.young else "")
