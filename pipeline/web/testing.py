"""Helpers for testing the feed (and for trying it by hand): users, believable alerts, and
an HTTP client that logs in and carries the CSRF token.

httpx is a test dependency, imported only when :class:`FeedClient` is used.
"""

from __future__ import annotations

import functools
import random
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from argon2 import PasswordHasher

from detectors.alerts import alert_id_for
from detectors.explain import REASONS
from pipeline.web.settings import FeedSettings, User

TZ = timezone(timedelta(hours=8))
PASSWORD = "correct horse battery"
USERS = {"ana": "analyst", "sam": "supervisor", "aud": "auditor"}

# (rule, title, level, reason template, resources, actions)
_SCENARIOS = [
    (
        "vip-snooping",
        "VIP record opened without a care relationship",
        "high",
        "opened a VIP patient's record {n} time(s) {span} with no care relationship; "
        "not attending, not under care of {dept}, no notes or orders by the user, "
        "no service or administrative role for the encounter, no grant",
        ["Patient", "Observation", "DocumentReference"],
        ["view"],
    ),
    (
        "off-hours-bulk",
        "Many unrelated patients outside the user's shift",
        "high",
        "viewed {p} unrelated patients {span}, outside shift 07:00–15:00; "
        "none under care of {dept}",
        ["Patient", "Encounter"],
        ["view", "query"],
    ),
    (
        "coworker-snooping",
        "A colleague's record opened without a care relationship",
        "high",
        "opened the record of a colleague (a staff member who is a patient) {n} time(s) "
        "{span} with no care relationship",
        ["Patient", "DiagnosticReport"],
        ["view"],
    ),
    (
        "sealed-record-touch",
        "Sealed record opened by someone not on its list",
        "critical",
        "opened a sealed record (legal hold) {n} time(s) {span} without being on its "
        "authorised list",
        ["DocumentReference"],
        ["view", "print"],
    ),
    (
        "bulk-export",
        "Bulk export, print or copy",
        "high",
        "exported, printed or copied {n} records of {p} patients {span} (export ×{n})",
        ["DocumentReference", "Binary"],
        ["export"],
    ),
    (
        "no-care-relationship",
        "Access with no care relationship",
        "low",
        "opened {p} patient record(s) with no care relationship {span}",
        ["Patient"],
        ["view"],
    ),
    (
        "role-resource-mismatch",
        "A clerk reading clinical content",
        "medium",
        "a clerk read clinical content (Observation ×{n}) of {p} patient(s) {span}",
        ["Observation"],
        ["view"],
    ),
]
_DEPTS = {"ORTH": "nurse", "CARD": "physician", "ONC": "nurse", "ED": "physician", "REC": "clerk"}


@functools.lru_cache(maxsize=4)
def _hash(password: str) -> str:
    # cheap argon2id parameters: tests log in often (the real default costs ~0.25 s a login)
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(password)


def feed_settings(password: str = PASSWORD, **kw: Any) -> FeedSettings:
    """Settings with one user per role (``ana`` analyst, ``sam`` supervisor, ``aud``
    auditor), all with ``password``."""
    h = _hash(password)
    users = tuple(User(name, h, role, name.capitalize()) for name, role in USERS.items())
    return FeedSettings(users=users, **kw)


def believable_alert(
    i: int, when: datetime | None = None, rnd: random.Random | None = None, **over: Any
) -> dict[str, Any]:
    """An alert shaped like the detectors' (findings, explanations, per-event evidence)."""
    rnd = rnd or random.Random(i)
    rule, title, level, template, resources, actions = _SCENARIOS[i % len(_SCENARIOS)]
    dept = list(_DEPTS)[i % len(_DEPTS)]
    user = f"u{1000 + (i * 37) % 400:04d}"
    start = (when or datetime(2026, 3, 2, 1, 40, tzinfo=TZ)) - timedelta(minutes=30)
    n_pat = 1 if rule in ("vip-snooping", "coworker-snooping", "sealed-record-touch") else 4
    patients = [f"p{rnd.randrange(10_000, 99_999):05d}" for _ in range(n_pat)]
    evidence: list[dict[str, Any]] = []
    for k in range(3 + i % 4 + (n_pat if n_pat > 1 else 0)):
        t = start + timedelta(minutes=4 * k + rnd.randrange(0, 3), seconds=rnd.randrange(60))
        evidence.append(
            {
                "event_id": f"ev-{i}-{k}",
                "ts": t.isoformat(),
                "patient_id": patients[k % n_pat],
                "action": rnd.choice(actions),
                "resource_type": rnd.choice(resources),
                "workstation": f"WS-{dept}-{1 + (i + k // 3) % 9:02d}",
                "rules": [rule],
            }
        )
    span = f"{evidence[0]['ts'][11:16]}–{evidence[-1]['ts'][11:16]}"
    reason = template.format(n=len(evidence), p=n_pat, span=span, dept=dept)
    reason = reason[:1].upper() + reason[1:]
    alert = {
        "alert_id": alert_id_for(user, evidence[0]["event_id"]),
        "detector": [rule],
        "severity": level,
        "score": round(0.55 + rnd.random() * 0.44, 4),
        "user_id": user,
        "patient_ids": patients,
        "event_ids": [e["event_id"] for e in evidence],
        "first_seen": evidence[0]["ts"],
        "last_seen": evidence[-1]["ts"],
        "reason": reason,
        "department_id": dept,
        "role": _DEPTS[dept],
        "risk": round(1 + rnd.random() * 3, 4),
        "version": 1,
        "status": "open",
        "findings": [
            {
                "rule": rule,
                "title": title,
                "level": level,
                "events": len(evidence),
                "patients": n_pat,
                "reason": reason,
            }
        ],
        "explanations_checked": list(REASONS),
        "model_versions": {},
        "evidence": evidence,
    }
    alert.update(over)
    return alert


class FeedClient:
    """An httpx client logged in to a running feed as one user."""

    def __init__(
        self,
        base_url: str,
        username: str | None = None,
        password: str = PASSWORD,
        verify: Any = True,
    ):
        import httpx

        self.http = httpx.Client(
            base_url=base_url, follow_redirects=False, timeout=10, verify=verify
        )
        self.csrf = ""
        self.landing = ""
        if username is not None:
            r = self.login(username, password)
            if r.status_code != 303:
                raise AssertionError(f"login as {username} failed: {r.status_code}")

    def login_token(self) -> str:
        r = self.http.get("/login")
        m = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
        assert m, "no CSRF token on the login page"
        return m.group(1)

    def login(self, username: str, password: str = PASSWORD) -> Any:
        tok = self.login_token()
        r = self.http.post(
            "/login", data={"username": username, "password": password, "csrf_token": tok}
        )
        return self._signed_in(r)

    def send_code(self, page: Any, code: str) -> Any:
        """The second step of a login: ``code`` on the code page ``page`` (the response
        to :meth:`login` for a user with a second factor)."""
        m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert m and 'action="/login/code"' in page.text, "not the code page"
        r = self.http.post("/login/code", data={"code": code, "csrf_token": m.group(1)})
        return self._signed_in(r)

    def _signed_in(self, r: Any) -> Any:
        if r.status_code == 303:
            page = self.http.get("/", headers={"accept": "text/html"})
            self.landing = page.text  # the first page after signing in (its notices)
            m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
            self.csrf = m.group(1) if m else ""
        return r

    def get(self, path: str, **kw: Any) -> Any:
        headers = {"accept": "text/html", **kw.pop("headers", {})}
        return self.http.get(path, headers=headers, **kw)

    def post(self, path: str, data: dict[str, Any] | None = None, csrf: bool = True) -> Any:
        body = dict(data or {})
        if csrf:
            body["csrf_token"] = self.csrf
        return self.http.post(path, data=body)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FeedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunningFeed:
    """A feed over a fresh SQLite alert store in ``directory``, served on a free loopback
    port with :func:`feed_settings` (``**settings`` over them), and the clients made for it;
    :meth:`close` closes them all."""

    def __init__(self, directory: Any, **settings: Any) -> None:
        from pipeline.alerting.store import AlertStore
        from pipeline.web.server import serve_feed

        self.store = AlertStore(f"sqlite:///{directory}/alerts.sqlite3")
        self.url, self.stop = serve_feed(self.store, feed_settings(**settings))
        self.clients: list[FeedClient] = []

    def client(self, username: str | None = None) -> FeedClient:
        c = FeedClient(self.url, username)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.stop()
        self.store.close()
