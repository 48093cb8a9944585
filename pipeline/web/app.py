"""The feed's ASGI application: login, the live feed, its event stream, the audit log.

The case view and its actions are in :mod:`pipeline.web.cases`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emrwatch.timeutil import zone
from pipeline.alerting import schema as t
from pipeline.alerting.records import SORTS, TRIAGE_STATES, AlertFilter, AlertSummary
from pipeline.alerting.render import SEVERITY_ORDER, spreadsheet_safe
from pipeline.alerting.store import AlertStore
from pipeline.web import views
from pipeline.web.auth import (
    CSRF_FIELD,
    LoginGuard,
    await_code,
    awaiting_code,
    client_address,
    csrf_ok,
    csrf_token,
    current_user,
    end_session,
    ensure_session,
    log_in,
    may_see_patients,
    requires,
    safe_next,
    signed_out_why,
    wants_html,
)
from pipeline.web.changes import Change, ChangeFeed, matches, patient_ids_of
from pipeline.web.directory import DirectoryUnavailable
from pipeline.web.sessions import (
    ENDED_BY_SUPERVISOR,
    ENDED_BY_USER,
    IDLE,
    SIGNED_OUT,
    SessionRegistry,
    keep_syncing,
    open_sessions,
    seen_write_every,
)
from pipeline.web.settings import FeedSettings, User, trusted_networks
from pipeline.web.users import allowed, burn_verify

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
SESSION_CHECK_S = 1.0  # an open event stream looks at its session this often
OPTIONS_TTL_S = 60.0  # the filter menus' department and detector lists are this fresh
R = TypeVar("R")


async def db(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """A store call, off the event loop (SQLAlchemy is synchronous)."""
    return await run_in_threadpool(fn, *args, **kwargs)


# ---------------------------------------------------------------------------- headers
class SecurityHeaders:
    """No inline script, no framing, no caching of pages with patient data."""

    CSP = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app = app
        self.hsts = hsts  # served over HTTPS: browsers must never try plain HTTP again

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [
                    (b"content-security-policy", self.CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if not scope["path"].startswith("/static/"):
                    extra.append((b"cache-control", b"no-store"))
                if self.hsts:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------------------- filters
FILTER_KEYS = (
    "severity", "department", "detector", "state", "status", "user", "assignee", "patient",
    "from", "to",
)  # fmt: skip


def parse_filters(
    qp: QueryParams, username: str = "", see_patients: bool = False, timezone: str = "UTC"
) -> tuple[AlertFilter, dict[str, list[str]]]:
    """Feed filters from the query string (each key may repeat); raises ValueError.
    ``assignee=me`` means ``username``, ``assignee=nobody`` unassigned cases. ``patient``
    needs ``see_patients`` (a reader who sees patients masked may not probe for one).
    ``from``/``to``: the first and last day (the hospital's ``timezone``) of last_seen."""
    chosen = {k: [v for v in qp.getlist(k) if v] for k in FILTER_KEYS}
    if chosen["patient"] and not see_patients:
        raise ValueError("filtering by patient needs the right to see patients (supervisor)")
    bounds = {k: _day_start(chosen[k][-1], k, timezone) for k in ("from", "to") if chosen[k]}
    if "to" in bounds:
        bounds["to"] += timedelta(days=1)  # the last day is included
    late = "late" in chosen["state"]  # a triage choice: untouched past its target
    assignees = [username if a == "me" else a for a in chosen["assignee"] if a != "nobody"]
    f = AlertFilter(
        severity=chosen["severity"],
        department_id=chosen["department"],
        detector=chosen["detector"],
        state=[s for s in chosen["state"] if s != "late"],
        status=chosen["status"],
        user_id=chosen["user"],
        late=late,
        assignee=assignees,
        unassigned="nobody" in chosen["assignee"],
        patient_id=chosen["patient"],
        last_seen_from=bounds.get("from"),
        last_seen_to=bounds.get("to"),
    )
    return f, chosen


def _day_start(text: str, key: str, timezone: str) -> datetime:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{key}: {text!r} is not a date (YYYY-MM-DD)") from None
    return datetime.combine(day, dtime(0), tzinfo=zone(timezone))


class FilterOptions:
    """Departments and detectors present in the store, for the filter menus (cached)."""

    def __init__(self, store: AlertStore) -> None:
        self.store = store
        self._at = 0.0
        self._value: dict[str, list[str]] = {"department": [], "detector": []}

    def get(self) -> dict[str, list[str]]:
        if time.monotonic() - self._at > OPTIONS_TTL_S:
            a, d = t.alerts, t.alert_detectors
            with self.store.read() as conn:
                depts = conn.execute(select(a.c.department_id).distinct()).scalars().all()
                dets = conn.execute(select(d.c.detector).distinct()).scalars().all()
            self._value = {
                "department": sorted(x for x in depts if x),
                "detector": sorted(x for x in dets if x),
            }
            self._at = time.monotonic()
        return self._value


# ---------------------------------------------------------------------------- the app
class Feed:
    """What the endpoints share (``app.state.feed_app``)."""

    def __init__(self, store: AlertStore, settings: FeedSettings, secret: str) -> None:
        self.store = store
        self.settings = settings
        self.changes = ChangeFeed(store, settings.poll_interval_s)
        self.options = FilterOptions(store)
        self.guard = LoginGuard(settings, store, secret)
        self.proxies = trusted_networks(settings.trusted_proxies)
        self.sessions = SessionRegistry(store, settings.idle_timeout_s, self.guard.longest_window)
        env = Environment(
            loader=FileSystemLoader(str(HERE / "templates")),
            autoescape=select_autoescape(default=True),
        )
        env.globals.update(
            SEVERITIES=SEVERITY_ORDER,
            TRIAGE_STATES=TRIAGE_STATES,
            STATE_LABELS=views.STATE_LABELS,
            CSRF_FIELD=CSRF_FIELD,
            allowed=allowed,
            title=settings.title,
            asset_v=_asset_version(),
        )
        self.templates = Jinja2Templates(env=env)
        self.row_template = env.get_template("_row.html")

    def reconfigure(self, settings: FeedSettings) -> None:
        """Apply reloaded settings (:mod:`pipeline.web.reload`): the users and the sign-in
        policy, read per request or rebuilt here (the throttles keep their failures)."""
        self.settings = settings
        self.guard.configure(settings)
        self.proxies = trusted_networks(settings.trusted_proxies)
        self.sessions.write_every_s = seen_write_every(settings.idle_timeout_s)

    def triagers(self) -> list[str]:
        """The users a case may be assigned to (their role triages)."""
        return [u.username for u in self.settings.users if allowed(u.role, "triage")]

    def open_sessions(self) -> int:
        """Sessions signed in now, in every feed process (blocking: reads the store)."""
        return len(open_sessions(self.store, self.settings))

    def page(self, request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> Response:
        user = current_user(request)
        flashes = request.session.pop("flash", []) if "flash" in request.session else []
        full = {
            "user": user,
            "csrf": csrf_token(request),
            "flashes": flashes,
            "nav": name.split(".")[0],
            "idle_timeout_s": self.settings.idle_timeout_s if user is not None else 0,
            **ctx,
        }
        return self.templates.TemplateResponse(request, name, full, status_code=status)

    def rows_html(self, rows: list[views.Row], pick: bool = False) -> str:
        """The rows as the feed's table has them; ``pick``: with a checkbox each, for a
        reader who may triage several cases at once."""
        return "".join(self.row_template.render(r=r, pick=pick) for r in rows)

    def rows(self, summaries: list[AlertSummary], unmasked: bool) -> list[views.Row]:
        pids = patient_ids_of(self.store, [s.alert_id for s in summaries]) if not unmasked else {}
        now = self.store.clock()
        return [views.row(s, pids.get(s.alert_id, ()), unmasked, now) for s in summaries]


def _asset_version() -> str:
    """A fingerprint of the static files: their URLs change when they do (no stale JS)."""
    h = hashlib.sha256()
    for f in sorted((HERE / "static").iterdir()):
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def flash(request: Request, kind: str, text: str) -> None:
    request.session["flash"] = [*request.session.get("flash", []), [kind, text]][-5:]


def _feed(request: Request) -> Feed:
    return request.app.state.feed_app  # type: ignore[no-any-return]


async def forbidden(request: Request, user: User, permission: str) -> Response:
    """The 403 answer: a page for browsers, a line of text for scripts."""
    log.info(
        "feed: %s (%s) refused %s %s", user.username, user.role, request.method, request.url.path
    )
    if permission == "csrf":
        heading = "Page out of date"
        text = "The form's security token did not match: reload the page and try again."
        plain = "CSRF token missing or wrong"
    else:
        heading = "Not allowed"
        text = f"Your role ({user.role}) may not do this ({permission})."
        plain = f"forbidden: role {user.role} lacks {permission}"
    if wants_html(request):
        ctx = {"heading": heading, "message": text}
        return _feed(request).page(request, "error.html", ctx, status=403)
    return PlainTextResponse(plain, status_code=403)


# ---------------------------------------------------------------------------- login
#: what the login page says of a session that ended without its user signing out
ENDED_NOTICES = {
    "supervisor": "A supervisor ended your session. Sign in again if you still need the feed.",
    "elsewhere": "This session was signed out from another browser of yours.",
}


async def login_form(request: Request) -> Response:
    await ensure_session(request)
    if current_user(request) is not None:
        return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    if request.query_params.get("restart"):
        request.session.clear()
    elif (pending := awaiting_code(request)) is not None:  # a reload between the two steps
        ctx = {"step": "code", "username": pending[0].username}
        return _feed(request).page(request, "login.html", ctx)
    ctx = {"next": safe_next(request.query_params.get("next")), "error": ""}
    if request.query_params.get("idle"):
        minutes = max(1, round(_feed(request).settings.idle_timeout_s / 60))
        ctx["notice"] = f"You were signed out after {minutes} min without activity."
    elif (ended := request.query_params.get("ended", "")) in ENDED_NOTICES:
        ctx["notice"] = ENDED_NOTICES[ended]
    return _feed(request).page(request, "login.html", ctx)


async def login(request: Request) -> Response:
    feed = _feed(request)
    form = await request.form()
    if not await csrf_ok(request):
        return PlainTextResponse("CSRF token missing or wrong; reload the login page", 403)
    username = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    nxt = safe_next(str(form.get("next") or "/"))
    address = client_address(request, feed.proxies)
    user = feed.settings.user(username)
    error = ""
    refused = await db(feed.guard.locked, username, address)
    if refused:
        error = LOCKED
    elif user is None:
        await run_in_threadpool(burn_verify, password)
        error = "Unknown user or wrong password."
    else:
        try:
            if not await run_in_threadpool(feed.settings.check_password, user, password):
                error = "Unknown user or wrong password."
        except DirectoryUnavailable as exc:
            # not the user's fault: not counted against them
            log.error("feed: the hospital directory cannot be reached: %s", exc)
            ctx = {"next": nxt, "username": username,
                   "error": "The hospital directory cannot be reached. Try again, or call IT."}  # fmt: skip
            return feed.page(request, "login.html", ctx, status=503)
    if error or user is None:
        why = "locked" if refused else ("unknown user" if user is None else "wrong password")
        await _failed(request, user, username, address, why)
        ctx = {"next": nxt, "error": error, "username": username}
        return feed.page(request, "login.html", ctx, status=401)
    if user.totp_secret:
        # the password is right; the failures are forgiven only once the code is too
        await_code(request, user, nxt)
        return feed.page(request, "login.html", {"step": "code", "username": user.username})
    return await _logged_in(request, user, nxt, {"role": user.role, "address": address})


LOCKED = "Too many failed attempts. Wait a few minutes and try again."


async def _failed(request: Request, user: User | None, typed: str, address: str, why: str) -> None:
    """Count a failed sign-in, log it, and write it to the audit log (``login.failed``;
    ``login.locked`` when it locks the user or the address). An attempt refused while
    locked is counted but not audited again; a name that is no user is never written
    (people type their password there)."""
    feed = _feed(request)
    refused = why == "locked"
    locked = await db(feed.guard.failed, typed, address, refused)
    actor = user.username if user is not None else UNKNOWN_ACTOR
    log.warning("feed: failed sign-in (%s) for %s from %s", why, actor, address)
    detail: dict[str, Any] = {"address": address, "reason": why}
    if not refused:
        await db(feed.store.record_access, actor, "login.failed", None, detail)
    if locked:
        log.warning("feed: sign-in locked (%s) for %s from %s", ", ".join(locked), actor, address)
        await db(
            feed.store.record_access, actor, "login.locked", None, {**detail, "locked": locked}
        )


UNKNOWN_ACTOR = "(unknown user)"


async def _logged_in(request: Request, user: User, nxt: str, detail: dict[str, Any]) -> Response:
    """The password (and the code) were right: forgive the user's failures, start the
    session, audit the login and tell the user of the sign-ins since their last."""
    feed = _feed(request)
    await db(feed.guard.succeeded, user.username)
    before = await db(
        feed.store.audit_log, None, user.username, None, SIGN_IN_LOOKBACK, SIGN_IN_ACTIONS
    )
    await log_in(request, user, str(detail.get("address") or ""))
    await db(feed.store.record_access, user.username, "login", None, detail)
    log.info("feed: %s logged in (%s)", user.username, user.role)
    notice = views.sign_in_notice(before, zone(feed.settings.timezone))
    if notice is not None:
        flash(request, *notice)
    return RedirectResponse(nxt, status_code=303)


SIGN_IN_LOOKBACK = 200  # audit entries of a user read for their sign-in notice ...
SIGN_IN_ACTIONS = ("login", "login.failed")  # ... of these actions


async def login_code(request: Request) -> Response:
    """The second step of a login with a second factor: the authenticator's code."""
    from pipeline.web.totp import matching_step

    feed = _feed(request)
    form = await request.form()
    if not await csrf_ok(request):
        return PlainTextResponse("CSRF token missing or wrong; reload the login page", 403)
    pending = awaiting_code(request)
    if pending is None:  # expired, never started, or the user changed meanwhile
        request.session.clear()
        ctx = {"next": "/", "error": "The sign-in took too long. Sign in again."}
        return feed.page(request, "login.html", ctx, status=401)
    user, nxt = pending
    address = client_address(request, feed.proxies)
    error = ""
    refused = await db(feed.guard.locked, user.username, address)
    if refused:
        error = LOCKED
    else:
        step = matching_step(user.totp_secret, str(form.get("code") or ""), time.time())
        if step is None:
            error = "Wrong code. Type the 6 digits your authenticator shows now."
        elif not await db(feed.store.code_step_use, user.username, step):
            error = "That code was used already. Wait for the next one."
    if error:
        why = "locked" if refused else "wrong code"
        await _failed(request, user, user.username, address, why)
        if await db(feed.guard.holds, user.username, address):
            request.session.clear()  # start again from the password, once the lockout ends
            ctx = {"next": nxt, "error": LOCKED, "username": user.username}
            return feed.page(request, "login.html", ctx, status=401)
        ctx = {"step": "code", "username": user.username, "error": error}
        return feed.page(request, "login.html", ctx, status=401)
    detail = {"role": user.role, "second_factor": "totp", "address": address}
    return await _logged_in(request, user, nxt, detail)


async def logout(request: Request) -> Response:
    """Sign out: the session ends in the store, so no copy of its cookie works again."""
    await ensure_session(request)
    user = current_user(request)
    if not await csrf_ok(request):
        return PlainTextResponse("CSRF token missing or wrong", status_code=403)
    if user is not None:
        await db(_feed(request).store.record_access, user.username, "logout")
    await end_session(request, SIGNED_OUT, user.username if user is not None else "")
    return RedirectResponse("/login", status_code=303)


# ---------------------------------------------------------------------------- feed
def _page_params(request: Request) -> tuple[AlertFilter, dict[str, list[str]], str, int]:
    user = request.state.user
    tz = _feed(request).settings.timezone
    f, chosen = parse_filters(
        request.query_params, user.username, allowed(user.role, "patients.see"), tz
    )
    sort = request.query_params.get("sort") or "last_seen"
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {SORTS}")
    size = _feed(request).settings.page_size
    limit = int(request.query_params.get("limit") or size)
    return f, chosen, sort, max(1, min(limit, 200))


async def _audit_patient_search(request: Request, f: AlertFilter) -> None:
    """A look-up of the cases on named patients is itself audited (``patient.search``),
    once per first page (paging on is not a new search)."""
    if f.patient_id and not request.query_params.get("cursor"):
        user: User = request.state.user
        detail = {"patients": list(f.patient_id), "role": user.role}
        await db(_feed(request).store.record_access, user.username, "patient.search", None, detail)


@requires("feed.read")
async def feed_page(request: Request) -> Response:
    feed = _feed(request)
    try:
        f, chosen, sort, limit = _page_params(request)
    except ValueError as exc:
        return feed.page(request, "error.html", {"heading": "Bad filter", "message": str(exc)}, 400)
    since = feed.changes.cursor  # before reading: a change after this reaches the stream
    user: User = request.state.user
    unmasked = may_see_patients(request, user)
    await _audit_patient_search(request, f)
    try:
        page = await db(feed.store.page, f, request.query_params.get("cursor"), limit, sort)
    except ValueError as exc:  # a cursor from another sort order, or garbage
        return feed.page(request, "error.html", {"heading": "Bad page", "message": str(exc)}, 400)
    total = await db(feed.store.count, f)
    options = await db(feed.options.get)
    for k in ("department", "detector"):
        options = {**options, k: sorted(set(options[k]) | set(chosen[k]))}
    rows = await db(feed.rows, page.items, unmasked)
    pairs = [(k, v) for k, vals in chosen.items() for v in vals]
    if sort != "last_seen":
        pairs.append(("sort", sort))
    return feed.page(
        request,
        "feed.html",
        {
            "rows": rows,
            "rows_html": feed.rows_html(rows, allowed(user.role, "triage")),
            "pick": allowed(user.role, "triage"),
            "triagers": feed.triagers(),
            "back": str(request.url.query),
            "next_cursor": page.next_cursor or "",
            "chosen": chosen,
            "sort": sort,
            "limit": limit,
            "options": options,
            "total": total,
            "since": since,
            "stream_query": urlencode(pairs),
            "filtered": any(chosen.values()),
            "export_link": "/cases.csv?" + urlencode(pairs)
            if allowed(user.role, "case.export")
            else "",
        },
    )


#: cases one CSV export holds at most (the feed's filters narrow it)
MAX_EXPORT = 50_000
EXPORT_COLUMNS = (
    "alert_id", "severity", "first_seen", "last_seen", "user_id", "role", "department_id",
    "detectors", "n_events", "n_patients", "status", "state", "assignee", "verdict",
    "score", "reason",
)  # fmt: skip


@requires("case.export")
async def cases_csv(request: Request) -> Response:
    """The cases the feed's filters select, as CSV (for HR, compliance, the board): the
    list's columns and the triage outcome, reasons masked as this reader sees them.
    Audited (``cases.export``, with the filters and the count)."""
    feed = _feed(request)
    try:
        f, chosen, sort, _limit = _page_params(request)
    except ValueError as exc:
        return PlainTextResponse(str(exc), status_code=400)
    user: User = request.state.user
    await _audit_patient_search(request, f)
    summaries = await db(_all_cases, feed.store, f, sort)
    unmasked = may_see_patients(request, user)
    rows = await db(feed.rows, summaries, unmasked)
    detail = {"filters": {k: v for k, v in chosen.items() if v}, "cases": len(rows),
              "role": user.role}  # fmt: skip
    await db(feed.store.record_access, user.username, "cases.export", None, detail)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(EXPORT_COLUMNS)
    for s, r in zip(summaries, rows, strict=True):
        w.writerow([spreadsheet_safe(v) for v in (
            s.alert_id, s.severity, s.first_seen, s.last_seen, s.user_id, s.role,
            s.department_id, " ".join(s.detectors), s.n_events, s.n_patients, s.status,
            s.state, s.assignee or "", s.verdict or "", f"{s.score:.4f}", r.reason,
        )])  # fmt: skip
    return _csv_download(buf, "cases")


def _csv_download(buf: io.StringIO, what: str) -> Response:
    """A CSV file to download, named ``emrwatch-WHAT-<UTC time>.csv``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    return Response(
        buf.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="emrwatch-{what}-{stamp}.csv"'},
    )


def _all_cases(store: AlertStore, f: AlertFilter, sort: str) -> list[AlertSummary]:
    out: list[AlertSummary] = []
    cursor = None
    while len(out) < MAX_EXPORT:
        page = store.page(f, cursor, 500, sort)
        out += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    return out[:MAX_EXPORT]


@requires("feed.read")
async def api_alerts(request: Request) -> Response:
    """One page of the feed as JSON (masked like the page); ``html`` is the rows rendered."""
    feed = _feed(request)
    try:
        f, _chosen, sort, limit = _page_params(request)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    await _audit_patient_search(request, f)
    try:
        page = await db(feed.store.page, f, request.query_params.get("cursor"), limit, sort)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    user: User = request.state.user
    rows = await db(feed.rows, page.items, may_see_patients(request, user))
    return JSONResponse(
        {
            "items": [r.to_dict() for r in rows],
            "next_cursor": page.next_cursor,
            "html": feed.rows_html(rows, allowed(user.role, "triage")),
        }
    )


def _why_word(why: str) -> str:
    """The ``signed-out`` event's ``why``, which the page passes on to the login page."""
    return {IDLE: "idle", ENDED_BY_SUPERVISOR: "supervisor", ENDED_BY_USER: "elsewhere"}.get(
        why, "signed-out"
    )


def _sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@requires("feed.read", csrf=True)
async def alive(request: Request) -> Response:
    """The page saw its user type, click or scroll (``feed.idle_timeout_s``): the session
    is in use though no page was loaded."""
    return Response(status_code=204)


@requires("feed.read", csrf=True, passive=True)
async def idle_out(request: Request) -> Response:
    """The page saw nobody for the automatic logoff's time, give or take its timer: the
    session ends (as if the server's timeout had passed) before the page leaves."""
    await end_session(request, IDLE)
    return Response(status_code=204)


@requires("feed.read", passive=True)
async def events(request: Request) -> Response:
    """Server-Sent Events: every change after ``since`` (or ``Last-Event-ID``), as the rows
    this reader's filters and role see; ``match: false`` tells the page to drop a row."""
    feed = _feed(request)
    user: User = request.state.user
    try:
        see = allowed(user.role, "patients.see")
        tz = feed.settings.timezone
        f, _chosen = parse_filters(request.query_params, user.username, see, tz)
    except ValueError as exc:
        return PlainTextResponse(str(exc), status_code=400)
    since = request.headers.get("last-event-id") or request.query_params.get("since") or None
    unmasked = may_see_patients(request, user)
    sub = feed.changes.subscribe(since)

    async def stream() -> AsyncIterator[str]:
        try:
            yield f"retry: 2000\n: connected as {user.username} at {feed.changes.cursor}\n\n"
            quiet_since = time.monotonic()
            while True:
                ch: Change | None | Literal[False]  # False: nothing for a while
                try:
                    wait = min(HEARTBEAT_S, SESSION_CHECK_S)
                    ch = await asyncio.wait_for(sub.queue.get(), wait)
                except TimeoutError:
                    ch = False
                if current_user(request) is None:  # signed out, idle, ended, changed in config
                    why = signed_out_why(request)
                    if why == IDLE:
                        await end_session(request, IDLE)
                    yield _sse("signed-out", {"idle": why == IDLE, "why": _why_word(why)})
                    return
                if ch is False:
                    if time.monotonic() - quiet_since >= HEARTBEAT_S:
                        quiet_since = time.monotonic()
                        yield ": keep-alive\n\n"
                    continue
                quiet_since = time.monotonic()
                if ch is None:
                    return
                if ch.kind == "reset":
                    yield _sse("reset", {"count": ch.count}, feed.changes.event_id(ch))
                    return
                s = ch.summary
                assert s is not None
                if not matches(f, s, feed.store.clock(), ch.patient_ids):
                    yield _sse(
                        "alert", {"alert_id": s.alert_id, "match": False}, feed.changes.event_id(ch)
                    )
                    continue
                r = views.row(s, ch.patient_ids, unmasked, feed.store.clock())
                data = {
                    "alert_id": s.alert_id,
                    "match": True,
                    "state": s.state,
                    "severity": s.severity,
                    "html": feed.rows_html([r], allowed(user.role, "triage")),
                }
                yield _sse("alert", data, feed.changes.event_id(ch))
        finally:
            feed.changes.unsubscribe(sub)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# ---------------------------------------------------------------------------- audit
#: the audit page's action filter
AUDIT_ACTIONS = (
    "case.view",
    "unmask",
    "login",
    "login.failed",
    "login.locked",
    "logout",
    "patient.search",
    "cases.export",
    "suppression.create",
    "report.view",
    "access_report",
    "access_review",
    "assessment",
    "session.end",
    "users.reload",
    "audit.verify",
    "audit.export",
    "case.export",
)


MAX_AUDIT_EXPORT = 100_000  # entries in one CSV export of the audit log


async def _audit_entries(request: Request, limit: int) -> list[Any]:
    """The newest ``limit`` audit entries the page's filters select: user, case, action,
    and days (hospital dates, ``to`` inclusive). ValueError names a bad date."""
    qp = request.query_params
    feed = _feed(request)
    tz = feed.settings.timezone
    start = _day_start(qp["from"], "from", tz) if qp.get("from") else None
    end = _day_start(qp["to"], "to", tz) + timedelta(days=1) if qp.get("to") else None
    action = qp.get("action") or ""
    return await db(
        feed.store.audit_log,
        qp.get("alert") or None, qp.get("actor") or None, start, limit,
        (action,) if action else None, end,
    )  # fmt: skip


@requires("audit.read")
async def audit_page(request: Request) -> Response:
    feed = _feed(request)
    qp = request.query_params
    try:
        limit = max(1, min(int(qp.get("limit") or 200), 1000))
    except ValueError:
        limit = 200
    try:
        entries = await _audit_entries(request, limit)
    except ValueError as exc:
        return PlainTextResponse(str(exc), status_code=400)
    return feed.page(
        request,
        "audit.html",
        {
            "entries": entries,
            "actor": qp.get("actor") or "",
            "alert": qp.get("alert") or "",
            "action": qp.get("action") or "",
            "from": qp.get("from") or "",
            "to": qp.get("to") or "",
            "query": request.url.query,
            "actions": AUDIT_ACTIONS,
            "head": await db(_audit_head, feed.store),
        },
    )


@requires("audit.read")
async def audit_csv(request: Request) -> Response:
    """The audit entries the page's filters select, oldest first, as CSV (for a compliance
    review of who used the monitor), each with its link in the hash chain. Audited
    (``audit.export``, with the filters and the count)."""
    feed = _feed(request)
    user: User = request.state.user
    try:
        entries = await _audit_entries(request, MAX_AUDIT_EXPORT)
    except ValueError as exc:
        return PlainTextResponse(str(exc), status_code=400)
    chosen = {k: v for k, v in request.query_params.items() if v and k != "limit"}
    detail = {"filters": chosen, "entries": len(entries), "role": user.role}
    await db(feed.store.record_access, user.username, "audit.export", None, detail)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "time_utc", "user", "action", "case", "detail", "chain"])
    for e in reversed(entries):
        w.writerow([spreadsheet_safe(v) for v in (
            e.id, e.at.isoformat(timespec="seconds"), e.actor, e.action, e.alert_id or "",
            e.detail, e.chain,
        )])  # fmt: skip
    return _csv_download(buf, "audit")


def _audit_head(store: AlertStore) -> tuple[int, str] | None:
    from pipeline.alerting.chain import head

    with store.read() as conn:
        return head(conn)


@requires("audit.read", csrf=True)
async def audit_verify(request: Request) -> Response:
    """Recompute the audit log's hash chain (:mod:`pipeline.alerting.chain`) and say on
    the audit page whether any entry was changed, removed or inserted; the check is
    itself audited."""
    from pipeline.alerting.chain import verify_store

    feed = _feed(request)
    user = request.state.user
    started = time.monotonic()
    check = await db(verify_store, feed.store)
    detail = {"ok": check.ok, "entries": check.entries, "broken": len(check.broken),
              "seconds": round(time.monotonic() - started, 2)}  # fmt: skip
    await db(feed.store.record_access, user.username, "audit.verify", None, detail)
    counts = ", ".join(f"{n} {name.replace('_', ' ')} entries" for name, n in check.entries.items())
    if check.ok:
        flash(request, "ok", "The chain is intact: no entry of the audit log or the triage "
              f"history was changed, removed or inserted ({counts}).")  # fmt: skip
    else:
        log.error("feed: the audit log's hash chain is broken: %s", detail)
        where = "; ".join(
            f"{b.table.replace('_', ' ')} #{b.entry_id}"
            + (f" ({b.at:%Y-%m-%d %H:%M:%S} UTC)" if b.at else "")
            + f" {b.why}"
            for b in check.broken[:3]  # the message rides in the session cookie: short
        )
        more = len(check.broken) - 3
        if more > 0:
            where += f"; and {more} more (emrwatch audit-verify names them all)"
        flash(request, "error", f"The chain is BROKEN at {len(check.broken)} place(s): "
              f"{where}. Keep the database as it is and tell the security officer.")  # fmt: skip
    return RedirectResponse("/audit", status_code=303)


@requires("report.read")
async def report_page(request: Request) -> Response:
    """The periodic privacy report (:mod:`pipeline.alerting.report`) for a chosen period;
    reading it is written to the audit log."""
    from pipeline.alerting.report import default_period, privacy_report

    feed = _feed(request)
    zone = feed.settings.timezone
    user = request.state.user
    start, end = default_period(zone)
    error = ""
    try:
        if request.query_params.get("from"):
            start = date.fromisoformat(request.query_params["from"])
        if request.query_params.get("to"):
            end = date.fromisoformat(request.query_params["to"])
        rep = await db(privacy_report, feed.store, start, end, zone)
    except ValueError as exc:
        error, rep = str(exc), None
    detail = {"from": start.isoformat(), "to": end.isoformat(), "role": user.role}
    await db(feed.store.record_access, user.username, "report.view", None, detail)
    return feed.page(
        request,
        "report.html",
        {
            "start": start.isoformat(),
            "end": end.isoformat(),
            "timezone": zone,
            "error": error,
            "fragment": rep.to_html_fragment() if rep is not None else "",
            "generated_at": rep.generated_at if rep is not None else "",
        },
        status=400 if error else 200,
    )


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def root_redirect(request: Request) -> Response:
    return RedirectResponse("/", status_code=303)


# ---------------------------------------------------------------------------- factory
def create_app(
    store: AlertStore,
    settings: FeedSettings | None = None,
    *,
    metrics_registry: CollectorRegistry | None = None,
    detection: Any = None,
    settings_path: str | Path | None = None,
) -> Starlette:
    """The feed as an ASGI app over ``store``; ``app.state.feed.notify()`` makes it look
    for changes at once (for writers in the same process). With ``metrics_registry``, the
    feed's own metrics are registered there and the registry is served at ``/metrics``.
    With ``settings_path``, the file ``settings`` came from, changes to its users are
    applied while the feed runs (:mod:`pipeline.web.reload`)."""
    from pipeline.web import access, accounts, cases

    settings = settings or FeedSettings()
    secret, where = settings.resolved_secret()
    feed = Feed(store, settings, secret)
    if where == "generated":
        log.info("feed: no session secret configured; sessions end when this server stops")
    if not settings.users:
        log.warning("feed: no users configured (feed.users): nobody can log in")

    reloader = None
    if settings_path is not None:
        from pipeline.web.reload import SettingsReloader

        reloader = SettingsReloader(settings_path, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await feed.changes.start()
        syncing = asyncio.create_task(keep_syncing(feed.sessions))
        watching = None
        if reloader is not None:
            from pipeline.web.reload import keep_reloading

            watching = asyncio.create_task(keep_reloading(app, reloader, store.record_access))
        try:
            yield
        finally:
            for task in (watching, syncing):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await feed.changes.stop()

    routes = [
        Route("/", feed_page),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/login/code", login_code, methods=["POST"]),
        Route("/api/alive", alive, methods=["POST"]),
        Route("/api/idle", idle_out, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/alerts", api_alerts),
        Route("/cases.csv", cases_csv),
        Route("/events", events),
        Route("/audit", audit_page),
        Route("/audit.csv", audit_csv),
        Route("/audit/verify", audit_verify, methods=["POST"]),
        Route("/reports", report_page),
        Route("/healthz", healthz),
        *cases.routes(),
        *access.routes(),
        *accounts.routes(),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    if metrics_registry is not None:
        from pipeline.web.metrics import FeedCollector, metrics_endpoint

        metrics_registry.register(
            FeedCollector(feed.changes, feed.guard, reloader, feed.open_sessions)
        )
        routes.append(Route("/metrics", metrics_endpoint(metrics_registry)))
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders, hsts=settings.tls),
            Middleware(
                SessionMiddleware,
                secret_key=secret,
                session_cookie="emrwatch_session",
                max_age=settings.session_max_age_s,
                same_site="lax",
                https_only=settings.https_only_cookies,
            ),
        ],
        lifespan=lifespan,
        exception_handlers={404: _not_found},
        max_body_size=1 << 20,
    )
    app.state.feed_app = feed
    app.state.feed = feed.changes
    app.state.settings = settings
    app.state.settings_reloader = reloader
    app.state.sessions = feed.sessions
    app.state.store = store
    app.state.forbidden = forbidden
    #: the detection configuration the access report judges with (None: the defaults)
    app.state.detection = detection
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    if wants_html(request) and "session" in request.scope:
        return _feed(request).page(
            request, "error.html", {"heading": "Not found", "message": "No such page."}, 404
        )
    return PlainTextResponse("not found", status_code=404)
