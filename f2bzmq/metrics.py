"""Figures for Prometheus: the delay histogram a reactor keeps, and the optional exporter.

A reactor describes its figures as plain data (`counter`, `gauge`, `DelayHistogram`)
in its status answer. The exporter, off by default, runs prometheus-client's HTTP
server in a thread; each scrape asks the daemon over its control socket, so the
figures are taken by the loop that owns them and no state is shared between threads.
"""

from __future__ import annotations

import bisect
from pathlib import Path

from .control import ControlError, ask

# Seconds, from an event's origin (fail2ban's Ban line) to the step that observes it.
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class DelayHistogram:
    """Cumulative-bucket histogram of delays, in the shape Prometheus expects."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)  # clocks of two servers may disagree a little
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def as_dict(self) -> dict:
        cumulative, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            total += count
            cumulative.append(["+Inf" if bound == float("inf") else str(bound), total])
        return {"buckets": cumulative, "sum": self.sum, "count": self.count}


def counter(help_text: str, value: float) -> dict:
    return {"type": "counter", "help": help_text, "value": value}


def gauge(help_text: str, value: float | dict[str, float], label: str | None = None) -> dict:
    """A gauge; with `label`, `value` maps each label value (a jail, a hub) to a figure."""
    return {"type": "gauge", "help": help_text, "value": value, "label": label}


def histogram(help_text: str, delays: DelayHistogram) -> dict:
    return {"type": "histogram", "help": help_text, "value": delays.as_dict()}


class MetricsExporter:
    """prometheus-client's HTTP server; every scrape asks the daemon for its figures."""

    def __init__(self, role: str, listen: tuple[str, int], control: Path) -> None:
        try:
            from prometheus_client import start_http_server
            from prometheus_client.registry import CollectorRegistry
        except ImportError:
            raise RuntimeError(
                f"[{role}] metrics needs the prometheus-client package "
                "(pip install prometheus-client)"
            ) from None
        self.role = role
        self.control = control
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        host, port = listen
        try:
            self.server, self.thread = start_http_server(port, host, registry=registry)
        except OSError as error:
            raise RuntimeError(f"cannot listen for metrics on {host}:{port}: {error}") from None

    def collect(self):
        """Called by prometheus-client on each scrape, in its server thread."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        up = GaugeMetricFamily("f2bzmq_up", "1 when the daemon answered", labels=["role"])
        try:
            figures = ask(self.control, timeout=2.0).get("metrics", {})
        except ControlError:
            up.add_metric([self.role], 0)
            yield up
            return
        up.add_metric([self.role], 1)
        yield up
        for name, spec in figures.items():
            full = f"f2bzmq_{self.role}_{name}"
            kind, value = spec["type"], spec["value"]
            if kind == "counter":
                yield CounterMetricFamily(full, spec["help"], value=value)
            elif kind == "histogram":
                family = HistogramMetricFamily(full, spec["help"])
                family.add_metric([], value["buckets"], value["sum"])
                yield family
            elif spec.get("label"):
                family = GaugeMetricFamily(full, spec["help"], labels=[spec["label"]])
                for label, figure in value.items():
                    family.add_metric([label], figure)
                yield family
            else:
                yield GaugeMetricFamily(full, spec["help"], value=value)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
