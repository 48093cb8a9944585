"""The alert store on real SQLite and the real PostgreSQL: migrations, idempotent upserts,
the feed's pages and filters, triage with history, labels, suppressions with preview, and
the audit log."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from detectors.config import DetectionConfig
from pipeline.alerting import schema
from pipeline.alerting.store import (
    AlertFilter,
    AlertStore,
    InvalidTransition,
    SuppressionSpec,
    UnknownAlert,
    normalize_url,
)
from pipeline.alerting.testing import FakeClock, backend_url, sample_alert


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def store(store_url: str, clock: FakeClock) -> Iterator[AlertStore]:
    s = AlertStore(store_url, clock=clock)
    yield s
    s.close()


# ---------------------------------------------------------------------------- migrations
def test_migrations_create_the_modelled_schema_and_round_trip(store_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(normalize_url(store_url))
    schema.migrate(engine)
    assert schema.current_revision(engine) == "0005"
    with engine.connect() as conn:
        mc = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": schema.VERSION_TABLE}
        )
        assert compare_metadata(mc, schema.METADATA) == []
    schema.migrate(engine)  # again: a no-op
    schema.downgrade(engine, "base")
    assert not {"alerts", "outbox"} & set(inspect(engine).get_table_names())
    schema.migrate(engine)
    assert {
        "alerts",
        "alert_events",
        "triage_history",
        "suppressions",
        "audit_log",
        "outbox",
        "feed_sessions",
        "feed_login_failures",
        "feed_code_steps",
    } <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_upgrading_indexes_the_patients_of_the_alerts_already_stored(store_url: str) -> None:
    engine = create_engine(normalize_url(store_url))
    schema.migrate(engine, "0002")  # a store from before the patient index, with alerts
    now = datetime(2026, 3, 2, 2, 0)
    alerts = [
        sample_alert("ew-a", user_id="u1", patient_ids=("p1", "p2")),
        sample_alert("ew-b", user_id="u2", patient_ids=("p2",)),
    ]
    with engine.begin() as conn:
        for d in alerts:
            row = {**AlertStore._row(d, now), "state": "new", "received_at": now}
            conn.execute(schema.alerts.insert().values(**row))
    schema.migrate(engine)
    store = AlertStore(store_url, migrate=False)
    assert schema.current_revision(engine) == "0005"
    got, total = store.alerts_on_patients(["p2"], exclude="ew-a")
    assert [a.alert_id for a in got] == ["ew-b"] and total == 1
    store.close()
    engine.dispose()


def test_cases_on_the_same_patients(store: AlertStore) -> None:
    store.upsert([
        sample_alert("ew-a", user_id="u1", patient_ids=("vip", "p1"),
                     last_seen="2026-03-02T10:05:00+08:00"),
        sample_alert("ew-b", user_id="u2", patient_ids=("vip",),
                     last_seen="2026-03-02T11:05:00+08:00"),
        sample_alert("ew-c", user_id="u3", patient_ids=("p1", "p9"),
                     last_seen="2026-03-02T09:05:00+08:00"),
        sample_alert("ew-d", user_id="u4", patient_ids=("p7",)),
    ])  # fmt: skip
    got, total = store.alerts_on_patients(["vip", "p1"], exclude="ew-a")
    assert [a.alert_id for a in got] == ["ew-b", "ew-c"] and total == 2  # newest first
    got, total = store.alerts_on_patients(["vip", "p1"], exclude="ew-a", limit=1)
    assert [a.alert_id for a in got] == ["ew-b"] and total == 2
    assert store.alerts_on_patients([]) == ([], 0)
    # a newer version with other patients replaces the index of the old one
    store.upsert([sample_alert("ew-b", version=2, user_id="u2", patient_ids=("p5",))])
    assert [a.alert_id for a in store.alerts_on_patients(["vip"])[0]] == ["ew-a"]
    assert [a.alert_id for a in store.alerts_on_patients(["p5"])[0]] == ["ew-b"]


# ---------------------------------------------------------------------------- upserts
def test_upsert_is_idempotent_and_newer_versions_win(store: AlertStore) -> None:
    a1 = sample_alert("ew-a", version=1, severity="medium", event_ids=("e1",))
    a2 = sample_alert("ew-a", version=2, severity="high", event_ids=("e1", "e2"))
    a3 = sample_alert("ew-a", version=3, severity="critical", event_ids=("e1", "e2", "e3"))
    assert store.upsert([a1]).inserted == 1
    c = store.upsert([a1])  # redelivery
    assert (c.inserted, c.updated, c.ignored) == (0, 0, 1)
    store.transition("ew-a", "acknowledged", actor="ana")
    assert store.upsert([a3]).updated == 1
    c = store.upsert([a2, a1])  # late, older versions
    assert (c.updated, c.ignored) == (0, 2)
    got = store.get("ew-a")
    assert got is not None
    assert got.version == 3 and got.alert["severity"] == "critical"
    assert got.state == "acknowledged"  # triage survives new versions
    assert store.event_ids("ew-a") == ["e1", "e2", "e3"]
    assert store.alerts_for_event("e3") == ["ew-a"]
    # one batch with every version, out of order: the highest is kept, once
    c = store.upsert(
        [
            sample_alert("ew-b", version=2, event_ids=("x1", "x2")),
            sample_alert("ew-b", version=5, event_ids=("x1", "x2", "x3")),
            sample_alert("ew-b", version=1, event_ids=("x1",)),
        ]
    )
    assert (c.inserted, c.ignored) == (1, 2)
    got_b = store.get("ew-b")
    assert got_b is not None and got_b.version == 5
    assert store.event_ids("ew-b") == ["x1", "x2", "x3"]
    assert store.count() == 2


def test_upsert_accepts_alert_objects_and_rejects_garbage(store: AlertStore) -> None:
    from detectors.alerts import Alert

    a = Alert.from_dict(sample_alert("ew-obj"))
    assert store.upsert([a]).inserted == 1
    with pytest.raises(ValueError, match="alert_id"):
        store.upsert([{"version": 1}])
    with pytest.raises(ValueError, match="version"):
        store.upsert([{"alert_id": "x", "version": "two"}])


def test_concurrent_writers_converge_on_the_newest_version(store_url: str) -> None:
    """Two routers on one database racing to insert the same new alerts."""
    stores = [AlertStore(store_url), AlertStore(store_url, migrate=False)]
    errors: list[BaseException] = []

    def writer(s: AlertStore, version: int) -> None:
        try:
            for i in range(40):
                s.upsert([sample_alert(f"ew-c{i}", version=version)])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(s, v)) for s, v in zip(stores, (1, 2), strict=True)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert stores[0].count() == 40
    assert {stores[0].get(f"ew-c{i}").version for i in range(40)} == {2}  # type: ignore[union-attr]
    for s in stores:
        s.close()


# ---------------------------------------------------------------------------- the feed
def test_pages_are_ordered_filtered_and_stable(store: AlertStore) -> None:
    alerts = []
    for i in range(230):
        sev = ("low", "medium", "high", "critical")[i % 4]
        # mixed offsets: ordering must be by instant, not by the text
        ls = f"2026-03-{1 + i // 24:02d}T{i % 24:02d}:30:00+08:00"
        if i % 5 == 0:
            ls = f"2026-03-{1 + i // 24:02d}T{(i % 24):02d}:31:00+00:00"
        alerts.append(
            sample_alert(
                f"ew-p{i:03d}",
                severity=sev,
                department_id=("ORTH", "ONC", "ED")[i % 3],
                detector=("vip-snooping",) if i % 7 else ("sealed-record-touch", "self-access"),
                last_seen=ls,
                first_seen=ls,
                user_id=f"u{i % 9}",
            )
        )
    store.upsert(alerts)
    seen: list[str] = []
    cursor = None
    while True:
        pg = store.page(cursor=cursor, limit=50)
        seen += [a.alert_id for a in pg.items]
        # an alert arriving mid-walk does not shift pages already handed out
        store.upsert([sample_alert(f"ew-late{len(seen)}", last_seen="2026-04-30T00:00:00+08:00")])
        cursor = pg.next_cursor
        if cursor is None:
            break
    assert len(seen) == 230 and len(set(seen)) == 230
    from datetime import datetime

    by_id = {a["alert_id"]: datetime.fromisoformat(a["last_seen"]) for a in alerts}
    times = [by_id[i] for i in seen]
    assert times == sorted(times, reverse=True)

    crit = store.page(AlertFilter(severity="critical"), limit=500).items
    assert crit and all(a.severity == "critical" for a in crit)
    assert (
        len(crit)
        == store.count(AlertFilter(severity="critical"))
        == len([i for i in range(230) if i % 4 == 3])
    )
    hi = store.page(AlertFilter(min_severity="high", department_id=["ONC", "ED"]), limit=500).items
    assert hi and all(a.severity in ("high", "critical") and a.department_id != "ORTH" for a in hi)
    sealed = store.page(AlertFilter(detector="sealed-record-touch"), limit=500).items
    assert len(sealed) == len([i for i in range(230) if i % 7 == 0])
    assert all("sealed-record-touch" in a.detectors for a in sealed)
    two = store.page(AlertFilter(detector=["sealed-record-touch", "self-access"]), limit=500)
    assert len(two.items) == len(sealed)  # no duplicates for alerts with both
    # keyset paging through a detector filter and the severity sort
    ids, cur = [], None
    while True:
        pg = store.page(AlertFilter(detector="sealed-record-touch"), cursor=cur, limit=7)
        ids += [a.alert_id for a in pg.items]
        cur = pg.next_cursor
        if not cur:
            break
    assert ids == [a.alert_id for a in sealed]
    ranks, cur = [], None
    while True:
        pg = store.page(AlertFilter(user_id="u3"), cursor=cur, limit=6, sort="severity")
        ranks += [("low", "medium", "high", "critical").index(a.severity) for a in pg.items]
        cur = pg.next_cursor
        if not cur:
            break
    assert ranks == sorted(ranks, reverse=True) and len(ranks) == store.count(
        AlertFilter(user_id="u3")
    )
    with pytest.raises(ValueError, match="cursor"):
        store.page(cursor="not-a-cursor")
    with pytest.raises(ValueError, match="cursor"):
        store.page(cursor=store.page(limit=1).next_cursor, sort="severity")
    with pytest.raises(ValueError, match="severity"):
        AlertFilter(severity="urgent")
    row = store.page(AlertFilter(user_id="u0"), limit=1).items[0]
    assert row.n_events == 2 and row.n_patients == 1 and row.state == "new"


# ---------------------------------------------------------------------------- triage
def test_triage_workflow_history_and_labels(store: AlertStore, clock: FakeClock) -> None:
    store.upsert([sample_alert("ew-t1", event_ids=("e1", "e2")), sample_alert("ew-t2")])
    store.transition("ew-t1", "acknowledged", actor="ana", note="looking")
    clock.advance(60)
    store.transition("ew-t1", "investigating", actor="ana", assignee="bob")
    store.comment("ew-t1", actor="bob", note="called the ward")
    with pytest.raises(InvalidTransition, match="needs a note"):
        store.transition("ew-t1", "closed_confirmed", actor="bob")
    clock.advance(60)
    store.transition("ew-t1", "closed_confirmed", actor="bob", note="no care reason; HR informed")
    got = store.get("ew-t1")
    assert got is not None
    assert (got.state, got.assignee, got.verdict, got.decided_by) == (
        "closed_confirmed", "bob", "confirmed", "bob",
    )  # fmt: skip
    hist = store.history("ew-t1")
    assert [(h.actor, h.from_state, h.to_state) for h in hist] == [
        ("ana", "new", "acknowledged"),
        ("ana", "acknowledged", "investigating"),
        ("bob", "investigating", "investigating"),
        ("bob", "investigating", "closed_confirmed"),
    ]
    assert hist[0].note == "looking" and hist[1].assignee == "bob"
    assert hist[3].at > hist[0].at and hist[0].at.tzinfo is not None

    # invalid steps say what is allowed
    with pytest.raises(InvalidTransition, match="allowed next: acknowledged"):
        store.transition("ew-t2", "investigating", actor="ana")
    with pytest.raises(InvalidTransition, match="unknown triage state"):
        store.transition("ew-t2", "done", actor="ana")
    with pytest.raises(InvalidTransition, match="actor"):
        store.transition("ew-t2", "acknowledged", actor="")
    with pytest.raises(UnknownAlert):
        store.transition("ew-nope", "acknowledged", actor="ana")
    assert store.history("ew-t2") == []

    labels = store.labels()
    assert [(lb.alert_id, lb.user_id, lb.verdict) for lb in labels] == [
        ("ew-t1", "u0001", "confirmed")
    ]
    assert labels[0].event_ids == ["e1", "e2"] and labels[0].to_dict()["verdict"] == "confirmed"
    # re-opening withdraws the verdict (and the label)
    store.transition("ew-t1", "investigating", actor="carol", note="new information")
    assert store.get("ew-t1").verdict is None  # type: ignore[union-attr]
    assert store.labels() == []
    store.transition("ew-t1", "closed_benign", actor="carol", note="covering a colleague")
    assert [lb.verdict for lb in store.labels()] == ["benign"]
    assert store.page(AlertFilter(state="closed_benign")).items[0].alert_id == "ew-t1"


# ---------------------------------------------------------------------------- suppressions
def test_benign_verdict_creates_suppression_with_preview(store: AlertStore) -> None:
    store.upsert(
        [
            sample_alert("ew-s1", user_id="u7", detector=("self-access",), patient_ids=("p1",),
                         last_seen="2026-03-02T09:00:00+08:00"),
            sample_alert("ew-s2", user_id="u7", detector=("self-access",), patient_ids=("p1",),
                         last_seen="2026-03-05T09:00:00+08:00"),
            # the same user, two rules: a self-access suppression only reduces it
            sample_alert("ew-s3", user_id="u7", detector=("self-access", "vip-snooping"),
                         patient_ids=("p1", "p2")),
            # another user: untouched
            sample_alert("ew-s4", user_id="u8", detector=("self-access",), patient_ids=("p9",)),
        ]
    )  # fmt: skip
    spec = store.suppression_from_alert("ew-s1", scope=("user_id",), until="2026-12-31")
    assert len(spec) == 1 and spec[0].rule == "self-access" and spec[0].user_id == "u7"
    pv = store.preview_suppression(*spec)
    assert sorted(a.alert_id for a in pv.hidden) == ["ew-s1", "ew-s2"]
    assert [a.alert_id for a in pv.reduced] == ["ew-s3"]
    assert (pv.hidden_count, pv.reduced_count) == (2, 1)
    # an end date before some evidence only reduces; a patient scope narrows
    pv = store.preview_suppression(
        SuppressionSpec(rule="self-access", user_id="u7", until="2026-03-03")
    )
    assert {a.alert_id for a in pv.hidden} == {"ew-s1", "ew-s3"} - {"ew-s3"}
    pv = store.preview_suppression(SuppressionSpec(rule="*", user_id="u7", patient_id="p1"))
    assert {a.alert_id for a in pv.hidden} == {"ew-s1", "ew-s2"}
    assert {a.alert_id for a in pv.reduced} == {"ew-s3"}
    pv = store.preview_suppression(SuppressionSpec(rule="self-access", workstation="ws-1"))
    assert pv.hidden_count == 0 and pv.reduced_count == 4 and pv.caveats
    with pytest.raises(ValueError, match="at least a user"):
        SuppressionSpec(rule="*")

    # only a benign verdict may create one
    with pytest.raises(InvalidTransition, match="benign"):
        store.add_suppression(spec[0], actor="ana", source_alert_id="ew-s1")
    for step in ("acknowledged", "investigating"):
        store.transition("ew-s1", step, actor="ana")
    with pytest.raises(InvalidTransition, match="closed_benign"):
        store.transition("ew-s1", "closed_confirmed", actor="ana", note="x", suppress=spec)
    store.transition(
        "ew-s1", "closed_benign", actor="ana", note="patient portal kiosk", suppress=spec
    )
    (sup,) = store.suppressions()
    assert (sup.rule, sup.user_id, sup.until, sup.source_alert_id, sup.created_by) == (
        "self-access", "u7", "2026-12-31", "ew-s1", "ana",
    )  # fmt: skip
    extra = store.add_suppression(
        SuppressionSpec(rule="vip-snooping", user_id="u7", description="VIP ward nurse"),
        actor="ana",
        source_alert_id="ew-s1",
    )
    # suppressions become detection exceptions the engine understands
    exc = store.exceptions(on="2026-06-01")
    assert [e.rule for e in exc] == ["self-access", "vip-snooping"]
    cfg = DetectionConfig.from_dict({"exceptions": [e.__dict__ for e in exc]})
    assert cfg.exceptions[0].matches("self-access", "u7", "nurse", "ORTH", "p1", "ws", "2026-06-01")
    assert store.exceptions(on="2027-01-02")[0].rule == "vip-snooping"  # the other lapsed
    store.revoke_suppression(extra.id, actor="ana")
    assert [s.id for s in store.suppressions()] == [sup.id]
    assert len(store.suppressions(active_only=False)) == 2
    actions = [e.action for e in store.audit_log()]
    assert actions == ["suppression.revoke", "suppression.create", "suppression.create"]


# ---------------------------------------------------------------------------- audit
def test_audit_log_records_views_and_unmasking(store: AlertStore, clock: FakeClock) -> None:
    store.upsert([sample_alert("ew-v")])
    store.record_access("ana", "case.view", "ew-v")
    clock.advance(5)
    store.record_access("ana", "unmask", "ew-v", {"field": "patient_ids", "reason": "triage"})
    clock.advance(5)
    store.record_access("bob", "feed.view", None, "filters: severity=critical")
    log = store.audit_log()
    assert [(e.actor, e.action, e.alert_id) for e in log] == [
        ("bob", "feed.view", None),
        ("ana", "unmask", "ew-v"),
        ("ana", "case.view", "ew-v"),
    ]
    assert '"field": "patient_ids"' in log[1].detail
    assert [e.action for e in store.audit_log(alert_id="ew-v")] == ["unmask", "case.view"]
    assert [e.action for e in store.audit_log(actor="bob")] == ["feed.view"]
    assert len(store.audit_log(since=log[1].at)) == 2
    with pytest.raises(ValueError):
        store.record_access("", "case.view")


def test_a_0001_store_upgrades_in_place(store_url: str) -> None:
    engine = create_engine(normalize_url(store_url))
    schema.migrate(engine, "0001")
    assert "ix_alerts_updated_at" not in {i["name"] for i in inspect(engine).get_indexes("alerts")}
    schema.migrate(engine)
    assert schema.current_revision(engine) == "0005"
    assert "ix_alerts_updated_at" in {i["name"] for i in inspect(engine).get_indexes("alerts")}
    schema.downgrade(engine, "base")
    engine.dispose()
