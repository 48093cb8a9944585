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


#: (counter or gauge, metric name, help, the attribute it reads)
Spec = tuple[str, str, str, str]


def attribute_metrics(source: Any, specs: tuple[Spec, ...]) -> Iterator[Any]:
    """One unlabelled counter or gauge per spec, read from ``source``'s attributes at
    scrape time."""
    for kind, name, text, attr in specs:
        family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        yield family(name, text, value=getattr(source, attr))


class HistoryCollector:
    """The history the alert service keeps (``feed.history_refresh_s``): updates, failed
    updates, the time of the last one and the events held (a
    :class:`pipeline.history.HistoryKeeper`)."""

    SPECS: tuple[Spec, ...] = (
        ("counter", "emrwatch_history_updates", "Completed updates of the kept history",
         "updates"),
        ("counter", "emrwatch_history_update_failures",
         "Updates of the kept history that failed", "failures"),
        ("gauge", "emrwatch_history_last_update_timestamp_seconds",
         "When the kept history was last updated (0: not yet)", "last_update"),
        ("gauge", "emrwatch_history_events", "Access events the kept history holds", "events"),
    )  # fmt: skip

    def __init__(self, keeper: Any) -> None:
        self.keeper = keeper

    def collect(self) -> Iterator[Any]:
        yield from attribute_metrics(self.keeper, self.SPECS)


def sink_registry(router: Any, registry: CollectorRegistry | None = None) -> CollectorRegistry:
    reg = registry or CollectorRegistry()
    reg.register(SinkCollector(router))
    return reg
