"""The feed's defences against password guessing, over real HTTP: failures per username
and per address (password spraying), the client's address behind trusted proxies only,
failed sign-ins and lockouts in the audit log and in /metrics; and the throttle's window."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from pipeline.alerting import schema
from pipeline.alerting.store import AlertStore
from pipeline.alerting.testing import FakeClock
from pipeline.web import FeedConfigError, FeedSettings, serve_feed
from pipeline.web.auth import LoginThrottle
from pipeline.web.testing import PASSWORD, FeedClient, feed_settings

PROXY_SETTINGS = {
    "login_max_failures": 3,
    "login_lockout_s": 60,
    "login_max_failures_per_address": 4,
    "login_address_lockout_s": 600,
}


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, AlertStore, CollectorRegistry]]:
    """A feed behind a (pretend) reverse proxy on 127.0.0.1, with its /metrics."""
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    registry = CollectorRegistry()
    settings = feed_settings(trusted_proxies=("127.0.0.1",), **PROXY_SETTINGS)
    url, stop = serve_feed(store, settings, metrics_registry=registry)
    yield url, store, registry
    stop()
    store.close()


def _from(url: str, address: str) -> FeedClient:
    """A browser at ``address``, as the proxy reports it."""
    c = FeedClient(url)
    c.http.headers["x-forwarded-for"] = address
    return c


def _audit(store: AlertStore, action: str) -> list[tuple[str, dict[str, object]]]:
    return [(e.actor, json.loads(e.detail)) for e in store.audit_log() if e.action == action]


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        if f.name.startswith("emrwatch_feed_login")
        for s in f.samples
        if s.name.endswith("_total")
    }


def test_one_password_tried_on_many_users_locks_the_address_not_the_users(served) -> None:
    url, store, _ = served
    spray = _from(url, "198.51.100.7")
    # one wrong password each for four usernames: no username reaches its limit (3) ...
    for name in ("ana", "sam", "aud", "Pa55word!"):  # people type passwords as names
        assert spray.login(name, "Summer2026!").status_code == 401
    # ... but the address did (4): even a right password is refused from it now
    r = spray.login("ana", PASSWORD)
    assert r.status_code == 401 and "Too many failed attempts" in r.text
    assert spray.get("/").status_code == 303
    # the users themselves, elsewhere, are not locked out
    with _from(url, "203.0.113.20") as ward:
        assert ward.login("ana", PASSWORD).status_code == 303
        assert ward.get("/").status_code == 200
    failed = _audit(store, "login.failed")
    assert sorted(actor for actor, _ in failed) == ["(unknown user)", "ana", "aud", "sam"]
    assert {d["address"] for _, d in failed} == {"198.51.100.7"}
    assert {d["reason"] for _, d in failed} == {"wrong password", "unknown user"}
    # a typed name that is no user is never written down
    assert "Pa55word" not in json.dumps([e.__dict__ for e in store.audit_log()], default=str)
    [(actor, locked)] = _audit(store, "login.locked")
    assert actor == "(unknown user)"
    assert locked == {"address": "198.51.100.7", "locked": ["address"], "reason": "unknown user"}
    [(actor, ok)] = _audit(store, "login")
    assert actor == "ana" and ok["address"] == "203.0.113.20"
    assert _metrics(url) == {
        "emrwatch_feed_logins_total": 1.0,
        "emrwatch_feed_login_failures_total": 4.0,
        "emrwatch_feed_login_lockouts_total": 1.0,
        "emrwatch_feed_login_refused_total": 1.0,
    }
    spray.close()


def test_guessing_one_users_password_locks_that_user_from_every_address(served) -> None:
    url, store, _ = served
    for i in range(3):  # three addresses, one guess each: the username's limit
        with _from(url, f"192.0.2.{10 + i}") as c:
            assert c.login("sam", f"guess{i}").status_code == 401
    with _from(url, "203.0.113.20") as ward:
        r = ward.login("sam", PASSWORD)
        assert r.status_code == 401 and "Too many failed attempts" in r.text
        assert ward.login("ana", PASSWORD).status_code == 303  # others still sign in
        sessions = [ln for ln in httpx.get(f"{url}/metrics").text.splitlines()
                    if ln.startswith("emrwatch_feed_sessions_open ")]  # fmt: skip
        assert sessions == ["emrwatch_feed_sessions_open 1.0"]  # ana's, and nobody else's
    [(actor, locked)] = _audit(store, "login.locked")
    assert actor == "sam" and locked["locked"] == ["user"]
    # the refused attempt is counted, not audited again
    assert len(_audit(store, "login.failed")) == 3
    assert _metrics(url)["emrwatch_feed_login_refused_total"] == 1.0


def test_forwarded_addresses_are_believed_only_from_trusted_proxies(tmp_path: Path) -> None:
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    url, stop = serve_feed(store, feed_settings(**PROXY_SETTINGS))  # no trusted proxies
    try:
        # a client that makes up a new X-Forwarded-For for every guess is still one address
        for i in range(4):
            with _from(url, f"10.9.9.{i}") as c:
                assert c.login(["ana", "sam", "aud", "nobody"][i], "wrong").status_code == 401
        with _from(url, "10.9.9.99") as c:
            r = c.login("aud", PASSWORD)
            assert r.status_code == 401 and "Too many failed attempts" in r.text
        assert {d["address"] for _, d in _audit(store, "login.failed")} == {"127.0.0.1"}
    finally:
        stop()
        store.close()


def test_the_client_is_the_last_address_no_trusted_proxy_added(tmp_path: Path) -> None:
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    settings = feed_settings(trusted_proxies=("127.0.0.0/8", "10.0.0.0/8"))
    url, stop = serve_feed(store, settings)
    try:
        # the client forged the first hop; the edge proxy (10.0.0.5) saw 198.51.100.9
        with _from(url, "6.6.6.6, 198.51.100.9, 10.0.0.5") as c:
            assert c.login("ana", PASSWORD).status_code == 303
        [(_, detail)] = _audit(store, "login")
        assert detail["address"] == "198.51.100.9"
    finally:
        stop()
        store.close()


def test_failures_are_forgotten_after_the_window(tmp_path: Path) -> None:
    clock = FakeClock()
    store = AlertStore(f"sqlite:///{tmp_path}/a.sqlite3", clock=clock)
    t = LoginThrottle(store, "user", max_failures=3, window_s=60, secret="s3cret")
    assert [t.failed("sam") for _ in range(2)] == [False, False]
    clock.advance(61)  # the two are old now: they no longer count
    assert t.failed("sam") is False and not t.locked("sam")
    clock.advance(1)
    assert t.failed("sam") is False
    assert t.failed("sam") is True  # three within the window: this one locks
    assert t.locked("sam") and not t.locked("ana")
    assert t.failed("sam") is False  # already locked: not a new lockout
    for _ in range(50):  # hammering a locked name does not grow the table
        t.failed("sam")
    with store.read() as conn:
        assert len(conn.execute(select(schema.feed_login_failures)).all()) == 3
    clock.advance(59)
    assert t.locked("sam")  # hammering kept it locked
    clock.advance(61)
    assert not t.locked("sam")
    t.failed("sam")
    t.succeeded("sam")  # a success forgives the user
    assert [t.failed("sam") for _ in range(2)] == [False, False] and not t.locked("sam")
    # another process on the same database (same secret) counts the same failures
    other = LoginThrottle(AlertStore(store.url, clock=clock), "user", 3, 60, "s3cret")
    assert other.failed("sam") is True and t.locked("sam")
    # the names typed are stored only as keyed hashes: a password typed as a name is not
    with store.read() as conn:
        keys = {r.key for r in conn.execute(select(schema.feed_login_failures))}
    assert keys and not any("sam" in k for k in keys)
    clock.advance(1)
    assert store.login_failures_prune(0) == 3 and not t.locked("sam")
    store.close()


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    ok = FeedSettings.from_dict({"trusted_proxies": ["10.0.0.0/8", "127.0.0.1", "::1"]})
    assert ok.trusted_proxies == ("10.0.0.0/8", "127.0.0.1", "::1")
    with pytest.raises(FeedConfigError, match="trusted_proxies: 'proxy.local' is not an IP"):
        FeedSettings.from_dict({"trusted_proxies": ["proxy.local"]})
    with pytest.raises(FeedConfigError, match="trusted_proxies must be a list"):
        FeedSettings.from_dict({"trusted_proxies": "10.0.0.0/8"})
    with pytest.raises(FeedConfigError, match="login_max_failures_per_address must be positive"):
        FeedSettings.from_dict({"login_max_failures_per_address": 0})


def test_a_user_is_told_of_their_last_sign_in_and_the_failures_since(served) -> None:
    url, store, _ = served
    with _from(url, "10.1.2.3") as first:
        assert first.login("ana", PASSWORD).status_code == 303
        assert "Your last sign-in" not in first.landing  # the first one: nothing to tell
    with _from(url, "198.51.100.7") as guesser:
        for _ in range(2):
            assert guesser.login("ana", "Winter2026!").status_code == 401
    with _from(url, "10.1.2.4") as again:
        assert again.login("ana", PASSWORD).status_code == 303
        notice = re.search(r'<div class="flash flash-(\w+)"[^>]*>([^<]*)</div>', again.landing)
        assert notice is not None, again.landing[:2000]
        kind, text = notice.groups()
        assert kind == "warn"
        assert re.fullmatch(
            r"Your last sign-in: \d{4}-\d\d-\d\d \d\d:\d\d from 10\.1\.2\.3\. 2 failed sign-ins "
            r"under your name since then \(from 198\.51\.100\.7\): if they were not yours, "
            r"tell the privacy office\.",
            text,
        ), text
    with _from(url, "10.1.2.5") as later:
        assert later.login("ana", PASSWORD).status_code == 303
        assert "flash-warn" not in later.landing
        assert "Your last sign-in" in later.landing and "from 10.1.2.4." in later.landing
    # the audit page's action filter is the store's: no newer entries crowd it out
    for i in range(30):
        store.record_access("ana", "case.view", f"ew-{i}")
    got = store.audit_log(actor="ana", limit=5, actions=["login.failed"])
    assert [e.action for e in got] == ["login.failed"] * 2


def test_the_users_page_shows_who_may_sign_in_and_how_their_sign_ins_went(served) -> None:
    url, store, _ = served
    with _from(url, "10.1.2.3") as c:
        assert c.login("ana", PASSWORD).status_code == 303
    with _from(url, "198.51.100.7") as c:
        for _ in range(2):
            assert c.login("sam", "guess").status_code == 401
    with _from(url, "203.0.113.9") as c:
        for name in ("admin", "root"):
            assert c.login(name, "guess").status_code == 401
    with _from(url, "10.1.2.4") as aud:
        assert aud.login("aud", PASSWORD).status_code == 303
        page = aud.get("/users")
        assert page.status_code == 200 and 'href="/users"' in page.text

        def row(name: str) -> str:
            m = re.search(rf'<tr id="user-{name}"[^>]*>(.*?)</tr>', page.text, re.S)
            assert m, name
            return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", m.group(1))).strip()

        assert re.fullmatch(
            r"ana Ana analyst password none \d{4}-\d\d-\d\d \d\d:\d\d from 10\.1\.2\.3 1 0 0 1 session",
            row("ana"),
        ), row("ana")
        assert row("sam").endswith("none in 30 days 0 2 (198.51.100.7 ×2) 0 no"), row("sam")
        assert 'class="attention"' in page.text.split('id="user-sam"')[1][:30]
        unknown = page.text.split('id="unknown-names"')[1].split("</table>")[0]
        assert "203.0.113.9" in unknown and "<td>2</td>" in unknown
        assert "admin" not in page.text and "root" not in page.text  # typed names: never
    with _from(url, "10.1.2.3") as ana:  # an analyst may not read it
        assert ana.login("ana", PASSWORD).status_code == 303
        assert ana.get("/users").status_code == 403
        assert 'href="/users"' not in ana.landing
