#!/usr/bin/env python3
"""The test cluster's attacker: fail logins on a node's ssh port, and see who still answers.

    f2bzmq-attacker probe node1 node2 node3          one line per node: open, refused, …
    f2bzmq-attacker attack node1 --tries 6           failed logins until node1 refuses
    f2bzmq-attacker wait-refused node2 node3 --timeout 60

Exit status: 0 when the command's goal holds (attack: at least one login failed;
wait-refused: every node refuses), 1 otherwise. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

CONNECT_TIMEOUT = 2.0
OPEN, REFUSED = "open", "refused"


def probe(host: str, port: int) -> str:
    """What a TCP connection to host:port meets: open, refused, no answer, or an error."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as conn:
            banner = conn.recv(256).decode("ascii", "replace").strip()
    except ConnectionRefusedError:
        return REFUSED
    except socket.timeout:
        return "no answer"
    except OSError as error:
        return f"error: {error.strerror or error}"
    return f"{OPEN} ({banner})" if banner else OPEN


def failed_login(host: str, port: int, attempt: int) -> str | None:
    """One wrong password; returns the source address used, None if the node refused."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT) as conn:
            source = conn.getsockname()[0]
            conn.recv(256)
            conn.sendall(f"root wrong-password-{attempt}\n".encode())
            conn.recv(256)
    except OSError:
        return None
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=22)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("probe").add_argument("hosts", nargs="+")
    attack = commands.add_parser("attack")
    attack.add_argument("host")
    attack.add_argument("--tries", type=int, default=6)
    wait = commands.add_parser("wait-refused")
    wait.add_argument("hosts", nargs="+")
    wait.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    if args.command == "probe":
        for host in args.hosts:
            print(f"{host}: {probe(host, args.port)}")
        return 0

    if args.command == "attack":
        failed = 0
        for attempt in range(1, args.tries + 1):
            source = failed_login(args.host, args.port, attempt)
            if source is None:
                print(f"attempt {attempt}: {args.host} refused the connection")
                break
            failed += 1
            print(f"attempt {attempt}: failed login on {args.host} from {source}")
            time.sleep(0.2)
        return 0 if failed else 1

    start = time.monotonic()
    deadline = start + args.timeout
    waiting = list(args.hosts)
    while waiting:
        for host in list(waiting):
            if probe(host, args.port) == REFUSED:
                print(f"{host}: refused after {time.monotonic() - start:.1f} s")
                waiting.remove(host)
        if not waiting:
            break
        if time.monotonic() >= deadline:
            print(f"still answering after {args.timeout:.0f} s: {' '.join(waiting)}")
            return 1
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
