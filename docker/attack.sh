#!/usr/bin/env bash
# Attack node1 of the running test cluster (docker compose up -d --build) and show,
# before and after, which nodes still accept the attacker's TCP connections.
# The attacker fails ssh logins on node1; node1's fail2ban bans it, f2bzmq carries
# the ban to node2 and node3, whose fail2ban then reject the attacker too.
set -euo pipefail
cd "$(dirname "$0")"

# Compose v2 (`docker compose`), or v1's `docker-compose` where only that exists
# (Debian 12). v1 talks to the daemon itself rather than through whichever docker
# client comes first on PATH.
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=(docker-compose)
    export COMPOSE_INTERACTIVE_NO_CLI=1
fi
WAIT=${WAIT:-60}

attacker() { "${compose[@]}" exec -T attacker f2bzmq-attacker "$@"; }

echo "== before: the attacker connects to port 22 of each node"
attacker probe node1 node2 node3
echo
echo "== attack: failed ssh logins on node1 until node1 refuses"
attacker attack node1 --tries 6
echo
echo "== node2 and node3 (at most $WAIT s)"
status=0
attacker wait-refused node1 node2 node3 --timeout "$WAIT" || status=$?
echo
echo "== after"
attacker probe node1 node2 node3
for node in node2 node3; do
    echo
    echo "== $node: fail2ban-client status cluster"
    "${compose[@]}" exec -T "$node" fail2ban-client status cluster
done
exit "$status"
