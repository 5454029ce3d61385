"""Figures for Prometheus: the delay histogram a reactor keeps, and the optional exporter.

A reactor describes its figures as plain data (`counter`, `gauge`, `DelayHistogram`)
in its status answer. The exporter, off by default, serves prometheus-client's text
from a small HTTP server of its own in one thread; each scrape asks the daemon over its
control socket, so the figures are taken by the loop that owns them and no state is
shared between threads.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import functools
import threading
import time
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


# The HTTP side of the exporter: one thread for every connection (prometheus-client's own
# server starts a thread per connection: 1,000 idle connections were 1,000 threads and
# the daemon's file descriptors), a request head within REQUEST_TIMEOUT, and the figures
# gathered at most once a second however often a scraper (or anyone else) asks.
MAX_CONNECTIONS = 32  # open at once; the oldest is closed to make room
REQUEST_TIMEOUT = 5.0  # seconds to send the request head, and to take the answer
MAX_REQUEST_HEAD = 8192  # bytes of a request line and its headers
CACHE_SECONDS = 1.0


async def _new_lock() -> asyncio.Lock:
    return asyncio.Lock()  # made on the loop that uses it (Python 3.9 binds it there)


class MetricsExporter:
    """A bounded HTTP server for Prometheus; every scrape asks the daemon for its figures."""

    def __init__(self, role: str, listen: tuple[str, int], control: Path) -> None:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
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
        self.content_type = CONTENT_TYPE_LATEST
        self.generate = functools.partial(generate_latest, registry)
        self.cached: tuple[float, bytes] = (-CACHE_SECONDS, b"")
        self.asker = concurrent.futures.ThreadPoolExecutor(1, "f2bzmq-metrics-ask")
        # Open connections, oldest first: at the limit the oldest is closed, so neither
        # idle connections nor ones that do not read their answer keep a scraper out.
        self.open: dict[asyncio.StreamWriter, None] = {}
        host, port = listen
        self.loop = asyncio.new_event_loop()
        self.asking = self.loop.run_until_complete(_new_lock())  # one question at a time
        try:
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self.serve, host, port, limit=MAX_REQUEST_HEAD)
            )
        except OSError as error:
            self.loop.close()
            raise RuntimeError(f"cannot listen for metrics on {host}:{port}: {error}") from None
        self.thread = threading.Thread(target=self.loop.run_forever, name="f2bzmq-metrics")
        self.thread.daemon = True
        self.thread.start()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: one request, one answer, then it is closed."""
        if len(self.open) >= MAX_CONNECTIONS:
            oldest = next(iter(self.open))
            del self.open[oldest]
            oldest.close()
        self.open[writer] = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method = head.split(b" ", 1)[0]
            status, body = b"405 Method Not Allowed", b""
            if method in (b"GET", b"HEAD"):
                status, body = b"200 OK", await self.figures()
            headers = [
                b"HTTP/1.1 " + status,
                b"Content-Type: " + self.content_type.encode(),
                b"Content-Length: " + str(len(body)).encode(),
                b"Connection: close",
            ]
            writer.write(b"\r\n".join(headers) + b"\r\n\r\n" + (body if method == b"GET" else b""))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # too slow, cut short, or a head too long: closed
        except OSError:
            pass  # the scraper went away
        finally:
            self.open.pop(writer, None)
            writer.close()

    async def figures(self) -> bytes:
        """The exposition text, asked of the daemon at most once per CACHE_SECONDS."""
        async with self.asking:
            at, text = self.cached
            if time.monotonic() - at >= CACHE_SECONDS:
                # The control socket may take 2 s to answer: not on the connections' loop.
                text = await self.loop.run_in_executor(self.asker, self.generate)
                self.cached = (time.monotonic(), text)
            return text

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
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.asker.shutdown(wait=False)
