"""A cluster whose nodes have real firewalls: each node's fail2ban in a network namespace.

One namespace holds a Linux bridge; node1..node3 and an attacker each get a veth link to
it and an address in 10.250.0.0/24, which exists only inside these namespaces. Each node
runs a real fail2ban-server (`ip netns exec`) whose jails block with a real ban action,
so a ban changes that namespace's firewall and nothing else, and a small TCP listener;
the attacker connects to the listeners to see who is blocked. The hub, the monitors and
the subscribers run outside on 127.0.0.1, as in `f2bzmq.lab.Cluster`: they need only
fail2ban's log and socket files.

    with NetnsCluster(tmp_path, "nftables-multiport") as lab:
        lab.cluster["node1"].fail2ban.attack(ATTACKER)
        assert lab.watch(reachable=False, timeout=30).settled

Every `ip` command names its namespace and every namespace's name carries this process's
pid and a random suffix, so parallel or aborted runs never meet, and the host's links,
addresses and firewall are never touched.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from f2bzmq.lab import Cluster, Fail2banServer, run_command
from tests.support.netns import Namespaces, netns_holds

NODES = {"node1": "10.250.0.11", "node2": "10.250.0.12", "node3": "10.250.0.13"}
ATTACKER = "10.250.0.66"
PREFIX_LENGTH = 24
LISTEN_PORT = 2222
# What a listener says on accept: a connection counts as open only if this arrives.
GREETING = "f2bzmq-lab"
# Listeners stop by themselves after this long, should a teardown ever miss one.
LISTENER_LIFETIME = 600
SSHD_BANTIME = 600
SYNC_BANTIME = 86400
# The test cluster's stand-in sshd and attacker (docker/): every login fails and is logged
# as sshd logs it, with the client's real address; a client that sends nothing is not.
DOCKER = Path(__file__).resolve().parent.parent.parent / "docker"
SSH_BANNER = "SSH-2.0-"

# Arguments: port, greeting, lifetime in seconds.
LISTENER = """
import socket, sys, time
greeting, deadline = sys.argv[2].encode(), time.monotonic() + float(sys.argv[3])
server = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=64)
server.settimeout(1)
while time.monotonic() < deadline:
    try:
        connection, _ = server.accept()
    except socket.timeout:
        continue
    with connection:
        connection.sendall(greeting)
"""

# Connects to every target until each is in the wanted state (open: the greeting arrives;
# blocked: anything else, refused, reset or timed out), then prints when each got there.
# Arguments: {name: address} as JSON, port, greeting, "open" or "blocked", timeout in seconds.
PROBE = """
import json, socket, sys, time
targets, port, greeting = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
want, timeout = sys.argv[4], float(sys.argv[5])
def is_open(address):
    try:
        with socket.create_connection((address, port), timeout=0.5) as connection:
            connection.settimeout(0.5)
            return connection.recv(len(greeting)) == greeting
    except OSError:
        return False
deadline = time.monotonic() + timeout
since = {}
print("watching", flush=True)
while True:
    states = {name: is_open(address) for name, address in targets.items()}
    now = time.time()
    for name, state in states.items():
        if state == (want == "open"):
            since.setdefault(name, now)
        else:
            since.pop(name, None)
    settled = len(since) == len(targets)
    if settled or time.monotonic() >= deadline:
        break
    time.sleep(0.02)
print(json.dumps({"settled": settled, "since": since, "reachable": states}), flush=True)
"""


# The stand-in sshd in this process, which ends by itself after its lifetime (argv[1]) like
# the listener; the rest of argv is its own.
BOUNDED_SSHD = f"""
import os, runpy, sys, threading
threading.Timer(float(sys.argv[1]), os._exit, (0,)).start()
sys.argv = [{str(DOCKER / "fake_sshd.py")!r}, *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def missing_requirements() -> str | None:
    """Why this lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces and firewalls need root"
    for program in ("ip", "nft", "iptables"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


@dataclass
class Watch:
    """What the attacker saw: whether every node got to the wanted state in time, and the
    wall-clock time (time.time()) from which each node stayed there; `reachable` is each
    node's state at the last attempt."""

    settled: bool
    since: dict[str, float] = field(default_factory=dict)
    reachable: dict[str, bool] = field(default_factory=dict)


def jails_with(action: str, port: int) -> Callable[[Fail2banServer], str]:
    """lab's default jails (sshd and the sync jail), both blocking with a real ban action."""

    # The project's nftables-set action keeps each jail's bans in a table of its own.
    extra = ", table=f2bzmq-%(__name__)s" if action.endswith(".py") else ""

    def jails(server: Fail2banServer) -> str:
        text = server.default_jails(SSHD_BANTIME, SYNC_BANTIME)
        for jail in ("sshd", server.sync_jail):
            dummy = f"action = dummy[target={server.directory / (jail + '.dummy')}]"
            if dummy not in text:
                raise AssertionError(f"no dummy action for {jail} in lab's default jails")
            text = text.replace(dummy, f"action = {action}[port={port}, protocol=tcp{extra}]")
        return text

    return jails


class NetnsCluster:
    """The namespaces, a listener per node, and a `lab.Cluster` whose fail2ban-servers run
    in the node namespaces and ban with `action` (any action taking port= and protocol=).

    `cluster` is the running Cluster; `namespaces` maps node1..node3, attacker and bridge
    to their namespace. Leaving the `with` block ends every process and namespace, also
    when the block failed.
    """

    def __init__(
        self,
        root: Path,
        action: str,
        port: int = LISTEN_PORT,
        sshd: bool = False,
        sshd_maxretry: int = 2,
        **sections: dict[str, str],
    ) -> None:
        """`sshd`: each node's listener is the stand-in sshd, whose failed logins go to the
        node's auth log; `sections`: configuration sections, as for Cluster."""
        self.root = Path(root)
        self.action = action
        self.port = port
        self.sshd = sshd
        self.greeting = SSH_BANNER if sshd else GREETING
        self._namespaces = Namespaces()
        self.namespaces: dict[str, str] = {}
        self.listeners: dict[str, subprocess.Popen] = {}
        self.cluster = Cluster(
            self.root,
            size=len(NODES),
            fail2ban=lambda node: {
                "jails": jails_with(action, port),
                "netns": self._namespaces.prefix + node,
                "sshd_maxretry": sshd_maxretry,
            },
            **sections,
        )

    def __enter__(self) -> NetnsCluster:
        try:
            self._build_network()
            for node in NODES:
                self._start_listener(node)
            self.cluster.__enter__()
            self._check_isolation()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.cluster.__exit__()
        finally:
            try:
                self._stop_listeners()
            finally:
                self._namespaces.close()

    def _build_network(self) -> None:
        bridge = self.namespaces["bridge"] = self._namespaces.add("bridge")
        run_command("ip", "-n", bridge, "link", "set", "lo", "up")
        run_command("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
        run_command("ip", "-n", bridge, "link", "set", "br0", "up")
        for name, address in {**NODES, "attacker": ATTACKER}.items():
            namespace = self.namespaces[name] = self._namespaces.add(name)
            port = f"to-{name}"
            peer = ("peer", "eth0", "netns", namespace)
            run_command("ip", "-n", bridge, "link", "add", port, "type", "veth", *peer)
            run_command("ip", "-n", bridge, "link", "set", port, "master", "br0", "up")
            run_command("ip", "-n", namespace, "link", "set", "lo", "up")
            run_command(
                "ip", "-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", "eth0"
            )
            run_command("ip", "-n", namespace, "link", "set", "eth0", "up")

    def _check_isolation(self) -> None:
        """Each fail2ban-server runs in its node's namespace: its bans can reach no other
        firewall. Checked before any ban, since the actions start on the first one."""
        for node in NODES:
            server = self.cluster[node].fail2ban
            pid = int(server.pidfile.read_text())
            if not netns_holds(self.namespaces[node], pid):
                raise RuntimeError(f"fail2ban-server {node} (pid {pid}) is not in its namespace")

    def _start_listener(self, node: str) -> None:
        if self.sshd:
            auth_log = str(self.cluster[node].fail2ban.auth_log)
            arguments = ["--port", str(self.port), "--log", auth_log]
            program = ["-c", BOUNDED_SSHD, str(LISTENER_LIFETIME), *arguments]
        else:
            program = ["-c", LISTENER, str(self.port), GREETING, str(LISTENER_LIFETIME)]
        with (self.root / f"{node}-listener.out").open("ab") as output:
            self.listeners[node] = subprocess.Popen(
                [*self.exec_in(node), sys.executable, *program],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def _stop_listeners(self) -> None:
        for listener in self.listeners.values():
            if listener.poll() is None:
                listener.kill()
            listener.wait(10)
        self.listeners.clear()

    def exec_in(self, name: str) -> list[str]:
        """The prefix that runs a command inside a namespace of the lab."""
        return ["ip", "netns", "exec", self.namespaces[name]]

    def listeners_alive(self) -> bool:
        return all(listener.poll() is None for listener in self.listeners.values())

    def watch(
        self,
        reachable: bool,
        timeout: float,
        nodes: dict[str, str] | None = None,
        start: Callable[[], None] | None = None,
        source: str = "attacker",
    ) -> Watch:
        """Connect from `source` to each node's listener until every one is reachable (or
        every one is blocked) or timeout seconds pass. `start` runs once the watching has
        begun, so what it causes is timed from its very first effect."""
        targets = nodes if nodes is not None else NODES
        command = [
            *self.exec_in(source),
            *(sys.executable, "-c", PROBE, json.dumps(targets), str(self.port), self.greeting),
            *("open" if reachable else "blocked", str(timeout)),
        ]
        # Unbuffered: readline() must not swallow the result that communicate() reads.
        with subprocess.Popen(
            command,
            bufsize=0,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as probe:
            try:
                ready, _, _ = select.select([probe.stdout], [], [], 30)
                if not ready or probe.stdout.readline().strip() != b"watching":
                    raise RuntimeError(f"the probe in {source} did not start")
                if start is not None:
                    start()
                output, errors = probe.communicate(timeout=timeout + 30)
            finally:
                if probe.poll() is None:
                    probe.kill()
                    probe.wait(10)
        if probe.returncode != 0:
            raise RuntimeError(f"the probe in {source} failed: {errors.decode().strip()}")
        return Watch(**json.loads(output))

    def fail_logins(self, node: str, tries: int) -> None:
        """The attacker fails `tries` logins on a node's stand-in sshd (`sshd=True`)."""
        run_command(
            *self.exec_in("attacker"),
            *(sys.executable, str(DOCKER / "attacker.py"), "--port", str(self.port)),
            *("attack", NODES[node], "--tries", str(tries)),
        )

    def answers_inside(self, node: str) -> bool:
        """The node's listener still accepts from its own namespace (nothing bans loopback)."""
        return self.watch(True, 5, {node: "127.0.0.1"}, source=node).settled

    def firewall(self, node: str) -> str:
        """The node's rules, as nft and iptables-save list them (whichever backend holds them)."""
        return "\n".join(
            run_command(*self.exec_in(node), *command)
            for command in (("nft", "list", "ruleset"), ("iptables-save",))
        )

    def diagnostics(self) -> str:
        parts = [self.cluster.diagnostics()]
        for node in NODES:
            try:
                parts.append(f"--- {node} firewall ---\n{self.firewall(node)}")
            except Exception as error:
                parts.append(f"--- {node} firewall ---\n{error}")
        return "\n".join(parts)
