"""AlertRouter end to end: the config file, real detector alerts (every version the engine
emits) into the store and out to Slack and e-mail, replays that change nothing, and the
background delivery loop."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from detectors.engine import Engine
from emrwatch.context import Context
from emrwatch.events import AccessEvent
from pipeline.alerting import AlertingConfig, AlertingConfigError, AlertRouter
from pipeline.alerting.store import AlertFilter
from pipeline.alerting.testing import FakeSlack, LoopbackSmtp, sample_alert
from tests.conftest import replay_reference, synthetic_hospital

FULL_CONFIG = """
detection: {}
alerting:
  store_url: sqlite:///{db}
  feed_url: https://feed.example
  digest_interval_s: 900
  slack:
    token_env: EW_TEST_SLACK_TOKEN
    base_url: http://127.0.0.1:9/api/
    default_channel: "#privacy-alerts"
    routes:
      - channel: "#privacy-critical"
        severities: [critical]
      - {channel: "#onc", departments: [ONC], severities: [high, critical]}
    min_severity: medium
    timeout_s: 5
    rate_limit_retries: 2
  smtp:
    host: smtp.example
    port: 465
    starttls: false
    implicit_tls: true
    username: emrwatch
    password_env: EW_TEST_SMTP_PASSWORD
    from: emrwatch@hospital.example
    verify: true
    timeout_s: 20
  email:
    address_template: "{user_id}@hospital.example"
    addresses: {s1: sister@hospital.example}
    always_to: [privacy@hospital.example]
    min_severity: medium
    immediate_severities: [critical]
  delivery:
    retry_base_s: 3
    retry_max_s: 600
    poll_interval_s: 0.5
    lease_s: 30
    batch_size: 50
"""


def test_config_file_sets_every_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "emrwatch.yaml"
    path.write_text(FULL_CONFIG.replace("{db}", str(tmp_path / "a.db")))
    monkeypatch.setenv("EW_TEST_SLACK_TOKEN", "xoxb-from-env")
    monkeypatch.setenv("EW_TEST_SMTP_PASSWORD", "pw-from-env")
    cfg = AlertingConfig.load(path)
    assert cfg.store_url.endswith("a.db") and cfg.feed_url == "https://feed.example"
    assert cfg.digest_interval_s == 900
    assert cfg.slack.resolved_token() == "xoxb-from-env" and cfg.slack.min_severity == "medium"
    assert [(r.channel, r.severities, r.departments) for r in cfg.slack.routes] == [
        ("#privacy-critical", ("critical",), ()),
        ("#onc", ("high", "critical"), ("ONC",)),
    ]
    assert (cfg.smtp.host, cfg.smtp.port, cfg.smtp.implicit_tls, cfg.smtp.starttls) == (
        "smtp.example", 465, True, False,
    )  # fmt: skip
    assert cfg.smtp.sender == "emrwatch@hospital.example"
    assert cfg.smtp.resolved_password() == "pw-from-env"
    assert cfg.email.addresses == {"s1": "sister@hospital.example"}
    assert cfg.email.always_to == ("privacy@hospital.example",)
    assert cfg.email.immediate_severities == ("critical",)
    assert cfg.delivery.poll_interval_s == 0.5 and cfg.delivery.batch_size == 50
    # a file without an alerting section: defaults
    (tmp_path / "empty.yaml").write_text("detection: {}\n")
    assert AlertingConfig.load(tmp_path / "empty.yaml") == AlertingConfig()

    bad_configs: list[tuple[dict[str, Any], str]] = [
        ({"slak": {}}, "unknown setting"),
        ({"slack": {"token": "x", "default_chanel": "#a"}}, "unknown setting"),
        ({"slack": {"token": "x"}}, "default_channel or routes"),
        ({"slack": {"routes": [{"channel": "#a", "severity": ["high"]}]}}, "routes\\[0\\]"),
        ({"email": {"immediate_severities": ["urgent"]}}, "unknown severity"),
        ({"email": {"address_template": "staff@h"}}, "user_id"),
        ({"smtp": {"host": "h", "implicit_tls": True}}, "exclude"),
        ({"smtp": {"host": "h", "ca_file": "/nonexistent.pem"}}, "does not exist"),
    ]
    for bad, msg in bad_configs:
        with pytest.raises(AlertingConfigError, match=msg):
            AlertingConfig.from_dict(bad)
    monkeypatch.delenv("EW_TEST_SLACK_TOKEN")
    with pytest.raises(AlertingConfigError, match="EW_TEST_SLACK_TOKEN"):
        AlertingConfig.load(path).slack.resolved_token()


def test_real_detector_alerts_stored_and_notified_once(tmp_path: Path) -> None:
    """Every version the engine emits, fed twice, in order and then again as a replay."""
    events = synthetic_hospital(tmp_path / "ctx", 20000, seed=5)
    ctx = Context.load(tmp_path / "ctx")
    eng = Engine(ctx)
    versions = []
    for i in range(0, len(events), 50):
        for e in events[i : i + 50]:
            eng.ingest(AccessEvent.from_dict(e))
        versions += [a.to_dict() for a in eng.drain()]
    final = replay_reference(tmp_path / "ctx", events)
    assert final and len(versions) > len(final)  # cases grew: several versions each

    with FakeSlack() as slack, LoopbackSmtp() as smtp:
        cfg = AlertingConfig.from_dict(
            {
                "store_url": f"sqlite:///{tmp_path}/alerts.db",
                "feed_url": "https://feed.example",
                "slack": {
                    "token": slack.token,
                    "base_url": slack.base_url,
                    "default_channel": "#privacy-alerts",
                    "min_severity": "low",
                },
                "smtp": {
                    "host": "127.0.0.1",
                    "port": smtp.port,
                    "username": smtp.user,
                    "password": smtp.password,
                    "ca_file": smtp.write_ca(tmp_path / "ca.pem"),
                },
                "email": {"address_template": "{user_id}@hospital.example"},
            }
        )
        router = AlertRouter(cfg, ctx)
        first = router.handle(versions)
        assert first.inserted == len({v["alert_id"] for v in versions})
        router.deliver()
        router.flush_digest()
        n_slack, n_mail = len(slack.messages), len(smtp.messages)
        # the whole alert topic again (a replay, a consumer-group reset): nothing changes
        again = router.handle(versions)
        assert again.applied == 0
        router.deliver()
        router.flush_digest()
        assert (len(slack.messages), len(smtp.messages)) == (n_slack, n_mail)

        # the store holds the final version of every alert, with all its evidence
        for aid, a in final.items():
            got = router.store.get(aid)
            assert got is not None and got.version == a.version
            assert router.store.event_ids(aid) == a.event_ids
        assert router.store.count(AlertFilter(status="open")) == len(final)
        # one Slack "new" per alert, at most one message per (alert, kind of notice)
        heads: Counter[tuple[str, str]] = Counter()
        for m in slack.messages:
            aid = m["text"].rsplit("/cases/", 1)[1]
            heads[(aid, m["text"].split(":")[0])] += 1
        assert set(heads.values()) == {1}
        assert {aid for aid, _ in heads} == {
            v["alert_id"] for v in versions
        }  # every alert was shown once it was raised
        # the synthetic hospital's department heads got mail, never the suspects
        rcpts = {r for m in smtp.messages for r in m["rcpt_tos"]}
        assert rcpts and all(r.startswith("h-") for r in rcpts)
        suspects = {v["user_id"] for v in versions}
        assert not {r.split("@")[0] for r in rcpts} & suspects
        router.close()


def test_background_delivery_and_json_lines(tmp_path: Path) -> None:
    with FakeSlack() as slack:
        cfg = AlertingConfig.from_dict(
            {
                "store_url": f"sqlite:///{tmp_path}/alerts.db",
                "slack": {
                    "token": slack.token,
                    "base_url": slack.base_url,
                    "default_channel": "#a",
                },
                "delivery": {"poll_interval_s": 0.2},
            }
        )
        seen: list[tuple[str, str, int]] = []
        router = AlertRouter(cfg, on_event=lambda *a: seen.append(a))
        router.start()
        lines = [json.dumps(sample_alert(f"ew-bg{i}")) for i in range(5)]
        lines.insert(2, "{not json")
        lines.insert(4, json.dumps({"no": "id"}))
        t = time.monotonic()
        counts = router.handle_json_lines(lines)
        assert counts.inserted == 5 and router.malformed == 2
        while len(slack.messages) < 5 and time.monotonic() - t < 5:
            time.sleep(0.02)
        took = time.monotonic() - t
        router.close()
        assert len(slack.messages) == 5
        assert took < 2.0  # the bar for the feed; Slack meets it too
        assert router.counters["slack"].delivered == 5
        assert ("slack", "delivered", 1) in seen and ("slack", "enqueued", 1) in seen
