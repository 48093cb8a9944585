"""``emrwatch access-report``: every access of a patient (or by a user), explained as the
detectors explained it, with the alerts that hold it; the patient's copy; the command."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from detectors.config import DetectionConfig
from detectors.engine import Engine
from emrwatch.context import Context
from pipeline.access_report import CSV_COLUMNS, ReportError, access_report, parse_bound
from pipeline.replay import run_engine
from pipeline.simulate import simulate
from tests.hospital import ev, write_hospital

EMRWATCH = [sys.executable, "-m", "pipeline.cli"]


def _write(path: Path, events: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return path


EVENTS = [
    # day 1: n-orth writes a note on a discharged ORTH patient (the write explains itself)
    ev("n-orth", "P-DIS", at="2026-03-02T09:00:00", action="create", event_id="dis-note"),
    # day 3, in the period
    ev("p-card", "P1", at="2026-03-04T10:00:00", event_id="att"),  # attending, CARD care
    ev("t-rad", "P1", at="2026-03-04T11:00:00", event_id="rad", workstation="ws-rad"),
    ev("n-card", "P-SEAL", at="2026-03-04T13:00:00", event_id="seal"),  # not authorised
    ev("n-orth", "P1", at="2026-03-04T14:00:00", event_id="orth-look"),  # CARD's patient
    ev("n-orth", "P1", at="2026-03-04T14:20:00", action="update", event_id="orth-note"),
    ev("n-orth", "P-VIP", at="2026-03-04T15:00:00", outcome="failure", event_id="vip-denied"),
    ev("n-orth", "P-DIS", at="2026-03-05T09:00:00", event_id="dis-read"),  # the note explains it
    # after the period
    ev("p-card", "P1", at="2026-03-06T10:00:00", event_id="after"),
]


@pytest.fixture
def hospital(tmp_path: Path) -> tuple[Context, Path]:
    ctx_dir = write_hospital(tmp_path / "ctx")
    events = _write(tmp_path / "events.jsonl", EVENTS)
    return Context.load(ctx_dir), events


def _period(ctx: Context) -> tuple[float | None, float | None]:
    return parse_bound("2026-03-04", ctx), parse_bound("2026-03-06", ctx)


def test_a_patients_accesses_with_what_explained_each(hospital):
    ctx, events = hospital
    rep = access_report(ctx, events, patients=["P1"], start=_period(ctx)[0], end=_period(ctx)[1])
    rows = {a.event_id: a for a in rep.accesses}
    assert list(rows) == ["att", "rad", "orth-look", "orth-note"]  # not "after", not others'
    assert rows["att"].reasons == ["attending", "care_department"]
    assert "encounter E1 in Cardiology (CARD)" in rows["att"].because[0]
    assert rows["rad"].reasons == ["service_department"]
    assert rows["rad"].because[0].startswith("Radiology (RAD) serving encounter E1")
    look = rows["orth-look"]
    assert look.reasons == [] and not look.explained
    assert "is not on the care team of the patient's recent encounters" in look.not_because[0]
    assert "encounter E1 in Cardiology (CARD)" in look.not_because[0]
    # the note 20 minutes later: the detectors take the read's findings back for it
    assert "20 min later" in look.documented_after
    assert rows["orth-note"].reasons == ["documented"]
    # the least explained user first
    assert [u.user_id for u in rep.summary] == ["n-orth", "p-card", "t-rad"]
    assert (rep.summary[0].accesses, rep.summary[0].explained) == (2, 1)


def test_a_users_accesses_take_history_before_the_period_into_account(hospital):
    ctx, events = hospital
    start, end = _period(ctx)
    rep = access_report(ctx, events, users=["n-orth"], start=start, end=end)
    rows = {a.event_id: a for a in rep.accesses}
    assert list(rows) == ["orth-look", "orth-note", "vip-denied", "dis-read"]
    # the note of 2 March (before the period) explains the read of 5 March
    assert rows["dis-read"].reasons == ["documented"]
    assert rows["dis-read"].because == [
        "the user charted or ordered for the patient on 2026-03-02 09:00"
    ]
    assert "the system denied it" in rows["vip-denied"].flags
    assert "VIP record" in rows["vip-denied"].flags
    # where the user went, least explained first
    summary = [(p.patient_id, p.accesses, p.explained) for p in rep.patient_summary]
    assert summary == [("P-VIP", 1, 0), ("P1", 2, 1), ("P-DIS", 1, 1)]
    assert rep.patient_summary[0].flags == ["VIP record", "the system denied it"]
    text = rep.to_text()
    assert "User n-orth" in text and "nurse in Orthopedics (ORTH)" in text
    assert "NOT EXPLAINED" in text


def test_flags_and_alerts_are_the_detectors(hospital):
    """An explained access can still be forbidden: the sealed record's care-team nurse who is
    not on its authorised list. The report lists the alert replay raises for it."""
    ctx, events = hospital
    rep = access_report(ctx, events, patients=["P-SEAL"])
    (row,) = rep.accesses
    assert row.explained and row.reasons == ["care_department"]
    assert "sealed record (medical dispute); the user is not on its authorised list" in row.flags
    alerts = run_engine(Engine(ctx, DetectionConfig()), replay_events_of(events))
    holding = [a.alert_id for a in alerts.values() if "seal" in a.event_ids]
    assert holding and row.alerts == holding
    (listed,) = rep.alerts
    assert listed["alert_id"] == holding[0] and listed["severity"] == "critical"


def replay_events_of(path: Path):
    from connectors.readers import read_events

    return [item for _n, item, _raw in read_events(path, "auto")]


def test_the_patients_copy_says_when_who_and_what_only(hospital):
    ctx, events = hospital
    start, end = _period(ctx)
    rep = access_report(ctx, events, patients=["P1", "P-VIP"], start=start, end=end)
    rows = rep.patient_copy_rows()
    # one line per person's run of accesses; the refused attempt on P-VIP is left out
    assert [(r["name"], r["what they did"]) for r in rows] == [
        ("Chen p-card", "viewed test results and measurements"),
        ("Hu t-rad", "viewed test results and measurements"),
        (
            "Zhou n-orth",
            "viewed test results and measurements; updated test results and measurements",
        ),
    ]
    for fmt in ("text", "html", "csv", "json"):
        out = rep.patient_copy(fmt)
        assert "Zhou n-orth" in out
        for internal in ("ws-rad", "care_department", "attending", "NOT EXPLAINED", "ew-"):
            assert internal not in out, (fmt, internal)
    got = list(csv.DictReader(io.StringIO(rep.patient_copy("csv"))))
    assert [r["from"] for r in got] == ["2026-03-04 10:00", "2026-03-04 11:00", "2026-03-04 14:00"]
    assert got[2]["to"] == "2026-03-04 14:20"


def test_no_subject_or_no_file_is_a_clear_error(hospital, tmp_path):
    ctx, events = hospital
    with pytest.raises(ReportError, match="at least one patient or one user"):
        access_report(ctx, events)
    with pytest.raises(ReportError, match="not standard input"):
        access_report(ctx, "-", patients=["P1"])
    with pytest.raises(ReportError, match="no such events file"):
        access_report(ctx, tmp_path / "missing.jsonl", patients=["P1"])
    with pytest.raises(ReportError, match="not a date"):
        parse_bound("4 March", ctx)


def test_the_command_writes_a_private_file_and_counts_bad_lines(hospital, tmp_path):
    ctx, events = hospital
    with open(events, "ab") as fh:
        fh.write(b"{not json\n")
    out = tmp_path / "report.csv"
    ctx_dir = tmp_path / "ctx"
    base = [*EMRWATCH, "access-report", "--context", str(ctx_dir), "--events", str(events)]
    proc = subprocess.run(
        [*base, "--patient", "P1", "--from", "2026-03-04", "--output", "csv", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{events}:10: skipped:" in proc.stderr
    assert "5 access(es) by 3 user(s), 1 not explained" in proc.stderr
    assert "not recorded in any audit log" in proc.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    got = list(csv.DictReader(out.open()))
    assert list(got[0]) == list(CSV_COLUMNS)
    assert [r["event_id"] for r in got] == ["att", "rad", "orth-look", "orth-note", "after"]
    assert got[2]["explained"] == "no" and got[0]["reasons"] == "attending care_department"

    proc = subprocess.run([*base, "--patient-copy"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--patient-copy needs --patient" in proc.stderr
    proc = subprocess.run(
        [*base, "--user", "n-orth", "--output", "json"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["title"] == "Access report: user n-orth" and rep["bad_lines"] == 1
    proc = subprocess.run(
        [*base, "--user", "n-orth", "--to", "March"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "not a date" in proc.stderr


def test_matches_replay_on_a_simulated_hospital(tmp_path):
    """For patients with labelled misuse on a simulated hospital (a tuning seed): every
    labelled access is listed, each access is explained exactly when the detectors explained
    it, and each lists exactly the alerts of a whole-log replay that hold it."""
    simulate(tmp_path, days=2, seed=5, scale=0.3)
    labels = list(csv.DictReader((tmp_path / "labels.csv").open()))
    by_event = {r["event_id"]: r for r in labels}
    ctx = Context.load(tmp_path)
    events = replay_events_of(tmp_path / "events.ndjson")
    patients_of: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.event_id in by_event:
            patients_of[by_event[e.event_id]["scenario"]].add(e.patient_id)
    chosen = sorted({sorted(ps)[0] for ps in patients_of.values() if ps - {""}} - {""})[:8]
    assert len(chosen) >= 5
    eng = Engine(ctx, DetectionConfig())
    eng.unexplained_ids = set()
    alerts = run_engine(eng, events, end_t=max(e.t for e in events))
    unexplained = eng.unexplained_ids
    holding: dict[str, list[str]] = defaultdict(list)
    for a in sorted(alerts.values(), key=lambda a: (a.first_seen, a.alert_id)):
        for i in a.event_ids:
            holding[i].append(a.alert_id)
    rep = access_report(ctx, tmp_path / "events.ndjson", patients=chosen)
    want = [e.event_id for e in events if e.patient_id in set(chosen)]
    assert [a.event_id for a in rep.accesses] == want
    assert {a.event_id for a in rep.accesses if a.event_id in by_event}
    for a in rep.accesses:
        assert a.explained == (a.event_id not in unexplained), a.event_id
        assert a.alerts == holding.get(a.event_id, []), a.event_id
    alerted = {x for a in rep.accesses for x in a.alerts}
    assert alerted and {al["alert_id"] for al in rep.alerts} == alerted
    assert any(not a.explained for a in rep.accesses) and any(a.explained for a in rep.accesses)


def test_the_audit_log_records_who_ran_it_on_whom_and_why(hospital, tmp_path):
    """With --audit-store the report is written to the alert store's audit log before it is
    written out, and the privacy report counts it; without a usable store, no report."""
    from datetime import date, timedelta

    from pipeline.alerting.report import privacy_report
    from pipeline.alerting.store import AlertStore

    _ctx, events = hospital
    url = f"sqlite:///{tmp_path}/alerts.sqlite3"
    AlertStore(url).close()  # a migrated store, as the alert service leaves it
    out = tmp_path / "copy.txt"
    cmd = [
        *EMRWATCH,
        "access-report",
        "--context",
        str(tmp_path / "ctx"),
        "--events",
        str(events),
        "--patient",
        "P1",
        "--patient-copy",
        "--audit-store",
        url,
        "--requested-by",
        "privacy-office:lin",
        "--purpose",
        "patient request 118",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Record of access to the medical record of Zhao A" in out.read_text()
    store = AlertStore(url, migrate=False)
    try:
        (entry,) = store.audit_log(actor="privacy-office:lin")
        assert entry.action == "access_report"
        detail = json.loads(entry.detail)
        assert detail["patients"] == ["P1"] and detail["purpose"] == "patient request 118"
        assert detail["patient_copy"] is True and detail["accesses"] == 5
        today = date.today()
        rep = privacy_report(store, today - timedelta(days=2), today + timedelta(days=2), "UTC")
        assert rep.access_reports_by_actor == {"privacy-office:lin": 1}
        assert "1 access reports (privacy-office:lin 1)" in rep.to_text()
    finally:
        store.close()

    out.unlink()
    bad = [*cmd[: cmd.index("--audit-store") + 1], f"sqlite:///{tmp_path}/none/x.db", *cmd[-6:]]
    proc = subprocess.run(bad, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "cannot write the audit log" in proc.stderr
    assert not out.exists()


def test_a_log_out_of_time_order_reads_in_time_order(tmp_path):
    """Accesses delivered late are listed at their time, and the note that answers a read
    delivered late is found among the user's notes in time order."""
    ctx = Context.load(write_hospital(tmp_path / "ctx"))
    events = _write(
        tmp_path / "events.jsonl",
        [
            ev("t-rad", "P1", at="2026-03-04T11:00:00", event_id="b"),
            ev("n-orth", "P1", at="2026-03-04T10:00:00", event_id="look"),  # late
            ev("n-orth", "P1", at="2026-03-04T10:50:00", action="update", event_id="note"),
            ev("n-orth", "P1", at="2026-03-04T10:05:00", action="create", event_id="note0"),
        ],
    )
    rep = access_report(ctx, events, patients=["P1"])
    assert [a.event_id for a in rep.accesses] == ["look", "note0", "note", "b"]
    look = rep.accesses[0]
    assert not look.explained
    assert look.documented_after.startswith(
        "the user charted or ordered for the patient 5 min later (2026-03-04 10:05)"
    )
    assert "no-care-relationship" in look.documented_after


def test_a_clock_behind_is_listed_at_the_corrected_time(tmp_path):
    """A workstation writing its times 5 h behind: once replay has found its clock steady,
    its accesses are listed at the corrected time with the time stamped; the text says so
    once per run."""
    from datetime import datetime, timedelta

    ctx = Context.load(write_hospital(tmp_path / "ctx"))
    t0 = datetime.fromisoformat("2026-03-04T09:00:00+08:00")
    lines = []
    for i in range(120):  # the file's time: p-card each minute
        at = t0 + timedelta(minutes=i)
        lines.append(ev("p-card", "P1", at=at.isoformat(), event_id=f"c{i}"))
        if i % 2 == 0:  # n-orth at a workstation whose clock is 5 h behind
            bad = at - timedelta(hours=5)
            lines.append(
                ev("n-orth", "P2", at=bad.isoformat(), event_id=f"o{i}", workstation="ws-bad")
            )
    rep = access_report(ctx, _write(tmp_path / "events.jsonl", lines), users=["n-orth"])
    moved = [a for a in rep.accesses if a.stamped_t is not None]
    assert 0 < len(moved) < len(rep.accesses)  # the first ones, before it is steady, as stamped
    assert {round((a.t - a.stamped_t) / 3600, 1) for a in moved} == {5.0}
    assert moved[0].stamped.startswith("stamped 2026-03-04 0")
    text = rep.to_text()
    assert (
        f"{len(moved)} of these stamped 5.0 h earlier by a source whose clock runs behind" in text
    )
    assert any("came from a source whose clock was found wrong" in n for n in rep.notes)


def test_the_break_the_glass_review_lists_every_emergency_access(tmp_path):
    ctx = Context.load(write_hospital(tmp_path / "ctx"))
    path = _write(
        tmp_path / "events.jsonl",
        [
            ev("n-ed", "P2", at="2026-03-04T10:00:00", event_id="ed", emergency=True),
            ev("p-card", "P1", at="2026-03-04T10:30:00", event_id="plain"),
            ev("n-orth", "P1", at="2026-03-04T11:00:00", event_id="btg", emergency=True),
            ev("n-orth", "P1", at="2026-03-06T11:00:00", event_id="later", emergency=True),
        ],
    )
    start, end = _period(ctx)
    end = parse_bound("2026-03-05", ctx)
    rep = access_report(ctx, path, start=start, end=end, break_the_glass=True)
    assert rep.title == "Access report: break-the-glass accesses"
    assert [a.event_id for a in rep.accesses] == ["ed", "btg"]
    assert all("emergency (break-the-glass) access" in a.flags for a in rep.accesses)
    btg = rep.accesses[1]
    assert not btg.explained
    alerts = run_engine(Engine(ctx, DetectionConfig()), replay_events_of(path))
    held = [a for a in alerts.values() if "btg" in a.event_ids]
    assert held and btg.alerts == [a.alert_id for a in held]
    assert "break-the-glass-abuse" in held[0].detector
    # with a user: only theirs
    rep = access_report(ctx, path, users=["n-orth"], break_the_glass=True)
    assert [a.event_id for a in rep.accesses] == ["btg", "later"]
    assert rep.title == "Access report: break-the-glass accesses by user n-orth"


def test_a_grant_reads_the_same_wherever_the_report_names_it(tmp_path):
    """The grant that explains an access is the one that covers it (department, action,
    dates), and a grant is worded one way: in the reason, in what did not explain an
    access, and in the user's header."""
    from emrwatch.context import write_context_csv

    ctx_dir = write_hospital(tmp_path / "ctx")
    grant = {"user_id": "v-it", "actions": "view;query", "valid_from": "2026-03-01",
             "valid_until": "2026-03-31"}  # fmt: skip
    write_context_csv(ctx_dir / "grants.csv", "grants", [
        {**grant, "departments": "CARD", "purpose": "ECG cart upgrade"},
        {**grant, "departments": "RAD", "purpose": "PACS maintenance"},
    ])  # fmt: skip
    ctx = Context.load(ctx_dir)
    events = _write(tmp_path / "e.jsonl", [
        ev("v-it", "P1", at="2026-03-04T12:00:00", event_id="card"),  # P1 is in CARD
        ev("v-it", "P2", at="2026-03-04T12:05:00", event_id="orth"),  # P2 in ORTH: neither
    ])  # fmt: skip
    rep = access_report(ctx, events, users=["v-it"])
    rows = {a.event_id: a for a in rep.accesses}
    ecg = "ECG cart upgrade (CARD; query, view; 2026-03-01 to 2026-03-31)"
    pacs = "PACS maintenance (RAD; query, view; 2026-03-01 to 2026-03-31)"
    assert rows["card"].reasons == ["grant"]
    assert rows["card"].because == [f"a grant covers it: {ecg}"]  # only the covering one
    assert not rows["orth"].explained
    assert f"the user's grants do not cover it: {ecg}; {pacs}" in rows["orth"].not_because
    assert rep.subjects[0]["lines"][-2:] == [f"grant: {ecg}", f"grant: {pacs}"]
