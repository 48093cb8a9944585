"""Who is asking, and may they: sessions, role checks, CSRF, login throttling.

Sessions are signed cookies (Starlette's ``SessionMiddleware``, itsdangerous): the cookie
carries the username, a fingerprint of the user's password hash, the CSRF token and the
unmask grants, and nothing a client can change without the secret. Each request looks the
user up in the *current* settings, so a user removed from the config, given another role
or a new password is out (or changed) at the next click, whatever their cookie says.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from pipeline.web.settings import FeedSettings, User
from pipeline.web.users import allowed

Endpoint = Callable[..., Awaitable[Response]]
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
MAX_UNMASKED_CASES = 30  # unmask grants kept in one session


def fingerprint(user: User) -> str:
    """Changes when the user's password or second factor does: their sessions end."""
    material = f"{user.password_hash}\0{user.totp_secret}\0{user.directory}".encode()
    return hashlib.sha256(material).hexdigest()[:16]


def csrf_token(request: Request) -> str:
    """This session's CSRF token (created on first use)."""
    tok = request.session.get("csrf")
    if not tok:
        tok = secrets.token_urlsafe(32)
        request.session["csrf"] = tok
    return str(tok)


async def csrf_ok(request: Request) -> bool:
    expected = request.session.get("csrf")
    if not expected:
        return False
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            sent = str(form.get(CSRF_FIELD) or "")
    return bool(sent) and hmac.compare_digest(str(sent), str(expected))


def _login(request: Request) -> tuple[User | None, bool]:
    """(the user this session logged in, whether it has been idle past
    ``idle_timeout_s``); None if it holds no login of a user as the settings have them."""
    settings: FeedSettings = request.app.state.settings
    name = request.session.get("user")
    user = settings.user(str(name)) if name else None
    if user is None or request.session.get("fp") != fingerprint(user):
        return None, False
    return user, idle_for(request) > settings.idle_timeout_s > 0


def current_user(request: Request) -> User | None:
    user, idle = _login(request)
    return None if idle else user


def signed_out_idle(request: Request) -> bool:
    """Whether this session was a valid login that ended for want of activity."""
    return _login(request)[1]


class Activity:
    """When each login (its ``sid``) last made a request of its own. Kept in memory as
    well as in the cookie: a live event stream holds the cookie of the moment it opened,
    and must see the clicks made since in the same browser."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, sid: str, now: float) -> None:
        with self._lock:
            self._last[sid] = now
            if len(self._last) > 10_000:  # bounded: forget the oldest half
                for k, _ in sorted(self._last.items(), key=lambda kv: kv[1])[:5_000]:
                    del self._last[k]

    def last(self, sid: str) -> float:
        with self._lock:
            return self._last.get(sid, 0.0)


def touch(request: Request) -> None:
    """This request is the user's activity (``feed.idle_timeout_s``)."""
    now = time.time()
    request.session["seen"] = int(now)
    sid = request.session.get("sid")
    if sid:
        request.app.state.activity.touch(str(sid), now)


def idle_for(request: Request) -> float:
    """Seconds since this login's last request that was not the live event stream."""
    seen = float(request.session.get("seen") or request.session.get("since") or 0)
    sid = request.session.get("sid")
    if sid:
        seen = max(seen, request.app.state.activity.last(str(sid)))
    return time.time() - seen


def log_in(request: Request, user: User) -> None:
    request.session.clear()  # nothing from before the login survives it
    request.session.update(
        {
            "user": user.username,
            "fp": fingerprint(user),
            "csrf": secrets.token_urlsafe(32),
            "since": int(time.time()),
            "seen": int(time.time()),
            "sid": secrets.token_urlsafe(12),
        }
    )


#: how long a password, once checked, waits for the second factor's code
MFA_PENDING_S = 300


def await_code(request: Request, user: User, nxt: str) -> None:
    """The password was right and the user has a second factor: remember that (and only
    that) in the session until the code comes; the user is not logged in yet."""
    request.session.clear()
    request.session.update(
        {
            "mfa_user": user.username,
            "mfa_fp": fingerprint(user),
            "mfa_at": int(time.time()),
            "mfa_next": nxt,
            "csrf": secrets.token_urlsafe(32),
        }
    )


def awaiting_code(request: Request) -> tuple[User, str] | None:
    """(user, where to go next) if this session checked a password in the last
    :data:`MFA_PENDING_S` seconds and waits for its code; the user must still be as they
    were (same password and secret)."""
    settings: FeedSettings = request.app.state.settings
    name = request.session.get("mfa_user")
    if not name or time.time() - float(request.session.get("mfa_at") or 0) > MFA_PENDING_S:
        return None
    user = settings.user(str(name))
    if user is None or not user.totp_secret or request.session.get("mfa_fp") != fingerprint(user):
        return None
    return user, safe_next(str(request.session.get("mfa_next") or "/"))


class CodeReplay:
    """The last time step each user logged in with: a code is good once (RFC 6238 §5.2),
    so a code seen over someone's shoulder cannot be used again in its 90 seconds."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()

    def use(self, username: str, step: int) -> bool:
        """Record ``step`` for ``username``; False if it (or a later one) was used."""
        with self._lock:
            if step <= self._last.get(username, -1):
                return False
            self._last[username] = step
            return True


def safe_next(target: str | None) -> str:
    """A post-login destination on this site only (no open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def requires(
    permission: str, *, csrf: bool = False, passive: bool = False
) -> Callable[[Endpoint], Endpoint]:
    """Guard an endpoint: a logged-in user whose role has ``permission`` (else 401/403);
    with ``csrf``, also a valid CSRF token (else 403). The user is ``request.state.user``.
    A request to it is the user's activity (for ``idle_timeout_s``) unless ``passive``."""

    def deco(fn: Endpoint) -> Endpoint:
        @wraps(fn)
        async def guarded(request: Request) -> Response:
            user = current_user(request)
            if user is None:
                idle = "idle=1&" if signed_out_idle(request) else ""
                if request.session.get("user"):
                    request.session.clear()  # unmask grants and all: nothing survives
                if request.method == "GET" and wants_html(request):
                    q = request.url.query
                    nxt = quote(request.url.path + (f"?{q}" if q else ""), safe="/")
                    return RedirectResponse(f"/login?{idle}next={nxt}", status_code=303)
                return PlainTextResponse("login required", status_code=401)
            if not passive:
                touch(request)
            if not allowed(user.role, permission):
                return await request.app.state.forbidden(request, user, permission)
            if csrf and not await csrf_ok(request):
                return await request.app.state.forbidden(request, user, "csrf")
            request.state.user = user
            return await fn(request)

        return guarded

    return deco


class LoginThrottle:
    """After ``max_failures`` wrong passwords for one username, refuse it for ``lockout_s``."""

    def __init__(self, max_failures: int, lockout_s: float) -> None:
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self._failures: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def locked(self, username: str) -> bool:
        with self._lock:
            n, until = self._failures.get(username, (0, 0.0))
            return n >= self.max_failures and time.monotonic() < until

    def failed(self, username: str) -> None:
        with self._lock:
            n, until = self._failures.get(username, (0, 0.0))
            if n >= self.max_failures and time.monotonic() >= until:
                n = 0  # the lockout has passed: count afresh
            n += 1
            self._failures[username] = (n, time.monotonic() + self.lockout_s)
            if len(self._failures) > 10_000:  # bounded, whatever is thrown at it
                self._failures.clear()

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(username, None)


# ---------------------------------------------------------------------------- unmasking
def unmask_grants(request: Request) -> dict[str, float]:
    raw: Any = request.session.get("unmask") or {}
    now = time.time()
    return {str(k): float(v) for k, v in dict(raw).items() if float(v) > now}


def grant_unmask(request: Request, alert_id: str, ttl_s: float) -> None:
    grants = unmask_grants(request)
    grants[alert_id] = time.time() + ttl_s
    newest = sorted(grants.items(), key=lambda kv: kv[1])[-MAX_UNMASKED_CASES:]
    request.session["unmask"] = dict(newest)


def may_see_patients(request: Request, user: User, alert_id: str | None = None) -> bool:
    """Whether this reader sees patient ids unmasked (for one case, if ``alert_id``)."""
    if allowed(user.role, "patients.see"):
        return True
    if alert_id is None or not allowed(user.role, "unmask"):
        return False
    return alert_id in unmask_grants(request)
