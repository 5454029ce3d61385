"""The Docker Compose test cluster of docker/: built, brought up, attacked.

The attacker fails ssh logins on node1; node1's fail2ban bans it with nftables,
and node2 and node3 must then refuse its TCP connections too, while they still
answer the hub. Everything runs on a private Docker daemon (its own data, sockets
and PID file in a temporary folder, no iptables rules of its own, no default
bridge); the base image is made with mmdebstrap (or debootstrap), and the image takes
f2bzmq's dependencies from Debian's packages, so the build needs Debian's mirror only.
Compose is v2 (`docker compose`) where the docker client has it, else v1's
docker-compose (Debian 12's package). Every exit path stops the daemon and removes
what it made.

Needs root, dockerd, Docker Compose and mmdebstrap or debootstrap: skipped, with the
reason, where one is missing. `python3 -m pytest -s tests/test_docker.py` shows timings.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO / "docker"
SYSTEM_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
NODES = ("node1", "node2", "node3")
PR_SET_PDEATHSIG = 1  # prctl(2)


def find(program: str) -> str | None:
    return shutil.which(program, path=SYSTEM_PATH)


def docker_client(dockerd: str | None) -> str | None:
    """The client that ships with dockerd, not whichever `docker` comes first on PATH."""
    if dockerd:
        real = Path(dockerd).resolve()
        for candidate in (real.parent.parent / "bin" / "docker", real.with_name("docker")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return find("docker")


def compose_command(docker: str | None) -> list[str] | None:
    """Compose v2, the docker client's plugin, where it is there; else v1's docker-compose."""
    if docker is not None:
        plugin = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=60, check=False
        )
        if plugin.returncode == 0:
            return [docker, "compose"]
    legacy = find("docker-compose")
    return [legacy] if legacy else None


DOCKERD = find("dockerd")
DOCKER = docker_client(DOCKERD)
COMPOSE = compose_command(DOCKER)
# The base image comes from Debian's mirror: mmdebstrap is twice as fast as debootstrap.
BOOTSTRAP = find("mmdebstrap") or find("debootstrap")


def missing() -> str | None:
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    for name, path in (
        ("dockerd", DOCKERD),
        ("docker (client)", DOCKER),
        ("Docker Compose (docker compose or docker-compose)", COMPOSE),
        ("mmdebstrap or debootstrap", BOOTSTRAP),
    ):
        if path is None:
            return f"{name} is not installed (Debian: docker.io docker-compose mmdebstrap)"
    return None


pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


class Timings:
    """Seconds per step, printed at the end (visible with pytest -s)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps.append((name, time.monotonic() - start))

    def report(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.steps)


class Command:
    """A command in a process group of its own, its output in files; a time limit or an
    interrupt stops the whole group (SIGTERM, then SIGKILL), so that nothing it started
    goes on writing into the folders the teardown removes."""

    def __init__(self, argv: list[str], env: dict, cwd: Path = REPO) -> None:
        self.argv = argv
        # Files, not pipes: nobody reads a pipe while a command runs in the background.
        self.stdout = tempfile.TemporaryFile()  # noqa: SIM115 - read() closes it
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - read() closes it
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout,
            stderr=self.stderr,
            start_new_session=True,
        )

    def finish(self, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        """Wait for the end; on failure the error carries the command's output."""
        try:
            self.process.wait(timeout=timeout)
        except BaseException as error:
            self.stop()
            if isinstance(error, subprocess.TimeoutExpired):
                raise AssertionError(f"{self.name}: no end after {timeout:.0f} s") from None
            raise
        done = subprocess.CompletedProcess(
            self.argv, self.process.returncode, self.read(self.stdout), self.read(self.stderr)
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{self.name} exited {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
                return

    @property
    def name(self) -> str:
        return " ".join(self.argv)

    @staticmethod
    def read(output) -> str:
        output.seek(0)
        text = output.read().decode(errors="replace")
        output.close()
        return text


def run(
    argv: list[str], env: dict, timeout: float, cwd: Path = REPO, check: bool = True
) -> subprocess.CompletedProcess:
    """A command with a time limit; on failure the error carries its output."""
    return Command(argv, env, cwd).finish(timeout, check)


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or below folder, deepest first."""
    prefix = str(folder)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def processes_using(folder: Path) -> list[int]:
    """PIDs whose command line names folder: the daemon's containerd and shims."""
    marker = os.fsencode(folder)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class PrivateDocker:
    """A dockerd of our own: data, exec root, socket and PID file under one temporary folder.

    Started without iptables rules, IP forwarding, masquerading or the default bridge,
    so it changes nothing of the host's network but the bridge of the lab network,
    which `docker compose down` removes (and stop() too, should down fail)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.log = root / "dockerd.log"
        self.process: subprocess.Popen | None = None
        self.bridges: set[str] = set()
        config = root / "daemon.json"
        config.write_text("{}\n")  # not the host's /etc/docker/daemon.json
        (root / "client").mkdir()
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DOCKER_", "COMPOSE_"))
        }
        self.env.update(
            DOCKER_HOST=f"unix://{self.socket}",
            DOCKER_CONFIG=str(root / "client"),
            # Compose v1 runs `docker` for exec unless told to use its own client.
            COMPOSE_INTERACTIVE_NO_CLI="1",
            COMPOSE_DOCKER_CLI_BUILD="0",
            DOCKER_BUILDKIT="0",
            PATH=f"{Path(DOCKER).parent}:{self.env.get('PATH', '/usr/bin:/bin')}",
        )
        self.argv = [
            DOCKERD,
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
            f"--config-file={config}",
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'dockerd.pid'}",
            f"--host=unix://{self.socket}",
        ]

    def start(self, timeout: float = 60) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=stop_with_parent,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"dockerd exited {self.process.returncode}\n{self.log_tail()}")
            if self.socket.exists() and self.docker("version", check=False).returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"dockerd gave no answer in {timeout} s\n{self.log_tail()}")
            time.sleep(0.25)

    def docker(self, *args: str, timeout: float = 60, check: bool = True):
        return run([DOCKER, *args], self.env, timeout, check=check)

    def compose(self, *args: str, timeout: float = 120, check: bool = True):
        return run([*COMPOSE, *args], self.env, timeout, cwd=DOCKER_DIR, check=check)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def remember_bridges(self) -> None:
        """The host interfaces of this daemon's bridge networks, to remove if it leaves them."""
        listed = self.docker("network", "ls", "-q", "--no-trunc", "--filter", "driver=bridge")
        self.bridges |= {f"br-{network[:12]}" for network in listed.stdout.split()}

    def stop(self) -> None:
        """Stop the daemon, then kill what it left, unmount what it mounted, remove bridges."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(AssertionError):
                self.remember_bridges()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in processes_using(self.root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10)
        for point in mounts_under(self.root):
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for bridge in sorted(self.bridges):
            if Path("/sys/class/net", bridge).exists():
                subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)


@pytest.fixture
def docker() -> Iterator[PrivateDocker]:
    # A short path of its own: dockerd's and containerd's sockets live under it.
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-docker-", dir="/tmp"))
    daemon = PrivateDocker(root)
    try:
        daemon.start()
        yield daemon
    finally:
        start = time.monotonic()
        try:
            with contextlib.suppress(AssertionError):
                daemon.compose("down", "--volumes", "--remove-orphans", "--timeout", "5")
        finally:
            daemon.stop()
            left = mounts_under(root)
            if not left:
                subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
            print(f"docker cluster: down and dockerd stop {time.monotonic() - start:.1f} s")
        assert not left, f"{root} still has mounts: {left}"


def attacker(docker: PrivateDocker, *args: str, container: str = "attacker", timeout: float = 120):
    return docker.compose("exec", "-T", container, "f2bzmq-attacker", *args, timeout=timeout)


def reachability(docker: PrivateDocker, container: str = "attacker") -> dict[str, str]:
    """node -> what a connection from container to its port 22 meets (open …, refused, …)."""
    lines = attacker(docker, "probe", *NODES, container=container).stdout.splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def banned(docker: PrivateDocker, node: str, jail: str) -> list[str]:
    answer = docker.compose("exec", "-T", node, "fail2ban-client", "get", jail, "banip")
    return answer.stdout.split()


def health(docker: PrivateDocker, service: str) -> dict:
    """Docker's health record of a service's container: Status and the checks' Log."""
    container = docker.compose("ps", "-q", service).stdout.strip()
    answer = docker.docker("inspect", "--format", "{{json .State.Health}}", container)
    return json.loads(answer.stdout)


def wait_health(docker: PrivateDocker, service: str, status: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = health(docker, service)
        if record["Status"] == status:
            return record
        if time.monotonic() >= deadline:
            raise AssertionError(f"{service} not {status} after {timeout:g} s: {record}")
        time.sleep(1)


def diagnostics(docker: PrivateDocker) -> str:
    parts = []
    for args in (("ps",), ("logs", "--no-color", "--tail=40")):
        done = docker.compose(*args, check=False, timeout=60)
        parts.append(done.stdout[-6000:] + done.stderr[-2000:])
    return "\n".join(parts)


def test_a_ban_on_node1_makes_node2_and_node3_refuse_the_attacker(docker):
    timings = Timings()
    with timings.step("base image"):
        base_image = Command(
            ["bash", str(DOCKER_DIR / "base-image.sh"), str(docker.root)],
            dict(docker.env, DOCKER=DOCKER),
        )
        base_image.finish(timeout=600)
    with timings.step("build"):
        docker.compose("build", "hub", timeout=900)
    try:
        with timings.step("up"):
            docker.compose("up", "-d", timeout=300)
        docker.remember_bridges()
        before = reachability(docker)
        assert all(before.get(node, "").startswith("open") for node in NODES), before

        with timings.step("attack -> node2 and node3 refuse"):
            attack = attacker(docker, "attack", "node1", "--tries", "8").stdout
            sources = set(re.findall(r"failed login on node1 from (\S+)", attack))
            assert len(sources) == 1, attack
            (source,) = sources
            attacker(docker, "wait-refused", *NODES, "--timeout", "90", timeout=180)

        after = reachability(docker)
        assert all(after.get(node) == "refused" for node in NODES), after
        # The ban is the attacker's alone: another container still gets in.
        from_hub = reachability(docker, container="hub")
        assert all(from_hub.get(node, "").startswith("open") for node in NODES), from_hub
        assert source in banned(docker, "node1", "sshd")
        for node in ("node2", "node3"):
            assert source in banned(docker, node, "cluster"), node
        # Every connection to the hub used CURVE keys, none the plain-TCP opt-out.
        hub_log = docker.compose("logs", "--no-color", "hub").stdout
        assert "insecure = true" not in hub_log, hub_log

        # Health is the daemons' own `status`: a frozen subscriber makes its node
        # unhealthy (no answer within 5 s), and healthy again once it runs.
        for service, role in (("hub", "publisher"), ("node3", "subscriber")):
            checks = health(docker, service)["Log"]
            assert checks and f"Status of fail2ban-{role}" in checks[-1]["Output"], checks
        freeze = 'kill -{} "$(cat /run/fail2ban-cluster/subscriber.pid)"'
        with timings.step("frozen subscriber -> unhealthy -> healthy"):
            docker.compose("exec", "-T", "node3", "sh", "-c", freeze.format("STOP"))
            try:
                frozen = wait_health(docker, "node3", "unhealthy", 90)
            finally:
                docker.compose("exec", "-T", "node3", "sh", "-c", freeze.format("CONT"))
            assert "did not answer" in frozen["Log"][-1]["Output"], frozen["Log"][-1]
            wait_health(docker, "node3", "healthy", 60)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnostics(docker)}") from None
    print(f"\ndocker cluster: {timings.report()}")
    print(json.dumps({"before": before, "after": after, "attacker": source}))
