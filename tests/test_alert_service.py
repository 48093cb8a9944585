"""``emrwatch alerts``: alert versions on the real broker's alert topic reach the store once,
and a restart (same consumer group) re-reads nothing into duplicates."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from pipeline.alert_service import run_alert_service
from pipeline.alerting.testing import sample_alert


def _config(tmp_path: Path, broker: Any, layout: Any) -> str:
    cfg = {
        "kafka": {"bootstrap_servers": broker.bootstrap},
        "topics": {"prefix": layout.prefix, "partitions": layout.partitions},
        "worker": {"group_id": f"g-{layout.prefix}"},
        "alerting": {"store_url": f"sqlite:///{tmp_path / 'alerts.sqlite3'}"},
    }
    path = tmp_path / "emrwatch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _run_until(config: str, done: Any, timeout: float = 40.0) -> None:
    stop = threading.Event()
    routers: list[Any] = []
    t = threading.Thread(target=run_alert_service, args=(config, stop, routers.append), daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if routers and done(routers[0]):
                return
            time.sleep(0.2)
        raise AssertionError("the alert service did not store the alerts in time")
    finally:
        stop.set()
        t.join(timeout=15)


def _send(producer: Any, topic: str, alerts: list[dict[str, Any]]) -> None:
    for a in alerts:
        producer.send(topic, key=a["alert_id"].encode(), value=orjson.dumps(a))
    producer.flush()


def test_alert_topic_to_store_once_across_a_restart(tmp_path, broker, layout, producer):
    config = _config(tmp_path, broker, layout)
    first = [sample_alert(alert_id=f"ew-{i:04d}", version=1) for i in range(5)]
    _send(producer, layout.alerts, first + [first[0]])  # a redelivered version too
    _run_until(config, lambda r: r.store.count() == 5)
    grown = dict(first[1], version=2, event_ids=[*first[1]["event_ids"], "late-event"])
    _send(producer, layout.alerts, [grown, sample_alert(alert_id="ew-9999", version=1)])
    _run_until(config, lambda r: r.store.count() == 6 and r.store.get("ew-0001").version == 2)
    from pipeline.alerting.store import AlertStore

    store = AlertStore(f"sqlite:///{tmp_path / 'alerts.sqlite3'}")
    try:
        assert store.count() == 6
        assert "late-event" in store.event_ids("ew-0001")
    finally:
        store.close()


def test_emrwatch_run_with_sinks_stores_alerts_from_its_own_config(
    tmp_path, broker, layout, producer, spawn_worker
):
    """`emrwatch run --config FILE --sinks`: the worker also runs the config's sinks."""
    config = _config(tmp_path, broker, layout)
    w = spawn_worker(layout, f"g-{layout.prefix}", "--config", config, "--sinks")
    alerts = [sample_alert(alert_id=f"ew-run-{i}", version=1) for i in range(3)]
    _send(producer, layout.alerts, alerts)
    from sqlalchemy.exc import OperationalError

    from pipeline.alerting.store import AlertStore

    db = tmp_path / "alerts.sqlite3"
    deadline = time.monotonic() + 60
    count = 0
    while time.monotonic() < deadline and w.alive():
        if db.exists():
            # only read: the worker creates the schema (a second migration racing it would
            # lock the file); until it has, the table is not there yet
            store = AlertStore(f"sqlite:///{db}", migrate=False)
            try:
                count = store.count()
            except OperationalError:
                count = 0
            finally:
                store.close()
            if count == 3:
                break
        time.sleep(0.3)
    assert count == 3, w.log()[-3000:]


def test_emrwatch_run_sinks_refuses_a_bad_alerting_section(tmp_path, broker, layout):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": broker.bootstrap},
                "topics": {"prefix": layout.prefix},
                "alerting": {"store_url": "sqlite:///x.db", "no_such_key": 1},
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(bad), "--sinks"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "no_such_key" in r.stderr


def test_without_a_feed_the_sink_metrics_are_served_on_the_metrics_port(
    tmp_path, broker, layout, producer, capfd
):
    """Prometheus scrapes ``emrwatch alerts`` on ``worker.metrics_port`` when it serves no
    feed: deliveries, failures, retries and the outbox backlog."""
    import re
    import urllib.request

    config = _config(tmp_path, broker, layout)
    doc = yaml.safe_load(Path(config).read_text())
    doc["worker"]["metrics_port"] = 0
    Path(config).write_text(yaml.safe_dump(doc))
    _send(producer, layout.alerts, [sample_alert(alert_id="ew-m1", version=1)])
    printed: list[str] = []
    scraped: list[str] = []

    def stored_and_scraped(router: Any) -> bool:
        printed.append(capfd.readouterr().out)
        m = re.search(r"alert sink metrics\s+(http://\S+)", "".join(printed))
        if m and not scraped:
            scraped.append(urllib.request.urlopen(m.group(1), timeout=5).read().decode())
        return router.store.count() == 1 and bool(scraped)

    _run_until(config, stored_and_scraped)
    assert "# TYPE emrwatch_outbox_entries gauge" in scraped[0]
    assert "emrwatch_history" not in scraped[0]  # no history kept here
