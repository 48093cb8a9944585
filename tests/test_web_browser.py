"""The feed in real headless Chromium (Debian's ``chromium``, driven by Playwright): log in,
watch an alert arrive live, open the case, triage it, and keep screenshots.

Screenshots go to the test's tmp dir; with ``EMRWATCH_UPDATE_SCREENSHOTS=1`` they also
replace ``docs/screenshots/`` in the repository.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.alerting.store import AlertStore
from pipeline.web import serve_feed
from pipeline.web.testing import PASSWORD, TZ, believable_alert, feed_settings
from tests.browser import log_in, needs_chromium, open_page

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "docs" / "screenshots"

pytestmark = needs_chromium


def _save(page: Any, tmp_path: Path, name: str, full_page: bool = False) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=full_page)
    assert shot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    if os.environ.get("EMRWATCH_UPDATE_SCREENSHOTS"):  # refresh the README's pictures on demand
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SHOTS / name)
    return shot


def test_login_live_alert_case_and_triage(browser: Any, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    base = datetime(2026, 3, 2, 9, 0, tzinfo=TZ)
    store.upsert(believable_alert(i, when=base - timedelta(minutes=37 * i)) for i in range(1, 9))
    fresh = believable_alert(0, when=base + timedelta(minutes=5))
    # the same user's earlier cases (last week), for the case page's "other alerts"
    store.upsert(
        believable_alert(i, when=base - timedelta(days=i - 10), user_id=fresh["user_id"])
        for i in (16, 19)
    )
    url, stop = serve_feed(store, feed_settings(poll_interval_s=0.25))
    try:
        page, errors = open_page(browser, 10_000)

        # login (the feed sends anonymous visitors to the login page)
        log_in(page, url, "ana", PASSWORD)
        page.wait_for_selector("#alerts tbody tr")
        assert page.locator("#rows tr").count() == 10
        page.wait_for_selector("#live.live-on")  # the event stream is connected

        # an alert written to the store while the page is open appears without reload
        aid = fresh["alert_id"]
        nav_before = page.evaluate("performance.getEntriesByType('navigation').length")
        t0 = time.monotonic()
        store.upsert([fresh])
        page.wait_for_selector(f"#row-{aid}", timeout=2_000)
        arrival_s = time.monotonic() - t0
        assert arrival_s < 2.0
        assert page.evaluate("performance.getEntriesByType('navigation').length") == nav_before
        first = page.locator("#rows tr").first
        assert first.get_attribute("id") == f"row-{aid}"  # new alerts slide in at the top
        pid = fresh["patient_ids"][0]
        assert pid not in page.content()  # an analyst's feed never carries patient ids
        page.wait_for_timeout(900)  # let the arrival highlight settle for the picture
        feed_shot = _save(page, tmp_path, "feed.png")

        # open the case
        page.click(f"#row-{aid} a.case-link")
        page.wait_for_selector("#reason")
        assert fresh["reason"][:40] in page.inner_text("#reason")
        assert page.locator("#timeline tbody tr").count() == len(fresh["evidence"])
        assert pid not in page.content()
        assert pid[0] + "•" in page.inner_text("#timeline")
        assert "attending physician" in page.inner_text("body")  # explanations in words
        case_shot = _save(page, tmp_path, "case.png", full_page=True)

        # triage: acknowledge, then close as benign with a note
        page.click("button[data-action=acknowledge]")
        page.wait_for_selector("#case-state.state-acknowledged")
        page.fill("#note", "Covering ORTH night shift; the charge nurse confirmed the task.")
        page.click("button[data-action=close_benign]")
        page.wait_for_selector("#case-state.state-closed_benign")
        assert "charge nurse confirmed" in page.inner_text("#history")

        # back on the feed, a change made elsewhere updates the row in place, no reload
        page.goto(url + "/")
        page.wait_for_selector("#live.live-on")
        assert "Closed: benign" in page.inner_text(f"#row-{aid}")
        nav_before = page.evaluate("performance.getEntriesByType('navigation').length")
        store.comment(aid, actor="sam", assignee="sam")
        sync_api.expect(page.locator(f"#row-{aid}")).to_contain_text("sam", timeout=2_000)
        assert page.evaluate("performance.getEntriesByType('navigation').length") == nav_before
        assert not errors, errors  # no script errors, no CSP violations
        page.context.close()
    finally:
        stop()

    hist = store.history(aid)
    assert [(h.from_state, h.to_state) for h in hist] == [
        ("new", "acknowledged"),
        ("acknowledged", "investigating"),
        ("investigating", "closed_benign"),
        ("closed_benign", "closed_benign"),  # sam's assignment
    ]
    assert [h.actor for h in hist] == ["ana", "ana", "ana", "sam"]
    assert "charge nurse confirmed" in hist[2].note
    got = store.get(aid)
    assert got is not None and got.verdict == "benign" and got.decided_by == "ana"
    views = [e for e in store.audit_log(alert_id=aid) if e.action == "case.view"]
    assert views and all(e.actor == "ana" for e in views)
    assert feed_shot.stat().st_size > 10_000 and case_shot.stat().st_size > 10_000
    print(f"\nlive alert reached the page in {arrival_s * 1000:.0f} ms")


def test_supervisor_reads_the_privacy_report(browser: Any, tmp_path: Path) -> None:
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    base = datetime(2026, 3, 2, 9, 0, tzinfo=TZ)
    alerts = [believable_alert(i, when=base - timedelta(minutes=37 * i)) for i in range(1, 7)]
    store.upsert(alerts)
    verdicts = ("closed_confirmed", "closed_benign", "closed_confirmed")
    for a, verdict in zip(alerts[:3], verdicts, strict=True):
        store.transition(a["alert_id"], "acknowledged", "sam")
        store.transition(a["alert_id"], "investigating", "sam")
        store.transition(a["alert_id"], verdict, "sam", "reviewed with the ward")
    url, stop = serve_feed(store, feed_settings())
    try:
        page, errors = open_page(browser, 10_000)
        log_in(page, url, "sam", PASSWORD)
        page.click("nav a[href='/reports']")
        page.wait_for_selector("#report")
        today = datetime.now(TZ).date()
        page.fill("input[name=from]", today.isoformat())
        page.fill("input[name=to]", (today + timedelta(days=1)).isoformat())
        page.click("form.filters button[type=submit]")
        page.wait_for_selector("section.report")
        text = page.inner_text("#report")
        assert "Cases raised: 6" in text and "confirmed misuse 2, benign 1" in text
        assert all(a["patient_ids"][0] not in page.content() for a in alerts)
        _save(page, tmp_path, "report.png", full_page=True)
        assert not errors, errors
        page.context.close()
    finally:
        stop()
    assert [e.action for e in store.audit_log(actor="sam")][:2] == ["report.view", "report.view"]


def test_live_feed_over_https(browser: Any, tmp_path: Path) -> None:
    """The feed serving HTTPS itself: login, the live event stream and a Secure cookie in
    Chromium. (Chromium's trust store is the system's, so this context accepts the test CA's
    certificate by ignoring its origin; tests/test_web.py checks the chain with httpx.)"""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    pem, key = tmp_path / "feed.pem", tmp_path / "feed.key"
    issued.cert_chain_pems[0].write_to_path(str(pem))
    issued.private_key_pem.write_to_path(str(key))
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    base = datetime(2026, 3, 2, 9, 0, tzinfo=TZ)
    store.upsert([believable_alert(1, when=base)])
    settings = feed_settings(poll_interval_s=0.25, tls_cert_file=str(pem), tls_key_file=str(key))
    url, stop = serve_feed(store, settings)
    try:
        assert url.startswith("https://")
        ctx = browser.new_context(ignore_https_errors=True)
        page = ctx.new_page()
        page.set_default_timeout(10_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        log_in(page, url, "ana", PASSWORD)
        page.wait_for_selector("#live.live-on")  # the event stream is connected over TLS
        fresh = believable_alert(2, when=base + timedelta(minutes=5))
        store.upsert([fresh])
        page.wait_for_selector(f"#row-{fresh['alert_id']}", timeout=3_000)
        session = next(c for c in ctx.cookies() if c["name"] == "emrwatch_session")
        assert session["secure"] and session["httpOnly"]
        assert not errors, errors
        ctx.close()
    finally:
        stop()
        store.close()


def test_a_case_passing_its_target_is_marked_late_without_reload(
    browser: Any, tmp_path: Path
) -> None:
    """The page counts on: a critical case that was 4 min short of its 4 h target when the
    page loaded is marked late once the target has passed (Playwright's clock)."""
    from datetime import UTC

    from pipeline.alerting.testing import FakeClock

    url_db = f"sqlite:///{tmp_path}/alerts.sqlite3"
    start = datetime.now(UTC)
    almost = FakeClock((start - timedelta(hours=3, minutes=56)).isoformat())
    crit = believable_alert(1, severity="critical")
    with AlertStore(url_db, clock=almost) as old:
        old.upsert([crit])
    store = AlertStore(url_db)
    url, stop = serve_feed(store, feed_settings(poll_interval_s=0.25))
    try:
        page, errors = open_page(browser, 10_000)
        page.clock.install(time=start)
        log_in(page, url, "ana", PASSWORD)
        badge = page.locator(f"#row-{crit['alert_id']} .late")
        page.wait_for_selector(f"#row-{crit['alert_id']}")
        assert badge.is_hidden()
        page.clock.fast_forward("05:00")  # five minutes later: 4 h 01 min untouched
        page.wait_for_function(
            f"!document.querySelector('#row-{crit['alert_id']} .late').hidden", timeout=3_000
        )
        assert badge.inner_text() == "untriaged 4 h"
        assert not errors, errors
        page.context.close()
    finally:
        stop()
        store.close()


def test_evidence_report_prints_to_pdf(browser: Any, tmp_path: Path) -> None:
    """A supervisor opens the printable evidence report from the case page and Chromium
    prints it: the PDF a privacy officer hands to HR."""
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    alert = believable_alert(3, when=datetime(2026, 3, 2, 9, 0, tzinfo=TZ))
    store.upsert([alert])
    store.transition(alert["alert_id"], "acknowledged", actor="sam", note="asked the ward")
    url, stop = serve_feed(store, feed_settings())
    try:
        page, errors = open_page(browser, 10_000)
        log_in(page, url, "sam", PASSWORD)
        page.goto(f"{url}/cases/{alert['alert_id']}")
        page.click("#report")
        page.wait_for_selector("#evidence-report")
        assert alert["event_ids"][-1] in page.inner_text("#evidence-report")
        page.emulate_media(media="print")
        assert page.locator(".topbar").is_hidden()  # the print stylesheet drops the chrome
        pdf = page.pdf(format="A4")
        assert pdf[:5] == b"%PDF-" and len(pdf) > 10_000
        (tmp_path / "evidence.pdf").write_bytes(pdf)
        assert not errors, errors
        page.context.close()
    finally:
        stop()
        store.close()


def test_several_cases_triaged_at_once_in_the_browser(browser: Any, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    base = datetime(2026, 3, 2, 9, 0, tzinfo=TZ)
    alerts = [believable_alert(i, when=base - timedelta(minutes=9 * i)) for i in range(1, 5)]
    store.upsert(alerts)
    ids = [a["alert_id"] for a in alerts]
    url, stop = serve_feed(store, feed_settings(poll_interval_s=0.25))
    try:
        page, errors = open_page(browser, 10_000)
        log_in(page, url, "ana", PASSWORD)
        page.wait_for_selector("#live.live-on")
        page.click("#bulk-ack")  # nothing selected: the page says so, the server is not asked
        sync_api.expect(page.locator("#banner")).to_contain_text("Select one or more cases")
        page.check(f"#row-{ids[0]} .pick input")  # a click on the box does not open the case
        page.check(f"#row-{ids[1]} .pick input")
        assert page.url.rstrip("/") == url
        # a live update of a selected row keeps it selected
        store.comment(ids[1], actor="sam", assignee="sam")
        sync_api.expect(page.locator(f"#row-{ids[1]}.updated")).to_have_count(1, timeout=3_000)
        assert page.is_checked(f"#row-{ids[1]} .pick input")
        page.click("#bulk-ack")
        page.wait_for_selector(".flash-info")
        assert "Acknowledged 2 case(s)." in page.inner_text(".flash-info")
        assert [store.get(i).state for i in ids] == ["acknowledged"] * 2 + ["new"] * 2
        # select every case shown, assign them all to sam
        page.check("#pick-all")
        page.select_option("#bulk select[name=assignee]", "sam")
        page.click("#bulk-assign")
        page.wait_for_selector(".flash-info")
        assert [store.get(i).assignee for i in ids] == ["sam"] * 4
        assert not errors, errors
        page.context.close()
    finally:
        stop()
        store.close()
