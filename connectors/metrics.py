"""Prometheus metrics of the connectors, per source.

>>> from prometheus_client import CollectorRegistry
>>> m = ConnectorMetrics(CollectorRegistry())
>>> m.record("emr-a", "accepted", 120)
>>> m.records.labels("emr-a", "accepted")._value.get(), m.bytes.labels("emr-a")._value.get()
(1.0, 120.0)
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class ConnectorMetrics:
    """Records received per source and outcome (accepted, empty, deadletter, skipped), bytes,
    the time of the last record, and committed batches."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.records = Counter(
            "emrwatch_connector_records",
            "raw records received by a connector, by outcome "
            "(accepted, empty, deadletter, skipped = already delivered before a restart)",
            ["source", "outcome"],
            registry=r,
        )
        self.bytes = Counter(
            "emrwatch_connector_bytes", "bytes received by a connector", ["source"], registry=r
        )
        self.last_record = Gauge(
            "emrwatch_connector_last_record_timestamp_seconds",
            "when a connector last received a record",
            ["source"],
            registry=r,
        )
        self.batches = Counter(
            "emrwatch_connector_batches",
            "batches acknowledged by the broker and checkpointed",
            ["source"],
            registry=r,
        )
        self.refused = Counter(
            "emrwatch_connector_refused",
            "units (files, connections) refused or quarantined: failed TLS, bad signature, ...",
            ["source", "status"],
            registry=r,
        )
        self._children: dict[tuple[str, str], Any] = {}
        self._bytes: dict[str, Any] = {}
        self._last: dict[str, float] = {}

    def record(self, source: str, outcome: str, nbytes: int) -> None:
        c = self._children.get((source, outcome))
        if c is None:
            c = self._children[(source, outcome)] = self.records.labels(source, outcome)
        c.inc()
        b = self._bytes.get(source)
        if b is None:
            b = self._bytes[source] = self.bytes.labels(source)
        b.inc(nbytes)
        now = time.time()
        if now - self._last.get(source, 0.0) > 1.0:  # a gauge write per second is enough
            self._last[source] = now
            self.last_record.labels(source).set(now)

    def batch(self, source: str) -> None:
        self.batches.labels(source).inc()

    def watch(self, connectors: list[Any]) -> None:
        """Export the spool backlog of these connectors (read at scrape time, so it grows
        while the broker is away and no batch completes)."""
        self.registry.register(_SpoolCollector(connectors))


class _SpoolCollector(Collector):
    """``emrwatch_connector_spool_backlog_bytes``: received, not yet acknowledged by the
    broker, per spooling source (:mod:`connectors.spool`)."""

    def __init__(self, connectors: list[Any]) -> None:
        self.connectors = connectors

    def collect(self) -> Any:
        g = GaugeMetricFamily(
            "emrwatch_connector_spool_backlog_bytes",
            "bytes a push source received and spooled that the broker has not acknowledged",
            labels=["source"],
        )
        for c in self.connectors:
            backlog = c.describe().get("spool_unacked_bytes")
            if backlog is not None:
                g.add_metric([c.name], float(backlog))
        yield g


class MeteredLedger:
    """A ledger that also counts refused and quarantined units in :class:`ConnectorMetrics`."""

    def __init__(self, ledger: Any, metrics: ConnectorMetrics) -> None:
        self.inner = ledger
        self.metrics = metrics

    def receipt(self, source: str, unit: str, **kw: Any) -> None:
        self.inner.receipt(source, unit, **kw)
        status = kw.get("status", "accepted")
        if status != "accepted":
            self.metrics.refused.labels(source, status).inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
