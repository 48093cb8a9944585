"""``emrwatch replay`` end to end: bad lines are skipped, counted, reported; alerts are JSONL."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from connectors.fhir_encode import to_audit_event
from emrwatch.events import AccessEvent
from tests.hospital import ev, write_hospital

EMRWATCH = [sys.executable, "-m", "pipeline.cli"]


def _fhir(d: dict) -> bytes:
    return orjson.dumps(to_audit_event(AccessEvent.from_dict(d)))


@pytest.fixture
def hospital(tmp_path):
    return write_hospital(tmp_path / "ctx")


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_lines_are_skipped_and_reported_with_line_numbers(hospital, tmp_path, workers):
    lines = [
        _fhir(ev("n-card", "P-SEAL", at="2026-03-02T11:00:00", event_id="s1")),
        b"{not json",
        b"",
        orjson.dumps({"resourceType": "AuditEvent", "id": "x"}),
        _fhir(ev("leaver", "P1", at="2026-03-05T09:00:00", event_id="l1")),
    ]
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "alerts.jsonl"
    proc = subprocess.run(
        [
            *EMRWATCH,
            "replay",
            "--context",
            str(hospital),
            "--events",
            str(events),
            "--alerts",
            str(out),
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{events}:2: skipped:" in proc.stderr
    assert f"{events}:4: skipped:" in proc.stderr
    assert "2 events (2 bad lines skipped)" in proc.stderr
    alerts = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert {a["user_id"] for a in alerts} == {"n-card", "leaver"}
    for a in alerts:
        assert set(a) >= {
            "alert_id",
            "detector",
            "severity",
            "score",
            "user_id",
            "patient_ids",
            "event_ids",
            "first_seen",
            "last_seen",
            "reason",
        }
        assert 0 <= a["score"] <= 1 and a["severity"] in ("low", "medium", "high", "critical")


def test_canonical_jsonl_and_csv_give_the_same_alerts(hospital, tmp_path):
    evs = [
        ev("n-orth", f"X{i}", at=f"2026-03-02T10:{i:02d}:00", event_id=f"c{i}") for i in range(12)
    ]
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in evs))
    cols = [
        "event_id",
        "ts",
        "user_id",
        "patient_id",
        "action",
        "resource_type",
        "workstation",
        "outcome",
    ]
    csv = tmp_path / "e.csv"
    csv.write_text(
        ",".join(cols) + "\n" + "".join(",".join(str(d[c]) for c in cols) + "\n" for d in evs)
    )
    results = []
    for path in (jsonl, csv):
        out = tmp_path / f"{path.suffix}.alerts"
        subprocess.run(
            [
                *EMRWATCH,
                "replay",
                "--context",
                str(hospital),
                "--events",
                str(path),
                "--alerts",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        results.append([orjson.loads(x)["alert_id"] for x in out.read_bytes().splitlines()])
    assert results[0] == results[1] and len(results[0]) == 1


def test_exception_preview_shows_what_it_hides(hospital, tmp_path):
    events = tmp_path / "e.jsonl"
    events.write_bytes(
        b"".join(
            orjson.dumps(ev("n-card", "P1", action="export", at=f"2026-03-02T03:{i:02d}:00"))
            + b"\n"
            for i in range(30)
        )
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "exceptions:\n  - id: registry-extract\n    description: nightly registry export\n"
        "    rule: bulk-export\n    user_id: n-card\n"
    )
    report = tmp_path / "preview.json"
    subprocess.run(
        [
            *EMRWATCH,
            "replay",
            "--context",
            str(hospital),
            "--events",
            str(events),
            "--alerts",
            str(tmp_path / "a.jsonl"),
            "--config",
            str(cfg),
            "--preview-exceptions",
            str(report),
        ],
        check=True,
        capture_output=True,
    )
    doc = orjson.loads(report.read_bytes())
    assert doc["alerts_without_exceptions"] == 1 and doc["alerts_with_exceptions"] == 0
    assert doc["hidden_alerts"][0]["user_id"] == "n-card"
    assert doc["exceptions"][0]["findings_suppressed"] >= 1
    assert (tmp_path / "a.jsonl").read_bytes() == b""


def test_rules_test_command_catches_a_broken_threshold(tmp_path):
    ok = subprocess.run([*EMRWATCH, "rules", "test"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "0 failed" in ok.stdout
    rules = tmp_path / "rules"
    rules.mkdir()
    src = Path(__file__).parent.parent / "detectors" / "rules" / "13-denied-probing.yaml"
    (rules / "probe.yaml").write_text(src.read_text().replace("gte: 5", "gte: 50"))
    bad = subprocess.run(
        [*EMRWATCH, "rules", "test", "--rules-dir", str(rules)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "FAIL denied-probing" in bad.stdout and "positive example 1 did not fire" in bad.stdout


def _detectors(path: Path) -> set[str]:
    return {d for line in path.read_bytes().splitlines() for d in orjson.loads(line)["detector"]}


def test_the_timezone_a_hospital_directory_records_is_the_default(hospital, tmp_path):
    # 12 unrelated charts at 10:00 in New York: on the nurse's 07:00-15:00 shift there, but
    # 23:00 in Shanghai, where the same burst is off-hours bulk viewing
    events = tmp_path / "e.jsonl"
    events.write_bytes(
        b"".join(
            orjson.dumps(ev("n-orth", f"X{i}", ts=f"2026-03-02T10:{2 * i:02d}:00-05:00")) + b"\n"
            for i in range(12)
        )
    )
    (hospital / "manifest.json").write_text('{"parameters": {"timezone": "America/New_York"}}')

    def replay(*extra: str) -> tuple[set[str], str]:
        out = tmp_path / "a.jsonl"
        proc = subprocess.run(
            [*EMRWATCH, "replay", "--context", str(hospital), "--events", str(events)]
            + ["--alerts", str(out), *extra],
            check=True,
            capture_output=True,
            text=True,
        )
        return _detectors(out), proc.stderr

    found, err = replay()
    assert "off-hours-bulk" not in found and "no-care-relationship" in found
    assert "timezone America/New_York" in err and "manifest.json" in err
    found, _ = replay("--timezone", "Asia/Shanghai")  # the flag wins
    assert "off-hours-bulk" in found
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("timezone: Asia/Shanghai\n")
    found, err = replay("--config", str(cfg))  # so does a config that names a zone
    assert "off-hours-bulk" in found and "manifest.json" not in err
    # a zone this machine does not know is refused, not replaced by a guess
    (hospital / "manifest.json").write_text('{"timezone": "Mars/Olympus"}')
    proc = subprocess.run(
        [*EMRWATCH, "replay", "--context", str(hospital), "--events", str(events)]
        + ["--alerts", str(tmp_path / "b.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "unknown zone 'Mars/Olympus'" in proc.stderr


def test_training_takes_the_timezone_its_directories_record(tmp_path):
    import argparse

    from models.train import _config

    p = argparse.ArgumentParser()
    ny, chi, bare = tmp_path / "ny", tmp_path / "chi", tmp_path / "bare"
    for d, doc in (
        (ny, '{"parameters": {"timezone": "America/New_York"}}'),
        (chi, '{"timezone": "America/Chicago"}'),
        (bare, None),
    ):
        d.mkdir()
        if doc:
            (d / "manifest.json").write_text(doc)
    assert _config(p, None, None, [ny, bare]).timezone == "America/New_York"
    assert _config(p, None, None, [bare]).timezone == "Asia/Shanghai"
    assert _config(p, None, "Europe/Oslo", [ny, chi]).timezone == "Europe/Oslo"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("detection:\n  timezone: Europe/Oslo\n")
    assert _config(p, str(cfg), None, [ny]).timezone == "Europe/Oslo"
    with pytest.raises(SystemExit):  # two hospitals, two zones: which one is not guessed
        _config(p, None, None, [ny, chi])


@pytest.mark.parametrize("workers", [1, 2])
def test_replay_warns_of_accesses_far_behind_a_newer_one(hospital, tmp_path, workers):
    # n-card's second access is stamped a day ahead (a wrong clock); the next three are then
    # a day behind the newest access replay has seen of the user
    stamps = ["02T09:00", "03T09:05", "02T09:10", "02T09:15", "02T09:20"]
    lines = [
        _fhir(ev("n-card", "P1", at=f"2026-03-{s}:00", event_id=f"e{i}"))
        for i, s in enumerate(stamps)
    ]
    lines.append(_fhir(ev("n-orth", "P2", at="2026-03-02T09:30:00", event_id="o1")))
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"\n".join(lines) + b"\n")
    run = [*EMRWATCH, "replay", "--context", str(hospital), "--events", str(events)]
    run += ["--alerts", str(tmp_path / "alerts.jsonl"), "--workers", str(workers)]
    proc = subprocess.run(run, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "warning: 3 access(es) came more than 6 h behind a newer one" in proc.stderr
    in_order = tmp_path / "in-order.ndjson"
    in_order.write_bytes(b"\n".join([lines[0], *lines[2:]]) + b"\n")
    run[run.index(str(events))] = str(in_order)
    proc = subprocess.run(run, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def _replay_docs(hospital, tmp_path, docs, *args: str) -> subprocess.CompletedProcess:
    """Replay canonical event dicts ``docs`` (as FHIR) with one worker; must exit 0."""
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"\n".join(_fhir(d) for d in docs) + b"\n")
    run = [*EMRWATCH, "replay", "--context", str(hospital), "--events", str(events)]
    run += ["--alerts", str(tmp_path / "alerts.jsonl"), "--workers", "1", *args]
    proc = subprocess.run(run, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_replay_judges_an_access_stamped_a_day_ahead_at_the_files_time(hospital, tmp_path):
    users = ["n-card", "n-orth", "p-card", "p-orth", "t-rad", "n-ed"]
    docs = [
        ev(users[i % 6], "P1", at=f"2026-03-02T09:{i:02d}:00", event_id=f"e{i}") for i in range(40)
    ]
    docs[10]["ts"] = "2026-03-03T09:10:00+08:00"  # a wrong clock, a day ahead
    proc = _replay_docs(hospital, tmp_path, docs)
    assert "warning: 1 access(es) stamped more than 1 h ahead of the lines around" in proc.stderr
    assert "there; from ws-1 (1); among them: e10 " in proc.stderr  # where to look
    assert "behind a newer one" not in proc.stderr  # n-card's later accesses are not behind
    # taken as it is, it puts the accesses after it a day behind
    config = tmp_path / "as-stamped.yaml"
    config.write_text("replay_clock_ahead_s: 0\n")
    proc = _replay_docs(hospital, tmp_path, docs, "--config", str(config))
    assert "stamped more than" not in proc.stderr
    assert "warning: 4 access(es) came more than 6 h behind a newer one" in proc.stderr


def test_replay_says_how_long_it_waited_for_a_log_written_in_hourly_batches(hospital, tmp_path):
    """Each workstation's hour written at once: ws-1's accesses come up to an hour behind
    ws-0's. Replay measures it, waits the hour, and says so; in time order it says nothing."""
    users = ["n-card", "n-orth", "p-card", "p-orth", "t-rad", "n-ed"]
    docs = []
    for m in range(180):  # 09:00-11:59, a minute apart, the workstations taking turns
        d = ev(users[m % 6], "P1", at=f"2026-03-02T{9 + m // 60:02d}:{m % 60:02d}:00")
        d["event_id"], d["workstation"] = f"e{m}", f"ws-{m % 2}"
        docs.append(d)
    batched = sorted(docs, key=lambda d: (d["ts"][:13], d["workstation"]))
    assert "waited" not in _replay_docs(hospital, tmp_path, docs).stderr
    proc = _replay_docs(hospital, tmp_path, batched)
    assert "replay: accesses arrived up to 57 min behind the newest" in proc.stderr
    assert "waited up to 60 min before scoring an idle visit" in proc.stderr


def test_replay_judges_a_workstation_whose_clock_runs_steadily_behind_later(hospital, tmp_path):
    """ws-tz writes UTC with the local offset: its accesses come 8 h behind the file's time,
    steadily. Once that is plain (32 accesses, 30 minutes of the file), replay judges them
    8 h later and names the workstation with its offset."""
    users = ["n-card", "n-orth", "p-card", "p-orth", "n-ed"]
    docs = []
    for i in range(600):  # 08:00-09:40, ten seconds apart; every fifth access from ws-tz
        t = f"2026-03-02T{8 + i // 360:02d}:{i // 6 % 60:02d}:{i % 6 * 10:02d}"
        d = ev(users[i % 5] if i % 5 else "t-rad", "P1", at=t, event_id=f"e{i}")
        if i % 5 == 0:
            d["workstation"] = "ws-tz"
            d["ts"] = d["ts"].replace("T08:", "T00:").replace("T09:", "T01:")  # 8 h behind
        docs.append(d)
    proc = _replay_docs(hospital, tmp_path, docs)
    judged = re.search(
        r"warning: (\d+) access\(es\) from a source whose clock runs steadily", proc.stderr
    )
    assert judged and 120 - 40 <= int(judged.group(1)) < 120, proc.stderr
    assert "were judged that much later: ws-tz (" in proc.stderr and ", 8.0 h)" in proc.stderr
