"""The whole benchmark suite in one command: every table, and one JSON file with every figure.

Runs each benchmark of this folder as its own process (propagation, throughput,
footprint, scale, hostile, detection, fanout, and burst when present), with its full
settings, or with `--quick` a small version of each that runs in a minute or two (what CI runs to
keep them working). Each prints its table as it finishes; the JSON file holds the
machine and each benchmark's figures, or why it failed.

    python3 bench/run.py --json results.json
    python3 bench/run.py --quick --json smoke.json

Benchmarks print figures and never fail on speed: the exit status is non-zero
only when a benchmark itself went wrong.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, stop_on_sigterm, table

HERE = Path(__file__).resolve().parent

# name -> (arguments of the full run, arguments of the quick run); the script is the name
# up to a "-": "propagation-no-action" is propagation.py again, with other arguments.
QUICK_PROPAGATION = ["--count", "30", "--interval", "0.02", "--naive", "5", "--floor", "10"]
SUITE: dict[str, tuple[list[str], list[str]]] = {
    "propagation": ([], QUICK_PROPAGATION),
    # The same with a sync jail that has no action: f2bzmq's share of the way, without
    # the time node2's fail2ban spends forking the dummy action's shell.
    "propagation-no-action": (["--action", "none"], [*QUICK_PROPAGATION, "--action", "none"]),
    # And without node1's own action: on this one machine the shell node1's fail2ban
    # forks for its ban runs on the cores the hub and node2 need at that moment; on a
    # cluster it runs on node1 only.
    "propagation-no-actions": (
        ["--action", "none", "--origin-action", "none"],
        [*QUICK_PROPAGATION, "--action", "none", "--origin-action", "none"],
    ),
    "throughput": ([], ["--events", "2000", "--subscribers", "20", "--naive", "20"]),
    "footprint": ([], ["--idle-seconds", "3", "--burst", "300", "--neighbour-seconds", "1"]),
    "scale": (
        [],
        ["--nodes", "3,6", "--count", "10", "--interval", "0.02", "--events", "600"],
    ),
    # Cluster jails: 50 nodes' failures into one hub, and the failure that passes the
    # threshold to the ban on every node.
    "detection": (
        [],
        [
            *("--nodes", "5", "--rate", "200", "--seconds", "2", "--naive-seconds", "1"),
            *("--count", "10", "--monitor-rate", "200", "--monitor-seconds", "1"),
        ],
    ),
    # The same latency with sync jails without an action: f2bzmq's share of the way.
    "detection-no-action": (
        ["--parts", "latency", "--action", "none"],
        ["--parts", "latency", "--action", "none", "--count", "10"],
    ),
    # 1,000 subscribers on the hub, then through 4 relays, each beside its floor (10,000
    # need `fanout.py --setups 10000:10,10000:0` and 21,024 open files for the hub).
    # Quick: 20 subscribers, on the hub and through 2 relays.
    "fanout": (
        ["--setups", "1000:0,1000:4"],
        ["--setups", "20:0,20:2", "--table", "100", "--bans", "10", "--interval", "0.05"]
        + ["--heartbeat-timeout", "2", "--down", "3"],
    ),
    "burst": ([], ["--count", "100", "--nodes", "1", "--actions", "dummy"]),
    # One node applying: what one server gets when it does not share the two cores of
    # this machine with a second fail2ban-server, as its floor does not.
    "burst-one-node": (
        ["--nodes", "1"],
        ["--count", "100", "--nodes", "1", "--actions", "none"],
    ),
    # The hub under each flood a stranger or one node can send, beside the quiet baseline.
    "hostile": ([], ["--seconds", "1", "--connections", "1000", "--frames", "5000"]),
}
TIMEOUT = {False: 3 * 3600.0, True: 300.0}  # seconds one benchmark may take
STOP_GRACE = 60.0  # seconds a benchmark has to clean up after Ctrl-C


def script(name: str) -> str:
    """The benchmark file of a suite entry: its name up to a "-"."""
    return f"{name.split('-')[0]}.py"


def run_one(name: str, arguments: list[str], timeout: float, folder: Path) -> dict:
    """Run bench/NAME.py (the name up to a "-"); its figures, or what went wrong."""
    output = folder / f"{name}.json"
    command = [sys.executable, str(HERE / script(name)), *arguments, "--json", str(output)]
    print(f"\n$ {' '.join(['python3', f'bench/{script(name)}', *arguments])}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        status = process.wait(timeout)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        if process.poll() is None:
            # Ctrl-C: every benchmark cleans up its processes and folders on KeyboardInterrupt.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    seconds = time.monotonic() - started
    if status is None:
        return {"error": f"did not finish within {timeout:g} s", "wall_seconds": seconds}
    if status != 0 or not output.exists():
        return {"error": f"exit status {status}", "wall_seconds": seconds}
    return {**json.loads(output.read_text()), "wall_seconds": seconds}


def headline(name: str, result: dict) -> str:
    """One line of the figures that matter most, for the summary."""
    if "error" in result:
        return result["error"]
    if name.startswith("detection"):
        parts = []
        if "ingest" in result:
            ingest = result["ingest"]
            parts.append(
                f"{ingest['offered_per_s']:.0f} failures/s offered, "
                f"{ingest['acked_per_s_while_sending']:.0f}/s ACKed, "
                f"ACK p99 {ingest['ack_ms']['p99']:.0f} ms"
            )
        if "latency" in result:
            listed = result["latency"]["listed_ms"]
            parts.append(f"listed p50 {listed['p50']:.1f} ms p99 {listed['p99']:.1f} ms")
        if "monitor" in result:
            parts.append(f"monitor {result['monitor']['cpu_percent_per_1000']:.1f} % per 1,000/s")
        return "; ".join(parts)
    if name.startswith("propagation"):
        listed, applied = result["listed_ms"], result["applied_ms"]
        banned = result["banned_ms"]
        return (
            f"node2's Ban line p50 {banned['p50']:.1f} ms p99 {banned['p99']:.1f} ms;"
            f" listed p50 {listed['p50']:.1f} ms p99 {listed['p99']:.1f} ms;"
            f" applied p50 {applied['p50']:.1f} ms p99 {applied['p99']:.1f} ms"
            f" (floor, fail2ban's banip alone: p50 {result['floor_banip_ms']['p50']:.1f} ms)"
        )
    if name == "throughput":
        return (
            f"{result['delivered_events_per_s']:.0f} events/s to {result['subscribers']}"
            f" subscribers, {'zero loss' if result['zero_loss'] else 'LOSS'};"
            f" {result['speedup_vs_naive']:.1f}x naive"
        )
    if name == "footprint":
        processes = {k: v for k, v in result["processes"].items() if not k.startswith("naive")}
        peak = max(figures["load_peak_rss_kb"] for figures in processes.values()) / 1024
        monitor = next(v for k, v in processes.items() if k.startswith("monitor"))
        return (
            f"peak RSS {peak:.1f} MB; idle monitor CPU {monitor['idle_cpu_percent']:.2f} %,"
            f" {monitor['neighbour_cpu_percent']:.2f} % next to a busy log"
        )
    if name == "hostile":
        floods = result["floods"]
        quiet = floods["quiet"]["propagation_ms"]["p99"]
        worst = max(
            (figures for key, figures in floods.items() if key != "quiet"),
            key=lambda figures: figures["propagation_ms"]["p99"],
        )
        growth = max(
            figures["rss_peak_mb"] - figures["rss_before_mb"]
            for key, figures in floods.items()
            if key != "quiet"
        )
        return (
            f"quiet p99 {quiet:.1f} ms, worst flood p99 {worst['propagation_ms']['p99']:.1f} ms;"
            f" largest hub RSS growth {growth:.0f} MB"
        )
    if name == "scale":
        return "; ".join(
            f"{size['nodes']} nodes: {size['delivered_events_per_s']:.0f} ev/s,"
            f" p50 {size['propagation_listed_ms']['p50']:.1f} ms"
            for size in result["sizes"]
        )
    if name == "fanout":
        setups = [found["f2bzmq"] for found in result["setups"]]
        return "; ".join(
            f"{setup['subscribers']:,} via "
            + (f"{setup['relays']} relays" if setup["relays"] else "the hub")
            + f": p99 to all {setup['propagation']['last_ms']['p99']:.1f} ms,"
            f" all resynced {setup['resync_s']['max']:.1f} s"
            for setup in setups
        )
    return "done"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small version (CI smoke)")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default all)")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)
    names = [name for name in SUITE if (HERE / script(name)).exists()]
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"--only: unknown {unknown}; choose among {','.join(names)}")
        names = [name for name in names if name in wanted]
    stop_on_sigterm()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="f2bzmq-suite-") as folder:
        for name in names:
            full, quick = SUITE[name]
            arguments = quick if args.quick else full
            results[name] = run_one(name, arguments, TIMEOUT[args.quick], Path(folder))
    suite = {
        "suite": "quick" if args.quick else "full",
        "machine": machine(),
        "benchmarks": results,
    }
    rows = [
        [
            name,
            "ok" if "error" not in result else "FAILED",
            result["wall_seconds"],
            headline(name, result),
        ]
        for name, result in results.items()
    ]
    print(f"\n# suite ({suite['suite']})  machine: {json.dumps(suite['machine'])}")
    print(table(["benchmark", "status", "seconds", "figures"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(suite, indent=1) + "\n")
    return 0 if all("error" not in result for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
