"""The shipped Prometheus rules and Grafana dashboard use only metrics the workers export,
the worker counts new alerts by detector and severity (never by user or patient), and it
counts events by their ``emrwatch-source`` header with a bounded set of labels."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from connectors.base import NullLedger
from connectors.metrics import ConnectorMetrics, MeteredLedger
from detectors.alerts import Alert
from pipeline.stream_metrics import MAX_SOURCES, StreamMetrics
from pipeline.stream_processor import BatchResult
from tests.conftest import StreamHarness, synthetic_hospital

DOCKER = Path(__file__).resolve().parent.parent / "docker"
METRIC = re.compile(r"\b(emrwatch_[a-z_]+)\b")


def _exported() -> set[str]:
    m = StreamMetrics()
    m.new_alerts.labels(detector="x", severity="low").inc()
    m.lag.labels(partition="0").set(0)
    m.late_allowance.labels(partition="0").set(600)
    text = generate_latest(m.registry).decode()
    c = ConnectorMetrics()  # `emrwatch connectors run --metrics-port`
    c.record("src", "accepted", 10)
    c.batch("src")
    MeteredLedger(NullLedger(), c).receipt("src", "f", status="quarantined")
    c.watch([_Spooling()])
    text += generate_latest(c.registry).decode()
    text += generate_latest(_alert_service_registry()).decode()  # `emrwatch alerts`
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line.startswith("emrwatch_")
    }


def _alert_service_registry() -> Any:
    """The registry ``emrwatch alerts`` serves: its sinks (one of each counter) and the
    history it keeps."""
    from types import SimpleNamespace

    from pipeline.alerting.metrics import HistoryCollector, sink_registry

    counters = SimpleNamespace(enqueued=1, delivered=1, failed=0, retried=0)
    outbox = SimpleNamespace(backlog=lambda: {"email": {"pending": 1}})
    router = SimpleNamespace(counters={"email": counters}, outbox=outbox)
    reg = sink_registry(router)
    keeper = SimpleNamespace(updates=2, failures=0, last_update=1.0, events=9)
    reg.register(HistoryCollector(keeper))
    # the feed's own, served with them at the feed's /metrics
    from pipeline.web.auth import LoginGuard
    from pipeline.web.metrics import FeedCollector
    from pipeline.web.settings import FeedSettings

    changes = SimpleNamespace(subscribers=0, seq=0, scan_seconds=0.0, poll_failures=0)
    reloads = SimpleNamespace(reloads=0, failures=0)
    guard = LoginGuard(FeedSettings(), None, "secret")  # counters only: no store needed
    from pipeline.alerting.chain import ChainWatch

    reg.register(ChainWatch(None, 3600))  # not started: its metrics only
    reg.register(FeedCollector(changes, guard, reloads, lambda: 0))  # type: ignore[arg-type]
    return reg


class _Spooling:
    """A push source with a spool backlog, as ``describe()`` reports it."""

    name = "atna"

    def describe(self) -> dict[str, Any]:
        return {"type": "atna-syslog", "spool_unacked_bytes": 4096}


def test_spool_backlog_is_read_at_scrape_time() -> None:
    c = ConnectorMetrics()
    src = _Spooling()
    c.watch([src, type("Plain", (), {"name": "f", "describe": lambda self: {}})()])
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(c.registry).decode())
    }
    [sample] = families["emrwatch_connector_spool_backlog_bytes"].samples
    assert sample.labels == {"source": "atna"} and sample.value == 4096


def _alert(aid: str, severity: str, status: str = "open") -> Alert:
    return Alert(
        alert_id=aid,
        detector=["sealed-record-touch"],
        severity=severity,
        score=0.9,
        user_id="u1",
        patient_ids=["p1"],
        event_ids=["e1"],
        first_seen="",
        last_seen="",
        reason="r",
        status=status,
    )


def test_rules_cover_the_four_conditions_and_use_exported_metrics():
    doc = yaml.safe_load((DOCKER / "prometheus-rules.yml").read_text())
    rules = {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}
    assert {
        "EmrwatchCriticalAlert",
        "EmrwatchPipelineStalled",
        "EmrwatchLagGrowing",
        "EmrwatchDeadLetterRate",
        "EmrwatchSourceSilent",
        "EmrwatchSourceRefused",
        "EmrwatchFeedLoginLockout",
        "EmrwatchFeedConfigRejected",
        "EmrwatchAuditLogTampered",
    } <= set(rules)
    exported = _exported()
    used = {name for expr in rules.values() for name in METRIC.findall(expr)}
    assert used and used <= exported, used - exported
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/emrwatch-rules.yml"]
    compose = (DOCKER / "compose.yaml").read_text()
    assert "./prometheus-rules.yml:/etc/prometheus/emrwatch-rules.yml" in compose


def test_dashboard_panels_query_exported_metrics():
    dash = json.loads((DOCKER / "grafana" / "emrwatch-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n.removesuffix("_bucket") for e in exprs for n in METRIC.findall(e)}
    exported = {n.removesuffix("_bucket") for n in _exported()}
    assert len(dash["panels"]) >= 5
    assert used <= exported, used - exported


def test_new_alerts_are_counted_once_by_detector_and_severity_without_ids():
    m = StreamMetrics()
    m.on_alerts(
        [
            (_alert("a1", "critical"), 0.0),
            (_alert("a1", "critical"), 0.0),
            (_alert("a2", "high"), 0.0),
            (_alert("a3", "high", "retracted"), 0.0),
        ],
        1.0,
    )
    text = generate_latest(m.registry).decode()
    assert 'emrwatch_alerts_total{detector="sealed-record-touch",severity="critical"} 1.0' in text
    assert 'emrwatch_alerts_total{detector="sealed-record-touch",severity="high"} 1.0' in text
    assert "emrwatch_alerts_emitted_total 4.0" in text
    assert "u1" not in text and "p1" not in text


def _by_source(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "emrwatch_events_by_source_total":
                out[sample.labels["source"]] = sample.value
    return out


def _processed(text: str) -> float:
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "emrwatch_events_processed_total":
                return sample.value
    raise AssertionError("no emrwatch_events_processed_total")


def test_dashboard_charts_events_by_source():
    dash = json.loads((DOCKER / "grafana" / "emrwatch-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert any("emrwatch_events_by_source_total" in e and "by (source)" in e for e in exprs), exprs
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_events_by_source_labels_are_bounded():
    m = StreamMetrics()
    # one batch: two named sources, events without the header, an empty header
    m.on_batch(BatchResult(processed=10, by_source={b"fhir-ehr": 6, None: 3, b"": 1}), (), 0.0)
    # later batches: many more sources than labels allowed
    for i in range(MAX_SOURCES + 10):
        m.on_batch(BatchResult(processed=1, by_source={f"src-{i:03d}".encode(): 1}), (), 0.0)
    m.on_batch(BatchResult(processed=2, by_source={b"fhir-ehr": 2}), (), 0.0)
    text = generate_latest(m.registry).decode()
    got = _by_source(text)
    assert got["fhir-ehr"] == 8.0
    assert got["unknown"] == 4.0
    assert len(got) == MAX_SOURCES + 2  # the named ones, "unknown" and "other"
    assert got["other"] == 11.0  # src-049 … src-059 (fhir-ehr took the first place)
    assert sum(got.values()) == _processed(text) == 10 + MAX_SOURCES + 10 + 2
    assert m.source_label(b"x" * 500) == "other"  # and nothing new is remembered
    assert len(m._source_labels) <= 4 * MAX_SOURCES


def test_a_fresh_worker_exports_the_unknown_source_at_zero():
    got = _by_source(generate_latest(StreamMetrics().registry).decode())
    assert got == {"unknown": 0.0}


def _metrics_url(worker: Any, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics: (http://\S+/metrics)", worker.log())
        if m:
            return m.group(1)
        if not worker.alive():
            raise AssertionError(f"worker exited:\n{worker.log()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"the worker served no metrics:\n{worker.log()[-3000:]}")


def test_events_are_counted_by_their_source_header_on_the_real_broker(
    harness: StreamHarness, spawn_worker: Any, tmp_path: Path
) -> None:
    from emrwatch.events import AccessEvent
    from pipeline.stream_ingest import produce_items

    events = synthetic_hospital(tmp_path / "ctx", 300, seed=21)
    harness.publish_context(tmp_path / "ctx")
    w = spawn_worker(harness.layout, "g-sources", "--metrics-port", "0")
    items = [(i + 1, AccessEvent.from_dict(d), b"") for i, d in enumerate(events)]
    # the file ingest labels by basename, or by an explicit name
    produce_items(harness.producer, harness.layout, items[:100], "/var/spool/emr/audit.ndjson")
    produce_items(harness.producer, harness.layout, items[100:220], "x", source_name="fhir-ehr")
    # an older producer: no header at all
    for d in events[220:]:
        harness.producer.send(
            harness.layout.access, key=d["user_id"].encode(), value=orjson.dumps(d)
        )
    harness.producer.flush()
    run, parts = harness.eof()
    acks = harness.wait_acks(run, parts, workers=(w,))
    assert sum(a["events"] for a in acks.values()) == len(events)
    with urllib.request.urlopen(_metrics_url(w), timeout=10) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    assert _by_source(text) == {"audit.ndjson": 100.0, "fhir-ehr": 120.0, "unknown": 80.0}
    assert _processed(text) == len(events)


def test_connector_metrics_count_refused_units_and_records_by_outcome(tmp_path: Path) -> None:
    from connectors.files import sign_file
    from connectors.registry import build
    from connectors.testing import collect

    drops = tmp_path / "drops"
    drops.mkdir()
    key = b"k" * 32
    (tmp_path / "key").write_bytes(key)
    (drops / "ok.jsonl").write_text(
        '{"event_id":"e1","ts":"2026-03-01T08:00:00+08:00","user_id":"u1"}\n'
    )
    sign_file(drops / "ok.jsonl", key)
    (drops / "forged.jsonl").write_text("{}\n")
    (drops / "forged.jsonl.hmac").write_text("00" * 32)
    m = ConnectorMetrics()
    ledger = NullLedger()
    c = build(
        {
            "type": "file",
            "name": "drop-a",
            "path": str(drops / "*.jsonl"),
            "verify": "hmac-sha256",
            "key_file": str(tmp_path / "key"),
        },
        ledger=MeteredLedger(ledger, m),
    )
    assert len(collect(c)) == 1
    text = generate_latest(m.registry).decode()
    assert 'emrwatch_connector_refused_total{source="drop-a",status="quarantined"} 1.0' in text
    assert [r["status"] for r in ledger.receipts].count("accepted") == 1
