"""Fail2banClient against a real fail2ban-server: socket protocol, errors, reconnect, fallback."""

from __future__ import annotations

import logging
import os
import pickle
import shlex
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from f2bzmq.fail2ban_client import (
    Fail2banClient,
    Fail2banError,
    RemoteObject,
    load_reply,
    parse_int,
    parse_jail_list,
)
from f2bzmq.lab import Fail2banServer, process_alive

# A program that is certainly not installed: a client given it can only use its socket.
NO_PROGRAM = "f2bzmq-test-no-such-program"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fail2banServer]:
    # One server for the module: starting one costs about 0.4 s.
    with Fail2banServer(tmp_path_factory.mktemp("fail2ban")) as running:
        yield running


@pytest.fixture
def client(server: Fail2banServer) -> Iterator[Fail2banClient]:
    with Fail2banClient(str(server.socket), client_program=NO_PROGRAM) as connected:
        yield connected
    # Leave the sync jail empty for the next test.
    with server.client() as cleaner:
        cleaner.unban(server.sync_jail, cleaner.banned(server.sync_jail))


def test_ping(client: Fail2banClient) -> None:
    assert client.ping()


def test_ping_without_server_is_false(tmp_path: Path) -> None:
    assert not Fail2banClient(str(tmp_path / "missing.sock"), client_program=NO_PROGRAM).ping()


def test_ban_batch_in_one_command(client: Fail2banClient, server: Fail2banServer) -> None:
    batch = ["198.51.100.1", "198.51.100.2", "2001:db8::1", "10.0.0.0/24"]
    assert client.ban("cluster", batch) == 4
    assert sorted(client.banned("cluster")) == sorted(batch)
    assert sorted(server.banned("cluster")) == sorted(batch)
    # Banning again is not an error; fail2ban counts only new bans.
    assert client.ban("cluster", batch[:2]) == 0


def test_banned_returns_plain_str(client: Fail2banClient) -> None:
    # fail2ban pickles its IPAddr objects as str(...): they must arrive as real strings.
    client.ban("cluster", ["192.0.2.1"])
    assert [type(address) for address in client.banned("cluster")] == [str]


def test_unban(client: Fail2banClient, server: Fail2banServer) -> None:
    client.ban("cluster", ["198.51.100.7", "2001:db8::7"])
    assert client.unban("cluster", ["198.51.100.7"]) == 1
    assert server.banned("cluster") == ["2001:db8::7"]


def test_unban_absent_address_is_not_an_error(client: Fail2banClient) -> None:
    client.ban("cluster", ["198.51.100.8"])
    assert client.unban("cluster", ["203.0.113.99", "198.51.100.8"]) == 1
    assert client.unban("cluster", ["203.0.113.99"]) == 0


def test_empty_batches_send_nothing(client: Fail2banClient) -> None:
    assert client.ban("cluster", []) == 0
    assert client.unban("cluster", []) == 0


def test_single_str_is_refused(client: Fail2banClient) -> None:
    with pytest.raises(TypeError):
        client.ban("cluster", "198.51.100.1")


def test_bantime(client: Fail2banClient) -> None:
    assert client.bantime("sshd") == 600
    assert client.bantime("cluster") == 86400


def test_banned_with_time_gives_start_and_bantime(client: Fail2banClient) -> None:
    before = time.time()
    client.ban("sshd", ["198.51.100.30"])
    bans = {ip: (start, bantime) for ip, start, bantime in client.banned_with_time("sshd")}
    start, bantime = bans["198.51.100.30"]
    assert bantime == 600
    assert before - 2 <= start <= time.time() + 1  # fail2ban shows whole seconds
    client.unban("sshd", ["198.51.100.30"])


def test_jails(client: Fail2banClient) -> None:
    assert sorted(client.jails()) == ["cluster", "sshd"]


def test_ban_from_log_is_visible(client: Fail2banClient, server: Fail2banServer) -> None:
    server.attack("192.0.2.55")
    server.wait_banned("sshd", "192.0.2.55")
    assert "192.0.2.55" in client.banned("sshd")
    assert client.unban("sshd", ["192.0.2.55"]) == 1


def test_unknown_jail_is_a_readable_error(client: Fail2banClient) -> None:
    with pytest.raises(Fail2banError) as caught:
        client.banned("nosuch")
    message = str(caught.value)
    assert "get nosuch banip" in message
    assert "UnknownJailException" in message and "nosuch" in message
    # The connection stays usable after an error reply.
    assert client.ping()


def test_invalid_command_is_a_readable_error(client: Fail2banClient) -> None:
    with pytest.raises(Fail2banError, match="Invalid command"):
        client.command("get", "sshd", "no-such-setting")


@pytest.mark.parametrize("bad", ["198.51.100.1\n", "a\rb", "x\0y"])
def test_newline_and_nul_are_refused(client: Fail2banClient, bad: str) -> None:
    with pytest.raises(ValueError):
        client.ban("cluster", [bad])
    assert client.banned("cluster") == []


def test_non_str_argument_is_refused(client: Fail2banClient) -> None:
    with pytest.raises(TypeError):
        client.command("get", "sshd", 3)  # type: ignore[arg-type]


def test_reconnects_after_server_restart(tmp_path: Path) -> None:
    with Fail2banServer(tmp_path, "restarting") as server:
        # NO_PROGRAM makes sure the commands after the restart really used the socket.
        client = Fail2banClient(str(server.socket), client_program=NO_PROGRAM)
        assert client.ban("cluster", ["198.51.100.20"]) == 1
        server.restart()
        # The old connection is dead; the first command after the restart must still work.
        assert sorted(client.jails()) == ["cluster", "sshd"]
        # fail2ban restores the ban from its database a moment after it answers.
        server.wait_banned("cluster", "198.51.100.20")
        assert client.banned("cluster") == ["198.51.100.20"]
        client.close()


def test_server_gone_is_an_error_naming_the_socket(tmp_path: Path) -> None:
    with Fail2banServer(tmp_path, "stopping") as server:
        client = Fail2banClient(str(server.socket), timeout=5)
        assert client.ping()
        server.stop()
        with pytest.raises(Fail2banError) as caught:
            client.banned("cluster")
        assert str(server.socket) in str(caught.value)
        client.close()


def write_wrapper(path: Path, real_socket: Path, calls: Path) -> Path:
    """A client program that records its argv, then runs fail2ban-client on real_socket."""
    path.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n'
        '[ "$1" = "-s" ] && shift 2\n'
        f'exec fail2ban-client -s {shlex.quote(str(real_socket))} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_falls_back_to_client_program(
    tmp_path: Path, server: Fail2banServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The client is given a socket path that does not exist, so it truly cannot use the
    # socket. (A permission trick would not work: tests may run as root, which ignores
    # file modes.) Its client_program is a wrapper that records the argv it was given
    # and runs the real fail2ban-client against the running server: every answer below
    # comes from the real server through the real program's output.
    calls = tmp_path / "calls.log"
    wrapper = write_wrapper(tmp_path / "fail2ban-client", server.socket, calls)
    missing = str(tmp_path / "missing.sock")
    caplog.set_level(logging.WARNING, logger="f2bzmq.fail2ban")
    with Fail2banClient(missing, client_program=str(wrapper)) as client:
        assert client.ping()
        assert client.ban("cluster", ["198.51.100.30", "2001:db8::30"]) == 2
        assert sorted(client.banned("cluster")) == ["198.51.100.30", "2001:db8::30"]
        assert client.banned("sshd") == []
        assert client.unban("cluster", ["198.51.100.30", "203.0.113.30"]) == 1
        assert client.bantime("cluster") == 86400
        assert sorted(client.jails()) == ["cluster", "sshd"]
        with pytest.raises(Fail2banError, match="does not exist"):
            client.banned("nosuch")
    assert server.banned("cluster") == ["2001:db8::30"]
    recorded = calls.read_text().splitlines()
    assert recorded[0] == f"-s {missing} ping"
    assert f"-s {missing} set cluster banip 198.51.100.30 2001:db8::30" in recorded
    assert len(recorded) == 8
    fallback_logs = [r for r in caplog.records if "using" in r.getMessage()]
    assert len(fallback_logs) == 1


def test_ignoreip_through_the_socket_and_the_program(tmp_path: Path) -> None:
    """fail2ban's `set banip` bypasses a jail's ignoreip: the subscriber reads it."""
    server = Fail2banServer(
        tmp_path,
        jails=lambda server: server.default_jails(600, 86400).replace(
            "[cluster]\n", "[cluster]\nignoreip = 10.9.0.0/16 192.0.2.7 host.invalid\n"
        ),
    )
    wrapper = write_wrapper(tmp_path / "fail2ban-client", server.socket, tmp_path / "calls")
    with server, server.client() as direct:
        program = Fail2banClient(str(tmp_path / "missing.sock"), client_program=str(wrapper))
        for client in (direct, program):
            assert sorted(client.ignored("cluster")) == ["10.9.0.0/16", "192.0.2.7", "host.invalid"]
            assert client.ignored("sshd") == []


def test_program_failure_names_socket_and_reason(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.sock")
    client = Fail2banClient(missing)
    with pytest.raises(Fail2banError) as caught:
        client.banned("cluster")
    assert missing in str(caught.value)
    assert "Failed to access socket path" in str(caught.value)


def test_missing_program_is_a_fail2ban_error(tmp_path: Path) -> None:
    client = Fail2banClient(str(tmp_path / "missing.sock"), client_program=NO_PROGRAM)
    with pytest.raises(Fail2banError, match=NO_PROGRAM):
        client.jails()


class RunsShell:
    """Pickles as a call of os.system, the classic pickle exploit."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


class CallsEval:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return eval, ("__import__('os').getpid()",)


def test_unpickler_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    command = f"touch {shlex.quote(str(target))}"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        result = load_reply(pickle.dumps(RunsShell(command), protocol=protocol))
        assert isinstance(result, RemoteObject)
        assert str(result) == f"system: {command}"
    assert not target.exists()


def test_unpickler_refuses_dangerous_builtins() -> None:
    result = load_reply(pickle.dumps(CallsEval()))
    assert isinstance(result, RemoteObject)
    assert result.args == ("__import__('os').getpid()",)


def test_unpickler_reads_error_replies() -> None:
    # How fail2ban answers a failed command: (1, exception).
    code, error = load_reply(pickle.dumps((1, ValueError("not banned: ['192.0.2.1']"))))
    assert code == 1
    assert str(error) == "ValueError: not banned: ['192.0.2.1']"


def test_unpickler_keeps_plain_data() -> None:
    reply = (0, [("Number of jail", 2), ("Jail list", "cluster, sshd")], {"a": {1.5, None}})
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert load_reply(pickle.dumps(reply, protocol=protocol)) == reply


def test_parse_jail_list_from_socket_and_program() -> None:
    assert parse_jail_list([("Number of jail", 2), ("Jail list", "cluster, sshd")]) == [
        "cluster",
        "sshd",
    ]
    text = "Status\n|- Number of jail:\t2\n`- Jail list:\tcluster, sshd"
    assert parse_jail_list(text) == ["cluster", "sshd"]
    assert parse_jail_list([("Number of jail", 0), ("Jail list", "")]) == []
    with pytest.raises(Fail2banError):
        parse_jail_list(None)


def test_parse_int_refuses_non_numbers() -> None:
    assert parse_int(3) == 3
    assert parse_int("-1") == -1
    for answer in (None, True, "pong", [1]):
        with pytest.raises(Fail2banError):
            parse_int(answer)


def test_harness_stop_leaves_no_process(tmp_path: Path) -> None:
    server = Fail2banServer(tmp_path, "short-lived")
    server.start()
    pid = int(server.pidfile.read_text())
    server.stop()
    assert not process_alive(pid)


def test_harness_kills_a_server_that_does_not_stop(tmp_path: Path) -> None:
    server = Fail2banServer(tmp_path, "frozen")
    server.start()
    pid = int(server.pidfile.read_text())
    try:
        os.kill(pid, signal.SIGSTOP)  # it can no longer answer "stop"
        server.stop(timeout=1)
        assert not process_alive(pid)
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_harness_deep_root_gets_a_short_socket(tmp_path: Path) -> None:
    # Unix socket paths are limited to about 107 bytes; pytest's tmp_path can be longer.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with Fail2banServer(deep, "deep") as server:
        assert len(os.fsencode(server.socket)) <= 100
        with server.client() as client:
            assert client.ping()
    assert not server.socket.parent.exists()
