"""Talk to a local fail2ban-server: ban, unban and read ban lists through its unix socket.

fail2ban's socket protocol is a pickled list of strings ended by ``<F2B_END_COMMAND>``;
the reply is a pickled ``(code, result)`` where code 1 carries an exception object.
Replies are unpickled by a restricted unpickler that builds no class but a few safe
builtins, so a reply can never run code here. When the socket cannot be used at all,
the ``fail2ban-client`` program does the same work, a few hundred times slower.
"""

from __future__ import annotations

import builtins
import io
import logging
import pickle
import re
import socket
import struct
import subprocess
import time
from collections.abc import Sequence

logger = logging.getLogger("f2bzmq.fail2ban")

END = b"<F2B_END_COMMAND>"
CLOSE = b"<F2B_CLOSE_COMMAND>"

# Builtins a reply may name (fail2ban pickles its IPAddr as str(...)), chosen because they
# only build values. bytes and bytearray are left out: bytes(10**12) would exhaust memory.
SAFE_BUILTINS = frozenset(
    {"str", "int", "float", "bool", "complex", "tuple", "list", "dict", "set", "frozenset"}
)

# Errors that mean the socket cannot be used at all, as opposed to a connection that broke.
UNREACHABLE = (FileNotFoundError, ConnectionRefusedError, PermissionError, NotADirectoryError)


# "192.0.2.5 \t2026-11-23 12:10:52 + 600 = 2026-11-23 12:20:52" (fail2ban's local time)
_WITH_TIME = re.compile(r"^(\S+)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+ (-?\d+) = ")


class Fail2banError(Exception):
    """fail2ban refused a command or could not be reached (message says which and why)."""


class RemoteObject(Exception):
    """Stand-in for any class a reply names: it keeps the arguments and runs nothing.

    It derives from Exception because fail2ban's error replies are exceptions, which
    unpickle as ``cls(*args)`` followed by an optional state dictionary.
    """

    remote_name = "object"

    def __str__(self) -> str:
        if len(self.args) == 1:
            return f"{self.remote_name}: {self.args[0]}"
        return f"{self.remote_name}: {self.args!r}" if self.args else self.remote_name


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only SAFE_BUILTINS; every other class becomes a RemoteObject."""

    def find_class(self, module: str, name: str) -> type:
        # Pickles of protocol 0 to 2 spell the module "__builtin__", as Python 2 did.
        if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
            return getattr(builtins, name)
        # A fresh subclass per name so error messages keep the remote class name.
        return type(name, (RemoteObject,), {"remote_name": name, "remote_module": module})


def load_reply(data: bytes) -> object:
    """Unpickle a fail2ban reply without importing or calling anything it names."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def describe(args: Sequence[str], limit: int = 80) -> str:
    """Quote a command for messages, cut short so a long ban batch stays readable."""
    text = " ".join(args)
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def check_arguments(args: Sequence[str]) -> None:
    """Refuse what fail2ban's protocol or the client program could misread."""
    if not args:
        raise ValueError("empty fail2ban command")
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"fail2ban command arguments must be str, not {type(arg).__name__}")
        if "\0" in arg or "\n" in arg or "\r" in arg:
            raise ValueError(f"fail2ban command argument contains NUL or a line break: {arg!r}")


def check_addresses(ips: Sequence[str]) -> None:
    """A bare str is a Sequence[str] too; banning its characters would be a silent bug."""
    if isinstance(ips, str):
        raise TypeError("ips must be a sequence of addresses, not a single str")


def program_failure(done: subprocess.CompletedProcess[str]) -> str:
    """Why fail2ban-client failed: its last stderr line, after its answer on stdout if any."""
    errors = done.stderr.strip().splitlines()
    # Drop fail2ban's log prefix ("2024-01-01 00:00:00,000 fail2ban [123]: ") from the line.
    reason = errors[-1].split("]: ", 1)[-1] if errors else f"exit status {done.returncode}"
    answer = done.stdout.strip().splitlines()
    return f"{answer[-1]} ({reason})" if answer else reason


def parse_int(value: object) -> int:
    """A count or a time: an int from the socket, a line of text from the client program."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Fail2banError(f"fail2ban answered {value!r} where a number was expected")
    try:
        return int(value)
    except ValueError:
        raise Fail2banError(f"fail2ban answered {value!r} where a number was expected") from None


def parse_jail_list(status: object) -> list[str]:
    """The jail names from "status": a list of pairs from the socket, text from the program."""
    if isinstance(status, str):
        lines = [line.partition("Jail list:")[2] for line in status.splitlines()]
        found = [line for line in lines if line]
        names = found[0] if found else ""
    else:
        try:
            names = dict(status)["Jail list"]  # type: ignore[call-overload]
        except (TypeError, ValueError, KeyError):
            raise Fail2banError(
                f"fail2ban answered {status!r} where a status was expected"
            ) from None
        if not isinstance(names, str):
            raise Fail2banError(f"fail2ban answered {status!r} where a status was expected")
    return [name.strip() for name in names.split(",") if name.strip()]


class Fail2banClient:
    """One persistent connection to a fail2ban-server socket, with the client program as fallback
    (client_program None: none, for checks made often, which must stay cheap).

    Not thread-safe: fail2ban answers one request at a time anyway, so give each thread
    its own client.
    """

    def __init__(
        self,
        socket_path: str,
        timeout: float = 10.0,
        client_program: str | None = "fail2ban-client",
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.client_program = client_program
        self._sock: socket.socket | None = None
        self._using_program = False  # so the fallback is logged once, not per command
        # The process id of the fail2ban-server at the other end of the last connection made
        # (the kernel's SO_PEERCRED): another one means fail2ban was restarted meanwhile.
        self.server_pid: int | None = None

    def command(self, *args: str) -> object:
        """Run one fail2ban command such as ("get", "sshd", "banip") and return its result.

        Through the socket the result is fail2ban's own object; through the client
        program it is the program's output text.
        """
        check_arguments(args)
        try:
            result = self._socket_command(args)
        except UNREACHABLE as error:
            if self.client_program is None:
                raise Fail2banError(
                    f"cannot connect to fail2ban at {self.socket_path}: {error.strerror or error}"
                ) from None
            if not self._using_program:
                logger.warning(
                    "fail2ban socket %s unusable (%s); using %s instead",
                    self.socket_path,
                    error,
                    self.client_program,
                )
                self._using_program = True
            return self._program_command(args)
        if self._using_program:
            logger.info("fail2ban socket %s usable again", self.socket_path)
            self._using_program = False
        return result

    def ping(self) -> bool:
        """True when the server answers "pong"; never raises, so callers can poll with it."""
        try:
            reply = self.command("ping")
        except Fail2banError:
            return False
        return isinstance(reply, str) and reply.split()[-1:] == ["pong"]

    def ban(self, jail: str, ips: Sequence[str]) -> int:
        """Ban all addresses in one command; returns how many fail2ban newly banned."""
        check_addresses(ips)
        if not ips:
            return 0
        return parse_int(self.command("set", jail, "banip", *ips))

    def unban(self, jail: str, ips: Sequence[str]) -> int:
        """Unban all addresses in one command; absent ones are skipped, not an error."""
        check_addresses(ips)
        if not ips:
            return 0
        # Without "--report-absent" fail2ban ignores addresses it has not banned.
        return parse_int(self.command("set", jail, "unbanip", *ips))

    def banned(self, jail: str) -> list[str]:
        """The addresses currently banned in a jail."""
        reply = self.command("get", jail, "banip")
        if isinstance(reply, str):
            return reply.split()
        if not isinstance(reply, list):
            raise Fail2banError(f"fail2ban answered {reply!r} where a ban list was expected")
        return [str(address) for address in reply]

    def banned_with_time(self, jail: str) -> list[tuple[str, float, int]]:
        """(address, ban start as unix time, bantime in seconds or -1) of each ban in a jail."""
        reply = self.command("get", jail, "banip", "--with-time")
        lines = reply.splitlines() if isinstance(reply, str) else reply
        if not isinstance(lines, list):
            raise Fail2banError(f"fail2ban answered {reply!r} where a ban list was expected")
        bans = []
        for line in lines:
            match = _WITH_TIME.match(str(line))
            if match is not None:
                start = time.mktime(time.strptime(match.group(2), "%Y-%m-%d %H:%M:%S"))
                bans.append((match.group(1), start, int(match.group(3))))
        return bans

    def ignored(self, jail: str) -> list[str]:
        """The jail's ignoreip entries: addresses, networks and host names, as listed."""
        reply = self.command("get", jail, "ignoreip")
        if isinstance(reply, str):  # the program draws a tree under a title line
            return [line[3:].strip() for line in reply.splitlines() if line[:3] in ("|- ", "`- ")]
        if not isinstance(reply, list):
            raise Fail2banError(f"fail2ban answered {reply!r} where an ignore list was expected")
        return [str(entry) for entry in reply]

    def ignore(self, jail: str, ip: str) -> None:
        """Add an address or network to the jail's ignoreip, until unignore() or a reload."""
        self.command("set", jail, "addignoreip", ip)

    def unignore(self, jail: str, ip: str) -> None:
        """Take it out again; fail2ban refuses one its list does not hold."""
        self.command("set", jail, "delignoreip", ip)

    def logtarget(self) -> str:
        """Where fail2ban writes its log: a file's path, or SYSLOG, SYSTEMD-JOURNAL, STDOUT…"""
        reply = self.command("get", "logtarget")
        if not isinstance(reply, str) or not reply.strip():
            raise Fail2banError(f"fail2ban answered {reply!r} where a log target was expected")
        # The client program's answer: "Current logging target is:\n`- /var/log/fail2ban.log"
        return reply.strip().splitlines()[-1].removeprefix("`- ").strip()

    def bantime(self, jail: str) -> int:
        """The jail's ban time in seconds; -1 means permanent."""
        return parse_int(self.command("get", jail, "bantime"))

    def set_bantime(self, jail: str, seconds: int) -> int:
        """Set the jail's ban time (-1: permanent); fail2ban answers with the new one."""
        return parse_int(self.command("set", jail, "bantime", str(int(seconds))))

    def jails(self) -> list[str]:
        """The names of the running jails."""
        return parse_jail_list(self.command("status"))

    def close(self) -> None:
        """Say goodbye the way fail2ban-client does and drop the connection."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.sendall(CLOSE + END)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the server is gone already; nothing to tell it
        sock.close()

    def __enter__(self) -> Fail2banClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except UNREACHABLE:
            sock.close()
            raise
        except OSError as error:
            sock.close()
            raise Fail2banError(
                f"cannot connect to fail2ban at {self.socket_path}: {error}"
            ) from None
        try:
            credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            self.server_pid = struct.unpack("3i", credentials)[0]
        except OSError:
            self.server_pid = None
        return sock

    def _socket_command(self, args: Sequence[str]) -> object:
        """Send over the kept connection; if it broke (fail2ban restarted), reconnect once."""
        for attempt in (1, 2):
            reused = self._sock is not None
            if self._sock is None:
                self._sock = self._connect()
            try:
                data = self._exchange(self._sock, args)
            except socket.timeout:
                # A late answer would be read as the reply to the next command.
                self.close()
                raise Fail2banError(
                    f"fail2ban at {self.socket_path} did not answer {describe(args)} "
                    f"within {self.timeout:g}s"
                ) from None
            except OSError as error:
                self.close()
                if reused and attempt == 1:
                    logger.debug("fail2ban connection broke (%s); reconnecting", error)
                    continue
                raise Fail2banError(
                    f"fail2ban at {self.socket_path} dropped the connection during "
                    f"{describe(args)}: {error}"
                ) from None
            return self._result(args, data)
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(self, sock: socket.socket, args: Sequence[str]) -> bytes:
        deadline = time.monotonic() + self.timeout
        # Protocol 4 is read by every Python that runs fail2ban, whatever runs us.
        sock.sendall(pickle.dumps(list(args), protocol=4) + END)
        chunks: list[bytes] = []
        tail = b""
        while not tail.endswith(END):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("fail2ban closed the connection")
            chunks.append(chunk)
            tail = (tail + chunk)[-len(END) :]
        return b"".join(chunks)[: -len(END)]

    def _result(self, args: Sequence[str], data: bytes) -> object:
        try:
            reply = load_reply(data)
        except Exception as error:
            raise Fail2banError(
                f"fail2ban sent an unreadable reply to {describe(args)}: {error!r}"
            ) from None
        # fail2ban answers a request it could not even process with a bare "ERROR: ..." text.
        if isinstance(reply, str):
            raise Fail2banError(f"fail2ban refused {describe(args)}: {reply}")
        if not isinstance(reply, tuple) or len(reply) != 2 or reply[0] not in (0, 1):
            raise Fail2banError(f"fail2ban sent an unexpected reply to {describe(args)}")
        code, result = reply
        if code == 1:
            raise Fail2banError(f"fail2ban refused {describe(args)}: {result}")
        return result

    def _program_command(self, args: Sequence[str]) -> str:
        argv = [self.client_program, "-s", self.socket_path, *args]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise Fail2banError(
                f"fail2ban at {self.socket_path} unreachable, and {self.client_program} "
                f"failed for {describe(args)}: {error}"
            ) from None
        if done.returncode != 0:
            raise Fail2banError(
                f"fail2ban at {self.socket_path}: {self.client_program} "
                f"failed for {describe(args)}: {program_failure(done)}"
            )
        return done.stdout.strip()
