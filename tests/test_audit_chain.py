"""The tamper-evident audit log (a hash chain over ``audit_log`` and ``triage_history``),
on SQLite and PostgreSQL: every way of editing the log in the database is found, an
anchor published earlier catches a rewrite of the whole chain, concurrent writers from
several processes keep one chain, an older store is chained when it upgrades, and the
command line and the feed's audit page say what they found."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, insert, select, update

from pipeline.alerting import chain, schema
from pipeline.alerting.records import normalize_url
from pipeline.alerting.report import privacy_report
from pipeline.alerting.store import AlertStore
from pipeline.alerting.testing import backend_url, sample_alert
from pipeline.web.testing import RunningFeed

ROOT = Path(__file__).resolve().parent.parent
t_audit, t_history = schema.audit_log, schema.triage_history


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AlertStore]:
    with backend_url(request.param, tmp_path) as url:
        s = AlertStore(url)
        yield s
        s.close()


def _fill(store: AlertStore) -> None:
    """Some days of a privacy office's work: views, an unmask, triage with a verdict."""
    store.upsert([sample_alert("ew-1", user_id="u1"), sample_alert("ew-2", user_id="u2")])
    store.record_access("ana", "login", None, {"address": "10.0.0.7"})
    store.record_access("ana", "case.view", "ew-1")
    store.record_access("ana", "unmask", "ew-1", {"reason": "patient complaint 17"})
    store.transition("ew-1", "acknowledged", actor="ana")
    store.transition("ew-1", "investigating", actor="ana")
    store.transition("ew-1", "closed_confirmed", actor="sam", note="confirmed with HR")
    store.record_access("sam", "case.view", "ew-2")


def _check(store: AlertStore, anchors: dict | None = None) -> chain.ChainCheck:
    with store.read() as conn:
        return chain.verify(conn, anchors)


def _broken(store: AlertStore, anchors: dict | None = None) -> list[tuple[str, int]]:
    return [(b.table, b.entry_id) for b in _check(store, anchors).broken]


def test_an_untouched_log_verifies_and_every_kind_of_edit_is_found(store: AlertStore) -> None:
    _fill(store)
    check = _check(store)
    assert check.ok and check.entries == {"audit_log": 4, "triage_history": 3}
    assert check.heads["audit_log"][0] == 4
    with store.write() as conn:
        # an unmask's stated reason is changed after the fact ...
        conn.execute(update(t_audit).where(t_audit.c.id == 3).values(detail='{"reason": "x"}'))
    assert _broken(store) == [("audit_log", 3)]
    with store.write() as conn:
        conn.execute(update(t_audit).where(t_audit.c.id == 3).values(
            detail=json.dumps({"reason": "patient complaint 17"}, sort_keys=True)))  # fmt: skip
    assert _check(store).ok  # put back exactly as it was: intact again
    with store.write() as conn:
        # ... a case view is deleted: the entry after it no longer follows
        conn.execute(delete(t_audit).where(t_audit.c.id == 2))
        # ... a verdict is turned from confirmed misuse into benign
        conn.execute(update(t_history).where(t_history.c.id == 3).values(to_state="closed_benign"))
    assert _broken(store) == [("audit_log", 3), ("triage_history", 3)]


def test_an_inserted_entry_and_a_rewritten_chain_are_found(store: AlertStore) -> None:
    _fill(store)
    with store.read() as conn:
        anchor = chain.head(conn)  # published: the monthly report printed it
    assert anchor is not None
    store.record_access("sam", "case.view", "ew-1")
    with store.write() as conn:  # an entry slipped in with a plausible hash of its own
        conn.execute(insert(t_audit).values(at=datetime(2026, 3, 2, 3, 0), actor="bob",
                                            action="case.view", alert_id="ew-2", detail="",
                                            chain="f" * 64))  # fmt: skip
    assert _broken(store) == [("audit_log", 6)]
    # someone who knows the scheme deletes entries and recomputes every later hash: the
    # chain alone is consistent again, but the anchor published before is gone
    with store.write() as conn:
        conn.execute(delete(t_audit).where(t_audit.c.id.in_([3, 6])))
        prev = chain.GENESIS
        for r in conn.execute(select(t_audit).order_by(t_audit.c.id)).mappings().all():
            prev = chain.link(prev, "audit_log", dict(r))
            conn.execute(update(t_audit).where(t_audit.c.id == r["id"]).values(chain=prev))
    assert _check(store).ok
    anchors = {("audit_log", anchor[0]): anchor[1]}
    assert _broken(store, anchors) == [("audit_log", 4)]
    assert "differs from the hash published" in _check(store, anchors).broken[0].why


def test_writers_in_several_processes_keep_one_chain(store: AlertStore) -> None:
    others = [AlertStore(store.url, migrate=False) for _ in range(3)]
    store.upsert([sample_alert("ew-1", user_id="u1")])

    def write(s: AlertStore, who: str) -> None:
        for i in range(40):
            s.record_access(who, "case.view", "ew-1", {"i": i})
            if i % 10 == 0:
                s.comment("ew-1", who, f"note {i}")

    threads = [threading.Thread(target=write, args=(s, f"u{k}")) for k, s in enumerate(others)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    check = _check(store)
    assert check.ok, chain.describe(check)
    assert check.entries == {"audit_log": 120, "triage_history": 12}
    for s in others:
        s.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_store_from_before_the_chain_is_chained_when_it_upgrades(
    backend: str, tmp_path: Path
) -> None:
    with backend_url(backend, tmp_path) as url:
        _upgrade_and_check(url)


def _upgrade_and_check(url: str) -> None:
    engine = create_engine(normalize_url(url))
    schema.migrate(engine, "0004")
    now = datetime(2026, 3, 1, 9, 0)
    with engine.begin() as conn:
        row = {**AlertStore._row(sample_alert("ew-1"), now), "state": "new", "received_at": now}
        conn.execute(insert(schema.alerts).values(**row))
        # more entries than the migration chains in one page (2,000)
        conn.execute(insert(t_audit), [
            {"at": datetime(2026, 3, 1, 9, 0) + timedelta(seconds=i), "actor": "ana",
             "action": "case.view", "alert_id": None, "detail": str(i)} for i in range(2_100)
        ])  # fmt: skip
        for i in range(3):
            conn.execute(insert(t_history).values(
                alert_id="ew-1", at=datetime(2026, 3, 1, 9, i, 30), actor="ana",
                from_state="new", to_state="acknowledged", assignee=None, note=""))  # fmt: skip
    schema.migrate(engine)
    engine.dispose()
    store = AlertStore(url)
    store.record_access("sam", "login")
    store.comment("ew-1", "sam", "looked again")
    check = _check(store)
    assert check.ok, chain.describe(check)
    assert check.entries == {"audit_log": 2_101, "triage_history": 4}
    store.close()


def test_the_command_line_and_the_privacy_report_publish_and_check_anchors(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/alerts.sqlite3"
    store = AlertStore(url)
    _fill(store)
    rep = privacy_report(store, datetime(2026, 3, 1).date(), datetime(2026, 4, 1).date(), "UTC")
    head = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "audit-head", "--store", url],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.split()  # fmt: skip
    assert head[0] == rep.audit_anchor and head[0].startswith("4:")
    assert f"Audit log head (keep it: emrwatch audit-verify --anchor): {head[0]}" in rep.to_text()

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "pipeline.cli", "audit-verify", "--store", url, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)

    ok = verify("--anchor", head[0], "--anchor", head[1])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "the chain is intact" in ok.stdout and "anchors found and matching: 2" in ok.stdout
    gone = verify("--anchor", head[0], "--anchor", "99:" + "0" * 64)  # one that is not there
    assert gone.returncode == 1 and "anchors found and matching: 1" in gone.stdout
    assert "#99 was published as an anchor and is no longer there" in gone.stdout
    with store.write() as conn:
        conn.execute(update(t_audit).where(t_audit.c.id == 2).values(actor="bob"))
    bad = verify("--json")
    assert bad.returncode == 1
    got = json.loads(bad.stdout)
    assert got["ok"] is False and got["broken"][0]["id"] == 2
    assert verify("--anchor", "nonsense").returncode == 2
    store.close()


def test_the_audit_page_verifies_the_chain(tmp_path: Path) -> None:
    feed = RunningFeed(tmp_path)
    try:
        aud, ana = feed.client("aud"), feed.client("ana")
        page = aud.get("/audit").text
        assert "Verify the chain" in page and "head #" in page
        r = aud.post("/audit/verify")
        assert r.status_code == 303 and r.headers["location"] == "/audit"
        assert "The chain is intact" in aud.get("/audit").text
        assert ana.post("/audit/verify").status_code == 403  # analysts do not read the log
        with feed.store.write() as conn:
            conn.execute(update(t_audit).where(t_audit.c.id == 1).values(detail="{}"))
        assert aud.post("/audit/verify").status_code == 303
        page = aud.get("/audit").text
        assert "The chain is BROKEN at 1 place(s)" in page and "audit log #1" in page
        [last, *_] = feed.store.audit_log(actions=("audit.verify",))
        assert json.loads(last.detail)["ok"] is False
    finally:
        feed.close()


def test_the_alert_service_watches_the_chain_and_reports_a_break(tmp_path: Path) -> None:
    import time

    from prometheus_client import CollectorRegistry, generate_latest

    from pipeline.alerting.config import AlertingConfig, AlertingConfigError

    store = AlertStore(f"sqlite:///{tmp_path}/alerts.sqlite3")
    _fill(store)
    watch = chain.ChainWatch(store, every_s=0.2, first_s=0.0)
    registry = CollectorRegistry()
    registry.register(watch)
    watch.start()
    try:
        deadline = time.monotonic() + 5
        while watch.checks < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watch.breaks == 0 and watch.entries == 7 and watch.last_check > 0
        with store.write() as conn:
            conn.execute(update(t_history).where(t_history.c.id == 2).values(actor="mallory"))
        while watch.breaks == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        text = generate_latest(registry).decode()
        assert "emrwatch_audit_chain_breaks 1.0" in text
        assert "emrwatch_audit_chain_checks_total" in text
    finally:
        watch.stop()
        store.close()
    assert AlertingConfig.from_dict({}).audit_verify_every_h == 24.0
    with pytest.raises(AlertingConfigError, match="audit_verify_every_h"):
        AlertingConfig.from_dict({"audit_verify_every_h": -1})


def test_the_audit_log_is_filtered_by_day_and_exported_with_its_links(tmp_path: Path) -> None:
    import csv
    import io

    from pipeline.alerting.testing import FakeClock

    feed = RunningFeed(tmp_path)  # timezone Asia/Shanghai (UTC+8)
    try:
        clock = FakeClock("2026-03-01T23:30:00+00:00")  # 2 March, 07:30 at the hospital
        with AlertStore(feed.store.url, clock=clock) as old:
            old.record_access("li", "case.view", "ew-1")
            clock.advance(17 * 3600)  # 3 March, 00:30 at the hospital
            old.record_access("li", "unmask", "ew-1", {"reason": "complaint 17"})
        aud, ana = feed.client("aud"), feed.client("ana")
        day = aud.get("/audit?actor=li&from=2026-03-02&to=2026-03-02").text
        rows = day.split('id="audit"')[1]
        assert "case.view" in rows and "unmask" not in rows
        assert 'href="/audit.csv?actor=li&amp;from=2026-03-02&amp;to=2026-03-02"' in day
        r = aud.http.get("/audit.csv?actor=li")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        got = list(csv.DictReader(io.StringIO(r.text)))
        assert [g["action"] for g in got] == ["case.view", "unmask"]  # oldest first
        assert json.loads(got[1]["detail"]) == {"reason": "complaint 17"}
        stored = {e.id: e.chain for e in feed.store.audit_log(actor="li")}
        assert {int(g["id"]): g["chain"] for g in got} == stored and all(stored.values())
        [export] = feed.store.audit_log(actions=("audit.export",))
        assert json.loads(export.detail)["entries"] == 2 and export.actor == "aud"
        assert aud.http.get("/audit.csv?from=2026-13-01").status_code == 400
        assert ana.http.get("/audit.csv").status_code == 403
    finally:
        feed.close()


def test_an_excerpt_is_checked_without_the_database_against_a_published_anchor(
    tmp_path: Path,
) -> None:
    """A month of the audit log for a court: written by ``audit-export``, checked by
    ``audit-verify --excerpt`` with the head the privacy report printed."""
    from pipeline.alerting.testing import FakeClock

    url = f"sqlite:///{tmp_path}/alerts.sqlite3"
    clock = FakeClock("2026-02-27T10:00:00+00:00")
    store = AlertStore(url, clock=clock)
    for i in range(6):  # February and March
        store.record_access("ana", "case.view", f"ew-{i}", {"i": i})
        clock.advance(86_400)
    with store.read() as conn:
        anchor = chain.head(conn)  # the month's report printed it
    store.close()
    assert anchor is not None and anchor[0] == 6
    out = tmp_path / "march.jsonl"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args],
                              capture_output=True, text=True, cwd=ROOT)  # fmt: skip

    made = cli("audit-export", "--store", url, "--from", "2026-03-01", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert "4 audit_log entries (#3 to #6)" in made.stderr  # 1 to 4 March
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["first_id"] == 3 and len(lines) == 5
    good = cli("audit-verify", "--excerpt", str(out), "--anchor", f"{anchor[0]}:{anchor[1]}")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "the chain is intact" in good.stdout and "anchors found and matching: 1" in good.stdout
    alone = cli("audit-verify", "--excerpt", str(out))
    assert alone.returncode == 0 and "only that the file is consistent" in alone.stdout
    # one entry of the excerpt changed: found, though the file is checked on its own ...
    edited = json.loads(lines[2])
    edited["actor"] = "bob"
    out.write_text("\n".join([lines[0], lines[1], json.dumps(edited), *lines[3:]]) + "\n")
    bad = cli("audit-verify", "--excerpt", str(out), "--anchor", f"{anchor[0]}:{anchor[1]}")
    assert bad.returncode == 1 and "audit_log #4" in bad.stdout
    # ... and a forger who recomputes every hash cannot match the published anchor
    prev = json.loads(lines[0])["prev"]
    forged = [lines[0]]
    for line in lines[1:]:
        row = json.loads(line)
        row["actor"] = "bob"
        prev = row["chain"] = chain.link(prev, "audit_log", row)
        forged.append(json.dumps(row))
    out.write_text("\n".join(forged) + "\n")
    assert cli("audit-verify", "--excerpt", str(out)).returncode == 0  # consistent alone
    caught = cli("audit-verify", "--excerpt", str(out), "--anchor", f"{anchor[0]}:{anchor[1]}")
    assert caught.returncode == 1 and "differs from the hash published" in caught.stdout
    (tmp_path / "x.jsonl").write_text("{}\n")
    assert cli("audit-verify", "--excerpt", str(tmp_path / "x.jsonl")).returncode == 2
