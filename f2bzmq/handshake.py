"""What a hub answers this node's CURVE handshakes: accepted, refused, or nothing yet.

A hub that does not know a node's key refuses its handshake (ZAP status 400), and libzmq
then drops that connection for good: a SUB hears nothing more, a DEALER has no pipe left
to queue on, and neither says so. libzmq's socket monitor is where the refusal shows, apart
from a hub that is down (no handshake at all) or a node holding the wrong hub.key (the
hub ends the handshake without a word). `KeyCheck` keeps one hub's answer, events in and
what changed out; `HandshakeWatch` reads the monitor of one socket without blocking.
"""

from __future__ import annotations

import logging

import zmq
from zmq.utils.monitor import recv_monitor_message

from .keys import Security

ACCEPTED = "accepted"
REFUSED = "REFUSED"  # the hub's authenticator does not know this node's key
FAILED = "handshake failed"  # no answer to the handshake: a wrong hub.key?
UNKNOWN = "no handshake yet"  # the hub is down or out of reach, or the node just started

_STATES = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: ACCEPTED,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: REFUSED,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: FAILED,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: FAILED,
}
EVENTS = (  # the monitor's event mask: nothing else is read
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)
MAX_EVENTS = 100  # monitor events read per pass: a hub retried every 100 ms sends a few


class KeyCheck:
    """One hub's last answer to this node's handshakes, from all its sockets' monitors."""

    def __init__(self) -> None:
        self.state = UNKNOWN

    def on_event(self, event: int) -> str | None:
        """The new state when this monitor event changes it (to be logged once), else None."""
        state = _STATES.get(event)
        if state is None or state == self.state:
            return None
        self.state = state
        return state


def key_problem(state: str, public_key: str | None, node: str) -> str | None:
    """What `status` and the log say of a hub's answer, or None when there is nothing to say."""
    if state == REFUSED:
        return (
            f"the hub refuses this node's key {public_key}: put {node}.key in keys_dir/nodes/ "
            f"on every hub and reload them (SIGHUP), or `f2bzmq-cluster nodes accept {node}`"
        )
    if state == FAILED:
        return "the hub ends every handshake: is keys_dir/hub.key the hubs' public key?"
    return None


def pending_problem(fingerprint: str, public_key: str | None, node: str) -> str:
    """What `status` says while a hub holds this node's key as asking to join."""
    return (
        f"the hub does not accept this node's key {public_key} yet ({fingerprint}): "
        f"`f2bzmq-cluster nodes accept {node}` after comparing the fingerprint, or put "
        f"{node}.key in keys_dir/nodes/ on every hub and reload them"
    )


def log_key_change(logger: logging.Logger, hub: str, state: str, security: Security) -> None:
    """A hub's answer changed: an error while it refuses, a line when it accepts again."""
    problem = key_problem(state, security.public_key, security.node)
    if problem is not None:
        logger.error("%s: %s; trying again meanwhile", hub, problem)
    elif state == ACCEPTED and not security.insecure:
        logger.info("%s accepts this node's key", hub)


class HandshakeWatch:
    """The monitor of one client socket: its handshakes' outcomes, read without blocking."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.watched = sock
        self.socket = sock.get_monitor_socket(EVENTS)
        self.refused = False  # this socket's last handshake was refused: it is dead for good

    def events(self) -> list[int]:
        """The events waiting, in order (at most MAX_EVENTS: the rest on the next pass)."""
        found = []
        for _ in range(MAX_EVENTS):
            try:
                event = recv_monitor_message(self.socket, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            found.append(event)
            if event in _STATES:
                self.refused = event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        return found

    def close(self) -> None:
        """Before the watched socket is closed."""
        self.watched.disable_monitor()
        self.socket.close(linger=0)
