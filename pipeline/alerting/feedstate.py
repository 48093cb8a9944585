"""The alert feed's own state in the store, shared by every feed process on the database.

- **Sessions** (``feed_sessions``): each sign-in, keyed by a hash of the random id its
  signed cookie carries, with who, from where, in which browser, when it started and was
  last used, and when, by whom and why it ended. A session ended here is over in every
  feed process, whatever copies of its cookie exist (:mod:`pipeline.web.sessions`).
- **Failed sign-ins** (``feed_login_failures``): per username and per address, keyed by
  a keyed hash (a name typed at the login may be a password), for the login throttle.
- **Used one-time codes** (``feed_code_steps``): the last TOTP time step each user signed
  in with, so a code is good once across all processes.

>>> from datetime import datetime, timedelta
>>> from pipeline.alerting.store import AlertStore
>>> store = AlertStore("sqlite://")
>>> store.session_start("s1", "ana", "fp", "10.0.0.7", "Firefox")
>>> store.session("s1").open
True
>>> store.session_end("s1", by="sam", reason="ended by a supervisor"), store.session_end("s1")
(True, False)
>>> store.session("s1").end_reason
'ended by a supervisor'
>>> store.code_step_use("ana", 100), store.code_step_use("ana", 100), store.code_step_use("ana", 101)
(True, False, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.alerting import schema as t
from pipeline.alerting.records import StoreParts, _aware, _aware_opt, _naive_utc


@dataclass(frozen=True)
class FeedSession:
    """One sign-in to the feed, as the store has it (times aware, UTC)."""

    session_id: str
    username: str
    fingerprint: str
    address: str
    agent: str
    started_at: datetime
    seen_at: datetime
    ended_at: datetime | None
    ended_by: str | None
    end_reason: str | None
    updated_at: datetime

    @property
    def open(self) -> bool:
        return self.ended_at is None


def _session(r: object) -> FeedSession:
    g = r._mapping  # type: ignore[attr-defined]
    return FeedSession(
        g["session_id"],
        g["username"],
        g["fingerprint"],
        g["address"],
        g["agent"],
        _aware(g["started_at"]),
        _aware(g["seen_at"]),
        _aware_opt(g["ended_at"]),
        g["ended_by"],
        g["end_reason"],
        _aware(g["updated_at"]),
    )


class FeedStateMixin(StoreParts):
    """The feed-state part of :class:`~pipeline.alerting.store.AlertStore`."""

    # ------------------------------------------------------------------ sessions
    def session_start(
        self, session_id: str, username: str, fingerprint: str, address: str, agent: str
    ) -> None:
        with self.write() as conn:
            now = self.now()
            conn.execute(
                insert(t.feed_sessions).values(
                    session_id=session_id,
                    username=username[:128],
                    fingerprint=fingerprint[:32],
                    address=address[:64],
                    agent=agent[:256],
                    started_at=now,
                    seen_at=now,
                    updated_at=now,
                )
            )

    def session(self, session_id: str) -> FeedSession | None:
        q = select(t.feed_sessions).where(t.feed_sessions.c.session_id == session_id)
        with self.read() as conn:
            row = conn.execute(q).first()
        return _session(row) if row is not None else None

    def session_seen(self, session_id: str, at: datetime) -> None:
        """The session was used at ``at`` (aware); nothing if it has ended."""
        s = t.feed_sessions
        at_naive = _naive_utc(at)
        with self.write() as conn:
            conn.execute(
                update(s)
                .where(s.c.session_id == session_id, s.c.ended_at.is_(None))
                .where(s.c.seen_at < at_naive)
                .values(seen_at=at_naive, updated_at=self.now())
            )

    def session_end(self, session_id: str, by: str = "", reason: str = "signed out") -> bool:
        """End a session; whether it was open."""
        return self._end(t.feed_sessions.c.session_id == session_id, by, reason) > 0

    def sessions_end_user(
        self, username: str, by: str, reason: str, keep: str | None = None
    ) -> int:
        """End every open session of ``username`` (but ``keep``); how many."""
        s = t.feed_sessions
        where = s.c.username == username
        if keep is not None:
            where = and_(where, s.c.session_id != keep)
        return self._end(where, by, reason)

    def _end(self, where: object, by: str, reason: str) -> int:
        s = t.feed_sessions
        with self.write() as conn:
            now = self.now()
            res = conn.execute(
                update(s)
                .where(where, s.c.ended_at.is_(None))  # type: ignore[arg-type]
                .values(ended_at=now, ended_by=by[:128], end_reason=reason[:32], updated_at=now)
            )
        return int(res.rowcount or 0)

    def sessions_changed(self, since: datetime | None, limit: int = 10_000) -> list[FeedSession]:
        """Sessions started, used or ended at or after ``since`` (aware), oldest change
        first: what a feed process reads to learn of the others' sign-outs."""
        s = t.feed_sessions
        q = select(s).order_by(s.c.updated_at).limit(limit)
        if since is not None:
            q = q.where(s.c.updated_at >= _naive_utc(since))
        with self.read() as conn:
            return [_session(r) for r in conn.execute(q)]

    def sessions_started(
        self,
        after: datetime,
        username: str | None = None,
        open_only: bool = True,
        limit: int = 1000,
    ) -> list[FeedSession]:
        """Sessions started after ``after`` (aware), open ones only unless ``open_only``
        is false; most recently used (or ended) first."""
        s = t.feed_sessions
        q = select(s).where(s.c.started_at > _naive_utc(after))
        if open_only:
            q = q.where(s.c.ended_at.is_(None))
        if username is not None:
            q = q.where(s.c.username == username)
        q = q.order_by(s.c.updated_at.desc()).limit(limit)
        with self.read() as conn:
            return [_session(r) for r in conn.execute(q)]

    def sessions_prune(self, before: datetime) -> int:
        """Forget sessions that started before ``before`` (aware; past any max age)."""
        s = t.feed_sessions
        with self.write() as conn:
            res = conn.execute(delete(s).where(s.c.started_at < _naive_utc(before)))
        return int(res.rowcount or 0)

    # ------------------------------------------------------------------ failed sign-ins
    def login_failure(
        self, scope: str, key: str, window_s: float, cap: int | None = None
    ) -> tuple[int, int]:
        """Record a failed sign-in of ``key``; (failures within ``window_s`` before it,
        and with it). Failures older than the window are forgotten on the way. With
        ``cap`` failures in the window already, the oldest is moved to now instead of a
        row added: the count stays (and the window slides) however hard a locked key is
        hammered, and the table does not grow with it."""
        f = t.feed_login_failures
        with self.write() as conn:
            now = self.now()
            start = now - timedelta(seconds=window_s)
            conn.execute(delete(f).where(f.c.scope == scope, f.c.key == key, f.c.at <= start))
            before = self._failures(conn, scope, key, start)
            if cap is not None and before >= cap:
                oldest = (
                    select(f.c.id)
                    .where(f.c.scope == scope, f.c.key == key)
                    .order_by(f.c.at, f.c.id)
                    .limit(1)
                    .scalar_subquery()
                )
                conn.execute(update(f).where(f.c.id == oldest).values(at=now))
                return before, before
            conn.execute(insert(f).values(scope=scope, key=key[:64], at=now))
        return before, before + 1

    def login_failures(self, scope: str, key: str, window_s: float) -> int:
        """Failed sign-ins of ``key`` within the last ``window_s`` seconds."""
        with self.read() as conn:
            return self._failures(conn, scope, key, self.now() - timedelta(seconds=window_s))

    @staticmethod
    def _failures(conn: Connection, scope: str, key: str, start: datetime) -> int:
        f = t.feed_login_failures
        q = select(func.count()).where(f.c.scope == scope, f.c.key == key, f.c.at > start)
        return int(conn.execute(q).scalar_one())

    def login_failures_clear(self, scope: str, key: str) -> None:
        f = t.feed_login_failures
        with self.write() as conn:
            conn.execute(delete(f).where(f.c.scope == scope, f.c.key == key))

    def login_failures_prune(self, older_than_s: float) -> int:
        """Forget failures older than any window (keys nobody tries again)."""
        f = t.feed_login_failures
        with self.write() as conn:
            res = conn.execute(
                delete(f).where(f.c.at < self.now() - timedelta(seconds=older_than_s))
            )
        return int(res.rowcount or 0)

    # ------------------------------------------------------------------ one-time codes
    def code_step_use(self, username: str, step: int) -> bool:
        """Record that ``username`` signed in with TOTP time step ``step``; False if that
        step (or a later one) was used already, by any feed process."""
        c = t.feed_code_steps
        with self.write() as conn:
            res = conn.execute(
                update(c).where(c.c.username == username, c.c.step < step).values(step=step)
            )
            if res.rowcount:
                return True
            if conn.execute(select(c.c.step).where(c.c.username == username)).first():
                return False
            try:
                with conn.begin_nested():
                    conn.execute(insert(c).values(username=username, step=step))
            except IntegrityError:  # another process inserted it first
                return False
            return True
