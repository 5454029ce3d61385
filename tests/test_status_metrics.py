"""`status` asks the running daemon and says when something is wrong; Prometheus scrapes it."""

import subprocess
import sys
import urllib.request

import pytest

from f2bzmq.lab import Cluster, free_ports, wait_until

ATTACKER = "192.0.2.10"


def status(config) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "f2bzmq", "subscriber", "-c", str(config), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_subscriber_is_unhealthy_while_fail2ban_is_away_and_healthy_again_after(tmp_path):
    with Cluster(tmp_path, size=2) as cluster:
        node2 = cluster["node2"]
        assert wait_until(lambda: status(node2.config).returncode == 0, 20, 0.3)
        node2.fail2ban.stop()
        cluster["node1"].fail2ban.attack(ATTACKER)

        def unhealthy() -> bool:
            done = status(node2.config)
            return done.returncode == 1 and "fail2ban is not reachable: " in done.stdout

        assert wait_until(unhealthy, 30, 0.3), status(node2.config).stdout
        assert "|- fail2ban: NOT reachable (yet)" in status(node2.config).stdout.splitlines()

        node2.fail2ban.start()
        node2.fail2ban.wait_banned("cluster", ATTACKER, timeout=30)
        done = status(node2.config)
        assert wait_until(lambda: status(node2.config).returncode == 0, 20, 0.3), done.stdout


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def test_prometheus_endpoints_show_each_roles_figures(tmp_path):
    pytest.importorskip("prometheus_client")
    hub_port, monitor_port, subscriber_port = free_ports(3)
    cluster = Cluster(tmp_path, size=2, publisher={"metrics": str(hub_port)})
    # Per-node settings go in the node's .local, as an operator would do.
    cluster["node1"].config.with_suffix(".local").write_text(
        f"[monitor]\nmetrics = 127.0.0.1:{monitor_port}\n"
    )
    cluster["node2"].config.with_suffix(".local").write_text(
        f"[subscriber]\nmetrics = {subscriber_port}\n"
    )
    with cluster:
        cluster["node1"].fail2ban.attack(ATTACKER)
        cluster["node2"].fail2ban.wait_banned("cluster", ATTACKER, timeout=30)
        expected = {
            hub_port: [
                'f2bzmq_up{role="publisher"} 1.0',
                'f2bzmq_publisher_bans{jail="sshd"} 1.0',
                "f2bzmq_publisher_events_accepted_total 1.0",
                "f2bzmq_publisher_accept_delay_seconds_count 1.0",
            ],
            monitor_port: [
                'f2bzmq_up{role="monitor"} 1.0',
                "f2bzmq_monitor_events_acked_total 1.0",
                f'f2bzmq_monitor_outbox_depth{{hub="tcp://127.0.0.1:{cluster.ports[0]}"}} 0.0',
            ],
            subscriber_port: [
                'f2bzmq_up{role="subscriber"} 1.0',
                "f2bzmq_subscriber_bans_applied_total 1.0",
                "f2bzmq_subscriber_apply_delay_seconds_count 1.0",
                'f2bzmq_subscriber_local_bans{jail="cluster"} 1.0',
                "f2bzmq_subscriber_fail2ban_up 1.0",
            ],
        }
        for port, lines in expected.items():

            def shows(port=port, lines=lines) -> bool:
                text = scrape(port).splitlines()
                return all(line in text for line in lines)

            assert wait_until(shows, 20, 0.3), scrape(port)


def test_metrics_port_in_use_is_reported_at_start(tmp_path):
    pytest.importorskip("prometheus_client")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = Cluster(tmp_path, size=1, publisher={"metrics": str(port)})
        done = subprocess.run(
            [sys.executable, "-m", "f2bzmq", "publisher", "-c", str(cluster.hub.config), "start"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1
    assert f"cannot start: cannot listen for metrics on 127.0.0.1:{port}: " in done.stderr
