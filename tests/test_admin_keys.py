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
    authenticator.refused = frozenset({b"0" * 40})
    yield authenticator, keys
    context.term()


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
    assert authenticator.callback(REPORT_DOMAIN, key) == report
    assert authenticator.callback("*", key) == elsewhere
    assert (key in authenticator.refusals) == (not elsewhere)
    if user is not None:
        assert authenticator.curve_user_id(z85.decode(key)) == user
        assert authenticator.identify(user) == identity


def test_accepted_or_withdrawn_since_the_connection_was_made(auth):
    authenticator, keys = auth
    pending = f"key:{STRANGER.decode()}"
    authenticator.nodes = {**authenticator.nodes, STRANGER: "web3"}
    assert authenticator.identify(pending) == ("node", "web3")
    authenticator.nodes = {}
    authenticator.names = set()
    assert authenticator.identify("node1") == ("withdrawn", "node1")
    authenticator.refused = frozenset({STRANGER})
    assert authenticator.identify(pending) == ("withdrawn", STRANGER.decode())
    authenticator.admins = {}
    assert authenticator.identify("admin:alice") == ("withdrawn", "alice")


def test_an_admin_key_dropped_into_admins_works_at_its_first_connection(auth):
    authenticator, keys = auth
    public, _ = keygen("bob", keys / "admins")
    bob = load_public(public)
    authenticator.admins_read = 0.0  # the last read is older than ADMINS_REREAD
    assert authenticator.callback(REPORT_DOMAIN, bob)
    assert authenticator.curve_user_id(z85.decode(bob)) == "admin:bob"


def test_a_fingerprint_is_what_ssh_shows():
    text = fingerprint(STRANGER)
    assert text.startswith("SHA256:") and len(text) == 7 + 43 and "=" not in text
    assert fingerprint(STRANGER.decode()) == text
