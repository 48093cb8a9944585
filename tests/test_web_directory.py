"""The feed's directory login against a real OpenLDAP server (Debian's slapd on loopback,
over ldaps:// and StartTLS with a hospital CA): users listed in the config sign in with
their directory password, checked live; the config stays the authority on who may use
the feed and in which role; a directory that cannot be reached is not a wrong password."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.alerting.store import AlertStore
from pipeline.web import FeedConfigError, FeedSettings, serve_feed
from pipeline.web.directory import Directory, DirectorySettings, DirectoryUnavailable
from pipeline.web.settings import User
from pipeline.web.testing import PASSWORD, FeedClient, feed_settings
from pipeline.web.totp import code_at, new_secret
from tests.ldap_server import PEOPLE, Slapd, needs_slapd

pytestmark = needs_slapd
USER_DN = "uid={username}," + PEOPLE


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    s = Slapd(tmp_path_factory.mktemp("slapd"))
    yield s
    s.stop()


def _serve(tmp_path: Path, directory: DirectorySettings, *users: User, **kw: Any) -> Any:
    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    base = feed_settings(login_max_failures=3, login_lockout_s=30, **kw)
    settings = replace(base, directory=directory).with_users(*base.users, *users)
    settings.validate()
    url, stop = serve_feed(store, settings)
    return url, stop, store


def _in(c: FeedClient) -> bool:
    return c.get("/").status_code == 200


def test_settings_refuse_a_directory_that_cannot_work(tmp_path: Path, monkeypatch) -> None:
    h = feed_settings().users[0].password_hash
    li = {"username": "li", "role": "analyst", "directory": True}
    ok = {"url": "ldaps://dc1.hospital.example", "user_dn": USER_DN}
    s = FeedSettings.from_dict({"users": [li], "directory": ok})
    assert s.user("li") is not None and s.user("li").directory  # type: ignore[union-attr]
    for directory, users, match in (
        ({**ok, "url": "ldap://dc1.hospital.example"}, [li], "would cross the network in clear"),
        ({**ok, "url": "http://dc1"}, [li], "give ldaps://"),
        ({**ok, "user_dn": "ou=people"}, [li], "must contain {username}"),
        ({**ok, "search_base": PEOPLE}, [li], "one of them"),
        ({"url": ok["url"], "search_base": PEOPLE}, [li], "bind_dn and bind_password_env"),
        (
            {
                "url": ok["url"],
                "search_base": PEOPLE,
                "bind_dn": "cn=svc",
                "bind_password_env": "NO_SUCH_ENV",
            },
            [li],
            r"\$NO_SUCH_ENV is not set",
        ),  # fmt: skip
        ({**ok, "ca_file": str(tmp_path / "none.pem")}, [li], "ca_file: no file"),
        ({**ok, "colour": "blue"}, [li], "unknown setting"),
        (None, [li], "feed.directory is not set"),
        (ok, [{**li, "password_hash": h}], "no password_hash"),
        (ok, [{**li, "directory": "yes"}], "true or false"),
    ):
        cfg: dict[str, Any] = {"users": users}
        if directory is not None:
            cfg["directory"] = directory
        with pytest.raises(FeedConfigError, match=match):
            FeedSettings.from_dict(cfg)
    # StartTLS, or a directory on this machine, may use ldap://
    FeedSettings.from_dict(
        {"users": [li], "directory": {**ok, "url": "ldap://dc1", "start_tls": True}}
    )
    FeedSettings.from_dict({"users": [li], "directory": {**ok, "url": "ldap://127.0.0.1:389"}})


def test_directory_users_sign_in_with_their_hospital_password(slapd: Slapd, tmp_path: Path) -> None:
    li_dn = slapd.add_person("li.na", "Directory pw 1")
    slapd.add_person("wang.wei", "Wang's pw")  # in the directory, not in the config
    directory = DirectorySettings(url=slapd.tls_url, ca_file=str(slapd.ca_file), user_dn=USER_DN)
    li = User("li.na", "", "supervisor", "Li Na", directory=True)
    url, stop, store = _serve(tmp_path, directory, li)
    try:
        c = FeedClient(url)
        assert c.login("li.na", "wrong").status_code == 401
        assert c.login("li.na", "").status_code in (400, 401)  # never an anonymous bind
        r = c.login("li.na", "Directory pw 1")
        assert r.status_code == 303 and _in(c)
        assert "Li Na" in c.get("/").text
        # the role is the config's: a supervisor sees the privacy report
        assert c.get("/reports").status_code == 200
        # in the directory but not in the config: no way in
        assert FeedClient(url).login("wang.wei", "Wang's pw").status_code == 401
        # a password hash user signs in as before, beside them
        assert _in(FeedClient(url, "ana"))
        # the directory is asked at every login: a changed password takes effect at once
        slapd.set_password(li_dn, "Directory pw 2")
        assert FeedClient(url).login("li.na", "Directory pw 1").status_code == 401
        assert FeedClient(url).login("li.na", "Directory pw 2").status_code == 303
        logins = [e for e in store.audit_log(actor="li.na") if e.action == "login"]
        assert len(logins) == 2 and json.loads(logins[0].detail)["role"] == "supervisor"
    finally:
        stop()
        store.close()


def test_active_directory_style_search_starttls_and_a_required_group(slapd: Slapd) -> None:
    """The account found by a search with a service account (as on Active Directory), over
    StartTLS, and let in only while a member of the privacy office's group."""
    svc = slapd.add_person("svc-emrwatch", "service pw")
    ana = slapd.add_person("ana.k", "Ana's pw", employeeNumber="E100")
    bo = slapd.add_person("bo.z", "Bo's pw")
    group = slapd.add_group("privacy-office", ana, bo)
    slapd.add_group("records", ana, bo)
    import os

    os.environ["TEST_LDAP_SVC_PW"] = "service pw"
    settings = DirectorySettings(
        url=slapd.url, start_tls=True, ca_file=str(slapd.ca_file), search_base=PEOPLE,
        search_filter="(&(objectClass=inetOrgPerson)(uid={username}))", bind_dn=svc,
        bind_password_env="TEST_LDAP_SVC_PW", require_group=group,
    )  # fmt: skip
    settings.validate("test")
    d = Directory(settings)
    assert d.check_password("ana.k", "Ana's pw")
    assert not d.check_password("ana.k", "wrong")
    assert not d.check_password("nobody", "Ana's pw")
    assert not d.check_password("ana*", "Ana's pw")  # a filter wildcard matches nothing
    # out of the group: refused, though the password is right (and though the account is
    # still in another group)
    slapd.remove_member(group, ana)
    assert not d.check_password("ana.k", "Ana's pw")
    assert d.check_password("bo.z", "Bo's pw")
    # a service account the directory refuses is the directory's problem, not a wrong password
    os.environ["TEST_LDAP_SVC_PW"] = "expired"
    with pytest.raises(DirectoryUnavailable, match="service account"):
        d.check_password("ana.k", "Ana's pw")
    # without the hospital's CA, TLS fails: unavailable, not a wrong password
    untrusted = Directory(replace(settings, ca_file=""))
    with pytest.raises(DirectoryUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        untrusted.check_password("ana.k", "Ana's pw")


def test_a_directory_that_is_down_is_not_a_wrong_password(tmp_path: Path) -> None:
    s = Slapd(tmp_path / "slapd")
    try:
        s.add_person("li.na", "Directory pw")
        directory = DirectorySettings(url=s.tls_url, ca_file=str(s.ca_file), user_dn=USER_DN,
                                      timeout_s=2)  # fmt: skip
        secret = new_secret()
        li = User("li.na", "", "analyst", directory=True, totp_secret=secret)
        url, stop, store = _serve(tmp_path, directory, li)
        try:
            s.stop()
            c = FeedClient(url)
            for _ in range(4):  # more than login_max_failures
                r = c.login("li.na", "Directory pw")
                assert r.status_code == 503 and "directory cannot be reached" in r.text
            s.start()
            # not locked out: the directory's outage did not count against the user; and
            # the second factor still follows the directory's password
            page = c.login("li.na", "Directory pw")
            assert page.status_code == 200 and 'action="/login/code"' in page.text
            assert c.send_code(page, code_at(secret, time.time())).status_code == 303
            assert _in(c)
        finally:
            stop()
            store.close()
    finally:
        s.stop()


def test_users_check_tries_a_sign_in_without_starting_the_feed(
    slapd: Slapd, tmp_path: Path
) -> None:
    """What hospital IT runs while setting up: the users as the feed reads them, and one
    sign-in tried against the directory and the authenticator."""
    import subprocess
    import sys

    import yaml

    slapd.add_person("zhao.min", "Zhao's pw")
    secret = new_secret()
    h = feed_settings().users[0].password_hash
    cfg = {
        "feed": {
            "directory": {"url": slapd.tls_url, "ca_file": str(slapd.ca_file), "user_dn": USER_DN},
            "users": [
                {
                    "username": "zhao.min",
                    "role": "auditor",
                    "directory": True,
                    "totp_secret": secret,
                },
                {"username": "ana", "role": "analyst", "password_hash": h},
            ],
        }
    }
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def check(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "users", "check", "--config", str(path), *args],
            input=stdin, capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip

    p = check()
    assert p.returncode == 0, p.stderr
    assert "zhao.min             auditor     directory      second factor (TOTP)" in p.stdout
    assert "ana                  analyst     password hash  no second factor" in p.stdout
    p = check("--username", "zhao.min", "--stdin",
              stdin=f"Zhao's pw\n{code_at(secret, time.time())}\n")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "password accepted" in p.stdout and "authenticator code accepted" in p.stdout
    p = check("--username", "zhao.min", "--stdin", stdin="wrong\n000000\n")
    assert p.returncode == 1 and "password refused" in p.stderr
    p = check("--username", "ana", "--stdin", stdin=f"{PASSWORD}\n")
    assert p.returncode == 0 and "ana: password accepted" in p.stdout
    p = check("--username", "wang.wei", "--stdin", stdin="x\n")
    assert p.returncode == 1 and "not in feed.users" in p.stderr
    # the directory's certificate not trusted: said so, exit 2
    cfg["feed"]["directory"].pop("ca_file")
    path.write_text(yaml.safe_dump(cfg))
    p = check("--username", "zhao.min", "--stdin", stdin="Zhao's pw\n000000\n")
    assert p.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in p.stderr
    cfg["feed"]["directory"]["url"] = "ldap://dc1.hospital.example"
    path.write_text(yaml.safe_dump(cfg))
    p = check()
    assert p.returncode == 2 and "would cross the network in clear" in p.stderr
