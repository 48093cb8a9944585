"""``emrwatch history`` (pipeline.history): the access and context topics of the embedded
broker exported to a directory that replays to the same alerts as the data that went in."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from connectors.readers import read_events
from emrwatch.context import CONTEXT_FILES
from emrwatch.events import AccessEvent
from emrwatch.timeutil import recorded_timezone
from pipeline.evaluate import find_events_file
from pipeline.replay import replay_file
from pipeline.simulate import simulate
from pipeline.topics import context_key

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("history") / "hospital"
    simulate(out, days=1, seed=5, scale=0.2)  # a tuning seed
    return out


def _events(d: Path) -> list[dict[str, Any]]:
    return [
        e.to_dict() for _, e, _ in read_events(find_events_file(d)) if isinstance(e, AccessEvent)
    ]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _alerts(d: Path) -> dict[str, list[str]]:
    res = replay_file(d, find_events_file(d))
    return {a.alert_id: sorted(a.event_ids) for a in res.alerts}


def _history_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``emrwatch history ARGS`` in a subprocess, with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "history", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def _history(*args: str) -> subprocess.CompletedProcess[str]:
    return _history_env({}, *args)


def test_exported_history_replays_to_the_same_alerts(
    harness: Any, hospital: Path, tmp_path: Path
) -> None:
    events = _events(hospital)
    harness.publish_context(hospital)
    harness.produce(events[: len(events) // 2])
    harness.produce_raw(b"u-x", b'{"event_id": "broken"')  # the workers dead-letter this
    harness.publish_context(hospital, sync=True)  # a re-publish: upserts and context markers
    harness.produce(events[len(events) // 2 :])
    # a cancelled admission (tombstone) and a corrected staff row (upsert of the same key)
    encounters = _rows(hospital / "encounters.csv")
    gone = encounters[0]
    producer = harness.producer
    producer.send(
        harness.layout.context("encounters"),
        key=context_key("encounters", gone).encode(),
        value=None,
    )
    staff = _rows(hospital / "staff.csv")
    moved = {**staff[0], "department_id": staff[1]["department_id"]}
    producer.send(
        harness.layout.context("staff"),
        key=context_key("staff", moved).encode(),
        value=json.dumps(moved).encode(),
    )
    producer.flush()

    out = tmp_path / "export"
    p = _history(
        "--bootstrap", harness.bootstrap, "--prefix", harness.layout.prefix, "--out", str(out)
    )
    assert p.returncode == 0, p.stderr
    assert f"{len(events)} events" in p.stderr and "1 unreadable" in p.stderr

    # the context the workers hold now
    got_enc = _rows(out / "encounters.csv")
    assert len(got_enc) == len(encounters) - 1
    assert gone["encounter_id"] not in {r["encounter_id"] for r in got_enc}
    got_staff = {r["user_id"]: r for r in _rows(out / "staff.csv")}
    assert len(got_staff) == len(staff)
    assert got_staff[moved["user_id"]]["department_id"] == moved["department_id"]
    for kind in ("departments", "patients"):
        assert _rows(out / f"{kind}.csv") == _rows(hospital / f"{kind}.csv")

    # every event once, in event-time order, canonical
    exported = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert sorted(e["event_id"] for e in exported) == sorted(e["event_id"] for e in events)
    ts = [AccessEvent.from_dict(e).t for e in exported]
    assert ts == sorted(ts)

    manifest = json.loads((out / "manifest.json").read_text())
    assert "timezone" not in manifest  # no configuration: the zone is not known here
    s = manifest["summary"]
    assert s["events"] == len(events) and s["records"]["unreadable"] == 1
    assert s["records"]["markers"] >= harness.layout.partitions
    assert s["context_rows"]["encounters"] == len(encounters) - 1
    assert (
        sum(hi for _, hi in manifest["offsets"][harness.layout.access].values())
        == (s["records"]["read"])
    )

    # the same alerts as the source data with the same context change applied
    reference = tmp_path / "reference"
    shutil.copytree(hospital, reference)
    with (reference / "encounters.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(encounters[0]))
        w.writeheader()
        w.writerows(encounters[1:])
    with (reference / "staff.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(staff[0]))
        w.writeheader()
        w.writerows([moved, *staff[1:]])
    want = _alerts(reference)
    assert want, "the simulated day raises alerts"
    assert _alerts(out) == want

    # patient data: readable by the owner only; no spool left behind
    assert not [f for f in out.iterdir() if f.name.startswith(".")]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_a_window_of_event_time(harness: Any, hospital: Path, tmp_path: Path) -> None:
    events = _events(hospital)
    harness.publish_context(hospital)
    harness.produce(events)
    ts = sorted(AccessEvent.from_dict(e).ts for e in events)
    lo, hi = ts[len(ts) // 4], ts[len(ts) // 2]
    out = tmp_path / "window"
    # the workers' own configuration names the broker, the topics and the hospital's zone
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"kafka: {{bootstrap_servers: '{harness.bootstrap}'}}\n"
        f"topics: {{prefix: '{harness.layout.prefix}'}}\n"
        "context: {timezone: America/Chicago}\n"
    )
    p = _history("--config", str(cfg), "--out", str(out), "--from", lo, "--to", hi)
    assert p.returncode == 0, p.stderr
    lo_t, hi_t = (
        AccessEvent.from_dict({**events[0], "ts": lo}).t,
        AccessEvent.from_dict({**events[0], "ts": hi}).t,
    )
    want = sorted(e["event_id"] for e in events if lo_t <= AccessEvent.from_dict(e).t < hi_t)
    got = [json.loads(x)["event_id"] for x in (out / "events.jsonl").read_text().splitlines()]
    assert sorted(got) == want and 0 < len(got) < len(events)
    m = json.loads((out / "manifest.json").read_text())
    assert m["summary"]["records"]["outside_window"] == len(events) - len(want)
    # replay, evaluate and training of the export take the hospital's zone from here
    assert m["timezone"] == "America/Chicago"
    assert recorded_timezone(out) == "America/Chicago"


def test_each_user_keeps_the_order_the_stream_received(harness: Any, tmp_path: Path) -> None:
    """A late event (an older timestamp arriving after newer ones) stays where the workers
    saw it, so a replay of the export judges it as the stream did."""
    base = {"user_id": "u1", "patient_id": "p1", "action": "view"}
    sent = [
        {**base, "event_id": "e2", "ts": "2026-03-02T09:00:00+08:00"},
        {**base, "event_id": "e3", "ts": "2026-03-02T09:05:00+08:00"},
        {**base, "event_id": "e1", "ts": "2026-03-02T08:00:00+08:00"},  # late
        {**base, "user_id": "u2", "event_id": "f1", "ts": "2026-03-02T08:30:00+08:00"},
    ]
    harness.produce(sent)
    out = tmp_path / "order"
    p = _history("--bootstrap", harness.bootstrap, "--prefix", harness.layout.prefix,
                 "--out", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    got = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [e["event_id"] for e in got if e["user_id"] == "u1"] == ["e2", "e3", "e1"]
    assert sorted(e["event_id"] for e in got) == ["e1", "e2", "e3", "f1"]


def test_a_pseudonymized_export_hides_patients_and_replays_to_the_same_alerts(
    harness: Any, hospital: Path, tmp_path: Path
) -> None:
    events = _events(hospital)
    harness.publish_context(hospital)
    harness.produce(events)
    where = ["--bootstrap", harness.bootstrap, "--prefix", harness.layout.prefix]
    key = {"EW_KEY": "k" * 32}
    out = tmp_path / "pseudo"
    p = _history_env(key, *where, "--out", str(out), "--pseudonymize-key-env", "EW_KEY")
    assert p.returncode == 0, p.stderr

    # nothing that names a patient is left: ids, names, addresses, encounter numbers
    patients = _rows(hospital / "patients.csv")
    secrets = {r["patient_id"] for r in patients}
    secrets |= {r[c] for r in patients for c in ("family_name", "address") if len(r[c]) > 3}
    secrets |= {r["encounter_id"] for r in _rows(hospital / "encounters.csv")}
    exported = "".join(f.read_text(encoding="utf-8") for f in out.iterdir() if f.is_file())
    leaked = sorted(x for x in secrets if x in exported)
    assert not leaked, leaked[:5]
    # ... while staff, departments and times are kept, and the same alerts come out
    assert _rows(out / "departments.csv") == _rows(hospital / "departments.csv")
    want = _alerts(hospital)
    assert _alerts(out) == want and want  # alert ids come from the evidence: the same
    manifest = json.loads((out / "manifest.json").read_text())
    fingerprint = manifest["pseudonymized"]["key_fingerprint"]
    assert len(fingerprint) == 12 and "k" * 32 not in (out / "manifest.json").read_text()

    # one key: the same tokens in every export; another key: others
    again = tmp_path / "again"
    assert _history_env(key, *where, "--out", str(again),
                        "--pseudonymize-key-env", "EW_KEY").returncode == 0  # fmt: skip
    assert (again / "patients.csv").read_text() == (out / "patients.csv").read_text()
    other = tmp_path / "other"
    assert _history_env({"EW_KEY": "z" * 32}, *where, "--out", str(other),
                        "--pseudonymize-key-env", "EW_KEY").returncode == 0  # fmt: skip
    a = {r["patient_id"] for r in _rows(out / "patients.csv")}
    b = {r["patient_id"] for r in _rows(other / "patients.csv")}
    assert len(a) == len(patients) and not a & b
    # a missing or short key is refused before anything is read
    p = _history_env({}, *where, "--out", str(tmp_path / "x"), "--pseudonymize-key-env", "NOPE")
    assert p.returncode == 2 and "$NOPE is not set" in p.stderr
    p = _history_env({"EW_KEY": "short"}, *where, "--out", str(tmp_path / "y"),
                     "--pseudonymize-key-env", "EW_KEY")  # fmt: skip
    assert p.returncode == 2 and "at least 16 bytes" in p.stderr


def test_clear_errors(harness: Any, tmp_path: Path) -> None:
    p = _history("--bootstrap", harness.bootstrap, "--prefix", "nosuchprefix",
                 "--out", str(tmp_path / "x"), "--timeout", "3")  # fmt: skip
    assert p.returncode == 1 and "topic nosuchprefix." in p.stderr and "does not exist" in p.stderr
    p = _history("--bootstrap", harness.bootstrap, "--out", str(tmp_path / "y"), "--from", "May 1")
    assert p.returncode == 2 and "--from 'May 1'" in p.stderr


def test_an_update_appends_only_what_is_new(harness: Any, hospital: Path, tmp_path: Path) -> None:
    """``--update`` continues an export from the offsets its manifest records: the events
    already written stay byte for byte, the new ones follow once each, the context is the
    latest, and the directory replays to the same alerts as one export of everything."""
    events = _events(hospital)
    half = len(events) // 2
    where = ["--bootstrap", harness.bootstrap, "--prefix", harness.layout.prefix]
    harness.publish_context(hospital)
    harness.produce(events[:half])
    out = tmp_path / "live"
    p = _history(*where, "--out", str(out), "--update")  # nothing there yet: a full export
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith(f"{half} events")
    first = (out / "events.jsonl").read_bytes()
    m1 = json.loads((out / "manifest.json").read_text())

    assert m1["context_keyed"] and m1["updates"][0]["context_whole"]
    harness.produce_raw(b"u-x", b'{"event_id": "broken"')
    staff = _rows(hospital / "staff.csv")
    moved = {**staff[0], "department_id": staff[1]["department_id"]}
    harness.producer.send(
        harness.layout.context("staff"),
        key=context_key("staff", moved).encode(),
        value=json.dumps(moved).encode(),
    )
    gone = staff[2]  # a leaver deleted from the roster: a tombstone
    harness.producer.send(
        harness.layout.context("staff"), key=context_key("staff", gone).encode(), value=None
    )
    harness.produce(events[half:])
    p = _history(*where, "--out", str(out), "--update")
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith(f"{len(events) - half} new, {len(events)} events"), p.stderr

    now = (out / "events.jsonl").read_bytes()
    assert now.startswith(first) and len(now) > len(first)
    ids = [json.loads(line)["event_id"] for line in now.splitlines()]
    assert sorted(ids) == sorted(e["event_id"] for e in events)  # each once
    kept_staff = {r["user_id"]: r for r in _rows(out / "staff.csv")}
    assert kept_staff[moved["user_id"]] == moved and gone["user_id"] not in kept_staff

    m2 = json.loads((out / "manifest.json").read_text())
    s = m2["summary"]
    assert s["events"] == len(events) and s["records"]["unreadable"] == 1
    ends = m2["offsets"][harness.layout.access]
    assert sum(hi - lo for lo, hi in ends.values()) == s["records"]["read"]
    assert all(lo == 0 for lo, _ in ends.values())  # still the whole topic
    assert m2["exported_at"] == m1["exported_at"] and m2["gaps"] == []
    assert [u["events"] for u in m2["updates"]] == [half, len(events) - half]
    # the context was continued, not read again: only the two new records
    last = m2["updates"][-1]
    assert (last["context_whole"], last["context_records"]) == (False, 2)
    assert m2["context_read_whole_at"] == m1["context_read_whole_at"]
    period = m2["summary"]["period"]
    assert period["start"] == m1["summary"]["period"]["start"]
    assert period["end"] > m1["summary"]["period"]["end"]

    # the same as exporting everything at once
    whole = tmp_path / "whole"
    assert _history(*where, "--out", str(whole)).returncode == 0
    for kind in CONTEXT_FILES:  # the rows and their order, whichever way they were read
        assert _rows(whole / f"{kind}.csv") == _rows(out / f"{kind}.csv"), kind
    assert _alerts(out) == _alerts(whole) != {}

    # nothing new: nothing appended, the update is still recorded
    p = _history(*where, "--out", str(out), "--update")
    assert p.returncode == 0 and p.stderr.startswith(f"0 new, {len(events)} events"), p.stderr
    assert (out / "events.jsonl").read_bytes() == now
    assert len(json.loads((out / "manifest.json").read_text())["updates"]) == 3
    assert not [f for f in out.iterdir() if f.name.startswith(".")]
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_an_update_refuses_what_would_corrupt_the_export(harness: Any, tmp_path: Path) -> None:
    import fcntl

    base = {"user_id": "u1", "patient_id": "p1", "action": "view"}
    harness.produce([{**base, "event_id": f"e{i}", "ts": f"2026-03-02T09:0{i}:00+08:00"}
                     for i in range(3)])  # fmt: skip
    where = ["--bootstrap", harness.bootstrap, "--prefix", harness.layout.prefix]
    out = tmp_path / "x"
    assert _history(*where, "--out", str(out), "--from", "2026-03-01").returncode == 0
    before = (out / "events.jsonl").read_bytes()

    def refused(*args: str, env: dict[str, str] | None = None) -> str:
        p = _history_env(env or {}, *where, "--out", str(out), "--update", *args)
        assert p.returncode == 1, p.stderr
        assert (out / "events.jsonl").read_bytes() == before
        return p.stderr

    assert "window is fixed" in refused("--from", "2026-03-02")
    key = {"EW_KEY": "k" * 32}
    assert "holds real identifiers" in refused("--pseudonymize-key-env", "EW_KEY", env=key)
    fd = os.open(out, os.O_RDONLY)  # another update holds the directory
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "another export is writing" in refused()
    finally:
        os.close(fd)
    # the events file lost its end (restored from an older copy): not appended to
    (out / "events.jsonl").write_bytes(before[:-10])
    p = _history(*where, "--out", str(out), "--update")
    assert p.returncode == 1 and "shorter than its manifest says" in p.stderr, p.stderr
    (out / "events.jsonl").write_bytes(before)
    # the manifest says more was read than the topic holds: another cluster, or recreated
    m = json.loads((out / "manifest.json").read_text())
    m["offsets"][harness.layout.access] = {
        p: [0, 10**6] for p in m["offsets"][harness.layout.access]
    }
    (out / "manifest.json").write_text(json.dumps(m))
    assert "was recreated or this is another cluster" in refused()
    (out / "manifest.json").unlink()
    assert "no manifest.json" in refused()
    # the same window given again is fine
    m["offsets"][harness.layout.access] = {p: [0, 0] for p in m["offsets"][harness.layout.access]}
    (out / "manifest.json").write_text(json.dumps(m))
    p = _history(*where, "--out", str(out), "--update", "--from", "2026-03-01")
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith("3 new, 6 events")  # from 0 again: the manifest said so


def test_retention_holes_are_named() -> None:
    from pipeline.history import describe_export, resume_gap

    assert resume_gap(100, 40) is None and resume_gap(40, 40) is None
    assert resume_gap(40, 100) == [40, 100]
    m = {
        "summary": {"events": 5, "records": {"unreadable": 0, "outside_window": 0},
                    "context_rows": {}},
        "gaps": [{"topic": "emrwatch.access", "partition": 3, "offsets": [40, 100]}],
    }  # fmt: skip
    text = describe_export(m, Path("/h"))
    assert "emrwatch.access:3 offsets 40–99 were deleted by retention" in text


def test_a_rolling_history_keeps_the_last_days(harness: Any, tmp_path: Path) -> None:
    """``--keep-days``: an export keeps the events of the last N days before the newest;
    an update drops the older ones once the oldest is a day past the limit, and keeps the
    export's N without being told again."""
    base = {"user_id": "u1", "patient_id": "p1", "action": "view"}

    def day(d: int, eid: str) -> dict[str, Any]:
        return {**base, "event_id": eid, "ts": f"2026-03-{d:02d}T09:00:00+08:00"}

    where = ["--bootstrap", harness.bootstrap, "--prefix", harness.layout.prefix]
    out = tmp_path / "rolling"

    def ids() -> list[str]:
        return [json.loads(x)["event_id"] for x in (out / "events.jsonl").read_text().split()]

    harness.produce([day(d, f"e{d}") for d in range(1, 11)])
    p = _history(*where, "--out", str(out), "--keep-days", "3")
    assert p.returncode == 0, p.stderr
    assert ids() == ["e7", "e8", "e9", "e10"]  # from 3 days before the newest (the 10th)
    assert "the last 3 days kept, 6 older dropped" in p.stderr
    harness.produce([day(11, "e11")])
    assert _history(*where, "--out", str(out), "--update").returncode == 0
    assert ids() == ["e7", "e8", "e9", "e10", "e11"]  # the 7th is not yet a day past
    late = {**base, "event_id": "e-late", "ts": "2026-02-20T09:00:00+08:00"}
    harness.produce([day(12, "e12"), late])
    p = _history(*where, "--out", str(out), "--update")
    assert p.returncode == 0, p.stderr
    assert ids() == ["e9", "e10", "e11", "e12"]  # the old ones and the late one dropped
    m = json.loads((out / "manifest.json").read_text())
    assert m["keep_days"] == 3 and m["summary"]["events"] == 4
    assert m["summary"]["trimmed"] == 9  # 6, then the 7th and 8th, then the late one
    assert m["summary"]["period"]["start"] == "2026-03-09T01:00:00+00:00"
    assert m["summary"]["records"]["read"] == 13
    p = _history(*where, "--out", str(tmp_path / "x"), "--keep-days", "0")
    assert p.returncode == 1 and "keep_days must be positive" in p.stderr


def _crashing_at(monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """os.replace fails for a target named ``name``: the machine stops there. Returns
    the real os.replace."""
    from pipeline.history import HistoryError

    real = os.replace

    def crashing(src: Any, dst: Any) -> None:
        if Path(dst).name == name:
            raise HistoryError("the machine stopped here")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crashing)
    return real


def _sent(n: int) -> list[dict[str, Any]]:
    base = {"user_id": "u1", "patient_id": "p1", "action": "view"}
    return [{**base, "event_id": f"e{i}", "ts": f"2026-03-02T09:{i:02d}:00+08:00"}
            for i in range(n)]  # fmt: skip


def _ids(path: Path) -> list[str]:
    return [json.loads(x)["event_id"] for x in path.read_text().split()]


def test_an_update_appends_in_place_and_readers_see_only_what_is_committed(
    harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update appends to the events file (it does not copy the history each time);
    until its manifest is written, readers read only what the last one committed, and an
    update that stopped in between is cut back by the next: no event lost or repeated."""
    from pipeline.history import HistoryError, export_history

    sent = _sent(12)
    out = tmp_path / "h"
    harness.produce(sent[:4])
    export_history(harness.bootstrap, harness.layout, out, update=True)
    inode = (out / "events.jsonl").stat().st_ino
    harness.produce(sent[4:8])
    real = _crashing_at(monkeypatch, "manifest.json")
    with pytest.raises(HistoryError, match="stopped here"):
        export_history(harness.bootstrap, harness.layout, out, update=True)
    monkeypatch.setattr(os, "replace", real)
    assert (out / "events.jsonl").stat().st_ino == inode  # the same file, appended to
    assert len(_ids(out / "events.jsonl")) == 8  # appended, not committed ...
    read = [e.event_id for _, e, _ in read_events(out / "events.jsonl")]
    assert read == ["e0", "e1", "e2", "e3"]  # ... so readers do not see it
    for workers in (1, 2):  # the parallel replay reads the file its own way
        assert replay_file(out, out / "events.jsonl", workers=workers).events == 4
    harness.produce(sent[8:])
    m = export_history(harness.bootstrap, harness.layout, out, update=True)
    assert (out / "events.jsonl").stat().st_ino == inode
    assert sorted(_ids(out / "events.jsonl")) == sorted(e["event_id"] for e in sent)
    assert [e.event_id for _, e, _ in read_events(out / "events.jsonl")] == _ids(
        out / "events.jsonl"
    )
    assert m["summary"]["events"] == len(sent)
    assert m["events_file"]["bytes"] == (out / "events.jsonl").stat().st_size
    assert not [f for f in out.iterdir() if f.name.startswith(".")]


@pytest.mark.parametrize("crash_at", ["manifest.json", "events.jsonl"])
def test_an_export_that_crashes_midway_neither_loses_nor_repeats(
    harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    """An export written whole (the first, or one that drops old days) stops between
    putting its new events file in place and its manifest (or just before the events
    file): the next update finishes or drops the half-made step, so every record is in
    the history exactly once."""
    from pipeline.history import HistoryError, export_history

    sent = _sent(8)
    out = tmp_path / "h"
    harness.produce(sent[:4])
    real = _crashing_at(monkeypatch, crash_at)
    with pytest.raises(HistoryError, match="stopped here"):
        export_history(harness.bootstrap, harness.layout, out, update=True)
    monkeypatch.setattr(os, "replace", real)
    assert (out / ".manifest.json.next").exists()
    harness.produce(sent[4:])
    m = export_history(harness.bootstrap, harness.layout, out, update=True)
    assert sorted(_ids(out / "events.jsonl")) == sorted(e["event_id"] for e in sent)
    assert m["summary"]["events"] == len(sent)
    assert [u["events"] for u in m["updates"]] == ([4, 4] if crash_at == "manifest.json" else [8])
    assert not [f for f in out.iterdir() if f.name.startswith(".")]


def test_an_update_reads_the_context_whole_when_it_cannot_continue(tmp_path: Path) -> None:
    """A pseudonymized export, one read whole too long ago (a tombstone may have been
    compacted away since), keys that are not the rows', or a file gone: read it all."""
    from datetime import UTC, datetime, timedelta

    from pipeline.history import CONTEXT_WHOLE_EVERY_S, _context_base, _context_file

    kinds = {"ctx.staff": "staff"}
    (tmp_path / "staff.csv").write_text("user_id,department_id,role\nu1,ED,nurse\n")
    recent = datetime.now(UTC).isoformat()
    prev = {"context_read_whole_at": recent, "context_keyed": True,
            "offsets": {"ctx.staff": {"0": [0, 7]}}}  # fmt: skip
    rows, resume = _context_base(tmp_path, kinds, prev, pseudonymized=False)
    assert resume == {"ctx.staff": {"0": 7}} and rows == {"staff": None}  # read if needed
    assert _context_file(tmp_path, "staff") == {
        "u1": {"user_id": "u1", "department_id": "ED", "role": "nurse"}
    }
    old = (datetime.now(UTC) - timedelta(seconds=CONTEXT_WHOLE_EVERY_S + 60)).isoformat()
    for why in (
        {**prev, "context_read_whole_at": old},
        {**prev, "context_keyed": False},
        {**prev, "offsets": {}},
        {k: v for k, v in prev.items() if k != "context_read_whole_at"},  # an older export
    ):
        assert _context_base(tmp_path, kinds, why, pseudonymized=False)[1] is None, why
    assert _context_base(tmp_path, kinds, prev, pseudonymized=True)[1] is None
    (tmp_path / "staff.csv").unlink()
    assert _context_base(tmp_path, kinds, prev, pseudonymized=False)[1] is None
