"""The access report page of the feed (pipeline/web/access.py) over real HTTP and in real
headless Chromium: supervisors only, a stated purpose, audited before it runs, the report,
its CSV and the patient's copy, and the case page's link to it."""

from __future__ import annotations

import csv
import io
import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from detectors.config import DetectionConfig
from detectors.engine import Engine
from emrwatch.context import Context
from pipeline.replay import run_engine
from pipeline.web import FeedConfigError, FeedSettings
from pipeline.web.testing import PASSWORD, RunningFeed
from tests.browser import log_in, needs_chromium, open_page
from tests.hospital import ev, write_hospital

EVENTS = [
    ev("p-card", "P1", at="2026-03-04T10:00:00", event_id="att"),
    ev("t-rad", "P1", at="2026-03-04T11:00:00", event_id="rad", workstation="ws-rad"),
    ev("n-card", "P-SEAL", at="2026-03-04T13:00:00", event_id="seal"),
    ev("n-orth", "P1", at="2026-03-04T14:00:00", event_id="orth-look"),
    ev("n-ed", "P2", at="2026-03-04T15:00:00", event_id="ed-btg", emergency=True),
]


class Site:
    """A hand-made hospital as the feed's history, and the feed over its alert store."""

    def __init__(self, tmp_path: Path, history: bool = True) -> None:
        self.dir = write_hospital(tmp_path / "history")
        events = self.dir / "events.jsonl"
        events.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in EVENTS))
        ctx = Context.load(self.dir)
        from connectors.readers import read_events

        evs = [item for _n, item, _raw in read_events(events, "auto")]
        self.alerts = list(run_engine(Engine(ctx, DetectionConfig()), evs).values())
        self.feed = RunningFeed(tmp_path, history_dir=str(self.dir) if history else "")
        self.store, self.url = self.feed.store, self.feed.url
        self.store.upsert([a.to_dict() for a in self.alerts])
        self.client, self.close = self.feed.client, self.feed.close


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.close()


ASK = {"patient": "P1", "from": "2026-03-04", "to": "2026-03-05", "purpose": "patient request 118"}


def test_only_supervisors_and_only_with_csrf(site: Site) -> None:
    for name in ("ana", "aud"):
        c = site.client(name)
        assert c.get("/access-report").status_code == 403, name
        assert c.post("/access-report", ASK).status_code == 403, name
        assert "/access-report" not in c.get("/").text
    sam = site.client("sam")
    page = sam.get("/access-report")
    assert page.status_code == 200 and 'href="/access-report"' in page.text
    assert sam.post("/access-report", ASK, csrf=False).status_code == 403
    assert [e for e in site.store.audit_log(actor="sam") if e.action == "access_report"] == []


def test_a_purpose_is_required_and_the_run_is_audited_first(site: Site) -> None:
    sam = site.client("sam")
    r = sam.post("/access-report", {**ASK, "purpose": "x"})
    assert r.status_code == 400 and "State the purpose" in r.text
    assert not [e for e in site.store.audit_log(actor="sam") if e.action == "access_report"]
    r = sam.post("/access-report", ASK)
    assert r.status_code == 200, r.text
    (entry,) = [e for e in site.store.audit_log(actor="sam") if e.action == "access_report"]
    detail = json.loads(entry.detail)
    assert detail["patients"] == ["P1"] and detail["purpose"] == "patient request 118"
    assert detail["period"] == ["2026-03-04", "2026-03-05"] and detail["via"] == "feed"
    # the report: every access of P1 that day, the unexplained one marked
    for eid in ("att", "rad", "orth-look"):
        assert f'data-event="{eid}"' in r.text
    assert 'data-event="seal"' not in r.text
    assert "Not explained:" in r.text and "encounter E1 in Cardiology (CARD)" in r.text
    # a run that fails (a bad date) was asked for all the same: it is in the log too
    r = sam.post("/access-report", {**ASK, "to": "March"})
    assert r.status_code == 400 and "not a date" in r.text
    runs = [e for e in site.store.audit_log(actor="sam") if e.action == "access_report"]
    assert len(runs) == 2 and json.loads(runs[0].detail)["period"] == ["2026-03-04", "March"]
    # the audit page offers the action as a filter
    aud = site.client("aud")
    assert '<option value="access_report"' in aud.get("/audit").text


def test_alerts_link_to_their_cases_and_csv_and_patient_copy(site: Site) -> None:
    sam = site.client("sam")
    (seal_alert,) = [a for a in site.alerts if "seal" in a.event_ids]
    r = sam.post("/access-report", {**ASK, "patient": "P-SEAL"})
    assert f'href="/cases/{seal_alert.alert_id}"' in r.text
    assert "sealed record (medical dispute)" in r.text

    r = sam.post("/access-report", {**ASK, "output": "csv"})
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [x["event_id"] for x in rows] == ["att", "rad", "orth-look"]

    r = sam.post("/access-report", {**ASK, "output": "patient-copy"})
    assert r.status_code == 200
    assert "Record of access to the medical record of Zhao A" in r.text
    assert "Hu t-rad" in r.text and "ws-rad" not in r.text and "Not explained" not in r.text
    outputs = [
        json.loads(e.detail)["output"]
        for e in site.store.audit_log(actor="sam")
        if e.action == "access_report"
    ]
    assert sorted(outputs) == ["csv", "page", "patient-copy"]


def test_the_break_the_glass_review(site: Site) -> None:
    sam = site.client("sam")
    r = sam.post("/access-report", {"btg": "1", "purpose": "monthly break-the-glass review"})
    assert r.status_code == 200, r.text
    assert re.findall(r'data-event="([^"]+)"', r.text) == ["ed-btg"]
    assert "Access report: break-the-glass accesses" in r.text
    (entry,) = [e for e in site.store.audit_log(actor="sam") if e.action == "access_report"]
    assert json.loads(entry.detail)["break_the_glass"] is True
    r = sam.post("/access-report", {"purpose": "monthly break-the-glass review"})
    assert r.status_code == 400 and "or ask for break-the-glass" in r.text


def test_the_access_review_page(site: Site) -> None:
    assert site.client("ana").get("/access-review").status_code == 403
    sam = site.client("sam")
    r = sam.get("/access-review?as_of=2026-03-20")
    assert r.status_code == 200, r.text
    # the vendor's account and its grant end on 31 March
    table = r.text[r.text.index('id="review-ending_soon"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr><td>v-it") == 2 and "PACS maintenance" in table
    assert "Dormant accounts: 3" in r.text and "valid with no start or end date" in r.text
    assert "The log ends 2026-03-04, 16 days before the review date" in r.text
    (entry,) = [e for e in site.store.audit_log(actor="sam") if e.action == "access_review"]
    assert json.loads(entry.detail)["as_of"] == "2026-03-20"
    r = sam.get("/access-review?as_of=March")
    assert r.status_code == 400 and "is not a date" in r.text
    # an emrwatch history export: the page says what it holds and when it was written
    manifest = {"kind": "emrwatch history export", "exported_at": "2026-03-05T01:30:00+00:00",
                "summary": {"events": 5, "period": {"start": "2026-03-04T02:00:00+00:00",
                                                    "end": "2026-03-04T07:00:00+00:00"}}}  # fmt: skip
    (site.dir / "manifest.json").write_text(json.dumps(manifest))
    r = sam.get("/access-review?as_of=2026-03-20")
    assert (
        '<span id="history-freshness">5 accesses, 2026-03-04 10:00 to 2026-03-04 15:00; '
        "written 2026-03-05 09:30</span>" in r.text
    )


def test_the_case_page_links_a_supervisor_to_the_users_accesses(site: Site) -> None:
    (seal_alert,) = [a for a in site.alerts if "seal" in a.event_ids]
    sam = site.client("sam")
    page = sam.get(f"/cases/{seal_alert.alert_id}").text
    assert "/access-report?user=n-card&amp;from=2026-02-25&amp;to=2026-03-12" in page
    ana = site.client("ana")
    assert "/access-report?" not in ana.get(f"/cases/{seal_alert.alert_id}").text


def test_without_history_the_page_says_what_to_set(tmp_path: Path) -> None:
    s = Site(tmp_path, history=False)
    try:
        r = s.client("sam").post("/access-report", ASK)
        assert r.status_code == 400 and "set feed.history_dir" in r.text
    finally:
        s.close()
    with pytest.raises(FeedConfigError, match="history_dir: no directory"):
        FeedSettings.from_dict({"history_dir": str(tmp_path / "nowhere")})
    # kept current by the service: it creates the directory, but not its parents
    FeedSettings.from_dict({"history_dir": str(tmp_path / "new"), "history_refresh_s": 300})
    with pytest.raises(FeedConfigError, match="history_dir: no directory"):
        FeedSettings.from_dict({"history_dir": str(tmp_path / "a" / "b"), "history_refresh_s": 9})
    with pytest.raises(FeedConfigError, match="history_refresh_s needs history_dir"):
        FeedSettings.from_dict({"history_refresh_s": 300})
    with pytest.raises(FeedConfigError, match="set history_refresh_s too"):
        FeedSettings.from_dict({"history_dir": str(tmp_path), "history_keep_days": 90})
    with pytest.raises(FeedConfigError, match="history_refresh_s must be 0"):
        FeedSettings.from_dict({"history_dir": str(tmp_path), "history_refresh_s": -1})


@needs_chromium
def test_from_a_case_to_the_users_accesses_in_chromium(browser: Any, site: Site) -> None:
    (seal_alert,) = [a for a in site.alerts if "seal" in a.event_ids]
    page, errors = open_page(browser, 15_000)
    log_in(page, site.url, "sam", PASSWORD)
    page.wait_for_selector("#alerts tbody tr")
    page.goto(f"{site.url}/cases/{seal_alert.alert_id}")
    page.click("#access-link")
    page.wait_for_selector("#access-form")
    assert page.input_value("input[name=user]") == "n-card"
    page.fill("input[name=purpose]", "case review, sealed record")
    page.click("#access-form button[type=submit]")
    page.wait_for_selector("#access-rows")
    assert page.locator("#access-rows tbody tr").count() == 1
    assert "sealed record" in page.inner_text("#access-rows")
    assert page.locator(f'#access-rows a[href="/cases/{seal_alert.alert_id}"]').count() == 1
    assert page.locator("#access-patients tbody tr").count() == 1  # the user's patients
    assert "1 access(es) by 1 user(s)" in page.inner_text("#access-summary")
    assert errors == []
    page.screenshot(path=str(site.dir.parent / "access-report.png"), full_page=True)


@needs_chromium
def test_from_the_privacy_report_to_the_assessment_in_chromium(browser: Any, site: Site) -> None:
    page, errors = open_page(browser, 15_000)
    log_in(page, site.url, "aud", PASSWORD)  # an auditor: reads reports, runs no access report
    page.goto(f"{site.url}/reports?from=2026-03-04&to=2026-03-05")
    page.click("#assessment-link")
    page.wait_for_selector("#assessment-indicators")
    concerns = page.locator("#assessment-concerns li")
    codes = {concerns.nth(i).get_attribute("data-code") for i in range(concerns.count())}
    assert {"explained", "sealed"} <= codes
    assert page.locator("#assessment-indicators tr.unexplained").count() >= 2
    with page.expect_download() as dl:
        page.click("#assessment-json")
    assert json.loads(Path(dl.value.path()).read_text())["kind"] == "emrwatch assessment"
    assert errors == []


def test_the_alert_service_keeps_the_history_current(
    tmp_path: Path, harness: Any, broker: Any
) -> None:
    """``feed.history_refresh_s``: ``emrwatch alerts`` exports the topics into
    ``history_dir`` and keeps appending, so a report in the feed covers the accesses the
    stream received a moment ago, and the page says how fresh its history is."""
    import time

    import yaml

    from pipeline.web.testing import feed_settings
    from tests.test_e2e_feed import AlertService

    layout = harness.layout
    harness.publish_context(write_hospital(tmp_path / "context"))
    harness.produce(EVENTS[:3])  # att, rad, seal
    users = [
        {"username": u.username, "role": u.role, "password_hash": u.password_hash}
        for u in feed_settings().users
    ]
    history = tmp_path / "history"  # the service creates it
    cfg = {
        "kafka": {"bootstrap_servers": broker.bootstrap},
        "topics": {"prefix": layout.prefix, "partitions": layout.partitions},
        "worker": {"group_id": f"g-hist-{layout.prefix}"},
        "alerting": {"store_url": f"sqlite:///{tmp_path / 'alerts.sqlite3'}"},
        "feed": {"users": users, "port": 0, "history_dir": str(history),
                 "history_refresh_s": 1, "history_keep_days": 30},
    }  # fmt: skip
    path = tmp_path / "emrwatch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    svc = AlertService(path, tmp_path / "service.log")

    def history_holds(n: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = history / "manifest.json"
            if m.is_file() and json.loads(m.read_text())["summary"]["events"] == n:
                return
            time.sleep(0.2)
        raise AssertionError(f"the history never held {n} events:\n{svc.log()[-3000:]}")

    from pipeline.web.testing import FeedClient

    try:
        url = svc.wait_for_url()
        history_holds(3)
        with FeedClient(url, "sam") as sam:
            page = sam.get("/access-report")
            fresh = re.search(r'id="history-freshness">([^<]+)<', page.text)
            assert fresh and fresh.group(1).startswith(
                "3 accesses, 2026-03-04 10:00 to 2026-03-04 13:00"
            )
            r = sam.post("/access-report", ASK)
            assert r.status_code == 200, r.text
            assert 'data-event="att"' in r.text and 'data-event="rad"' in r.text
            assert 'data-event="orth-look"' not in r.text
            harness.produce(EVENTS[3:4])  # orth-look: a nurse of another ward, just now
            history_holds(4)
            r = sam.post("/access-report", ASK)
            assert 'data-event="orth-look"' in r.text
            assert "4 accesses" in r.text
        # the service's metrics, on the feed's port: its sinks, the kept history, the feed
        import httpx

        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "emrwatch_history_events 4.0" in metrics
        m = re.search(r"^emrwatch_history_updates_total (\S+)$", metrics, re.M)
        assert m and float(m.group(1)) >= 2
        assert "emrwatch_history_update_failures_total 0.0" in metrics
        assert "# TYPE emrwatch_outbox_entries gauge" in metrics
        assert stat.S_IMODE(history.stat().st_mode) == 0o700
        assert json.loads((history / "manifest.json").read_text())["keep_days"] == 30
    finally:
        svc.stop()
    assert "failed" not in svc.log(), svc.log()[-3000:]


def test_a_failed_history_update_is_logged_and_the_next_one_recovers(
    tmp_path: Path, broker: Any, producer: Any
) -> None:
    """The topics are not there yet (or the broker is away): the keeper says so and tries
    again at its next turn, and the directory is written once they are."""
    import uuid

    from pipeline.history import HistoryKeeper
    from pipeline.topics import TopicLayout, ensure_topics
    from tests.conftest import StreamHarness

    layout = TopicLayout(prefix=f"t{uuid.uuid4().hex[:8]}", partitions=2, sources=("jsonl",))
    logs: list[str] = []
    seen: list[int] = []

    def after(m: dict[str, Any]) -> None:  # what follows an update (the assessment mail)
        seen.append(m["summary"]["events"])
        raise RuntimeError("the mail server is away")

    keeper = HistoryKeeper(broker.bootstrap, layout, tmp_path / "h", 60, log=logs.append,
                           timeout=2, on_update=after)  # fmt: skip
    assert keeper.update_once() is None and keeper.failures == 1
    assert len(logs) == 1 and "does not exist" in logs[0] and "next try in 60 s" in logs[0]
    assert not (tmp_path / "h" / "manifest.json").exists()
    ensure_topics(broker.bootstrap, layout)
    StreamHarness(broker.bootstrap, layout, producer).produce(EVENTS)
    m = keeper.update_once()
    assert m is not None and m["summary"]["events"] == len(EVENTS)
    assert keeper.updates == 1 and keeper.last_error == "" and seen == [len(EVENTS)]
    assert len(logs) == 2 and "RuntimeError: the mail server is away" in logs[1]


def test_the_security_assessment_page(site: Site, tmp_path: Path) -> None:
    """Supervisors and auditors read the period's assessment (audited) and download the JSON
    a regulator's ``assessment-compare`` reads; analysts get 403."""
    from pipeline.assessment import compare, load_assessment

    q = "/reports/assessment?from=2026-03-04&to=2026-03-05"
    assert site.client("ana").get(q).status_code == 403
    for name in ("sam", "aud"):
        c = site.client(name)
        r = c.get(q)
        assert r.status_code == 200, r.text
        assert 'id="assessment-indicators"' in r.text
        # the orthopaedic nurse's look is the one access of five nothing explains
        assert "80.0%" in r.text and 'data-code="explained"' in r.text
        assert 'data-code="sealed"' in r.text  # the cardiology nurse on the sealed record
        section = r.text.split('id="assessment"', 1)[1].split("</section>", 1)[0]
        assert "80.0%" in section  # counts only: no patient, no member of staff
        assert not re.search(r"\b(P1|P2|P-SEAL|n-orth|n-card|p-card)\b", section)
        (entry,) = [e for e in site.store.audit_log(actor=name) if e.action == "assessment"]
        assert json.loads(entry.detail)["from"] == "2026-03-04"
    r = site.client("sam").get(q + "&output=json")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    path = tmp_path / "a.json"
    path.write_bytes(r.content)
    doc = load_assessment(path)
    assert doc["log"]["accesses"] == len(EVENTS)
    # the feed's own store was read: its cases arrived today, not in the period assessed
    assert doc["alerts"] is not None and doc["alerts"]["alerts"] == 0 < len(site.alerts)
    assert compare([doc]).rows[0][1] == [str(len(EVENTS))]
    r = site.client("sam").get("/reports/assessment?from=2026-03-05&to=2026-03-04")
    assert r.status_code == 400 and "must end after it starts" in r.text


def test_the_feed_signs_the_assessment_it_gives_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``feed.assessment_key_file`` the JSON download carries an Ed25519 signature the
    regulator checks with the hospital's public key; a key that cannot sign stops the feed
    at start, not at the first download."""
    from pipeline.signing import (
        SharedKey,
        SignatureError,
        generate_key_pair,
        load_public_key,
        verify_document,
    )

    monkeypatch.setenv("FEED_KEY", "f" * 32)
    with pytest.raises(FeedConfigError, match=r"\$NO_KEY must hold a key"):
        FeedSettings.from_dict({"assessment_key_env": "NO_KEY"})
    assert FeedSettings.from_dict({"assessment_key_env": "FEED_KEY"}).assessment_signer() == (
        SharedKey(b"f" * 32)
    )
    key, pub = generate_key_pair(tmp_path / "hospital")
    _, other = generate_key_pair(tmp_path / "other")
    with pytest.raises(FeedConfigError, match="not both"):
        FeedSettings.from_dict({"assessment_key_file": str(key), "assessment_key_env": "FEED_KEY"})
    with pytest.raises(FeedConfigError, match="No such file"):
        FeedSettings.from_dict({"assessment_key_file": str(tmp_path / "missing.key")})
    with pytest.raises(FeedConfigError, match="goes with assessment_key_file"):
        FeedSettings.from_dict({"assessment_key_passphrase_env": "FEED_KEY"})
    hist = write_hospital(tmp_path / "history")
    (hist / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in EVENTS))
    feed = RunningFeed(tmp_path, history_dir=str(hist), assessment_key_file=str(key))
    try:
        r = feed.client("aud").get("/reports/assessment?from=2026-03-04&to=2026-03-05&output=json")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["signature"]["method"] == "Ed25519"
        verify_document(doc, load_public_key(pub))  # the regulator's check passes ...
        with pytest.raises(SignatureError, match="another key"):
            verify_document(doc, load_public_key(other))  # ... only with this hospital's key
        with pytest.raises(SignatureError, match="altered"):
            verify_document({**doc, "hospital": "Elsewhere"}, load_public_key(pub))
    finally:
        feed.close()
