"""Prometheus metrics of a stream worker (seconds and ``_total``, unlike Faust's own sensors).

Counters move once per batch, not per event: per-event label lookups would cost more than
the detection itself. Events by source (``emrwatch_events_by_source_total{source}``) are
counted the same way: the processor tallies the raw ``emrwatch-source`` header values of a
batch in a dict and this module turns them into at most :data:`MAX_SOURCES` label values
(the rest as ``other``; events without the header as ``unknown``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_SOURCES = 50  # distinct ``source`` label values; later sources count as OTHER_SOURCE
MAX_SOURCE_LEN = 64  # characters of a source name kept in its label
UNKNOWN_SOURCE = "unknown"  # events without an ``emrwatch-source`` header (older producers)
OTHER_SOURCE = "other"


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "emrwatch_events_processed", "Access events run through detection", registry=r
        )
        # a separate counter, not a label on emrwatch_events_processed: a labelled counter
        # has no series before its first event, and "rate(...) == 0" (the stalled-pipeline
        # rule) would then never hold for a worker that never processed anything
        self.events_by_source = Counter(
            "emrwatch_events_by_source",
            "Access events run through detection, by the emrwatch-source header (connector); "
            f"'{UNKNOWN_SOURCE}' without it, '{OTHER_SOURCE}' past {MAX_SOURCES} sources",
            ["source"],
            registry=r,
        )
        self.events_by_source.labels(source=UNKNOWN_SOURCE)  # the series exists from the start
        self._source_labels: dict[Any, str] = {None: UNKNOWN_SOURCE}  # header value → label
        self._named_sources: set[str] = set()
        self.skipped = Counter(
            "emrwatch_events_skipped",
            "Records skipped because a restored snapshot covers them",
            registry=r,
        )
        self.deadletters = Counter(
            "emrwatch_deadletters", "Records sent to the dead-letter topic", registry=r
        )
        self.clock_ahead = Counter(
            "emrwatch_events_clock_ahead",
            "Accesses stamped after their record was produced (a wrong clock at the source), "
            "judged at the record's time",
            registry=r,
        )
        self.clock_behind = Counter(
            "emrwatch_events_clock_behind",
            "Accesses stamped steadily long before their record was produced (a source's "
            "clock runs behind), judged that much later",
            registry=r,
        )
        self.withdrawn = Counter(
            "emrwatch_cases_withdrawn",
            "Cases whose correlations were withdrawn once a source's clock was found behind: "
            "its earlier accesses, taken as stamped, had made them (an alert that fell below "
            "the threshold is retracted)",
            registry=r,
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
        self.late_allowance = Gauge(
            "emrwatch_late_allowance_seconds",
            "How long an idle visit waits for late accesses before the learned models score "
            "it (model_visit_lateness_s, widened to the input's delays), per access partition",
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
        by_source = getattr(res, "by_source", None)
        if by_source:
            self.on_sources(by_source)
        if res.skipped:
            self.skipped.inc(res.skipped)
        if res.deadletters:
            self.deadletters.inc(res.deadletters)
        if getattr(res, "clock_ahead", 0):
            self.clock_ahead.inc(res.clock_ahead)
        if getattr(res, "clock_behind", 0):
            self.clock_behind.inc(res.clock_behind)
        if getattr(res, "withdrawn", 0):
            self.withdrawn.inc(res.withdrawn)
        for p, s in getattr(res, "late_allowance", {}).items():
            self.late_allowance.labels(partition=str(p)).set(s)
        self.on_alerts(alerts, now)

    def on_sources(self, counts: dict[Any, int]) -> None:
        """Add one batch's events per raw ``emrwatch-source`` header value (bytes, or None
        for events without the header)."""
        per_label: dict[str, int] = {}
        for raw, n in counts.items():
            label = self.source_label(raw)
            per_label[label] = per_label.get(label, 0) + n
        for label, n in per_label.items():
            if n:
                self.events_by_source.labels(source=label).inc(n)

    def source_label(self, raw: Any) -> str:
        """The label of one header value: its text (trimmed, at most
        :data:`MAX_SOURCE_LEN` characters) for the first :data:`MAX_SOURCES` distinct
        sources, :data:`OTHER_SOURCE` after them, :data:`UNKNOWN_SOURCE` when absent or
        empty."""
        if isinstance(raw, bytearray | memoryview):
            raw = bytes(raw)
        label = self._source_labels.get(raw)
        if label is not None:
            return label
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        text = "".join(ch for ch in text if ch.isprintable()).strip()[:MAX_SOURCE_LEN]
        if not text:
            label = UNKNOWN_SOURCE
        elif text in self._named_sources or text in (UNKNOWN_SOURCE, OTHER_SOURCE):
            label = text
        elif len(self._named_sources) < MAX_SOURCES:
            self._named_sources.add(text)
            label = text
        else:
            return OTHER_SOURCE  # not remembered: the map stays bounded whatever arrives
        if len(self._source_labels) < 4 * MAX_SOURCES:  # bounded, like the label values
            self._source_labels[raw] = label
        return label

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
