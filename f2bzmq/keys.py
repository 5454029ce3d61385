"""CURVE keys: make them, load them safely, and let only known nodes in.

Layout of `keys_dir` (the same on every server, minus the secrets it must not hold):

    hub.key              the hubs' public key: every node checks the hub with it
    hub.key_secret       the hubs' key pair (only on hub servers)
    NODE.key_secret      this node's key pair (only on that node)
    nodes/NODE.key       public keys of the nodes a hub accepts; the file name is the node's name
    admins/NAME.key      public keys of the operators a hub accepts on its admin channel
    admins/NAME.key_secret  an operator's key pair, where the console runs

A hub maps each client key to its node name, which reaches every message as the
ZeroMQ User-Id property, so a node can't report in another node's name. An admin key's
User-Id is `admin:NAME`; a key the hub does not know gets in on the report port only,
as `key:KEY`, and is heard only as a node asking to join.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import pwd
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from .health import RefusedKeys
from .protocol import CLUSTER, ProtocolError, check_name, check_operator, is_operator_origin
from .runtime import RateLimitedLog

log = logging.getLogger("f2bzmq.keys")

HUB = "hub"
# The system user the publisher's unit runs as: a hub's secret key must be its own.
HUB_USER = "_f2bzmq"
ADMINS = "admins"  # keys_dir's folder of admin keys
NODES = "nodes"  # keys_dir's folder of node keys
ADMIN_USER = "admin:"  # User-Id of an admin key: admin:NAME (no node name has a ':')
KEY_USER = "key:"  # User-Id of a key the hub does not know yet: key:Z85
# The report port's ZAP domain: the only socket open to admin keys and to unknown keys.
REPORT_DOMAIN = "report"
MAX_REFUSALS = 100  # keys refused lately that the hub remembers, for `nodes pending`


class KeyFileError(Exception):
    """A key that is missing, unreadable or unsafe; the text says how to fix it."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def require_curve() -> None:
    if not zmq.has("curve"):
        raise KeyFileError(
            "this libzmq has no CURVE support: install pyzmq from PyPI "
            "(python3 -m pip install pyzmq), whose wheels bundle libsodium"
        )


def keygen(name: str, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (0600); refuse to overwrite."""
    require_curve()
    check_name(name, "key name")
    if name == CLUSTER:
        raise ProtocolError(f"{CLUSTER!r} names the bans the hubs decide themselves, never a node")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists already; remove it first to make a new key")
    # zmq.auth writes the secret file with the umask's mode (0644 under umask 022):
    # no moment may exist where another user can read it.
    previous = os.umask(0o077)
    try:
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(previous)
    os.chmod(public, 0o644)
    return public, secret


def load_secret(path: str | os.PathLike) -> KeyPair:
    """A key pair from a .key_secret file that only its owner can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise KeyFileError(f"{path}: {error.strerror}; make one with `f2bzmq keygen`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path} can be read by other users: chmod 600 {path}")
    if not os.access(path, os.R_OK):
        user = _user_name(os.geteuid())
        raise KeyFileError(
            f"{path} can't be read by {user}, which runs this daemon: make it {user}'s "
            f"(chown {user} {path}); only its owner may read it"
        )
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key")
    return KeyPair(public, secret)


def give_to_hub_user(path: Path) -> str | None:
    """Run as root where the publisher's system user exists: make a hub secret that user's,
    as its loader requires. The user's name, or None when nothing was done."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(HUB_USER)
    except KeyError:
        return None
    os.chown(path, user.pw_uid, user.pw_gid)
    return HUB_USER


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def load_public(path: str | os.PathLike) -> bytes:
    public, _ = _load(Path(path))
    return public


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise KeyFileError(f"{path}: not a readable CURVE key file: {error}") from None


def authorized_nodes(directory: str | os.PathLike) -> dict[bytes, str]:
    """Public key (z85) -> node name, from the NODE.key files of a directory."""
    folder = Path(directory)
    if not folder.is_dir():
        raise KeyFileError(f"{folder}: no such directory of node keys")
    nodes = {}
    for path in sorted(folder.glob("*.key")):
        try:
            name = check_name(path.stem, "node")
            if is_operator_origin(name):
                raise ProtocolError("names starting with 'operator.' are the operators'")
            nodes[load_public(path)] = name
        except (KeyFileError, ProtocolError) as error:
            log.error("ignored node key %s: %s", path, error)
    return nodes


def authorized_admins(directory: str | os.PathLike) -> dict[bytes, str]:
    """Public key (z85) -> operator name, from the NAME.key files of admins/ (none without)."""
    admins = {}
    for path in sorted(Path(directory).glob("*.key")):
        try:
            admins[load_public(path)] = check_operator(path.stem)
        except (KeyFileError, ProtocolError) as error:
            log.error("ignored admin key %s: %s", path, error)
    return admins


def fingerprint(public: bytes | str) -> str:
    """How people compare a public key (z85): SHA256 and base64, as ssh shows host keys."""
    raw = zmq.utils.z85.decode(public)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def write_public(path: str | os.PathLike, public: bytes | str) -> None:
    """A public key file as `keygen` writes it, replacing any, never half written."""
    text = public.decode() if isinstance(public, bytes) else public
    path = Path(path)
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(
        "#   ZeroMQ CURVE Public Certificate, accepted by f2bzmq\n\nmetadata\ncurve\n"
        f'    public-key = "{text}"\n'
    )
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks, for every socket of the context
MAX_NODE_ADDRESSES = 8  # addresses remembered per node: the latest it connected from


class NodeAuthenticator(threading.Thread):
    """ZAP (rfc.zeromq.org/spec/27) in a thread of its own: only known node keys get in, the
    node name becomes the User-Id, and the addresses each node connects from are noted.
    The hub key gets in too, as User-Id "hub": a peer hub taking this hub's table. On the
    report port only (REPORT_DOMAIN), admin keys get in as `admin:NAME`, and keys the hub
    does not know as `key:KEY`: a node asking to join, which the hub answers nothing else.
    A key an operator removed stays out.

    libzmq asks on every handshake, a stranger's too, so a request costs little here:
    plain sockets and a dict look-up, no event loop, no line logged per request (a
    refused key is logged once a minute per address). The thread takes the GIL from the
    hub's loop for every request; pyzmq's ThreadAuthenticator spent several times as long.
    """

    def __init__(
        self, context: zmq.Context, nodes_dir: str | os.PathLike, hub_key: bytes | None = None
    ) -> None:
        super().__init__(name="f2bzmq-zap", daemon=True)
        self.context = context
        self.nodes_dir = nodes_dir
        self.admins_dir = Path(nodes_dir).parent / ADMINS
        # The hubs' public key (z85): it gets in as User-Id "hub", a peer hub taking this
        # hub's table. That is no node's name, so it can't report.
        self.hub_key = hub_key
        self.nodes: dict[bytes, str] = {}  # z85 public key -> node name
        self.names: set[str] = set()
        self.admins: dict[bytes, str] = {}  # z85 public key -> operator name
        self.admins_read: int | None = None  # admins/'s mtime (ns) when last read
        self.removed: frozenset[bytes] = frozenset()  # keys of nodes an operator removed
        # z85 key -> (when last refused, how often), the latest last: for the operators.
        self.refused_lately: dict[bytes, tuple[float, int]] = {}
        self.lock = threading.Lock()  # over `addresses` and `generation`
        self.addresses: dict[str, dict[str, None]] = {}  # node -> addresses, latest last
        self.generation = 0  # counts changes of `addresses`, for the hub's loop to compare
        self.refusals = RateLimitedLog(log)
        self.refused = RefusedKeys()  # handshakes with a key it does not know, for `status`
        self.pipe_endpoint = f"inproc://f2bzmq-zap-stop-{id(self)}"
        self.pipe: zmq.Socket | None = None  # the hub's end of the stop pipe

    def start(self) -> None:
        """Read the keys and answer ZAP before returning: a CURVE server socket bound before
        the authenticator listens accepts any key."""
        self.reload()
        # Made here, handed to the thread: libzmq's own threads, which block every signal,
        # then start before this one, which takes a SIGTERM the kernel gives it.
        self.zap = self.context.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)
        self.stopper = self.context.socket(zmq.PAIR)
        self.stopper.linger = 0
        self.stopper.bind(self.pipe_endpoint)
        self.pipe = self.context.socket(zmq.PAIR)
        self.pipe.linger = 0
        self.pipe.connect(self.pipe_endpoint)
        super().start()

    def stop(self) -> None:
        if self.pipe is not None:
            self.pipe.send(b"stop")
            self.join(10)
            self.pipe.close()
            self.pipe = None

    def reload(self) -> int:
        """Read the node keys again (SIGHUP): a removed key is shut out from the next handshake."""
        nodes = authorized_nodes(self.nodes_dir)
        self.nodes, self.names = nodes, set(nodes.values())
        with self.lock:
            for name in set(self.addresses) - self.names:
                del self.addresses[name]
            self.generation += 1
        self.read_admins()
        return len(nodes)

    def read_admins(self) -> None:
        try:  # before the read: a key added meanwhile changes it again
            self.admins_read = os.stat(self.admins_dir).st_mtime_ns
        except OSError:
            self.admins_read = None
        self.admins = authorized_admins(self.admins_dir)

    def node_addresses(self) -> dict[str, tuple[str, ...]]:
        """Where each node has connected from, the latest MAX_NODE_ADDRESSES each."""
        with self.lock:
            return {name: tuple(seen) for name, seen in self.addresses.items()}

    def run(self) -> None:
        zap, stopper = self.zap, self.stopper
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        poller.register(stopper, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if stopper in ready:
                    return
                if zap in ready:
                    zap.send_multipart(self.answer(zap.recv_multipart()))
        finally:
            zap.close()
            stopper.close()

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request: [version, id, status, text, user id, metadata]."""
        if len(request) < 6 or request[0] != b"1.0":
            request_id = request[1] if len(request) > 1 else b""
            return [b"1.0", request_id, b"400", b"bad request", b"", b""]
        request_id, domain, address, mechanism = request[1], request[2], request[3], request[5]
        curve = mechanism == b"CURVE" and len(request) == 7
        key = zmq.utils.z85.encode(request[6]) if curve else b""
        name = self.nodes.get(key)
        if name is not None:
            self._connected(name, address.decode("ascii", "replace"))
            return [b"1.0", request_id, b"200", b"OK", name.encode(), b""]
        if key and key == self.hub_key:
            return [b"1.0", request_id, b"200", b"OK", HUB.encode(), b""]
        if key and domain == REPORT_DOMAIN.encode() and key not in self.removed:
            if key not in self.admins and self._admins_changed():
                self.read_admins()  # an admin key dropped into admins/ works at once
            admin = self.admins.get(key)
            user = ADMIN_USER + admin if admin is not None else KEY_USER + key.decode()
            return [b"1.0", request_id, b"200", b"OK", user.encode(), b""]
        peer = address.decode("ascii", "replace")
        # The key as NODE.key and the node's log write it, and as the console shows it.
        what = (
            f"unknown key {key.decode()} ({fingerprint(key)})"
            if key
            else f"mechanism {mechanism!r}"
        )
        self.refusals.warning(f"zap {peer}", "refused a connection from %s: %s", peer, what)
        self.refused.refused(time.time())
        if key:
            self._note_refusal(key)
        return [b"1.0", request_id, b"400", b"unknown key", b"", b""]

    def _admins_changed(self) -> bool:
        """Whether admins/ changed since it was read (a key added or removed): a stat per
        unknown key, the folder read again only then."""
        try:
            return os.stat(self.admins_dir).st_mtime_ns != self.admins_read
        except OSError:
            return self.admins_read is not None

    def _note_refusal(self, key: bytes) -> None:
        """Remembered for the operators (a bounded few): dict operations, safe across the
        ZAP thread and the hub's loop."""
        _, count = self.refused_lately.pop(key, (0.0, 0))
        self.refused_lately[key] = (time.time(), count + 1)
        while len(self.refused_lately) > MAX_REFUSALS:
            self.refused_lately.pop(next(iter(self.refused_lately)))

    def identify(self, user: str) -> tuple[str, str]:
        """Who a connection's User-Id is now: ("node", name), ("hub", "hub"), ("admin",
        name), ("pending", z85 key) or ("withdrawn", name or key). A key accepted since its
        connection was made counts as accepted at once."""
        if user == HUB:
            return "hub", HUB
        if user.startswith(ADMIN_USER):
            name = user[len(ADMIN_USER) :]
            return ("admin", name) if name in self.admins.values() else ("withdrawn", name)
        if user.startswith(KEY_USER):
            key = user[len(KEY_USER) :].encode()
            if key in self.nodes:
                return "node", self.nodes[key]
            if key in self.admins:
                return "admin", self.admins[key]
            return ("withdrawn", key.decode()) if key in self.removed else ("pending", key.decode())
        return ("node", user) if user in self.names else ("withdrawn", user)

    def _connected(self, name: str, address: str) -> None:
        with self.lock:
            seen = self.addresses.setdefault(name, {})
            if address in seen:
                return
            seen[address] = None
            if len(seen) > MAX_NODE_ADDRESSES:
                del seen[next(iter(seen))]
            self.generation += 1


class Security:
    """How a role's sockets are secured: CURVE with this server's keys, or plain TCP if insecure."""

    def __init__(
        self,
        keys_dir: str | os.PathLike,
        node: str,
        role: str,
        insecure: bool,
        server_key: str = HUB,
    ) -> None:
        """`server_key`: the key pair a server holds (keys_dir/NAME.key_secret) and the public
        key a client checks the server with (keys_dir/NAME.key): the hubs' by default; a relay
        may serve with a key of its own that its nodes check it with."""
        self.insecure = insecure
        self.node = node
        self.nodes_dir = Path(keys_dir) / "nodes"
        # This server's public key as a hub's log and NODE.key write it (z85): what an
        # operator looks for when a hub refuses it.
        self.public_key: str | None = None
        if insecure:
            log.warning(
                "insecure = true: plain TCP without encryption or authentication; "
                "anyone who reaches the hub's ports can ban and unban. Use keys outside a lab."
            )
            return
        require_curve()
        keys = Path(keys_dir)
        if role in ("publisher", "relay"):
            self.own = load_secret(keys / f"{server_key}.key_secret")
            self.hub_public = self.own.public  # a hub asks its peers for their tables
            authorized_nodes(self.nodes_dir)  # refuse to start without the directory
        else:
            self.own = load_secret(keys / f"{node}.key_secret")
            self.hub_public = load_public(keys / f"{server_key}.key")
        self.public_key = self.own.public.decode()

    @classmethod
    def for_role(cls, config, role: str, server_key: str = HUB) -> Security:
        """From [general] keys_dir and insecure; raises KeyFileError saying what to fix."""
        general = config.general
        return cls(general.keys_dir, config.node, role, general.insecure, server_key)

    def server(self, sock: zmq.Socket, domain: str = "") -> None:
        """A hub socket: encrypted, and open only to clients the authenticator accepts for
        its ZAP `domain` (REPORT_DOMAIN: admins and nodes asking to join too)."""
        if self.insecure:
            return
        sock.curve_secretkey = self.own.secret
        sock.curve_publickey = self.own.public
        sock.curve_server = True
        if domain:
            sock.zap_domain = domain.encode()

    def client(self, sock: zmq.Socket) -> None:
        """A node socket: encrypted, and talking only to a hub holding the hub key."""
        if self.insecure:
            return
        sock.curve_secretkey = self.own.secret
        sock.curve_publickey = self.own.public
        sock.curve_serverkey = self.hub_public

    def dealer(self, context: zmq.Context, endpoint: str, max_frame: int) -> zmq.Socket:
        """A client DEALER to a hub's `endpoint`, secured, dropped at once on close, taking
        frames of `max_frame` bytes at most."""
        sock = context.socket(zmq.DEALER)
        self.client(sock)
        sock.linger = 0
        sock.maxmsgsize = max_frame
        sock.connect(endpoint)
        return sock

    def authenticator(self, context: zmq.Context) -> NodeAuthenticator | None:
        """Started before any bind: a CURVE server with no authenticator accepts any key."""
        if self.insecure:
            return None
        auth = NodeAuthenticator(context, self.nodes_dir, self.own.public)
        auth.start()
        return auth
