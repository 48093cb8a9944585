"""The monitor's own accounts (``GET /users``): who may use the feed, in which role, how
they sign in, and how their sign-ins have gone.

The privacy office is asked who can read its cases, and a compliance review asks the
same of every system holding patient data. This page answers from the config (the users,
their roles, password or directory, second factor) and the audit log (last sign-in and
its address, failed sign-ins and lockouts in the last :data:`WINDOW_DAYS` days, and the
changes of users applied from the config file), with whom the throttle holds locked now.
Failed sign-ins under names that are no user are counted by address: many of them from
one address is password spraying. Supervisors and auditors read it; it names no patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from emrwatch.timeutil import zone
from pipeline.web.app import UNKNOWN_ACTOR, _feed, db
from pipeline.web.auth import requires
from pipeline.web.settings import FeedSettings
from pipeline.web.views import audit_detail

PERMISSION = "users.read"
WINDOW_DAYS = 30
MAX_ENTRIES = 20_000  # sign-in entries read for the window (newest first)
SIGN_INS = ("login", "login.failed", "login.locked")


def routes() -> list[BaseRoute]:
    return [Route("/users", users_page, methods=["GET"])]


@dataclass
class Account:
    """One configured user, with their sign-ins in the window."""

    username: str
    display_name: str
    role: str
    sign_in: str  # "password" or "directory"
    second_factor: bool
    last_sign_in: datetime | None = None
    last_address: str = ""
    sign_ins: int = 0
    failures: int = 0
    failure_addresses: dict[str, int] = field(default_factory=dict)
    lockouts: int = 0
    locked_now: bool = False


def accounts(settings: FeedSettings, entries: list[Any], locked: Any) -> list[Account]:
    """The configured users, with what ``entries`` (audit entries of sign-ins, newest
    first) say of them; ``locked(username)`` says whether the throttle holds one now."""
    out = {
        u.username: Account(
            u.username,
            u.display_name,
            u.role,
            "directory" if u.directory else "password",
            bool(u.totp_secret),
            locked_now=bool(locked(u.username)),
        )  # fmt: skip
        for u in settings.users
    }
    for e in entries:
        a = out.get(e.actor)
        if a is None:
            continue
        detail = audit_detail(e.detail)
        if e.action == "login":
            a.sign_ins += 1
            if a.last_sign_in is None:
                a.last_sign_in, a.last_address = e.at, str(detail.get("address") or "")
        elif e.action == "login.failed":
            a.failures += 1
            addr = str(detail.get("address") or "?")
            a.failure_addresses[addr] = a.failure_addresses.get(addr, 0) + 1
        elif e.action == "login.locked":
            a.lockouts += 1
    return sorted(out.values(), key=lambda a: (-a.failures, a.username))


def unknown_names(entries: list[Any]) -> list[tuple[str, int]]:
    """Addresses that tried names that are no user, with how many times, most first."""
    by: dict[str, int] = {}
    for e in entries:
        if e.actor == UNKNOWN_ACTOR and e.action == "login.failed":
            addr = str(audit_detail(e.detail).get("address") or "?")
            by[addr] = by.get(addr, 0) + 1
    return sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))


@requires(PERMISSION)
async def users_page(request: Request) -> Response:
    feed = _feed(request)
    since = datetime.now(UTC) - timedelta(days=WINDOW_DAYS)
    entries = await db(feed.store.audit_log, None, None, since, MAX_ENTRIES, SIGN_INS)
    changes = await db(feed.store.audit_log, None, None, None, 20, ("users.reload",))
    tz = zone(feed.settings.timezone)
    rows = accounts(feed.settings, entries, feed.guard.users.locked)
    reloads = [(e.at, audit_detail(e.detail)) for e in changes]
    return feed.page(
        request,
        "users.html",
        {
            "accounts": rows,
            "unknown": unknown_names(entries),
            "reloads": reloads,
            "window_days": WINDOW_DAYS,
            "require_totp": feed.settings.require_totp,
            "local": lambda dt: dt.astimezone(tz).strftime("%Y-%m-%d %H:%M"),
            "timezone": feed.settings.timezone,
            "complete": len(entries) < MAX_ENTRIES,
        },
    )
