"""Who is asking, and may they: sessions, role checks, CSRF, login throttling.

Sessions are signed cookies (Starlette's ``SessionMiddleware``, itsdangerous): the cookie
carries the username, a fingerprint of the user's password hash, the CSRF token and the
unmask grants, and nothing a client can change without the secret. Each request looks the
user up in the *current* settings, so a user removed from the config, given another role
or a new password is out (or changed) at the next click, whatever their cookie says
(edits of the config file apply while the feed runs: :mod:`pipeline.web.reload`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from pipeline.web.settings import FeedSettings, IPNetwork, User
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
    """Refuses a key (a username, an address) while its last ``max_failures`` failed
    attempts all fall within ``window_s``: a burst locks it for up to ``window_s``, and
    failures older than that are forgotten (a typo last week does not count today).
    Attempts refused while locked count as failures, so hammering keeps the lock."""

    MAX_KEYS = 10_000  # bounded, whatever is thrown at it

    def __init__(
        self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures = max(1, int(max_failures))
        self.window_s = float(window_s)
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def locked(self, key: str) -> bool:
        with self._lock:
            return self._locked(self._failures.get(key), self.clock())

    def _locked(self, q: deque[float] | None, now: float) -> bool:
        return q is not None and len(q) >= self.max_failures and now - q[0] < self.window_s

    def failed(self, key: str) -> bool:
        """Count a failure; whether it is this one that locks ``key``."""
        now = self.clock()
        with self._lock:
            q = self._failures.get(key)
            if q is None:
                if len(self._failures) >= self.MAX_KEYS:
                    self._forget(now)
                q = self._failures[key] = deque(maxlen=self.max_failures)
            before = self._locked(q, now)
            q.append(now)
            return not before and self._locked(q, now)

    def _forget(self, now: float) -> None:
        stale = [k for k, q in self._failures.items() if now - q[-1] >= self.window_s]
        for k in stale:
            del self._failures[k]
        if len(self._failures) >= self.MAX_KEYS:
            self._failures.clear()

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


class LoginGuard:
    """The login's defences against guessing: a per-username throttle (a guessed password)
    and a per-address one (one password tried on many usernames), and the counts
    ``/metrics`` shows."""

    def __init__(self, settings: FeedSettings) -> None:
        self.users = LoginThrottle(settings.login_max_failures, settings.login_lockout_s)
        self.addresses = LoginThrottle(
            settings.login_max_failures_per_address, settings.login_address_lockout_s
        )
        self.successes = 0
        self.failures = 0  # wrong passwords and codes, unknown users
        self.lockouts = 0  # usernames and addresses locked
        self.refused = 0  # attempts refused while locked

    def holds(self, username: str, address: str) -> bool:
        """Whether the username or the address is locked now."""
        return self.users.locked(username) or self.addresses.locked(address)

    def locked(self, username: str, address: str) -> bool:
        """:meth:`holds`, counting the attempt as refused when it does."""
        if self.holds(username, address):
            self.refused += 1
            return True
        return False

    def failed(self, username: str, address: str, refused: bool = False) -> list[str]:
        """Count a failed (or refused) attempt; what it locked: "user", "address"."""
        if not refused:
            self.failures += 1
        locked = [
            what
            for what, throttle, key in (
                ("user", self.users, username),
                ("address", self.addresses, address),
            )
            if throttle.failed(key)
        ]
        self.lockouts += len(locked)
        return locked

    def succeeded(self, username: str) -> None:
        """A user who signed in is forgiven; the address is not (one right password does
        not excuse the guesses at other users' from there)."""
        self.successes += 1
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
