#!/usr/bin/env python3
"""A stand-in for sshd on the test cluster's nodes: every login fails.

A client gets an SSH banner; a client that then sends a line `USER PASSWORD` is
refused, and the failure goes to the log the way sshd writes it, with the client's
real address, so fail2ban's stock sshd filter bans the attacker. A client that
sends nothing (a reachability probe) is not logged.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import socketserver
import threading
import time

BANNER = b"SSH-2.0-OpenSSH_9.2p1 f2bzmq-test\r\n"
USER = re.compile(r"[A-Za-z0-9._-]{1,32}")


class FailingLogin(socketserver.StreamRequestHandler):
    timeout = 5  # seconds a client may stay silent
    log_path = "/var/log/auth.log"
    log_lock = threading.Lock()

    def handle(self) -> None:
        try:
            self.wfile.write(BANNER)
            words = self.rfile.readline(256).decode("ascii", "replace").split()
        except OSError:
            return
        if not words:
            return
        user = words[0] if USER.fullmatch(words[0]) else "invalid"
        host, port = self.client_address[:2]
        line = (
            f"{time.strftime('%b %d %H:%M:%S')} {socket.gethostname()} sshd[{os.getpid()}]: "
            f"Failed password for {user} from {host} port {port} ssh2\n"
        )
        with self.log_lock, open(self.log_path, "a") as log:
            log.write(line)
        with contextlib.suppress(OSError):
            self.wfile.write(b"Permission denied, please try again.\r\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=22)
    parser.add_argument("--log", default=FailingLogin.log_path, help="where failures go")
    args = parser.parse_args()
    FailingLogin.log_path = args.log
    with Server(("0.0.0.0", args.port), FailingLogin) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
