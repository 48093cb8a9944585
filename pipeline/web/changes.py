"""Live changes for the feed: one poller per app finds what changed in the alert store and
hands each change to every open event stream (Server-Sent Events).

A change is a new alert, a new version of one (more evidence, an escalation, a retraction),
or a triage step or (re)assignment. The store is polled, so writers in other processes
(``emrwatch run`` workers, a replay backfill) show up too; a writer in this process can call
:meth:`ChangeFeed.notify` to have it looked at at once. Three queries find changes:

* triage steps: ``triage_history.id`` above the last one seen (the primary key);
* new alerts on SQLite: the ``alerts`` table's implicit ``rowid`` above the last one seen
  (rows are only ever appended, never deleted or moved);
* new versions of recent cases: the versions of the :data:`HOT_ROWS` newest alerts by
  evidence time (the feed's own index), every tick;
* any new version (and, on PostgreSQL, new alerts): ``alerts.updated_at`` at or after the
  watermark less a small overlap (transactions may commit out of order). ``updated_at`` has
  no index in the store's schema, so this query scans the table. It measures itself and
  runs at most every ``poll_interval_s`` and never more than a tenth of the time: on
  SQLite, 100,000 alerts take 0.1–0.6 s to scan, so a new version of an *old* case written
  by another process may take a few seconds to show. Everything else takes one tick.

Every change gets a sequence number; the last :data:`BACKLOG` changes are kept, so a page
rendered at sequence ``n`` (or a reconnecting ``EventSource`` sending ``Last-Event-ID``)
receives exactly what happened after ``n``. A client further behind, too slow to keep up,
or coming from before a restart of the server, gets a *reset* and reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, literal_column, select

from pipeline.alerting import schema as t
from pipeline.alerting.records import (
    _SUMMARY_COLS,
    AlertFilter,
    AlertSummary,
    _summary,
    parse_time,
)
from pipeline.alerting.render import severity_rank
from pipeline.alerting.store import AlertStore

log = logging.getLogger(__name__)

BACKLOG = 5000  # changes kept for clients that (re)connect a little behind
MAX_BATCH = 500  # more changes than this in one poll: clients are told to reload instead
QUEUE_MAX = 2000  # a client this far behind is reset
OVERLAP = timedelta(seconds=5)  # re-read window below the updated_at watermark
SCAN_SHARE = 0.1  # the updated_at scan may use at most this share of wall time
HOT_ROWS = 1000  # newest alerts (by evidence time) checked for new versions every tick
_SEEN_MAX = 100_000  # signatures remembered to drop re-reads of unchanged alerts


@dataclass(frozen=True)
class Change:
    """One alert as it is now, after a change (``kind`` ``alert``), or a *reset*: too much
    changed at once (``count`` alerts) for the client to follow one by one."""

    seq: int
    kind: str  # alert | reset
    summary: AlertSummary | None = None
    patient_ids: tuple[str, ...] = ()
    count: int = 0


def _signature(s: AlertSummary) -> tuple[Any, ...]:
    return (s.version, s.state, s.assignee, s.verdict, s.status)


def matches(
    f: AlertFilter, s: AlertSummary, now: datetime | None = None, patients: Iterable[str] = ()
) -> bool:
    """Whether a feed filter selects an alert (the store's ``page`` semantics, in Python);
    ``patients``: the alert's patient ids."""
    if f.late and s.late_h(now or datetime.now(UTC)) is None:
        return False
    if f.patient_id and not set(f.patient_id) & set(patients):
        return False
    if f.last_seen_from is not None or f.last_seen_to is not None:
        seen = parse_time(s.last_seen)
        lo, hi = parse_time(f.last_seen_from), parse_time(f.last_seen_to)
        if seen is None or (lo is not None and seen < lo) or (hi is not None and seen >= hi):
            return False
    if f.severity and s.severity not in f.severity:
        return False
    if f.min_severity and severity_rank(s.severity) < severity_rank(f.min_severity):
        return False
    for want, have in (
        (f.state, s.state),
        (f.status, s.status),
        (f.department_id, s.department_id),
        (f.user_id, s.user_id),
        (f.assignee, s.assignee or ""),
    ):
        if want and have not in want:
            return False
    if f.unassigned and s.assignee:
        return False
    return not (f.detector and not set(f.detector) & set(s.detectors))


class Subscription:
    """One open event stream: an asyncio queue the poller fills."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self.overflowed = False

    def put(self, change: Change | None) -> None:
        if change is not None and self.queue.qsize() >= QUEUE_MAX:
            self.overflowed = True
            change = Change(change.seq, "reset", count=QUEUE_MAX)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(change)


class ChangeFeed:
    def __init__(self, store: AlertStore, poll_interval_s: float = 0.5) -> None:
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.seq = 0
        self.epoch = secrets.token_hex(4)  # sequence numbers start again with each server
        self.scan_seconds = 0.0  # cost of the last updated_at scan (exposed for tests, ops)
        self.poll_failures = 0
        self._backlog: deque[Change] = deque(maxlen=BACKLOG)
        self._subs: set[Subscription] = set()
        self._seen: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self._history_id = 0
        self._rowid: int | None = None  # SQLite only
        self._watermark: datetime | None = None
        self._next_scan = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._primed = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            await asyncio.to_thread(self.prime)
        except Exception as exc:  # noqa: BLE001 - serve anyway; the poller primes later
            log.warning("feed: the alert store is not readable yet (%s); will retry", exc)
        self._task = asyncio.create_task(self._run(), name="emrwatch-feed-poller")

    async def stop(self) -> None:
        self._closed = True
        self.close_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def close_streams(self) -> None:
        """End every open event stream (call from the loop's thread)."""
        for sub in list(self._subs):
            sub.put(None)
        self._subs.clear()

    def close_streams_threadsafe(self) -> None:
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.close_streams)

    def notify(self) -> None:
        """Look for changes now (thread-safe): for writers in this process."""
        self._next_scan = 0.0
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        failures = 0
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()
            try:
                found = await asyncio.to_thread(self.poll)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the database may be away for a while
                failures += 1
                self.poll_failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("feed: polling the alert store failed (%d×): %s", failures, exc)
                await asyncio.sleep(min(30.0, self.poll_interval_s * 2 ** min(failures, 8)))
                continue
            self.publish(found)

    # ------------------------------------------------------------------ subscribers
    @property
    def cursor(self) -> str:
        """Where the feed is now, as a page hands it to its stream (``epoch.seq``)."""
        return f"{self.epoch}.{self.seq}"

    def event_id(self, ch: Change) -> str:
        return f"{self.epoch}.{ch.seq}"

    def subscribe(self, since: str | None) -> Subscription:
        """A new stream; with ``since`` (a :attr:`cursor` or an event id), first the kept
        changes after it, or a reset when they are not all kept any more, or when it comes
        from before this server started (another epoch)."""
        sub = Subscription()
        if since:
            epoch, _, raw = since.partition(".")
            n = int(raw) if raw.isdigit() else -1
            oldest = self._backlog[0].seq if self._backlog else self.seq + 1
            if epoch != self.epoch or n < 0 or n > self.seq:
                sub.put(Change(self.seq, "reset", count=0))
            elif n < oldest - 1:
                sub.put(Change(self.seq, "reset", count=self.seq - n))
            else:
                for ch in self._backlog:
                    if ch.seq > n:
                        sub.put(ch)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, found: list[tuple[AlertSummary, tuple[str, ...]]] | int) -> None:
        """Number the changes a poll found and hand them to every stream (loop thread)."""
        if isinstance(found, int):  # too many at once
            self.seq += 1
            changes = [Change(self.seq, "reset", count=found)]
        else:
            changes = []
            for summary, pids in found:
                self.seq += 1
                changes.append(Change(self.seq, "alert", summary, pids))
        for ch in changes:
            self._backlog.append(ch)
            for sub in list(self._subs):
                sub.put(ch)
                if sub.overflowed:
                    self._subs.discard(sub)

    # ------------------------------------------------------------------ polling (sync)
    def prime(self) -> None:
        """Start from the store as it is now: only later changes are news."""
        a, h = t.alerts, t.triage_history
        with self.store.read() as conn:
            self._history_id = int(conn.execute(select(func.max(h.c.id))).scalar() or 0)
            if conn.dialect.name == "sqlite":
                self._rowid = int(
                    conn.execute(select(func.max(literal_column("rowid"))).select_from(a)).scalar()
                    or 0
                )
            hot = conn.execute(
                select(*_SUMMARY_COLS)
                .order_by(a.c.last_seen.desc(), a.c.alert_id.desc())
                .limit(HOT_ROWS)
            ).all()
            for r in hot:
                summary = _summary(r)
                self._remember(summary.alert_id, _signature(summary))
            self._watermark = conn.execute(select(func.max(a.c.updated_at))).scalar()
            if self._watermark is not None:
                recent = conn.execute(
                    select(*_SUMMARY_COLS).where(a.c.updated_at >= self._watermark - OVERLAP)
                ).all()
                for r in recent:
                    summary = _summary(r)
                    self._remember(summary.alert_id, _signature(summary))
        self._primed.set()

    def poll(self) -> list[tuple[AlertSummary, tuple[str, ...]]] | int:
        """The alerts changed since the last poll, as (summary, patient ids); or their
        number, when there are more than :data:`MAX_BATCH`."""
        if not self._primed.is_set():
            self.prime()
        a, h = t.alerts, t.triage_history
        ids: dict[str, None] = {}
        with self.store.read() as conn:
            rows: Sequence[Any] = conn.execute(
                select(h.c.id, h.c.alert_id).where(h.c.id > self._history_id).order_by(h.c.id)
            ).all()
            if rows:
                self._history_id = rows[-1].id
                ids.update(dict.fromkeys(r.alert_id for r in rows))
            if self._rowid is not None:
                rowid: Any = literal_column("rowid")
                rows = conn.execute(
                    select(rowid.label("rid"), a.c.alert_id)
                    .where(rowid > self._rowid)
                    .order_by(rowid)
                ).all()
                if rows:
                    self._rowid = int(rows[-1].rid)
                    ids.update(dict.fromkeys(r.alert_id for r in rows))
            # the newest cases by evidence time (an index, bounded): a live case's new
            # version lands here, so it shows within a tick even while the scan rests
            rows = conn.execute(
                select(a.c.alert_id, a.c.version)
                .order_by(a.c.last_seen.desc(), a.c.alert_id.desc())
                .limit(HOT_ROWS)
            ).all()
            ids.update(
                dict.fromkeys(
                    r.alert_id
                    for r in rows
                    if (self._seen.get(r.alert_id) or (None,))[0] != r.version
                )
            )
            now = time.monotonic()
            if now >= self._next_scan:
                q = select(a.c.alert_id, a.c.version, a.c.updated_at)
                if self._watermark is not None:
                    q = q.where(a.c.updated_at >= self._watermark - OVERLAP)
                rows = conn.execute(q).all()
                cost = time.monotonic() - now
                self.scan_seconds = cost
                self._next_scan = now + max(self.poll_interval_s, cost / SCAN_SHARE) - 0.01
                if rows:
                    self._watermark = max(
                        [r.updated_at for r in rows]
                        + ([self._watermark] if self._watermark else [])
                    )
                    # the overlap re-reads recent rows: only other versions are news
                    ids.update(
                        dict.fromkeys(
                            r.alert_id
                            for r in rows
                            if (self._seen.get(r.alert_id) or (None,))[0] != r.version
                        )
                    )
            if not ids:
                return []
            changed = self._changed(conn, list(ids))
            if len(changed) > MAX_BATCH:
                return len(changed)
            return self._fetch(conn, changed)

    def _changed(self, conn: Any, ids: list[str]) -> list[str]:
        """Those of ``ids`` that look different from when the feed last saw them (read from
        the small columns only; remembered, so a flood is counted once)."""
        a = t.alerts
        out = []
        cols = (a.c.alert_id, a.c.version, a.c.state, a.c.assignee, a.c.verdict, a.c.status)
        for i in range(0, len(ids), 500):
            for r in conn.execute(select(*cols).where(a.c.alert_id.in_(ids[i : i + 500]))):
                if self._remember(r.alert_id, tuple(r)[1:]):
                    out.append(r.alert_id)
        return out

    def _fetch(self, conn: Any, ids: list[str]) -> list[tuple[AlertSummary, tuple[str, ...]]]:
        a = t.alerts
        out = []
        for i in range(0, len(ids), 500):
            q = select(*_SUMMARY_COLS, a.c.payload["patient_ids"].label("patient_ids")).where(
                a.c.alert_id.in_(ids[i : i + 500])
            )
            for r in conn.execute(q):
                s = _summary(r)
                self._remember(s.alert_id, _signature(s))
                out.append((s, tuple(str(p) for p in r.patient_ids or ())))
        out.sort(key=lambda x: (x[0].updated_at, x[0].alert_id))
        return out

    def _remember(self, alert_id: str, sig: tuple[Any, ...]) -> bool:
        """Whether this alert looks different from when the feed last saw it."""
        same = self._seen.get(alert_id) == sig
        self._seen[alert_id] = sig
        self._seen.move_to_end(alert_id)  # recently looked at: kept longest
        while len(self._seen) > _SEEN_MAX:
            self._seen.popitem(last=False)
        return not same


def patient_ids_of(store: AlertStore, alert_ids: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The patient ids of some alerts (for masking their reasons), without their evidence."""
    a = t.alerts
    ids = list(alert_ids)
    out: dict[str, tuple[str, ...]] = {}
    if not ids:
        return out
    with store.read() as conn:
        for i in range(0, len(ids), 500):
            q = select(a.c.alert_id, a.c.payload["patient_ids"].label("p")).where(
                a.c.alert_id.in_(ids[i : i + 500])
            )
            for r in conn.execute(q):
                out[r.alert_id] = tuple(str(p) for p in r.p or ())
    return out
