#!/usr/bin/env bash
# Set up and run the local demo cluster: a hub and three fail2ban nodes on this
# machine, an attack on node1, the ban arriving on node2 and node3, then clean-up.
# Needs root for apt-get (Debian/Ubuntu); nothing is sent beyond 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v fail2ban-client >/dev/null; then
    echo "==> installing fail2ban (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fail2ban >/dev/null
fi
if ! python3 -c 'import zmq, daemon, watchdog' 2>/dev/null; then
    echo "==> installing f2bzmq and its Python packages (pip)"
    python3 -m pip install -q --disable-pip-version-check .
fi
exec python3 -m f2bzmq demo "$@"
