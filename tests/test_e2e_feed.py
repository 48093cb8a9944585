"""End to end, as deployed: access event → Kafka → stream worker → alert topic → ``emrwatch
alerts`` (store + feed, its own process) → an analyst's browser over server-sent events.

"A stream alert is visible in the feed within 2 s": the clock starts when the triggering
access event is produced and stops when its row is in the analyst's page (a
MutationObserver in the page stamps the moment). A warm-up round first proves the worker
owns every access partition and the alert service is consuming, so the measurement is the
steady state, not a consumer-group join.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from detectors.alerts import alert_id_for
from pipeline.alerting.render import mask_id
from pipeline.web.testing import PASSWORD, feed_settings
from tests.browser import log_in, needs_chromium, open_page
from tests.conftest import StreamHarness
from tests.hospital import ev, write_hospital

REPO = Path(__file__).resolve().parent.parent
FEED_BUDGET_S = 2.0  # the product requirement
SEALED = "P-SEAL"  # sealed; only p-card is on its authorised list (tests/hospital.py)

pytestmark = needs_chromium

# stamps, in page time (ms since the epoch), the moment each watched row enters the DOM
_WATCH_JS = """
(id) => {
  window.__seen = window.__seen || {};
  const stamp = () => {
    if (!(id in window.__seen) && document.getElementById("row-" + id)) {
      window.__seen[id] = Date.now();
    }
  };
  new MutationObserver(stamp).observe(document.body, {childList: true, subtree: true});
  stamp();
}
"""


class AlertService:
    """``emrwatch alerts --config FILE`` in its own process, as in production."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._fh = log_path.open("ab")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "alerts", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_url(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"alert feed\s+(http://\S+)", self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"emrwatch alerts exited:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"emrwatch alerts served no feed:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._fh.close()


@pytest.fixture()
def alert_service(broker: Any, layout: Any, tmp_path: Path) -> Iterator[AlertService]:
    ana = feed_settings().user("ana")
    assert ana is not None
    cfg = {
        "kafka": {"bootstrap_servers": broker.bootstrap},
        "topics": {"prefix": layout.prefix, "partitions": layout.partitions},
        "worker": {"group_id": f"g-feed-{layout.prefix}"},
        "alerting": {"store_url": f"sqlite:///{tmp_path / 'alerts.sqlite3'}"},
        "feed": {
            "users": [{"username": "ana", "role": "analyst", "password_hash": ana.password_hash}],
            "host": "127.0.0.1",
            "port": 0,
        },
    }
    path = tmp_path / "emrwatch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    svc = AlertService(path, tmp_path / "alerts-service.log")
    try:
        yield svc
    finally:
        svc.stop()


def _produce_one(harness: StreamHarness, event: dict[str, Any]) -> float:
    """Send one access event as a connector does (key = user id); returns the wall time
    (seconds) of the send, taken just before it."""
    t = time.time()
    harness.producer.send(
        harness.layout.access,
        key=event["user_id"].encode(),
        value=orjson.dumps(event),
        headers=[("emrwatch-source", b"e2e-feed")],
    )
    harness.producer.flush()
    return t


def test_a_stream_alert_is_visible_in_the_feed_within_2_s(
    harness: StreamHarness,
    spawn_worker: Any,
    alert_service: AlertService,
    browser: Any,
    tmp_path: Path,
) -> None:
    harness.publish_context(write_hospital(tmp_path / "ctx"))
    worker = spawn_worker(harness.layout, f"g-feed-{harness.layout.prefix}")
    url = alert_service.wait_for_url()

    page, errors = open_page(browser, 30_000)
    log_in(page, url, "ana", PASSWORD)
    page.wait_for_selector("#live.live-on")  # the event stream is connected

    # warm-up: the worker acknowledges an end marker on every access partition (it owns
    # them all and has fetched), then a first alert travels the whole way to this page
    run, parts = harness.eof()
    harness.wait_acks(run, parts, workers=(worker,))
    warm = ev("n-card", SEALED, at="2026-03-02T09:00:00", event_id="warm-1")
    _produce_one(harness, warm)
    warm_id = alert_id_for("n-card", "warm-1")
    try:
        page.wait_for_selector(f"#row-{warm_id}", timeout=120_000)
    except Exception:
        print("--- emrwatch alerts ---\n" + alert_service.log()[-3000:])
        raise

    # the measurement: one sealed-record access by someone not on the list
    hit = ev("n-orth", SEALED, at="2026-03-02T09:30:00", event_id="hit-1")
    aid = alert_id_for("n-orth", "hit-1")
    page.evaluate(_WATCH_JS, aid)
    t_produce = _produce_one(harness, hit)
    t_mono = time.monotonic()
    page.wait_for_selector(f"#row-{aid}", timeout=60_000)  # generous; the budget is below
    observed_s = time.monotonic() - t_mono
    seen_ms = page.evaluate("(id) => window.__seen[id]", aid)
    latency_s = seen_ms / 1000 - t_produce
    print(
        f"\nproduce → visible in the feed: {latency_s * 1000:.0f} ms "
        f"(test side, incl. Playwright round trip: {observed_s * 1000:.0f} ms)"
    )
    assert 0 <= latency_s < FEED_BUDGET_S, f"{latency_s:.3f} s from produce to the feed"

    # what an analyst sees: the staff member, role and department, the rule; never the
    # patient id, neither in the page nor in its JSON, and the case shows it masked
    row = page.locator(f"#row-{aid}")
    assert page.locator("#rows tr").first.get_attribute("id") == f"row-{aid}"  # newest on top
    text = row.inner_text().lower()  # the severity chip is upper-cased by CSS
    assert "n-orth" in text and "nurse · orth" in text  # staff id, role and department
    assert "sealed-record-touch" in text and "critical" in text
    assert SEALED not in page.content()
    api = page.request.get(url + "/api/alerts")
    assert api.ok and aid in api.text() and SEALED not in api.text()
    assert page.request.get(url + "/audit").status == 403  # auditors only
    row.locator("a.case-link").click()
    page.wait_for_selector("#reason")
    assert SEALED not in page.content()
    assert mask_id(SEALED) in page.inner_text("#timeline")
    assert page.locator(f"form[action='/cases/{aid}/unmask']").count() == 1  # may ask, once
    assert not errors, errors
    page.context.close()
    assert worker.alive()
