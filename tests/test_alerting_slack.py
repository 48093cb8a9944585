"""The Slack sink against a local server that speaks the Slack Web API (through
``WebClient(base_url=...)``): message content, routing, 429 Retry-After, 500s, and an
outage during which nothing is lost and after which nothing is posted twice."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.alerting import AlertingConfig, AlertRouter
from pipeline.alerting.outbox import OutboxEntry, SinkError
from pipeline.alerting.slack import SlackSink, build_message
from pipeline.alerting.store import AlertStore
from pipeline.alerting.testing import FakeClock, FakeSlack, backend_url, sample_alert

FEED = "https://feed.hospital.example"


@pytest.fixture()
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as s:
        yield s


def make_router(url: str, slack: FakeSlack, clock: FakeClock, **slack_cfg: Any) -> AlertRouter:
    cfg = AlertingConfig.from_dict(
        {
            "store_url": url,
            "feed_url": FEED,
            "slack": {
                "token": slack.token,
                "base_url": slack.base_url,
                "default_channel": "#privacy-alerts",
                "routes": [
                    {"channel": "#privacy-critical", "severities": ["critical"]},
                    {"channel": "#onc-privacy", "departments": ["ONC"]},
                ],
                "rate_limit_retries": 1,
                **slack_cfg,
            },
            "delivery": {"retry_base_s": 1, "retry_max_s": 60},
        }
    )
    return AlertRouter(cfg, store=AlertStore(url, clock=clock))


def posted_ids(slack: FakeSlack) -> Counter[tuple[str, str]]:
    """(channel, alert id) of every accepted message, read from the case link."""
    out: Counter[tuple[str, str]] = Counter()
    for m in slack.messages:
        aid = re.search(r"/cases/(ew-[\w-]+)", m["text"])
        assert aid, m["text"]
        out[(m["channel"], aid.group(1))] += 1
    return out


def drain(router: AlertRouter, clock: FakeClock, rounds: int = 30) -> None:
    """Run delivery passes, moving the clock past every backoff, until nothing is pending."""
    for _ in range(rounds):
        router.deliver()
        if not router.outbox.backlog().get("slack", {}).get("pending"):
            return
        clock.advance(120)
    raise AssertionError(f"still pending: {router.outbox.backlog()}")


def test_message_shows_who_what_why_and_links_the_case_without_patient_names(
    slack: FakeSlack, tmp_path: Path
) -> None:
    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", slack, clock)
    alert = sample_alert(
        "ew-msg",
        severity="high",
        user_id="u0042",
        role="clerk",
        department_id="ORTH",
        patient_ids=("p00123", "p00456"),
        event_ids=("e1", "e2", "e3"),
        reason="opened p00123 outside shift; <b>not</b> explained & unusual",
    )
    router.handle([alert])
    assert router.deliver().delivered == 1
    (msg,) = slack.messages
    assert msg["channel"] == "#privacy-alerts"
    assert msg["text"]  # always sent alongside blocks
    body = json.dumps(msg, ensure_ascii=False)
    assert "p00123" not in body and "p00456" not in body  # masked everywhere
    assert "p•••23" in body
    assert "Zhang" not in body  # no names at all
    kinds = [b["type"] for b in msg["blocks"]]
    assert kinds == ["header", "section", "section", "actions", "context"]
    fields = " ".join(f["text"] for f in msg["blocks"][1]["fields"])
    for needle in ("HIGH", "u0042", "clerk", "ORTH", "3 access events on 2 patients"):
        assert needle in fields
    why = msg["blocks"][2]["text"]["text"]
    assert "outside shift" in why and "&lt;b&gt;" in why and "&amp;" in why
    button = msg["blocks"][3]["elements"][0]
    assert button["url"] == f"{FEED}/cases/ew-msg"
    router.close()


def test_routing_by_severity_and_department(slack: FakeSlack, tmp_path: Path) -> None:
    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", slack, clock)
    router.handle(
        [
            sample_alert("ew-r1", severity="critical", department_id="ORTH"),
            sample_alert("ew-r2", severity="high", department_id="ONC"),
            sample_alert("ew-r3", severity="critical", department_id="ONC"),
            sample_alert("ew-r4", severity="medium", department_id="ED"),
            sample_alert("ew-r5", severity="low", department_id="ONC"),  # below min_severity
        ]
    )
    router.deliver()
    assert sorted(posted_ids(slack)) == [
        ("#onc-privacy", "ew-r2"),
        ("#onc-privacy", "ew-r3"),
        ("#privacy-alerts", "ew-r4"),
        ("#privacy-critical", "ew-r1"),
        ("#privacy-critical", "ew-r3"),
    ]
    router.close()


def test_notifies_on_first_sight_and_escalation_not_on_evidence_updates(
    slack: FakeSlack, tmp_path: Path
) -> None:
    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", slack, clock)
    a = sample_alert("ew-esc", severity="medium", event_ids=("e1",))
    router.handle([a])
    router.handle([{**a, "version": 2, "event_ids": ["e1", "e2"]}])  # more evidence, same sev
    router.handle([{**a, "version": 3, "severity": "critical", "event_ids": ["e1", "e2", "e3"]}])
    router.handle([{**a, "version": 4, "severity": "high", "event_ids": ["e1", "e2", "e3", "e4"]}])
    router.handle([{**a, "version": 3, "severity": "critical"}])  # redelivery
    router.deliver()
    texts = [(m["channel"], m["text"].split(":")[0]) for m in slack.messages]
    assert texts[0] == ("#privacy-alerts", "MEDIUM privacy alert")
    assert sorted(texts[1:]) == [
        ("#privacy-alerts", "Escalated to CRITICAL from MEDIUM"),  # the channel that knew it
        ("#privacy-critical", "Escalated to CRITICAL from MEDIUM"),  # routed by severity
    ]
    why = "WS-7's clock runs 8.0 h behind, so its accesses were placed at hours they did not happen"
    gone = {**a, "version": 5, "status": "retracted", "reason": f"{a['reason']}; retracted: {why}"}
    router.handle([gone])
    router.handle([{**gone, "version": 6}])
    router.deliver()
    assert [m["text"].split(":")[0] for m in slack.messages[3:]] == ["Retracted"] * 2
    head = f"Retracted: privacy alert on u0001 (nurse, ORTH): {why}."
    assert all(m["text"].startswith(head) for m in slack.messages[3:])  # says why
    assert {m["channel"] for m in slack.messages[3:]} == {"#privacy-alerts", "#privacy-critical"}
    # an alert first seen retracted notifies no one
    router.handle([sample_alert("ew-quiet", status="retracted")])
    assert router.deliver().delivered == 0
    router.close()


def test_rate_limit_retry_after_is_honoured(slack: FakeSlack, tmp_path: Path) -> None:
    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", slack, clock)
    slack.rate_limit_next, slack.retry_after = 1, 1
    router.handle([sample_alert("ew-429")])
    t = time.monotonic()
    assert router.deliver().delivered == 1  # slack-sdk waited and retried in place
    assert time.monotonic() - t >= 0.95
    assert slack.requests == 2 and len(slack.messages) == 1
    assert router.counters["slack"].failed == 0

    # a 429 that outlasts the in-place retries: the outbox waits at least Retry-After
    slack.rate_limit_next, slack.retry_after = 10, 1
    router.handle([sample_alert("ew-429b")])
    slack_sink = router.sinks["slack"]
    assert isinstance(slack_sink, SlackSink)
    report = router.deliver()
    assert report.failed == 1
    (entry,) = [e for e in router.outbox.entries("ew-429b")]
    assert entry["state"] == "pending" and "ratelimited" in entry["last_error"]
    wait = (entry["next_attempt_at"] - clock.now.replace(tzinfo=None)).total_seconds()
    assert wait >= slack.retry_after  # never sooner than Slack asked
    slack.rate_limit_next = 0
    clock.advance(1)  # backoff base 1 s ± jitter, and never sooner than Retry-After
    drain(router, clock)
    assert posted_ids(slack)[("#privacy-alerts", "ew-429b")] == 1
    router.close()


def test_server_errors_are_retried_with_backoff(slack: FakeSlack, tmp_path: Path) -> None:
    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", slack, clock)
    slack.fail_next = 3
    router.handle([sample_alert("ew-500")])
    delays = []
    for _ in range(3):
        assert router.deliver().failed == 1
        (e,) = router.outbox.entries("ew-500")
        delays.append((e["next_attempt_at"] - clock.now.replace(tzinfo=None)).total_seconds())
        assert router.deliver().failed == 0  # not due yet: nothing is hammered
        clock.advance(delays[-1] + 0.01)
    assert delays[0] < delays[1] < delays[2]  # exponential
    assert router.deliver().delivered == 1
    c = router.counters["slack"]
    assert (c.delivered, c.failed, c.retried) == (1, 3, 3)
    assert len(slack.messages) == 1
    router.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_outage_then_recovery_posts_every_alert_exactly_once(
    slack: FakeSlack, tmp_path: Path, backend: str
) -> None:
    with backend_url(backend, tmp_path) as url:
        clock = FakeClock()
        router = make_router(url, slack, clock)
        alerts = [
            sample_alert(f"ew-out{i:02d}", severity=("medium", "high", "critical")[i % 3])
            for i in range(30)
        ]
        router.handle(alerts[:10])
        assert router.deliver().delivered == 10
        slack.stop()  # Slack goes away mid-run
        router.handle(alerts[10:])
        report = router.deliver()
        assert report.delivered == 0 and report.failed > 0
        # the stream redelivers and the cases grow while Slack is down
        router.handle(alerts)
        router.handle([{**a, "version": 2, "event_ids": ["x", "y", "z"]} for a in alerts])
        clock.advance(300)
        assert router.deliver().delivered == 0
        # the process dies; a new one takes over the same database
        router.close()
        router = make_router(url, slack, clock)
        slack.start()  # Slack is back, same address
        clock.advance(300)
        drain(router, clock)
        posted = posted_ids(slack)
        expected: Counter[tuple[str, str]] = Counter()
        for a in alerts:
            expected[
                (
                    "#privacy-alerts" if a["severity"] != "critical" else "#privacy-critical",
                    a["alert_id"],
                )
            ] += 1
        assert posted == expected  # every alert, exactly once
        assert set(posted.values()) == {1}
        # and a late redelivery after recovery posts nothing
        router.handle(alerts)
        router.deliver()
        assert posted_ids(slack) == expected
        c = router.counters["slack"]
        assert c.delivered == 20 and c.retried >= 20  # the new process's share
        router.close()


def test_a_sender_that_died_mid_send_is_taken_over_after_its_lease(
    slack: FakeSlack, tmp_path: Path
) -> None:
    clock = FakeClock()
    url = f"sqlite:///{tmp_path}/a.db"
    a = make_router(url, slack, clock)
    a.handle([sample_alert("ew-lease")])
    claimed = a.outbox._claim(a.store.now(), None)  # claimed, then the process died
    assert len(claimed) == 1
    b = make_router(url, slack, clock)
    assert b.deliver().delivered == 0  # still leased to the dead sender
    clock.advance(a.outbox.lease_s + 1)
    assert b.deliver().delivered == 1
    assert len(slack.messages) == 1
    a.close()
    b.close()


def test_sink_reports_api_errors() -> None:
    with FakeSlack(token="xoxb-right") as fake:
        sink = SlackSink(token="xoxb-wrong", feed_url=FEED, base_url=fake.base_url)
        text, blocks = build_message(
            {
                "alert_id": "ew-x", "version": 1, "severity": "low", "score": 0.1,
                "user_id": "u1", "role": "nurse", "department_id": "ED", "detector": ["r"],
                "reason": "why", "events": 1, "patients": 1, "patients_masked": ["p•••1"],
                "first_seen": "", "last_seen": "",
            },
            "new",
            FEED,
        )  # fmt: skip
        entry = OutboxEntry(1, "k", "slack", "message", "#c", "ew-x", "new", {"alert": {}}, 0, None)  # type: ignore[arg-type]
        assert text.startswith("LOW privacy alert") and blocks
        with pytest.raises(Exception):  # noqa: B017 - payload lacks the view: any error
            sink.send(entry)
        entry = OutboxEntry(
            1, "k", "slack", "message", "#c", "ew-x", "new",
            {"alert": {"alert_id": "ew-x", "version": 1, "severity": "low", "score": 0.1,
                       "user_id": "u1", "role": "nurse", "department_id": "ED",
                       "detector": ["r"], "reason": "why", "events": 1, "patients": 1,
                       "patients_masked": [], "first_seen": "", "last_seen": ""}},
            0, None,  # type: ignore[arg-type]
        )  # fmt: skip
        with pytest.raises(SinkError, match="invalid_auth"):
            sink.send(entry)


def test_sink_metrics_count_failures_retries_and_backlog(slack: FakeSlack, tmp_path) -> None:
    from prometheus_client import generate_latest

    from pipeline.alerting.metrics import sink_registry

    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path / 'm.sqlite3'}", slack, clock)
    registry = sink_registry(router)
    try:
        slack.fail_all = True
        router.handle([sample_alert(alert_id="ew-m1", severity="high")])
        router.deliver()
        down = generate_latest(registry).decode()
        assert 'emrwatch_sink_failures_total{sink="slack"} 1.0' in down
        assert 'emrwatch_sink_delivered_total{sink="slack"} 0.0' in down
        assert re.search(r'emrwatch_outbox_entries\{sink="slack",state="\w+"\} 1\.0', down)
        slack.fail_all = False
        clock.advance(120)
        router.deliver()
        up = generate_latest(registry).decode()
        assert 'emrwatch_sink_delivered_total{sink="slack"} 1.0' in up
        assert 'emrwatch_sink_retries_total{sink="slack"} 1.0' in up
        assert "ew-m1" not in up  # no alert, user or patient ids in metrics
    finally:
        router.close()
