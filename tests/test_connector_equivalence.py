"""One hospital, three log paths, the same canonical events.

The same accesses are written the way each source would record them: FHIR AuditEvent
NDJSON, IHE ATNA audit messages sent over a real syslog TCP connection, and rows of an
Epic Clarity-style ACCESS_LOG table in the real PostgreSQL. Each goes through its own
connector (records() then normalize()); the canonical events must be identical, field for
field. The SQL layout has no columns for resource type, outcome, emergency or purpose, so
the accesses use the values it implies (Patient, success, routine).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import orjson

from connectors.atna import octet_frame, to_audit_message
from connectors.fhir_encode import to_audit_event
from connectors.registry import build
from connectors.sql import CLARITY_DDL, CLARITY_METRICS, clarity_config, to_access_log_row
from connectors.testing import collect, normalize_all
from emrwatch.events import ACTIONS, AccessEvent

SOURCE = "clarity-prod"


def accesses() -> list[AccessEvent]:
    out = []
    users = ["dr.li", "n.wang", "clerk7"]
    for i, action in enumerate(sorted(ACTIONS) * 3):
        out.append(
            AccessEvent.from_dict(
                {
                    "event_id": f"clarity-{1000 + i}",
                    "ts": f"2026-03-0{1 + i % 3}T{(7 + i) % 24:02d}:{i * 7 % 60:02d}:{i % 60:02d}+08:00",
                    "user_id": users[i % 3],
                    "patient_id": f"MRN{400 + i % 11}",
                    "action": action,
                    "workstation": f"WS-{i % 5}",
                    "source": SOURCE,
                }
            )
        )
    return out


def via_fhir(events: list[AccessEvent], tmp_path: Path) -> list[dict[str, Any]]:
    p = tmp_path / "audit.ndjson"
    p.write_bytes(b"".join(orjson.dumps(to_audit_event(e)) + b"\n" for e in events))
    c = build({"type": "fhir-file", "path": str(p)})
    outs, errs = normalize_all(c, collect(c))
    assert not errs
    return [o.to_dict() for o in outs]


def via_atna(events: list[AccessEvent]) -> list[dict[str, Any]]:
    c = build({"type": "atna-syslog", "transport": "tcp", "host": "127.0.0.1", "port": 0})

    def deliver(conn: Any) -> None:
        with socket.create_connection(("127.0.0.1", conn.port), timeout=10) as s:
            s.sendall(b"".join(octet_frame(to_audit_message(e)) for e in events))

    outs, errs = normalize_all(c, collect(c, push=True, deliver=deliver, expect=len(events)))
    assert not errs
    return [o.to_dict() for o in outs]


def via_sql(events: list[AccessEvent], url: str) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as db:
        db.execute(sa.text("DROP TABLE IF EXISTS ACCESS_LOG, ACCESS_LOG_METRIC"))
        for stmt in CLARITY_DDL.split(";"):
            if stmt.strip():
                db.execute(sa.text(stmt))
        db.execute(
            sa.text("INSERT INTO ACCESS_LOG_METRIC VALUES (:i, :n)"),
            [{"i": i, "n": n} for i, n in CLARITY_METRICS.items()],
        )
        db.execute(
            sa.text(
                "INSERT INTO ACCESS_LOG VALUES (:ACCESS_LOG_ID, :ACCESS_TIME, :USER_ID, :PAT_ID,"
                " :WORKSTATION_ID, :METRIC_ID)"
            ),
            [to_access_log_row(e) for e in events],
        )
    engine.dispose()
    c = build(
        {
            "type": "sql-audit",
            **clarity_config(
                url, once=True, event_id="clarity-{ACCESS_LOG_ID}", constants={"source": SOURCE}
            ),
        }
    )
    outs, errs = normalize_all(c, collect(c))
    assert not errs
    return [o.to_dict() for o in outs]


def test_fhir_atna_and_sql_give_identical_canonical_events(pg_url: str, tmp_path: Path) -> None:
    events = accesses()
    want = sorted((e.to_dict() for e in events), key=lambda d: d["event_id"])
    fhir = sorted(via_fhir(events, tmp_path), key=lambda d: d["event_id"])
    atna = sorted(via_atna(events), key=lambda d: d["event_id"])
    sql = sorted(via_sql(events, pg_url), key=lambda d: d["event_id"])
    assert len(want) == 30 and {d["action"] for d in want} == ACTIONS
    assert fhir == want
    assert atna == want
    assert sql == want
