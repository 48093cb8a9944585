"""``sql-audit``: poll an EMR's SQL audit table incrementally (SQLAlchemy Core).

The model is an Epic Clarity-style ``ACCESS_LOG`` (``ACCESS_TIME``, ``USER_ID``,
``PAT_ID``, ``WORKSTATION_ID``, ``METRIC_ID`` and a unique ``ACCESS_LOG_ID``) joined to
its metric names (``ACCESS_LOG_METRIC``), whose names map to canonical actions through a
configurable value map. Any database SQLAlchemy speaks works (PostgreSQL, SQL Server,
Oracle, SQLite, ...).

Reading is a keyset scan over the ``cursor`` columns, e.g. ``(ACCESS_TIME, ACCESS_LOG_ID)``::

    WHERE (t > :t) OR (t = :t AND id > :id) ORDER BY t, id LIMIT :n

so rows that share a timestamp are neither lost nor repeated across batch boundaries,
and the checkpoint of each record is simply that row's cursor values. The cursor must be
unique, and rows whose cursor is NULL are not read (they have no place in the order).

A row stamped when its transaction starts can commit after later-stamped rows were read,
with a cursor value the scan has passed. So only rows whose first cursor column is at
least ``settle_s`` old are read (``AND t < :settle_before``): the bound is this machine's
clock minus ``settle_s`` in the column's own form, learnt from the first row (an aware
instant for ``timestamptz``; naive wall time in ``timezone``, or UTC, for ``TIMESTAMP``;
text with the column's separator on SQLite). A transaction committing more than
``settle_s`` late, or a cursor that is not a time, is not covered.

Each row becomes one :class:`~connectors.base.RawRecord`: the payload is the row as JSON
(datetimes in ISO 8601, decimals as strings) keyed by column label, so a dead letter shows
the row as the EMR wrote it. :meth:`SqlAuditConnector.normalize` maps it to canonical
fields with ``columns`` / ``constants`` / ``value_maps``; naive ``TIMESTAMP`` values are
hospital-local time in ``timezone`` (emitted with their UTC offset).

A lost connection is retried with exponential backoff; the cursor stays where the last
fully-read batch left it, so nothing is lost or read twice. The password never appears in
logs or :meth:`~SqlAuditConnector.describe` (``url_env`` keeps it out of config files too).

What a Clarity-style ACCESS_LOG cannot carry (see :func:`to_access_log_row`): the writer's
UTC offset (``ACCESS_TIME`` is local wall time, so ``ts`` comes back in ``timezone``),
``resource_type``, ``outcome``, ``emergency``, ``purpose`` and ``encounter_id``; those
come back as the canonical defaults unless mapped to other columns or set in
``constants``.

>>> import sqlite3, tempfile, os
>>> db = os.path.join(tempfile.mkdtemp(), "clarity.sqlite")
>>> with sqlite3.connect(db) as c:
...     _ = c.executescript(CLARITY_DDL)
...     _ = c.executemany("INSERT INTO ACCESS_LOG_METRIC VALUES (?, ?)", CLARITY_METRICS.items())
...     _ = c.executemany("INSERT INTO ACCESS_LOG VALUES (?, ?, ?, ?, ?, ?)", [
...         (7, "2026-03-01 08:00:00", "u1", "p1", "ws1", 2),
...         (8, "2026-03-01 08:00:00", "u1", "p2", "ws1", 99)])  # 99: no such metric
>>> conn = SqlAuditConnector.from_dict({**clarity_config(f"sqlite:///{db}"), "once": True})
>>> import threading
>>> raws = [r for r in conn.records(None, threading.Event()) if r is not None]
>>> [r.position for r in raws]
['ACCESS_LOG ACCESS_LOG_ID=7', 'ACCESS_LOG ACCESS_LOG_ID=8']
>>> e = conn.normalize(raws[0])[0]
>>> e.event_id, e.ts, e.user_id, e.action
('ACCESS_LOG:7', '2026-03-01T08:00:00+08:00', 'u1', 'print')
>>> conn.normalize(raws[1])
Traceback (most recent call last):
...
emrwatch.events.EventError: action: no value (column METRIC_NAME is NULL); map the metric ...
>>> conn.close()
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson

from connectors.base import Connector, ConnectorConfigError, Ledger, Output, RawRecord
from emrwatch.events import ACTIONS, AccessEvent, EventError
from emrwatch.timeutil import DEFAULT_TIMEZONE, zone

__all__ = [
    "CLARITY_ACTIONS",
    "CLARITY_DDL",
    "CLARITY_METRICS",
    "SqlAuditConfig",
    "SqlAuditConnector",
    "clarity_config",
    "mask_url",
    "to_access_log_row",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"\{(\w+)\}")
_JOIN = re.compile(
    r"^\s*(?P<kind>(?:LEFT|INNER)(?:\s+OUTER)?\s+)?JOIN\s+(?P<table>[\w.\"]+)"
    r"(?:\s+(?:AS\s+)?(?P<alias>(?!ON\b)\w+))?\s+ON\s+(?P<on>.+?)\s*$",
    re.IGNORECASE | re.DOTALL,
)
_IDENT_TAIL = re.compile(r"^(?:[\w\"]+\.)*\"?(\w+)\"?$")
_STR_FIELDS = frozenset(
    {"user_id", "patient_id", "workstation", "resource_type", "purpose", "source", "encounter_id"}
)


# ---------------------------------------------------------------------------- config
@dataclass
class SqlAuditConfig:
    url: str = field(
        default="",
        metadata={"help": "SQLAlchemy URL, e.g. postgresql://reader@clarity/db (or use url_env)"},
    )
    url_env: str = field(
        default="",
        metadata={
            "help": "name of an environment variable holding the URL (keeps passwords "
            "out of config files)"
        },
    )
    table: str = field(
        default="",
        metadata={"help": "the audit table (table form; also names positions and event ids)"},
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "canonical field -> column expression (table form) or result column "
            "name (query form); ts, user_id and action (or a constant) are needed. Fields "
            "outside CONTRACTS §3 become extra event fields"
        },
    )
    joins: list[str] = field(
        default_factory=list,
        metadata={"help": "table form: '[LEFT|INNER] JOIN TABLE [alias] ON condition' clauses"},
    )
    query: str = field(
        default="",
        metadata={
            "help": "query form: a full SELECT that filters on the bound parameters "
            ":cursor_0, :cursor_1, ... (:cursor is :cursor_0), orders by the cursor and may use "
            ":limit"
        },
    )
    cursor: list[str] = field(
        default_factory=list,
        metadata={
            "help": "unique, increasing keyset columns, e.g. [ACCESS_LOG.ACCESS_TIME, "
            "ACCESS_LOG.ACCESS_LOG_ID]"
        },
    )
    cursor_start: list[str] = field(
        default_factory=list,
        metadata={
            "help": "read only rows after these cursor values when there is no "
            "checkpoint (required by the query form)"
        },
    )
    key: list[str] = field(
        default_factory=list,
        metadata={
            "help": "columns that identify a row in positions and default event ids "
            "(default: the cursor)"
        },
    )
    event_id: str = field(
        default="",
        metadata={
            "help": "event id template over column labels, constants and {table}, e.g. "
            "'clarity-prod:{ACCESS_LOG_ID}' (default: '{table}:' + key values)"
        },
    )
    value_maps: dict[str, dict[str, str]] = field(
        default_factory=dict,
        metadata={
            "help": "field -> {source value: canonical value}, e.g. action: "
            "{'Chart Review Opened': view}; matched exactly, then ignoring case and blanks"
        },
    )
    unmapped: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "field -> value for source values missing from its value map "
            "(default: the row is dead-lettered naming the value)"
        },
    )
    constants: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "fields with a fixed value, e.g. source: clarity-prod"},
    )
    required: list[str] = field(
        default_factory=lambda: ["ts", "user_id", "action"],
        metadata={"help": "fields a row must have (non-empty) or be dead-lettered"},
    )
    timezone: str = field(
        default=DEFAULT_TIMEZONE,
        metadata={"help": "IANA zone of naive TIMESTAMP values"},
    )
    naive_timestamps: Literal["local", "utc", "reject"] = field(
        default="local",
        metadata={
            "help": "a timestamp without offset is in 'timezone' (local), in UTC, or "
            "an error (reject)"
        },
    )
    settle_s: float = field(
        default=5.0,
        metadata={
            "help": "read only rows whose first cursor column (a timestamp) is at least this "
            "many seconds old by this machine's clock, so a transaction that commits late "
            "with an older timestamp is not passed by; 0: off. The query form binds the "
            "bound as :settle_before if it names it"
        },
    )
    batch_size: int = field(default=1000, metadata={"help": "rows per query"})
    poll_interval_s: float = field(
        default=5.0, metadata={"help": "seconds between polls once caught up"}
    )
    retry_backoff_s: float = field(
        default=1.0, metadata={"help": "first wait after a lost connection (doubles)"}
    )
    max_backoff_s: float = field(default=30.0, metadata={"help": "longest wait between retries"})
    max_retries: int = field(
        default=0, metadata={"help": "give up after this many failed polls in a row (0: never)"}
    )
    once: bool = field(
        default=False, metadata={"help": "stop once caught up (one-off loads, tests)"}
    )

    def validate(self) -> None:
        if bool(self.url) == bool(self.url_env):
            raise ConnectorConfigError("exactly one of url and url_env is required")
        if not self.table and not self.query:
            raise ConnectorConfigError("table (with columns) or query is required")
        if self.query and self.joins:
            raise ConnectorConfigError("joins belong to the table form; put them in query")
        if self.query and not re.search(r":cursor\b|:cursor_\d+\b", self.query):
            raise ConnectorConfigError("query must filter on :cursor / :cursor_0, ... ")
        if self.query and not self.cursor_start:
            raise ConnectorConfigError("the query form needs cursor_start (first cursor values)")
        if not self.cursor:
            raise ConnectorConfigError("cursor: at least one column is required")
        if self.cursor_start and len(self.cursor_start) != len(self.cursor):
            raise ConnectorConfigError("cursor_start needs one value per cursor column")
        for name in ("ts", "user_id"):
            if name not in self.columns:
                raise ConnectorConfigError(f"columns.{name}: required")
        if "action" not in self.columns and "action" not in self.constants:
            raise ConnectorConfigError("columns.action (or constants.action) is required")
        both = sorted(set(self.columns) & set(self.constants))
        if both:
            raise ConnectorConfigError(f"{both} set in both columns and constants")
        if "event_id" in self.columns and self.event_id:
            raise ConnectorConfigError("event_id: either a column or a template, not both")
        if "ts" in self.constants or "t" in self.columns:
            raise ConnectorConfigError("ts must come from a column")
        if self.settle_s < 0:
            raise ConnectorConfigError("settle_s must be >= 0")
        if self.batch_size < 1 or self.poll_interval_s <= 0 or self.retry_backoff_s <= 0:
            raise ConnectorConfigError("batch_size, poll_interval_s, retry_backoff_s must be > 0")
        try:
            zone(self.timezone)
        except ValueError as exc:
            raise ConnectorConfigError(f"timezone: {exc}") from None
        for f, canon in (("action", ACTIONS), ("outcome", {"success", "failure"})):
            bad = [
                v
                for v in {**self.value_maps.get(f, {}), "": self.unmapped.get(f, "")}.values()
                if v and v.lower() not in canon
            ]
            if bad:
                raise ConnectorConfigError(f"value_maps.{f}: {bad} not in {sorted(canon)}")
        for spec in self.joins:
            if not _JOIN.match(spec):
                raise ConnectorConfigError(f"joins: cannot read {spec!r}")


# ---------------------------------------------------------------------------- helpers
def mask_url(url: str) -> str:
    """The URL with its password hidden, for logs and status pages.

    >>> mask_url("postgresql://reader:s3cret@db:5432/clarity")
    'postgresql://reader:***@db:5432/clarity'
    """
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL must not leak either
        return "<unparsable database URL>"


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, timedelta):
        return v.total_seconds()
    return str(v)


def _tag(v: Any) -> tuple[str, Any]:
    """A cursor value as (type, JSON value), reversible with :func:`_untag`."""
    if v is None:
        return "null", None
    if isinstance(v, bool):
        return "bool", v
    if isinstance(v, int):
        return "int", v
    if isinstance(v, float):
        return "float", v
    if isinstance(v, Decimal):
        return "decimal", str(v)
    if isinstance(v, datetime):
        return "datetime", v.isoformat()
    if isinstance(v, date):
        return "date", v.isoformat()
    if isinstance(v, dtime):
        return "time", v.isoformat()
    if isinstance(v, uuid.UUID):
        return "uuid", str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return "bytes", bytes(v).hex()
    return "str", str(v)


_UNTAG: dict[str, Any] = {
    "null": lambda v: None,
    "bool": bool,
    "int": int,
    "float": float,
    "decimal": Decimal,
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": dtime.fromisoformat,
    "uuid": uuid.UUID,
    "bytes": bytes.fromhex,
    "str": str,
}


def _untag(kind: str, v: Any) -> Any:
    try:
        return _UNTAG[kind](v)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad checkpoint value {kind}:{v!r}") from exc


def _text(v: Any) -> str:
    if isinstance(v, datetime | date | dtime):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    return str(v)


def _label_of(expr: str) -> str | None:
    m = _IDENT_TAIL.match(expr.strip())
    return m.group(1) if m else None


def _fold(s: str) -> str:
    return " ".join(s.split()).casefold()


# ---------------------------------------------------------------------------- connector
class SqlAuditConnector(Connector):
    """Polls an SQL audit table (Epic Clarity ACCESS_LOG style) with a keyset cursor."""

    type = "sql-audit"
    summary = "SQL audit table (e.g. Epic Clarity ACCESS_LOG) polled with a keyset cursor"
    Config = SqlAuditConfig
    produces = frozenset({"access"})

    def __init__(
        self, config: SqlAuditConfig, name: str = "", ledger: Ledger | None = None
    ) -> None:
        super().__init__(config, name=name, ledger=ledger)
        c = config
        self._tz = ZoneInfo(c.timezone)
        self._table = c.table or "query"
        self._engine: Any = None
        self._lock = threading.Lock()
        self.polls = 0
        self.rows = 0
        self.reconnects = 0
        self.last_error = ""
        self.last_cursor: dict[str, Any] | None = None
        #: how the settle column compares: "aware" / "naive" datetimes, "text" + separator,
        #: "off" (not a timestamp); None until a row has shown it
        self._settle_kind: str | None = None if c.settle_s > 0 and not c.query else "off"
        key = list(c.key or c.cursor)
        if c.query:
            # result column names are the labels; matched case-insensitively at run time
            self._field_label = dict(c.columns)
            self._cursor_labels = list(c.cursor)
            self._key_labels = key
            self._select: list[tuple[str, str]] = []
        else:
            labels: dict[str, str] = {}  # expression -> label
            used: set[str] = set()

            def label(expr: str, fallback: str) -> str:
                if expr in labels:
                    return labels[expr]
                cand = _label_of(expr) or fallback
                n = 1
                while cand.casefold() in used:  # another expression has this name already
                    n += 1
                    cand = fallback if n == 2 else f"{fallback}_{n}"
                used.add(cand.casefold())
                labels[expr] = cand
                return cand

            self._field_label = {f: label(e, f) for f, e in c.columns.items()}
            self._cursor_labels = [label(e, f"cursor_{i}") for i, e in enumerate(c.cursor)]
            self._key_labels = [label(e, f"key_{i}") for i, e in enumerate(key)]
            self._select = list(labels.items())
        self._maps = {
            f: ({k: v for k, v in m.items()}, {_fold(k): v for k, v in m.items()})
            for f, m in c.value_maps.items()
        }
        known = set(c.constants) | {"table"} | set(self._field_label.values())
        known |= set(self._key_labels) | set(self._cursor_labels)
        if c.event_id and not c.query:
            missing = [n for n in _NAME.findall(c.event_id) if n not in known]
            if missing:
                raise ConnectorConfigError(
                    f"event_id: template names {missing}; known: {sorted(known)}"
                )

    # ------------------------------------------------------------ lifecycle
    def _url(self) -> str:
        c = self.config
        if c.url_env:
            url = os.environ.get(c.url_env, "")
            if not url:
                raise ConnectorConfigError(
                    f"connector {self.name!r}: environment variable {c.url_env} (url_env) is "
                    "not set"
                )
            return url
        return str(c.url)

    @property
    def peer(self) -> str:
        """The database URL without its password."""
        try:
            return mask_url(self._url())
        except ConnectorConfigError:
            return f"${self.config.url_env}"

    def start(self) -> None:
        with self._lock:
            if self._engine is None:
                self._engine = _make_engine(self._url())

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().describe(),
            "url": self.peer,
            "table": self._table,
            "cursor": list(c.cursor),
            "batch_size": c.batch_size,
            "poll_interval_s": c.poll_interval_s,
            "last_cursor": self.last_cursor,
            "polls": self.polls,
            "rows": self.rows,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------ reading
    def _statement(self, after: Sequence[Any] | None) -> tuple[Any, dict[str, Any]]:
        from sqlalchemy import and_, bindparam, literal_column, or_, quoted_name, select
        from sqlalchemy import text as sql_text

        c = self.config
        if c.query:
            values = list(after) if after is not None else list(c.cursor_start)
            params: dict[str, Any] = {f"cursor_{i}": v for i, v in enumerate(values)}
            params["cursor"] = values[0]
            params["limit"] = c.batch_size
            params["settle_before"] = self._bound(
                "naive" if c.naive_timestamps != "reject" else "aware"
            )
            used = {p for p in params if re.search(rf":{p}\b", c.query)}
            return sql_text(c.query), {k: v for k, v in params.items() if k in used}

        src = self._source()
        cols: list[Any] = [
            literal_column(expr).label(quoted_name(lbl, True)) for expr, lbl in self._select
        ]
        keys: list[Any] = [literal_column(e) for e in c.cursor]
        # a NULL cursor value has no place in the keyset order (and would stall the scan)
        stmt = select(*cols).select_from(src).where(*[k.is_not(None) for k in keys])
        settle: dict[str, Any] = {}
        if self._settle_kind not in (None, "off"):
            stmt = stmt.where(keys[0] < bindparam("settle_before"))
            settle["settle_before"] = self._bound(self._settle_kind)
        start: list[Any] | None = (
            list(after) if after is not None else (list(c.cursor_start) or None)
        )
        params = {}
        if start is not None:
            ors = []
            for i, col in enumerate(keys):
                eqs = [keys[j] == bindparam(f"c{j}") for j in range(i)]
                ors.append(and_(*eqs, col > bindparam(f"c{i}")))
            stmt = stmt.where(or_(*ors))
            params = {f"c{i}": v for i, v in enumerate(start)}
        return stmt.order_by(*keys).limit(c.batch_size), {**params, **settle}

    def _source(self) -> Any:
        """The table form's FROM: the audit table with its joins."""
        from sqlalchemy import quoted_name, table
        from sqlalchemy import text as sql_text

        def tbl(spec: str, alias: str | None = None) -> Any:
            schema, _, name = spec.rpartition(".")
            t = table(
                quoted_name(name, False), schema=quoted_name(schema, False) if schema else None
            )
            return t.alias(quoted_name(alias, False)) if alias else t

        src = tbl(self.config.table)
        for spec in self.config.joins:
            m = _JOIN.match(spec)
            assert m is not None  # validated
            outer = (m["kind"] or "").strip().upper().startswith("LEFT")
            src = src.join(tbl(m["table"], m["alias"]), sql_text(m["on"]), isouter=outer)
        return src

    def _bound(self, kind: str) -> Any:
        """``now - settle_s`` as the settle column holds time: aware UTC, naive in the
        ``naive_timestamps`` convention, or that as text with the column's separator."""
        c = self.config
        now = datetime.now(UTC) - timedelta(seconds=c.settle_s)
        if kind == "aware":
            return now
        naive = (now.astimezone(self._tz) if c.naive_timestamps == "local" else now).replace(
            tzinfo=None
        )
        if kind.startswith("text"):
            return naive.isoformat(sep=kind[4:] or " ", timespec="microseconds")
        return naive

    def _probe_settle(self, conn: Any) -> None:
        """Learn from one row how the first cursor column holds time (table form)."""
        from sqlalchemy import literal_column, select

        c = self.config
        col: Any = literal_column(c.cursor[0])
        v = conn.execute(
            select(col).select_from(self._source()).where(col.is_not(None)).limit(1)
        ).scalar()
        if v is None:
            return  # no row yet: the poll reads nothing until one shows the type
        if isinstance(v, datetime):
            self._settle_kind = "aware" if v.tzinfo is not None else "naive"
        elif isinstance(v, str) and len(v) >= 19 and v[4] == "-":
            self._settle_kind = "text" + v[10]
        else:
            self._settle_kind = "off"
            log.warning(
                "sql-audit %s: settle_s needs a timestamp as the first cursor column; %s "
                "holds %s, so rows are read as soon as they are visible",
                self.name,
                c.cursor[0],
                type(v).__name__,
            )

    def _poll(self, after: Sequence[Any] | None) -> tuple[list[str], list[Any]]:
        if self._engine is None:
            self.start()
        with self._engine.connect() as conn:
            if self._settle_kind is None:
                self._probe_settle(conn)
                if self._settle_kind is None:
                    return [], []  # an empty table: nothing to read yet
            stmt, params = self._statement(after)
            if self.config.query and "limit" not in params:
                conn = conn.execution_options(stream_results=True)  # fetch one batch only
            result = conn.execute(stmt, params)
            names = result.keys()
            keys = [str(k) for k in names]  # plain str: orjson wants exactly str
            rows = result.fetchmany(self.config.batch_size)
            result.close()
        return keys, rows

    def _restore(self, checkpoint: Any) -> list[Any] | None:
        if checkpoint is None:
            return None
        try:
            after, types = checkpoint["after"], checkpoint["types"]
            if list(after) != self._cursor_labels and [k.casefold() for k in after] != [
                k.casefold() for k in self._cursor_labels
            ]:
                raise ValueError(f"checkpoint cursor {list(after)} is not {self._cursor_labels}")
            return [_untag(types[k], v) for k, v in after.items()]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"connector {self.name!r}: unreadable checkpoint {checkpoint!r}"
            ) from exc

    def _resolve(self, names: Sequence[str], keys: Sequence[str]) -> list[int]:
        """Indexes of ``names`` among the result ``keys`` (exact, then ignoring case)."""
        exact = {k: i for i, k in enumerate(keys)}
        folded = {k.casefold(): i for i, k in enumerate(keys)}
        out = []
        for n in names:
            i = exact.get(n, folded.get(n.casefold()))
            if i is None:
                raise ConnectorConfigError(
                    f"connector {self.name!r}: the query returns no column {n!r}; it has {list(keys)}"
                )
            out.append(i)
        return out

    def _transient(self, exc: BaseException) -> bool:
        from sqlalchemy import exc as sa_exc

        if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, sa_exc.InterfaceError | sa_exc.DisconnectionError):
            return True
        if isinstance(exc, sa_exc.OperationalError):
            # SQLite reports schema mistakes as OperationalError too: those are permanent
            return not re.search(r"no such (table|column)|syntax error", str(exc.orig), re.I)
        return False

    def records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        c = self.config
        after = self._restore(checkpoint)
        table = self._table
        peer = self.peer
        dumps = orjson.dumps
        delay = c.retry_backoff_s
        failures = 0
        cidx: list[int] | None = None
        kidx: list[int] = []
        while not stop.is_set():
            try:
                keys, rows = self._poll(after)
            except Exception as exc:
                if not self._transient(exc):
                    raise
                failures += 1
                self.reconnects += 1
                orig = getattr(exc, "orig", None) or exc
                first = (str(orig).strip().splitlines() or [""])[0]
                self.last_error = f"{type(orig).__name__}: {first}"
                if c.max_retries and failures >= c.max_retries:
                    log.error(
                        "sql-audit %s: %s failed %d times; giving up: %s",
                        self.name,
                        peer,
                        failures,
                        self.last_error,
                    )
                    raise
                log.warning(
                    "sql-audit %s: polling %s failed (%s); retry %d in %.1fs, cursor kept",
                    self.name,
                    peer,
                    self.last_error,
                    failures,
                    delay,
                )
                deadline = time.monotonic() + delay
                yield None
                while (left := deadline - time.monotonic()) > 0:
                    if stop.wait(min(left, 0.5)):
                        return
                    yield None
                delay = min(delay * 2, max(c.max_backoff_s, c.retry_backoff_s))
                continue
            failures = 0
            delay = c.retry_backoff_s
            self.polls += 1
            if rows:
                if cidx is None:
                    cidx = self._resolve(self._cursor_labels, keys)
                    kidx = self._resolve(self._key_labels, keys)
                ckeys = [keys[i] for i in cidx]
                kkeys = [keys[i] for i in kidx]
                unit = "poll cursor>" + (
                    ",".join(_text(v) for v in after)
                    if after is not None
                    else ",".join(c.cursor_start) or "start"
                )
                now = time.time()
                out: list[RawRecord] = []
                size = 0
                digest = hashlib.blake2b(digest_size=16)
                for row in rows:
                    payload = dumps(dict(zip(keys, row, strict=True)), default=_json_default)
                    size += len(payload)
                    digest.update(payload)
                    tags = [_tag(row[i]) for i in cidx]
                    cp = {
                        "after": {k: t[1] for k, t in zip(ckeys, tags, strict=True)},
                        "types": {k: t[0] for k, t in zip(ckeys, tags, strict=True)},
                    }
                    pos = (
                        table
                        + " "
                        + ",".join(f"{k}={_text(row[i])}" for k, i in zip(kkeys, kidx, strict=True))
                    )
                    out.append(RawRecord(payload, pos, cp, now, peer))
                self.ledger.receipt(
                    self.name,
                    unit,
                    peer=peer,
                    records=len(out),
                    size=size,
                    digest=digest.hexdigest(),
                )
                self.rows += len(out)
                after = [rows[-1][i] for i in cidx]
                self.last_cursor = out[-1].checkpoint["after"]
                for raw in out:
                    yield raw
                    if stop.is_set():
                        return
            if len(rows) >= c.batch_size:
                continue  # more may be waiting: poll again at once
            if c.once:
                return
            yield None  # caught up: let the runner commit
            deadline = time.monotonic() + c.poll_interval_s
            while (left := deadline - time.monotonic()) > 0:
                if stop.wait(min(left, 0.5)):
                    return
                yield None

    # ------------------------------------------------------------ normalising
    def normalize(self, raw: RawRecord) -> list[Output]:
        try:
            row = orjson.loads(raw.payload)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"payload is not JSON: {exc}") from None
        if type(row) is not dict:
            raise EventError("payload is not a row object")
        try:
            return [self._event(row)]
        except EventError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as exc:
            raise EventError(f"malformed row ({type(exc).__name__}: {exc})") from None

    def _get(self, row: dict[str, Any], label: str) -> tuple[bool, Any]:
        if label in row:
            return True, row[label]
        f = label.casefold()
        for k, v in row.items():
            if k.casefold() == f:
                return True, v
        return False, None

    def _event(self, row: dict[str, Any]) -> AccessEvent:
        c = self.config
        d: dict[str, Any] = dict(c.constants)
        t: float | None = None
        for f, label in self._field_label.items():
            present, v = self._get(row, label)
            if not present:
                raise EventError(f"{f}: the row has no column {label!r}")
            if isinstance(v, dict | list):
                raise EventError(f"{f}: column {label} holds a {type(v).__name__}, not a value")
            if f in self._maps:
                v = self._mapped(f, label, v)
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            if f == "ts":
                d["ts"], t = self._timestamp(v, label)
            elif f == "emergency":
                d[f] = v
            else:
                d[f] = v.strip() if isinstance(v, str) else _scalar_text(v)
        if "action" in d and isinstance(d["action"], str):
            d["action"] = d["action"].lower()
        if "event_id" not in d:
            d["event_id"] = self._event_id(row)
        for f in c.required:
            if f not in d or d[f] in ("", None):
                column = self._field_label.get(f)
                where = f" (column {column} is NULL or empty)" if column else ""
                raise EventError(f"missing {f}{where}")
        if "outcome" in d:
            d["outcome"] = str(d["outcome"]).lower()
        return AccessEvent.from_dict(d, t=t)

    def _mapped(self, f: str, label: str, v: Any) -> Any:
        exact, folded = self._maps[f]
        if v is None or (isinstance(v, str) and not v.strip()):
            if f in self.config.unmapped:
                return self.config.unmapped[f]
            if f in self.config.required:
                raise EventError(
                    f"{f}: no value (column {label} is NULL); map the metric or set unmapped.{f}"
                )
            return None
        key = v if isinstance(v, str) else _scalar_text(v)
        got = exact.get(key)
        if got is None:
            got = folded.get(_fold(key))
        if got is None:
            got = self.config.unmapped.get(f)
        if got is None:
            raise EventError(
                f"unmapped {f} {key!r} (column {label}); add it to value_maps.{f} or set "
                f"unmapped.{f}"
            )
        return got

    def _timestamp(self, v: Any, label: str) -> tuple[str, float]:
        if not isinstance(v, str):
            raise EventError(f"ts: column {label} holds {v!r}, not a timestamp")
        v = v.strip()
        if len(v) <= 10:  # a DATE (or less): no time of day to check shifts against
            raise EventError(f"ts: {v!r} in column {label} is not a date and time")
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise EventError(f"ts: bad timestamp {v!r} in column {label}") from None
        if dt.tzinfo is None:
            mode = self.config.naive_timestamps
            if mode == "reject":
                raise EventError(f"ts: timestamp {v!r} in column {label} has no UTC offset")
            dt = dt.replace(tzinfo=self._tz if mode == "local" else ZoneInfo("UTC"))
        try:
            return dt.isoformat(), dt.timestamp()
        except (OverflowError, ValueError) as exc:
            raise EventError(f"ts: timestamp {v!r} out of range ({exc})") from None

    def _event_id(self, row: dict[str, Any]) -> str:
        c = self.config
        if c.event_id:

            def sub(m: re.Match[str]) -> str:
                n = m.group(1)
                if n == "table":
                    return self._table
                if n in c.constants:
                    return c.constants[n]
                present, v = self._get(row, n)
                if not present or v is None or v == "":
                    raise EventError(f"event_id: column {n} is missing or NULL")
                return v if isinstance(v, str) else _scalar_text(v)

            return _NAME.sub(sub, c.event_id)
        parts = []
        for label in self._key_labels:
            present, v = self._get(row, label)
            if not present or v is None or v == "":
                raise EventError(f"event_id: key column {label} is missing or NULL")
            parts.append(v if isinstance(v, str) else _scalar_text(v))
        return f"{self._table}:" + ":".join(parts)


def _scalar_text(v: Any) -> str:
    if isinstance(v, dict | list):
        raise EventError(f"expected a value, got a {type(v).__name__}")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _make_engine(url: str) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")  # psycopg 3 is the project's driver
    kw: dict[str, Any] = {"pool_pre_ping": True}
    if u.get_backend_name() != "sqlite":
        kw.update(pool_size=1, max_overflow=2, pool_recycle=1800)
    return create_engine(u, **kw)


# ---------------------------------------------------------------------------- Clarity model
#: the Clarity-style model schema (portable DDL: PostgreSQL, SQLite, ...)
CLARITY_DDL = """
CREATE TABLE ACCESS_LOG_METRIC (
    METRIC_ID NUMERIC(18, 0) PRIMARY KEY,
    METRIC_NAME VARCHAR(200) NOT NULL
);
CREATE TABLE ACCESS_LOG (
    ACCESS_LOG_ID NUMERIC(18, 0) PRIMARY KEY,
    ACCESS_TIME TIMESTAMP NOT NULL,
    USER_ID VARCHAR(18),
    PAT_ID VARCHAR(18),
    WORKSTATION_ID VARCHAR(254),
    METRIC_ID NUMERIC(18, 0)
);
CREATE INDEX ACCESS_LOG_CURSOR ON ACCESS_LOG (ACCESS_TIME, ACCESS_LOG_ID);
"""

#: METRIC_ID -> METRIC_NAME of the model metric table
CLARITY_METRICS: dict[int, str] = {
    1: "Chart Review Opened",
    2: "Report Printed",
    3: "Export to Excel",
    4: "Note Created",
    5: "Demographics Edited",
    6: "Patient Lookup",
    7: "Order Cancelled",
    8: "Report Run",
    9: "Media Copied",
    10: "Chart Forwarded",
}
#: METRIC_NAME -> canonical action (the ``value_maps.action`` of :func:`clarity_config`)
CLARITY_ACTIONS: dict[str, str] = {
    "Chart Review Opened": "view",
    "Report Printed": "print",
    "Export to Excel": "export",
    "Note Created": "create",
    "Demographics Edited": "update",
    "Patient Lookup": "query",
    "Order Cancelled": "delete",
    "Report Run": "execute",
    "Media Copied": "copy",
    "Chart Forwarded": "forward",
}


def clarity_config(url: str, **overrides: Any) -> dict[str, Any]:
    """A ``sql-audit`` config for the Clarity-style model schema (:data:`CLARITY_DDL`)."""
    cfg: dict[str, Any] = {
        "url": url,
        "table": "ACCESS_LOG",
        "joins": [
            "LEFT JOIN ACCESS_LOG_METRIC ON ACCESS_LOG_METRIC.METRIC_ID = ACCESS_LOG.METRIC_ID"
        ],
        "columns": {
            "ts": "ACCESS_LOG.ACCESS_TIME",
            "user_id": "ACCESS_LOG.USER_ID",
            "patient_id": "ACCESS_LOG.PAT_ID",
            "workstation": "ACCESS_LOG.WORKSTATION_ID",
            "action": "ACCESS_LOG_METRIC.METRIC_NAME",
        },
        "cursor": ["ACCESS_LOG.ACCESS_TIME", "ACCESS_LOG.ACCESS_LOG_ID"],
        "key": ["ACCESS_LOG.ACCESS_LOG_ID"],
        "value_maps": {"action": dict(CLARITY_ACTIONS)},
    }
    cfg.update(overrides)
    return cfg


def to_access_log_row(
    e: AccessEvent,
    *,
    timezone: str = DEFAULT_TIMEZONE,
    metric_ids: Mapping[str, int] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """The ``ACCESS_LOG`` row an EMR would have written for the canonical event ``e``.

    ``ACCESS_LOG_ID`` is the event id's trailing number (the EMR's key; read back through
    the ``event_id`` template), ``ACCESS_TIME`` the hospital-local wall time in
    ``timezone`` (naive, like a Clarity ``DATETIME``), ``METRIC_ID`` the metric of the
    action. The layout cannot carry ``resource_type``, ``outcome``, ``emergency``,
    ``purpose``, ``encounter_id``, ``event_category`` or extras: with ``strict`` an event
    that has a non-default value there is a ValueError; otherwise those are dropped (and
    come back as the defaults, or as ``constants`` of the connector config).

    >>> e = AccessEvent.from_dict({"event_id": "clarity:42", "ts": "2026-03-01T00:30:00Z",
    ...     "user_id": "u1", "patient_id": "p1", "action": "print"})
    >>> to_access_log_row(e)
    {'ACCESS_LOG_ID': 42, 'ACCESS_TIME': datetime.datetime(2026, 3, 1, 8, 30), 'USER_ID': 'u1', \
'PAT_ID': 'p1', 'WORKSTATION_ID': None, 'METRIC_ID': 2}
    """
    ids = (
        dict(metric_ids)
        if metric_ids is not None
        else {
            a: i
            for i, name in CLARITY_METRICS.items()
            for n, a in CLARITY_ACTIONS.items()
            if n == name
        }
    )
    m = re.search(r"(\d+)$", e.event_id)
    if m is None:
        raise ValueError(f"event id {e.event_id!r} has no trailing ACCESS_LOG_ID number")
    lost = {
        k: v
        for k, v in (
            ("resource_type", e.resource_type != "Patient"),
            ("outcome", e.outcome != "success"),
            ("emergency", e.emergency),
            ("purpose", bool(e.purpose)),
            ("encounter_id", bool(e.encounter_id)),
            ("event_category", e.event_category != "access"),
            ("extra", bool(e.extra)),
        )
        if v
    }
    if strict and lost:
        raise ValueError(f"ACCESS_LOG cannot carry {sorted(lost)} of event {e.event_id}")
    local = datetime.fromisoformat(e.ts).astimezone(ZoneInfo(timezone)).replace(tzinfo=None)
    return {
        "ACCESS_LOG_ID": int(m.group(1)),
        "ACCESS_TIME": local,
        "USER_ID": e.user_id,
        "PAT_ID": e.patient_id or None,
        "WORKSTATION_ID": e.workstation or None,
        "METRIC_ID": ids[e.action],
    }
