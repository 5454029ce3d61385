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
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .protocol import ProtocolError, check_name, check_operator, is_operator_origin

log = logging.getLogger("f2bzmq.keys")

HUB = "hub"
ADMINS = "admins"  # keys_dir's folder of admin keys
NODES = "nodes"  # keys_dir's folder of node keys
ADMIN_USER = "admin:"  # User-Id of an admin key: admin:NAME (no node name has a ':')
KEY_USER = "key:"  # User-Id of a key the hub does not know yet: key:Z85
# The report port's ZAP domain: the only socket open to admin keys and to unknown keys.
REPORT_DOMAIN = "report"
ADMINS_REREAD = 1.0  # seconds: admins/ is read again for an unknown key at most this often
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
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key")
    return KeyPair(public, secret)


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


class NodeAuthenticator(ThreadAuthenticator):
    """ZAP in a thread: only known node keys get in, and the node name becomes the User-Id.
    The hub key gets in too, as User-Id "hub": a peer hub taking this hub's table. It is no
    node's name, so it can't report. On the report port only (REPORT_DOMAIN), admin keys
    get in as `admin:NAME`, and keys the hub does not know as `key:KEY`: a node asking to
    join, which the hub answers nothing else. A key an operator removed stays out."""

    # Declared for pyzmq < 25 (Debian 12's 24), whose ThreadAuthenticator keeps only
    # declared attributes and hands any other to the Authenticator its thread runs.
    nodes_dir: str | os.PathLike
    admins_dir: str | os.PathLike
    hub_key: bytes | None
    nodes: dict[bytes, str]  # z85 public key -> node name
    names: set[str]
    admins: dict[bytes, str]  # z85 public key -> operator name
    admins_read: float
    refused: frozenset[bytes]
    refusals: dict[bytes, tuple[float, int]]

    def __init__(
        self, context: zmq.Context, nodes_dir: str | os.PathLike, hub_key: bytes | None = None
    ) -> None:
        super().__init__(context, log=logging.getLogger("f2bzmq.zap"))
        self.nodes_dir = nodes_dir
        self.admins_dir = Path(nodes_dir).parent / ADMINS
        self.hub_key = hub_key  # z85 public key of the hubs
        self.nodes = {}
        self.names = set()
        self.admins = {}
        self.admins_read = 0.0  # time.monotonic() of the last read of admins/
        self.refused = frozenset()  # keys of nodes an operator removed
        self.refusals = {}  # z85 key -> (when last refused, how often), the latest last

    def start(self) -> None:
        super().start()
        self.reload()
        for domain in ("*", REPORT_DOMAIN):
            self.configure_curve_callback(domain, credentials_provider=self)
        # pyzmq >= 25 runs this object in the thread; pyzmq < 25 a plain Authenticator,
        # which must ask us for the User-Id, or every node would report without a name.
        running = self.thread.authenticator
        if running is not self:
            running.curve_user_id = self.curve_user_id

    def reload(self) -> int:
        """Read the node keys again (SIGHUP): a removed key is shut out from the next handshake."""
        nodes = authorized_nodes(self.nodes_dir)
        self.nodes, self.names = nodes, set(nodes.values())
        self.read_admins()
        return len(nodes)

    def read_admins(self) -> None:
        self.admins = authorized_admins(self.admins_dir)
        self.admins_read = time.monotonic()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.nodes or key == self.hub_key:
            return True
        if domain != REPORT_DOMAIN or key in self.refused:
            self.note_refusal(key)
            return False
        if key not in self.admins and time.monotonic() - self.admins_read >= ADMINS_REREAD:
            self.read_admins()  # an admin key dropped into admins/ works at once
        return True

    def note_refusal(self, key: bytes) -> None:
        """Remembered for the operators (a bounded few): dict operations, safe across the
        ZAP thread and the hub's loop."""
        _, count = self.refusals.pop(key, (0.0, 0))
        self.refusals[key] = (time.time(), count + 1)
        while len(self.refusals) > MAX_REFUSALS:
            self.refusals.pop(next(iter(self.refusals)))

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = zmq.utils.z85.encode(client_public_key)
        if key in self.nodes:
            return self.nodes[key]
        if key == self.hub_key:
            return HUB
        if key in self.admins:
            return ADMIN_USER + self.admins[key]
        return KEY_USER + key.decode()

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
            return ("withdrawn", key.decode()) if key in self.refused else ("pending", key.decode())
        return ("node", user) if user in self.names else ("withdrawn", user)


class Security:
    """How a role's sockets are secured: CURVE with this server's keys, or plain TCP if insecure."""

    def __init__(self, keys_dir: str | os.PathLike, node: str, role: str, insecure: bool) -> None:
        self.insecure = insecure
        self.nodes_dir = Path(keys_dir) / "nodes"
        if insecure:
            log.warning(
                "insecure = true: plain TCP without encryption or authentication; "
                "anyone who reaches the hub's ports can ban and unban. Use keys outside a lab."
            )
            return
        require_curve()
        keys = Path(keys_dir)
        if role == "publisher":
            self.own = load_secret(keys / f"{HUB}.key_secret")
            self.hub_public = self.own.public  # a hub asks its peers for their tables
            authorized_nodes(self.nodes_dir)  # refuse to start without the directory
        else:
            self.own = load_secret(keys / f"{node}.key_secret")
            self.hub_public = load_public(keys / f"{HUB}.key")

    @classmethod
    def for_role(cls, config, role: str) -> Security:
        """From [general] keys_dir and insecure; raises KeyFileError saying what to fix."""
        return cls(config.general.keys_dir, config.node, role, config.general.insecure)

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

    def authenticator(self, context: zmq.Context) -> NodeAuthenticator | None:
        """Started before any bind: a CURVE server with no authenticator accepts any key."""
        if self.insecure:
            return None
        auth = NodeAuthenticator(context, self.nodes_dir, self.own.public)
        auth.start()
        return auth
