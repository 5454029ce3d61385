#!/bin/bash
# Entry point of the test cluster's containers: f2bzmq-docker hub|node|attacker.
#
# Keys: each container makes its own CURVE key pair on first start, in its own
# volume, and copies only the public half into the volume all containers share
# (hub.key, nodes/NODE.key); no secret ever leaves its container.
set -euo pipefail

STATE=/var/lib/fail2ban-cluster # this container's volume: keys and databases
KEYS=$STATE/keys
SHARED=/srv/public-keys # shared by every container: public keys only
RUN_DIR=/run/fail2ban-cluster
KEY_WAIT=${KEY_WAIT:-120} # seconds to wait for the other side's public keys
START_WAIT=60             # seconds for fail2ban and the daemons to come up

say() { echo "f2bzmq-docker: $*" >&2; }

# publish FILE NAME: copy a public key into the shared volume, all at once.
publish() {
    mkdir -p "$(dirname "$SHARED/$2")"
    cp "$1" "$SHARED/$2.tmp"
    chmod 644 "$SHARED/$2.tmp"
    mv -f "$SHARED/$2.tmp" "$SHARED/$2"
}

# wait_for SECONDS FILE...: until every file exists; 1 if the time runs out first.
wait_for() {
    local deadline=$((SECONDS + $1)) file
    shift
    for file in "$@"; do
        until [ -s "$file" ]; do
            if ((SECONDS >= deadline)); then
                say "gave up waiting for $file"
                return 1
            fi
            sleep 0.2
        done
    done
}

# A previous run of this container may have left PID files whose numbers are
# reused in the new PID namespace.
fresh_start() {
    rm -f "$RUN_DIR"/*.pid "$RUN_DIR"/*.status "$RUN_DIR"/publisher/*.pid
    mkdir -p "$KEYS"
}

hub() {
    fresh_start
    [ -s "$KEYS/hub.key_secret" ] || f2bzmq-publisher keygen hub --dir "$KEYS" >/dev/null
    mkdir -p "$SHARED/nodes"
    ln -sfn "$SHARED/nodes" "$KEYS/nodes"
    publish "$KEYS/hub.key" hub.key
    local node expected=()
    for node in ${NODES:-}; do expected+=("$SHARED/nodes/$node.key"); done
    if ! wait_for "$KEY_WAIT" "${expected[@]}"; then
        say "starting with the node keys there are; send the publisher SIGHUP when more arrive"
    fi
    exec f2bzmq-publisher run
}

node() {
    fresh_start
    local name=$HOSTNAME
    [ -s "$KEYS/$name.key_secret" ] || f2bzmq-monitor keygen "$name" --dir "$KEYS" >/dev/null
    publish "$KEYS/$name.key" "nodes/$name.key"
    wait_for "$KEY_WAIT" "$SHARED/hub.key"
    cp "$SHARED/hub.key" "$KEYS/hub.key"
    touch /var/log/auth.log

    local pids=() stopping=0 status=0
    trap 'stopping=1' TERM INT
    # fail2ban in the foreground: a child like the others, so that `wait -n` sees it end.
    fail2ban-server -xf start >/dev/null &
    pids+=($!)
    local deadline=$((SECONDS + START_WAIT))
    until fail2ban-client ping >/dev/null 2>&1; do
        if ((SECONDS >= deadline)) || ! kill -0 "${pids[0]}" 2>/dev/null; then
            say "fail2ban did not start; see /var/log/fail2ban.log"
            kill -TERM "${pids[@]}" 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
    f2bzmq-fake-sshd --log /var/log/auth.log &
    pids+=($!)
    f2bzmq-subscriber run &
    pids+=($!)
    f2bzmq-monitor run &
    pids+=($!)
    # `run` writes its PID file once the daemon is built: the monitor then follows the
    # log from its end, so a Ban fail2ban writes after this point is reported. Whether
    # the daemons are healthy is the healthcheck's question: their `status`.
    if wait_for "$START_WAIT" "$RUN_DIR/subscriber.pid" "$RUN_DIR/monitor.pid"; then
        say "$name is up: fail2ban, fake sshd on port 22, subscriber, monitor"
    fi

    wait -n || status=$?
    if ((stopping)); then
        status=0
    else
        say "a process of $name ended (exit $status): stopping the others"
        status=1
    fi
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait || true
    exit "$status"
}

attacker() {
    # Only waits: the attacks come with `docker compose exec attacker f2bzmq-attacker …`.
    exec sleep infinity
}

case "${1:-}" in
hub | node | attacker) "$1" ;;
*)
    echo "usage: f2bzmq-docker hub|node|attacker" >&2
    exit 2
    ;;
esac
