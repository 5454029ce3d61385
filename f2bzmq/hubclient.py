"""The console's side of the admin channel: one request to a hub, one answer; and `join`.

Each request goes on a fresh DEALER, encrypted with the operator's admin key, to the
first hub of the list that answers within the timeout. `join` says hello to every hub with
the node's own key, as the node's monitor will, and reports what each hub says.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import zmq

from . import __version__, protocol
from .config import Config
from .keys import (
    ADMINS,
    HUB,
    KeyFileError,
    fingerprint,
    keygen,
    load_public,
    load_secret,
    write_public,
)

JOIN_ROUNDS = 100000  # hellos per hub while waiting, one a second: a day and more


class HubError(Exception):
    """No hub answered, or the keys to ask one are missing; one line."""


class HubClient:
    """Requests to the hubs with an admin key (none with `insecure = true`)."""

    def __init__(self, config: Config, operator: str, timeout: float) -> None:
        self.operator = operator
        self.timeout = timeout
        self.keys: tuple[bytes, bytes, bytes] | None = None  # public, secret, hub's public
        if not config.general.insecure:
            folder = Path(config.general.keys_dir)
            secret = folder / ADMINS / f"{operator}.key_secret"
            if not secret.exists():
                raise HubError(
                    f"no admin key {secret}: make one with `f2bzmq-cluster keygen {operator}` "
                    f"(it works at once on a hub; elsewhere put {operator}.key into "
                    "keys_dir/admins/ on every hub)"
                )
            try:
                pair = load_secret(secret)
                self.keys = (pair.public, pair.secret, load_public(folder / f"{HUB}.key"))
            except KeyFileError as error:
                raise HubError(str(error)) from None
        self.context = zmq.Context()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.context.destroy(linger=0)

    def socket(self, endpoint: str) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.maxmsgsize = protocol.MAX_RESULT
        if self.keys is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.keys
        sock.connect(endpoint)
        return sock

    def request(self, endpoints: list[str], verb: str, **fields: object) -> dict:
        """The first answer of a hub of `endpoints`, tried in order."""
        for endpoint in endpoints:
            sock = self.socket(endpoint)
            try:
                sock.send_multipart(protocol.encode_admin(verb, **fields), zmq.NOBLOCK)
                if sock.poll(int(self.timeout * 1000)):
                    return protocol.decode_result(sock.recv_multipart())
            except (zmq.ZMQError, protocol.ProtocolError):
                pass
            finally:
                sock.close(linger=0)
        raise HubError(
            f"no hub answered within {self.timeout:g} s ({' '.join(endpoints)}): is the "
            f"publisher running, and does keys_dir/admins/ on the hub hold {self.operator}.key?"
        )


def join(
    config: Config, hub_key: str | None, wait: float, endpoints: list[str], as_json: bool
) -> int:
    """Make the node's key if it has none, take the hubs' public key if given, and ask
    every hub to accept the node; with `wait`, until they have (or the time is up)."""
    folder = Path(config.general.keys_dir)
    node = config.node
    hub_path = folder / f"{HUB}.key"
    if hub_key is not None:
        protocol.check_public_key(hub_key)
        if hub_path.exists() and load_public(hub_path).decode() != hub_key:
            raise ValueError(f"{hub_path} holds another hub key: remove it first to change it")
        folder.mkdir(parents=True, exist_ok=True)
        write_public(hub_path, hub_key)
    elif not hub_path.exists():
        raise ValueError(
            f"no hub key {hub_path}: give the hubs' public key with --hub-key='KEY' "
            "(`f2bzmq-cluster nodes pending` on a hub shows it)"
        )
    secret = folder / f"{node}.key_secret"
    made = not secret.exists()
    if made:
        keygen(node, folder)
    pair = load_secret(secret)
    hub_public = load_public(hub_path)
    key_print = fingerprint(pair.public)
    if not as_json:
        print(f"node {node}, key {key_print}{' (new)' if made else ''}")
    context = zmq.Context()
    try:
        answers: dict[str, str] = {}
        deadline = time.monotonic() + wait
        for _ in range(JOIN_ROUNDS):
            for endpoint in endpoints:
                if answers.get(endpoint) != "accepted":
                    answers[endpoint] = _hello(context, endpoint, node, pair, hub_public)
            if all(a == "accepted" for a in answers.values()) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
    finally:
        context.destroy(linger=0)
    if as_json:
        print(json.dumps({"node": node, "fingerprint": key_print, "hubs": answers}, indent=2))
    else:
        for endpoint, answer in answers.items():
            print(f"{endpoint}: {answer}")
        if any(answer == "pending" for answer in answers.values()):
            print(
                f"an operator compares the fingerprint above and runs "
                f"`f2bzmq-cluster nodes accept {node}` on a hub"
            )
    if all(answer == "unreachable" for answer in answers.values()):
        print("fail2ban-cluster: join: no hub answered", file=sys.stderr)
        return 1
    if wait and any(answer != "accepted" for answer in answers.values()):
        print(f"fail2ban-cluster: join: not accepted within {wait:g} s", file=sys.stderr)
        return 1
    return 0


def _hello(context: zmq.Context, endpoint: str, node: str, pair, hub_public: bytes) -> str:
    """What one hub says to the node's hello: accepted, pending or unreachable."""
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = (
        pair.public,
        pair.secret,
        hub_public,
    )
    sock.connect(endpoint)
    try:
        sock.send_multipart(protocol.encode_hello(None, node, __version__), zmq.NOBLOCK)
        if not sock.poll(5000):
            return "unreachable"
        frames = sock.recv_multipart()
    except zmq.ZMQError:
        return "unreachable"
    finally:
        sock.close(linger=0)
    if protocol.is_welcome(frames):
        return "accepted"
    if protocol.is_pending(frames):
        return "pending"
    return "unreachable"
