"""A hub and two fail2ban nodes made of one Debian root file system with the f2bzmq .deb.

    unshare --mount --pid --net --fork --kill-child python3 tests/debian_cluster.py ROOT WORK

Run by tests/test_debian_package.py as the first process of new PID, mount and network
namespaces: every mount made here vanishes with the mount namespace, every process
with the PID namespace, and the cluster's traffic stays on a loopback of its own.

ROOT has f2bzmq installed with `apt-get install ./f2bzmq_*.deb` and stays as it is:
each server (hub, node1, node2) is an overlay on it with its own /etc, /var and /run
under WORK, set up the way README.md tells an admin to: keys made with the installed
commands, a fail2ban-cluster.local, the shipped sync jail, `f2bzmq-ROLE start`. Each
node runs Debian's fail2ban with its default configuration, the sshd jail reading
/var/log/auth.log; ban actions are `dummy`, since the three servers share one
network namespace (the firewall path is the netns lab's and the Docker test's).

The hub runs as its installed unit would run it, with no privilege: as the unit's
User= (the package's `_f2bzmq`, which `keygen hub` made the owner of the hub's
secret), in the StateDirectory= and RuntimeDirectory= systemd would make for it;
`systemctl reload` is its ExecReload= as that user. Before, a hub of the layout of
old (its ban table in state_dir itself) is left behind, and the package's postinst
must move that table into the hub's folder, as the hub's, and give back to it a
secret key made root's.

node1's fail2ban bans an address after failed ssh logins; node2's sync jail must
then hold it, and lose it once node1 lifts the ban; banned again, the installed
`f2bzmq-cluster` lists it and lifts it on both nodes. Last, `apt-get purge` on the hub
must remove its databases and logs and keep its keys, and the installed demo
(`python3 -m f2bzmq demo`) must run on node1. Prints one JSON line of results;
exits non-zero, with the servers' logs on stderr, when something fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ATTACKER = "198.51.100.7"
CONF_DIR = Path("etc/fail2ban-cluster")
UNITS = ("fail2ban-monitor", "fail2ban-publisher", "fail2ban-subscriber", "fail2ban-relay")
HUB_UNIT = "/lib/systemd/system/fail2ban-publisher.service"
STATE = "/var/lib/fail2ban-cluster"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
COMMAND_TIMEOUT = 60
WAIT = 30.0

# The operator's part of the fail2ban configuration on each node. sshd's log is a file
# here (Debian 13's default reads the journal), and every action is `dummy`.
FAIL2BAN_LOCAL = """\
[DEFAULT]
banaction = dummy
banaction_allports = dummy

[sshd]
enabled = true
backend = polling
logpath = /var/log/auth.log
maxretry = 2
"""


class Failed(Exception):
    """A step that did not do what it must; the message says which."""


class Server:
    """One server: an overlay of the installed root, entered with chroot."""

    def __init__(self, name: str, base: Path, work: Path) -> None:
        self.name = name
        self.root = work / name / "root"
        upper, scratch = work / name / "upper", work / name / "scratch"
        for folder in (self.root, upper, scratch):
            folder.mkdir(parents=True)
        mount(
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={base},upperdir={upper},workdir={scratch}",
            self.root,
        )
        mount("-t", "proc", "proc", self.root / "proc")
        mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", self.root / "run")
        mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", self.root / "tmp")

    def run(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT):
        return chroot(self.root, *argv, check=check, timeout=timeout)

    def path(self, inside: str | Path) -> Path:
        return self.root / str(inside).lstrip("/")

    def write(self, inside: str, text: str, append: bool = False) -> None:
        path = self.path(inside)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if append else "w") as handle:
            handle.write(text)

    def banned(self, jail: str) -> list[str]:
        return self.run("fail2ban-client", "get", jail, "banip").stdout.split()

    def logs(self) -> str:
        parts = []
        for pattern in ("var/log/fail2ban-cluster/*.log", "var/log/fail2ban.log"):
            for log in sorted(self.root.glob(pattern)):
                lines = log.read_text(errors="replace").splitlines()[-25:]
                parts.append(f"--- {self.name}: /{log.relative_to(self.root)}\n" + "\n".join(lines))
        return "\n".join(parts)


def mount(*argv: str | Path) -> None:
    subprocess.run(["mount", *map(str, argv)], check=True, timeout=COMMAND_TIMEOUT)


def chroot(
    root: Path, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["chroot", str(root), *argv],
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise Failed(f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done


def wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> float:
    """Seconds until condition() held; Failed naming `what` if it never did."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise Failed(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)
    return time.monotonic() - start


def check_package(root: Path) -> dict:
    """What apt-get installed: where the code and the units are, and that systemd takes
    the units; nothing came from pip."""
    found = {}
    where = chroot(
        root, "python3", "-c", "import f2bzmq, zmq; print(f2bzmq.__file__, zmq.__file__)"
    )
    found["modules"] = where.stdout.split()
    owner = chroot(root, "dpkg", "-S", found["modules"][0]).stdout.split(":")[0]
    if owner != "f2bzmq" or not found["modules"][1].startswith("/usr/lib/python3/dist-packages/"):
        raise Failed(f"f2bzmq or pyzmq not from Debian packages: {found['modules']} ({owner})")
    if chroot(root, "python3", "-m", "pip", "--version", check=False).returncode == 0:
        raise Failed("pip is installed: the package must need none")
    versions = chroot(
        root,
        "dpkg-query",
        "-W",
        "-f",
        "${Package} ${Version}\\n",
        "f2bzmq",
        "fail2ban",
        "python3-zmq",
        "python3-daemon",
        "python3-watchdog",
        "systemd",
    )
    found["versions"] = dict(line.split(" ", 1) for line in versions.stdout.splitlines())
    units = [f"/lib/systemd/system/{unit}.service" for unit in UNITS]
    verify = chroot(root, "systemd-analyze", "verify", "--man=no", *units, check=False)
    if verify.returncode != 0 or verify.stderr.strip():
        raise Failed(f"systemd-analyze verify: exit {verify.returncode}\n{verify.stderr}")
    conffiles = chroot(root, "dpkg-query", "-W", "-f", "${Conffiles}", "f2bzmq").stdout
    for conffile in (
        "/etc/fail2ban-cluster/fail2ban-cluster.conf",
        "/etc/fail2ban/jail.d/f2bzmq-cluster.conf",
        "/etc/fail2ban/filter.d/f2bzmq-cluster.conf",
    ):
        if f" {conffile} " not in conffiles:
            raise Failed(f"{conffile} is not a conffile: {conffiles}")
    enabled = list(root.glob("etc/systemd/system/*.wants/fail2ban-[mprs]*.service"))
    if enabled:
        raise Failed(f"the package enabled units itself: {enabled}")
    programs = ("monitor", "publisher", "subscriber", "relay", "cluster")
    for program in (f"f2bzmq-{name}" for name in programs):
        chroot(root, program, "--version")
        if not (root / f"usr/share/man/man1/{program}.1.gz").is_file():
            raise Failed(f"no manual page for {program}")
    return found


def configure(hub: Server, nodes: list[Server]) -> None:
    """README's steps: a key pair per server, the public halves copied, a .local each."""
    hub.run("f2bzmq-publisher", "keygen", "hub")
    keys = hub.path(CONF_DIR / "keys")
    owner = owner_of(hub, f"/{CONF_DIR}/keys/hub.key_secret")
    if owner != "_f2bzmq 600":
        raise Failed(f"keygen hub made the secret {owner}, not the publisher's user's")
    (keys / "nodes").mkdir(exist_ok=True)  # the package makes it, for the hub's user
    hub.write(
        f"/{CONF_DIR}/fail2ban-cluster.local",
        "[general]\nnode = hub\nhubs = 127.0.0.1   ; the publisher's address\n"
        "[publisher]\nbind = 127.0.0.1\n",
    )
    for node in nodes:
        node.run("f2bzmq-monitor", "keygen", node.name)
        node_keys = node.path(CONF_DIR / "keys")
        shutil.copy(node_keys / f"{node.name}.key", keys / "nodes")
        shutil.copy(keys / "hub.key", node_keys)
        # A drop-in, read after fail2ban-cluster.conf and before the .local.
        node.write(f"/{CONF_DIR}/fail2ban-cluster.d/hubs.conf", "[general]\nhubs = 127.0.0.1\n")
        node.write(f"/{CONF_DIR}/fail2ban-cluster.local", f"[general]\nnode = {node.name}\n")


def owner_of(server: Server, path: str) -> str:
    """ "USER MODE" of a file, as stat says."""
    return server.run("stat", "-c", "%U %a", path).stdout.strip()


def state_id(server: Server, table: str) -> str:
    """The id of the state a hub's ban table holds."""
    query = (
        "import sqlite3, sys; "
        "print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0])"
    )
    select = "SELECT value FROM meta WHERE key = 'instance'"
    return server.run("python3", "-c", query, table, select).stdout.strip()


def leave_an_old_hub(hub: Server) -> str:
    """A hub of the layout before the hub had folders of its own (its ban table in
    state_dir itself), stopped, and its secret key root's: the state id of its table."""
    old_layout = f"/{CONF_DIR}/fail2ban-cluster.d/old-layout.conf"
    hub.write(old_layout, f"[publisher]\nstate_dir = {STATE}\n")
    hub.run("f2bzmq-publisher", "start")
    hub.run("f2bzmq-publisher", "stop")
    hub.path(old_layout).unlink()
    hub.run("chown", "root:root", f"/{CONF_DIR}/keys/hub.key_secret")
    return state_id(hub, f"{STATE}/publisher.sqlite3")


def postinst_takes_over(hub: Server, old_state: str) -> None:
    """The package's postinst, as an upgrade runs it: the old hub's table moved, the
    same state, all of it the hub's; the secret key the hub's again."""
    hub.run("/var/lib/dpkg/info/f2bzmq.postinst", "configure", "0.1.0", timeout=180)
    table = f"{STATE}/publisher/publisher.sqlite3"
    if hub.path(f"{STATE}/publisher.sqlite3").exists() or state_id(hub, table) != old_state:
        raise Failed("the postinst did not move the old hub's ban table into its folder")
    for path, expected in (
        (f"{STATE}/publisher", "_f2bzmq 755"),
        (table, "_f2bzmq 600"),
        (f"/{CONF_DIR}/keys/hub.key_secret", "_f2bzmq 600"),
    ):
        if owner_of(hub, path) != expected:
            raise Failed(f"after the postinst {path} is {owner_of(hub, path)}, not {expected}")


def unit_settings(server: Server, unit: str) -> dict[str, str]:
    """The [Service] settings of an installed unit, one value each."""
    settings = {}
    for line in server.path(unit).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


def as_unit_user(server: Server, settings: dict[str, str], command: str) -> list[str]:
    """The unit's command line run as its User= and Group= (setpriv), inside the server."""
    user, group = settings["User"], settings["Group"]
    privileges = [f"--reuid={user}", f"--regid={group}", "--init-groups"]
    return ["chroot", str(server.root), "setpriv", *privileges, *command.split()]


def start_hub_as_its_unit(hub: Server, work: Path) -> subprocess.Popen:
    """What systemd does for fail2ban-publisher.service: its state and runtime folders
    made the unit user's, then ExecStart= as that user, its output the journal's."""
    unit = unit_settings(hub, HUB_UNIT)
    owner = f"{unit['User']}:{unit['Group']}"
    for folder in (f"/var/lib/{unit['StateDirectory']}", f"/run/{unit['RuntimeDirectory']}"):
        hub.run("install", "-d", "-m", "0755", "-o", unit["User"], "-g", unit["Group"], folder)
        hub.run("chown", "-R", owner, folder)
    journal = (work / "hub-journal.log").open("w")
    return subprocess.Popen(
        as_unit_user(hub, unit, unit["ExecStart"]),
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=journal,
        stderr=subprocess.STDOUT,
    )


def refuses_a_key_it_cannot_read(hub: Server, work: Path) -> None:
    """A hub secret copied in as root's: the hub does not start, and says what to do."""
    secret = f"/{CONF_DIR}/keys/hub.key_secret"
    hub.run("chown", "root:root", secret)
    started = start_hub_as_its_unit(hub, work)
    code = started.wait(COMMAND_TIMEOUT)
    said = (work / "hub-journal.log").read_text()
    if code != 1 or "can't be read by _f2bzmq, which runs this daemon: make it" not in said:
        raise Failed(f"a hub with a key it can't read: exit {code}\n{said}")
    if f"(chown _f2bzmq {secret}); only its owner may read it" not in said:
        raise Failed(f"a hub with a key it can't read does not say how to fix it:\n{said}")
    hub.run("chown", "_f2bzmq:_f2bzmq", secret)


def reload_hub_as_its_unit(hub: Server) -> None:
    """`systemctl reload fail2ban-publisher`: ExecReload= as the unit's user."""
    unit = unit_settings(hub, HUB_UNIT)
    done = subprocess.run(
        as_unit_user(hub, unit, unit["ExecReload"]),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if done.returncode != 0 or "|- Applied: nothing changed" not in done.stdout:
        raise Failed(
            f"the hub unit's ExecReload: exit {done.returncode}\n{done.stdout}{done.stderr}"
        )


def start_fail2ban(node: Server) -> None:
    node.write("/etc/fail2ban/jail.d/zz-cluster-test.local", FAIL2BAN_LOCAL)
    node.write("/var/log/auth.log", "")
    node.path("run/fail2ban").mkdir()
    node.run("fail2ban-client", "start")
    wait_for(
        f"{node.name}: fail2ban answers",
        lambda: node.run("fail2ban-client", "ping", check=False).returncode == 0,
    )
    # The package's sync jail runs in the release's fail2ban, enabled as shipped.
    node.run("fail2ban-client", "status", "cluster")


def healthy(server: Server, role: str) -> bool:
    return server.run(f"f2bzmq-{role}", "status", check=False).returncode == 0


def attack(node: Server, tries: int = 3) -> None:
    """Failed ssh logins, written the way sshd logs them."""
    prefix = f"{time.strftime('%b %d %H:%M:%S')} {node.name} sshd[4242]: Failed password for root"
    lines = "".join(f"{prefix} from {ATTACKER} port {50000 + n} ssh2\n" for n in range(tries))
    node.write("/var/log/auth.log", lines, append=True)


def console(hub: Server, node1: Server, node2: Server) -> dict:
    """The console installed: root's admin key made on the hub, the ban listed with its
    origin, then lifted with one command from node1's sshd jail and node2's sync jail."""
    hub.run("f2bzmq-cluster", "keygen")
    attack(node1, tries=4)
    timings = {
        "node2 banned again": wait_for(
            "node2's sync jail bans it again", lambda: ATTACKER in node2.banned("cluster")
        )
    }
    listed = json.loads(hub.run("f2bzmq-cluster", "bans", "--json").stdout)
    origins = [(o["node"], o["source"]) for ban in listed for o in ban["origins"]]
    if origins != [("node1", "report")]:
        raise Failed(f"f2bzmq-cluster bans: {listed}")
    hub.run("f2bzmq-cluster", "unban", ATTACKER, "--hold", "10m", "--reason", "test")
    timings["lifted by the console"] = wait_for(
        "node1's sshd jail and node2's sync jail lift it",
        lambda: ATTACKER not in node1.banned("sshd") + node2.banned("cluster"),
    )
    return timings


def purge(server: Server) -> None:
    """apt-get purge removes the databases and logs, and keeps the keys and the user."""
    server.run("apt-get", "purge", "-y", "-q", "f2bzmq")
    for gone in (
        "var/lib/fail2ban-cluster",
        "var/log/fail2ban-cluster",
        "usr/bin/f2bzmq-publisher",
    ):
        if server.path(gone).exists():
            raise Failed(f"{server.name}: /{gone} is still there after the purge")
    if not server.path(CONF_DIR / "keys" / "hub.key_secret").is_file():
        raise Failed(f"{server.name}: the purge removed the keys")
    server.run("getent", "passwd", "_f2bzmq")


def scenario(base: Path, work: Path) -> dict:
    mount("-t", "proc", "proc", base / "proc")
    results: dict = {"package": check_package(base)}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=COMMAND_TIMEOUT)
    hub = Server("hub", base, work)
    nodes = [Server(name, base, work) for name in ("node1", "node2")]
    servers = [hub, *nodes]
    hub_process = None
    try:
        configure(hub, nodes)
        postinst_takes_over(hub, leave_an_old_hub(hub))
        refuses_a_key_it_cannot_read(hub, work)
        hub_process = start_hub_as_its_unit(hub, work)
        wait_for("hub: publisher status answers", lambda: healthy(hub, "publisher"))
        if owner_of(hub, "/run/fail2ban-cluster/publisher/publisher.pid") != "_f2bzmq 644":
            raise Failed("the hub does not run as its unit's user")
        for node in nodes:
            start_fail2ban(node)
            node.run("f2bzmq-subscriber", "start")
            node.run("f2bzmq-monitor", "start")
        for node in nodes:
            for role in ("subscriber", "monitor"):
                wait_for(
                    f"{node.name}: {role} status healthy", lambda n=node, r=role: healthy(n, r)
                )
        node1, node2 = nodes
        attack(node1)
        timings = results["seconds"] = {}
        timings["node1 banned"] = wait_for(
            "node1 bans the attacker", lambda: ATTACKER in node1.banned("sshd")
        )
        timings["node2 banned"] = wait_for(
            "node2's sync jail bans it", lambda: ATTACKER in node2.banned("cluster")
        )
        if ATTACKER in node1.banned("cluster"):
            raise Failed("node1's own ban came back to it through the cluster")
        if not healthy(hub, "publisher"):
            raise Failed("the publisher's status reports a problem")
        reload_hub_as_its_unit(hub)
        node1.run("fail2ban-client", "set", "sshd", "unbanip", ATTACKER)
        timings["node2 unbanned"] = wait_for(
            "node2's sync jail lifts it", lambda: ATTACKER not in node2.banned("cluster")
        )
        timings.update(console(hub, node1, node2))
        for node in nodes:
            node.run("f2bzmq-monitor", "stop")
            node.run("f2bzmq-subscriber", "stop")
        hub_process.terminate()  # systemctl stop's SIGTERM
        if hub_process.wait(COMMAND_TIMEOUT) != 0:
            raise Failed(f"the hub exited with {hub_process.returncode} on SIGTERM")
        purge(hub)
        # The demo comes with the package: its own hub and nodes, beside node1's fail2ban.
        demo = node1.run("python3", "-m", "f2bzmq", "demo", "--nodes", "2", timeout=180)
        if "done: the demo cluster is stopped" not in demo.stdout:
            raise Failed(f"python3 -m f2bzmq demo:\n{demo.stdout}{demo.stderr}")
        return results
    except (Failed, subprocess.SubprocessError, OSError) as error:
        journal = work / "hub-journal.log"
        hub_output = journal.read_text(errors="replace")[-3000:] if journal.exists() else ""
        logs = "\n".join(server.logs() for server in servers)
        raise Failed(f"{error}\n--- hub: its unit's output\n{hub_output}\n{logs}") from None
    finally:
        if hub_process is not None and hub_process.poll() is None:
            hub_process.kill()
            hub_process.wait(10)


def main(argv: list[str]) -> int:
    base, work = Path(argv[0]), Path(argv[1])
    try:
        results = scenario(base, work)
    except Failed as error:
        print(error, file=sys.stderr)
        return 1
    print(json.dumps(results))
    return 0


def reap_orphans_while(child: int) -> int:
    """As the first process of the PID namespace: daemons that detach (`start`) become our
    children; reap them so that `stop` sees them end, until the scenario's process exits."""
    while True:
        pid, status = os.wait()
        if pid == child:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    scenario_pid = os.fork()
    if scenario_pid == 0:
        code = main(sys.argv[1:])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(reap_orphans_while(scenario_pid))
