"""The shipped Prometheus rules and Grafana dashboard use only metrics the workers export,
and the worker counts new alerts by detector and severity (never by user or patient)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from detectors.alerts import Alert
from pipeline.stream_metrics import StreamMetrics

DOCKER = Path(__file__).resolve().parent.parent / "docker"
METRIC = re.compile(r"\b(emrwatch_[a-z_]+)\b")


def _exported() -> set[str]:
    m = StreamMetrics()
    m.new_alerts.labels(detector="x", severity="low").inc()
    m.lag.labels(partition="0").set(0)
    text = generate_latest(m.registry).decode()
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line.startswith("emrwatch_")
    }


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
