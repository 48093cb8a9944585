"""``emrwatch assessment`` and ``assessment-compare`` (pipeline.assessment): a hospital's
periodic security assessment, exact on a hand-made hospital, sane on a simulated one, and
the regulator's table of several."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.alerting.store import AlertStore
from pipeline.assessment import AssessmentError, assess, compare, load_assessment
from pipeline.replay import replay_file
from tests.hospital import ev, write_hospital

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """``emrwatch ARGS`` in this process (the command's own code, without a new
    interpreter's start-up): a CompletedProcess with its exit code and output."""
    from pipeline.cli import main

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


EVENTS = [
    ev("p-card", "P1", at="2026-03-02T10:00:00", event_id="before", source="EMR"),
    ev("p-card", "P1", at="2026-03-04T10:00:00", event_id="att", source="EMR"),
    ev("t-rad", "P1", at="2026-03-04T11:00:00", event_id="rad", source="PACS"),
    # the care team's nurse, but the seal lists only p-card
    ev("n-card", "P-SEAL", at="2026-03-04T13:00:00", event_id="seal", source="EMR"),
    ev("n-orth", "P1", at="2026-03-04T14:00:00", event_id="orth-look", source="EMR"),
    ev("n-ed", "P2", at="2026-03-04T15:00:00", event_id="ed-btg", emergency=True, source="EMR"),
    ev("leaver", "P1", at="2026-03-05T10:00:00", event_id="leaver", source="EMR"),
    ev(
        "n-orth",
        "P-SEAL",
        at="2026-03-05T11:00:00",
        event_id="denied",
        outcome="failure",
        source="EMR",
    ),  # fmt: skip
    ev("n-ed", "P1", at="2026-03-06T09:00:00", event_id="after", source="EMR"),
]
PERIOD = (date(2026, 3, 3), date(2026, 3, 6))  # no access at all on the 3rd


def _hand(tmp_path: Path) -> Path:
    d = write_hospital(tmp_path / "hand")
    lines = [orjson.dumps(e) for e in EVENTS]
    lines.insert(7, b'{"event_id": "broken"')
    (d / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d


def _store(tmp_path: Path, d: Path) -> AlertStore:
    """The alert store as the stream would have filled it: each alert a minute after its
    last access; the sealed-record case acknowledged after an hour, the others untouched."""
    alerts = replay_file(d, d / "events.jsonl").alerts
    store = AlertStore(f"sqlite:///{tmp_path / 'alerts.sqlite3'}")
    for a in sorted(alerts, key=lambda a: a.last_seen):
        at = datetime.fromisoformat(a.last_seen).astimezone(UTC).replace(tzinfo=None)
        store.clock = lambda at=at: at + timedelta(minutes=1)
        store.upsert([a.to_dict()])
        if "seal" in a.event_ids:
            store.clock = lambda at=at: at + timedelta(hours=1)
            store.transition(a.alert_id, "acknowledged", "ana")
    store.clock = lambda: datetime(2026, 3, 20)
    return store


def test_every_indicator_of_a_hand_made_hospital(tmp_path: Path) -> None:
    d = _hand(tmp_path)
    store = _store(tmp_path, d)
    try:
        a = assess("Hand General", d, d / "events.jsonl", *PERIOD, store=store)
        # the monitor's own audit log, edited in the database, is a concern of the next
        from sqlalchemy import update

        from pipeline.alerting import schema

        store.record_access("ana", "case.view")
        with store.write() as conn:
            conn.execute(update(schema.audit_log).values(actor="someone else"))
        tampered = assess("Hand General", d, d / "events.jsonl", *PERIOD, store=store)
    finally:
        store.close()
    assert a.alerts is not None and a.alerts["audit_log_breaks"] == 0
    assert tampered.alerts is not None and tampered.alerts["audit_log_breaks"] >= 1
    assert "audit_log" in [c["code"] for c in tampered.concerns]
    assert "TAMPERED" in tampered.to_text() and "intact (hash chain verified)" in a.to_text()
    lg = a.log
    # the 3rd to the 5th: not "before" (the 2nd) nor "after" (the 6th)
    assert lg["accesses"] == 7 and lg["users"] == 6 and lg["patients"] == 3
    assert lg["sources"] == {"EMR": 6, "PACS": 1} and lg["denied"] == 1
    assert lg["bad_lines"] == 1 and lg["accesses_in_log"] == 9
    assert lg["silent_days"] == ["2026-03-03"]
    # unexplained: the orthopaedic nurse on a cardiology patient, and the denied attempt;
    # the leaver's access is on their old ward's patient (explained, but not valid)
    ex = a.explanation
    assert (ex["explained"], ex["unexplained"]) == (5, 2) and ex["share"] == round(5 / 7, 4)
    assert (ex["emergency"], ex["emergency_unexplained"]) == (1, 0)
    assert a.sealing == {"sealed_records": 1, "sealed_in_period": 0, "unauthorised_accesses": 1}
    assert a.accounts["outside_validity"] == 1 and a.accounts["open_ended"] == 0
    assert a.accounts["roster"] == 9
    al = a.alerts
    assert al is not None and al["alerts"] >= 2
    assert al["per_10k"] == round(al["alerts"] * 10_000 / 7, 2)
    # critical: the two sealed-record touches and the leaver's access
    assert al["by_severity"]["critical"] == 3
    # the first sealed case was acknowledged after 1 h; the leaver's and the denied attempt's
    # waited 14 h and 13 h by the period's end (target 4 h); anything else is not critical
    # and within its target (medium 72 h)
    assert al["first_step_median_h"] == pytest.approx(1.0, abs=0.05)
    assert al["first_step_late"] == 2
    codes = [c["code"] for c in a.concerns]
    assert codes == ["silent_days", "unreadable", "explained", "sealed", "outside_validity",
                     "response"]  # fmt: skip
    (note,) = a.notes  # the log starts on the 2nd: the period's explanations lack history
    assert note.startswith("the log begins 2026-03-02, less than 14 days before the period")
    text = a.to_text()
    assert "days with no access logged: 2026-03-03" in text
    assert "71.4% of accesses (2 unexplained)" in text
    # no patient and no member of staff is named
    doc = a.to_json()
    for secret in ("P1", "P-SEAL", "P2", "n-orth", "leaver", "p-card", "Zhao"):
        assert f'"{secret}"' not in doc and f" {secret} " not in text, secret


def test_a_simulated_hospital_and_the_regulators_table(tmp_path: Path) -> None:
    from pipeline.simulate import simulate

    sim = tmp_path / "sim"
    simulate(sim, days=10, seed=5, scale=0.2)  # a tuning seed
    hand = _hand(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    out_sim, out_hand = tmp_path / "sim.json", tmp_path / "hand.json"
    p = run("assessment", "--hospital", "County General", "--context", str(sim),
            "--events", str(sim / "events.ndjson"), "--from", "2026-03-09",
            "--to", "2026-03-12", "--output", "json", "--out", str(out_sim),
            "--workers", "2")  # fmt: skip
    assert p.returncode == 0, p.stderr
    a = load_assessment(out_sim)
    # the period's accesses, counted here from the simulated log itself
    tz = "+08:00"
    lo = datetime.fromisoformat(f"2026-03-09T00:00:00{tz}").timestamp()
    hi = datetime.fromisoformat(f"2026-03-12T00:00:00{tz}").timestamp()
    from connectors.readers import read_events
    from emrwatch.events import AccessEvent

    evs = [e for _, e, _ in read_events(sim / "events.ndjson") if isinstance(e, AccessEvent)]
    inside = [e for e in evs if lo <= e.t < hi]
    assert a["log"]["accesses"] == len(inside) > 0
    assert a["log"]["users"] == len({e.user_id for e in inside})
    assert a["explanation"]["emergency"] == sum(1 for e in inside if e.emergency) > 0
    assert a["log"]["silent_days"] == [] and a["log"]["bad_lines"] == 0
    assert a["explanation"]["share"] > 0.95  # the detectors explain a hospital's routine
    assert a["alerts"] is None and "no_alert_store" in {c["code"] for c in a["concerns"]}
    assert "explained" not in {c["code"] for c in a["concerns"]}
    assert [n[:34] for n in a["notes"]] == ["the log begins 2026-03-02, less th"]  # 7 days

    assert a["log"]["source_silent_days"] == {} and a["log"]["unknown_patient_accesses"] == 0

    # a copy where PACS logged nothing on the 10th and a twentieth of the patients are
    # missing from the context: both are named
    broken = tmp_path / "broken"
    shutil.copytree(sim, broken)
    day10 = datetime.fromisoformat(f"2026-03-10T00:00:00{tz}").timestamp()
    with (broken / "events.ndjson").open("wb") as fh:
        for _, e, raw in read_events(sim / "events.ndjson"):
            if not (isinstance(e, AccessEvent) and e.source == "PACS"
                    and day10 <= e.t < day10 + 86400):  # fmt: skip
                fh.write(raw if raw.endswith(b"\n") else raw + b"\n")
    with (sim / "patients.csv").open(newline="", encoding="utf-8") as src:
        rows = list(csv.DictReader(src))
    gone = {r["patient_id"] for r in rows[::20]}
    with (broken / "patients.csv").open("w", newline="", encoding="utf-8") as dst:
        w = csv.DictWriter(dst, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["patient_id"] not in gone)
    b = assess("Broken", broken, broken / "events.ndjson", date(2026, 3, 9), date(2026, 3, 12))
    assert b.log["source_silent_days"] == {"PACS": ["2026-03-10"]}
    left = [e for _, e, _ in read_events(broken / "events.ndjson") if isinstance(e, AccessEvent)]
    assert b.log["unknown_patient_accesses"] == sum(
        1 for e in left if lo <= e.t < hi and e.patient_id in gone
    )
    assert b.log["accesses"] < len(inside)
    assert {"source_silent", "unknown_patients"} <= {c["code"] for c in b.concerns}

    p = run("assessment", "--hospital", "Hand General", "--context", str(hand),
            "--events", str(hand / "events.jsonl"), "--from", "2026-03-03", "--to",
            "2026-03-06", "--output", "json", "--out", str(out_hand))  # fmt: skip
    assert p.returncode == 0, p.stderr

    p = run("assessment-compare", str(out_sim), str(out_hand))
    assert p.returncode == 0, p.stderr
    table = p.stdout.split("\n\n")[0].splitlines()
    rows = {line[:35].strip(): line[35:].split() for line in table[1:]}
    assert rows["days with no access logged"] == ["0", "1!"]
    assert rows["accesses explained"][1] == "71.4%!"
    assert not rows["accesses explained"][0].endswith("!")
    assert rows["accesses"] == [f"{len(inside):,}", "7"]
    assert "the periods differ" in p.stdout
    assert "County General: the log begins 2026-03-02" in p.stdout
    p = run("assessment-compare", str(out_sim), str(out_hand), "--output", "csv")
    lines = p.stdout.splitlines()
    assert lines[0] == "indicator,County General,Hand General"
    assert f"accesses,{len(inside)},7" in lines  # machine-readable: no separators
    assert f"accesses explained,{a['explanation']['share']},0.7143" in lines
    marks = sum(v.endswith("!") for r in rows.values() for v in r)
    assert marks >= 7  # County General: no alert store; Hand General: six concerns
    p = run("assessment-compare", str(out_sim), str(out_hand), "--output", "html")
    assert p.stdout.count("<td class='concern'>") == marks

    # not an assessment
    (tmp_path / "x.json").write_text('{"kind": "something"}')
    p = run("assessment-compare", str(tmp_path / "x.json"))
    assert p.returncode == 2 and "not an emrwatch assessment" in p.stderr


def test_bad_input_is_refused(tmp_path: Path) -> None:
    d = _hand(tmp_path)
    with pytest.raises(AssessmentError, match="must end after it starts"):
        assess("H", d, d / "events.jsonl", date(2026, 3, 6), date(2026, 3, 6))
    with pytest.raises(AssessmentError, match="no such events file"):
        assess("H", d, d / "nope.jsonl", *PERIOD)
    with pytest.raises(AssessmentError, match="no assessment"):
        compare([])
    doc: dict[str, Any] = {"kind": "emrwatch assessment", "version": 99}
    (tmp_path / "v.json").write_text(json.dumps(doc))
    with pytest.raises(AssessmentError, match="version 99"):
        load_assessment(tmp_path / "v.json")


def test_one_hospital_over_several_periods(tmp_path: Path) -> None:
    """A trend: the same hospital's assessments side by side, a column per period."""
    d = _hand(tmp_path)
    march = assess("Hand General", d, d / "events.jsonl", *PERIOD).to_dict()
    later = assess("Hand General", d, d / "events.jsonl", date(2026, 3, 6), date(2026, 3, 7))
    c = compare([march, later.to_dict()])
    assert c.hospitals == ["Hand General 2026-03-03", "Hand General 2026-03-06"]
    assert c.rows[0][1] == ["7", "1"]  # accesses: the 3rd to the 5th, then the 6th
    assert not any("periods differ" in n for n in c.notes)
    with pytest.raises(AssessmentError, match="the same hospital and period twice"):
        compare([march, march])


def test_the_months_assessment_is_mailed_once_the_month_is_over(tmp_path: Path) -> None:
    """``emrwatch alerts`` with ``email.report_to``: after an update of the feed's history
    that comes after a month's end, the month's assessment goes to the privacy office,
    once, through the outbox and a real SMTP server."""
    from emrwatch.context import Context
    from pipeline.alerting.testing import FakeClock, LoopbackSmtp
    from pipeline.assessment import mail_assessment
    from tests.test_alerting_email import make_router

    d = _hand(tmp_path)
    d.joinpath("events.jsonl").write_bytes(
        b"".join(orjson.dumps(e) + b"\n" for e in EVENTS)  # no bad line: a clean March
    )
    manifest = {"kind": "emrwatch history export", "exported_at": "2026-03-06T00:00:00+00:00",
                "summary": {"period": {"start": "2026-03-02T02:00:00+00:00",
                                       "end": "2026-03-06T01:00:00+00:00"}}}  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    office = ["privacy-office@hospital.example"]
    clock = FakeClock("2026-03-20T02:00:00+00:00")
    with LoopbackSmtp() as smtp:
        router = make_router(f"sqlite:///{tmp_path}/r.db", smtp, Context(), clock, tmp_path,
                             report_to=office)  # fmt: skip
        try:
            # March is not over; February was before the history (the monitor's) start
            assert mail_assessment(router, d, "Hand General") == 0
            clock.now = datetime.fromisoformat("2026-04-01T03:00:00+00:00")  # 11:00 local
            # the history was last written before March ended: not yet
            assert mail_assessment(router, d, "Hand General") == 0
            manifest["updated_at"] = "2026-04-01T02:55:00+00:00"
            (d / "manifest.json").write_text(json.dumps(manifest))
            assert mail_assessment(router, d, "Hand General") == 1
            assert mail_assessment(router, d, "Hand General") == 0  # once
            router.deliver()
            (mail,) = [m for m in smtp.messages if "assessment" in m["message"]["Subject"]]
            msg = mail["message"]
            assert msg["Subject"] == (
                "emrwatch security assessment Hand General 2026-03-01 to 2026-04-01"
            )
            assert mail["rcpt_tos"] == office
            text = msg.get_body(preferencelist=("plain",)).get_content().replace("\r\n", "\n")
            assert "Log: 9 accesses by 6 users to 3 patients" in text  # all of them: March
            assert "/reports/assessment?from=2026-03-01&to=2026-04-01" in text
            assert "P-SEAL" not in msg.as_string()
        finally:
            router.close()


def test_from_the_alert_services_own_config(tmp_path: Path, cli: Any) -> None:
    """``--service-config``: the name, the history, the store and the zone come from the
    ``emrwatch alerts`` YAML, as a monthly timer would run it."""
    import yaml

    d = _hand(tmp_path)
    store = _store(tmp_path, d)
    store.close()
    cfg = {
        "kafka": {"bootstrap_servers": "127.0.0.1:9"},
        "context": {"timezone": "Asia/Shanghai"},
        "alerting": {"store_url": f"sqlite:///{tmp_path / 'alerts.sqlite3'}"},
        "feed": {"hospital": "Hand General", "history_dir": str(d)},
    }
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "a.json"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return cli("assessment", *args)  # type: ignore[no-any-return]

    p = run("--service-config", str(path), "--from", "2026-03-03", "--to", "2026-03-06",
            "--output", "json", "--out", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    a = load_assessment(out)
    assert a["hospital"] == "Hand General" and a["log"]["accesses"] == 7
    assert a["alerts"]["by_severity"]["critical"] == 3  # the store from the config
    p = run("--service-config", str(path), "--from", "2026-03-03")
    assert p.returncode == 2 and "--from needs --to" in p.stderr
    p = run("--context", str(d))
    assert p.returncode == 2 and "give --hospital" in p.stderr
    cfg["feed"]["history_dir"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(cfg))
    p = run("--service-config", str(path))
    assert p.returncode == 2 and "history_dir: no directory" in p.stderr


def test_signed_assessments_are_verified_by_the_regulator(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--sign-key-env`` signs the JSON with a key the hospital shares with the regulator;
    ``assessment-compare --key HOSPITAL=ENV`` refuses it unsigned, altered or under
    another key, and says which hospitals it verified."""
    d = _hand(tmp_path)
    monkeypatch.setenv("HAND_KEY", "h" * 32)
    monkeypatch.setenv("OTHER_KEY", "o" * 32)
    run = cli

    out = tmp_path / "signed.json"
    base = ("assessment", "--hospital", "Hand General", "--context", str(d),
            "--from", "2026-03-03", "--to", "2026-03-06")  # fmt: skip
    p = run(*base, "--output", "json", "--sign-key-env", "HAND_KEY", "--out", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["signature"]["method"] == "HMAC-SHA256" and "h" * 32 not in out.read_text()
    p = run("assessment-compare", str(out), "--key", "Hand General=HAND_KEY")
    assert p.returncode == 0, p.stderr
    assert "signatures verified: Hand General" in p.stdout

    altered = tmp_path / "altered.json"
    doc["log"]["silent_days"] = []  # a day without logging hidden from the regulator
    altered.write_text(json.dumps(doc))
    p = run("assessment-compare", str(altered), "--key", "Hand General=HAND_KEY")
    assert p.returncode == 2 and "the document was altered" in p.stderr
    p = run("assessment-compare", str(out), "--key", "Hand General=OTHER_KEY")
    assert p.returncode == 2 and "signed under another key" in p.stderr
    unsigned = tmp_path / "unsigned.json"
    assert run(*base, "--output", "json", "--out", str(unsigned)).returncode == 0
    p = run("assessment-compare", str(unsigned), "--key", "Hand General=HAND_KEY")
    assert p.returncode == 2 and "not signed" in p.stderr
    # a hospital without a key given is compared, and said to be unverified
    other = tmp_path / "other.json"
    p = run("assessment", "--hospital", "Other General", "--context", str(d), "--from",
            "2026-03-03", "--to", "2026-03-06", "--output", "json", "--out", str(other))  # fmt: skip
    assert p.returncode == 0, p.stderr
    p = run("assessment-compare", str(out), str(other), "--key", "Hand General=HAND_KEY")
    assert p.returncode == 0, p.stderr
    assert "signatures verified: Hand General; not verified (no --key): Other General" in p.stdout
    p = run(*base, "--sign-key-env", "HAND_KEY")
    assert p.returncode == 2 and "give --output json" in p.stderr
    p = run(*base, "--output", "json", "--sign-key-env", "NOPE")
    assert p.returncode == 2 and "$NOPE is not set" in p.stderr


def test_public_key_signatures_need_no_secret_at_the_regulator(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``assessment-keygen`` makes a pair; ``--sign-key`` signs with the private key (which
    never leaves the hospital), and ``assessment-compare --public-key HOSPITAL=FILE``
    verifies with the public one: it accepts the document as signed and refuses it altered,
    signed by another hospital's key, or signed the shared-key way."""
    import stat

    d = _hand(tmp_path)
    monkeypatch.setenv("HAND_KEY", "h" * 32)
    monkeypatch.setenv("PASS", "correct horse battery")
    run = cli

    p = run("assessment-keygen", "--out", str(tmp_path / "hand"))
    assert p.returncode == 0, p.stderr
    key, pub = tmp_path / "hand.key", tmp_path / "hand.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in pub.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    p = run("assessment-keygen", "--out", str(tmp_path / "hand"))
    assert p.returncode == 2 and "never overwritten" in p.stderr
    # another hospital's pair, its private key encrypted
    p = run("assessment-keygen", "--out", str(tmp_path / "other"), "--passphrase-env", "PASS")
    assert p.returncode == 0, p.stderr
    assert b"ENCRYPTED" in (tmp_path / "other.key").read_bytes()

    base = ("assessment", "--hospital", "Hand General", "--context", str(d),
            "--from", "2026-03-03", "--to", "2026-03-06", "--output", "json")  # fmt: skip
    out = tmp_path / "signed.json"
    p = run(*base, "--sign-key", str(key), "--out", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["signature"]["method"] == "Ed25519"
    p = run("assessment-compare", str(out), "--public-key", f"Hand General={pub}")
    assert p.returncode == 0, p.stderr
    assert "signatures verified: Hand General" in p.stdout

    doc["log"]["accesses"] -= 1  # one access hidden from the regulator
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(doc))
    p = run("assessment-compare", str(altered), "--public-key", f"Hand General={pub}")
    assert p.returncode == 2 and "the document was altered" in p.stderr
    p = run("assessment-compare", str(out), "--public-key", f"Hand General={tmp_path}/other.pub")
    assert p.returncode == 2 and "signed under another key" in p.stderr
    hmac_signed = tmp_path / "hmac.json"
    p = run(*base, "--sign-key-env", "HAND_KEY", "--out", str(hmac_signed))
    assert p.returncode == 0, p.stderr
    p = run("assessment-compare", str(hmac_signed), "--public-key", f"Hand General={pub}")
    assert p.returncode == 2 and "signed with HMAC-SHA256, but the key given is Ed25519" in p.stderr

    # the encrypted key signs with its passphrase, and not without it
    other = tmp_path / "other.json"
    obase = ("assessment", "--hospital", "Other General", "--context", str(d), "--from",
             "2026-03-03", "--to", "2026-03-06", "--output", "json", "--out", str(other),
             "--sign-key", str(tmp_path / "other.key"))  # fmt: skip
    p = run(*obase)
    assert p.returncode == 2 and "--sign-key-passphrase-env" in p.stderr and not other.exists()
    p = run(*obase, "--sign-key-passphrase-env", "PASS")
    assert p.returncode == 0, p.stderr
    p = run("assessment-compare", str(out), str(other), "--public-key", f"Hand General={pub}",
            "--public-key", f"Other General={tmp_path}/other.pub")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "signatures verified: Hand General, Other General" in p.stdout

    # a private key others can read is refused, as is a private key given as the public one
    key.chmod(0o644)
    p = run(*base, "--sign-key", str(key))
    assert p.returncode == 2 and "readable by its owner only" in p.stderr
    p = run("assessment-compare", str(out), "--public-key", f"Hand General={key}")
    assert p.returncode == 2 and "this is a private key" in p.stderr
    p = run(*base, "--sign-key", str(key), "--sign-key-env", "HAND_KEY")
    assert p.returncode == 2 and "not both" in p.stderr
