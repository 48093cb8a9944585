"""Automatic logoff (``feed.idle_timeout_s``): a session nobody uses ends, over HTTP, in
the live event stream and in Chromium; the user's own requests and the page's activity
pings keep it, and the event stream alone does not."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pipeline.web.app as feed_app
from pipeline.web.testing import PASSWORD, TZ, RunningFeed, believable_alert
from tests.browser import log_in, needs_chromium, open_page
from tests.test_web import Stream


def _alert(i: int) -> dict[str, Any]:
    return believable_alert(i, when=datetime(2026, 3, 2, 9, 0, tzinfo=TZ))


def test_an_idle_session_ends_and_activity_keeps_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(feed_app, "HEARTBEAT_S", 0.3)  # the stream looks at the session often
    feed = RunningFeed(tmp_path, idle_timeout_s=2, poll_interval_s=0.1)
    try:
        c = feed.client("sam")
        aid = _alert(1)["alert_id"]
        feed.store.upsert([_alert(1)])
        # requests, and the page's activity pings, keep the session in use for 4 s
        for i in range(8):
            time.sleep(0.5)
            r = c.get("/") if i % 2 else c.post("/api/alive")
            assert r.status_code in (200, 204), r.status_code
        # a stream opened now sees the activity that follows it (the cookie it holds does not)
        live = Stream(c)
        for _ in range(5):
            time.sleep(0.5)
            assert c.get(f"/cases/{aid}").status_code == 200
        assert not [e for e in live.events if e[0] == "signed-out"]
        # then nothing but the stream for longer than the timeout: signed out, in the stream ...
        _, _, d = live.wait_for(lambda e: e[0] == "signed-out", timeout=5)
        assert d == {"idle": True, "why": "idle"}
        live.close()
        # ... and on the next page, which goes to the login saying why
        r = c.get(f"/cases/{aid}")
        assert r.status_code == 303
        assert r.headers["location"] == f"/login?idle=1&next=/cases/{aid}"
        page = c.get(r.headers["location"])
        assert "You were signed out after 1 min without activity." in page.text  # at least 1
        # the session is gone, unmask grants and all: the next request is simply anonymous
        r = c.get("/")
        assert r.status_code == 303 and "idle=1" not in r.headers["location"]
        assert c.http.get("/api/alerts").status_code == 401
        assert c.post("/api/alive").status_code in (401, 403)
        # the event stream alone does not keep a session: opened and left, it is signed out
        c2 = feed.client("ana")
        s2 = Stream(c2)
        s2.wait_for(lambda e: e[0] == "signed-out", timeout=5)
        s2.close()
        assert c2.get("/").status_code == 303
    finally:
        feed.close()


def test_without_a_timeout_sessions_last_their_max_age(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(feed_app, "HEARTBEAT_S", 0.3)
    feed = RunningFeed(tmp_path)
    try:
        c = feed.client("ana")
        live = Stream(c)
        time.sleep(2.5)
        assert c.get("/").status_code == 200
        assert not [e for e in live.events if e[0] == "signed-out"]
        live.close()
    finally:
        feed.close()


@needs_chromium
def test_an_unattended_screen_leaves_for_the_login(browser: Any, tmp_path) -> None:
    feed = RunningFeed(tmp_path, idle_timeout_s=8, poll_interval_s=0.1)
    try:
        feed.store.upsert([_alert(i) for i in range(1, 4)])
        page, errors = open_page(browser, 15_000)
        log_in(page, feed.url, "sam", PASSWORD)
        page.wait_for_selector("#alerts tbody tr")
        # someone at the keyboard: the page stays (9 s, past the timeout)
        for _ in range(9):
            page.wait_for_timeout(1000)
            page.mouse.wheel(0, 40)
            page.keyboard.press("Shift")
        assert "/login" not in page.url
        # nobody: the page goes to the login on its own, with the reason
        page.wait_for_url("**/login?idle=1**", timeout=15_000)
        assert "without activity" in page.inner_text("#notice")
        assert "#alerts" not in page.content() and "p0" not in page.inner_text("body")
        assert errors == []
    finally:
        feed.close()
