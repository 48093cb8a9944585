"""The feed's own numbers for Prometheus: open streams, changes published, poll costs,
sign-ins (failed, locked out), sessions signed in.

Registered only when :func:`pipeline.web.create_app` gets a registry; the app then also
serves that registry at ``/metrics`` (no login: Prometheus scrapes it, and no label carries
a user or patient id).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from pipeline.alerting.metrics import Spec, attribute_metrics
from pipeline.web.auth import LoginGuard
from pipeline.web.changes import ChangeFeed


class FeedCollector(Collector):
    SPECS: tuple[Spec, ...] = (
        ("gauge", "emrwatch_feed_streams", "Open live-feed event streams (browsers)",
         "subscribers"),
        ("counter", "emrwatch_feed_changes", "Alert changes the feed published to its streams",
         "seq"),
        ("gauge", "emrwatch_feed_scan_seconds",
         "Duration of the feed's last full change scan of the alert store", "scan_seconds"),
        ("counter", "emrwatch_feed_poll_failures", "Polls of the alert store that failed",
         "poll_failures"),
    )  # fmt: skip

    LOGIN_SPECS: tuple[Spec, ...] = (
        ("counter", "emrwatch_feed_logins", "Users who signed in to the feed", "successes"),
        ("counter", "emrwatch_feed_login_failures",
         "Failed sign-ins: wrong passwords or codes, unknown users", "failures"),
        ("counter", "emrwatch_feed_login_lockouts",
         "Usernames and addresses locked after repeated failed sign-ins", "lockouts"),
        ("counter", "emrwatch_feed_login_refused",
         "Sign-ins refused because the username or the address was locked", "refused"),
    )  # fmt: skip

    RELOAD_SPECS: tuple[Spec, ...] = (
        ("counter", "emrwatch_feed_settings_reloads",
         "Changes to the feed's users applied from the config file", "reloads"),
        ("counter", "emrwatch_feed_settings_reload_failures",
         "Edits of the config file that did not load and were not applied", "failures"),
    )  # fmt: skip

    def __init__(
        self,
        changes: ChangeFeed,
        guard: LoginGuard | None = None,
        reloader: Any = None,
        open_sessions: Callable[[], int] | None = None,
    ) -> None:
        self.changes = changes
        self.guard = guard
        self.reloader = reloader
        self.open_sessions = open_sessions

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from attribute_metrics(self.changes, self.SPECS)
        if self.open_sessions is not None:
            try:
                n = self.open_sessions()
            except Exception:  # noqa: BLE001 - a scrape must not fail because the database blinked
                n = None
            if n is not None:
                yield GaugeMetricFamily(
                    "emrwatch_feed_sessions_open",
                    "Sessions signed in to the feed now (every feed process on the store)",
                    value=n,
                )
        if self.guard is not None:
            yield from attribute_metrics(self.guard, self.LOGIN_SPECS)
        if self.reloader is not None:
            yield from attribute_metrics(self.reloader, self.RELOAD_SPECS)


def metrics_endpoint(registry: CollectorRegistry) -> Callable[[Request], Awaitable[Response]]:
    """``GET /metrics``: the registry in Prometheus' text format."""

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return metrics
