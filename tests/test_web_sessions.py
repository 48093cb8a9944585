"""Feed sessions held in the alert store, over real HTTP (and in Chromium): signing out
ends every copy of a session's cookie; a supervisor ends anyone's session and its open
live page leaves for the login; a user signs out everywhere else; and two feed processes
on one PostgreSQL database share sessions, the login lockout and used one-time codes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import pipeline.web.app as feed_app
from pipeline.alerting.store import AlertStore
from pipeline.web import serve_feed
from pipeline.web.app import LOCKED
from pipeline.web.testing import PASSWORD, TZ, FeedClient, believable_alert, feed_settings
from pipeline.web.totp import code_at, new_secret
from tests.browser import log_in, needs_chromium, open_page
from tests.test_web import Stream
from tests.test_web_browser import _save

ROOT = Path(__file__).resolve().parent.parent
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
EDGE = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91"
)


def _until(check: Callable[[], bool], timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not within the time")
        time.sleep(0.1)


def _client(url: str, username: str | None = None, agent: str = FIREFOX) -> FeedClient:
    c = FeedClient(url)
    c.http.headers["user-agent"] = agent
    if username is not None:
        assert c.login(username).status_code == 303
    return c


def _copy(c: FeedClient, url: str) -> FeedClient:
    """Another browser holding a copy of ``c``'s session cookie (a stolen cookie)."""
    other = FeedClient(url)
    other.http.cookies.set("emrwatch_session", c.http.cookies["emrwatch_session"])
    return other


def _session_ids(page: str) -> dict[str, str]:
    """username → session id, from the "Everyone's open sessions" table."""
    table = page.split('id="all-sessions"')[1].split("</table>")[0]
    out = {}
    for row in re.findall(r"<tr id=\"session-.*?</tr>", table, re.S):
        name = re.search(r"<strong>([^<]+)</strong>", row)
        sid = re.search(r'name="session_id" value="([0-9a-f]{64})"', row)
        assert name
        out[name.group(1)] = sid.group(1) if sid else ""
    return out


@pytest.fixture()
def feed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, AlertStore]]:
    monkeypatch.setattr(feed_app, "HEARTBEAT_S", 0.3)
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    store.upsert([believable_alert(1, when=datetime(2026, 3, 2, 9, 0, tzinfo=TZ))])
    url, stop = serve_feed(store, feed_settings(poll_interval_s=0.1))
    yield url, store
    stop()
    store.close()


def test_signing_out_ends_every_copy_of_the_session(feed) -> None:
    url, store = feed
    with _client(url, "ana") as ana, _copy(ana, url) as thief:
        assert thief.get("/").status_code == 200  # a copy of a live cookie works ...
        assert ana.post("/logout").status_code == 303
        # ... and not once the user signed out: the session is over, not just the cookie
        r = thief.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/"
        assert thief.http.get("/api/alerts").status_code == 401
    [row] = store.sessions_started(datetime(2026, 1, 1, tzinfo=TZ), "ana", open_only=False)
    assert (row.end_reason, row.ended_by, row.address) == ("signed out", "ana", "127.0.0.1")


def test_a_supervisor_ends_a_session_and_the_live_page_leaves(feed) -> None:
    url, store = feed
    with (
        _client(url, "ana", FIREFOX) as ana,
        _client(url, "sam", EDGE) as sam,
        _client(url, "aud") as aud,
    ):
        live = Stream(ana)
        page = sam.get("/sessions").text
        ids = _session_ids(page)
        assert set(ids) == {"ana", "sam", "aud"} and ids["ana"] and ids["aud"]
        assert ids["sam"] == ""  # his own: he signs out instead
        row = page.split(f'id="session-{ids["ana"][:12]}"')[1].split("</tr>")[0]
        assert "Firefox 128 on Linux" in row and "127.0.0.1" in row and "analyst" in row
        own = page.split('id="own-sessions"')[1].split("</table>")[0]
        assert "Edge 120 on Windows" in own and "this browser" in own and "Firefox" not in own
        # an auditor reads everyone's sessions but ends none; an analyst sees only theirs
        audit_page = aud.get("/sessions").text
        assert set(_session_ids(audit_page)) == {"ana", "sam", "aud"}
        assert not any(_session_ids(audit_page).values())
        assert aud.post("/sessions/end", {"session_id": ids["ana"]}).status_code == 403
        assert 'id="all-sessions"' not in ana.get("/sessions").text
        assert ana.post("/sessions/end", {"session_id": ids["sam"]}).status_code == 403
        assert sam.post("/sessions/end", {"session_id": "0" * 64}).status_code == 404
        assert sam.post("/sessions/end", {"session_id": ids["ana"]}, csrf=False).status_code == 403

        r = sam.post("/sessions/end", {"session_id": ids["ana"], "reason": "laptop left on ward 3"})
        assert r.status_code == 303
        after = sam.get("/sessions").text
        assert "Ended ana&#39;s session (Firefox 128 on Linux, 127.0.0.1)." in after
        assert set(_session_ids(after)) == {"sam", "aud"}
        ended = after.split('id="ended-sessions"')[1].split("</table>")[0]
        assert "ana" in ended and "ended by a supervisor (sam)" in ended
        # ana's open page is told at once, and her next click goes to the login, saying why
        _, _, d = live.wait_for(lambda e: e[0] == "signed-out", timeout=5)
        assert d == {"idle": False, "why": "supervisor"}
        live.close()
        r = ana.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login?ended=supervisor&next=/"
        assert "A supervisor ended your session." in ana.get(r.headers["location"]).text
        assert ana.get("/").headers["location"] == "/login?next=/"  # then simply signed out
        # ending it again says so and writes nothing more
        again = sam.post("/sessions/end", {"session_id": ids["ana"]})
        assert again.status_code == 303
        assert "had ended already" in sam.get("/sessions").text
    [entry] = store.audit_log(actions=("session.end",))
    detail = json.loads(entry.detail)
    assert entry.actor == "sam" and detail["user"] == "ana"
    assert detail["browser"] == "Firefox 128 on Linux" and detail["session"] == ids["ana"][:12]
    assert detail["reason"] == "laptop left on ward 3"


def test_a_user_signs_out_everywhere_else(feed) -> None:
    url, store = feed
    with (
        _client(url, "ana", FIREFOX) as laptop,
        _client(url, "ana", EDGE) as ward_pc,
        _client(url, "sam") as sam,
    ):
        own = laptop.get("/sessions").text.split('id="own-sessions"')[1].split("</table>")[0]
        assert "Firefox 128 on Linux" in own and "Edge 120 on Windows" in own
        assert laptop.post("/sessions/others").status_code == 303
        assert "Signed out of 1 other session." in laptop.get("/sessions").text
        r = ward_pc.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login?ended=elsewhere&next=/"
        assert "signed out from another browser of yours" in ward_pc.get(r.headers["location"]).text
        assert laptop.get("/").status_code == 200 and sam.get("/").status_code == 200
        assert laptop.post("/sessions/others").status_code == 303
        assert "You had no other session." in laptop.get("/sessions").text
    [entry] = store.audit_log(actions=("session.end",))
    assert entry.actor == "ana" and json.loads(entry.detail) == {"user": "ana", "others": 1}


def test_two_feed_processes_share_sessions_lockouts_and_codes(pg_url: str) -> None:
    """Two feeds (each with its own store connection, as two processes would have) behind
    a load balancer: whichever serves a request, it sees the same sessions, lockouts and
    one-time codes."""
    secret = {"ana": new_secret()}
    base = feed_settings(secret="one secret for both", login_max_failures=3, login_lockout_s=60)
    users = [replace(u, totp_secret=secret.get(u.username, "")) for u in base.users]
    settings = base.with_users(*users)
    stores = [AlertStore(pg_url), AlertStore(pg_url)]
    (url_a, stop_a), (url_b, stop_b) = (serve_feed(s, settings) for s in stores)
    try:
        # sam signs in through A; B serves his next click (it asks the store)
        with _client(url_a, "sam") as sam_a, _copy(sam_a, url_b) as sam_b:
            assert sam_b.get("/").status_code == 200
            # he signs out through B: A refuses the session within a sync
            assert sam_b.http.post("/logout", data={"csrf_token": sam_a.csrf}).status_code == 303
            _until(lambda: sam_a.get("/").status_code == 303)
        # three wrong passwords through A lock the username on B too
        with FeedClient(url_a) as c:
            for _ in range(3):
                assert c.login("aud", "guess").status_code == 401
        with FeedClient(url_b) as c:
            r = c.login("aud", PASSWORD)
            assert r.status_code == 401 and LOCKED in r.text
        # a one-time code used through A is refused through B in the same 30 seconds
        with FeedClient(url_a) as a, FeedClient(url_b) as b:
            code = code_at(secret["ana"], time.time())
            page_a, page_b = a.login("ana"), b.login("ana")
            assert a.send_code(page_a, code).status_code == 303
            r = b.send_code(page_b, code)
            assert r.status_code == 401 and "That code was used already" in r.text
            # a supervisor on B ends ana's session made through A: A's stream is told
            with _client(url_b, "sam") as sam:
                live = Stream(a)
                ids = _session_ids(sam.get("/sessions").text)
                assert sam.post("/sessions/end", {"session_id": ids["ana"]}).status_code == 303
                _, _, d = live.wait_for(lambda e: e[0] == "signed-out", timeout=6)
                assert d["why"] == "supervisor"
                live.close()
    finally:
        stop_a()
        stop_b()
        for s in stores:
            s.close()


@needs_chromium
def test_an_ended_session_leaves_the_screen(browser: Any, feed, tmp_path: Path) -> None:
    url, store = feed
    page, errors = open_page(browser, 15_000)
    log_in(page, url, "ana", PASSWORD)
    page.wait_for_selector("#alerts tbody tr")
    with _client(url, "aud", EDGE):
        sup, sup_errors = open_page(browser, 15_000)
        log_in(sup, url, "sam", PASSWORD)
        sup.click("header .who a.name")  # his name opens the sessions page
        sup.wait_for_selector("#all-sessions")
        _save(sup, tmp_path, "sessions.png", full_page=True)
        row = sup.locator("#all-sessions tr", has_text="analyst")
        assert "Chrome" in row.inner_text()
        row.get_by_role("button", name="End session").click()
        sup.wait_for_selector("text=Ended ana's session")
        assert sup.locator("#all-sessions tr", has_text="analyst").count() == 0
    # no click needed: ana's page goes to the login, with the reason, and shows no case
    page.wait_for_url("**/login?ended=supervisor**", timeout=10_000)
    assert "A supervisor ended your session" in page.inner_text("#notice")
    assert "#alerts" not in page.content()
    assert errors == [] and sup_errors == []


def test_it_lists_and_ends_a_users_sessions_from_the_command_line(feed, tmp_path: Path) -> None:
    """For IT with no supervisor at hand: ``emrwatch users sessions --config FILE``."""
    import subprocess
    import sys
    from dataclasses import asdict

    import yaml

    url, store = feed
    users = [asdict(u) for u in feed_settings().users]
    config = tmp_path / "alerts.yaml"
    config.write_text(
        yaml.safe_dump({"feed": {"users": users}, "alerting": {"store_url": store.url}})
    )

    def cli(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "pipeline.cli", "users", "sessions", "--config", str(config)]
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=ROOT)

    with _client(url, "ana", FIREFOX) as ana, _client(url, "sam", EDGE) as sam:
        listed = cli()
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert len(lines) == 2 and any(
            ln.split()[:2] == ["ana", "analyst"] and "Firefox 128 on Linux" in ln for ln in lines
        ), lines
        ended = cli("--username", "ana", "--end")
        assert ended.returncode == 0 and "ana: ended 1 session(s)" in ended.stdout
        _until(lambda: ana.get("/").status_code == 303)  # within a sync of the feed
        assert sam.get("/").status_code == 200
        assert cli("--username", "ana").stdout.strip() == "ana: no session"
        assert cli("--end").returncode == 2  # --end needs a user
    [entry] = store.audit_log(actions=("session.end",))
    assert entry.actor.startswith("(command line: ")
    assert json.loads(entry.detail) == {"user": "ana", "sessions": 1}
