"""Who is asking, and may they: sessions, role checks, CSRF, login throttling.

Sessions are signed cookies (Starlette's ``SessionMiddleware``, itsdangerous): the cookie
carries the username, a fingerprint of the user's password hash, the CSRF token and the
unmask grants, and nothing a client can change without the secret. Each request looks the
user up in the *current* settings, so a user removed from the config, given another role
or a new password is out (or changed) at the next click, whatever their cookie says
(edits of the config file apply while the feed runs: :mod:`pipeline.web.reload`). The
cookie also carries a random session id whose row in the alert store must be open
(:mod:`pipeline.web.sessions`): signing out, or a supervisor ending the session, ends it
in every feed process and for every copy of the cookie.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from pipeline.web.sessions import (
    ENDED_BY_SUPERVISOR,
    ENDED_BY_USER,
    IDLE,
    SIGNED_OUT,
    SessionRegistry,
    fingerprint,
    session_key,
)
from pipeline.web.settings import FeedSettings, IPNetwork, User
from pipeline.web.users import allowed

Endpoint = Callable[..., Awaitable[Response]]
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
MAX_UNMASKED_CASES = 30  # unmask grants kept in one session


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


def _key(request: Request) -> str:
    """The store's key of this request's session ('' if it holds no login)."""
    sid = request.session.get("sid")
    return session_key(str(sid)) if sid else ""


def _registry(request: Request) -> SessionRegistry:
    return request.app.state.sessions  # type: ignore[no-any-return]


def _login(request: Request) -> tuple[User | None, str]:
    """(the user this session logged in, or None; why not: "" when it holds no valid
    login at all, :data:`~pipeline.web.sessions.IDLE` when it was idle past
    ``idle_timeout_s``, or the reason the session was ended in the store)."""
    settings: FeedSettings = request.app.state.settings
    name = request.session.get("user")
    user = settings.user(str(name)) if name else None
    if user is None or request.session.get("fp") != fingerprint(user):
        return None, ""
    known = _registry(request).get(_key(request))
    if known is None or known.username != user.username:
        return None, ""
    if not known.open:
        return None, known.end_reason or SIGNED_OUT
    # the last request of the user's own, in any feed process as far as this one knows
    # (the cookie's "seen" is as old as the page that holds it: a live stream's)
    seen = max(float(request.session.get("seen") or request.session.get("since") or 0), known.seen)
    if time.time() - seen > settings.idle_timeout_s > 0:
        return None, IDLE
    return user, ""


async def ensure_session(request: Request) -> None:
    """Make sure this process knows the request's session: one signed in through another
    feed process a moment ago is asked of the store (in a worker thread)."""
    key = _key(request)
    registry = _registry(request)
    if key and registry.get(key) is None:
        await run_in_threadpool(registry.load, key)


def current_user(request: Request) -> User | None:
    """The signed-in user of this request (after :func:`ensure_session`), or None."""
    return _login(request)[0]


def signed_out_why(request: Request) -> str:
    """Why this session, a valid login once, no longer is ('' if it never was one)."""
    return _login(request)[1]


async def end_session(request: Request, reason: str, by: str = "") -> None:
    """End this request's session in the store (every feed process) and here, and clear
    the cookie: unmask grants and all, nothing survives."""
    key = _key(request)
    if key:
        _registry(request).ended(key, reason)
        await run_in_threadpool(request.app.state.store.session_end, key, by, reason)
    request.session.clear()


async def touch(request: Request) -> None:
    """This request is the user's activity (``feed.idle_timeout_s``); written to the
    store now and then, for the other feed processes."""
    now = time.time()
    request.session["seen"] = int(now)
    key = _key(request)
    if key and _registry(request).touch(key, now):
        at = datetime.fromtimestamp(now, UTC)
        await run_in_threadpool(request.app.state.store.session_seen, key, at)


async def log_in(request: Request, user: User, address: str) -> None:
    """Start a session for ``user``: a new random id in the cookie, its row in the store."""
    request.session.clear()  # nothing from before the login survives it
    now = time.time()
    sid = secrets.token_urlsafe(18)
    key = session_key(sid)
    agent = request.headers.get("user-agent", "")
    await run_in_threadpool(
        request.app.state.store.session_start, key, user.username, fingerprint(user),
        address, agent,
    )  # fmt: skip
    _registry(request).started(key, user.username, now)
    request.session.update(
        {
            "user": user.username,
            "fp": fingerprint(user),
            "csrf": secrets.token_urlsafe(32),
            "since": int(now),
            "seen": int(now),
            "sid": sid,
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


def safe_next(target: str | None) -> str:
    """A post-login destination on this site only (no open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


#: the login page's notice (``/login?...``) for why a session ended
_WHY_PARAM = {IDLE: "idle=1&", ENDED_BY_SUPERVISOR: "ended=supervisor&",
              ENDED_BY_USER: "ended=elsewhere&"}  # fmt: skip


def why_param(why: str) -> str:
    """The login URL's parameter that makes it say why the session ended ('' if none)."""
    return _WHY_PARAM.get(why, "")


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
            await ensure_session(request)
            user, why = _login(request)
            if user is None:
                if why == IDLE:
                    await end_session(request, IDLE)
                elif request.session.get("user"):
                    request.session.clear()  # unmask grants and all: nothing survives
                if request.method == "GET" and wants_html(request):
                    q = request.url.query
                    nxt = quote(request.url.path + (f"?{q}" if q else ""), safe="/")
                    return RedirectResponse(f"/login?{why_param(why)}next={nxt}", 303)
                return PlainTextResponse("login required", status_code=401)
            if not passive:
                await touch(request)
            if not allowed(user.role, permission):
                return await request.app.state.forbidden(request, user, permission)
            if csrf and not await csrf_ok(request):
                return await request.app.state.forbidden(request, user, "csrf")
            request.state.user = user
            return await fn(request)

        return guarded

    return deco


class LoginThrottle:
    """Refuses a key (a username, an address) while ``max_failures`` failed attempts of
    it fall within the last ``window_s``: a burst locks it for up to ``window_s``, and
    failures older than that are forgotten (a typo last week does not count today).
    Attempts refused while locked count as failures, so hammering keeps the lock.

    The failures are in the alert store (:mod:`pipeline.alerting.feedstate`), so every
    feed process on it counts them together; keys are stored as a keyed hash
    (``secret``), since a name typed at the login may be someone's password. Blocking:
    call it from a worker thread."""

    def __init__(
        self, store: Any, scope: str, max_failures: int, window_s: float, secret: str
    ) -> None:
        self.store = store
        self.scope = scope
        self.max_failures = max(1, int(max_failures))
        self.window_s = float(window_s)
        self._secret = secret.encode()

    def _key(self, key: str) -> str:
        return hmac.new(self._secret, f"{self.scope}\0{key}".encode(), "sha256").hexdigest()

    def locked(self, key: str) -> bool:
        n = self.store.login_failures(self.scope, self._key(key), self.window_s)
        return bool(n >= self.max_failures)

    def failed(self, key: str) -> bool:
        """Count a failure; whether it is this one that locks ``key``."""
        before, after = self.store.login_failure(
            self.scope, self._key(key), self.window_s, self.max_failures
        )
        return bool(before < self.max_failures <= after)

    def succeeded(self, key: str) -> None:
        self.store.login_failures_clear(self.scope, self._key(key))


class LoginGuard:
    """The login's defences against guessing: a per-username throttle (a guessed password)
    and a per-address one (one password tried on many usernames), and the counts
    ``/metrics`` shows (this process's). Blocking: call it from a worker thread."""

    def __init__(self, settings: FeedSettings, store: Any, secret: str) -> None:
        self.users = LoginThrottle(store, "user", 1, 1, secret)
        self.addresses = LoginThrottle(store, "address", 1, 1, secret)
        self.configure(settings)
        self._lock = threading.Lock()
        self.successes = 0
        self.failures = 0  # wrong passwords and codes, unknown users
        self.lockouts = 0  # usernames and addresses locked
        self.refused = 0  # attempts refused while locked

    def configure(self, settings: FeedSettings) -> None:
        """The limits of ``settings`` (at start, and when the config file is reloaded)."""
        self.users.max_failures = max(1, settings.login_max_failures)
        self.users.window_s = float(settings.login_lockout_s)
        self.addresses.max_failures = max(1, settings.login_max_failures_per_address)
        self.addresses.window_s = float(settings.login_address_lockout_s)

    def longest_window(self) -> float:
        """Seconds a failure can still count (the longer throttle's window)."""
        return max(self.users.window_s, self.addresses.window_s)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def holds(self, username: str, address: str) -> bool:
        """Whether the username or the address is locked now."""
        return self.users.locked(username) or self.addresses.locked(address)

    def locked(self, username: str, address: str) -> bool:
        """:meth:`holds`, counting the attempt as refused when it does."""
        if self.holds(username, address):
            self._count("refused")
            return True
        return False

    def failed(self, username: str, address: str, refused: bool = False) -> list[str]:
        """Count a failed (or refused) attempt; what it locked: "user", "address"."""
        if not refused:
            self._count("failures")
        locked = [
            what
            for what, throttle, key in (
                ("user", self.users, username),
                ("address", self.addresses, address),
            )
            if throttle.failed(key)
        ]
        self._count("lockouts", len(locked))
        return locked

    def succeeded(self, username: str) -> None:
        """A user who signed in is forgiven; the address is not (one right password does
        not excuse the guesses at other users' from there)."""
        self._count("successes")
        self.users.succeeded(username)


def _trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_address(request: Request, trusted: tuple[IPNetwork, ...] = ()) -> str:
    """The address a request comes from. Behind reverse proxies (``trusted``): the last
    address in ``X-Forwarded-For`` that no trusted proxy added; a client cannot forge it,
    since the proxies append what they saw. Without trusted proxies the header is ignored.

    >>> from starlette.requests import Request
    >>> from pipeline.web.settings import trusted_networks
    >>> def req(peer, xff=""):
    ...     hs = [(b"x-forwarded-for", xff.encode())] if xff else []
    ...     return Request({"type": "http", "client": (peer, 1), "headers": hs})
    >>> proxies = trusted_networks(["10.0.0.0/8"])
    >>> client_address(req("192.0.2.7", "1.2.3.4"))
    '192.0.2.7'
    >>> client_address(req("10.1.1.1", "6.6.6.6, 198.51.100.9, 10.2.2.2"), proxies)
    '198.51.100.9'
    >>> client_address(req("192.0.2.7", "198.51.100.9"), proxies)  # not from a proxy
    '192.0.2.7'
    """
    peer = request.client.host if request.client is not None else ""
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
    hops = [h for h in hops if h]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop[:64]
    return hops[0][:64] if hops else peer


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
