"""fail2ban.log parsing and the rules about what a node reports, on real fail2ban 1.0.2 lines."""

import ipaddress
import random
import time

import pytest

from f2bzmq.logparse import BanReporter, Kind, LogRecord, is_address, parse_line

PREFIX = "2026-11-23 10:13:40,972 fail2ban.actions        [17048]: "


def line(message: str, level: str = "NOTICE") -> str:
    return f"{PREFIX}{level:<7} {message}"


@pytest.mark.parametrize(
    "message, kind, jail, ip",
    [
        ("[sshd] Ban 10.250.0.100", Kind.BAN, "sshd", "10.250.0.100"),
        ("[sshd] Restore Ban 192.0.2.11", Kind.RESTORE_BAN, "sshd", "192.0.2.11"),
        ("[sshd] Unban 192.0.2.10", Kind.UNBAN, "sshd", "192.0.2.10"),
        ("[sshd] Repeal Ban 192.0.2.10", Kind.REPEAL_BAN, "sshd", "192.0.2.10"),
        ("[sshd] Reban 192.0.2.10, action 'dummy'", Kind.REBAN, "sshd", "192.0.2.10"),
        ("[cluster] Ban 2001:db8::1", Kind.BAN, "cluster", "2001:db8::1"),
        ("[cluster] Ban 10.0.0.0/24", Kind.BAN, "cluster", "10.0.0.0/24"),
        ("[nginx-http-auth] Ban 198.51.100.7", Kind.BAN, "nginx-http-auth", "198.51.100.7"),
        ("[sshd] 192.0.2.10 already banned", Kind.ALREADY_BANNED, "sshd", "192.0.2.10"),
        ("[sshd] Flush ticket(s) with dummy", Kind.FLUSH, "sshd", None),
    ],
)
def test_jail_lines(message, kind, jail, ip):
    record = parse_line(line(message))
    assert record is not None
    assert (record.kind, record.jail, record.ip) == (kind, jail, ip)


def test_timestamp_is_local_time_with_milliseconds():
    record = parse_line(line("[sshd] Ban 10.250.0.100"))
    expected = time.mktime(time.strptime("2026-11-23 10:13:40", "%Y-%m-%d %H:%M:%S")) + 0.972
    assert record.time == pytest.approx(expected)


def test_syslog_and_journal_forms_have_no_timestamp():
    syslog = "fail2ban.actions        [17048]: NOTICE  [sshd] Ban 10.250.0.100"
    journal = "Nov 23 10:13:40 web1 fail2ban-server[17048]: [sshd] Unban 10.250.0.100"
    assert parse_line(syslog) == LogRecord(Kind.BAN, "sshd", "10.250.0.100")
    assert parse_line(journal) == LogRecord(Kind.UNBAN, "sshd", "10.250.0.100")


@pytest.mark.parametrize(
    "message, seconds",
    [
        ("[sshd] Increase Ban 192.0.2.10 (2 # 2:00:00 -> 2026-11-23 12:13:40)", 7200),
        ("[sshd] Increase Ban 192.0.2.10 (3 # 1 day, 0:00:00 -> 2026-11-24 10:13:40)", 86400),
        ("[sshd] Increase Ban 192.0.2.10 (4 # 2 days, 0:10:00 -> 2026-11-25 10:23:40)", 173400),
        ("[sshd] Increase Ban 192.0.2.10 (5 # permanent -> infinite)", -1),
    ],
)
def test_increase_ban_carries_the_new_bantime(message, seconds):
    record = parse_line(f"2026-11-23 10:13:40,972 fail2ban.observer       [1]: NOTICE  {message}")
    assert (record.kind, record.ip, record.bantime) == (Kind.INCREASE_BAN, "192.0.2.10", seconds)


@pytest.mark.parametrize(
    "text, kind, jail",
    [
        ("fail2ban.jail           [2577]: INFO    Jail 'sshd' started", Kind.JAIL_STARTED, "sshd"),
        ("fail2ban.jail           [2577]: INFO    Jail 'sshd' stopped", Kind.JAIL_STOPPED, "sshd"),
        ("fail2ban.server [2577]: INFO    Jail 'sshd' reloaded", Kind.JAIL_RELOADED, "sshd"),
        ("fail2ban.server [2632]: INFO    Starting Fail2ban v1.0.2", Kind.SERVER_STARTING, None),
        ("fail2ban.server [2577]: INFO    Shutdown in progress...", Kind.SERVER_STOPPING, None),
        ("fail2ban.server [2577]: INFO    Stopping all jails", Kind.SERVER_STOPPING, None),
    ],
)
def test_jail_and_server_lines(text, kind, jail):
    record = parse_line(f"2026-11-23 10:35:38,036 {text}")
    assert (record.kind, record.jail) == (kind, jail)


@pytest.mark.parametrize(
    "text",
    [
        "fail2ban.filter         [2577]: INFO    [sshd] Found 192.0.2.10 - 2026-11-23 10:35:35",
        "fail2ban.actions        [2577]: NOTICE  [sshd] Ban not-an-ip",
        "fail2ban.actions        [2577]: NOTICE  [sshd] Ban 999.1.1.1",
        "fail2ban.actions        [2577]: NOTICE  [sshd] Ban 192.0.2.10; rm -rf /",
        "fail2ban.actions        [2577]: NOTICE  [sshd] Banned 192.0.2.10",
        "fail2ban.actions        [2577]: NOTICE  [ssh d] Ban 192.0.2.10",
        "fail2ban.actions        [2577]: NOTICE  [sshd] Ban",
        "fail2ban.actions        [2577]: INFO      banTime: 600",
        "fail2ban.filter         [2577]: INFO    Added logfile: '/var/log/auth.log'",
        "fail2ban.actions        [2577]: ERROR   Failed to execute ban jail 'sshd' action 'x'",
        "fail2ban.actions        [2577]: INFO    [sshd] Ignore 192.0.2.10, expired bantime",
        "sshd[1234]: Failed password for root from 192.0.2.10 port 50000 ssh2",
        "",
        "x" * 5000 + " [sshd] Ban 192.0.2.10",
    ],
)
def test_lines_that_look_alike_but_are_not_bans(text):
    record = parse_line(f"2026-11-23 10:35:35,387 {text}")
    assert record is None or record.kind not in (Kind.BAN, Kind.UNBAN)


def report(reporter: BanReporter, *messages: str) -> list[tuple[str, str, str]]:
    lines = [m if m.startswith("fail2ban.") else line(m) for m in messages]
    return [(r.kind.value, r.jail, r.ip) for r in reporter.feed_lines(lines)]


def test_bans_and_unbans_are_reported():
    reporter = BanReporter(ignore_jails={"cluster"})
    assert report(reporter, "[sshd] Ban 192.0.2.10", "[sshd] Unban 192.0.2.10") == [
        ("ban", "sshd", "192.0.2.10"),
        ("unban", "sshd", "192.0.2.10"),
    ]


def test_increase_ban_is_reported_as_a_ban_with_its_bantime():
    reporter = BanReporter()
    lines = ["[sshd] Increase Ban 192.0.2.10 (2 # 2:00:00 -> 2026-11-23 12:13:40)"]
    (record,) = reporter.feed_lines(line(m) for m in lines)
    assert (record.kind, record.bantime) == (Kind.BAN, 7200)


def test_sync_jail_restore_reban_and_already_banned_are_not_reported():
    reporter = BanReporter(ignore_jails={"cluster"})
    assert (
        report(
            reporter,
            "[cluster] Ban 198.51.100.1",
            "[cluster] Unban 198.51.100.1",
            "[sshd] Restore Ban 192.0.2.11",
            "[sshd] Reban 192.0.2.11, action 'dummy'",
            "[sshd] 192.0.2.11 already banned",
        )
        == []
    )


def test_restart_of_fail2ban_reports_nothing():
    """The exact sequence fail2ban 1.0.2 writes for `fail2ban-client stop` and a new start."""
    reporter = BanReporter(ignore_jails={"cluster"})
    assert (
        report(
            reporter,
            "fail2ban.server         [2577]: INFO    Shutdown in progress...",
            "fail2ban.server         [2577]: INFO    Stopping all jails",
            "[sshd] Flush ticket(s) with dummy",
            "[sshd] Unban 192.0.2.11",
            "[cluster] Flush ticket(s) with dummy",
            "fail2ban.jail           [2577]: INFO    Jail 'sshd' stopped",
            "[cluster] Unban 198.51.100.1",
            "fail2ban.jail           [2577]: INFO    Jail 'cluster' stopped",
            "fail2ban.server         [2632]: INFO    Starting Fail2ban v1.0.2",
            "fail2ban.jail           [2632]: INFO    Jail 'sshd' started",
            "[sshd] Restore Ban 192.0.2.11",
        )
        == []
    )
    # After the restart, a real expiry is reported again.
    assert report(reporter, "[sshd] Unban 192.0.2.11") == [("unban", "sshd", "192.0.2.11")]


def test_shutdown_without_flushable_action_reports_no_unban():
    reporter = BanReporter()
    assert (
        report(
            reporter,
            "fail2ban.server         [2577]: INFO    Shutdown in progress...",
            "[sshd] Unban 192.0.2.11",
            "[sshd] Unban 192.0.2.12",
        )
        == []
    )


def test_flush_of_one_jail_ends_with_the_jails_next_line():
    reporter = BanReporter()
    assert report(
        reporter,
        "[sshd] Flush ticket(s) with dummy",
        "[sshd] Unban 192.0.2.11",
        "[web] Unban 192.0.2.20",
        "[sshd] Ban 192.0.2.12",
        "[sshd] Unban 192.0.2.12",
    ) == [
        ("unban", "web", "192.0.2.20"),
        ("ban", "sshd", "192.0.2.12"),
        ("unban", "sshd", "192.0.2.12"),
    ]


def test_restart_of_one_jail_whose_actions_cannot_flush_reports_nothing():
    """`fail2ban-client restart sshd` with e.g. hostsdeny: Unbans without a Flush line."""
    reporter = BanReporter()
    assert (
        report(
            reporter,
            "fail2ban.server         [2577]: INFO    Reload jail 'sshd'",
            "[sshd] Unban 198.18.250.1",
            "fail2ban.jail           [2577]: INFO    Jail 'sshd' stopped",
            "fail2ban.jail           [2577]: INFO    Jail 'sshd' started",
            "[sshd] Restore Ban 198.18.250.1",
        )
        == []
    )
    assert report(reporter, "[sshd] Unban 198.18.250.1") == [("unban", "sshd", "198.18.250.1")]


def test_stop_of_one_jail_whose_actions_cannot_flush_reports_nothing():
    """`fail2ban-client stop sshd`: only "Removed logfile" comes before the Unbans."""
    reporter = BanReporter()
    assert (
        report(
            reporter,
            "fail2ban.filter         [2577]: INFO    Removed logfile: '/var/log/auth.log'",
            "[sshd] Unban 198.18.250.1",
            "[sshd] Unban 198.18.250.2",
            "fail2ban.jail           [2577]: INFO    Jail 'sshd' stopped",
        )
        == []
    )
    assert report(reporter, "[web] Unban 198.18.250.3") == [("unban", "web", "198.18.250.3")]


def test_is_address_agrees_with_ipaddress_on_what_the_line_pattern_lets_through():
    """The IPv4 fast path must take exactly what the ipaddress module takes."""
    rng = random.Random(11)
    edge = [
        "1.2.3.4",
        "01.2.3.4",
        "1.2.3.04",
        "1.2.3",
        "1.2.3.4.5",
        "256.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "1..2.3",
        ".1.2.3",
        "1.2.3.4/24",
        "1.2.3.4/33",
        "::1",
        "::ffff:1.2.3.4",
        "2001:db8::/32",
        "2001:db8:::1",
        "a.b.c.d",
        "",
    ]
    pieces = ["0", "1", "9", "00", "01", "25", "255", "256", "999", "", "a", "ff"]
    generated = [
        ".".join(rng.choice(pieces) for _ in range(rng.randint(2, 5))) for _ in range(5000)
    ]
    for text in edge + generated:
        try:
            ipaddress.ip_network(text, strict=False) if "/" in text else ipaddress.ip_address(text)
            expected = True
        except ValueError:
            expected = False
        assert is_address(text) is expected, text


# Failures: fail2ban 1.0.2's filter logs each at INFO as "[jail] Found ip - failure time".
FOUND = "2026-11-23 10:13:41,002 fail2ban.filter         [17048]: INFO    "


@pytest.mark.parametrize(
    "message, ip",
    [
        ("[sshd] Found 192.0.2.7 - 2026-11-23 10:13:39", "192.0.2.7"),
        ("[sshd] Found 2001:db8::7 - 2026-11-23 10:13:39", "2001:db8::7"),
    ],
)
def test_a_failure_line_carries_the_failures_own_time(message, ip):
    record = parse_line(FOUND + message)
    expected = time.mktime(time.strptime("2026-11-23 10:13:39", "%Y-%m-%d %H:%M:%S"))
    assert record == LogRecord(Kind.FOUND, "sshd", ip, expected)


@pytest.mark.parametrize(
    "message",
    [
        # The observer's line for an address banned before: the same failure again.
        "[sshd] Found 192.0.2.7, bad - 2026-11-23 10:13:39, 1 # -> 3, Ban",
        "[sshd] Found 192.0.2.7 - yesterday",
        "[sshd] Found 192.0.2.777 - 2026-11-23 10:13:39",
        "[sshd] Found a match but no valid date/time found for 'x'",
        "[sshd] Ignore 192.0.2.7 by ip",
    ],
)
def test_lines_that_are_not_failures(message):
    record = parse_line(FOUND + message)
    assert record is None or record.kind is not Kind.FOUND


def test_failures_are_reported_only_for_the_jails_a_cluster_jail_counts():
    reporter = BanReporter(ignore_jails={"cluster"}, detect_jails={"sshd"})
    lines = [
        FOUND + "[sshd] Found 192.0.2.7 - 2026-11-23 10:13:39",
        FOUND + "[nginx] Found 192.0.2.8 - 2026-11-23 10:13:39",
        line("[sshd] Ban 192.0.2.7"),
    ]
    assert [(r.kind.value, r.jail, r.ip) for r in reporter.feed_lines(lines)] == [
        ("found", "sshd", "192.0.2.7"),
        ("ban", "sshd", "192.0.2.7"),
    ]
    assert BanReporter().feed_lines(lines[:2]) == []


def test_a_failure_during_a_flush_does_not_end_the_flush():
    reporter = BanReporter(detect_jails={"sshd"})
    kinds = [
        r.kind
        for r in reporter.feed_lines(
            [
                line("[sshd] Flush ticket(s) with dummy"),
                FOUND + "[sshd] Found 192.0.2.7 - 2026-11-23 10:13:39",
                line("[sshd] Unban 192.0.2.9"),
            ]
        )
    ]
    assert kinds == [Kind.FOUND]
