"""File connectors: conformance, vendor mappings, tail with rotation, signed drops, context
CSVs, and a kill -9 in the middle of a file with no loss and no duplicates on the broker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.base import ConnectorConfigError, NullLedger
from connectors.fhir_encode import to_audit_event
from connectors.files import sign_file
from connectors.registry import build
from connectors.testing import ConnectorConformance, collect, normalize_all
from emrwatch.events import AccessEvent, EventError

REPO = Path(__file__).resolve().parent.parent


def event(i: int, user: str = "u1", action: str = "view") -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "ts": f"2026-03-01T08:{i // 60 % 60:02d}:{i % 60:02d}+08:00",
        "user_id": user,
        "patient_id": f"p{i % 7}",
        "action": action,
    }


def jsonl(events: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


# ---------------------------------------------------------------------------- conformance
class TestJsonlConformance(ConnectorConformance):
    connector_type = "file"
    expected = (6, 5, 1)

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        p = tmp_path / "events.jsonl"
        evs = [event(i) for i in range(5)]
        p.write_bytes(jsonl(evs[:3]) + b"{not json\n\n" + jsonl(evs[3:]))
        return {"path": str(p)}


class TestFhirFileConformance(ConnectorConformance):
    connector_type = "fhir-file"
    expected = (4, 3, 1)

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        p = tmp_path / "audit.ndjson"
        lines = [orjson.dumps(to_audit_event(AccessEvent.from_dict(event(i)))) for i in range(3)]
        lines.insert(1, b'{"resourceType": "AuditEvent", "id": "x"}')
        p.write_bytes(b"\n".join(lines) + b"\n")
        return {"path": str(p)}


VENDOR_CSV = """AUDIT_ID;EVENT_DT;PRSNL;PERSON;EVENT_TYPE;DEVICE
1001;03/01/2026 08:00:05;dr.li;MRN1;Chart Opened;WS-12
1002;03/01/2026 08:01:00;dr.li;MRN2;Report Printed;WS-12
1003;03/01/2026 08:02:00;dr.li;MRN3;Teleported;WS-12
1004;2026-03-01;dr.li;MRN3;Chart Opened;WS-12
"""
VENDOR_MAP = {
    "format": "csv",
    "delimiter": ";",
    "columns": {
        "event_id": "AUDIT_ID",
        "ts": "EVENT_DT",
        "user_id": "PRSNL",
        "patient_id": "PERSON",
        "action": "EVENT_TYPE",
        "workstation": "DEVICE",
    },
    "values": {"action": {"Chart Opened": "view", "Report Printed": "print"}},
    "defaults": {"source": "vendor-x"},
    "timestamp_format": "%m/%d/%Y %H:%M:%S",
    "timezone": "Asia/Shanghai",
}


class TestVendorCsvConformance(ConnectorConformance):
    connector_type = "file"
    expected = (4, 2, 2)

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        p = tmp_path / "export.csv"
        p.write_text(VENDOR_CSV, "utf-8")
        return {"path": str(p), **VENDOR_MAP}


class TestContextCsvConformance(ConnectorConformance):
    connector_type = "context-csv"
    expected = (4, 3, 1)

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        d = tmp_path / "ctx"
        d.mkdir()
        (d / "departments.csv").write_text(
            "department_id,name,kind,head_user_id\nED,Emergency,clinical,u9\nLAB,Lab,weird,\n"
        )
        (d / "staff.csv").write_text(
            "user_id,family_name,given_name,role,department_id,clearance,shift_start,shift_end,"
            "valid_from,valid_until,supervisor_id,address\n"
            "u1,Li,Wei,nurse,ED,2,07:00,15:00,,,u9,\n"
            "u9,Wang,Fang,physician,ED,3,,,,,,\n"
        )
        return {"directory": str(d)}


# ---------------------------------------------------------------------------- vendor mapping
def test_vendor_mapping_gives_canonical_events(tmp_path: Path) -> None:
    p = tmp_path / "export.csv"
    p.write_text(VENDOR_CSV, "utf-8")
    c = build({"type": "file", "path": str(p), **VENDOR_MAP})
    outs, errs = normalize_all(c, collect(c))
    assert [o.to_dict() for o in outs] == [
        {
            "event_id": "1001",
            "ts": "2026-03-01T08:00:05+08:00",
            "user_id": "dr.li",
            "patient_id": "MRN1",
            "action": "view",
            "resource_type": "Patient",
            "workstation": "WS-12",
            "outcome": "success",
            "emergency": False,
            "purpose": "",
            "source": "vendor-x",
        },
        {
            "event_id": "1002",
            "ts": "2026-03-01T08:01:00+08:00",
            "user_id": "dr.li",
            "patient_id": "MRN2",
            "action": "print",
            "resource_type": "Patient",
            "workstation": "WS-12",
            "outcome": "success",
            "emergency": False,
            "purpose": "",
            "source": "vendor-x",
        },
    ]
    (pos1, why1), (pos2, why2) = errs
    assert "line 4" in pos1 and "unknown action 'teleported'" in why1
    assert "values.action" in why1  # tells the integrator which map to extend
    assert "line 5" in pos2 and "does not match" in why2


def test_vendor_mapping_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConnectorConfigError, match="'actor' is not a canonical field"):
        build({"type": "file", "path": "x", "columns": {"actor": "USER"}})
    with pytest.raises(ConnectorConfigError, match="unknown zone"):
        build({"type": "file", "path": "x", "timezone": "Mars/Olympus"})
    with pytest.raises(ConnectorConfigError, match=r"connectors\[0\] \(file\)\.path: required"):
        build({"type": "file"}, 0)


# ---------------------------------------------------------------------------- tail
class Reading:
    """A connector's records() read in a thread, as the runner would."""

    def __init__(self, connector: Any, checkpoint: Any = None) -> None:
        self.c = connector
        self.stop = threading.Event()
        self.got: list[Any] = []
        self.t = threading.Thread(target=self._run, args=(checkpoint,), daemon=True)
        self.t.start()

    def _run(self, cp: Any) -> None:
        for raw in self.c.records(cp, self.stop):
            if raw is not None:
                self.got.append(raw)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Any]:
        """The outputs of the first records once ``n`` arrived (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return [self.c.normalize(r)[0] for r in self.got]

    def close(self) -> None:
        self.stop.set()
        self.t.join(5)
        assert not self.t.is_alive()


class Tail(Reading):
    """A tail-mode file connector; ``wait_for`` gives event ids."""

    def __init__(self, path: Path, checkpoint: Any = None) -> None:
        cfg = {"type": "file", "path": str(path), "mode": "tail", "poll_interval_s": 0.05}
        super().__init__(build(cfg), checkpoint)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Any]:
        return [e.event_id for e in super().wait_for(n, timeout)]


def test_tail_follows_appends_partial_lines_and_rotation(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_bytes(jsonl([event(0), event(1)]))
    tail = Tail(log)
    try:
        assert tail.wait_for(2) == ["e0", "e1"]
        with log.open("ab") as fh:  # a line written in two pieces is read once, whole
            line = orjson.dumps(event(2))
            fh.write(line[:10])
            fh.flush()
            time.sleep(0.2)
            fh.write(line[10:] + b"\n")
        assert tail.wait_for(3) == ["e0", "e1", "e2"]
        # logrotate: the writer still appends to the renamed file, then a new file starts
        with log.open("ab") as old:
            os.rename(log, tmp_path / "audit.log.1")
            old.write(jsonl([event(3)]))
        log.write_bytes(jsonl([event(4), event(5)]))
        assert tail.wait_for(6) == ["e0", "e1", "e2", "e3", "e4", "e5"]
        time.sleep(0.3)
        assert len(tail.got) == 6  # nothing read twice
    finally:
        tail.close()


def test_tail_resumes_from_checkpoint_and_notices_copytruncate(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_bytes(jsonl([event(i) for i in range(4)]))
    tail = Tail(log)
    try:
        tail.wait_for(4)
    finally:
        tail.close()
    cp = orjson.loads(orjson.dumps(tail.got[1].checkpoint))
    log.write_bytes(log.read_bytes() + jsonl([event(4)]))
    again = Tail(log, cp)
    try:
        assert again.wait_for(3) == ["e2", "e3", "e4"]
        log.write_bytes(jsonl([event(9)]))  # copytruncate: the file starts over, shorter
        assert again.wait_for(4)[-1] == "e9"
    finally:
        again.close()


# ---------------------------------------------------------------------------- signed drops
KEY = b"0123456789abcdef-shared-drop-key"


def test_signed_drops_are_verified_and_bad_ones_quarantined(tmp_path: Path) -> None:
    drops = tmp_path / "drops"
    drops.mkdir()
    (tmp_path / "key").write_bytes(KEY)
    good = drops / "a.jsonl"
    good.write_bytes(jsonl([event(1), event(2)]))
    sign_file(good, KEY)
    tampered = drops / "b.jsonl"
    tampered.write_bytes(jsonl([event(3)]))
    sign_file(tampered, KEY)
    tampered.write_bytes(jsonl([event(3, user="mallory")]))  # changed after signing
    unsigned = drops / "c.jsonl"
    unsigned.write_bytes(jsonl([event(4)]))
    ledger = NullLedger()
    c = build(
        {
            "type": "file",
            "path": str(drops / "*.jsonl"),
            "verify": "hmac-sha256",
            "key_file": str(tmp_path / "key"),
        },
        ledger=ledger,
    )
    outs, errs = normalize_all(c, collect(c))
    assert [o.event_id for o in outs] == ["e1", "e2"] and not errs
    q = drops / "quarantine"
    assert (q / "b.jsonl.reason").read_text().startswith("HMAC-SHA256 signature does not match")
    assert (q / "c.jsonl.reason").read_text().startswith("no signature file")
    assert not tampered.exists() and not unsigned.exists() and good.exists()
    by_status = {(r["unit"].rsplit("/", 1)[-1], r["status"]) for r in ledger.receipts}
    assert by_status == {
        ("a.jsonl", "accepted"),
        ("b.jsonl", "quarantined"),
        ("c.jsonl", "quarantined"),
    }
    accepted = next(r for r in ledger.receipts if r["status"] == "accepted")
    assert accepted["records"] == 2 and accepted["bytes"] == good.stat().st_size
    assert len(accepted["digest"]) == 64


def test_drops_mode_waits_for_the_signature_then_reads(tmp_path: Path) -> None:
    drops = tmp_path / "drops"
    drops.mkdir()
    os.environ["EMRWATCH_TEST_DROP_KEY"] = KEY.decode()
    c = build(
        {
            "type": "file",
            "path": str(drops / "*.jsonl"),
            "mode": "drops",
            "verify": "hmac-sha256",
            "key_env": "EMRWATCH_TEST_DROP_KEY",
            "poll_interval_s": 0.05,
            "done_dir": str(tmp_path / "done"),
        }
    )
    reading = Reading(c)
    try:
        f = drops / "x.jsonl"
        f.write_bytes(jsonl([event(7)]))
        time.sleep(0.4)
        assert reading.got == []  # no signature yet: it waits, it does not quarantine at once
        sign_file(f, KEY)
        assert [e.event_id for e in reading.wait_for(1, 5)] == ["e7"]
        deadline = time.monotonic() + 5
        while f.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "done" / "x.jsonl").exists()
    finally:
        reading.close()


def test_context_csv_watch_republishes_a_changed_file(tmp_path: Path) -> None:
    d = tmp_path / "ctx"
    d.mkdir()
    sealed = d / "sealed.csv"
    sealed.write_text(
        "patient_id,sealed_at,reason,authorized_user_ids\np1,2026-01-01T00:00:00+08:00,vip,u1\n"
    )
    c = build({"type": "context-csv", "directory": str(d), "watch": True, "poll_interval_s": 0.05})
    reading = Reading(c)
    try:
        reading.wait_for(1, 5)
        time.sleep(0.1)
        sealed.write_text(sealed.read_text() + "p2,2026-02-01T00:00:00+08:00,psych,\n")
        rows = [u.row["patient_id"] for u in reading.wait_for(3, 5)]
        assert rows == ["p1", "p1", "p2"]  # the whole file again: rows are upserts
    finally:
        reading.close()


def test_normalize_raises_only_event_errors_on_garbage(tmp_path: Path) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from connectors.base import RawRecord

    p = tmp_path / "x.csv"
    p.write_text(VENDOR_CSV)
    mapped = build({"type": "file", "path": str(p), **VENDOR_MAP})
    plain = build({"type": "file", "path": str(p)})
    header = VENDOR_CSV.splitlines()[0].split(";")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300), st.sampled_from(["jsonl", "csv", "fhir"]))
    def check(payload: bytes, fmt: str) -> None:
        for c in (mapped, plain):
            raw = RawRecord(payload, "x line 1", meta={"format": fmt, "header": header})
            try:
                out = c.normalize(raw)
            except EventError:
                continue
            assert all(isinstance(o, AccessEvent) for o in out)

    check()


# ---------------------------------------------------------------------------- crash safety
def _read_access(bootstrap: str, layout: Any) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    from connectors.testing import _read_topics

    got = _read_topics(bootstrap, layout)
    return got["access"], got["dead"]


def test_kill_9_mid_file_then_restart_loses_and_duplicates_nothing(
    broker: Any, tmp_path: Path
) -> None:
    from pipeline.topics import TopicLayout

    n = 40_000
    src = tmp_path / "big.jsonl"
    lines = [orjson.dumps(event(i, user=f"u{i % 50}")) for i in range(n)]
    bad_at = {5_000, 21_000, 39_000}
    for i in sorted(bad_at, reverse=True):
        lines.insert(i, b'{"event_id": "broken"')
    src.write_bytes(b"\n".join(lines) + b"\n")
    prefix = f"k{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"kafka: {{bootstrap_servers: '{broker.bootstrap}'}}\n"
        f"topics: {{prefix: {prefix}, partitions: 3}}\n"
        f"ingest: {{state_dir: '{state}', batch_size: 500, linger_s: 0.05}}\n"
        f"connectors:\n  - {{type: file, name: emr-a, path: '{src}'}}\n"
    )
    cmd = [sys.executable, "-m", "pipeline.cli", "connectors", "run", "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checkpoint = state / "checkpoints" / "emr-a.checkpoint.json"
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # let a few batches commit, then kill mid-file
            if checkpoint.exists():  # written at start (scan bounds), then per batch
                cp = orjson.loads(checkpoint.read_bytes())["checkpoint"]
                if cp is not None and cp["cur"][2] > 3_000:
                    break
            time.sleep(0.01)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    line_at_kill = orjson.loads(checkpoint.read_bytes())["checkpoint"]["cur"][2]
    assert 3_000 < line_at_kill < n, "the kill must land in the middle of the file"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    layout = TopicLayout(prefix=prefix, partitions=3, sources=())
    access, dead = _read_access(broker.bootstrap, layout)
    ids = [e["event_id"] for e in access]
    assert len(ids) == n, f"{len(ids)} events on the topic for {n} in the file"
    assert len(set(ids)) == n, "an event was delivered twice"
    assert len(dead) == len(bad_at)
    assert sorted(int(h["emrwatch-position"].split()[2]) for h in dead) == sorted(
        i + 1 + k for k, i in enumerate(sorted(bad_at))
    )
    summary = orjson.loads(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert summary["records"] + summary["skipped"] <= n + len(bad_at)


def test_checkpoint_bounds_the_recovery_scan_of_every_partition(
    broker: Any, tmp_path: Path
) -> None:
    """Partitions a source never wrote to (here: the dead-letter topic) still get a scan start
    in the checkpoint, so a restart never re-reads a topic from offset 0."""
    from connectors.producer import make_connector_producer
    from connectors.runner import ConnectorRunner
    from connectors.state import CheckpointStore
    from pipeline.stream_config import KafkaSettings
    from pipeline.topics import TopicLayout, ensure_topics

    layout = TopicLayout(prefix=f"b{uuid.uuid4().hex[:8]}", partitions=3, sources=())
    ensure_topics(broker.bootstrap, layout)
    src = tmp_path / "ok.jsonl"
    src.write_bytes(jsonl([event(i, user=f"u{i}") for i in range(30)]))
    store = CheckpointStore(tmp_path / "state")
    producer = make_connector_producer(KafkaSettings(bootstrap_servers=broker.bootstrap))
    try:
        st = ConnectorRunner(
            build({"type": "file", "name": "ok", "path": str(src)}),
            producer,
            layout,
            store,
            bootstrap=broker.bootstrap,
        ).run()
    finally:
        producer.flush()
    assert (st.events, st.dead) == (30, 0)
    scan_from = store.load("ok")["scan_from"]
    want = {f"{layout.access}:{p}" for p in range(3)} | {f"{layout.deadletter}:0"}
    assert set(scan_from) == want
    assert sum(scan_from[f"{layout.access}:{p}"] for p in range(3)) >= 30
