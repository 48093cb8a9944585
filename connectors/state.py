"""A connector's durable state: its checkpoint, and the ledger of what each source sent.

The checkpoint file is replaced atomically (write, fsync, rename, fsync the directory), so a
crash leaves either the old or the new checkpoint, never a torn one.

The ledger is a SQLite table of receipts: per source, each unit received (a file, a
connection, a page of a FHIR search, a poll of a SQL table) with when, from whom, how many
records and bytes, its digest, and whether it was accepted, quarantined or rejected and why.
It answers the hospital's question "what came in from where, and was it intact?".

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> store = CheckpointStore(d)
>>> store.load("fhir-a") is None
True
>>> store.save("fhir-a", {"checkpoint": {"line": 3}})
>>> store.load("fhir-a")
{'checkpoint': {'line': 3}}
>>> led = SqliteLedger(d + "/ledger.sqlite")
>>> led.receipt("fhir-a", "audit.ndjson", records=3, size=120)
>>> [(r["source"], r["records"], r["bytes"]) for r in led.summary()]
[('fhir-a', 3, 120)]
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import orjson

from connectors.base import Ledger

__all__ = ["CheckpointStore", "SqliteLedger", "safe_name"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A source name as one file or directory name of its own: other characters become
    ``_``, and a leading dot too (no hidden files, and never ``.`` or ``..``).

    >>> safe_name("emr/atna 1"), safe_name(".."), safe_name("hl7-adt.main")
    ('emr_atna_1', '_.', 'hl7-adt.main')"""
    safe = _SAFE.sub("_", name)
    return "_" + safe[1:] if safe.startswith(".") else safe or "_"


class CheckpointStore:
    """One JSON document per source name in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{safe_name(name)}.checkpoint.json"

    def load(self, name: str) -> dict[str, Any] | None:
        p = self.path(name)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        doc = orjson.loads(data)
        if not isinstance(doc, dict):
            raise ValueError(f"{p}: not a checkpoint document")
        return doc

    def save(self, name: str, doc: dict[str, Any]) -> None:
        p = self.path(name)
        tmp = p.with_suffix(p.suffix + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(doc))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def reset(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    unit        TEXT NOT NULL,
    peer        TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    records     INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0,
    status      TEXT NOT NULL DEFAULT 'accepted',
    reason      TEXT NOT NULL DEFAULT '',
    digest      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS receipts_source_time ON receipts (source, received_at);
"""


class SqliteLedger(Ledger):
    """Receipts in a SQLite file; safe to share between the connector threads of a process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def store(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO receipts (source, unit, peer, received_at, records, bytes, status,"
                " reason, digest) VALUES (:source, :unit, :peer, :received_at, :records, :bytes,"
                " :status, :reason, :digest)",
                row,
            )

    def rows(self, source: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        q = "SELECT source, unit, peer, received_at, records, bytes, status, reason, digest FROM receipts"
        args: tuple[Any, ...] = ()
        if source:
            q += " WHERE source = ?"
            args = (source,)
        q += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            cur = self._db.execute(q, (*args, limit))
            names = [c[0] for c in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def summary(self) -> list[dict[str, Any]]:
        """Per source and status: units, records, bytes, first and last receipt."""
        with self._lock:
            cur = self._db.execute(
                "SELECT source, status, COUNT(*), SUM(records), SUM(bytes), MIN(received_at),"
                " MAX(received_at) FROM receipts GROUP BY source, status ORDER BY source, status"
            )
            return [
                {
                    "source": s,
                    "status": st,
                    "units": n,
                    "records": int(r or 0),
                    "bytes": int(b or 0),
                    "first": lo,
                    "last": hi,
                }
                for s, st, n, r, b, lo, hi in cur.fetchall()
            ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
