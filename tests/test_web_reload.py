"""The feed's users reloaded from its config file while it runs, over real HTTP: a user
removed is out at their next click, a role change applies to an open session, a user
added signs in, all without a restart and in the audit log; a broken edit changes
nothing and is counted."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from pipeline.alerting.store import AlertStore
from pipeline.web import FeedSettings, serve_feed
from pipeline.web import reload as reloading
from pipeline.web.testing import PASSWORD, FeedClient, feed_settings

USERS = {u.username: u for u in feed_settings().users}  # ana, sam, aud (their roles: below)


def _user(name: str, role: str) -> dict[str, Any]:
    """A config entry; a name the test settings lack gets aud's password."""
    return {**asdict(USERS.get(name, USERS["aud"])), "username": name, "role": role}


def _write(path: Path, roles: dict[str, str], **feed: Any) -> None:
    users = [_user(name, role) for name, role in roles.items()]
    doc = {"feed": {"users": users, "timezone": "Asia/Shanghai", **feed}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)  # as editors and config management do: the file is replaced


def _until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "the feed did not apply the change"
        time.sleep(0.05)


@pytest.fixture()
def feed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any, Path]]:
    monkeypatch.setattr(reloading, "CHECK_EVERY_S", 0.05)
    path = tmp_path / "alerts.yaml"
    _write(path, {"ana": "analyst", "sam": "analyst", "aud": "auditor"})
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    registry = CollectorRegistry()
    url, stop = serve_feed(
        store, FeedSettings.load(path), metrics_registry=registry, settings_path=path
    )
    yield url, stop, path
    stop()
    store.close()


def test_users_edited_in_the_config_apply_without_a_restart(feed) -> None:
    url, stop, path = feed
    ana, sam = FeedClient(url, "ana"), FeedClient(url, "sam")
    assert ana.get("/access-report").status_code == 403  # an analyst's page it is not
    assert FeedClient(url).login("li", PASSWORD).status_code == 401  # not a user yet
    # IT removes sam (a lost laptop), makes ana a supervisor and adds li as an auditor
    _write(path, {"ana": "supervisor", "aud": "auditor", "li": "auditor"})
    _until(lambda: sam.get("/").status_code == 303)  # signed out at the next click
    assert sam.get("/").headers["location"].startswith("/login")
    assert sam.http.get("/api/alerts").status_code == 401
    assert ana.get("/access-report").status_code == 200  # the same session, a new role
    with FeedClient(url, "li") as li:
        assert li.get("/audit").status_code == 200
    entries = [e for e in stop.app.state.store.audit_log() if e.action == "users.reload"]
    assert [(e.actor, json.loads(e.detail)) for e in entries] == [
        ("(config)", {"file": str(path), "added": ["li"], "removed": ["sam"], "changed": ["ana"]})
    ]
    assert FeedClient(url).login("sam", PASSWORD).status_code == 401
    # sam is back as he was: his old session stays ended (it ended in the store); a role
    # change kept ana's
    _write(path, {"ana": "supervisor", "aud": "auditor", "li": "auditor", "sam": "supervisor"})
    with FeedClient(url) as again:
        _until(lambda: again.login("sam", PASSWORD).status_code == 303)
    assert sam.get("/").status_code == 303
    store = stop.app.state.store
    since = datetime(2026, 1, 1, tzinfo=UTC)
    first = min(store.sessions_started(since, "sam", open_only=False), key=lambda r: r.started_at)
    assert (first.end_reason, first.ended_by) == ("user removed", "(config)")
    assert [r.open for r in store.sessions_started(since, "ana", open_only=False)] == [True]
    ana.close()
    sam.close()


def test_a_broken_edit_changes_nothing_and_is_counted(feed) -> None:
    url, stop, path = feed
    reloader = stop.app.state.settings_reloader

    def counted(name: str) -> float:
        text = httpx.get(f"{url}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith(f"{name}_total "))
        return float(line.split()[1])

    with FeedClient(url, "sam") as sam:
        path.write_text("feed:\n  users: [{username: sam, role: janitor, password_hash: x}]\n")
        _until(lambda: sam.get("/").status_code == 200 and reloader.failures == 1)
        assert sam.get("/").status_code == 200  # still signed in, as the old file had it
        assert counted("emrwatch_feed_settings_reload_failures") == 1.0
        # a setting that needs a restart is not applied, and the users did not change
        _write(path, {"ana": "analyst", "sam": "analyst", "aud": "auditor"}, port=9999)
        _until(lambda: sam.get("/").status_code == 200 and reloader.loads == 2)
        assert sam.get("/").status_code == 200 and reloader.settings.port != 9999
        assert counted("emrwatch_feed_settings_reloads") == 0.0
    assert not [e for e in stop.app.state.store.audit_log() if e.action == "users.reload"]


def test_an_open_live_stream_of_a_removed_user_is_signed_out(feed, monkeypatch) -> None:
    """No request is needed for the change to apply: the feed checks the file itself, and
    the removed user's open event stream hears that it is signed out."""
    import pipeline.web.app as feed_app
    from tests.test_web import Stream

    monkeypatch.setattr(feed_app, "HEARTBEAT_S", 0.2)  # the stream looks at the session often
    url, stop, path = feed
    sam = FeedClient(url, "sam")
    live = Stream(sam)
    time.sleep(0.5)
    assert not [e for e in live.events if e[0] == "signed-out"]
    _write(path, {"ana": "analyst", "aud": "auditor"})
    live.wait_for(lambda e: e[0] == "signed-out", timeout=10)
    live.close()
    assert stop.app.state.settings_reloader.reloads == 1
    sam.close()


def test_the_sign_in_policy_and_limits_apply_without_a_restart(feed) -> None:
    url, stop, path = feed
    roles = {"ana": "analyst", "sam": "analyst", "aud": "auditor"}
    with FeedClient(url) as c:
        for _ in range(2):
            assert c.login("sam", "guess").status_code == 401
        assert c.login("sam", PASSWORD).status_code == 303  # 5 failures lock, by default
    # IT tightens the lockout and puts the feed behind a proxy, in the file
    _write(path, roles, login_max_failures=2, trusted_proxies=["127.0.0.1"], page_size=7,
           login_address_lockout_s=1800)  # fmt: skip
    _until(lambda: stop.app.state.settings.login_max_failures == 2)
    # failures are kept (pruned) for the new, longer window
    assert stop.app.state.feed_app.sessions.failure_window_s() == 1800
    with FeedClient(url) as c:
        c.http.headers["x-forwarded-for"] = "198.51.100.23"
        for _ in range(2):
            assert c.login("aud", "guess").status_code == 401
        r = c.login("aud", PASSWORD)
        assert r.status_code == 401 and "Too many failed attempts" in r.text
    failed = [
        json.loads(e.detail) for e in stop.app.state.store.audit_log(actions=("login.failed",))
    ]
    assert failed[0]["address"] == "198.51.100.23"  # the proxy's word is taken now
    [entry] = stop.app.state.store.audit_log(actions=("users.reload",))
    detail = json.loads(entry.detail)
    assert detail["settings"] == [
        "page_size", "login_max_failures", "login_address_lockout_s", "trusted_proxies"
    ]  # fmt: skip
    assert detail["added"] == detail["removed"] == detail["changed"] == []
