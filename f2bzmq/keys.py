"""CURVE keys: make them, load them safely, and let only known nodes in.

Layout of `keys_dir` (the same on every server, minus the secrets it must not hold):

    hub.key              the hubs' public key: every node checks the hub with it
    hub.key_secret       the hubs' key pair (only on hub servers)
    NODE.key_secret      this node's key pair (only on that node)
    nodes/NODE.key       public keys of the nodes a hub accepts; the file name is the node's name

A hub maps each client key to its node name, which reaches every message as the
ZeroMQ User-Id property, so a node can't report in another node's name.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .protocol import ProtocolError, check_name

log = logging.getLogger("f2bzmq.keys")

HUB = "hub"


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
            nodes[load_public(path)] = name
        except (KeyFileError, ProtocolError) as error:
            log.error("ignored node key %s: %s", path, error)
    return nodes


class NodeAuthenticator(ThreadAuthenticator):
    """ZAP in a thread: only known node keys get in, and the node name becomes the User-Id.
    The hub key gets in too, as User-Id "hub": a peer hub taking this hub's table. It is no
    node's name, so it can't report."""

    # Declared for pyzmq < 25 (Debian 12's 24), whose ThreadAuthenticator keeps only
    # declared attributes and hands any other to the Authenticator its thread runs.
    nodes_dir: str | os.PathLike
    hub_key: bytes | None
    nodes: dict[bytes, str]  # z85 public key -> node name
    names: set[str]

    def __init__(
        self, context: zmq.Context, nodes_dir: str | os.PathLike, hub_key: bytes | None = None
    ) -> None:
        super().__init__(context, log=logging.getLogger("f2bzmq.zap"))
        self.nodes_dir = nodes_dir
        self.hub_key = hub_key  # z85 public key of the hubs
        self.nodes = {}
        self.names = set()

    def start(self) -> None:
        super().start()
        self.reload()
        self.configure_curve_callback("*", credentials_provider=self)
        # pyzmq >= 25 runs this object in the thread; pyzmq < 25 a plain Authenticator,
        # which must ask us for the User-Id, or every node would report without a name.
        running = self.thread.authenticator
        if running is not self:
            running.curve_user_id = self.curve_user_id

    def reload(self) -> int:
        """Read the node keys again (SIGHUP): a removed key is shut out from the next handshake."""
        nodes = authorized_nodes(self.nodes_dir)
        self.nodes, self.names = nodes, set(nodes.values())
        return len(nodes)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.nodes or key == self.hub_key

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = zmq.utils.z85.encode(client_public_key)
        return HUB if key == self.hub_key and key not in self.nodes else self.nodes.get(key, "")


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
        self.nodes_dir = Path(keys_dir) / "nodes"
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

    @classmethod
    def for_role(cls, config, role: str, server_key: str = HUB) -> Security:
        """From [general] keys_dir and insecure; raises KeyFileError saying what to fix."""
        general = config.general
        return cls(general.keys_dir, config.node, role, general.insecure, server_key)

    def server(self, sock: zmq.Socket) -> None:
        """A hub socket: encrypted, and open only to clients the authenticator accepts."""
        if self.insecure:
            return
        sock.curve_secretkey = self.own.secret
        sock.curve_publickey = self.own.public
        sock.curve_server = True

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
