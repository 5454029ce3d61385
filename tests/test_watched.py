"""A poller keeps watching a link's sockets however often, and wherever, they are replaced."""

import zmq

from f2bzmq.runtime import Watched


class Link:
    """Stands for a subscriber's link: two sockets, either of which it may replace."""

    def __init__(self, context: zmq.Context) -> None:
        self.context = context
        self.updates = context.socket(zmq.SUB)
        self.snapshots = context.socket(zmq.DEALER)

    def sockets(self) -> tuple[zmq.Socket, ...]:
        return self.updates, self.snapshots

    def renew_snapshots(self) -> None:
        self.snapshots.close(linger=0)
        self.snapshots = self.context.socket(zmq.DEALER)


def registered(poller: zmq.Poller) -> list[zmq.Socket]:
    return [sock for sock, _ in poller.sockets]


def test_replacements_made_anywhere_reach_the_poller():
    context = zmq.Context()
    try:
        link = Link(context)
        poller = zmq.Poller()
        watched = Watched(poller, link.sockets)
        assert registered(poller) == [link.updates, link.snapshots]
        # Replaced twice before anyone looked (a refused DEALER at start, then a request
        # that could not be sent): the poller swaps the first for the last.
        link.renew_snapshots()
        link.renew_snapshots()
        watched.update()
        assert registered(poller) == [link.updates, link.snapshots]
        # And again later: the socket swapped in is the one taken out, no KeyError.
        link.renew_snapshots()
        watched.update()
        watched.update()  # nothing replaced: nothing changes
        assert registered(poller) == [link.updates, link.snapshots]
        assert not link.snapshots.closed
        for sock in link.sockets():
            sock.close(linger=0)
    finally:
        context.term()
