"""The feed's second factor (TOTP, RFC 6238) over real HTTP and in Chromium: a password
alone does not log in a user who has one; codes are checked, good once, throttled; the
pending step expires; ``users hash --totp`` makes entries the feed accepts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from pipeline.alerting.store import AlertStore
from pipeline.web import FeedConfigError, FeedSettings, serve_feed
from pipeline.web.testing import PASSWORD, FeedClient, feed_settings
from pipeline.web.totp import code_at, new_secret
from tests.browser import needs_chromium, open_page

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"ana": new_secret(), "sam": new_secret()}  # aud has no second factor


@pytest.fixture()
def feed(tmp_path: Path) -> Iterator[tuple[str, AlertStore]]:
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    base = feed_settings(login_max_failures=3, login_lockout_s=30)
    users = [replace(u, totp_secret=SECRETS.get(u.username, "")) for u in base.users]
    url, stop = serve_feed(store, base.with_users(*users))
    yield url, store
    stop()
    store.close()


def _wrong(secret: str) -> str:
    """A code that is not the current one (nor its neighbours')."""
    now = {code_at(secret, time.time() + d) for d in (-30, 0, 30)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in now)


def _logged_in(c: FeedClient) -> bool:
    return c.get("/").status_code == 200


def test_a_password_alone_does_not_log_in_a_user_with_a_second_factor(feed) -> None:
    url, store = feed
    c = FeedClient(url)
    page = c.login("ana", PASSWORD)
    assert page.status_code == 200 and 'action="/login/code"' in page.text
    assert "Signing in as <strong>ana</strong>" in page.text
    assert not _logged_in(c)  # between the steps, nothing is open
    # a reload between the steps shows the code page again
    assert 'action="/login/code"' in c.get("/login").text
    r = c.send_code(c.get("/login"), _wrong(SECRETS["ana"]))
    assert r.status_code == 401 and "Wrong code" in r.text and not _logged_in(c)
    r = c.send_code(r, code_at(SECRETS["ana"], time.time()))
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert _logged_in(c)
    logins = [json.loads(e.detail) for e in store.audit_log(actor="ana") if e.action == "login"]
    assert logins == [{"role": "analyst", "second_factor": "totp", "address": "127.0.0.1"}]

    # the same code again (someone looking over the shoulder) is refused; the next one works
    assert c.post("/logout").status_code == 303
    again = c.send_code(c.login("ana", PASSWORD), code_at(SECRETS["ana"], time.time()))
    assert again.status_code == 401 and "used already" in again.text
    r = c.send_code(again, code_at(SECRETS["ana"], time.time() + 30))  # the phone a bit ahead
    assert r.status_code == 303 and _logged_in(c)
    # a code from two steps ago is not accepted
    c2 = FeedClient(url)
    old = c2.send_code(c2.login("ana", PASSWORD), code_at(SECRETS["ana"], time.time() - 90))
    assert old.status_code == 401 and "Wrong code" in old.text

    # a user without a second factor logs in with the password, as before
    plain = FeedClient(url, "aud")
    assert _logged_in(plain)
    # the code step cannot be reached without the password step
    fresh = FeedClient(url)
    tok = fresh.login_token()
    r = fresh.http.post("/login/code", data={"code": "123456", "csrf_token": tok})
    assert r.status_code == 401 and "took too long" in r.text and not _logged_in(fresh)


def test_wrong_codes_lock_the_user_and_the_step_expires(feed, monkeypatch) -> None:
    url, _store = feed
    c = FeedClient(url)
    page = c.login("sam", PASSWORD)
    wrong = _wrong(SECRETS["sam"])
    for _ in range(2):
        page = c.send_code(page, wrong)
        assert page.status_code == 401 and 'action="/login/code"' in page.text
    page = c.send_code(page, wrong)  # the third: locked, and back to the password
    assert page.status_code == 401 and 'action="/login"' in page.text
    assert "Too many failed attempts" in c.login("sam", PASSWORD).text
    assert not _logged_in(c)

    # a password checked longer ago than the pending time needs checking again
    import pipeline.web.auth as auth

    c3 = FeedClient(url)
    page = c3.login("ana", PASSWORD)
    monkeypatch.setattr(auth, "MFA_PENDING_S", -1)
    r = c3.send_code(page, code_at(SECRETS["ana"], time.time()))
    assert r.status_code == 401 and "took too long" in r.text and not _logged_in(c3)


def test_settings_refuse_bad_secrets_and_users_without_one_when_required(tmp_path) -> None:
    h = feed_settings().users[0].password_hash
    user = {"username": "li", "password_hash": h, "role": "analyst"}
    with pytest.raises(FeedConfigError, match="totp_secret: not base32"):
        FeedSettings.from_dict({"users": [{**user, "totp_secret": "not-a-secret!"}]})
    with pytest.raises(FeedConfigError, match="at least 128"):
        FeedSettings.from_dict({"users": [{**user, "totp_secret": "JBSWY3DPEHPK3PXP"}]})
    with pytest.raises(FeedConfigError, match="li has no totp_secret, and require_totp"):
        FeedSettings.from_dict({"users": [user], "require_totp": True})

    # emrwatch users hash --totp: an entry the feed accepts, and the authenticator's link
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "users", "hash", "--stdin", "--username", "li",
         "--role", "supervisor", "--totp", "--issuer", "County General"],
        input="s3cret pass\n", capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    entry = yaml.safe_load(p.stdout)
    settings = FeedSettings.from_dict({"users": entry, "require_totp": True})
    li = settings.user("li")
    assert li is not None and li.role == "supervisor" and li.totp_secret
    link = re.search(r"otpauth://\S+", p.stderr)
    assert link, p.stderr
    u = urlparse(link.group(0))
    q = parse_qs(u.query)
    assert u.path == "/County%20General%3Ali" and q["issuer"] == ["County General"]
    assert q["secret"] == [li.totp_secret] and q["digits"] == ["6"] and q["period"] == ["30"]
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "users", "hash", "--stdin", "--totp"],
        input="x\n", capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1 and "give --username" in p.stderr


@needs_chromium
def test_two_step_login_in_chromium(browser: Any, feed) -> None:
    url, _store = feed
    page, errors = open_page(browser, 10_000)
    page.goto(url + "/")
    page.fill("input[name=username]", "sam")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#code-form")
    assert page.get_attribute("input[name=code]", "autocomplete") == "one-time-code"
    page.fill("input[name=code]", code_at(SECRETS["sam"], time.time()))
    page.click("#code-form button[type=submit]")
    page.wait_for_selector("#alerts")
    assert "/login" not in page.url
    assert errors == []
