"""The monitor's shell: a real log file, real sockets, the hub played by the test or real."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import zmq

from f2bzmq import protocol
from f2bzmq.config import config_from, load_config
from f2bzmq.control import ControlError, ask
from f2bzmq.lab import Hub, RoleProcess, free_ports, make_keys, wait_until, write_config
from f2bzmq.monitor import Monitor
from f2bzmq.outbox import Outbox
from f2bzmq.reporting import LogReporter

PREFIX = "2026-11-23 10:13:40,972 fail2ban.actions        [17048]: "


def ban_line(ip: str) -> str:
    return f"{PREFIX}NOTICE  [sshd] Ban {ip}\n"


class PlayedHub(threading.Thread):
    """A ROUTER that answers each event as `answers` says (by address, a list of answers
    given in turn), then stops the monitor once every event has had its last answer."""

    def __init__(self, port: int, answers: dict[str, list[str]], monitor: Monitor) -> None:
        super().__init__(daemon=True)
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(f"tcp://127.0.0.1:{port}")
        self.answers = {ip: list(said) for ip, said in answers.items()}
        self.monitor = monitor
        self.received: Counter[str] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 15
            while any(self.answers.values()) and time.monotonic() < deadline:
                if self.router.poll(100):
                    self.answer(self.router.recv_multipart())
        except BaseException as error:  # reported by the test
            self.error = error
        finally:
            # Stopped once it has read the last answers: a stop that overtook them on the
            # way would leave them uncounted.
            counted = lambda: sum(self.monitor.counters.values()) >= len(self.answers)  # noqa: E731
            wait_until(counted, 5, 0.01)
            self.monitor.signals.stopping = True  # as SIGTERM does
            self.monitor.wakeup.wake()
            self.router.close()
            self.context.term()

    def answer(self, frames: list[bytes]) -> None:
        peer, *report = frames
        if protocol.is_hello(report):
            return  # a hub older than hellos would refuse it; this one stays silent
        acks, naks = [], []
        for body in protocol.decode_report(report):
            event = json.loads(body)
            self.received[event["ip"]] += 1
            said = self.answers[event["ip"]].pop(0)
            if said == "ack":
                acks.append(protocol.ack_body(event["id"], "banned"))
            else:
                naks.append(protocol.nak_body(event["id"], said, retry=said == "wait"))
        for reply in protocol.encode_replies(acks, naks):
            self.router.send_multipart([peer, *reply])


def test_the_monitor_acts_on_each_answer_of_a_hub(tmp_path: Path, own_signals) -> None:
    port = free_ports(1)[0]
    fail2ban_log = tmp_path / "fail2ban.log"
    fail2ban_log.write_text("".join(ban_line(f"192.0.2.{n}") for n in (1, 2, 3)))
    config = config_from(
        {
            "general": {
                "node": "node1",
                "insecure": "true",
                "report_port": str(port),
                "state_dir": str(tmp_path / "state"),
                "run_dir": str(tmp_path / "run"),
                "fail2ban_socket": str(tmp_path / "no-fail2ban.sock"),
            },
            "monitor": {"logpath": str(fail2ban_log), "start_at": "beginning"},
        }
    )
    monitor = Monitor(config)
    hub = PlayedHub(
        port,
        {"192.0.2.1": ["ack"], "192.0.2.2": ["no such jail"], "192.0.2.3": ["wait", "ack"]},
        monitor,
    )
    hub.start()
    started = time.monotonic()
    monitor.run()
    hub.join(5)
    assert hub.error is None
    assert hub.answers == {"192.0.2.1": [], "192.0.2.2": [], "192.0.2.3": []}
    # The throttled event came again, after the pause a retry NAK asks for; none other did.
    assert hub.received == {"192.0.2.1": 1, "192.0.2.2": 1, "192.0.2.3": 2}
    assert time.monotonic() - started >= 1.0
    assert monitor.counters == {"acked": 2, "refused": 1}
    assert monitor.reporting.reported == 3
    outbox = Outbox(config.state_path("monitor.sqlite3"), config.endpoints("report_port"))
    assert outbox.depth() == 0  # ACKed and refused events alike have left it
    outbox.close()


def monitor_status(config: Path) -> dict | None:
    try:
        return ask(load_config(str(config)).control_path("monitor"), timeout=2)
    except ControlError:
        return None


def test_a_hub_that_refuses_the_nodes_key_does_not_freeze_the_monitor(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys", ["node1"])
    withheld = tmp_path / "node1.key"
    (keys / "nodes" / "node1.key").rename(withheld)
    ports = free_ports(3)
    hub = Hub(tmp_path, ports, keys_dir=keys)
    directory = tmp_path / "node1"
    directory.mkdir()
    fail2ban_log = directory / "fail2ban.log"
    fail2ban_log.write_text("")
    config = directory / "fail2ban-cluster.conf"
    write_config(
        config,
        "node1",
        ports,
        directory,
        keys,
        general={"fail2ban_socket": str(directory / "no-fail2ban.sock")},
        monitor={"logpath": str(fail2ban_log), "ack_timeout": "1"},
    )
    monitor = RoleProcess("monitor", config, directory)
    hub.publisher.start()
    try:
        assert wait_until(lambda: ask_hub(hub) is not None, 15)
        monitor.start()
        assert wait_until(lambda: monitor_status(config) is not None, 15), monitor.log_text()
        time.sleep(0.5)  # the hub refuses the handshake: libzmq drops the DEALER's only pipe
        with fail2ban_log.open("a") as log:
            log.write(ban_line("192.0.2.7"))

        def reported() -> bool:
            status = monitor_status(config)
            return status is not None and status["Events reported"] == 1

        # A send that blocked would stop the loop before it counts the event, for good.
        assert wait_until(reported, 10), monitor.log_text()
        for _ in range(3):  # through resets of the link, every second
            time.sleep(1)
            status = monitor_status(config)
            assert status is not None and status["Outbox depth"] == 1
        withheld.rename(keys / "nodes" / "node1.key")
        hub.publisher.process.send_signal(signal.SIGHUP)

        def delivered() -> bool:
            status = monitor_status(config)
            return status is not None and (status["Events ACKed"], status["Outbox depth"]) == (1, 0)

        assert wait_until(delivered, 30, 0.2), monitor_status(config)
        assert monitor.stop() == 0
    finally:
        if monitor.alive():
            monitor.stop()
        hub.publisher.stop()


def ask_hub(hub: Hub) -> dict | None:
    try:
        return ask(load_config(str(hub.config)).control_path("publisher"), timeout=2)
    except ControlError:
        return None


def test_lines_the_outbox_cannot_store_wait_in_memory_and_go_in_once_it_can(tmp_path: Path):
    """A full disk, as SQLite reports it when the file may not grow (max_page_count): the
    events read wait, no line is read twice or lost, and nothing is retried once stored."""
    fail2ban_log = tmp_path / "fail2ban.log"
    fail2ban_log.write_text("".join(ban_line(f"192.0.2.{n % 250}") for n in range(1500)))
    config = config_from(
        {
            "general": {"node": "node1", "insecure": "true"},
            "monitor": {"logpath": str(fail2ban_log), "start_at": "beginning"},
        }
    )
    outbox = Outbox(tmp_path / "monitor.sqlite3", ["tcp://127.0.0.1:5690"])
    reporter = LogReporter(config, outbox, lambda: None)
    try:
        pages = outbox.db.execute("PRAGMA page_count").fetchone()[0]
        outbox.db.execute(f"PRAGMA max_page_count={pages}")
        stored: list[int] = []
        reporter.read(lambda: stored.append(outbox.depth()))
        assert (stored, outbox.depth(), outbox.position()) == ([], 0, None)
        assert reporter.unstored is not None and reporter.retry_at is not None
        assert outbox.failure == "database or disk is full"
        outbox.db.execute(f"PRAGMA max_page_count={10**6}")
        reporter.read(lambda: stored.append(outbox.depth()))
        assert outbox.depth() == reporter.reported == 1500 and stored[-1] == 1500
        assert (reporter.unstored, reporter.retry_at, outbox.failure) == (None, None, None)
    finally:
        reporter.close()
        outbox.close()


def found_line(ip: str) -> str:
    found = f"[sshd] Found {ip} - 2026-11-23 10:13:39"
    return f"{PREFIX[:24]}fail2ban.filter         [17048]: INFO    {found}\n"


def test_failures_of_a_cluster_jail_go_in_reports_with_the_log_position_after_them(tmp_path):
    """A hundred failure lines of three addresses are three counts in one report; while
    they wait in their window the stored position stays before them; a ban stored takes
    them along."""
    fail2ban_log = tmp_path / "fail2ban.log"
    fail2ban_log.write_text("")
    config = config_from(
        {
            "general": {"node": "node1", "insecure": "true"},
            "monitor": {"logpath": str(fail2ban_log), "start_at": "beginning"},
            "detect:sshd": {"enabled": "true"},
        }
    )
    outbox = Outbox(tmp_path / "monitor.sqlite3", ["tcp://127.0.0.1:5690"])
    reporter = LogReporter(config, outbox, lambda: None)
    target = "tcp://127.0.0.1:5690"

    def bodies() -> list[dict]:
        return [json.loads(body) for _, _, body in outbox.pending(target, 1000)]

    try:
        with fail2ban_log.open("a") as log:
            log.write("".join(found_line(f"192.0.2.{n % 3}") for n in range(100)))
            log.write(f"{PREFIX}NOTICE  [nginx] Found 192.0.2.9 - 2026-11-23 10:13:39\n")
        reporter.read(lambda: None)  # the first failures after a quiet while: at once
        (report,) = bodies()
        assert sorted((jail, ip, count) for jail, ip, count, _, _ in report["failures"]) == [
            ("sshd", "192.0.2.0", 34),
            ("sshd", "192.0.2.1", 33),
            ("sshd", "192.0.2.2", 33),
        ]
        stored_at = outbox.position()
        with fail2ban_log.open("a") as log:
            log.write(found_line("192.0.2.5"))
        reporter.read(lambda: None)  # within the interval: waits, and so does the position
        assert len(bodies()) == 1 and outbox.position() == stored_at
        assert reporter.failures_deadline() is not None
        with fail2ban_log.open("a") as log:
            log.write(ban_line("198.51.100.1"))
        reporter.read(lambda: None)  # a ban goes at once, the waiting failure with it
        kinds = ["failures" if "failures" in body else body["action"] for body in bodies()]
        assert kinds == ["failures", "failures", "ban"]
        assert outbox.position() != stored_at and reporter.failures_deadline() is None
        assert reporter.failures_reported == 101 and reporter.reported == 1
    finally:
        reporter.close()
        outbox.close()
