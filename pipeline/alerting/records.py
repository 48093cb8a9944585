"""The alert store's value types, errors and database helpers (see :mod:`.store`)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import JSON, Connection, Engine, create_engine, event, insert
from sqlalchemy.pool import StaticPool

from detectors.alerts import Alert
from detectors.config import Exception_
from pipeline.alerting import schema as t
from pipeline.alerting.render import SEVERITY_ORDER

DEFAULT_URL = "sqlite:///emrwatch-alerts.sqlite3"
TRIAGE_STATES = ("new", "acknowledged", "investigating", "closed_confirmed", "closed_benign")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "new": ("acknowledged",),
    "acknowledged": ("investigating",),
    "investigating": ("closed_confirmed", "closed_benign"),
    "closed_confirmed": ("investigating",),
    "closed_benign": ("investigating",),
}
VERDICTS = {"closed_confirmed": "confirmed", "closed_benign": "benign"}
#: hours a case may wait for its first triage step, by severity: the privacy report counts
#: cases past it as late, the feed marks them, and the default reminders use the first two
RESPONSE_TARGET_H = {"critical": 4.0, "high": 24.0, "medium": 72.0, "low": 168.0}
SORTS = ("last_seen", "severity")

Clock = Callable[[], datetime]


class AlertStoreError(Exception):
    """Base of the store's errors."""


class UnknownAlert(AlertStoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown alert"


class InvalidTransition(AlertStoreError, ValueError):
    """A triage step the workflow does not allow; the message names the allowed ones."""


class InvalidAlert(AlertStoreError, ValueError):
    """An alert record the store cannot take (no id, bad version)."""


# ---------------------------------------------------------------------------- values
@dataclass(frozen=True)
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    ignored: int = 0  # older or equal versions: redeliveries and replays

    @property
    def applied(self) -> int:
        return self.inserted + self.updated


@dataclass(frozen=True)
class AlertChange:
    """One alert version that the store accepted, with what it replaced (None: first sight)."""

    alert: dict[str, Any]
    previous_version: int | None
    previous_severity: str | None
    previous_status: str | None


UpsertHook = Callable[[Connection, list[AlertChange]], None]


@dataclass(frozen=True)
class AlertSummary:
    """One feed row: what the list shows, without the evidence."""

    alert_id: str
    version: int
    severity: str
    score: float
    user_id: str
    department_id: str
    role: str
    detectors: list[str]
    reason: str
    first_seen: str
    last_seen: str
    n_events: int
    n_patients: int
    status: str
    state: str
    assignee: str | None
    verdict: str | None
    updated_at: datetime
    received_at: datetime | None = None  # when the store first had it (UTC)

    def late_h(self, now: datetime) -> int | None:
        """Whole hours an open case has waited untouched (triage state ``new``) since it
        arrived, once that is past :data:`RESPONSE_TARGET_H` for its severity; else None."""
        if self.state != "new" or self.status == "retracted" or self.received_at is None:
            return None
        waited = (now - self.received_at).total_seconds() / 3600
        target = RESPONSE_TARGET_H.get(self.severity, RESPONSE_TARGET_H["low"])
        return int(waited) if waited > target else None


@dataclass(frozen=True)
class StoredAlert:
    alert: dict[str, Any]  # the latest version, as the detector wrote it
    state: str
    assignee: str | None
    verdict: str | None
    decided_by: str | None
    decided_at: datetime | None
    received_at: datetime
    updated_at: datetime

    @property
    def alert_id(self) -> str:
        return str(self.alert["alert_id"])

    @property
    def version(self) -> int:
        return int(self.alert.get("version", 1))


def alert_patient_ids(alert: dict[str, Any]) -> list[str]:
    """An alert's patient ids as the store indexes them: each once, in order, none empty.

    >>> alert_patient_ids({"patient_ids": ["p1", "", "p2", "p1"]})
    ['p1', 'p2']
    """
    return list(dict.fromkeys(str(p) for p in alert.get("patient_ids") or [] if p))


def _tuple(v: str | Sequence[str] | None) -> tuple[str, ...]:
    if v is None or v == "":
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


@dataclass(frozen=True)
class AlertFilter:
    """Feed filters; each accepts one value or several (any of them matches)."""

    severity: str | Sequence[str] = ()
    min_severity: str = ""
    state: str | Sequence[str] = ()  # triage state
    status: str | Sequence[str] = ()  # detector status: open | retracted
    department_id: str | Sequence[str] = ()
    detector: str | Sequence[str] = ()
    user_id: str | Sequence[str] = ()
    last_seen_from: datetime | str | None = None
    last_seen_to: datetime | str | None = None
    #: only open cases still untouched (triage state new) past their severity's
    #: :data:`RESPONSE_TARGET_H`
    late: bool = False
    #: assigned to any of these analysts; ``unassigned`` for cases nobody has
    assignee: str | Sequence[str] = ()
    unassigned: bool = False
    #: cases whose evidence touches any of these patients
    patient_id: str | Sequence[str] = ()

    def __post_init__(self) -> None:
        for name in (
            "severity",
            "state",
            "status",
            "department_id",
            "detector",
            "user_id",
            "assignee",
            "patient_id",
        ):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        bad = [s for s in self.severity if s not in SEVERITY_ORDER]
        if bad or (self.min_severity and self.min_severity not in SEVERITY_ORDER):
            raise ValueError(f"unknown severity {bad or self.min_severity}; use {SEVERITY_ORDER}")
        bad = [s for s in self.state if s not in TRIAGE_STATES]
        if bad:
            raise ValueError(f"unknown triage state(s) {bad}; use {TRIAGE_STATES}")


@dataclass(frozen=True)
class Page:
    items: list[AlertSummary]
    next_cursor: str | None  # pass back to page() for the next rows; None at the end


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    alert_id: str
    at: datetime
    actor: str
    from_state: str
    to_state: str
    assignee: str | None
    note: str


@dataclass(frozen=True)
class SuppressionSpec:
    """What a suppression matches: every non-empty field must match (as ``Exception_``)."""

    rule: str = "*"
    user_id: str = ""
    role: str = ""
    department: str = ""
    patient_id: str = ""
    workstation: str = ""
    until: str = ""  # ISO date, inclusive; '' never lapses
    description: str = ""

    def __post_init__(self) -> None:
        if self.until:
            try:
                datetime.strptime(self.until, "%Y-%m-%d")
            except ValueError:
                raise ValueError(f"suppression until {self.until!r} is not YYYY-MM-DD") from None
        if self.rule in ("", "*") and not (self.user_id or self.role or self.department):
            raise ValueError(
                "a suppression for every rule must name at least a user, role or department"
            )


@dataclass(frozen=True)
class Suppression(SuppressionSpec):
    id: int = 0
    source_alert_id: str | None = None
    created_by: str = ""
    created_at: datetime | None = None
    active: bool = True
    revoked_by: str | None = None
    revoked_at: datetime | None = None

    def to_exception(self) -> Exception_:
        """The detection-config exception this suppression stands for."""
        return Exception_(
            id=f"suppression-{self.id}",
            description=self.description or f"suppression {self.id} by {self.created_by}",
            rule=self.rule or "*",
            user_id=self.user_id,
            role=self.role,
            department=self.department,
            patient_id=self.patient_id,
            workstation=self.workstation,
            until=self.until,
        )


@dataclass(frozen=True)
class SuppressionPreview:
    """Stored alerts a suppression would have hidden entirely, or only partly."""

    hidden_count: int
    reduced_count: int
    hidden: list[AlertSummary]  # up to ``limit`` of each, newest first
    reduced: list[AlertSummary]
    caveats: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    alert_id: str | None
    detail: str
    chain: str = ""  # its link in the hash chain (pipeline.alerting.chain)


@dataclass(frozen=True)
class Label:
    """An analyst verdict, for model training: ``confirmed`` misuse or ``benign``."""

    alert_id: str
    user_id: str
    verdict: str
    severity: str
    detectors: list[str]
    version: int
    decided_by: str
    decided_at: datetime
    event_ids: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["decided_at"] = self.decided_at.isoformat()
        return d


class StoreParts:
    """What :class:`~pipeline.alerting.store.AlertStore` gives the mixins it is made of
    (suppressions, the feed's state): its clock and its transactions."""

    def now(self) -> datetime:
        raise NotImplementedError

    def write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError


# ---------------------------------------------------------------------------- helpers
def _utcnow() -> datetime:
    return datetime.now(UTC)


def _naive_utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


def _new_id(result: Any) -> int:
    """The primary key an INSERT created."""
    pk = result.inserted_primary_key
    if pk is None:  # pragma: no cover - every table here has an integer key
        raise RuntimeError("insert returned no primary key")
    return int(pk[0])


def _aware(dt: datetime) -> datetime:
    """A stored naive-UTC time as an aware datetime."""
    return dt.replace(tzinfo=UTC)


def _aware_opt(dt: datetime | None) -> datetime | None:
    return None if dt is None else dt.replace(tzinfo=UTC)


def parse_time(value: datetime | str | None) -> datetime | None:
    """ISO 8601 (with an offset; naive means UTC) → naive UTC, the store's time format."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidAlert(f"not an ISO 8601 time: {value!r}") from None
    return _naive_utc(value)


def normalize_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` use psycopg 3, the driver this project ships."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, echo: bool = False) -> Engine:
    """An engine with the settings the store relies on (SQLite: WAL, FKs, immediate writes)."""
    url = normalize_url(url)
    if not url.startswith("sqlite"):
        return create_engine(url, echo=echo, pool_pre_ping=True, future=True)
    memory = url in ("sqlite://", "sqlite:///:memory:")
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": 30},
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA cache_size=-65536")  # 64 MiB: the feed indexes stay hot
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # writers take the lock up front, so two writers queue instead of failing later
        if conn.get_execution_options().get("emrwatch_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def _encode_cursor(values: list[Any]) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, sort: str) -> list[Any]:
    try:
        pad = "=" * (-len(cursor) % 4)
        vals = json.loads(base64.urlsafe_b64decode(cursor + pad))
        if vals[0] != sort:
            raise ValueError("cursor of another sort order")
        out: list[Any] = [vals[0]]
        for v in vals[1:]:
            out.append(datetime.fromisoformat(v) if isinstance(v, str) and v[:1].isdigit() else v)
        return out
    except Exception as exc:  # noqa: BLE001 - any garbage is the same error to the caller
        raise ValueError(f"invalid page cursor: {exc}") from None


_SUMMARY_COLS = (
    t.alerts.c.alert_id,
    t.alerts.c.version,
    t.alerts.c.severity,
    t.alerts.c.score,
    t.alerts.c.user_id,
    t.alerts.c.department_id,
    t.alerts.c.role,
    t.alerts.c.detectors,
    t.alerts.c.reason,
    t.alerts.c.first_seen_text,
    t.alerts.c.last_seen_text,
    t.alerts.c.n_events,
    t.alerts.c.n_patients,
    t.alerts.c.status,
    t.alerts.c.state,
    t.alerts.c.assignee,
    t.alerts.c.verdict,
    t.alerts.c.updated_at,
    t.alerts.c.last_seen,
    t.alerts.c.severity_rank,
    t.alerts.c.received_at,
)


def _summary(r: Any) -> AlertSummary:
    return AlertSummary(
        alert_id=r.alert_id,
        version=r.version,
        severity=r.severity,
        score=r.score,
        user_id=r.user_id,
        department_id=r.department_id,
        role=r.role,
        detectors=[d for d in r.detectors.split(",") if d],
        reason=r.reason,
        first_seen=r.first_seen_text,
        last_seen=r.last_seen_text,
        n_events=r.n_events,
        n_patients=r.n_patients,
        status=r.status,
        state=r.state,
        assignee=r.assignee,
        verdict=r.verdict,
        updated_at=_aware(r.updated_at),
        received_at=_aware(r.received_at),
    )


_COPY_FROM = 100  # rows from which PostgreSQL gets COPY instead of INSERTs


def _bulk_insert(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert many rows in the caller's transaction.

    SQLite: executemany (native and fast). PostgreSQL: COPY for large batches (a replay
    backfill of 100k alerts loads several times faster than psycopg's pipelined INSERTs),
    INSERTs otherwise.
    """
    if not rows:
        return
    if conn.dialect.name != "postgresql" or len(rows) < _COPY_FROM:
        conn.execute(insert(table), rows)
        return
    cols = list(rows[0])
    as_json = {c for c in cols if isinstance(table.c[c].type, JSON)}
    names = ", ".join(f'"{c}"' for c in cols)
    raw: Any = conn.connection.dbapi_connection  # psycopg 3: its cursor has copy()
    assert raw is not None
    with raw.cursor() as cur, cur.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
        for r in rows:
            copy.write_row([orjson.dumps(r[c]).decode() if c in as_json else r[c] for c in cols])


def _alert_dict(a: Alert | dict[str, Any]) -> dict[str, Any]:
    d = a.to_dict() if isinstance(a, Alert) else dict(a)
    if not d.get("alert_id"):
        raise InvalidAlert(f"alert without alert_id: {str(d)[:200]}")
    try:
        d["version"] = int(d.get("version", 1))
    except (TypeError, ValueError):
        raise InvalidAlert(f"alert {d['alert_id']}: version {d.get('version')!r}") from None
    det = d.get("detector") or []
    d["detector"] = [det] if isinstance(det, str) else list(det)
    return d
