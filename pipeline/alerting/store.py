"""The alert store: every alert version, the analysts' triage, their verdicts and the audit log.

SQLite by default (one file, nothing to run), PostgreSQL in production; the schema is
created and upgraded by Alembic migrations when the store opens (``migrate=False`` skips
that for read-only tools). ``sqlite://`` (in memory) is one shared connection: for tests
and single-threaded tools only. Several processes may share one file or one PostgreSQL
database (writers serialise; PostgreSQL rows are locked per alert).

Alerts are **upserts** keyed by ``alert_id``: a higher ``version`` replaces the stored one,
an older or equal version (a redelivery, a replay, a stream catching up) is ignored, so
writing the same alert topic twice leaves the store as it was. Triage state, assignee and
verdict belong to the store, not to the alert, and survive new versions.

Triage::

    new ──▶ acknowledged ──▶ investigating ──▶ closed_confirmed
                                   ▲       └──▶ closed_benign
                                   └────────── (re-open a closed case)

Every transition is kept in ``triage_history`` (who, when, from, to, assignee, note);
closing needs a note. A benign verdict may create suppressions (the detection
``exceptions`` of :class:`detectors.config.Exception_`), each with a preview of the stored
alerts it would have hidden. ``labels()`` exports verdicts for model training.

>>> store = AlertStore("sqlite://")
>>> store.upsert([{"alert_id": "ew-1", "version": 1, "severity": "high", "user_id": "u1",
...               "event_ids": ["e1"], "last_seen": "2026-03-02T10:00:00+08:00"}]).inserted
1
>>> store.transition("ew-1", "acknowledged", actor="analyst1").to_state
'acknowledged'
>>> store.get("ew-1").state
'acknowledged'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    delete,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from detectors.alerts import Alert
from pipeline.alerting import schema as t
from pipeline.alerting.chain import chained_insert
from pipeline.alerting.feedstate import FeedSession, FeedStateMixin
from pipeline.alerting.records import (
    _SUMMARY_COLS,
    DEFAULT_URL,
    RESPONSE_TARGET_H,
    SORTS,
    TRANSITIONS,
    TRIAGE_STATES,
    VERDICTS,
    AlertChange,
    AlertFilter,
    AlertStoreError,
    AlertSummary,
    AuditEntry,
    Clock,
    HistoryEntry,
    InvalidAlert,
    InvalidTransition,
    Label,
    Page,
    StoredAlert,
    Suppression,
    SuppressionPreview,
    SuppressionSpec,
    UnknownAlert,
    UpsertCounts,
    UpsertHook,
    _alert_dict,
    _aware,
    _aware_opt,
    _bulk_insert,
    _decode_cursor,
    _encode_cursor,
    _naive_utc,
    _new_id,
    _summary,
    _utcnow,
    alert_patient_ids,
    make_engine,
    normalize_url,
    parse_time,
)
from pipeline.alerting.render import severity_rank
from pipeline.alerting.suppress import SuppressionsMixin

__all__ = [
    "DEFAULT_URL",
    "TRANSITIONS",
    "TRIAGE_STATES",
    "AlertChange",
    "AlertFilter",
    "AlertStore",
    "AlertStoreError",
    "AlertSummary",
    "AuditEntry",
    "FeedSession",
    "HistoryEntry",
    "InvalidAlert",
    "InvalidTransition",
    "Label",
    "Page",
    "StoredAlert",
    "Suppression",
    "SuppressionPreview",
    "SuppressionSpec",
    "UnknownAlert",
    "UpsertCounts",
    "UpsertHook",
    "make_engine",
    "normalize_url",
    "parse_time",
]

_CHUNK = 5000  # alerts per transaction: big enough for backfills, short enough for triage clicks


# ---------------------------------------------------------------------------- the store
class AlertStore(SuppressionsMixin, FeedStateMixin):
    """Alerts, triage, suppressions and the audit log in one SQL database (and the alert
    feed's sessions: :mod:`pipeline.alerting.feedstate`)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        migrate: bool = True,
        clock: Clock | None = None,
        echo: bool = False,
    ) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, echo=echo)
        self._writer = self.engine.execution_options(emrwatch_write=True)
        self.clock: Clock = clock or _utcnow
        if migrate:
            t.migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> datetime:
        """The store's clock as naive UTC (the column format)."""
        return _naive_utc(self.clock())

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE); the outbox shares it."""
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    # ------------------------------------------------------------------ ingest
    def upsert(
        self, alerts: Iterable[Alert | dict[str, Any]], hook: UpsertHook | None = None
    ) -> UpsertCounts:
        """Store alert versions idempotently; ``hook`` runs in the same transaction with the
        versions actually applied (the outbox enqueues notifications there)."""
        latest: dict[str, dict[str, Any]] = {}
        ignored = 0
        for a in alerts:
            d = _alert_dict(a)
            prev = latest.get(d["alert_id"])
            if prev is not None:
                ignored += 1
                if d["version"] <= prev["version"]:
                    continue
            latest[d["alert_id"]] = d
        inserted = updated = 0
        items = list(latest.values())
        for i in range(0, len(items), _CHUNK):
            chunk = items[i : i + _CHUNK]
            for attempt in range(3):
                try:
                    with self.write() as conn:
                        n_ins, n_upd, n_ign = self._upsert_chunk(conn, chunk, hook)
                    break
                except (IntegrityError, OperationalError):
                    # a concurrent writer inserted one of these ids first (or, on SQLite,
                    # held the lock past the timeout): re-read and decide again
                    if attempt == 2:
                        raise
            inserted, updated, ignored = inserted + n_ins, updated + n_upd, ignored + n_ign
        return UpsertCounts(inserted, updated, ignored)

    def _upsert_chunk(
        self, conn: Connection, chunk: list[dict[str, Any]], hook: UpsertHook | None
    ) -> tuple[int, int, int]:
        a = t.alerts
        ids = [d["alert_id"] for d in chunk]
        q = select(a.c.alert_id, a.c.version, a.c.severity, a.c.status).where(a.c.alert_id.in_(ids))
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()
        existing = {r.alert_id: r for r in conn.execute(q)}
        now = self.now()
        new_rows, upd_rows, changes = [], [], []
        for d in chunk:
            old = existing.get(d["alert_id"])
            if old is not None and d["version"] <= old.version:
                continue
            row = self._row(d, now)
            if old is None:
                row.update(state="new", received_at=now)
                new_rows.append(row)
                changes.append(AlertChange(d, None, None, None))
            else:
                upd_rows.append(row)
                changes.append(AlertChange(d, old.version, old.severity, old.status))
        if new_rows:
            _bulk_insert(conn, a, new_rows)
        for row in upd_rows:
            conn.execute(
                update(a)
                .where(a.c.alert_id == row["alert_id"], a.c.version < row["version"])
                .values(**row)
            )
        if upd_rows:
            upd_ids = [r["alert_id"] for r in upd_rows]
            conn.execute(delete(t.alert_events).where(t.alert_events.c.alert_id.in_(upd_ids)))
            conn.execute(delete(t.alert_detectors).where(t.alert_detectors.c.alert_id.in_(upd_ids)))
            conn.execute(delete(t.alert_patients).where(t.alert_patients.c.alert_id.in_(upd_ids)))
        ev_rows, det_rows, pat_rows = [], [], []
        for row in new_rows + upd_rows:
            d = row["payload"]
            seen: set[str] = set()
            for seq, eid in enumerate(d.get("event_ids") or []):
                if eid not in seen:
                    seen.add(eid)
                    ev_rows.append({"alert_id": row["alert_id"], "event_id": eid, "seq": seq})
            for pid in alert_patient_ids(d):
                pat_rows.append({"alert_id": row["alert_id"], "patient_id": pid[:128]})
            for det in dict.fromkeys(d["detector"]):
                det_rows.append(
                    {"alert_id": row["alert_id"], "detector": det, "last_seen": row["last_seen"]}
                )
        _bulk_insert(conn, t.alert_events, ev_rows)
        _bulk_insert(conn, t.alert_detectors, det_rows)
        _bulk_insert(conn, t.alert_patients, pat_rows)
        if hook is not None and changes:
            hook(conn, changes)
        return len(new_rows), len(upd_rows), len(chunk) - len(changes)

    @staticmethod
    def _row(d: dict[str, Any], now: datetime) -> dict[str, Any]:
        first = parse_time(d.get("first_seen"))
        last = parse_time(d.get("last_seen")) or first or now
        sev = str(d.get("severity") or "high")
        return {
            "alert_id": d["alert_id"],
            "version": d["version"],
            "severity": sev,
            "severity_rank": severity_rank(sev),
            "score": float(d.get("score") or 0.0),
            "risk": float(d.get("risk") or 0.0),
            "user_id": str(d.get("user_id") or ""),
            "department_id": str(d.get("department_id") or ""),
            "role": str(d.get("role") or ""),
            "detectors": ",".join(d["detector"]),
            "reason": str(d.get("reason") or ""),
            "first_seen": first,
            "last_seen": last,
            "first_seen_text": str(d.get("first_seen") or "")[:40],
            "last_seen_text": str(d.get("last_seen") or "")[:40],
            "n_events": len(set(d.get("event_ids") or [])),
            "n_patients": len(set(d.get("patient_ids") or [])),
            "status": str(d.get("status") or "open"),
            "payload": d,
            "updated_at": now,
        }

    # ------------------------------------------------------------------ reading
    def get(self, alert_id: str) -> StoredAlert | None:
        a = t.alerts
        with self.read() as conn:
            r = conn.execute(
                select(
                    a.c.payload,
                    a.c.state,
                    a.c.assignee,
                    a.c.verdict,
                    a.c.decided_by,
                    a.c.decided_at,
                    a.c.received_at,
                    a.c.updated_at,
                ).where(a.c.alert_id == alert_id)
            ).first()
        if r is None:
            return None
        return StoredAlert(
            alert=dict(r.payload),
            state=r.state,
            assignee=r.assignee,
            verdict=r.verdict,
            decided_by=r.decided_by,
            decided_at=_aware_opt(r.decided_at),
            received_at=_aware(r.received_at),
            updated_at=_aware(r.updated_at),
        )

    def event_ids(self, alert_id: str) -> list[str]:
        """The evidence of an alert, in the alert's own order."""
        e = t.alert_events
        with self.read() as conn:
            rows = conn.execute(
                select(e.c.event_id).where(e.c.alert_id == alert_id).order_by(e.c.seq)
            )
            return [r.event_id for r in rows]

    def alerts_on_patients(
        self, patient_ids: Iterable[str], exclude: str | None = None, limit: int = 20
    ) -> tuple[list[AlertSummary], int]:
        """The cases whose evidence touches any of ``patient_ids`` (but ``exclude``), the
        most recent first, up to ``limit``; and how many there are in all."""
        pids = list(dict.fromkeys(str(p) for p in patient_ids if p))
        if not pids:
            return [], 0
        a, ap = t.alerts, t.alert_patients
        hit = select(ap.c.alert_id).where(ap.c.patient_id.in_(pids)).distinct()
        if exclude is not None:
            hit = hit.where(ap.c.alert_id != exclude)
        ids = hit.subquery()
        with self.read() as conn:
            total = conn.execute(select(func.count()).select_from(ids)).scalar_one()
            rows = conn.execute(
                select(*_SUMMARY_COLS)
                .where(a.c.alert_id.in_(select(ids.c.alert_id)))
                .order_by(a.c.last_seen.desc(), a.c.alert_id)
                .limit(limit)
            ).all()
        return [_summary(r) for r in rows], int(total)

    def alerts_for_event(self, event_id: str) -> list[str]:
        """Traceability backwards: which alerts rest on this access event."""
        e = t.alert_events
        with self.read() as conn:
            return [
                r.alert_id
                for r in conn.execute(select(e.c.alert_id).where(e.c.event_id == event_id))
            ]

    def _where(self, f: AlertFilter, skip_detector: bool = False) -> list[Any]:
        a = t.alerts
        cond: list[Any] = []
        if f.severity:
            cond.append(a.c.severity_rank.in_([severity_rank(s) for s in f.severity]))
        if f.min_severity:
            cond.append(a.c.severity_rank >= severity_rank(f.min_severity))
        for col, vals in (
            (a.c.state, f.state),
            (a.c.status, f.status),
            (a.c.department_id, f.department_id),
            (a.c.user_id, f.user_id),
            (a.c.assignee, f.assignee),
        ):
            if vals:
                cond.append(col == vals[0] if len(vals) == 1 else col.in_(vals))
        if f.unassigned:
            cond.append(or_(a.c.assignee.is_(None), a.c.assignee == ""))
        if f.last_seen_from is not None:
            cond.append(a.c.last_seen >= parse_time(f.last_seen_from))
        if f.last_seen_to is not None:
            cond.append(a.c.last_seen < parse_time(f.last_seen_to))
        if f.late:
            now = self.clock()
            cond += [a.c.state == "new", a.c.status != "retracted"]
            cond.append(
                or_(
                    *[
                        and_(
                            a.c.severity == sev,
                            a.c.received_at < _naive_utc(now - timedelta(hours=hours)),
                        )
                        for sev, hours in RESPONSE_TARGET_H.items()
                    ]
                )
            )
        if f.detector and not skip_detector:
            d = t.alert_detectors
            cond.append(a.c.alert_id.in_(select(d.c.alert_id).where(d.c.detector.in_(f.detector))))
        if f.patient_id:
            ap = t.alert_patients
            hit = select(ap.c.alert_id).where(ap.c.patient_id.in_(f.patient_id))
            cond.append(a.c.alert_id.in_(hit))
        return cond

    def page(
        self,
        filters: AlertFilter | None = None,
        cursor: str | None = None,
        limit: int = 50,
        sort: str = "last_seen",
    ) -> Page:
        """One page of the feed, newest first (or most severe first), keyset-paginated.

        The cursor is opaque; alerts arriving meanwhile never shift the pages already read.
        """
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}")
        limit = max(1, min(int(limit), 500))
        f = filters or AlertFilter()
        a = t.alerts
        via_detector = len(f.detector) == 1 and sort == "last_seen"
        q = select(*_SUMMARY_COLS)
        if via_detector:
            d = t.alert_detectors
            q = q.select_from(d.join(a, a.c.alert_id == d.c.alert_id)).where(
                d.c.detector == f.detector[0]
            )
            ls, aid = d.c.last_seen, d.c.alert_id
        else:
            ls, aid = a.c.last_seen, a.c.alert_id
        q = q.where(*self._where(f, skip_detector=via_detector))
        keys = [ls, aid] if sort == "last_seen" else [a.c.severity_rank, ls, aid]
        if cursor:
            vals = _decode_cursor(cursor, sort)[1:]
            q = q.where(
                tuple_(*keys)
                < tuple_(*[_naive_utc(v) if isinstance(v, datetime) else v for v in vals])
            )
        q = q.order_by(*[k.desc() for k in keys]).limit(limit + 1)
        with self.read() as conn:
            rows = conn.execute(q).all()
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = None
        if more:
            last = rows[-1]
            vals = [last.last_seen, last.alert_id]
            if sort == "severity":
                vals = [last.severity_rank, *vals]
            nxt = _encode_cursor([sort, *vals])
        return Page([_summary(r) for r in rows], nxt)

    def count(self, filters: AlertFilter | None = None) -> int:
        q = select(func.count()).select_from(t.alerts).where(*self._where(filters or AlertFilter()))
        with self.read() as conn:
            return int(conn.execute(q).scalar_one())

    # ------------------------------------------------------------------ triage
    def transition(
        self,
        alert_id: str,
        to: str,
        actor: str,
        note: str = "",
        assignee: str | None = None,
        *,
        suppress: Sequence[SuppressionSpec] = (),
    ) -> HistoryEntry:
        """Move a case along the triage workflow; raise :class:`InvalidTransition` otherwise.

        Closing needs a note. ``suppress`` (only with ``closed_benign``) creates suppressions
        in the same transaction, linked to this alert.
        """
        if to not in TRIAGE_STATES:
            raise InvalidTransition(f"unknown triage state {to!r}; states are {TRIAGE_STATES}")
        if not actor:
            raise InvalidTransition("a triage step needs the actor's identity")
        if to in VERDICTS and not note.strip():
            raise InvalidTransition(f"closing alert {alert_id} as {to} needs a note (why)")
        if suppress and to != "closed_benign":
            raise InvalidTransition("suppressions can only come with a closed_benign verdict")
        a = t.alerts
        with self.write() as conn:
            cur = self._locked_state(conn, alert_id)
            allowed = TRANSITIONS[cur.state]
            if to not in allowed:
                raise InvalidTransition(
                    f"alert {alert_id} is {cur.state!r}: it cannot go to {to!r}; "
                    f"allowed next: {', '.join(allowed)}"
                )
            now = self.now()
            values: dict[str, Any] = {"state": to}
            if assignee is not None:
                values["assignee"] = assignee or None
            if to in VERDICTS:
                values.update(verdict=VERDICTS[to], decided_by=actor, decided_at=now)
            elif cur.state in VERDICTS:  # re-opened: the verdict no longer stands
                values.update(verdict=None, decided_by=None, decided_at=None)
            conn.execute(update(a).where(a.c.alert_id == alert_id).values(**values))
            entry = self._history_row(conn, alert_id, now, actor, cur.state, to, assignee, note)
            for spec in suppress:
                self._insert_suppression(conn, spec, actor, alert_id, now)
        return entry

    def comment(
        self, alert_id: str, actor: str, note: str = "", assignee: str | None = None
    ) -> HistoryEntry:
        """A note or a (re)assignment without a state change; kept in the history too."""
        if not actor:
            raise InvalidTransition("a triage step needs the actor's identity")
        if not note.strip() and assignee is None:
            raise InvalidTransition("a comment needs a note or an assignee")
        a = t.alerts
        with self.write() as conn:
            cur = self._locked_state(conn, alert_id)
            if assignee is not None:
                conn.execute(
                    update(a).where(a.c.alert_id == alert_id).values(assignee=assignee or None)
                )
            return self._history_row(
                conn, alert_id, self.now(), actor, cur.state, cur.state, assignee, note
            )

    def _locked_state(self, conn: Connection, alert_id: str) -> Any:
        a = t.alerts
        q = select(a.c.state, a.c.assignee).where(a.c.alert_id == alert_id)
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()
        cur = conn.execute(q).first()
        if cur is None:
            raise UnknownAlert(f"no alert {alert_id!r} in the store")
        return cur

    @staticmethod
    def _history_row(
        conn: Connection,
        alert_id: str,
        at: datetime,
        actor: str,
        frm: str,
        to: str,
        assignee: str | None,
        note: str,
    ) -> HistoryEntry:
        res = chained_insert(
            conn,
            t.triage_history,
            {
                "alert_id": alert_id,
                "at": at,
                "actor": actor,
                "from_state": frm,
                "to_state": to,
                "assignee": assignee,
                "note": note,
            },
        )
        hid = _new_id(res)
        return HistoryEntry(hid, alert_id, _aware(at), actor, frm, to, assignee, note)

    def history(self, alert_id: str) -> list[HistoryEntry]:
        h = t.triage_history
        with self.read() as conn:
            rows = conn.execute(select(h).where(h.c.alert_id == alert_id).order_by(h.c.id))
            return [
                HistoryEntry(
                    r.id,
                    r.alert_id,
                    _aware(r.at),
                    r.actor,
                    r.from_state,
                    r.to_state,
                    r.assignee,
                    r.note,
                )
                for r in rows
            ]

    def first_received(self) -> datetime | None:
        """When the store received its first alert (UTC), or None while it is empty."""
        with self.read() as conn:
            first = conn.execute(select(func.min(t.alerts.c.received_at))).scalar()
        return _aware(first) if first is not None else None

    def labels(self, since: datetime | None = None) -> list[Label]:
        """Every analyst verdict (``confirmed`` / ``benign``), oldest decision first."""
        a, e = t.alerts, t.alert_events
        q = select(
            a.c.alert_id,
            a.c.user_id,
            a.c.verdict,
            a.c.severity,
            a.c.detectors,
            a.c.version,
            a.c.decided_by,
            a.c.decided_at,
        ).where(a.c.verdict.is_not(None))
        if since is not None:
            q = q.where(a.c.decided_at >= _naive_utc(since))
        q = q.order_by(a.c.decided_at, a.c.alert_id)
        with self.read() as conn:
            rows = conn.execute(q).all()
            evs: dict[str, list[str]] = {r.alert_id: [] for r in rows}
            ids = list(evs)
            for i in range(0, len(ids), _CHUNK):
                for r in conn.execute(
                    select(e.c.alert_id, e.c.event_id)
                    .where(e.c.alert_id.in_(ids[i : i + _CHUNK]))
                    .order_by(e.c.alert_id, e.c.seq)
                ):
                    evs[r.alert_id].append(r.event_id)
        return [
            Label(
                alert_id=r.alert_id,
                user_id=r.user_id,
                verdict=r.verdict,
                severity=r.severity,
                detectors=[x for x in r.detectors.split(",") if x],
                version=r.version,
                decided_by=r.decided_by,
                decided_at=_aware(r.decided_at),
                event_ids=evs[r.alert_id],
            )
            for r in rows
        ]

    def undecided_event_ids(self) -> set[str]:
        """The evidence of every alert still without a verdict (open or re-opened): events
        whose fate no analyst has decided yet, which training must neither call misuse nor
        benign."""
        a, e = t.alerts, t.alert_events
        q = (
            select(e.c.event_id)
            .join(a, a.c.alert_id == e.c.alert_id)
            .where(a.c.verdict.is_(None))
            .distinct()
        )
        with self.read() as conn:
            return {r.event_id for r in conn.execute(q)}

    # ------------------------------------------------------------------ audit
    @staticmethod
    def _audit(
        conn: Connection, at: datetime, actor: str, action: str, alert_id: str | None, detail: str
    ) -> int:
        values = {"at": at, "actor": actor, "action": action, "alert_id": alert_id,
                  "detail": detail}  # fmt: skip
        return _new_id(chained_insert(conn, t.audit_log, values))

    def record_access(
        self,
        actor: str,
        action: str,
        alert_id: str | None = None,
        detail: str | dict[str, Any] = "",
    ) -> AuditEntry:
        """Append to the audit log: who viewed or unmasked what (``case.view``, ``unmask``…)."""
        if not actor or not action:
            raise ValueError("record_access needs an actor and an action")
        text = json.dumps(detail, sort_keys=True) if isinstance(detail, dict) else str(detail)
        with self.write() as conn:
            now = self.now()
            aid = self._audit(conn, now, actor, action, alert_id, text)
        return AuditEntry(aid, _aware(now), actor, action, alert_id, text)

    def audit_log(
        self,
        alert_id: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        limit: int = 200,
        actions: Sequence[str] | None = None,
        until: datetime | None = None,
    ) -> list[AuditEntry]:
        """Audit entries, newest first (only ``actions``, when given; from ``since``
        inclusive to ``until`` exclusive)."""
        lg = t.audit_log
        q = select(lg)
        if alert_id is not None:
            q = q.where(lg.c.alert_id == alert_id)
        if actor is not None:
            q = q.where(lg.c.actor == actor)
        if actions is not None:
            q = q.where(lg.c.action.in_(list(actions)))
        if since is not None:
            q = q.where(lg.c.at >= _naive_utc(since))
        if until is not None:
            q = q.where(lg.c.at < _naive_utc(until))
        q = q.order_by(lg.c.id.desc()).limit(limit)
        with self.read() as conn:
            return [
                AuditEntry(
                    r.id, _aware(r.at), r.actor, r.action, r.alert_id, r.detail, r.chain or ""
                )
                for r in conn.execute(q)
            ]
