"""The feed over real HTTP (uvicorn on 127.0.0.1): login, roles, CSRF, masking, the audit
log, triage, suppressions, paging and filters, and the live event stream."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.alerting.store import AlertStore
from pipeline.alerting.testing import sample_alert
from pipeline.web import FeedConfigError, FeedSettings, serve_feed
from pipeline.web.testing import (
    PASSWORD,
    TZ,
    FeedClient,
    RunningFeed,
    believable_alert,
    feed_settings,
)
from pipeline.web.users import verify_password

HTML = {"accept": "text/html"}


Feed = RunningFeed


@pytest.fixture()
def feed(tmp_path: Path) -> Iterator[Feed]:
    f = Feed(tmp_path, poll_interval_s=0.1)
    yield f
    f.close()


def _alert(i: int = 1, **over: Any) -> dict[str, Any]:
    return believable_alert(i, when=datetime(2026, 3, 2, 9, 0, tzinfo=TZ), **over)


# ---------------------------------------------------------------------------- login
def test_every_page_needs_a_login(feed: Feed) -> None:
    feed.store.upsert([_alert()])
    anon = feed.client()
    r = anon.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/"
    r = anon.get("/?severity=high&department=ORTH")
    assert r.headers["location"] == "/login?next=/%3Fseverity%3Dhigh%26department%3DORTH"
    for path in ("/api/alerts", "/events", "/audit", "/reports", f"/cases/{_alert()['alert_id']}"):
        assert anon.http.get(path).status_code == 401, path
    assert (
        anon.post(f"/cases/{_alert()['alert_id']}/triage", {"action": "acknowledge"}).status_code
        == 401
    )
    assert anon.http.get("/healthz").text == "ok"


def test_login_logout_and_bad_passwords(tmp_path: Path) -> None:
    feed = Feed(tmp_path, login_max_failures=3, login_lockout_s=30)
    try:
        c = feed.client()
        assert c.login("ana", "wrong").status_code == 401
        assert c.login("nobody", PASSWORD).status_code == 401
        r = c.login("ana", PASSWORD)
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert c.get("/").status_code == 200
        assert [e.action for e in feed.store.audit_log(actor="ana")] == ["login", "login.failed"]
        # logging out needs the CSRF token too, then the session is gone
        assert c.post("/logout", csrf=False).status_code == 403
        assert c.post("/logout").status_code == 303
        assert c.get("/").status_code == 303
        # a login form posted without the page's token is refused (login CSRF)
        fresh = feed.client()
        r = fresh.http.post("/login", data={"username": "ana", "password": PASSWORD})
        assert r.status_code == 403
        # three wrong passwords lock the username, even against the right one
        for _ in range(3):
            assert fresh.login("sam", "wrong").status_code == 401
        r = fresh.login("sam", PASSWORD)
        assert r.status_code == 401 and "Too many failed attempts" in r.text
        # the post-login target stays on this site
        other = feed.client()
        tok = other.login_token()
        r = other.http.post(
            "/login",
            data={"username": "aud", "password": PASSWORD, "csrf_token": tok, "next": "//evil"},
        )
        assert r.headers["location"] == "/"
    finally:
        feed.close()


def test_session_cookie_is_signed_and_http_only(feed: Feed) -> None:
    c = feed.client("ana")
    cookie = next(x for x in c.http.cookies.jar if x.name == "emrwatch_session")
    assert cookie.has_nonstandard_attr("HttpOnly") or "httponly" in str(cookie._rest).lower()
    forged = httpx.Client(
        base_url=feed.url, cookies={"emrwatch_session": cookie.value[:-4] + "AAAA"}
    )
    assert forged.get("/", headers=HTML).status_code == 303
    forged.close()


# ---------------------------------------------------------------------------- roles
ROLE_CHECKS = [
    # (user, method, path template, expected status)
    ("aud", "POST", "/cases/{aid}/triage", 403),
    ("aud", "POST", "/cases/{aid}/comment", 403),
    ("aud", "POST", "/cases/{aid}/unmask", 403),
    ("aud", "GET", "/cases/{aid}/suppress", 403),
    ("aud", "POST", "/cases/{aid}/suppress", 403),
    ("aud", "GET", "/audit", 200),
    ("aud", "GET", "/cases/{aid}", 200),
    ("ana", "GET", "/audit", 403),
    ("ana", "GET", "/cases/{aid}/suppress", 403),
    ("ana", "POST", "/cases/{aid}/suppress", 403),
    ("ana", "POST", "/cases/{aid}/triage", 303),
    ("sam", "GET", "/audit", 403),
    ("aud", "GET", "/reports", 200),
    ("sam", "GET", "/reports", 200),
    ("ana", "GET", "/reports", 403),
    ("sam", "GET", "/cases/{aid}/suppress", 200),
    ("sam", "POST", "/cases/{aid}/comment", 303),
]


def test_roles_are_enforced_on_every_endpoint(feed: Feed) -> None:
    aid = _alert()["alert_id"]
    feed.store.upsert([_alert()])
    clients = {u: feed.client(u) for u in ("ana", "sam", "aud")}
    for user, method, path, want in ROLE_CHECKS:
        c = clients[user]
        p = path.format(aid=aid)
        data = {"action": "acknowledge", "note": "n", "assignee": "me", "reason": "x" * 10}
        r = c.get(p) if method == "GET" else c.post(p, data)
        assert r.status_code == want, (user, method, p, r.status_code)
    assert feed.store.get(aid).state == "acknowledged"  # type: ignore[union-attr]
    r = clients["aud"].http.post(
        f"/cases/{aid}/triage", data={"action": "investigate", "csrf_token": clients["aud"].csrf}
    )
    assert r.status_code == 403 and "lacks triage" in r.text
    assert feed.store.get(aid).state == "acknowledged"  # type: ignore[union-attr]


def test_state_changes_need_the_csrf_token(feed: Feed) -> None:
    aid = _alert()["alert_id"]
    feed.store.upsert([_alert()])
    c = feed.client("ana")
    assert c.post(f"/cases/{aid}/triage", {"action": "acknowledge"}, csrf=False).status_code == 403
    r = c.http.post(f"/cases/{aid}/triage", data={"action": "acknowledge", "csrf_token": "forged"})
    assert r.status_code == 403
    other = feed.client("sam")  # another session's token is no good either
    r = c.http.post(
        f"/cases/{aid}/triage", data={"action": "acknowledge", "csrf_token": other.csrf}
    )
    assert r.status_code == 403
    assert feed.store.get(aid).state == "new"  # type: ignore[union-attr]
    # the header works as well as the form field (for scripts)
    r = c.http.post(
        f"/cases/{aid}/triage", data={"action": "acknowledge"}, headers={"X-CSRF-Token": c.csrf}
    )
    assert r.status_code == 303
    assert feed.store.get(aid).state == "acknowledged"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- privacy
def test_patient_ids_are_masked_unless_the_role_may_see_them(feed: Feed) -> None:
    a = _alert(1)
    pid = a["patient_ids"][0]
    # a reason that names the patient (a third-party detector might) is masked too
    a["reason"] = f"opened {pid} three times"
    feed.store.upsert([a])
    aid = a["alert_id"]
    masked = pid[0] + "•" * (len(pid) - 3) + pid[-2:]
    for user, sees in (("ana", False), ("aud", False), ("sam", True)):
        c = feed.client(user)
        case = c.get(f"/cases/{aid}").text
        feed_page = c.get("/").text
        api = c.http.get("/api/alerts").text
        for text in (case, feed_page, api):
            assert (pid in text) is sees, user
        if not sees:
            assert masked in case and masked in feed_page
    views = [e for e in feed.store.audit_log(alert_id=aid) if e.action == "case.view"]
    seen = {e.actor: json.loads(e.detail)["unmasked"] for e in views}
    assert seen == {"ana": False, "aud": False, "sam": True}


def test_unmask_needs_a_reason_and_is_audited(feed: Feed) -> None:
    a = _alert(2)
    pid, aid = a["patient_ids"][0], a["alert_id"]
    other = _alert(3)
    feed.store.upsert([a, other])
    ana = feed.client("ana")
    assert pid not in ana.get(f"/cases/{aid}").text
    ana.post(f"/cases/{aid}/unmask", {"reason": "why"})  # too short: refused
    assert pid not in ana.get(f"/cases/{aid}").text
    r = ana.post(f"/cases/{aid}/unmask", {"reason": "checking the VIP flag with the ward"})
    assert r.status_code == 303
    assert pid in ana.get(f"/cases/{aid}").text
    # the unmask is for this case only
    assert other["patient_ids"][0] not in ana.get(f"/cases/{other['alert_id']}").text
    log = feed.store.audit_log(alert_id=aid, actor="ana")
    assert [e.action for e in log] == ["case.view", "unmask", "case.view", "case.view"]
    assert json.loads(log[1].detail)["reason"] == "checking the VIP flag with the ward"
    assert json.loads(log[0].detail)["unmasked"] is True
    assert json.loads(log[3].detail)["unmasked"] is False
    # the auditor reads it on the audit page, filtered by case and action
    aud = feed.client("aud")
    page = aud.get(f"/audit?alert={aid}&action=unmask").text
    assert "checking the VIP flag with the ward" in page and "case.view</span>" not in page
    assert aud.get(f"/audit?actor=ana&alert={aid}").text.count("case.view</span>") == 3


def test_the_report_page_shows_the_period_and_is_audited(feed: Feed) -> None:
    feed.store.upsert([_alert(1), _alert(2, severity="critical")])
    sam = feed.client("sam")
    today = datetime.now(TZ).date()
    page = sam.get(f"/reports?from={today.isoformat()}&to={(today + timedelta(days=1))}").text
    assert "Cases raised: <strong>2</strong>" in page
    assert _alert(1)["patient_ids"][0] not in page  # a report names staff, never patients
    bad = sam.get("/reports?from=2026-04-01&to=2026-03-01")
    assert bad.status_code == 400 and "must end after it starts" in bad.text
    log = feed.store.audit_log(actor="sam")
    assert [e.action for e in log][:2] == ["report.view", "report.view"]
    assert json.loads(log[1].detail)["from"] == today.isoformat()
    assert (
        "Reports</a>" in sam.get("/").text and "Reports</a>" not in feed.client("ana").get("/").text
    )


# ---------------------------------------------------------------------------- triage
def test_triage_from_the_case_page(feed: Feed) -> None:
    a = _alert(4)
    aid = a["alert_id"]
    feed.store.upsert([a])
    c = feed.client("ana")
    page = c.get(f"/cases/{aid}").text
    assert 'value="acknowledge"' in page and 'value="close_benign"' not in page
    c.post(f"/cases/{aid}/triage", {"action": "acknowledge"})
    page = c.get(f"/cases/{aid}").text
    assert 'value="close_benign"' in page and "Acknowledged" in page
    c.post(f"/cases/{aid}/triage", {"action": "close_benign", "note": ""})  # needs a note
    assert "needs a note" in c.get(f"/cases/{aid}").text
    assert feed.store.get(aid).state == "acknowledged"  # type: ignore[union-attr]
    c.post(f"/cases/{aid}/comment", {"assignee": "me"})
    c.post(f"/cases/{aid}/triage", {"action": "close_confirmed", "note": "no reason found"})
    got = feed.store.get(aid)
    assert got is not None and got.state == "closed_confirmed" and got.assignee == "ana"
    steps = [(h.to_state, h.assignee, h.note) for h in feed.store.history(aid)]
    assert steps == [
        ("acknowledged", None, ""),
        ("acknowledged", "ana", ""),
        ("investigating", None, ""),
        ("closed_confirmed", None, "no reason found"),
    ]
    assert 'value="reopen"' in c.get(f"/cases/{aid}").text
    assert c.post("/cases/ew-nope/triage", {"action": "acknowledge"}).status_code == 404
    assert c.get("/cases/ew-nope").status_code == 404


def test_supervisor_suppresses_similar_after_a_preview(feed: Feed) -> None:
    a = _alert(5)
    aid, user = a["alert_id"], a["user_id"]
    # two more alerts like it (same user, same rule) and one of another rule
    alike = [_alert(5 + 7 * k, user_id=user, alert_id=f"ew-alike-{k}") for k in (1, 2)]
    unlike = _alert(6, user_id=user, alert_id="ew-unlike")
    feed.store.upsert([a, *alike, unlike])
    sam = feed.client("sam")
    sam.post(f"/cases/{aid}/triage", {"action": "acknowledge"})
    page = sam.get(f"/cases/{aid}/suppress?scope=user_id&description=covering+the+ward").text
    assert re.search(r'id="hidden-count">3<', page), "this alert and the two alike"
    assert "ew-unlike" not in page
    assert feed.store.suppressions() == []  # a preview saves nothing
    r = sam.post(
        f"/cases/{aid}/suppress",
        {"scope": "user_id", "description": "covering the ward", "note": "ward cover"},
    )
    assert r.status_code == 303
    (s,) = feed.store.suppressions()
    assert (s.user_id, s.rule, s.source_alert_id) == (user, a["detector"][0], aid)
    assert feed.store.get(aid).verdict == "benign"  # type: ignore[union-attr]
    assert "suppression.create" in [e.action for e in feed.store.audit_log(actor="sam")]


# ---------------------------------------------------------------------------- paging
def _many(n: int) -> list[dict[str, Any]]:
    t0 = datetime(2026, 3, 1, tzinfo=TZ)
    sevs = ["low", "medium", "high", "critical"]
    depts = ["ORTH", "CARD", "ONC"]
    rules = ["vip-snooping", "bulk-export", "off-hours-bulk"]
    return [
        sample_alert(
            alert_id=f"ew-{i:06d}",
            severity=sevs[i % 4],
            department_id=depts[i % 3],
            detector=(rules[i % 3],) if i % 5 else (rules[i % 3], "volume-anomaly"),
            status="retracted" if i % 10 == 0 else "open",
            user_id=f"u{i % 7:04d}",
            first_seen=(t0 + timedelta(minutes=i)).isoformat(),
            last_seen=(t0 + timedelta(minutes=i, seconds=30)).isoformat(),
        )
        for i in range(n)
    ]


def _all_pages(c: FeedClient, query: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        r = c.http.get(f"/api/alerts?{query}&limit=25" + (f"&cursor={cursor}" if cursor else ""))
        assert r.status_code == 200, r.text
        d = r.json()
        assert len(d["items"]) <= 25
        items += d["items"]
        cursor = d["next_cursor"]
        if not cursor:
            return items


def test_paging_and_filters(feed: Feed) -> None:
    alerts = _many(120)
    feed.store.upsert(alerts)
    for a in alerts[:12]:
        feed.store.transition(a["alert_id"], "acknowledged", actor="ana")
    c = feed.client("ana")
    everything = _all_pages(c, "")
    assert [x["alert_id"] for x in everything] == [f"ew-{i:06d}" for i in reversed(range(120))]
    cases = {
        "severity=critical": lambda a: a["severity"] == "critical",
        "department=ONC": lambda a: a["department_id"] == "ONC",
        "detector=volume-anomaly": lambda a: "volume-anomaly" in a["detector"],
        "status=retracted": lambda a: a["status"] == "retracted",
        "state=acknowledged": lambda a: int(a["alert_id"][3:]) < 12,
        "severity=high&department=CARD&detector=off-hours-bulk": lambda a: (
            a["severity"] == "high"
            and a["department_id"] == "CARD"
            and "off-hours-bulk" in a["detector"]
        ),
        "user=u0003": lambda a: a["user_id"] == "u0003",
    }
    for query, pred in cases.items():
        want = [a["alert_id"] for a in reversed(alerts) if pred(a)]
        got = [x["alert_id"] for x in _all_pages(c, query)]
        assert got == want, query
        page = c.get(f"/?{query}").text
        assert f"{len(want)} matching" in page, query
    by_sev = _all_pages(c, "sort=severity")
    ranks = ["low", "medium", "high", "critical"]
    assert [ranks.index(x["severity"]) for x in by_sev] == sorted(
        (ranks.index(x["severity"]) for x in by_sev), reverse=True
    )
    first = c.get("/").text
    assert first.count('class="row') == 50 and "120 stored" in first
    assert 'data-cursor="' in first and 'id="more"' in first
    assert c.http.get("/api/alerts?severity=urgent").status_code == 400
    assert c.get("/?state=bogus").status_code == 400
    assert c.http.get("/api/alerts?cursor=garbage").status_code == 400
    assert c.get("/?cursor=garbage").status_code == 400


# ---------------------------------------------------------------------------- live
class Stream:
    """An SSE client on a thread: collects (event, id, data) as they arrive."""

    def __init__(self, c: FeedClient, query: str = "") -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.connected = threading.Event()
        self._stop = False
        self._t = threading.Thread(target=self._run, args=(c, query), daemon=True)
        self._t.start()
        assert self.connected.wait(5), "the event stream did not open"

    def _run(self, c: FeedClient, query: str) -> None:
        with c.http.stream("GET", f"/events?{query}", timeout=None) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            ev: dict[str, str] = {}
            for line in r.iter_lines():
                if line.startswith(": connected"):
                    self.connected.set()
                if self._stop:
                    return
                if not line:
                    if "data" in ev:
                        self.events.append(
                            (ev.get("event", ""), ev.get("id", ""), json.loads(ev["data"]))
                        )
                    ev = {}
                    continue
                if not line.startswith(":"):
                    k, _, v = line.partition(":")
                    ev[k] = v.strip()

    def wait_for(self, pred: Any, timeout: float = 2.0) -> tuple[str, str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if pred(e):
                    return e
            time.sleep(0.02)
        raise AssertionError(f"no such event within {timeout}s; got {self.events}")

    def close(self) -> None:
        self._stop = True


def test_event_stream_delivers_alerts_upserted_after_connecting(feed: Feed) -> None:
    feed.store.upsert([_alert(1)])
    c = feed.client("ana")
    everything = Stream(c)
    critical_only = Stream(c, "severity=critical")
    a = _alert(3)  # sealed-record-touch: critical
    b = _alert(2)  # high
    pid = a["patient_ids"][0]
    t0 = time.monotonic()
    feed.store.upsert([a])
    ev, eid, data = everything.wait_for(lambda e: e[2].get("alert_id") == a["alert_id"])
    latency = time.monotonic() - t0
    epoch, _, seq = eid.partition(".")
    assert ev == "alert" and data["match"] and epoch and seq.isdigit()
    assert f'id="row-{a["alert_id"]}"' in data["html"] and pid not in data["html"]
    critical_only.wait_for(lambda e: e[2].get("alert_id") == a["alert_id"] and e[2]["match"])
    feed.store.upsert([b])
    everything.wait_for(lambda e: e[2].get("alert_id") == b["alert_id"] and e[2]["match"])
    # a filtered stream is told the high alert does not belong (and carries no row for it)
    _, _, d = critical_only.wait_for(lambda e: e[2].get("alert_id") == b["alert_id"])
    assert d == {"alert_id": b["alert_id"], "match": False}
    # a triage step elsewhere updates the row in place
    feed.store.transition(a["alert_id"], "acknowledged", actor="sam")
    _, _, d = everything.wait_for(
        lambda e: e[2].get("alert_id") == a["alert_id"] and e[2].get("state") == "acknowledged"
    )
    assert "Acknowledged" in d["html"]
    # a new version of an alert (the detector's update) too
    feed.store.upsert([{**a, "version": 2, "severity": "critical", "reason": "more evidence"}])
    everything.wait_for(lambda e: "more evidence" in e[2].get("html", ""))
    # reconnecting with the last id seen replays what was missed, nothing before it
    with FeedClient(feed.url, "aud") as late:
        first_id = everything.events[0][1]
        replay = Stream(late, f"since={first_id}")
        replay.wait_for(lambda e: e[2].get("state") == "acknowledged")
        n = int(first_id.split(".")[1])
        assert all(int(e[1].split(".")[1]) > n for e in replay.events)
        replay.close()
        # a page from before a restart of the server (another epoch) is told to reload
        stale = Stream(late, "since=0123abcd.5")
        _, _, d = stale.wait_for(lambda e: e[0] == "reset")
        stale.close()
    everything.close()
    critical_only.close()
    assert latency < 2.0
    print(f"\nSSE: alert upserted → event received in {latency * 1000:.0f} ms")


# ---------------------------------------------------------------------------- misc
def test_security_headers(feed: Feed) -> None:
    c = feed.client("ana")
    r = c.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert "<script>" not in r.text  # no inline script: the CSP forbids it


def test_settings_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = feed_settings().users[0].password_hash
    cfg = tmp_path / "emrwatch.yaml"
    cfg.write_text(
        "feed:\n"
        f"  users:\n    - {{username: li.na, role: supervisor, password_hash: '{h}'}}\n"
        "  page_size: 25\n  secret_env: FEED_SECRET_FOR_TEST\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("FEED_SECRET_FOR_TEST", "s3cr3t")
    s = FeedSettings.load(cfg)
    assert s.user("li.na") is not None and s.page_size == 25
    assert s.resolved_secret() == ("s3cr3t", "$FEED_SECRET_FOR_TEST")
    assert FeedSettings().resolved_secret()[1] in ("generated", "$EMRWATCH_FEED_SECRET")
    bad = [
        {"users": [{"username": "x", "role": "admin", "password_hash": h}]},
        {"users": [{"username": "x", "role": "analyst", "password_hash": "plain"}]},
        {"users": [{"username": "x", "role": "analyst"}]},
        {"pagesize": 10},
    ]
    for d in bad:
        with pytest.raises(FeedConfigError):
            FeedSettings.from_dict(d)


def test_hash_helper_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.web.users", "hash", "--stdin"],
        input="s3cret pass\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert verify_password(out.stdout.strip(), "s3cret pass") and not out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.web.users",
            "hash",
            "--stdin",
            "--username",
            "li.na",
            "--role",
            "auditor",
        ],
        input="pw\n",
        capture_output=True,
        text=True,
        check=True,
    )
    import yaml

    (entry,) = yaml.safe_load(out.stdout)
    s = FeedSettings.from_dict({"users": [entry]})
    assert s.users[0].role == "auditor" and verify_password(s.users[0].password_hash, "pw")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_change_feed_finds_new_alerts_versions_and_triage(backend: str, tmp_path: Path) -> None:
    from pipeline.alerting.testing import backend_url
    from pipeline.web.changes import ChangeFeed, patient_ids_of

    with backend_url(backend, tmp_path) as url:
        store = AlertStore(url)
        try:
            old = _alert(1)
            store.upsert([old])
            cf = ChangeFeed(store, poll_interval_s=0.01)
            cf.prime()
            assert cf.poll() == []  # what was there before is not news
            a = _alert(2)
            store.upsert([a])
            time.sleep(0.02)
            (got,) = cf.poll()
            assert got[0].alert_id == a["alert_id"] and got[1] == tuple(a["patient_ids"])
            time.sleep(0.02)
            assert cf.poll() == []  # the overlap window re-reads it, unchanged: dropped
            store.transition(old["alert_id"], "acknowledged", actor="ana")
            time.sleep(0.02)
            assert [(s.alert_id, s.state) for s, _ in cf.poll()] == [
                (old["alert_id"], "acknowledged")
            ]
            store.upsert([{**a, "version": 2, "severity": "critical"}])
            time.sleep(0.02)
            assert [(s.alert_id, s.severity) for s, _ in cf.poll()] == [(a["alert_id"], "critical")]
            # with the table scan resting, the newest cases are still watched every tick
            cf._next_scan = float("inf")
            store.upsert([{**a, "version": 3, "status": "retracted"}])
            assert [(s.version, s.status) for s, _ in cf.poll()] == [(3, "retracted")]
            c = _alert(5)
            store.upsert([c])  # new: the rowid (SQLite) or the newest cases (PostgreSQL)
            assert [s.alert_id for s, _ in cf.poll()] == [c["alert_id"]]
            assert patient_ids_of(store, [a["alert_id"]]) == {
                a["alert_id"]: tuple(a["patient_ids"])
            }
        finally:
            store.close()


def test_case_page_for_an_alert_without_evidence_details(feed: Feed) -> None:
    """Alerts from before per-event evidence (or from other detectors) still read well."""
    a = sample_alert(alert_id="ew-plain", explanations_checked=[], findings=[])
    feed.store.upsert([a])
    page = feed.client("aud").get("/cases/ew-plain").text
    assert "ew-plain-e1, ew-plain-e2" in page  # the evidence as event ids
    assert "No explanations were recorded" in page and "no per-rule findings" in page
    assert "p00012" not in page and "p•••12" in page


def test_a_retracted_case_says_why_the_detectors_retracted_it(feed: Feed) -> None:
    why = "WS-SURG-04's clock runs 5.0 h behind, so its accesses were placed at hours they did not happen"
    a = sample_alert(
        alert_id="ew-clock", status="retracted", reason=f"Shared account; retracted: {why}"
    )
    b = sample_alert(alert_id="ew-doc", status="retracted", reason="No care relationship")
    feed.store.upsert([a, b])
    page = feed.client("aud").get("/cases/ew-clock").text
    assert f"Retracted by the detectors: {why}." in page.replace("&#39;", "'")
    page = feed.client("aud").get("/cases/ew-doc").text
    assert "Retracted by the detectors: later documentation or the case model" in page


def test_demo_settings_make_one_user_per_role() -> None:
    settings, passwords = FeedSettings.for_demo(port=0)
    assert sorted(passwords) == ["analyst", "auditor", "supervisor"]
    for u in settings.users:
        assert u.username == u.role and verify_password(u.password_hash, passwords[u.role])


def test_metrics_on_the_feed_port_when_asked(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("emrwatch_demo_things", "something the embedding program counts", registry=registry)
    store = AlertStore(f"sqlite:///{tmp_path}/a.sqlite3")
    url, stop = serve_feed(store, feed_settings(), metrics_registry=registry)
    try:
        body = httpx.get(f"{url}/metrics").text  # no login: Prometheus scrapes it
        assert "emrwatch_demo_things_total" in body
        assert "emrwatch_feed_streams 0.0" in body and "emrwatch_feed_changes_total" in body
    finally:
        stop()
    url, stop = serve_feed(store, feed_settings())
    try:
        assert httpx.get(f"{url}/metrics").status_code == 404  # only when asked
    finally:
        stop()
        store.close()


# ---------------------------------------------------------------------------- HTTPS
def _tls_files(tmp_path: Path) -> tuple[Any, str, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA(organization_name="Hospital IT CA")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem, key = tmp_path / "feed.pem", tmp_path / "feed.key"
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(pem), append=i > 0)
    cert.private_key_pem.write_to_path(str(key))
    return ca, str(pem), str(key)


def test_the_feed_serves_https_itself(tmp_path: Path) -> None:
    import ssl

    ca, pem, key = _tls_files(tmp_path)
    f = Feed(tmp_path, tls_cert_file=pem, tls_key_file=key, poll_interval_s=0.1)
    try:
        assert f.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context()
        ca.configure_trust(trusted)
        c = FeedClient(f.url, "ana", verify=trusted)
        f.clients.append(c)
        r = c.get("/")
        assert r.status_code == 200 and "emrwatch" in r.text
        assert r.headers["strict-transport-security"] == "max-age=31536000"
        cookie = next(x for x in c.http.cookies.jar if x.name == "emrwatch_session")
        assert cookie.secure, "the session cookie never travels in clear"
        # a client that does not trust the hospital's CA refuses the server
        with pytest.raises(httpx.ConnectError):
            httpx.get(f.url + "/login", timeout=5)
        # plain HTTP on the TLS port gets no page
        with pytest.raises(httpx.HTTPError):
            httpx.get(f.url.replace("https://", "http://") + "/login", timeout=5)
    finally:
        f.close()


def test_plain_http_feed_has_no_hsts_and_tls_settings_are_checked(
    feed: Feed, tmp_path: Path
) -> None:
    r = feed.client("ana").get("/")
    assert r.status_code == 200 and "strict-transport-security" not in r.headers
    _, pem, key = _tls_files(tmp_path)
    with pytest.raises(FeedConfigError, match="go together"):
        FeedSettings.from_dict({"tls_cert_file": pem})
    with pytest.raises(FeedConfigError, match="tls_key_file: no file"):
        FeedSettings.from_dict({"tls_cert_file": pem, "tls_key_file": str(tmp_path / "nope")})
    with pytest.raises(FeedConfigError, match="cannot be used"):
        FeedSettings.from_dict({"tls_cert_file": key, "tls_key_file": pem})  # swapped
    ok = FeedSettings.from_dict({"tls_cert_file": pem, "tls_key_file": key})
    assert ok.tls and ok.https_only_cookies


def test_only_loopback_counts_as_local() -> None:
    from pipeline.web.server import _loopback

    assert all(_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(_loopback(h) for h in ("0.0.0.0", "10.1.2.3", "::", "feed.hospital.org"))


# ---------------------------------------------------------------------------- late cases
def test_cases_untouched_past_their_target_are_marked_late(tmp_path: Path) -> None:
    from datetime import UTC

    from pipeline.alerting.testing import FakeClock

    five_hours_ago = FakeClock((datetime.now(UTC) - timedelta(hours=5, minutes=10)).isoformat())
    crit, high, seen = (
        _alert(1, severity="critical"),
        _alert(2, severity="high"),
        _alert(3, severity="critical"),
    )
    with AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3", clock=five_hours_ago) as old:
        old.upsert([crit, high, seen])
        old.transition(seen["alert_id"], "acknowledged", actor="ana")
    f = Feed(tmp_path)
    try:
        c = f.client("ana")
        page = c.get("/").text

        def late_badge(alert: dict[str, Any]) -> str:
            m = re.search(rf'<tr id="row-{alert["alert_id"]}".*?</tr>', page, re.S)
            assert m, alert["alert_id"]
            badge = re.search(r'<div class="late"( hidden)?[^>]*>([^<]*)</div>', m.group(0))
            assert badge
            return "" if badge.group(1) else badge.group(2)

        assert late_badge(crit) == "untriaged 5 h"  # critical: 4 h target
        assert late_badge(high) == ""  # high: 24 h
        assert late_badge(seen) == ""  # someone is on it
        api = {r["alert_id"]: r for r in c.http.get("/api/alerts").json()["items"]}
        assert api[crit["alert_id"]]["late_h"] == 5 and api[crit["alert_id"]]["target_h"] == 4
        assert api[high["alert_id"]]["late_h"] is None
        # the triage filter "Untriaged past target": the store's query and the live matcher
        late = c.http.get("/api/alerts?state=late").json()["items"]
        assert [r["alert_id"] for r in late] == [crit["alert_id"]]
        assert 'value="late" selected' in c.get("/?state=late").text
        from pipeline.alerting.records import AlertFilter
        from pipeline.web.changes import matches

        assert f.store.count(AlertFilter(late=True)) == 1
        summaries = {x.alert_id: x for x in f.store.page(AlertFilter(), None, 10).items}
        now = datetime.now(UTC)
        assert matches(AlertFilter(late=True), summaries[crit["alert_id"]], now)
        assert not matches(AlertFilter(late=True), summaries[high["alert_id"]], now)
        assert not matches(
            AlertFilter(late=True), summaries[crit["alert_id"]], now - timedelta(hours=2)
        )
        f.store.transition(crit["alert_id"], "acknowledged", actor="ana")
        assert c.http.get("/api/alerts?state=late").json()["items"] == []
    finally:
        f.close()


# ---------------------------------------------------------------------------- case export
def test_case_export_for_the_file(feed: Feed) -> None:
    alert = _alert(7)
    feed.store.upsert([alert])
    aid = alert["alert_id"]
    feed.store.transition(aid, "acknowledged", actor="ana", note="looking into it")
    pid = alert["patient_ids"][0]

    sam = feed.client("sam")
    assert f'href="/cases/{aid}/export"' in sam.get(f"/cases/{aid}").text
    r = sam.get(f"/cases/{aid}/export")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["content-disposition"] == f'attachment; filename="case-{aid}.json"'
    assert r.headers["cache-control"] == "no-store"
    doc = r.json()
    assert doc["exported_by"] == {"username": "sam", "role": "supervisor"}
    assert doc["patient_ids"] == "shown" and pid in r.text
    assert doc["event_ids"] == alert["event_ids"]
    assert len(doc["case"]["timeline"]) == len(alert["evidence"])
    assert doc["triage_history"][0]["note"] == "looking into it"
    assert [a["action"] for a in doc["access_log"]][-2:] == ["case.view", "case.export"]
    exports = [e for e in feed.store.audit_log(alert_id=aid) if e.action == "case.export"]
    assert [e.actor for e in exports] == ["sam"]

    aud = feed.client("aud")  # the compliance file: masked
    r = aud.get(f"/cases/{aid}/export")
    assert r.status_code == 200 and r.json()["patient_ids"] == "masked" and pid not in r.text
    # the printable evidence report: the same content as a page, audited the same way
    page = sam.get(f"/cases/{aid}/report")
    assert page.status_code == 200 and "Patient identifiers are shown" in page.text
    assert all(e in page.text for e in alert["event_ids"]) and "looking into it" in page.text
    formats = [
        json.loads(e.detail)["format"]
        for e in feed.store.audit_log(alert_id=aid)
        if e.action == "case.export"
    ]
    assert sorted(formats) == ["html", "json", "json"]
    masked = aud.get(f"/cases/{aid}/report").text
    assert "Patient identifiers are masked" in masked and pid not in masked
    ana = feed.client("ana")  # analysts triage; evidence does not leave through them
    assert ana.get(f"/cases/{aid}/report").status_code == 403
    assert ana.get(f"/cases/{aid}/export").status_code == 403
    assert "/export" not in ana.get(f"/cases/{aid}").text
    assert feed.client().get(f"/cases/{aid}/export").status_code in (303, 401)
    assert sam.get("/cases/ew-nope/export").status_code == 404


def test_assigned_to_me_and_to_nobody(feed: Feed) -> None:
    a1, a2, a3 = _alert(11), _alert(12), _alert(13)
    feed.store.upsert([a1, a2, a3])
    feed.store.comment(a1["alert_id"], actor="sam", assignee="ana")
    feed.store.comment(a2["alert_id"], actor="sam", assignee="sam")
    ana = feed.client("ana")

    def ids(query: str) -> set[str]:
        r = ana.http.get(f"/api/alerts?{query}")
        assert r.status_code == 200, r.text
        return {x["alert_id"] for x in r.json()["items"]}

    assert ids("assignee=me") == {a1["alert_id"]}
    assert ids("assignee=nobody") == {a3["alert_id"]}
    assert ids("assignee=me&assignee=nobody") == set()  # both at once: nothing matches
    assert (
        feed.client("sam").http.get("/api/alerts?assignee=me").json()["items"][0]["alert_id"]
        == a2["alert_id"]
    )
    assert 'value="me" selected' in ana.get("/?assignee=me").text
    from pipeline.alerting.records import AlertFilter
    from pipeline.web.changes import matches

    rows = {s.alert_id: s for s in feed.store.page(AlertFilter(), None, 10).items}
    assert matches(AlertFilter(assignee="ana"), rows[a1["alert_id"]])
    assert not matches(AlertFilter(assignee="ana"), rows[a2["alert_id"]])
    assert matches(AlertFilter(unassigned=True), rows[a3["alert_id"]])
    assert not matches(AlertFilter(unassigned=True), rows[a1["alert_id"]])


def test_a_case_lists_the_other_cases_on_its_patients(feed: Feed) -> None:
    vip = sample_alert("ew-vip-1", user_id="u1", patient_ids=("P-VIP", "P-1"))
    also = sample_alert("ew-vip-2", user_id="u2", department_id="ICU", patient_ids=("P-VIP",))
    other = sample_alert("ew-else", user_id="u3", patient_ids=("P-9",))
    feed.store.upsert([vip, also, other])
    page = feed.client("ana").get("/cases/ew-vip-1").text
    section = page.split('id="same-patients"')[1].split("</section>")[0]
    assert "Other cases on these patients (1)" in section
    assert 'href="/cases/ew-vip-2"' in section and "<strong>u2</strong>" in section
    assert "ew-else" not in section and "P-VIP" not in section  # an analyst: masked
    lone = feed.client("ana").get("/cases/ew-else").text.split('id="same-patients"')[1]
    assert "No other case touches this case's patients." in lone


def test_supervisors_filter_the_feed_by_patient_and_analysts_may_not(feed: Feed) -> None:
    vip = sample_alert("ew-vip-1", user_id="u1", patient_ids=("P-VIP", "P-1"))
    also = sample_alert("ew-vip-2", user_id="u2", patient_ids=("P-VIP",),
                        last_seen="2026-03-02T11:00:00+08:00")  # fmt: skip
    other = sample_alert("ew-else", user_id="u3", patient_ids=("P-9",))
    feed.store.upsert([vip, also, other])
    sup = feed.client("sam")  # a supervisor sees patients
    case = sup.get("/cases/ew-vip-1").text
    link = re.search(r'href="([^"]+)" id="all-on-patients"', case)
    assert link is not None and link.group(1).replace("&amp;", "&") == "/?patient=P-VIP&patient=P-1"
    items = sup.http.get("/api/alerts?patient=P-VIP").json()["items"]
    assert [i["alert_id"] for i in items] == ["ew-vip-2", "ew-vip-1"]
    assert "patient P-VIP" in sup.get("/?patient=P-VIP").text  # the filter shows as a chip
    searches = [json.loads(e.detail) for e in feed.store.audit_log(actor="sam")
                if e.action == "patient.search"]  # fmt: skip
    assert [d["patients"] for d in searches] == [["P-VIP"], ["P-VIP"]]  # the API, the page
    # the live stream takes the filter too (its matching: the test below)
    with sup.http.stream("GET", "/events?patient=P-VIP&since=0", timeout=10) as r:
        assert r.status_code == 200
    ana = feed.client("ana")  # an analyst sees them masked: no probing for a patient
    assert ana.http.get("/api/alerts?patient=P-VIP").status_code == 400
    assert ana.http.get("/events?patient=P-VIP").status_code == 400
    assert 'id="all-on-patients"' not in ana.get("/cases/ew-vip-1").text


def test_the_live_filter_by_patient_matches_as_the_store_does() -> None:
    from pipeline.alerting.records import AlertFilter
    from pipeline.web.changes import matches

    s = _summary_of(sample_alert("ew-x", patient_ids=("P-1",)))
    f = AlertFilter(patient_id=["P-1", "P-2"])
    assert matches(f, s, None, ("P-1",))
    assert not matches(f, s, None, ("P-3",))
    assert matches(AlertFilter(), s, None, ())
    # and by the days of last_seen (10:05 +08:00 on 2026-03-02), as the store does
    day = AlertFilter(last_seen_from="2026-03-02T00:00:00+08:00",
                      last_seen_to="2026-03-03T00:00:00+08:00")  # fmt: skip
    assert matches(day, s, None, ())
    later = AlertFilter(last_seen_from="2026-03-02T10:06:00+08:00")
    assert not matches(later, s, None, ())
    assert not matches(AlertFilter(last_seen_to="2026-03-02T10:05:00+08:00"), s, None, ())


def _summary_of(alert: dict[str, Any]) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        store = AlertStore(f"sqlite:///{d}/a.sqlite3")
        store.upsert([alert])
        [s] = store.page().items
        store.close()
    return s


def test_supervisors_and_auditors_export_the_filtered_cases_as_csv(feed: Feed) -> None:
    import csv
    import io

    day1 = sample_alert("ew-d1", user_id="=HYPERLINK(\"x\")", patient_ids=("P-1",),
                        severity="high", last_seen="2026-03-01T23:30:00+08:00",
                        reason="opened P-1's record with no care relationship")  # fmt: skip
    day2 = sample_alert("ew-d2", user_id="u2", patient_ids=("P-2",), severity="high",
                        last_seen="2026-03-02T00:30:00+08:00")  # fmt: skip
    low = sample_alert("ew-low", user_id="u3", severity="low",
                       last_seen="2026-03-02T09:00:00+08:00")  # fmt: skip
    feed.store.upsert([day1, day2, low])
    sup = feed.client("sam")
    page = sup.get("/?severity=high&from=2026-03-02&to=2026-03-02")
    assert 'value="2026-03-02"' in page.text  # the dates stay in the form
    link = re.search(r'id="export-csv" href="([^"]+)"', page.text)
    assert link is not None
    r = sup.http.get(link.group(1).replace("&amp;", "&"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    # the hospital's days (Asia/Shanghai): 2026-03-01 23:30 is the day before
    assert [x["alert_id"] for x in rows] == ["ew-d2"]
    r = sup.http.get("/cases.csv?severity=high")
    rows = {x["alert_id"]: x for x in csv.DictReader(io.StringIO(r.text))}
    assert set(rows) == {"ew-d1", "ew-d2"}
    assert rows["ew-d1"]["user_id"] == '\'=HYPERLINK("x")'  # not a formula in a spreadsheet
    assert "P-1" in rows["ew-d1"]["reason"]  # a supervisor sees patients
    aud_rows = {x["alert_id"]: x for x in csv.DictReader(io.StringIO(
        feed.client("aud").http.get("/cases.csv?severity=high").text))}  # fmt: skip
    assert "P-1" not in aud_rows["ew-d1"]["reason"]  # an auditor sees them masked
    assert feed.client("ana").http.get("/cases.csv").status_code == 403  # analysts: no
    assert 'id="export-csv"' not in feed.client("ana").get("/").text
    exports = [(e.actor, json.loads(e.detail)) for e in feed.store.audit_log()
               if e.action == "cases.export"]  # fmt: skip
    assert [(who, d["cases"], d["filters"]["severity"]) for who, d in exports] == [
        ("aud", 2, ["high"]),
        ("sam", 2, ["high"]),
        ("sam", 1, ["high"]),  # newest first
    ]
    assert sup.http.get("/cases.csv?from=yesterday").status_code == 400


def test_several_cases_are_acknowledged_or_assigned_at_once(feed: Feed) -> None:
    feed.store.upsert([_alert(i) for i in (1, 2, 3)])
    ids = [_alert(i)["alert_id"] for i in (1, 2, 3)]
    ana = feed.client("ana")
    assert ana.post(f"/cases/{ids[2]}/triage", {"action": "acknowledge"}).status_code == 303
    page = ana.get("/")
    assert page.text.count('form="bulk"') == 3 and 'id="pick-all"' in page.text
    body = {"alert_id": ids, "action": "acknowledge", "back": "severity=high"}
    assert ana.http.post("/cases/bulk", data=body).status_code == 403  # no CSRF token
    r = ana.http.post("/cases/bulk", data={**body, "csrf_token": ana.csrf})
    assert r.status_code == 303 and r.headers["location"] == "/?severity=high"
    assert "Acknowledged 2 case(s). Left 1 as they were (not new)." in ana.get("/").text
    assert [feed.store.get(i).state for i in ids] == ["acknowledged"] * 3
    history = feed.store.history(ids[0])
    assert [(h.actor, h.to_state) for h in history][-1] == ("ana", "acknowledged")
    # assign them: to a user who triages, not to anyone at all
    assign = {"alert_id": ids[:2], "csrf_token": ana.csrf, "action": "assign"}
    ana.http.post("/cases/bulk", data={**assign, "assignee": "sam"})
    assert [feed.store.get(i).assignee for i in ids] == ["sam", "sam", None]
    ana.http.post("/cases/bulk", data={**assign, "assignee": "aud"})  # an auditor
    assert "&#39;aud&#39; is not a user who triages" in ana.get("/").text
    assert [feed.store.get(i).assignee for i in ids] == ["sam", "sam", None]
    # an auditor reads, changes nothing, and gets no checkboxes
    aud = feed.client("aud")
    assert 'form="bulk"' not in aud.get("/").text
    assert aud.http.post("/cases/bulk", data={**body, "csrf_token": aud.csrf}).status_code == 403
