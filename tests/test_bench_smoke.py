"""The benchmark suite keeps working: its quick form runs and its figures add up.

Benchmarks never fail on speed, and neither does this test: it checks that every
benchmark ran against real processes and that its counts are whole (every ban
measured, every event ACKed and delivered to every subscriber), never a target.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def suite_names() -> list[str]:
    names = ["propagation", "throughput", "footprint", "scale", "hostile", "detection", "fanout"]
    # The burst benchmark runs fail2ban in network namespaces: root and iproute2 only.
    if (BENCH / "burst.py").exists() and os.geteuid() == 0 and shutil.which("ip"):
        names.append("burst")
    return names


def sane_spread(figures: dict, count: int) -> None:
    assert figures["count"] == count
    assert 0 <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]


def test_quick_suite_runs_and_its_counts_add_up(tmp_path):
    output = tmp_path / "results.json"
    names = suite_names()
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--only", ",".join(names)]
        + ["--json", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    suite = json.loads(output.read_text())
    assert suite["suite"] == "quick"
    assert suite["machine"]["cores"] >= 1
    results = suite["benchmarks"]
    assert sorted(results) == sorted(names)
    for name in names:
        assert "error" not in results[name], (name, results[name])
        assert f"# {name}" in done.stdout  # each printed its table

    propagation = results["propagation"]
    bans = propagation["bans"]
    for figures in ("banned_ms", "listed_ms", "applied_ms"):
        sane_spread(propagation[figures], bans)
    assert propagation["unbans_arrived"] is True
    assert propagation["poll"]["calls"] >= 1
    sane_spread(propagation["naive_fail2ban_client_ms"], 5)
    sane_spread(propagation["floor_banip_ms"], 10)

    throughput = results["throughput"]
    assert throughput["zero_loss"] is True, throughput["loss"]
    assert not any(throughput["loss"].values())
    assert throughput["ingest_events_per_s"] > 0 and throughput["delivered_events_per_s"] > 0
    sane_spread(throughput["ack_ms"], throughput["events"])
    assert throughput["naive"]["sample"] == 20

    processes = results["footprint"]["processes"]
    for figures in processes.values():
        assert 0 < figures["idle_rss_kb"] <= figures["load_peak_rss_kb"]
        assert figures["idle_cpu_percent"] >= 0
        assert figures["neighbour_cpu_percent"] >= 0
    assert any(name.startswith("monitor") for name in processes)
    assert any(name.startswith("naive") for name in processes)

    floods = results["hostile"]["floods"]
    assert "quiet" in floods and len(floods) > 5
    for figures in floods.values():
        sane_spread(figures["propagation_ms"], figures["propagation_ms"]["count"])
        assert figures["propagation_ms"]["count"] > 0
    for name, figures in floods.items():
        if name != "quiet":
            assert 0 < figures["rss_before_mb"] <= figures["rss_peak_mb"], name
            assert figures["sent"] > 0, name
    detection = results["detection"]
    ingest = detection["ingest"]
    assert ingest["failures"] > 0 and int(ingest["failures_counted"]) >= ingest["failures"]
    assert ingest["naive"]["failures"] > 0
    sane_spread(ingest["ack_ms"], ingest["reports"])
    latency = detection["latency"]
    for figures in ("decided_ms", "banned_ms", "listed_ms"):
        sane_spread(latency[figures], 10)
    assert latency["naive_local_bans"] == 0
    assert detection["monitor"]["lines"] > 0 and detection["monitor"]["reports_acked"] > 0

    sizes = results["scale"]["sizes"]
    assert [size["nodes"] for size in sizes] == [3, 6]
    for size in sizes:
        assert size["zero_loss"] is True, size["loss"]
        sane_spread(size["propagation_listed_ms"], results["scale"]["bans"])

    setups = results["fanout"]["setups"]
    assert [(s["f2bzmq"]["subscribers"], s["f2bzmq"]["relays"]) for s in setups] == [
        (20, 0),
        (20, 2),
    ]
    for found in setups:
        for run in found.values():  # f2bzmq's daemons, and the floor's bare servers
            assert run["propagation"]["missing"] == 0
            sane_spread(run["propagation"]["last_ms"], results["fanout"]["bans"])
            sane_spread(run["resync_s"], 20)  # every subscriber synced again
