"""Feed sessions held in the alert store, so that ending one ends it everywhere.

A session's cookie is signed (:mod:`pipeline.web.auth`) and carries a random id; the
store keeps a row per id (:mod:`pipeline.alerting.feedstate`, keyed by a hash of the id):
who signed in, from which address and browser, when, when they were last active, and
when, by whom and why the session ended. A request is served only for a session whose
row is open, so:

- **signing out ends the session**, not just the cookie in that browser: a copy of the
  cookie (a shared computer's profile, a proxy's log, malware) is refused from then on;
- **a supervisor can end anyone's session** (``/sessions``) and a user their own other
  sessions ("Sign out everywhere else"), e.g. for a laptop left in a ward;
- **several feed processes behind a load balancer** share sessions, the automatic logoff,
  the login throttle and the used one-time codes, since all of them are in the database.

Each feed process keeps what it has learnt of sessions in a :class:`SessionRegistry`
(memory), reads every change to the table every :data:`SYNC_EVERY_S` seconds
(:func:`keep_syncing`), and asks the store about a session it does not know yet (one
signed in through another process a moment ago). A user's activity is written to the
store at most every :func:`seen_write_every` seconds, so requests do not each write.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pipeline.alerting.feedstate import FeedSession
from pipeline.web.settings import FeedSettings, User

log = logging.getLogger(__name__)

SYNC_EVERY_S = 1.0  # how often a feed process reads the others' session changes
SYNC_OVERLAP_S = 5.0  # re-read this far back: transactions commit out of time order
KEEP_DAYS = 30  # ended and expired sessions stay listed this long, then are forgotten
PRUNE_EVERY_S = 3600.0
MAX_KNOWN = 50_000  # sessions one process remembers (the store has them all)

# why a session ended (``feed_sessions.end_reason``)
SIGNED_OUT = "signed out"
IDLE = "idle"
ENDED_BY_SUPERVISOR = "ended by a supervisor"
ENDED_BY_USER = "ended by the user"


def session_key(sid: str) -> str:
    """The store's key for the session id ``sid`` (which only the signed cookie holds).

    >>> len(session_key("abc")), session_key("abc") == session_key("abd")
    (64, False)
    """
    return hashlib.sha256(b"emrwatch-feed-session\0" + sid.encode()).hexdigest()


def fingerprint(user: User) -> str:
    """Changes when the user's password or second factor does: their sessions end."""
    material = f"{user.password_hash}\0{user.totp_secret}\0{user.directory}".encode()
    return hashlib.sha256(material).hexdigest()[:16]


def seen_write_every(idle_timeout_s: float) -> float:
    """Seconds between two writes of one session's activity to the store: often enough
    for another process to judge the automatic logoff, rarely enough not to write per
    request.

    >>> seen_write_every(900), seen_write_every(0), seen_write_every(2)
    (30.0, 60.0, 0.5)
    """
    if idle_timeout_s <= 0:
        return 60.0
    return max(0.5, min(30.0, idle_timeout_s / 4))


@dataclass
class Known:
    """What this process knows of one session."""

    username: str
    seen: float  # last activity (epoch seconds), here or as another process wrote it
    end_reason: str | None  # None while open
    written: float  # the last activity written to the store from here

    @property
    def open(self) -> bool:
        return self.end_reason is None


class SessionRegistry:
    """This process's view of the feed's sessions (thread-safe; the store is the truth)."""

    def __init__(
        self,
        store: Any,
        idle_timeout_s: float = 0,
        failure_window_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.store = store
        #: the longest login throttle's window now (a reload may change it)
        self.failure_window_s = failure_window_s
        self.write_every_s = seen_write_every(idle_timeout_s)
        self._known: dict[str, Known] = {}
        self._cursor: datetime | None = None
        self._lock = threading.Lock()
        self._pruned = 0.0
        self.syncs = 0
        self.ended_elsewhere = 0  # sessions this process learnt had ended

    # -------------------------------------------------------------- reading
    def get(self, key: str) -> Known | None:
        with self._lock:
            return self._known.get(key)

    # -------------------------------------------------------------- what happens here
    def started(self, key: str, username: str, now: float) -> None:
        with self._lock:
            self._remember(key, Known(username, now, None, now))

    def ended(self, key: str, reason: str) -> None:
        with self._lock:
            k = self._known.get(key)
            if k is not None and k.open:
                k.end_reason = reason

    def touch(self, key: str, now: float) -> bool:
        """The session's user was active at ``now``; whether to write that to the store."""
        with self._lock:
            k = self._known.get(key)
            if k is None or not k.open:
                return False
            k.seen = max(k.seen, now)
            if now - k.written < self.write_every_s:
                return False
            k.written = now
            return True

    def _remember(self, key: str, known: Known) -> None:
        if len(self._known) >= MAX_KNOWN:  # the oldest half goes; the store still has them
            for old, _ in sorted(self._known.items(), key=lambda kv: kv[1].seen)[: MAX_KNOWN // 2]:
                del self._known[old]
        self._known[key] = known

    # -------------------------------------------------------------- from the store (blocking)
    def load(self, key: str) -> Known | None:
        """Ask the store about a session this process has not seen (signed in through
        another one); None if the store has no such session."""
        row = self.store.session(key)
        if row is None:
            return None
        with self._lock:
            self._learn(row)
            return self._known.get(key)

    def sync(self) -> int:
        """Read the sessions changed since the last sync; how many rows were read."""
        since = None if self._cursor is None else self._cursor - timedelta(seconds=SYNC_OVERLAP_S)
        if since is None:  # first sync: the recent past is enough
            since = self.store.clock() - timedelta(days=1)
        rows: list[FeedSession] = self.store.sessions_changed(since)
        with self._lock:
            for row in rows:
                self._learn(row)
                if self._cursor is None or row.updated_at > self._cursor:
                    self._cursor = row.updated_at
            if self._cursor is None:
                self._cursor = since
        self.syncs += 1
        now = time.monotonic()
        if now - self._pruned >= PRUNE_EVERY_S:
            self._pruned = now
            self.prune()
        return len(rows)

    def _learn(self, row: FeedSession) -> None:
        seen = row.seen_at.timestamp()
        k = self._known.get(row.session_id)
        if k is None:
            self._remember(row.session_id, Known(row.username, seen, row.end_reason, seen))
            return
        k.seen = max(k.seen, seen)
        if k.open and not row.open:
            k.end_reason = row.end_reason or SIGNED_OUT
            self.ended_elsewhere += 1

    def prune(self) -> None:
        """Forget, in the store, sessions started more than :data:`KEEP_DAYS` ago and
        failed sign-ins older than any login throttle's window."""
        try:
            gone = self.store.sessions_prune(self.store.clock() - timedelta(days=KEEP_DAYS))
            self.store.login_failures_prune(max(60.0, self.failure_window_s()))
        except Exception as exc:  # noqa: BLE001 - the next prune tries again
            log.error("feed: old sessions could not be forgotten: %s", exc)
            return
        if gone:
            log.info("feed: forgot %d sessions older than %d days", gone, KEEP_DAYS)


async def keep_syncing(registry: SessionRegistry, every_s: float = SYNC_EVERY_S) -> None:
    """Until cancelled (the feed's lifespan runs it): :meth:`SessionRegistry.sync` in a
    worker thread every ``every_s``, so a session ended through another feed process
    ends here too, an open live stream included."""
    from starlette.concurrency import run_in_threadpool

    while True:
        try:
            await run_in_threadpool(registry.sync)
        except Exception as exc:  # noqa: BLE001 - the database may be back next turn
            log.error("feed: reading the sessions from the store failed: %s", exc)
        await asyncio.sleep(every_s)


_BROWSERS = (
    ("Edge", r"Edg(?:e|A|iOS)?/(\d+)"),
    ("Firefox", r"Firefox/(\d+)"),
    ("Chrome", r"(?:Chrome|CriOS)/(\d+)"),
    ("Safari", r"Version/(\d+)[\d.]* (?:Mobile/\S+ )?Safari/"),
)
_SYSTEMS = (
    ("Windows", "Windows"),
    ("Android", "Android"),
    ("iPhone", "iPhone"),
    ("iPad", "iPad"),
    ("macOS", "Mac OS X"),
    ("ChromeOS", "CrOS"),
    ("Linux", "Linux"),
)


def browser_label(agent: str) -> str:
    """A short name for a browser's User-Agent, for people reading a sessions list.

    >>> browser_label("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    ...               "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91")
    'Edge 120 on Windows'
    >>> browser_label("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0")
    'Firefox 128 on Linux'
    >>> browser_label("python-httpx/0.28.1"), browser_label("")
    ('python-httpx/0.28.1', 'unknown')
    """
    agent = agent.strip()
    if not agent:
        return "unknown"
    name = next((f"{b} {m.group(1)}" for b, rx in _BROWSERS if (m := re.search(rx, agent))), "")
    system = next((s for s, token in _SYSTEMS if token in agent), "")
    if name:
        return f"{name} on {system}" if system else name
    return agent[:60]


def live_sessions(
    settings: FeedSettings, rows: list[FeedSession], now: datetime
) -> list[FeedSession]:
    """The open sessions that would still serve a request: within the session's maximum
    age, of a user as the settings have them now (same credentials), not idle past
    ``idle_timeout_s`` (give or take how rarely activity is written to the store)."""
    oldest = now - timedelta(seconds=settings.session_max_age_s)
    idle = settings.idle_timeout_s
    idle_cut = now - timedelta(seconds=idle + seen_write_every(idle)) if idle > 0 else None
    out = []
    for r in rows:
        user = settings.user(r.username)
        if (
            r.open
            and r.started_at > oldest
            and user is not None
            and fingerprint(user) == r.fingerprint
            and (idle_cut is None or r.seen_at > idle_cut)
        ):
            out.append(r)
    return out


MAX_OPEN = 100_000  # open sessions read at once


def open_sessions(
    store: Any, settings: FeedSettings, username: str | None = None
) -> list[FeedSession]:
    """The sessions signed in now (of ``username``), in every feed process: the store's
    open rows within the maximum age that :func:`live_sessions` keeps. Blocking."""
    now = store.clock()
    after = now - timedelta(seconds=settings.session_max_age_s)
    rows: list[FeedSession] = store.sessions_started(after, username, True, MAX_OPEN)
    return live_sessions(settings, rows, now)
