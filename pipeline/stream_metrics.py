"""Prometheus metrics of a stream worker (seconds and ``_total``, unlike Faust's own sensors).

Counters move once per batch, not per event: per-event label lookups would cost more than
the detection itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "emrwatch_events_processed", "Access events run through detection", registry=r
        )
        self.skipped = Counter(
            "emrwatch_events_skipped",
            "Records skipped because a restored snapshot covers them",
            registry=r,
        )
        self.deadletters = Counter(
            "emrwatch_deadletters", "Records sent to the dead-letter topic", registry=r
        )
        self.alerts = Counter(
            "emrwatch_alerts_emitted", "Alert versions written to the alert topic", registry=r
        )
        self.new_alerts = Counter(
            "emrwatch_alerts",
            "Alerts (cases) first emitted by this worker, by primary detector and severity",
            ["detector", "severity"],
            registry=r,
        )
        self._seen: dict[str, None] = {}  # alert ids already counted (bounded, oldest dropped)
        self.batches = Counter("emrwatch_batches", "take() batches processed", registry=r)
        self.batch_seconds = Histogram(
            "emrwatch_batch_seconds",
            "Wall time to process one batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.event_to_alert = Histogram(
            "emrwatch_event_to_alert_seconds",
            "From the access record's producer timestamp to the alert's emission",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "emrwatch_consumer_lag",
            "Records fetched-highwater minus next offset to process, per access partition",
            ["partition"],
            registry=r,
        )
        self.context_updates = Counter(
            "emrwatch_context_updates", "Context records applied", registry=r
        )
        self.snapshot_bytes = Gauge(
            "emrwatch_snapshot_bytes", "Size of the last engine snapshot", registry=r
        )
        self.snapshot_seconds = Histogram(
            "emrwatch_snapshot_seconds", "Time to serialise and write one snapshot", registry=r
        )
        self.partitions = Gauge(
            "emrwatch_assigned_partitions", "Access partitions owned", registry=r
        )
        self.started = Gauge(
            "emrwatch_worker_start_time_seconds", "Worker start, unix time", registry=r
        )
        self.started.set(time.time())

    def on_batch(self, res: Any, alerts: Iterable[tuple[Any, float]], now: float) -> None:
        self.batches.inc()
        if res.processed:
            self.events.inc(res.processed)
        if res.skipped:
            self.skipped.inc(res.skipped)
        if res.deadletters:
            self.deadletters.inc(res.deadletters)
        self.on_alerts(alerts, now)

    def on_alerts(self, alerts: Iterable[tuple[Any, float]], now: float) -> None:
        n = 0
        for a, src_ts in alerts:
            n += 1
            self._count_new(a)
            if src_ts:
                self.event_to_alert.observe(max(0.0, now - src_ts))
        if n:
            self.alerts.inc(n)

    def _count_new(self, a: Any) -> None:
        d = a if isinstance(a, dict) else a.to_dict()
        aid = d.get("alert_id", "")
        if aid in self._seen or d.get("status") == "retracted":
            return
        self._seen[aid] = None
        if len(self._seen) > 200_000:
            del self._seen[next(iter(self._seen))]
        detectors = d.get("detector") or ["unknown"]
        self.new_alerts.labels(
            detector=str(detectors[0]), severity=str(d.get("severity", ""))
        ).inc()

    def on_snapshot(self, size: int, seconds: float) -> None:
        self.snapshot_bytes.set(size)
        self.snapshot_seconds.observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics``; returns the bound port (0 picks a free one)."""
        return serve_registry(self.registry, port, host)


def serve_registry(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> int:
    """Serve a registry's ``/metrics``; returns the bound port (0 picks a free one)."""
    if port == 0:
        from pipeline.broker import free_port

        port = free_port(host)
    start_http_server(port, addr=host, registry=registry)
    return port
