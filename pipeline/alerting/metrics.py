"""Prometheus view of the alert sinks: deliveries, failures, retries and the outbox backlog.

A collector reads the router's counters when Prometheus scrapes, so the delivery loop pays
nothing per notification. Labels are the sink ("slack", "email") and outbox state only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class SinkCollector:
    def __init__(self, router: Any) -> None:
        self.router = router

    def collect(self) -> Iterator[Any]:
        counters = self.router.counters
        fams = {
            "enqueued": CounterMetricFamily(
                "emrwatch_sink_enqueued", "Notifications written to the outbox", labels=["sink"]
            ),
            "delivered": CounterMetricFamily(
                "emrwatch_sink_delivered", "Notifications the sink accepted", labels=["sink"]
            ),
            "failed": CounterMetricFamily(
                "emrwatch_sink_failures", "Failed delivery attempts", labels=["sink"]
            ),
            "retried": CounterMetricFamily(
                "emrwatch_sink_retries", "Attempts that retried an earlier failure", labels=["sink"]
            ),
        }
        for sink, c in sorted(counters.items()):
            for name, fam in fams.items():
                fam.add_metric([sink], getattr(c, name))
        yield from fams.values()
        backlog = GaugeMetricFamily(
            "emrwatch_outbox_entries", "Outbox rows by sink and state", labels=["sink", "state"]
        )
        try:
            rows = self.router.outbox.backlog()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database blinked
            rows = {}
        for sink, states in sorted(rows.items()):
            for state, n in sorted(states.items()):
                backlog.add_metric([sink, state], n)
        yield backlog


def sink_registry(router: Any, registry: CollectorRegistry | None = None) -> CollectorRegistry:
    reg = registry or CollectorRegistry()
    reg.register(SinkCollector(router))
    return reg
