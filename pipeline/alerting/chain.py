"""A tamper-evident audit log: every entry of ``audit_log`` and ``triage_history`` carries
a hash of itself and of the entry before it (a hash chain, as in Git or Certificate
Transparency).

The audit log is how the privacy office answers "who looked at this case, who unmasked
this patient, who closed it as benign". Someone with write access to the database (a DBA,
an attacker, an analyst covering their tracks with stolen credentials) could change or
delete those rows. With the chain, changing, removing or inserting an entry anywhere
breaks every hash after it, and :func:`verify` names the first entry that no longer
follows. Only an edit that recomputes all later hashes escapes that, and it changes the
chain's **head**: the head published at a point in time (:func:`head`; the monthly privacy
report prints it, ``emrwatch audit-head`` prints it for a ticket or a write-once store)
is an anchor that such a rewrite cannot keep (``emrwatch audit-verify --anchor ID:HASH``).

Entries are chained in ``id`` order; writers take the chain's lock (PostgreSQL: an
advisory lock per table until commit; SQLite: the write transaction's own lock), so ids
and links follow one order even with several processes writing.

>>> from pipeline.alerting.store import AlertStore
>>> store = AlertStore("sqlite://")
>>> _ = store.record_access("ana", "case.view", "ew-1")
>>> _ = store.record_access("sam", "unmask", "ew-1", {"reason": "complaint 17"})
>>> with store.read() as conn:
...     verify(conn).ok
True
>>> with store.write() as conn:
...     _ = conn.execute(t.audit_log.update().where(t.audit_log.c.id == 1).values(actor="bob"))
>>> with store.read() as conn:
...     check = verify(conn)
>>> check.ok, [b.entry_id for b in check.broken]
(False, [1])
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table, func, insert, select, text

from pipeline.alerting import schema as t
from pipeline.periodic import Periodic

GENESIS = "0" * 64  # the "entry before" the first
#: what each chained table's hash covers, in this order (the chain's format, version 1)
FIELDS: dict[str, tuple[str, ...]] = {
    "audit_log": ("at", "actor", "action", "alert_id", "detail"),
    "triage_history": ("alert_id", "at", "actor", "from_state", "to_state", "assignee", "note"),
}
CHAINED: tuple[Table, ...] = (t.audit_log, t.triage_history)
_LOCKS = {"audit_log": 7265786174636802, "triage_history": 7265786174636803}
MAX_BROKEN = 20  # breaks listed by one check


def _value(v: Any) -> Any:
    if isinstance(v, datetime):  # naive UTC, as stored
        return v.replace(tzinfo=None).isoformat(timespec="microseconds")
    return v


def link(prev: str, table: str, row: Mapping[str, Any]) -> str:
    """The hash of ``row`` (a row of ``table``) following the entry whose hash is ``prev``.

    >>> from datetime import UTC, datetime
    >>> row = {"at": datetime(2026, 3, 2, 1, 0), "actor": "ana", "action": "login",
    ...        "alert_id": None, "detail": "{}"}
    >>> h = link(GENESIS, "audit_log", row)
    >>> len(h), h == link(GENESIS, "audit_log", {**row, "actor": "bob"})
    (64, False)
    """
    material = json.dumps(
        [table, *(_value(row.get(f)) for f in FIELDS[table])],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256((prev + material).encode()).hexdigest()


def chained_insert(conn: Connection, table: Table, values: dict[str, Any]) -> Any:
    """Insert ``values`` into ``table`` as the chain's next entry; the insert's result."""
    if conn.dialect.name == "postgresql":  # one writer at a time per chain, until commit
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCKS[table.name]})
    last = head(conn, table)
    prev = (last[1] if last is not None else "") or GENESIS
    return conn.execute(insert(table).values(**values, chain=link(prev, table.name, values)))


@dataclass(frozen=True)
class Break:
    """An entry that does not follow from the one before it (or an anchor not kept)."""

    table: str
    entry_id: int
    at: datetime | None
    why: str


@dataclass
class ChainCheck:
    """What :func:`verify` found, per chained table."""

    entries: dict[str, int] = field(default_factory=dict)
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    broken: list[Break] = field(default_factory=list)
    anchors_checked: int = 0  # anchors found in the rows read
    anchors_matched: int = 0  # ... with the hash published for them

    @property
    def ok(self) -> bool:
        return not self.broken


def head(conn: Connection, table: Table = t.audit_log) -> tuple[int, str] | None:
    """The chain's last entry: (id, hash), to publish as an anchor; None while empty."""
    row = conn.execute(select(table.c.id, table.c.chain).order_by(table.c.id.desc()).limit(1))
    got = row.first()
    return (int(got.id), str(got.chain or "")) if got is not None else None


def verify_store(store: Any, anchors: Mapping[tuple[str, int], str] | None = None) -> ChainCheck:
    """:func:`verify` on ``store`` (an AlertStore) in a read transaction of its own."""
    with store.read() as conn:
        return verify(conn, anchors)


def verify(conn: Connection, anchors: Mapping[tuple[str, int], str] | None = None) -> ChainCheck:
    """Walk every chained table in id order and recompute each link. ``anchors`` maps
    (table, entry id) to the hash published for it: each must still be there, unchanged."""
    anchors = dict(anchors or {})
    check = ChainCheck()
    for table in CHAINED:
        q = select(table).order_by(table.c.id).execution_options(yield_per=5000)
        rows = (dict(r._mapping) for r in conn.execute(q))
        _walk(check, table.name, rows, GENESIS, anchors, whole=True)
    return check


def _walk(
    check: ChainCheck,
    name: str,
    rows: Iterable[Mapping[str, Any]],
    prev: str,
    anchors: Mapping[tuple[str, int], str],
    whole: bool,
) -> None:
    """Recompute the links of ``rows`` (one table's, in id order) from ``prev``, adding
    what does not follow to ``check``. An anchor inside the rows' ids must match; with
    ``whole`` (the table, not an excerpt) one not found at all is a break too."""
    wanted = {i: h for (tn, i), h in anchors.items() if tn == name}
    n, first, last = 0, None, None
    for m in rows:
        n += 1
        stored = m["chain"]
        if stored != link(prev, name, m) and len(check.broken) < MAX_BROKEN:
            why = (
                "has no hash (written by a program that does not chain)"
                if not stored
                else "does not follow from the entry before it: it was changed, or an "
                "entry before it was removed or inserted"
            )
            check.broken.append(Break(name, m["id"], _at(m.get("at")), why))
        if m["id"] in wanted:
            check.anchors_checked += 1
            if wanted.pop(m["id"]) == stored:
                check.anchors_matched += 1
            elif len(check.broken) < MAX_BROKEN:
                check.broken.append(
                    Break(name, m["id"], _at(m.get("at")), "differs from the hash published for it")
                )
        prev = stored or prev
        first = m["id"] if first is None else first
        last = (int(m["id"]), str(stored or ""))
    for i in sorted(wanted):
        inside = last is not None and first is not None and first <= i <= last[0]
        if whole or inside:
            check.broken.append(
                Break(name, i, None, "was published as an anchor and is no longer there")
            )
    check.entries[name] = check.entries.get(name, 0) + n
    if last is not None:
        check.heads[name] = last


def _at(v: Any) -> datetime | None:
    if isinstance(v, str):
        return datetime.fromisoformat(v)
    return v if isinstance(v, datetime) else None


# ---------------------------------------------------------------------------- excerpts
EXCERPT_KIND = "emrwatch audit excerpt"


def write_excerpt(
    conn: Connection, out: Any, since: datetime | None = None, until: datetime | None = None,
    table: Table = t.audit_log,
) -> dict[str, Any]:  # fmt: skip
    """Write the entries of ``table`` from ``since`` to ``until`` (naive UTC; open ends:
    from the first, to the last) to the text file ``out`` as JSON lines: a header with the
    hash of the entry before them, then each entry as it is hashed. With an anchor
    published for an entry inside it, anyone can check the excerpt without the database
    (:func:`verify_excerpt`); the header says what it holds."""
    c = table.c
    bounds = select(func.min(c.id), func.max(c.id))
    if since is not None:
        bounds = bounds.where(c.at >= since)
    if until is not None:
        bounds = bounds.where(c.at < until)
    lo, hi = conn.execute(bounds).one()
    prev = GENESIS
    if lo is not None:
        before = conn.execute(select(c.chain).where(c.id < lo).order_by(c.id.desc()).limit(1))
        prev = before.scalar() or GENESIS
    header: dict[str, Any] = {
        "kind": EXCERPT_KIND,
        "version": 1,
        "table": table.name,
        "prev": prev,
        "first_id": lo,
        "last_id": hi,
        "from": since.isoformat() if since else None,
        "to": until.isoformat() if until else None,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out.write(json.dumps(header) + "\n")
    n = 0
    if lo is not None:
        q = select(table).where(c.id >= lo, c.id <= hi).order_by(c.id)
        for r in conn.execute(q.execution_options(yield_per=5000)):
            m = r._mapping
            row = {"id": m["id"], **{f: _value(m[f]) for f in FIELDS[table.name]}}
            out.write(json.dumps({**row, "chain": m["chain"]}, ensure_ascii=False) + "\n")
            n += 1
    header["entries"] = n
    return header


def verify_excerpt(
    lines: Iterable[str], anchors: Mapping[tuple[str, int], str] | None = None
) -> tuple[ChainCheck, dict[str, Any]]:
    """Recompute an excerpt's links from its header's ``prev``; (the check, the header).
    ValueError for a file that is not an excerpt. Without an anchor inside it, a good
    result shows only that the file is consistent: whoever wrote it could have
    recomputed every hash. An anchor published for one of its entries makes every entry
    up to that one authentic."""
    it = iter(lines)
    try:
        header = json.loads(next(it))
    except (StopIteration, ValueError):
        raise ValueError("not an emrwatch audit excerpt (no header line)") from None
    if not isinstance(header, dict) or header.get("kind") != EXCERPT_KIND:
        raise ValueError("not an emrwatch audit excerpt")
    name = str(header.get("table"))
    if name not in FIELDS:
        raise ValueError(f"an excerpt of an unknown table: {name!r}")
    rows = (json.loads(line) for line in it if line.strip())
    check = ChainCheck()
    _walk(check, name, rows, str(header.get("prev") or GENESIS), dict(anchors or {}), False)
    return check, header


def parse_anchor(text_: str) -> tuple[tuple[str, int], str]:
    """``ID:HASH`` (the audit log) or ``TABLE:ID:HASH``.

    >>> parse_anchor("17:" + "a" * 64)
    (('audit_log', 17), 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')
    """
    parts = text_.strip().split(":")
    if len(parts) == 2:
        parts.insert(0, "audit_log")
    if len(parts) != 3 or parts[0] not in FIELDS or not parts[1].isdigit():
        raise ValueError(f"an anchor is ID:HASH or TABLE:ID:HASH, not {text_!r}")
    h = parts[2].lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise ValueError(f"an anchor's hash is 64 hex digits: {text_!r}")
    return (parts[0], int(parts[1])), h


def describe(check: ChainCheck) -> str:
    lines = []
    for name, n in check.entries.items():
        h = check.heads.get(name)
        where = f", head #{h[0]} {h[1]}" if h else ""
        lines.append(f"{name}: {n} entries{where}")
    if check.anchors_checked:
        lines.append(f"anchors found and matching: {check.anchors_matched}")
    if check.ok:
        lines.append("the chain is intact: no entry was changed, removed or inserted")
    else:
        lines.append(f"the chain is BROKEN ({len(check.broken)} place(s)):")
        for b in check.broken:
            when = f" ({b.at.isoformat(sep=' ')[:19]} UTC)" if b.at else ""
            lines.append(f"  {b.table} #{b.entry_id}{when} {b.why}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- watching
class ChainWatch(Periodic):
    """Verifies the chain every ``every_s`` seconds in a thread (the alert service runs
    one: ``alerting.audit_verify_every_h``), for ``/metrics`` and the log: a break found
    is logged as an error and shows as ``emrwatch_audit_chain_breaks`` > 0, on which the
    shipped Prometheus rules page someone. The first check runs ``first_s`` after start."""

    SPECS = (
        ("counter", "emrwatch_audit_chain_checks", "Verifications of the audit log's hash chain",
         "checks"),
        ("gauge", "emrwatch_audit_chain_breaks",
         "Entries that did not follow in the last verification (0: intact)", "breaks"),
        ("gauge", "emrwatch_audit_chain_entries", "Entries the last verification read",
         "entries"),
        ("gauge", "emrwatch_audit_chain_last_check_timestamp_seconds",
         "When the chain was last verified (0: not yet)", "last_check"),
    )  # fmt: skip

    thread_name = "emrwatch-audit-chain"

    def __init__(self, store: Any, every_s: float, first_s: float = 60.0) -> None:
        super().__init__(every_s, first_s)
        self.store = store
        self.checks = 0
        self.breaks = 0
        self.entries = 0
        self.last_check = 0.0
        self.last: ChainCheck | None = None

    def start(self) -> ChainWatch:
        super().start()
        return self

    def check_once(self) -> ChainCheck:
        check = verify_store(self.store)
        self.last = check
        self.checks += 1
        self.breaks = len(check.broken)
        self.entries = sum(check.entries.values())
        self.last_check = time.time()
        if not check.ok:
            logging.getLogger(__name__).error(
                "the alert store's audit log was tampered with: %s", describe(check)
            )
        return check

    def run_once(self) -> ChainCheck | None:
        try:
            return self.check_once()
        except Exception as exc:  # noqa: BLE001 - the database may be back next time
            logging.getLogger(__name__).error("verifying the audit log failed: %s", exc)
            return None

    def collect(self) -> Any:
        from pipeline.alerting.metrics import attribute_metrics

        yield from attribute_metrics(self, self.SPECS)


# ---------------------------------------------------------------------------- the CLI
def _url(args: Any) -> str:
    if args.store:
        return str(args.store)
    from pipeline.alert_service import _load

    return str(_load(args.config)[1].store_url)


def add_audit_verify_arguments(parser: Any) -> None:
    from pipeline.alerting.config import add_store_arguments  # config imports the store

    add_store_arguments(parser, required=False)
    parser.add_argument(
        "--excerpt",
        metavar="FILE",
        help="check an excerpt written by emrwatch audit-export instead of the store (give "
        "an --anchor inside it: without one, only its consistency is shown)",
    )
    parser.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="ID:HASH",
        help="a head published earlier (emrwatch audit-head, the privacy report): it must "
        "still be in the chain, unchanged (repeatable; TABLE:ID:HASH for triage_history)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_audit_verify(args: Any) -> int:
    """Exit 0 if the chain is intact (and every anchor kept), 1 if not, 2 on bad input."""
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.alerting.store import AlertStore

    try:
        anchors = dict(parse_anchor(a) for a in args.anchor)
    except ValueError as exc:
        print(f"emrwatch audit-verify: {exc}", file=sys.stderr)
        return 2
    if args.excerpt:
        try:
            with open(args.excerpt, encoding="utf-8") as fh:
                check, header = verify_excerpt(fh, anchors)
        except (OSError, ValueError) as exc:
            print(f"emrwatch audit-verify: {args.excerpt}: {exc}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"excerpt of {header['table']}: entries #{header.get('first_id')} to "
                  f"#{header.get('last_id')} ({header.get('from') or 'the start'} to "
                  f"{header.get('to') or 'the end'}, UTC)")  # fmt: skip
            if not check.anchors_checked:
                print("no anchor inside it: this shows only that the file is consistent, "
                      "not that it is the log (give --anchor ID:HASH of an entry in it)")  # fmt: skip
        return _report(check, args.json)
    if not (args.store or args.config):
        print("emrwatch audit-verify: give --store, --config or --excerpt", file=sys.stderr)
        return 2
    url = _url(args)
    try:
        store = AlertStore(url, migrate=False)
        check = verify_store(store, anchors)
        store.close()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc)
        print(
            f"emrwatch audit-verify: cannot read the alert store {url}: {reason}", file=sys.stderr
        )
        return 2
    return _report(check, args.json)


def _report(check: ChainCheck, as_json: bool) -> int:
    if as_json:
        print(
            json.dumps(
                {
                    "ok": check.ok,
                    "entries": check.entries,
                    "heads": {k: {"id": i, "hash": h} for k, (i, h) in check.heads.items()},
                    "anchors_checked": check.anchors_checked,
                    "broken": [
                        {"table": b.table, "id": b.entry_id, "why": b.why} for b in check.broken
                    ],
                },
                indent=2,
            )
        )
    else:
        print(describe(check))
    return 0 if check.ok else 1


def add_audit_export_arguments(parser: Any) -> None:
    from pipeline.alerting.config import add_store_arguments

    add_store_arguments(parser)
    parser.add_argument("--from", dest="start", help="first day or time (ISO; UTC unless it says)")
    parser.add_argument("--to", dest="end", help="day or time after the last (exclusive)")
    parser.add_argument("--table", choices=sorted(FIELDS), default="audit_log")
    parser.add_argument("--out", required=True, help="the excerpt file to write (JSON lines)")


def _utc(text_: str | None) -> datetime | None:
    if not text_:
        return None
    dt = datetime.fromisoformat(text_)
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


def cmd_audit_export(args: Any) -> int:
    """Write an excerpt of the audit log (or the triage history) that can be checked
    without the database: for a court, HR or the regulator, with a published anchor."""
    import os

    from pipeline.alerting.store import AlertStore

    try:
        since, until = _utc(args.start), _utc(args.end)
    except ValueError as exc:
        print(f"emrwatch audit-export: {exc}", file=sys.stderr)
        return 2
    table = next(tb for tb in CHAINED if tb.name == args.table)
    store = AlertStore(_url(args), migrate=False)
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # names staff
        with os.fdopen(fd, "w", encoding="utf-8") as out, store.read() as conn:
            header = write_excerpt(conn, out, since, until, table)
    finally:
        store.close()
    print(f"{header['entries']} {args.table} entries (#{header['first_id']} to "
          f"#{header['last_id']}) → {args.out}", file=sys.stderr)  # fmt: skip
    return 0


def add_audit_head_arguments(parser: Any) -> None:
    from pipeline.alerting.config import add_store_arguments

    add_store_arguments(parser)


def cmd_audit_head(args: Any) -> int:
    """Print the audit log's head as an anchor (``ID:HASH``) to keep somewhere else."""
    from pipeline.alerting.store import AlertStore

    store = AlertStore(_url(args), migrate=False)
    with store.read() as conn:
        got = {tb.name: head(conn, tb) for tb in CHAINED}
    store.close()
    for name, h in got.items():
        if h is not None:
            print(f"{h[0]}:{h[1]}" if name == "audit_log" else f"{name}:{h[0]}:{h[1]}")
    return 0
