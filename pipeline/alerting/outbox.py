"""The notification outbox: nothing is sent that was not first written down.

Every Slack message and e-mail is a row in the ``outbox`` table, written in the *same
transaction* as the alert version that caused it, so a crash can lose neither. A delivery
loop sends due rows, marks them delivered, and on failure counts, backs off
(exponentially, honouring a sink's ``Retry-After``) and tries again later — for ever: an
outage delays notifications, it never drops them.

**When is someone notified?** Alerts are upserts that grow as evidence arrives, so
notifying on every version would spam. The outbox notifies

* ``new``: the first time an *open* alert is seen;
* ``escalated``: when a later version's severity is higher than any severity already
  notified for that alert (evidence updates at the same or a lower severity are silent);
* ``retracted``: once, when an alert that was notified turns ``retracted``, to the same
  targets (digest lines not yet sent are simply dropped);
* ``overdue``: once, a reminder to the same targets when an open case has waited in triage
  state ``new`` longer than ``overdue_after_h`` allows for its severity
  (:meth:`AlertRouter.enqueue_overdue`, checked once a minute by the delivery loop).

Each row has a unique key ``sink|target|alert_id|sev:<severity>`` (or ``|retracted``,
``|overdue``), and
the decision reads only the outbox itself, so a redelivered or replayed alert version
enqueues nothing twice, whatever the store saw before.

Delivery is at-least-once with one narrow window: if the process dies after a sink
accepted a message and before the row was marked delivered, that one message is sent
again on restart (e-mails carry a stable ``Message-ID`` so mail systems can drop it).

Low and medium e-mails wait as ``digest_item`` rows (state ``held``); once the oldest has
waited ``digest_interval_s`` (or on :meth:`Outbox.flush_digest`) they are bundled into one
``digest`` row per recipient, which is then delivered like any other message.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pipeline.alerting import schema as t
from pipeline.alerting.render import SEVERITY_ORDER, notification_view, severity_rank
from pipeline.alerting.store import AlertStore
from pipeline.alerting.store import _naive_utc as _naive

log = logging.getLogger(__name__)

SINK_NAMES = ("slack", "email")


class SinkError(Exception):
    """A delivery that failed; ``retry_after`` (seconds) when the service asked for a pause."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    key: str
    sink: str
    kind: str  # message | digest
    target: str
    alert_id: str | None
    event: str  # new | escalated | retracted | overdue | digest
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


class Sink(Protocol):
    """Delivers one outbox entry or raises (any exception counts as a failed attempt)."""

    name: str

    def send(self, entry: OutboxEntry) -> None: ...


@dataclass(frozen=True)
class Notification:
    """What the router wants sent for one alert to one target."""

    sink: str
    target: str
    kind: str = "message"  # message | digest_item
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. why this recipient


@dataclass(frozen=True)
class Decision:
    event: str  # new | escalated | retracted | overdue
    previous_severity: str = ""
    #: (sink, target) pairs notified about this alert before (escalations reach them too)
    notified: tuple[tuple[str, str], ...] = ()


Route = Callable[[dict[str, Any], Decision], Sequence[Notification]]


@dataclass
class SinkCounters:
    """Per-sink counters for the Prometheus layer (monotonic, since this process started)."""

    enqueued: int = 0
    delivered: int = 0
    failed: int = 0  # failed attempts
    retried: int = 0  # attempts that were retries of an earlier failure


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 2.0
    factor: float = 2.0
    max_s: float = 300.0
    jitter: float = 0.1  # ± share, so many entries do not retry in lockstep

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        d = min(self.max_s, self.base_s * self.factor ** max(0, attempts - 1))
        d *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return max(d, retry_after or 0.0)


@dataclass(frozen=True)
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    digests: int = 0


EventCallback = Callable[[str, str, int], None]  # (sink, what, n): what in SinkCounters fields


def _key(sink: str, target: str, alert_id: str, tag: str) -> str:
    key = f"{sink}|{target}|{alert_id}|{tag}"
    if len(key) > 400:  # absurdly long targets still get a unique, stable key
        key = key[:330] + "|" + hashlib.sha256(key.encode()).hexdigest()[:64]
    return key


class Outbox:
    """The durable queue between the alert store and the sinks (same database)."""

    def __init__(
        self,
        store: AlertStore,
        sinks: Mapping[str, Sink] | None = None,
        *,
        retry: RetryPolicy | None = None,
        lease_s: float = 60.0,
        digest_interval_s: float = 3600.0,
        batch_size: int = 100,
        on_event: EventCallback | None = None,
    ) -> None:
        self.store = store
        self.sinks: dict[str, Sink] = dict(sinks or {})
        self.retry = retry or RetryPolicy()
        self.lease_s = lease_s
        self.digest_interval_s = digest_interval_s
        self.batch_size = batch_size
        self.on_event = on_event
        self.counters: dict[str, SinkCounters] = {n: SinkCounters() for n in SINK_NAMES}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # ------------------------------------------------------------------ counters
    def _count(self, sink: str, what: str, n: int = 1) -> None:
        c = self.counters.setdefault(sink, SinkCounters())
        setattr(c, what, getattr(c, what) + n)
        if self.on_event is not None:
            try:
                self.on_event(sink, what, n)
            except Exception:  # noqa: BLE001 - metrics must never stop delivery
                log.exception("outbox on_event callback failed")

    def backlog(self) -> dict[str, dict[str, int]]:
        """Rows by sink and state (pending, held, delivered, …) — for gauges and tests."""
        o = t.outbox
        out: dict[str, dict[str, int]] = {}
        with self.store.read() as conn:
            for r in conn.execute(
                select(o.c.sink, o.c.state, func.count()).group_by(o.c.sink, o.c.state)
            ):
                out.setdefault(r[0], {})[r[1]] = int(r[2])
        return out

    def entries(self, alert_id: str | None = None) -> list[dict[str, Any]]:
        o = t.outbox
        q = select(o).order_by(o.c.id)
        if alert_id is not None:
            q = q.where(o.c.alert_id == alert_id)
        with self.store.read() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    # ------------------------------------------------------------------ enqueue
    def decide(self, conn: Connection, alert: dict[str, Any]) -> Decision | None:
        """Should this alert version notify anyone? Reads only the outbox (idempotent)."""
        o = t.outbox
        row = conn.execute(
            select(
                func.max(o.c.severity_rank).filter(o.c.event.in_(("new", "escalated"))),
                func.count().filter(o.c.event == "retracted"),
            ).where(o.c.alert_id == alert["alert_id"])
        ).one()
        notified, retracted = row[0], row[1]
        if alert.get("status", "open") == "retracted":
            if notified is not None and not retracted:
                return Decision("retracted", SEVERITY_ORDER[notified])
            return None
        rank = severity_rank(str(alert.get("severity", "high")))
        if notified is None:
            return Decision("new")
        if rank <= notified:
            return None
        prior = conn.execute(
            select(o.c.sink, o.c.target)
            .where(o.c.alert_id == alert["alert_id"], o.c.event.in_(("new", "escalated")))
            .group_by(o.c.sink, o.c.target)
            .order_by(o.c.sink, o.c.target)
        )
        return Decision(
            "escalated", SEVERITY_ORDER[notified], tuple((r.sink, r.target) for r in prior)
        )

    def _told(self, conn: Connection, alert_id: str) -> list[Notification]:
        """Everyone who was (or is about to be) told about the alert, as message targets
        (for a retraction or a reminder); digest lines still waiting are not counted."""
        o = t.outbox
        rows = conn.execute(
            select(o.c.sink, o.c.target, o.c.state, o.c.payload)
            .where(o.c.alert_id == alert_id, o.c.event.in_(("new", "escalated")))
            .order_by(o.c.id)
        )
        told: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            if r.state in ("pending", "delivered", "batched"):
                extra = {
                    k: v for k, v in r.payload.items() if k not in ("alert", "previous_severity")
                }
                told[(r.sink, r.target)] = extra
        return [Notification(s, tg, "message", extra) for (s, tg), extra in told.items()]

    def plan(self, conn: Connection, alert: dict[str, Any], route: Route) -> int:
        """Decide and enqueue the notifications for one stored alert version; returns rows added.

        ``route`` names the targets of ``new`` and ``escalated`` notifications; a retraction
        goes to whoever was notified before.
        """
        decision = self.decide(conn, alert)
        if decision is None:
            return 0
        if decision.event == "retracted":
            notes: Sequence[Notification] = self._told(conn, alert["alert_id"])
        else:
            notes = route(alert, decision)
        return self.enqueue(conn, alert, decision, notes)

    def enqueue(
        self,
        conn: Connection,
        alert: dict[str, Any],
        decision: Decision,
        notes: Sequence[Notification],
    ) -> int:
        """Write notification rows (once per key) in the caller's transaction; call
        :meth:`wake` after it commits so a running loop sends them at once."""
        o = t.outbox
        now = self.store.now()
        aid = alert["alert_id"]
        view = notification_view(alert)
        if decision.event in ("retracted", "overdue"):
            tag = decision.event
        else:
            tag = f"sev:{view['severity']}"
        if decision.event == "overdue":
            view["waited_h"] = round(float(alert.get("_waited_h", 0.0)), 1)
        # digest lines about this alert not yet sent are replaced by the newer notification
        if decision.event == "overdue":
            pass  # a reminder replaces nothing
        elif decision.event == "retracted":
            conn.execute(
                update(o).where(o.c.alert_id == aid, o.c.state == "held").values(state="superseded")
            )
        else:
            for n in notes:
                conn.execute(
                    update(o)
                    .where(
                        o.c.alert_id == aid,
                        o.c.state == "held",
                        o.c.sink == n.sink,
                        o.c.target == n.target,
                    )
                    .values(state="superseded")
                )
        added = 0
        for n in notes:
            if n.kind not in ("message", "digest_item"):
                raise ValueError(f"notification kind {n.kind!r}")
            row = {
                "key": _key(n.sink, n.target, aid, tag),
                "sink": n.sink,
                "kind": n.kind,
                "target": n.target,
                "alert_id": aid,
                "alert_version": view["version"],
                "severity_rank": severity_rank(view["severity"]),
                "event": decision.event,
                "payload": {
                    **n.extra,
                    "alert": view,
                    "previous_severity": decision.previous_severity,
                },
                "state": "held" if n.kind == "digest_item" else "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            if self._insert_once(conn, row):
                added += 1
                self._count(n.sink, "enqueued")
        return added

    # ------------------------------------------------------------------ reminders
    def overdue(self, severity: str, received_before: datetime, limit: int = 200) -> list[Any]:
        """Open alerts of ``severity`` still in triage state ``new`` that the store received
        before ``received_before`` and that have had no reminder: (payload, received_at)."""
        a, o = t.alerts, t.outbox
        reminded = exists().where(o.c.alert_id == a.c.alert_id, o.c.event == "overdue")
        q = (
            select(a.c.payload, a.c.received_at)
            .where(
                a.c.state == "new",
                a.c.status != "retracted",
                a.c.severity == severity,
                a.c.received_at <= _naive(received_before),
                ~reminded,
            )
            .order_by(a.c.received_at, a.c.alert_id)
            .limit(limit)
        )
        with self.store.read() as conn:
            return list(conn.execute(q).all())

    def remind(self, alert: dict[str, Any], waited_h: float) -> int:
        """One ``overdue`` reminder about ``alert`` to everyone told about it (once per
        target: the rows' keys end in ``|overdue``); returns rows added."""
        with self.store.write() as conn:
            notes = self._told(conn, alert["alert_id"])
            if not notes:
                return 0
            return self.enqueue(conn, {**alert, "_waited_h": waited_h}, Decision("overdue"), notes)

    # ------------------------------------------------------------------ reports
    def missing(self, tag: str, sink: str, targets: Sequence[str]) -> list[str]:
        """The targets that have no row for ``tag`` yet (e.g. ``report:2026-03-01``)."""
        o = t.outbox
        keys = {_key(sink, tg, "-", tag): tg for tg in targets}
        with self.store.read() as conn:
            have = set(conn.execute(select(o.c.key).where(o.c.key.in_(list(keys)))).scalars())
        return [tg for k, tg in keys.items() if k not in have]

    def enqueue_report(
        self, tag: str, sink: str, targets: Sequence[str], payload: dict[str, Any]
    ) -> int:
        """One ``report`` row per target, once per ``tag``."""
        added = 0
        with self.store.write() as conn:
            now = self.store.now()
            for tg in targets:
                row = {
                    "key": _key(sink, tg, "-", tag),
                    "sink": sink,
                    "kind": "report",
                    "target": tg,
                    "alert_id": None,
                    "alert_version": None,
                    "severity_rank": None,
                    "event": "report",
                    "payload": payload,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                if self._insert_once(conn, row):
                    added += 1
                    self._count(sink, "enqueued")
        return added

    @staticmethod
    def _insert_once(conn: Connection, row: dict[str, Any]) -> int:
        name = conn.dialect.name
        if name == "postgresql":
            stmt: Any = (
                postgresql.insert(t.outbox)
                .values(**row)
                .on_conflict_do_nothing(index_elements=["key"])
            )
        elif name == "sqlite":
            stmt = (
                sqlite.insert(t.outbox).values(**row).on_conflict_do_nothing(index_elements=["key"])
            )
        else:  # pragma: no cover - other databases: check first
            if conn.execute(select(t.outbox.c.id).where(t.outbox.c.key == row["key"])).first():
                return 0
            stmt = insert(t.outbox).values(**row)
        # RETURNING, not rowcount: psycopg reports -1 for some statements
        return 0 if conn.execute(stmt.returning(t.outbox.c.id)).first() is None else 1

    # ------------------------------------------------------------------ digests
    def batch_digests(self, now: datetime | None = None, only_due: bool = True) -> int:
        """Bundle held digest lines into one ``digest`` row per recipient; returns rows made.

        ``only_due``: only recipients whose oldest line has waited ``digest_interval_s``.
        The age lives in the table, so restarts neither lose nor postpone a digest.
        """
        o = t.outbox
        now = self.store.now() if now is None else _naive(now)
        made = 0
        with self.store.write() as conn:
            rows = conn.execute(
                select(o.c.id, o.c.sink, o.c.target, o.c.created_at, o.c.payload, o.c.alert_id)
                .where(o.c.kind == "digest_item", o.c.state == "held")
                .order_by(o.c.sink, o.c.target, o.c.id)
            ).all()
            groups: dict[tuple[str, str], list[Any]] = {}
            for r in rows:
                groups.setdefault((r.sink, r.target), []).append(r)
            cutoff = now - timedelta(seconds=self.digest_interval_s)
            for (sink, target), items in groups.items():
                if only_due and min(r.created_at for r in items) > cutoff:
                    continue
                ids = [r.id for r in items]
                key = _key(sink, target, "digest", f"{ids[0]}-{ids[-1]}-{len(ids)}")
                made += self._insert_once(
                    conn,
                    {
                        "key": key,
                        "sink": sink,
                        "kind": "digest",
                        "target": target,
                        "alert_id": None,
                        "alert_version": None,
                        "severity_rank": max(
                            severity_rank(r.payload["alert"]["severity"]) for r in items
                        ),
                        "event": "digest",
                        "payload": {"items": [r.payload for r in items]},
                        "state": "pending",
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    },
                )
                conn.execute(
                    update(o).where(o.c.id.in_(ids)).values(state="batched", batch_key=key)
                )
        return made

    def next_digest_due(self) -> datetime | None:
        o = t.outbox
        with self.store.read() as conn:
            oldest = conn.execute(
                select(func.min(o.c.created_at)).where(
                    o.c.kind == "digest_item", o.c.state == "held"
                )
            ).scalar()
        return None if oldest is None else oldest + timedelta(seconds=self.digest_interval_s)

    def flush_digest(self, now: datetime | None = None) -> int:
        """Send every held digest line now: one mail per recipient. Returns digests delivered."""
        self.batch_digests(now, only_due=False)
        return self.deliver_due(now, kinds=("digest",)).delivered

    # ------------------------------------------------------------------ delivery
    def _claim(self, now: datetime, kinds: Sequence[str] | None) -> list[OutboxEntry]:
        o = t.outbox
        earlier = o.alias("earlier")
        q = (
            select(o)
            .where(
                o.c.state == "pending",
                o.c.next_attempt_at <= now,
                (o.c.lease_until.is_(None)) | (o.c.lease_until < now),
                # keep each target's messages about one alert in order (new before escalated)
                ~exists().where(
                    earlier.c.alert_id == o.c.alert_id,
                    earlier.c.sink == o.c.sink,
                    earlier.c.target == o.c.target,
                    earlier.c.state == "pending",
                    earlier.c.id < o.c.id,
                ),
            )
            .order_by(o.c.id)
            .limit(self.batch_size)
        )
        if kinds:
            q = q.where(o.c.kind.in_(kinds))
        with self.store.write() as conn:
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True, of=o)
            rows = conn.execute(q).all()
            if rows:
                conn.execute(
                    update(o)
                    .where(o.c.id.in_([r.id for r in rows]))
                    .values(lease_until=now + timedelta(seconds=self.lease_s))
                )
        return [
            OutboxEntry(
                r.id,
                r.key,
                r.sink,
                r.kind,
                r.target,
                r.alert_id,
                r.event,
                dict(r.payload),
                r.attempts,
                r.created_at,
            )
            for r in rows
        ]

    def deliver_due(
        self, now: datetime | None = None, kinds: Sequence[str] | None = None
    ) -> DeliveryReport:
        """One pass: bundle due digests, then try every due entry once."""
        now = self.store.now() if now is None else _naive(now)
        digests = self.batch_digests(now, only_due=True) if kinds is None else 0
        delivered = failed = 0
        while True:
            batch = self._claim(now, kinds)
            if not batch:
                break
            # failed entries are rescheduled past ``now``, so this ends; entries that waited
            # behind an earlier one for the same target become claimable in the next round
            for e in batch:
                if self._send(e, now):
                    delivered += 1
                else:
                    failed += 1
        return DeliveryReport(delivered, failed, digests)

    def _send(self, e: OutboxEntry, now: datetime) -> bool:
        o = t.outbox
        sink = self.sinks.get(e.sink)
        if e.attempts:
            self._count(e.sink, "retried")
        try:
            if sink is None:
                raise SinkError(f"no {e.sink} sink configured")
            sink.send(e)
        except Exception as exc:  # noqa: BLE001 - every failure is retried later
            attempts = e.attempts + 1
            retry_after = getattr(exc, "retry_after", None)
            delay = self.retry.delay(attempts, retry_after)
            log.warning(
                "outbox: %s to %s failed (attempt %d, next in %.1fs): %s",
                e.sink,
                e.target,
                attempts,
                delay,
                exc,
            )
            with self.store.write() as conn:
                conn.execute(
                    update(o)
                    .where(o.c.id == e.id)
                    .values(
                        attempts=attempts,
                        next_attempt_at=now + timedelta(seconds=delay),
                        lease_until=None,
                        last_error=f"{type(exc).__name__}: {exc}"[:2000],
                    )
                )
            self._count(e.sink, "failed")
            return False
        with self.store.write() as conn:
            conn.execute(
                update(o)
                .where(o.c.id == e.id)
                .values(
                    state="delivered",
                    attempts=e.attempts + 1,
                    delivered_at=self.store.now(),
                    lease_until=None,
                )
            )
        self._count(e.sink, "delivered")
        return True

    # ------------------------------------------------------------------ background loop
    def wake(self) -> None:
        """Ask the background loop for a pass now (call after committing new rows)."""
        self._wake.set()

    def start(self, poll_interval_s: float = 1.0, before: Callable[[], None] | None = None) -> None:
        """Deliver in a daemon thread until :meth:`stop`; new rows wake it at once.
        ``before`` runs at the start of every pass (the router's monthly reports)."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    if before is not None:
                        before()
                    self.deliver_due()
                except Exception:  # noqa: BLE001 - e.g. the database is briefly away
                    log.exception("outbox delivery pass failed")
                self._wake.wait(poll_interval_s)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="emrwatch-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None
