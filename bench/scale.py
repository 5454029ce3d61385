"""Scale curve: propagation latency and hub throughput at 10, 50 and 200 nodes.

For each cluster size N it runs the two benchmarks again with N nodes as the hub
sees them:

- propagation (propagation.py): two real fail2ban nodes and N - 2 simulated nodes
  listening to the hub, COUNT bans paced INTERVAL seconds apart;
- throughput (throughput.py): N simulated monitors reporting EVENTS in all and N
  subscriber connections, with zero loss checked.

    python3 bench/scale.py --nodes 10,50,200 --json result.json

A benchmark, not a test: it prints figures and never fails on speed; it exits
non-zero only when a run went wrong.
"""

from __future__ import annotations

import argparse
import sys

import propagation
import throughput
from common import BenchError, report, stop_on_sigterm, table


def run(
    nodes: tuple[int, ...] = (10, 50, 200),
    count: int = 200,
    interval: float = 0.05,
    events: int = 20000,
    directory: str | None = None,
) -> dict:
    """Both benchmarks at each cluster size (at least 2: two nodes are real)."""
    sizes = []
    for size in nodes:
        latency = propagation.run(
            count, interval, naive=1, subscribers=max(0, size - 2), directory=directory, floor=1
        )
        rate = throughput.run(
            max(events, size), monitors=size, subscribers=size, naive=1, directory=directory
        )
        sizes.append(
            {
                "nodes": size,
                "propagation_listed_ms": latency["listed_ms"],
                "propagation_applied_ms": latency["applied_ms"],
                "throughput_events": rate["events"],
                "ingest_events_per_s": rate["ingest_events_per_s"],
                "delivered_events_per_s": rate["delivered_events_per_s"],
                "ack_ms": rate["ack_ms"],
                "hub_cpu_percent": rate["hub"]["cpu_percent"],
                "hub_peak_rss_kb": rate["hub"]["peak_rss_kb"],
                "zero_loss": rate["zero_loss"],
                "loss": rate["loss"],
            }
        )
    return {"bans": count, "interval_s": interval, "events": events, "sizes": sizes}


def text(result: dict) -> str:
    """The table of one run."""
    rows = [
        [
            size["nodes"],
            size["propagation_listed_ms"]["p50"],
            size["propagation_listed_ms"]["p99"],
            size["propagation_applied_ms"]["p50"],
            size["propagation_applied_ms"]["p99"],
            size["ingest_events_per_s"],
            size["delivered_events_per_s"],
            size["hub_peak_rss_kb"] / 1024,
            "yes" if size["zero_loss"] else "NO",
        ]
        for size in result["sizes"]
    ]
    headers = [
        "nodes",
        "listed p50 ms",
        "p99",
        "applied p50 ms",
        "p99",
        "ACKed ev/s",
        "delivered ev/s",
        "hub peak MB",
        "zero loss",
    ]
    return table(headers, rows) + (
        f"\npropagation: {result['bans']} bans {result['interval_s'] * 1000:g} ms apart, two"
        " real nodes, the others simulated listeners; throughput: as many monitors and"
        f" subscriber connections as nodes, {result['events']} events"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="10,50,200", help="cluster sizes (10,50,200)")
    parser.add_argument("--count", type=int, default=200, help="bans per size (200)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between bans")
    parser.add_argument("--events", type=int, default=20000, help="throughput events (20000)")
    parser.add_argument("--dir", help="where the clusters live (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        nodes = tuple(int(size) for size in args.nodes.split(","))
    except ValueError:
        parser.error("--nodes takes sizes separated by commas, e.g. 10,50,200")
    if not all(2 <= size <= 1000 for size in nodes) or not 1 <= args.count <= 60000:
        parser.error("every size must be 2..1000 and --count 1..60000")
    if not 1 <= args.events <= throughput.MAX_EVENTS:
        parser.error(f"--events must be 1..{throughput.MAX_EVENTS}")
    stop_on_sigterm()
    try:
        result = run(nodes, args.count, args.interval, args.events, args.dir)
    except BenchError as error:
        print(f"scale: {error}", file=sys.stderr)
        return 1
    report("scale", result, text(result), args.json)
    return 0 if all(size["zero_loss"] for size in result["sizes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
