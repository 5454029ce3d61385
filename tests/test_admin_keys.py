"""Who gets in where, as the hub's authenticator decides it (without a handshake): node
keys everywhere, admin keys and unknown keys on the report port only, removed keys
nowhere; and who each connection is once it is in."""

import pytest
import zmq
from zmq.utils import z85

from f2bzmq.keys import REPORT_DOMAIN, NodeAuthenticator, fingerprint, keygen, load_public
from f2bzmq.lab import make_keys

STRANGER = b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


@pytest.fixture
def auth(tmp_path):
    keys = make_keys(tmp_path / "keys", ["node1"])
    keygen("alice", keys / "admins")
    context = zmq.Context()
    authenticator = NodeAuthenticator(context, keys / "nodes", load_public(keys / "hub.key"))
    authenticator.reload()
    authenticator.removed = frozenset({b"0" * 40})
    yield authenticator, keys
    context.term()


def zap(authenticator, domain: str, key: bytes) -> tuple[bool, str]:
    """The authenticator's answer to a CURVE handshake with `key` on a socket of `domain`:
    whether it gets in, and its User-Id."""
    request = [b"1.0", b"7", domain.encode(), b"127.0.0.1", b"", b"CURVE", z85.decode(key)]
    reply = authenticator.answer(request)
    assert reply[:2] == [b"1.0", b"7"]
    return reply[2] == b"200", reply[4].decode()


@pytest.mark.parametrize(
    "who, report, elsewhere, user, identity",
    [
        ("node1", True, True, "node1", ("node", "node1")),
        ("hub", True, True, "hub", ("hub", "hub")),
        ("alice", True, False, "admin:alice", ("admin", "alice")),
        ("stranger", True, False, f"key:{STRANGER.decode()}", ("pending", STRANGER.decode())),
        ("removed", False, False, None, None),
    ],
)
def test_who_gets_in_where_and_who_they_are(auth, who, report, elsewhere, user, identity):
    authenticator, keys = auth
    key = {
        "node1": lambda: load_public(keys / "node1.key"),
        "hub": lambda: load_public(keys / "hub.key"),
        "alice": lambda: load_public(keys / "admins" / "alice.key"),
        "stranger": lambda: STRANGER,
        "removed": lambda: b"0" * 40,
    }[who]()
    admitted, named = zap(authenticator, REPORT_DOMAIN, key)
    assert admitted == report
    assert zap(authenticator, "", key)[0] == elsewhere
    assert (key in authenticator.refused_lately) == (not elsewhere)
    if user is not None:
        assert named == user
        assert authenticator.identify(user) == identity


def test_accepted_or_withdrawn_since_the_connection_was_made(auth):
    authenticator, keys = auth
    pending = f"key:{STRANGER.decode()}"
    authenticator.nodes = {**authenticator.nodes, STRANGER: "web3"}
    assert authenticator.identify(pending) == ("node", "web3")
    authenticator.nodes = {}
    authenticator.names = set()
    assert authenticator.identify("node1") == ("withdrawn", "node1")
    authenticator.removed = frozenset({STRANGER})
    assert authenticator.identify(pending) == ("withdrawn", STRANGER.decode())
    authenticator.admins = {}
    assert authenticator.identify("admin:alice") == ("withdrawn", "alice")


def test_an_admin_key_dropped_into_admins_works_at_its_first_connection(auth):
    authenticator, keys = auth
    # admins/ read just before: the key is seen because the folder changed, however soon.
    authenticator.read_admins()
    public, _ = keygen("bob", keys / "admins")
    bob = load_public(public)
    assert zap(authenticator, REPORT_DOMAIN, bob) == (True, "admin:bob")
    stranger = zap(authenticator, REPORT_DOMAIN, STRANGER)  # admins/ unchanged: not read
    assert stranger == (True, f"key:{STRANGER.decode()}")


def test_a_fingerprint_is_what_ssh_shows():
    text = fingerprint(STRANGER)
    assert text.startswith("SHA256:") and len(text) == 7 + 43 and "=" not in text
    assert fingerprint(STRANGER.decode()) == text
