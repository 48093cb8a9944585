"""The ATNA listener's spool: what syslog senders handed over survives a crash."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.atna import octet_frame, to_audit_message
from connectors.spool import FileSpool, MemorySpool, SpoolError
from emrwatch.events import AccessEvent

REPO = Path(__file__).resolve().parent.parent


def _fill(spool: Any, n: int, start: int = 0) -> list[int]:
    return [
        spool.append(f"m{i}".encode(), f"peer #{i}", "10.0.0.5", {"transport": "tcp"})
        for i in range(start, start + n)
    ]


def _payloads(records: Any) -> list[bytes]:
    return [r.payload for r in records]


def test_file_spool_resumes_after_the_checkpoint_across_segments(tmp_path: Path) -> None:
    s = FileSpool(tmp_path, segment_bytes=400)
    assert _fill(s, 30) == list(range(1, 31))
    s.close()
    assert len(list(tmp_path.glob("*.spool"))) > 3  # rotated
    again = FileSpool(tmp_path, segment_bytes=400)
    got = list(again.pending({"spool_seq": 17}))
    assert _payloads(got) == [f"m{i}".encode() for i in range(17, 30)]
    assert [r.checkpoint["spool_seq"] for r in got] == list(range(18, 31))
    # positions are unique in the source (the runner's recovery scan matches them)
    assert got[0].position == "peer #17 spool#18" and got[0].peer == "10.0.0.5"
    assert got[0].meta == {"transport": "tcp"}
    # appends after a restart continue the numbering
    assert _fill(again, 2, 30) == [31, 32]
    assert _payloads(again.pending({"spool_seq": 30})) == [b"m30", b"m31"]
    again.close()


def test_committed_segments_are_deleted_but_never_the_open_one(tmp_path: Path) -> None:
    s = FileSpool(tmp_path, segment_bytes=400)
    _fill(s, 30)
    before = sorted(tmp_path.glob("*.spool"))
    s.committed({"spool_seq": 30})
    after = sorted(tmp_path.glob("*.spool"))
    assert after == before[-1:]
    s.committed({"spool_seq": 5})  # an older checkpoint changes nothing
    assert sorted(tmp_path.glob("*.spool")) == after
    s.close()


def test_a_torn_last_record_is_cut_off_and_a_damaged_older_one_refused(tmp_path: Path) -> None:
    s = FileSpool(tmp_path / "a")
    _fill(s, 5)
    s.close()
    (seg,) = (tmp_path / "a").glob("*.spool")
    whole = seg.read_bytes()
    seg.write_bytes(whole[:-3])  # the crash hit in the middle of the fifth write
    again = FileSpool(tmp_path / "a")
    assert _payloads(again.pending()) == [b"m0", b"m1", b"m2", b"m3"]
    assert _fill(again, 1, 4) == [5]  # the torn record's number is given again
    again.close()

    s = FileSpool(tmp_path / "b", segment_bytes=200)
    _fill(s, 10)
    s.close()
    first = sorted((tmp_path / "b").glob("*.spool"))[0]
    data = bytearray(first.read_bytes())
    data[40] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(SpoolError, match="not the last file"):
        FileSpool(tmp_path / "b", segment_bytes=200)


def test_read_waits_for_new_records_and_a_full_spool_holds_the_sender(tmp_path: Path) -> None:
    s = FileSpool(tmp_path, segment_bytes=1 << 20, max_bytes=1 << 20)
    stop = threading.Event()
    got: list[bytes] = []

    def reader() -> None:
        for r in s.read(None, stop):
            if r is not None:
                got.append(r.payload)

    t = threading.Thread(target=reader)
    t.start()
    _fill(s, 3)
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [b"m0", b"m1", b"m2"]
    stop.set()
    t.join(5)
    assert not t.is_alive()

    big = FileSpool(tmp_path / "full", segment_bytes=512 << 10, max_bytes=1 << 20)
    chunk = b"x" * (300 << 10)
    for _ in range(4):  # two segments, 1.2 MiB unacknowledged: the next append must wait
        big.append(chunk, "p", "peer", {})
    done = threading.Event()
    t = threading.Thread(target=lambda: (big.append(b"late", "p", "peer", {}), done.set()))
    t.start()
    assert not done.wait(0.6), "a full spool must hold the sender back"
    big.committed({"spool_seq": 2})  # the broker has the first segment: it is deleted
    assert done.wait(5), "committed space must release the sender"
    t.join(5)
    assert _payloads(big.pending({"spool_seq": 4})) == [b"late"]
    big.close()


def test_memory_spool_is_a_bounded_fifo() -> None:
    s = MemorySpool(max_records=3)
    assert _fill(s, 3) == [1, 2, 3]
    done = threading.Event()
    t = threading.Thread(target=lambda: (_fill(s, 1, 3), done.set()))
    t.start()
    assert not done.wait(0.5)
    first = next(iter(s.pending()))
    assert first.payload == b"m0" and first.checkpoint is None
    assert done.wait(5)
    s.close()
    assert _payloads(s.pending()) == [b"m1", b"m2", b"m3"]
    assert s.append(b"after", "p", "peer", {}) == 0
    t.join(5)


# ---------------------------------------------------------------------------- crash safety
def _event(i: int) -> AccessEvent:
    return AccessEvent.from_dict(
        {
            "event_id": f"atna-{i}",
            "ts": "2026-03-02T08:00:00+08:00",
            "user_id": f"u{i % 40}",
            "patient_id": f"p{i % 900}",
            "action": "view",
            "workstation": "ws-1",
            "source": "emr",
        }
    )


def _accepted(ledger: Path, source: str) -> int:
    if not ledger.exists():
        return 0
    con = sqlite3.connect(ledger, timeout=5)
    try:
        row = con.execute(
            "SELECT COALESCE(SUM(records), 0) FROM receipts WHERE source = ? AND status = ?",
            (source, "accepted"),
        ).fetchone()
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        con.close()
    return int(row[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kill_9_with_messages_spooled_then_restart_loses_and_duplicates_nothing(
    broker: Any, tmp_path: Path
) -> None:
    """Syslog senders never resend: messages the listener took but had not yet delivered
    when the connector was killed must reach the broker after the restart, once."""
    from connectors.testing import _read_topics
    from pipeline.topics import TopicLayout

    n = 6_000
    port = _free_port()
    prefix = f"s{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"kafka: {{bootstrap_servers: '{broker.bootstrap}'}}\n"
        f"topics: {{prefix: {prefix}, partitions: 2}}\n"
        f"ingest: {{state_dir: '{state}', batch_size: 200, linger_s: 0.05}}\n"
        "connectors:\n"
        f"  - {{type: atna-syslog, name: atna, transport: tcp, port: {port}}}\n"
    )
    cmd = [sys.executable, "-m", "pipeline.cli", "connectors", "run", "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    layout = TopicLayout(prefix=prefix, partitions=2, sources=())
    frames = b"".join(octet_frame(to_audit_message(_event(i))) for i in range(n))

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc
            except OSError:
                time.sleep(0.1)
        proc.kill()
        raise AssertionError("the ATNA listener did not come up")

    proc = start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(frames)
        deadline = time.monotonic() + 60  # the receipt: the listener spooled all n
        while _accepted(state / "ledger.sqlite", "atna") < n and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _accepted(state / "ledger.sqlite", "atna") == n
    before = [e["event_id"] for e in _read_topics(broker.bootstrap, layout)["access"]]
    assert len(before) < n, "the kill must leave spooled messages undelivered"
    assert len(set(before)) == len(before)

    proc = start()  # nothing is sent again: only the spool can deliver the rest
    try:
        deadline = time.monotonic() + 120
        ids: list[str] = []
        while time.monotonic() < deadline:
            ids = [e["event_id"] for e in _read_topics(broker.bootstrap, layout)["access"]]
            if len(ids) >= n:
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(ids) == n, f"{len(ids)} events on the topic for {n} spooled"
    assert sorted(set(ids)) == sorted(f"atna-{i}" for i in range(n)), "lost or duplicated"
    # the delivered spool segments were deleted (only the open one of each run may stay)
    assert len(list((state / "spool" / "atna").glob("*.spool"))) <= 2
    assert orjson.loads((state / "checkpoints" / "atna.checkpoint.json").read_bytes())[
        "checkpoint"
    ] == {"spool_seq": n}


def test_atna_spools_where_it_is_told_and_reports_the_backlog(tmp_path: Path) -> None:
    from connectors.registry import build

    c = build({"type": "atna-syslog", "name": "atna", "transport": "udp", "port": 0})
    c.use_state_dir(tmp_path / "spool" / "atna")  # what `emrwatch connectors run` does
    c.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(to_audit_message(_event(1)), ("127.0.0.1", c.port))
        deadline = time.monotonic() + 5
        while c.describe()["spool_seq"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        info = c.describe()
        assert info["spool"] == str(tmp_path / "spool" / "atna")
        assert info["spool_seq"] == 1 and info["spool_unacked_bytes"] > 0
        c.committed({"spool_seq": 1})
        assert c.describe()["spool_committed"] == 1
    finally:
        c.close()
    memory = build({"type": "atna-syslog", "transport": "udp", "port": 0, "spool_dir": "memory"})
    memory.use_state_dir(tmp_path / "ignored")
    assert memory.spool_path() is None
