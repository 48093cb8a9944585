"""The monitor's own accounts (``GET /users``): who may use the feed, in which role, how
they sign in, and how their sign-ins have gone.

The privacy office is asked who can read its cases, and a compliance review asks the
same of every system holding patient data. This page answers from the config (the users,
their roles, password or directory, second factor) and the audit log (last sign-in and
its address, failed sign-ins and lockouts in the last :data:`WINDOW_DAYS` days, and the
changes of users applied from the config file), with whom the throttle holds locked now.
Failed sign-ins under names that are no user are counted by address: many of them from
one address is password spraying. Supervisors and auditors read it; it names no patient.

The sessions page (``GET /sessions``) lists every user's own open sessions (browser,
address, when signed in, last active) with "Sign out everywhere else", and for
supervisors and auditors everyone's, and the sessions ended in the last day (when, by
whom, why). A supervisor ends anyone's session there (``sessions.end``): it ends in every
feed process within a second or two, an open live page included (it goes to the login,
which says a supervisor ended it). Every ending is in the audit log (``session.end``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from emrwatch.timeutil import zone
from pipeline.alerting.feedstate import FeedSession
from pipeline.web.app import UNKNOWN_ACTOR, _feed, db, flash
from pipeline.web.auth import _key, requires
from pipeline.web.sessions import (
    ENDED_BY_SUPERVISOR,
    ENDED_BY_USER,
    IDLE,
    browser_label,
    live_sessions,
    open_sessions,
)
from pipeline.web.settings import FeedSettings
from pipeline.web.users import allowed
from pipeline.web.views import audit_detail

PERMISSION = "users.read"
WINDOW_DAYS = 30
MAX_ENTRIES = 20_000  # sign-in entries read for the window (newest first)
SIGN_INS = ("login", "login.failed", "login.locked")


def routes() -> list[BaseRoute]:
    return [
        Route("/users", users_page, methods=["GET"]),
        Route("/sessions", sessions_page, methods=["GET"]),
        Route("/sessions/end", end_one, methods=["POST"]),
        Route("/sessions/others", end_others, methods=["POST"]),
    ]


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
    open_sessions: int = 0


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
    rows = await db(accounts, feed.settings, entries, feed.guard.users.locked)
    by_name = {a.username: a for a in rows}
    for sess in await db(open_sessions, feed.store, feed.settings):
        if sess.username in by_name:
            by_name[sess.username].open_sessions += 1
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


# ---------------------------------------------------------------------------- sessions
ENDED_SHOWN_H = 24  # sessions ended this recently are listed


@dataclass(frozen=True)
class SessionRow:
    """One session as the sessions page shows it."""

    session_id: str
    username: str
    role: str
    browser: str
    address: str
    started_at: datetime
    seen_at: datetime
    ended_at: datetime | None = None
    ended_by: str = ""
    end_reason: str = ""
    this_browser: bool = False


def _started(store: Any, settings: FeedSettings, username: str | None) -> list[FeedSession]:
    """Sessions, open or ended, started within the longest a session lasts (and the
    last day)."""
    back = max(settings.session_max_age_s, ENDED_SHOWN_H * 3600)
    after = store.clock() - timedelta(seconds=back)
    return list(store.sessions_started(after, username, False))


def _row(settings: FeedSettings, s: FeedSession, mine: str) -> SessionRow:
    user = settings.user(s.username)
    return SessionRow(
        s.session_id,
        s.username,
        user.role if user is not None else "(no longer a user)",
        browser_label(s.agent),
        s.address,
        s.started_at,
        s.seen_at,
        s.ended_at,
        s.ended_by or "",
        s.end_reason or "",
        s.session_id == mine,
    )


@requires("feed.read")
async def sessions_page(request: Request) -> Response:
    feed = _feed(request)
    user = request.state.user
    settings = feed.settings
    mine = _key(request)
    everyone = allowed(user.role, PERMISSION)
    rows = await db(_started, feed.store, settings, None if everyone else user.username)
    now = feed.store.clock()
    live = live_sessions(settings, rows, now)
    own = [_row(settings, s, mine) for s in live if s.username == user.username]
    others = [_row(settings, s, mine) for s in live] if everyone else []
    ended: list[SessionRow] = []
    if everyone:
        cut = now - timedelta(hours=ENDED_SHOWN_H)
        ended = [
            _row(settings, s, mine)
            for s in rows
            if s.ended_at is not None and s.ended_at > cut and s.end_reason != IDLE
        ]
    tz = zone(settings.timezone)
    return feed.page(
        request,
        "sessions.html",
        {
            "own": own,
            "everyone": others,
            "ended": ended,
            "may_list": everyone,
            "may_end": allowed(user.role, "sessions.end"),
            "ended_hours": ENDED_SHOWN_H,
            "local": lambda dt: dt.astimezone(tz).strftime("%Y-%m-%d %H:%M"),
            "timezone": settings.timezone,
        },
    )


@requires("sessions.end", csrf=True)
async def end_one(request: Request) -> Response:
    """A supervisor ends someone's session (every feed process, every copy of its cookie)."""
    feed = _feed(request)
    user = request.state.user
    form = await request.form()
    key = str(form.get("session_id") or "")
    reason = str(form.get("reason") or "").strip()[:200]
    target = await db(feed.store.session, key) if key else None
    if target is None:
        return PlainTextResponse("no such session", status_code=404)
    ended = await db(feed.store.session_end, key, user.username, ENDED_BY_SUPERVISOR)
    feed.sessions.ended(key, ENDED_BY_SUPERVISOR)
    if ended:
        detail = {
            "user": target.username,
            "address": target.address,
            "browser": browser_label(target.agent),
            "session": key[:12],
        }
        if reason:
            detail["reason"] = reason
        await db(feed.store.record_access, user.username, "session.end", None, detail)
        flash(request, "ok", f"Ended {target.username}'s session ({detail['browser']}, "
                             f"{target.address}).")  # fmt: skip
    else:
        flash(request, "info", f"{target.username}'s session had ended already.")
    return RedirectResponse("/sessions", status_code=303)


@requires("feed.read", csrf=True)
async def end_others(request: Request) -> Response:
    """A user signs out of every session of theirs but this one."""
    feed = _feed(request)
    user = request.state.user
    mine = _key(request)
    n = await db(feed.store.sessions_end_user, user.username, user.username, ENDED_BY_USER, mine)
    for s in await db(_started, feed.store, feed.settings, user.username):
        if s.session_id != mine:
            feed.sessions.ended(s.session_id, ENDED_BY_USER)
    if n:
        await db(feed.store.record_access, user.username, "session.end", None,
                 {"user": user.username, "others": n})  # fmt: skip
    flash(request, "ok", f"Signed out of {n} other session{'s' if n != 1 else ''}."
          if n else "You had no other session.")  # fmt: skip
    return RedirectResponse("/sessions", status_code=303)
