"""Nothing lost: logrotate during a burst of bans, and a hub stopped in the middle of one.

Real fail2ban-servers, the real daemons through the lab and the real `logrotate`
program. Each test ends when every node's sync jail, as the real fail2ban-client
reports it, holds exactly the bans the other nodes reported.
"""

from __future__ import annotations

import gzip
import re
import signal
from collections import Counter
from collections.abc import Callable, Iterable

import pytest

from f2bzmq.lab import CLIENT_PROGRAM, Cluster, Hub, Node, wait_until
from tests.support.logrotate import logrotate
from tests.support.state import hub_bans, hub_sequence, outbox_depth

WAIT = 120.0  # generous bound for anything asynchronous; these tests never assert speed
WAVES = 5  # attack waves per burst
PER_WAVE = 240  # addresses per wave: several hundred bans are written while logrotate runs
ROTATE_AFTER = PER_WAVE // 4  # bans of a wave fail2ban has logged before logrotate runs


def addresses(block: int, count: int) -> list[str]:
    """`count` deterministic addresses of 10.<block>.0.0/16."""
    return [f"10.{block}.{i // 250}.{i % 250 + 1}" for i in range(count)]


def ban_lines(text: str, jail: str = "sshd") -> list[str]:
    """The addresses of fail2ban's `NOTICE  [jail] Ban ip` lines, in order."""
    return re.findall(rf"NOTICE\s+\[{jail}\] Ban (\S+)$", text, re.MULTILINE)


def hub_notices(hub: Hub, node: str, jail: str = "sshd") -> Counter[str]:
    """How often the hub logged `[jail] Ban ip from node`: once per newly broadcast ban."""
    pattern = rf"NOTICE\s+\[{jail}\] Ban (\S+) from {node}$"
    return Counter(re.findall(pattern, hub.log_text(), re.MULTILINE))


def hub_outcomes(hub: Hub, node: str, jail: str = "sshd") -> Counter[str]:
    """The outcomes of the reports the hub did not broadcast (logged at DEBUG)."""
    pattern = rf"DEBUG\s+\[{jail}\] Ban \S+ from {node}: (\w+)$"
    return Counter(re.findall(pattern, hub.log_text(), re.MULTILINE))


def queued(node: Node, jail: str = "sshd") -> Counter[str]:
    """How often the monitor made an event of a `[jail] Ban ip` line: once per line read."""
    pattern = rf"NOTICE\s+\[{jail}\] Ban (\S+) from {node.name}: queued for the cluster$"
    return Counter(re.findall(pattern, node.log_text("monitor"), re.MULTILINE))


def bans_per_file(node: Node) -> dict[str, Counter[str]]:
    """The `[sshd] Ban` lines of the log and of each rotated copy, compressed or not."""
    found = {}
    for path in sorted(node.fail2ban.log.parent.glob(node.fail2ban.log.name + "*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", errors="replace") as log:
            found[path.name] = Counter(ban_lines(log.read()))
    return found


def bans_on_disk(node: Node) -> Counter[str]:
    """Every `[sshd] Ban` line left in the log files, counted."""
    return sum(bans_per_file(node).values(), Counter())


def assert_rotated_mid_wave(node: Node) -> None:
    """Each wave's Ban lines are spread over two files or more: logrotate ran in the middle."""
    files_of: dict[str, set[str]] = {}
    for name, bans in bans_per_file(node).items():
        for ip in bans:
            files_of.setdefault(ip.split(".")[1], set()).add(name)
    assert len(files_of) == WAVES and all(len(names) >= 2 for names in files_of.values()), files_of


def once(counts: Counter[str]) -> set[str]:
    """The keys of counts, after checking that each was counted exactly once."""
    twice = sorted(key for key, count in counts.items() if count != 1)
    assert not twice, f"{len(twice)} counted more than once, e.g. {twice[:10]}"
    return set(counts)


def differences(want: set, have: set) -> str:
    missing, extra = sorted(want - have), sorted(have - want)
    return f"{len(missing)} missing {missing[:10]}, {len(extra)} extra {extra[:10]}"


def wait_sets(
    cluster: Cluster, what: str, read: Callable[[], set], want: set, timeout: float = WAIT
) -> None:
    """Wait until read() == want exactly; fail with the difference and every daemon's log."""
    last: set = set()

    def settled() -> bool:
        last.clear()
        last.update(read())
        return last == want

    if not wait_until(settled, timeout, interval=1.0):
        raise AssertionError(
            f"{what} never became the expected {len(want)} items within {timeout:g}s: "
            f"{differences(want, last)}\n{cluster.diagnostics()}"
        )


def wait_synced(cluster: Cluster, expected: dict[str, set[str]]) -> None:
    """Each named node's sync jail holds exactly its expected set (fail2ban-client says so)."""
    for name, want in expected.items():
        jail = cluster[name].fail2ban

        def sync_jail(jail=jail) -> set[str]:
            return set(jail.banned("cluster"))

        wait_sets(cluster, f"{name}'s sync jail", sync_jail, want)


def wait_banned_locally(cluster: Cluster, node: Node, want: set[str]) -> None:
    """fail2ban on node has banned exactly `want` in its sshd jail: the burst is over."""
    wait_sets(cluster, f"{node.name}'s sshd jail", lambda: set(node.fail2ban.banned("sshd")), want)


def wait_outboxes_empty(cluster: Cluster) -> None:
    """Every monitor has every event ACKed by every hub."""
    for node in cluster.nodes.values():
        if not wait_until(lambda node=node: outbox_depth(node) == 0, WAIT, 0.5):
            raise AssertionError(
                f"{node.name}'s outbox still holds {outbox_depth(node)} rows\n"
                + cluster.diagnostics()
            )


# --- A: logrotate during a burst of bans on node1 ---


def burst_with_rotations(cluster: Cluster, rotate: Callable[[], None]) -> set[str]:
    """Attack node1 in WAVES waves; in each, run logrotate while fail2ban writes the wave's Ban
    lines. Return every address attacked, once fail2ban on node1 has banned them all."""
    node1 = cluster["node1"]
    attacked: list[str] = []
    for wave in range(1, WAVES + 1):
        ips = addresses(wave, PER_WAVE)
        node1.fail2ban.attack(*ips)
        attacked += ips
        prefix = f"10.{wave}."

        def wave_started(prefix=prefix) -> bool:
            text = node1.fail2ban.log.read_text(errors="replace")
            return sum(ip.startswith(prefix) for ip in ban_lines(text)) >= ROTATE_AFTER

        assert wait_until(wave_started, WAIT, 0.02), f"fail2ban did not ban wave {wave}"
        rotate()
    wait_banned_locally(cluster, node1, set(attacked))
    return set(attacked)


def test_logrotate_create_during_a_burst_loses_and_repeats_nothing(tmp_path, cluster):
    """Debian's own rotation of fail2ban.log: rename, create, flushlogs, and the renamed file
    compressed one rotation later. fail2ban writes to the renamed file until flushlogs."""
    node1 = cluster["node1"]
    flushlogs = f"{CLIENT_PROGRAM} -s {node1.fail2ban.socket} flushlogs"
    directives = (
        "    create 0640\n    compress\n    delaycompress\n"
        f"    postrotate\n        {flushlogs} >/dev/null\n    endscript\n"
    )
    rotate = logrotate(tmp_path, node1.fail2ban.log, directives, WAVES * 2, WAIT)
    banned = burst_with_rotations(cluster, rotate)

    wait_synced(cluster, {"node2": banned, "node3": banned})
    assert_rotated_mid_wave(node1)
    assert len(list(node1.directory.glob("fail2ban.log.*.gz"))) == WAVES - 1
    # fail2ban itself can drop a line logged while flushlogs swaps its handler (seen once
    # in CI: a Ban in no file); the monitor then reports every ban fail2ban holds.
    on_disk = once(bans_on_disk(node1))
    assert on_disk <= once(queued(node1)) <= banned  # each Ban line on disk read once
    assert once(hub_notices(cluster.hub, "node1")) == banned  # the hub broadcast each once
    assert set(hub_outcomes(cluster.hub, "node1")) <= {"duplicate", "extended"}
    assert node1.fail2ban.banned("cluster") == []
    wait_outboxes_empty(cluster)


def test_logrotate_copytruncate_during_a_burst_loses_and_repeats_nothing(tmp_path, cluster):
    """copytruncate: logrotate copies the log, then truncates it in place.

    fail2ban keeps its descriptor, opened with O_APPEND: after the truncation it writes from
    offset 0 and leaves no hole, and needs no flushlogs. But a line it writes after logrotate
    copied the end of the file and before it truncated it (logrotate fsyncs the copy in
    between: milliseconds) is in no file; in bursts like this one about one rotation in five
    leaves a Ban line in no file. So the monitor, when it sees a truncation, asks fail2ban
    for every ban it holds and reports them all again: the hub records the ones it knows as
    nothing new ("extended") and broadcasts the ones the lost lines carried. Asserted: no
    line reported twice, every Ban line on disk reported, and every ban fail2ban made reached
    the other nodes, each broadcast once.
    """
    node1 = cluster["node1"]
    directives = "    copytruncate\n    compress\n    delaycompress\n"
    rotate = logrotate(tmp_path, node1.fail2ban.log, directives, WAVES * 2, WAIT)
    banned = burst_with_rotations(cluster, rotate)

    reported = once(queued(node1))
    on_disk = once(bans_on_disk(node1))
    assert_rotated_mid_wave(node1)
    assert on_disk <= reported <= banned
    wait_synced(cluster, {"node2": banned, "node3": banned})
    assert once(hub_notices(cluster.hub, "node1")) == banned
    assert set(hub_outcomes(cluster.hub, "node1")) <= {"duplicate", "extended"}
    assert node1.fail2ban.banned("cluster") == []
    wait_outboxes_empty(cluster)


# --- B: one of two hubs stopped in the middle of a burst ---


def as_state(origins: dict[str, Iterable[str]]) -> set[tuple[str, str, str]]:
    return {("sshd", ip, node) for node, ips in origins.items() for ip in ips}


@pytest.mark.parametrize(
    "sig, stopped",
    [(signal.SIGKILL, 1), (signal.SIGTERM, 0)],
    ids=["SIGKILL-hub2", "SIGTERM-hub1"],
)
def test_a_hub_stopped_during_a_burst_loses_nothing(tmp_path, sig, stopped):
    """node1 and node2 ban in waves; one hub is stopped once it has broadcast part of the burst
    and stays down while the rest arrives. The other hub alone brings every ban everywhere;
    started again, the stopped hub catches up from the monitors' outboxes."""
    with Cluster(tmp_path / "lab", size=3, hubs=2) as cluster:
        down, up = cluster.hubs[stopped], cluster.hubs[1 - stopped]
        origins: dict[str, list[str]] = {"node1": [], "node2": []}

        def broadcast_by_down() -> int:
            return sum(sum(hub_notices(down, node).values()) for node in origins)

        for wave in range(1, WAVES + 1):
            for number, node in enumerate(origins, 1):
                ips = addresses(10 * number + wave, PER_WAVE // 2)
                cluster[node].fail2ban.attack(*ips)
                origins[node] += ips
            if wave == 2:
                assert wait_until(lambda: broadcast_by_down() >= PER_WAVE, WAIT, 0.02)
                down.publisher.stop(sig)
        node1, node2 = (set(ips) for ips in origins.values())
        everything = {"node1": node2, "node2": node1, "node3": node1 | node2}
        assert broadcast_by_down() < len(node1 | node2)  # stopped in the middle indeed
        for node, ips in origins.items():
            wait_banned_locally(cluster, cluster[node], set(ips))
        wait_synced(cluster, everything)
        assert once(hub_notices(up, "node1")) == node1
        assert once(hub_notices(up, "node2")) == node2

        down.publisher.start()
        try:
            for hub in cluster.hubs:
                bans = as_state(origins)
                wait_sets(cluster, f"{hub.name}'s bans", lambda hub=hub: set(hub_bans(hub)), bans)
                # Every ban was new to the cluster: one committed broadcast each, on each hub.
                assert hub_sequence(hub) == len(bans)
            wait_outboxes_empty(cluster)
            if sig == signal.SIGTERM:
                # A clean stop commits what the hub logged: it broadcast no ban twice.
                assert once(hub_notices(down, "node1")) == node1
                assert once(hub_notices(down, "node2")) == node2
            else:
                # The hub logs a broadcast only after committing it, so none is logged twice;
                # SIGKILL between the commit and the log line leaves that line out (the state,
                # checked above, is what counts).
                assert once(hub_notices(down, "node1")) <= node1
                assert once(hub_notices(down, "node2")) <= node2
            wait_synced(cluster, everything)
        finally:
            down.publisher.stop()  # even if stopping the other hub fails at the cluster's exit
