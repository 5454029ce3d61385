#!/usr/bin/env bash
# Set up and run the local demo cluster: a hub and three fail2ban nodes on this
# machine, an attack on node1, the ban arriving on node2 and node3, then clean-up.
# Needs root for apt-get (Debian 12 or later); nothing is sent beyond 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")"
# Debian's own packages, never pip into the system's Python (PEP 668 refuses it).
packages=()
command -v fail2ban-client >/dev/null || packages+=(fail2ban)
for module in zmq:python3-zmq daemon:python3-daemon watchdog:python3-watchdog; do
    /usr/bin/python3 -c "import ${module%%:*}" 2>/dev/null || packages+=("${module#*:}")
done
if ((${#packages[@]})); then
    echo "==> installing ${packages[*]} (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
exec /usr/bin/python3 -m f2bzmq demo "$@"
