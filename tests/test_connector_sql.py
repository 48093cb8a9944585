"""The ``sql-audit`` connector against the real PostgreSQL (a throwaway database for this
module, one schema per source) and SQLite: conformance, the keyset cursor on equal
timestamps, resuming, continuous polling, lost connections, password masking, the query
form, the canonical round trip through ACCESS_LOG rows, a normalize fuzz and throughput."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.base import ConnectorConfigError, NullLedger, RawRecord
from connectors.registry import build
from connectors.sql import (
    CLARITY_ACTIONS,
    CLARITY_DDL,
    CLARITY_METRICS,
    SqlAuditConnector,
    clarity_config,
    to_access_log_row,
)
from connectors.testing import ConnectorConformance, collect, normalize_all
from emrwatch.events import AccessEvent, EventError
from pipeline.alerting.testing import free_port

psycopg = pytest.importorskip("psycopg")

T0 = datetime(2026, 3, 1, 8, 0, 0)
UNMAPPED_METRIC = (11, "Unknown Activity Z")
#: (ACCESS_LOG_ID, ACCESS_TIME, USER_ID, PAT_ID, WORKSTATION_ID, METRIC_ID)
Row = tuple[int, datetime, str | None, str | None, str | None, int]
ROWS: list[Row] = [
    (1001, T0 - timedelta(minutes=5), "u100", "p1", "WS-ICU-01", 1),
    # five rows share one ACCESS_TIME (one EMR transaction): more than a batch of 4
    (1005, T0, "u100", "p2", "WS-ICU-01", 1),
    (1002, T0, "u100", "p2", "WS-ICU-01", 2),
    (1004, T0, "u101", "p2", "WS-ICU-02", 3),
    (1003, T0, "u101", "p3", "WS-ICU-02", 4),
    (1006, T0, "u102", "p3", "WS-ICU-02", 5),
    (1007, T0 + timedelta(seconds=1), "u101", "p3", None, 6),
    (1008, T0 + timedelta(seconds=2), None, "p4", "WS-ER-01", 1),  # NULL USER_ID
    (1009, T0 + timedelta(seconds=2), "u102", "p4", "WS-ER-01", UNMAPPED_METRIC[0]),
    (1010, T0 + timedelta(seconds=3), "u103", None, "WS-ER-01", 6),  # lookup, no patient
    (1011, T0 + timedelta(seconds=4), "u104", "p5", "WS-ER-02", 99),  # no such metric
    (1012, T0 + timedelta(seconds=5, microseconds=250000), "u104", "p5", "WS-ER-02", 7),
    (1013, T0 + timedelta(hours=14), "u105", "p6", "WS-RAD-01", 8),
    (1014, T0 + timedelta(hours=14), "u105", "p6", "WS-RAD-01", 9),
    (1015, T0 + timedelta(days=1), "u106", "p7", "WS-RAD-01", 10),
]
N_BAD = 3  # 1008 (no user), 1009 (unmapped metric), 1011 (metric not in the metric table)
ORDERED = sorted(ROWS, key=lambda r: (r[1], r[0]))
POSITIONS = [f"ACCESS_LOG ACCESS_LOG_ID={r[0]}" for r in ORDERED]
INSERT = "INSERT INTO ACCESS_LOG VALUES (%s, %s, %s, %s, %s, %s)"
PW = "s3cret-Pw0rd"


# ---------------------------------------------------------------------------- databases


def new_schema(pg_url: str, rows: list[Row] | None = None, password: str = "") -> str:
    """A fresh schema with the Clarity-style tables (and ``rows``); its URL (search_path)."""
    name = f"s_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {name}")
        c.execute(f"SET search_path = {name}")
        c.execute(CLARITY_DDL.replace("TIMESTAMP", "TIMESTAMP WITHOUT TIME ZONE"))
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO ACCESS_LOG_METRIC VALUES (%s, %s)",
                [*CLARITY_METRICS.items(), UNMAPPED_METRIC],
            )
            if rows:
                cur.executemany(INSERT, rows)
    url = f"{pg_url}?options=-csearch_path%3D{name}"
    if password:
        url = url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")
    return url


def insert(url: str, rows: list[Row]) -> None:
    with psycopg.connect(url, autocommit=True) as c, c.cursor() as cur:
        cur.executemany(INSERT, rows)


def sqlite_db(tmp_path: Path, rows: list[Row]) -> str:
    import sqlite3

    path = tmp_path / f"clarity-{uuid.uuid4().hex[:6]}.sqlite"
    with sqlite3.connect(path) as c:
        c.executescript(CLARITY_DDL)
        c.executemany(
            "INSERT INTO ACCESS_LOG_METRIC VALUES (?, ?)",
            [*CLARITY_METRICS.items(), UNMAPPED_METRIC],
        )
        c.executemany(  # what a DATETIME column holds in SQLite: 'YYYY-MM-DD HH:MM:SS[.ffffff]'
            "INSERT INTO ACCESS_LOG VALUES (?, ?, ?, ?, ?, ?)",
            [(r[0], r[1].isoformat(" "), *r[2:]) for r in rows],
        )
    return f"sqlite:///{path}"


def config(url: str, **kw: Any) -> dict[str, Any]:
    base = {
        "once": True,
        "constants": {"source": "clarity-prod"},
        "event_id": "clarity-prod:{ACCESS_LOG_ID}",
    }
    return clarity_config(url, **{**base, **kw})


def make(cfg: dict[str, Any], ledger: NullLedger | None = None) -> SqlAuditConnector:
    c = build({"type": "sql-audit", "name": "clarity", **cfg}, ledger=ledger or NullLedger())
    assert isinstance(c, SqlAuditConnector)
    return c


def events_of(connector: SqlAuditConnector, records: list[RawRecord]) -> list[dict[str, Any]]:
    outs, _ = normalize_all(connector, records)
    return [o.to_dict() for o in outs if isinstance(o, AccessEvent)]


class Reader:
    """records() in a thread (continuous mode), collecting what it yields."""

    def __init__(self, connector: SqlAuditConnector, checkpoint: Any = None) -> None:
        self.connector = connector
        self.stop = threading.Event()
        self.out: list[RawRecord] = []
        self.idles = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(checkpoint,), daemon=True)
        self.thread.start()

    def _run(self, checkpoint: Any) -> None:
        try:
            self.connector.start()
            for raw in self.connector.records(checkpoint, self.stop):
                if raw is None:
                    self.idles += 1
                else:
                    self.out.append(raw)
        except BaseException as exc:  # surfaced by finish()
            self.errors.append(exc)

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.out) < n and time.monotonic() < deadline and not self.errors:
            time.sleep(0.02)
        assert not self.errors, self.errors
        assert len(self.out) >= n, f"only {len(self.out)} of {n} records after {timeout}s"

    def finish(self) -> float:
        t = time.monotonic()
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "records() did not stop"
        self.connector.close()
        if self.errors:
            raise self.errors[0]
        return time.monotonic() - t


# ---------------------------------------------------------------------------- conformance
class TestSqlAuditConformance(ConnectorConformance):
    connector_type = "sql-audit"
    expected = (len(ROWS), len(ROWS) - N_BAD, N_BAD)

    @pytest.fixture(autouse=True)
    def _database(self, pg_url: str) -> None:
        self.pg_url = pg_url

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        # batch_size 4 < the five rows sharing one ACCESS_TIME: the keyset is exercised
        return config(new_schema(self.pg_url, ROWS), batch_size=4)


# ---------------------------------------------------------------------------- reading
def test_clarity_rows_become_canonical_events(pg_url: str) -> None:
    connector = make(config(new_schema(pg_url, ROWS)))
    records = collect(connector)
    assert [r.position for r in records] == POSITIONS
    outs, errs = normalize_all(connector, records)
    by_id = {o.event_id: o for o in outs if isinstance(o, AccessEvent)}
    e = by_id["clarity-prod:1004"]
    assert e.to_dict() == {
        "event_id": "clarity-prod:1004",
        "ts": "2026-03-01T08:00:00+08:00",
        "user_id": "u101",
        "patient_id": "p2",
        "action": "export",
        "resource_type": "Patient",
        "workstation": "WS-ICU-02",
        "outcome": "success",
        "emergency": False,
        "purpose": "",
        "source": "clarity-prod",
    }
    assert by_id["clarity-prod:1012"].ts == "2026-03-01T08:00:05.250000+08:00"
    assert by_id["clarity-prod:1010"].patient_id == ""  # a patient lookup with no patient
    assert {e.action for e in by_id.values()} == set(CLARITY_ACTIONS.values())
    reasons = dict(errs)
    assert (
        "missing user_id (column USER_ID is NULL or empty)"
        in reasons["ACCESS_LOG ACCESS_LOG_ID=1008"]
    )
    assert (
        "unmapped action 'Unknown Activity Z' (column METRIC_NAME)"
        in reasons["ACCESS_LOG ACCESS_LOG_ID=1009"]
    )
    assert "column METRIC_NAME is NULL" in reasons["ACCESS_LOG ACCESS_LOG_ID=1011"]
    # payload: the row as the EMR wrote it, JSON-safe (NUMERIC as string, naive datetime)
    raw = next(r for r in records if r.position.endswith("=1008"))
    assert orjson.loads(raw.payload) == {
        "ACCESS_TIME": "2026-03-01T08:00:02",
        "USER_ID": None,
        "PAT_ID": "p4",
        "WORKSTATION_ID": "WS-ER-01",
        "METRIC_NAME": "Chart Review Opened",
        "ACCESS_LOG_ID": "1008",
    }
    assert raw.checkpoint == {
        "after": {"ACCESS_TIME": "2026-03-01T08:00:02", "ACCESS_LOG_ID": "1008"},
        "types": {"ACCESS_TIME": "datetime", "ACCESS_LOG_ID": "decimal"},
    }


def test_unmapped_default_and_naive_timestamp_modes(pg_url: str) -> None:
    url = new_schema(pg_url, ROWS)
    c = make(config(url, unmapped={"action": "view"}))
    outs, errs = normalize_all(c, collect(c))
    assert len(errs) == 1 and "user_id" in errs[0][1]  # only the NULL USER_ID is left
    assert {o.event_id: o.action for o in outs}["clarity-prod:1009"] == "view"
    c = make(config(url, naive_timestamps="utc"))
    outs, _ = normalize_all(c, collect(c))
    assert outs[0].ts == "2026-03-01T07:55:00+00:00"
    c = make(config(url, naive_timestamps="reject"))
    outs, errs = normalize_all(c, collect(c))
    assert not outs and all("has no UTC offset" in r for _, r in errs)
    c = make(config(url, timezone="America/New_York"))  # DST zone: offset per date
    outs, _ = normalize_all(c, collect(c))
    assert outs[0].ts == "2026-03-01T07:55:00-05:00"


def test_timestamptz_columns_keep_their_instant(pg_url: str) -> None:
    url = new_schema(pg_url)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE AUDIT (ID BIGINT PRIMARY KEY, AT TIMESTAMPTZ, WHO TEXT, PAT TEXT)")
        c.execute("SET TIME ZONE 'UTC'")
        c.execute("INSERT INTO AUDIT VALUES (1, '2026-03-01T08:00:00+05:30', 'u1', 'p1')")
    conn = make(
        {
            "url": url,
            "table": "AUDIT",
            "columns": {"ts": "AT", "user_id": "WHO", "patient_id": "PAT"},
            "constants": {"action": "view"},
            "cursor": ["ID"],
            "once": True,
        }
    )
    records = collect(conn)
    (e,) = conn.normalize(records[0])
    assert (
        e.event_id == "AUDIT:1"
        and e.t == datetime.fromisoformat("2026-03-01T08:00:00+05:30").timestamp()
    )
    assert datetime.fromisoformat(e.ts).utcoffset() is not None
    assert records[0].checkpoint == {"after": {"ID": 1}, "types": {"ID": "int"}}


def test_keyset_cursor_with_equal_timestamps_across_batches(pg_url: str) -> None:
    same = [(2000 + i, T0, f"u{i}", f"p{i}", "WS", 1) for i in range(7)]
    random.Random(3).shuffle(same)
    rows = [(1999, T0 - timedelta(seconds=1), "u", "p", "WS", 1), *same]
    rows.append((1500, T0 + timedelta(seconds=1), "u", "p", "WS", 1))  # lower id, later time
    ledger = NullLedger()
    connector = make(config(new_schema(pg_url, rows), batch_size=3), ledger)
    records = collect(connector)
    ids = [int(r.position.rsplit("=", 1)[1]) for r in records]
    assert ids == [1999, *range(2000, 2007), 1500]
    assert [r["records"] for r in ledger.receipts] == [3, 3, 3]
    assert ledger.receipts[0]["unit"] == "poll cursor>start"
    assert ledger.receipts[1]["unit"] == "poll cursor>2026-03-01T08:00:00,2001"
    assert all(r["peer"] and r["bytes"] > 0 and r["digest"] for r in ledger.receipts)
    # resuming from inside the group of equal timestamps
    tail = collect(make(config(connector.config.url, batch_size=3)), records[4].checkpoint)
    assert [r.position for r in tail] == [r.position for r in records[5:]]


def test_resume_from_checkpoint_reads_only_new_rows(pg_url: str) -> None:
    url = new_schema(pg_url, ROWS)
    first = collect(make(config(url, batch_size=5)))
    assert [r.position for r in first] == POSITIONS
    checkpoint = orjson.loads(orjson.dumps(first[-1].checkpoint))  # as stored on disk
    last_time = ORDERED[-1][1]
    new: list[Row] = [
        (1016, last_time, "u200", "p8", "WS", 1),  # same ACCESS_TIME, higher id
        (1017, last_time + timedelta(seconds=1), "u200", "p8", "WS", 2),
        (1018, last_time + timedelta(seconds=1), "u201", "p9", "WS", 3),
    ]
    insert(url, new)
    again = collect(make(config(url, batch_size=2)), checkpoint)
    assert [r.position for r in again] == [
        f"ACCESS_LOG ACCESS_LOG_ID={i}" for i in (1016, 1017, 1018)
    ]
    nothing = collect(make(config(url)), orjson.loads(orjson.dumps(again[-1].checkpoint)))
    assert nothing == []


def test_cursor_start_skips_history(pg_url: str) -> None:
    url = new_schema(pg_url, ROWS)
    got = collect(make(config(url, cursor_start=["2026-03-01 08:00:00", "1003"])))
    assert [r.position for r in got] == POSITIONS[
        POSITIONS.index("ACCESS_LOG ACCESS_LOG_ID=1003") + 1 :
    ]


def test_checkpoint_of_another_cursor_is_refused(pg_url: str) -> None:
    url = new_schema(pg_url, ROWS)
    with pytest.raises(ValueError, match="checkpoint cursor"):
        collect(make(config(url)), {"after": {"ID": 1}, "types": {"ID": "int"}})


def test_continuous_polling_sees_rows_inserted_while_running(pg_url: str) -> None:
    url = new_schema(pg_url, ROWS[:3])
    reader = Reader(make(config(url, once=False, poll_interval_s=0.2, batch_size=2)))
    reader.wait_for(3)
    expected = [r.position for r in reader.out]
    for k in range(4):
        time.sleep(0.15)
        rows = [
            (3000 + 10 * k + j, T0 + timedelta(minutes=10 + k), f"u{j}", "p", "WS", 1)
            for j in range(3)
        ]
        insert(url, rows)
        expected += [f"ACCESS_LOG ACCESS_LOG_ID={r[0]}" for r in rows]
    reader.wait_for(len(expected))
    time.sleep(0.5)  # nothing beyond what was inserted shows up
    assert reader.idles >= 2, "a caught-up poller yields None while it waits"
    assert reader.finish() < 1.5, "stop is seen within a second"
    assert [r.position for r in reader.out] == expected


def test_lost_connection_is_retried_without_loss_or_duplicates(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rows: list[Row] = [
        (5000 + i, T0 + timedelta(seconds=i // 4), f"u{i % 7}", f"p{i % 13}", "WS", 1 + i % 10)
        for i in range(600)
    ]
    url = new_schema(pg_url, rows, password=PW)
    admin = psycopg.connect(url.replace(f":{PW}", ""), autocommit=True)
    locker = psycopg.connect(url.replace(f":{PW}", ""))
    try:
        # the connector's first SELECT blocks on this lock: then its backend is terminated
        locker.execute("LOCK TABLE access_log IN ACCESS EXCLUSIVE MODE")
        caplog.set_level(logging.WARNING, logger="connectors.sql")
        reader = Reader(
            make(config(url, once=False, batch_size=50, poll_interval_s=0.2, retry_backoff_s=0.1))
        )
        me = (admin.info.backend_pid, locker.info.backend_pid)
        deadline = time.monotonic() + 20
        killed = 0
        while not killed and time.monotonic() < deadline:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                " AND NOT (pid = ANY(%s))",
                [list(me)],
            ).fetchone()[0]
            time.sleep(0.05)
        assert killed == 1, "the connector never queried the locked table"
        locker.rollback()  # release the lock
        reader.wait_for(200)
        # and again, mid-run: whatever the connector's backend is doing now
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND NOT (pid = ANY(%s))",
            [list(me)],
        )
        reader.wait_for(len(rows))
        time.sleep(0.4)
        connector = reader.connector
        reader.finish()
    finally:
        admin.close()
        locker.close()
    expected = [
        f"ACCESS_LOG ACCESS_LOG_ID={r[0]}" for r in sorted(rows, key=lambda r: (r[1], r[0]))
    ]
    assert [r.position for r in reader.out] == expected  # nothing lost, nothing twice
    assert connector.reconnects >= 1
    assert "retry 1" in caplog.text and "cursor kept" in caplog.text
    assert PW not in caplog.text and "***" in caplog.text


def test_password_is_never_shown(
    pg_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    url = new_schema(pg_url, ROWS[:2], password=PW)  # trust auth: any password is accepted
    ledger = NullLedger()
    c = make(config(url), ledger)
    assert len(collect(c)) == 2
    assert PW not in str(c.describe()) and ":***@" in c.describe()["url"]
    assert all(PW not in r["peer"] and "***" in r["peer"] for r in ledger.receipts)
    assert all(PW not in r.peer for r in collect(make(config(url))))
    # an unreachable server: warnings per retry, then the error; no password anywhere
    dead = f"postgresql://postgres:{PW}@127.0.0.1:{free_port()}/clarity"
    c = make(config(dead, max_retries=3, retry_backoff_s=0.05))
    with pytest.raises(Exception) as info:  # noqa: B017 - the driver's error, whatever it is
        for _ in c.records(None, threading.Event()):
            pass
    assert PW not in str(info.value) and PW not in caplog.text
    assert caplog.text.count("polling postgresql://postgres:***@127.0.0.1") == 2
    assert "giving up" in caplog.text and c.reconnects == 3
    assert PW not in str(c.describe())
    # url_env: the URL lives in the environment only
    monkeypatch.setenv("CLARITY_TEST_URL", url)
    cfg = {k: v for k, v in config("").items() if k != "url"}
    c = make({**cfg, "url_env": "CLARITY_TEST_URL"})
    assert PW not in str(c.config) and PW not in str(c.describe())
    assert len(collect(c)) == 2
    monkeypatch.delenv("CLARITY_TEST_URL")
    with pytest.raises(ConnectorConfigError, match="CLARITY_TEST_URL"):
        make({**cfg, "url_env": "CLARITY_TEST_URL"}).start()


QUERY = """
SELECT a.access_time AS t, a.access_log_id AS id, a.user_id AS who, a.pat_id AS pat,
       a.workstation_id AS ws, m.metric_name AS what
FROM access_log a LEFT JOIN access_log_metric m ON m.metric_id = a.metric_id
WHERE a.access_time > :cursor_0 OR (a.access_time = :cursor_0 AND a.access_log_id > :cursor_1)
ORDER BY a.access_time, a.access_log_id
LIMIT :limit
"""


def test_query_form_reads_the_same_events(pg_url: str) -> None:
    url = new_schema(pg_url, ROWS)
    cfg = {
        "url": url,
        "table": "ACCESS_LOG",
        "query": QUERY,
        "columns": {
            "ts": "T",
            "user_id": "WHO",
            "patient_id": "PAT",
            "workstation": "WS",
            "action": "WHAT",
        },
        "cursor": ["T", "ID"],
        "cursor_start": ["1900-01-01 00:00:00", "0"],
        "key": ["ID"],
        "value_maps": {"action": CLARITY_ACTIONS},
        "constants": {"source": "clarity-prod"},
        "event_id": "clarity-prod:{ID}",
        "batch_size": 4,
        "once": True,
    }
    q = make(cfg)
    records = collect(q)
    assert [r.position.rsplit("=")[1] for r in records] == [p.rsplit("=")[1] for p in POSITIONS]
    table_form = make(config(url))
    assert events_of(q, records) == events_of(table_form, collect(table_form))
    assert len(normalize_all(q, records)[1]) == N_BAD
    tail = collect(make(cfg), orjson.loads(orjson.dumps(records[3].checkpoint)))
    assert [r.position for r in tail] == [r.position for r in records[4:]]
    # without :limit the query is streamed and only one batch is fetched per poll
    ledger = NullLedger()
    nolimit = make({**cfg, "query": QUERY.replace("LIMIT :limit", "")}, ledger)
    assert [r.position for r in collect(nolimit)] == [r.position for r in records]
    assert [r["records"] for r in ledger.receipts] == [4, 4, 4, 3]
    # the query form settles where its query says: :settle_before
    now = _local_now()
    insert(url, [(5001, now - timedelta(seconds=30), "u9", "p9", "WS", 1)])
    insert(url, [(5002, now, "u9", "p9", "WS", 1)])
    settled = (
        QUERY.replace("ORDER BY", "AND a.access_time < :settle_before ORDER BY")
        .replace("WHERE a.access_time > :cursor_0 OR", "WHERE (a.access_time > :cursor_0 OR")
        .replace("a.access_log_id > :cursor_1)", "a.access_log_id > :cursor_1))")
    )
    got = collect(make({**cfg, "query": settled, "settle_s": 10}))
    assert [r.position.rsplit("=")[1] for r in got][-2:] == ["1015", "5001"]


def test_sqlite_gives_the_same_events(pg_url: str, tmp_path: Path) -> None:
    lite = make(config(sqlite_db(tmp_path, ROWS), batch_size=4))
    pg = make(config(new_schema(pg_url, ROWS), batch_size=4))
    lite_records, pg_records = collect(lite), collect(pg)
    assert [r.position for r in lite_records] == [r.position for r in pg_records] == POSITIONS
    assert events_of(lite, lite_records) == events_of(pg, pg_records)
    assert len(normalize_all(lite, lite_records)[1]) == N_BAD
    tail = collect(make(config(lite.config.url, batch_size=4)), lite_records[3].checkpoint)
    assert [r.position for r in tail] == POSITIONS[4:]


# ---------------------------------------------------------------------------- round trip
def _event(i: int, ts: str, action: str, **kw: Any) -> AccessEvent:
    return AccessEvent.from_dict(
        {
            "event_id": f"clarity-prod:{7000 + i}",
            "ts": ts,
            "user_id": f"u{i % 4}",
            "patient_id": f"p{i}",
            "action": action,
            "source": "clarity-prod",
            **kw,
        }
    )


def round_trip_events() -> list[AccessEvent]:
    actions = sorted(CLARITY_ACTIONS.values())
    stamps = [
        "2026-03-01T08:00:00+08:00",
        "2026-03-01T08:00:00+08:00",  # same instant as the previous one
        "2026-03-01T23:59:59.500000+08:00",
        "2026-03-02T00:15:00+00:00",  # a UTC writer
        "2026-03-02T03:00:00+05:30",
        "2026-03-01T19:00:00-05:00",
        "2026-06-30T12:00:00.000001+08:00",
    ]
    out = [
        _event(i, stamps[i % len(stamps)], a, workstation=f"WS-{i}" if i % 3 else "")
        for i, a in enumerate(actions)
    ]
    out += [_event(20 + i, stamps[i], "view") for i in range(len(stamps))]
    out.append(_event(40, stamps[0], "query", patient_id=""))  # a search without a patient
    return out


def test_access_log_rows_read_back_as_the_same_canonical_events(pg_url: str) -> None:
    originals = round_trip_events()
    url = new_schema(pg_url)
    insert(url, [tuple(to_access_log_row(e).values()) for e in originals])  # type: ignore[misc]
    c = make(config(url, batch_size=5))
    got = {e["event_id"]: e for e in events_of(c, collect(c))}
    assert len(got) == len(originals)
    shanghai = ZoneInfo("Asia/Shanghai")
    for e in originals:
        back = got[e.event_id]
        # ACCESS_TIME is hospital wall time: the instant survives, the writer's offset not
        local = datetime.fromisoformat(e.ts).astimezone(shanghai).isoformat()
        assert back == {**e.to_dict(), "ts": local}, e.event_id
        if e.ts.endswith("+08:00"):
            assert back == e.to_dict()  # already hospital time: identical
        assert AccessEvent.from_dict(back).t == e.t


def test_fields_an_access_log_cannot_carry() -> None:
    e = _event(
        1,
        "2026-03-01T08:00:00+08:00",
        "view",
        resource_type="DocumentReference",
        outcome="failure",
        emergency=True,
        purpose="BTG",
    )
    with pytest.raises(ValueError, match="emergency.*outcome.*purpose.*resource_type"):
        to_access_log_row(e)
    row = to_access_log_row(e, strict=False)
    assert set(row) == {
        "ACCESS_LOG_ID",
        "ACCESS_TIME",
        "USER_ID",
        "PAT_ID",
        "WORKSTATION_ID",
        "METRIC_ID",
    }
    with pytest.raises(ValueError, match="trailing ACCESS_LOG_ID"):
        to_access_log_row(
            AccessEvent.from_dict(
                {
                    **e.to_dict(),
                    "event_id": "x-abc",
                    "resource_type": "Patient",
                    "outcome": "success",
                    "emergency": False,
                    "purpose": "",
                }
            )
        )


def test_extra_columns_and_constants_fill_what_access_log_lacks(tmp_path: Path) -> None:
    c = make(
        config(
            "sqlite://",
            constants={"source": "clarity-prod", "resource_type": "Chart", "purpose": "TREAT"},
            columns={**clarity_config("")["columns"], "metric_id": "ACCESS_LOG.METRIC_ID"},
        )
    )
    raw = RawRecord(
        orjson.dumps(
            {
                "ACCESS_TIME": "2026-03-01T08:00:00",
                "USER_ID": "u1",
                "PAT_ID": "p1",
                "WORKSTATION_ID": None,
                "ACCESS_LOG_ID": "5",
                "METRIC_NAME": "Report Printed",
                "METRIC_ID": "2",
            }
        ),
        "x",
    )
    (e,) = c.normalize(raw)
    assert (e.resource_type, e.purpose, e.extra) == ("Chart", "TREAT", {"metric_id": "2"})


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": ""}, "exactly one of url and url_env"),
        ({"url_env": "X"}, "exactly one of url and url_env"),
        ({"table": ""}, "table .with columns. or query"),
        ({"cursor": []}, "cursor"),
        ({"joins": ["LEFT OUTER JOIN"]}, "joins: cannot read"),
        ({"timezone": "Mars/Olympus"}, "unknown zone"),
        ({"value_maps": {"action": {"Chart Review Opened": "peek"}}}, "peek"),
        ({"unmapped": {"action": "peek"}}, "peek"),
        ({"event_id": "{NO_SUCH_COLUMN}"}, "NO_SUCH_COLUMN"),
        ({"query": "SELECT 1"}, "joins belong to the table form"),
        ({"joins": [], "query": "SELECT * FROM t"}, ":cursor"),
        ({"joins": [], "query": "SELECT * FROM t WHERE id > :cursor"}, "cursor_start"),
        ({"cursor_start": ["x"]}, "one value per cursor column"),
        ({"batch_size": 0}, "must be > 0"),
        ({"columns": {"user_id": "USER_ID", "action": "M"}}, "columns.ts: required"),
        ({"naive_timestamps": "guess"}, "not one of"),
    ],
)
def test_config_errors_are_clear(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConnectorConfigError, match=message):
        make({**config("sqlite://"), **change})


def test_registry_and_schema() -> None:
    c = make(config("sqlite://"))
    assert c.describe()["cursor"] == ["ACCESS_LOG.ACCESS_TIME", "ACCESS_LOG.ACCESS_LOG_ID"]
    with pytest.raises(ConnectorConfigError, match="no_such"):
        make({**config("sqlite://"), "no_such": 1})


# ---------------------------------------------------------------------------- fuzz
LABELS = ["ACCESS_TIME", "USER_ID", "PAT_ID", "WORKSTATION_ID", "METRIC_NAME", "ACCESS_LOG_ID"]
_scalars = (
    st.none()
    | st.text(max_size=12)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.sampled_from(sorted(CLARITY_ACTIONS) + ["", " ", "chart review  OPENED", "view"])
    | st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
        lambda d: d.isoformat()
    )
    | st.sampled_from(
        [
            "0001-01-01T00:00:00",
            "9999-12-31T23:59:59",
            "2026-03-01T08:00:00Z",
            "2026-03-01T08:00:00+14:00",
            "2026-13-01",
            "08:00",
            "2026-03-01",
        ]
    )
)
_values = (
    _scalars
    | st.lists(_scalars, max_size=2)
    | st.dictionaries(st.text(max_size=3), _scalars, max_size=2)
)
_good: dict[str, st.SearchStrategy[Any]] = {
    "ACCESS_TIME": st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.none() | st.sampled_from([ZoneInfo("UTC"), ZoneInfo("Asia/Kolkata")]),
    ).map(lambda d: d.isoformat()),
    "USER_ID": st.text(min_size=1, max_size=6),
    "PAT_ID": st.text(max_size=6) | st.none(),
    "WORKSTATION_ID": st.text(max_size=6) | st.none(),
    "METRIC_NAME": st.sampled_from(sorted(CLARITY_ACTIONS) + ["Chart review opened "]),
    "ACCESS_LOG_ID": st.integers(0, 2**63) | st.decimals(allow_nan=False).map(str),
}
_random_rows = st.dictionaries(st.sampled_from(LABELS) | st.text(max_size=6), _values, max_size=8)
_DROP = object()


def _near(
    good: dict[str, Any], changes: list[tuple[str, Any]], lower: bool, extra: dict[str, Any]
) -> dict[str, Any]:
    row = {**extra, **good}
    for k, v in changes:
        if v is _DROP:
            row.pop(k, None)
        else:
            row[k] = v
    return {(k.lower() if lower else k): v for k, v in row.items()}


#: nearly valid rows: well-formed columns with a few dropped or replaced by anything, under
#: their own names or lower-cased (as PostgreSQL returns unquoted labels)
_near_rows = st.builds(
    _near,
    st.fixed_dictionaries(_good),
    st.lists(st.tuples(st.sampled_from(LABELS), _values | st.just(_DROP)), max_size=2),
    st.booleans(),
    st.dictionaries(st.text(max_size=4), _scalars, max_size=2),
)
_rows = _random_rows | _near_rows
FUZZ = [
    make(config("sqlite://")),
    make(config("sqlite://", event_id="", unmapped={"action": "view"}, naive_timestamps="reject")),
    make(
        {
            "url": "sqlite://",
            "table": "T",
            "query": "SELECT * FROM t WHERE id > :cursor",
            "cursor_start": ["0"],
            "cursor": ["access_log_id"],
            "columns": {
                "ts": "access_time",
                "user_id": "user_id",
                "action": "metric_name",
                "emergency": "pat_id",
                "outcome": "workstation_id",
            },
            "value_maps": {"action": CLARITY_ACTIONS},
        }
    ),
]


def _check(connector: SqlAuditConnector, payload: bytes) -> None:
    try:
        outs = connector.normalize(RawRecord(payload, "fuzz"))
    except EventError as exc:
        assert str(exc)
        return
    for o in outs:
        again = AccessEvent.from_dict(orjson.loads(orjson.dumps(o.to_dict())))
        assert again.to_dict() == o.to_dict()
        assert o.user_id and o.event_id and o.ts


@settings(max_examples=200, deadline=None)
@given(row=_rows, which=st.integers(0, len(FUZZ) - 1))
def test_fuzz_normalize_rows(row: dict[str, Any], which: int) -> None:
    try:
        payload = orjson.dumps(row)
    except (TypeError, orjson.JSONEncodeError):
        return  # not a row a database could have produced (e.g. an int beyond 64 bits)
    _check(FUZZ[which], payload)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=40) | st.sampled_from([b"[]", b"null", b"1", b'"x"', b"{}"]))
def test_fuzz_normalize_bytes(payload: bytes) -> None:
    _check(FUZZ[0], payload)


# ---------------------------------------------------------------------------- throughput
def test_throughput_50k_rows(pg_url: str, record_property: Any) -> None:
    url = new_schema(pg_url)
    n = 50_000
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(
            "INSERT INTO access_log SELECT g, timestamp '2026-03-01 00:00:00'"
            " + (g / 4) * interval '1 second', 'u' || (g % 500), 'p' || (g % 5000),"
            " 'WS-' || (g % 50), 1 + g % 10 FROM generate_series(1, 50000) g"
        )
        c.execute("ANALYZE access_log")
    c = make(config(url, batch_size=5000))
    t0 = time.perf_counter()
    records = collect(c)
    t1 = time.perf_counter()
    events, errors = normalize_all(c, records)
    t2 = time.perf_counter()
    assert (len(records), len(events), len(errors)) == (n, n, 0)
    rate = n / (t2 - t0)
    record_property("sql_rows_per_s", round(rate))
    print(
        f"\nsql-audit PostgreSQL: {n} rows; records() {n / (t1 - t0):,.0f} rows/s, "
        f"normalize {n / (t2 - t1):,.0f} rows/s, end to end {rate:,.0f} rows/s"
    )


# ---------------------------------------------------------------------------- edge cases
# The fuzz above (and a 3000-example run of it during development) found no exception
# other than EventError; these pin the edge cases met while writing it.
BASE_ROW = {
    "ACCESS_TIME": "2026-03-01T08:00:00",
    "USER_ID": "u1",
    "PAT_ID": "p1",
    "WORKSTATION_ID": None,
    "METRIC_NAME": "Report Printed",
    "ACCESS_LOG_ID": "7",
}


def _norm(payload: Any, connector: SqlAuditConnector | None = None) -> list[AccessEvent]:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return (connector or FUZZ[0]).normalize(RawRecord(data, "edge"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ACCESS_TIME": "2026-03-01"}, "not a date and time"),  # a DATE column mapped as ts
        ({"ACCESS_TIME": "2026-02-30T08:00:00"}, "bad timestamp"),
        ({"ACCESS_TIME": 1772323200}, "not a timestamp"),
        ({"PAT_ID": ["p1"]}, "holds a list"),
        ({"METRIC_NAME": {"name": "x"}}, "holds a dict"),
        ({"METRIC_NAME": 2}, "unmapped action '2'"),
        ({"ACCESS_LOG_ID": None}, "column ACCESS_LOG_ID is missing or NULL"),
        ({"USER_ID": "   "}, "missing user_id"),
    ],
)
def test_bad_rows_are_event_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(EventError, match=message):
        _norm({**BASE_ROW, **change})


@pytest.mark.parametrize("payload", [b"", b"[1]", b"null", b"{", b'"row"'])
def test_bad_payloads_are_event_errors(payload: bytes) -> None:
    with pytest.raises(EventError):
        _norm(payload)


def test_row_edge_cases_that_are_fine() -> None:
    (e,) = _norm({**BASE_ROW, "METRIC_NAME": "  report   PRINTED "})  # case and blanks
    assert e.action == "print"
    (e,) = _norm({k.lower(): v for k, v in BASE_ROW.items()})  # unquoted labels, folded
    assert (e.user_id, e.event_id) == ("u1", "clarity-prod:7")
    (e,) = _norm({**BASE_ROW, "ACCESS_TIME": "2026-03-01T08:00:00Z"})  # aware values kept
    assert e.ts == "2026-03-01T08:00:00+00:00"
    (e,) = _norm({**BASE_ROW, "ACCESS_LOG_ID": 7.0, "USER_ID": 42})  # numbers as text
    assert (e.event_id, e.user_id) == ("clarity-prod:7", "42")
    (e,) = _norm({**BASE_ROW, "ACCESS_TIME": "0001-01-01T00:00:00"})  # LMT offset, still valid
    assert AccessEvent.from_dict(e.to_dict()).t == e.t


def test_rows_with_a_null_cursor_do_not_stall_the_scan(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "nulls.sqlite"
    with sqlite3.connect(path) as c:  # SQLite sorts NULLs first
        c.execute("CREATE TABLE AUDIT (ID INTEGER PRIMARY KEY, AT TIMESTAMP, WHO TEXT)")
        c.executemany(
            "INSERT INTO AUDIT VALUES (?, ?, ?)",
            [(1, None, "u1"), (2, "2026-03-01 08:00:00", "u2"), (3, "2026-03-01 09:00:00", "u3")],
        )
    cfg = {
        "url": f"sqlite:///{path}",
        "table": "AUDIT",
        "columns": {"ts": "AT", "user_id": "WHO"},
        "constants": {"action": "view"},
        "cursor": ["AT", "ID"],
        "key": ["ID"],
        "batch_size": 1,
        "once": True,
    }
    assert [r.position for r in collect(make(cfg))] == ["AUDIT ID=2", "AUDIT ID=3"]


# ---------------------------------------------------------------------------- settle window
def _local_now(tz: str = "Asia/Shanghai") -> datetime:
    """Now as a Clarity-style naive ACCESS_TIME (hospital-local wall time)."""
    return datetime.now(ZoneInfo(tz)).replace(tzinfo=None)


def test_settle_reads_a_transaction_that_commits_late_with_an_older_timestamp(
    pg_url: str,
) -> None:
    """A row stamped at insert but committed after a later-stamped row: without a settle
    window the poller reads the later row, moves past the earlier one and never sees it."""
    url = new_schema(pg_url)
    kw = {"once": False, "poll_interval_s": 0.1, "timezone": "Asia/Shanghai"}
    eager = Reader(make(config(url, settle_s=0, **kw)))
    settled = Reader(make(config(url, settle_s=2.0, **kw)))
    late = psycopg.connect(url)  # a transaction left open: its row is stamped, not visible
    try:
        late.execute(INSERT, (1, _local_now(), "u1", "p1", "WS", 1))
        time.sleep(0.05)
        insert(url, [(2, _local_now(), "u2", "p2", "WS", 1)])
        eager.wait_for(1)
        time.sleep(0.3)
        assert settled.out == [], "nothing is read before it has settled"
        late.commit()
    finally:
        late.close()
    settled.wait_for(2, timeout=10)
    time.sleep(0.5)
    eager.finish()
    settled.finish()
    ids = [r.position.rsplit("=", 1)[1] for r in settled.out]
    assert ids == ["1", "2"]
    assert [r.position.rsplit("=", 1)[1] for r in eager.out] == ["2"]  # row 1 was lost


def test_settle_on_sqlite_text_and_timestamptz_columns(pg_url: str, tmp_path: Path) -> None:
    tz = "America/Chicago"  # behind UTC: a bound taken in the wrong zone would hold rows back
    old, fresh = _local_now(tz) - timedelta(seconds=30), _local_now(tz)
    rows: list[Row] = [(1, old, "u1", "p1", "WS", 1), (2, fresh, "u2", "p2", "WS", 1)]
    url = sqlite_db(tmp_path, rows)
    got = collect(make(config(url, settle_s=10, timezone=tz)))
    assert [r.position for r in got] == ["ACCESS_LOG ACCESS_LOG_ID=1"]
    got = collect(make(config(url, settle_s=0, timezone=tz)))
    assert len(got) == 2
    # an empty table reads nothing until a row shows how it holds time
    empty = sqlite_db(tmp_path, [])
    assert collect(make(config(empty, settle_s=10))) == []
    # a timestamptz column compares instants, whatever the configured zone
    schema = new_schema(pg_url)
    with psycopg.connect(schema, autocommit=True) as c:
        c.execute("ALTER TABLE ACCESS_LOG ALTER COLUMN ACCESS_TIME TYPE timestamptz")
        now = datetime.now(ZoneInfo("UTC"))
        c.execute(INSERT, (1, now - timedelta(seconds=30), "u1", "p1", "WS", 1))
        c.execute(INSERT, (2, now, "u2", "p2", "WS", 1))
    got = collect(make(config(schema, settle_s=10, timezone="Pacific/Kiritimati")))
    assert [r.position for r in got] == ["ACCESS_LOG ACCESS_LOG_ID=1"]


def test_settle_is_off_for_a_cursor_that_is_not_a_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = sqlite_db(tmp_path, ROWS)
    cfg = config(url, cursor=["ACCESS_LOG.ACCESS_LOG_ID"], settle_s=5)
    with caplog.at_level(logging.WARNING, logger="connectors.sql"):
        got = collect(make(cfg))
    assert len(got) == len(ROWS)
    assert "settle_s needs a timestamp as the first cursor column" in caplog.text
