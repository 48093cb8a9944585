"""The worker's batch logic without Kafka or Faust: decode, detect, route, snapshot offsets."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from emrwatch.context import Context
from pipeline.stream_processor import AccessProcessor, Record
from pipeline.stream_state import Snapshot
from pipeline.topics import CONTROL_HEADER, H_SOURCE, TopicLayout
from tests.conftest import synthetic_hospital


class FakeOutput:
    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.dead: list[tuple[bytes | None, str, str]] = []
        self.controls: list[dict[str, Any]] = []
        self.flushes = 0

    def alert(self, alert: Any, src_ts_s: float) -> None:
        self.alerts.append(alert.to_dict())

    def deadletter(
        self,
        raw: bytes | None,
        error: str,
        source: str,
        position: str,
        key: bytes | None = None,
        stage: str = "worker",
    ) -> None:
        self.dead.append((raw, error, position))

    def control(self, doc: dict[str, Any]) -> None:
        self.controls.append(doc)

    def flush(self) -> None:
        self.flushes += 1


class FakeSnapshots:
    writer_id = "fake"

    def __init__(self) -> None:
        self.written: dict[int, tuple[int, bytes]] = {}
        self.last_written: dict[int, str] = {}

    def write(self, partition: int, offset: int, data: bytes, events: int = 0) -> str:
        self.written[partition] = (offset, data)
        self.last_written[partition] = f"s{offset}"
        return f"s{offset}"


def _records(events: list[dict[str, Any]], partition: int = 0, start: int = 0) -> list[Record]:
    return [
        Record(partition, start + i, d["user_id"].encode(), orjson.dumps(d), None, 1.0)
        for i, d in enumerate(events)
    ]


def _processor(
    tmp_path: Path, n: int
) -> tuple[AccessProcessor, FakeOutput, FakeSnapshots, list[dict[str, Any]]]:
    events = synthetic_hospital(tmp_path / "ctx", n)
    ctx = Context.load(tmp_path / "ctx")
    out, snaps = FakeOutput(), FakeSnapshots()
    proc = AccessProcessor(ctx, None, out, snapshots=snaps, snapshot_interval_s=3600)  # type: ignore[arg-type]
    return proc, out, snaps, events


def test_bad_records_are_dead_lettered_and_the_batch_goes_on(tmp_path: Path) -> None:
    proc, out, _snaps, events = _processor(tmp_path, 50)
    proc.adopt(0, None)
    recs = _records(events[:10])
    bad = [
        Record(0, 10, b"u1", b"{not json", None, 1.0),
        Record(0, 11, b"u1", orjson.dumps({"event_id": "x", "user_id": "u1"}), None, 1.0),
        Record(
            0,
            12,
            b"u1",
            orjson.dumps({"event_id": "y", "user_id": "u1", "ts": "2026-03-02T09:00:00"}),
            None,
            1.0,
        ),
        Record(0, 13, b"u1", None, None, 1.0),
    ]
    res = proc.process(recs + bad + _records(events[10:20], start=14))
    assert res.processed == 20 and res.deadletters == 4
    reasons = [e for _, e, _ in out.dead]
    assert "JSONDecodeError" in reasons[0]
    assert "missing required field 'ts'" in reasons[1]
    assert "no UTC offset" in reasons[2]
    assert [pos for *_, pos in out.dead] == ["0:10", "0:11", "0:12", "0:13"]
    assert out.dead[0][0] == b"{not json"  # the original bytes


def test_restored_partition_skips_what_the_snapshot_covers(tmp_path: Path) -> None:
    proc, out, snaps, events = _processor(tmp_path, 3000)
    proc.adopt(0, None)
    proc.process(_records(events[:1000]))
    proc.snapshot_all()
    offset, data = snaps.written[0]
    assert offset == 1000
    # a second worker restores it and is handed an overlapping batch (500 already covered)
    ctx = Context.load(tmp_path / "ctx")
    out2 = FakeOutput()
    proc2 = AccessProcessor(ctx, None, out2, snapshots=FakeSnapshots(), snapshot_interval_s=3600)  # type: ignore[arg-type]
    assert proc2.adopt(0, Snapshot(0, offset, data, "s1000", "other", 1000)) == 1000
    res = proc2.process(_records(events[500:3000], start=500))
    assert res.skipped == 500 and res.processed == 2000
    assert proc2.parts[0].events == 3000
    # same final alerts as one uninterrupted engine
    res_all = AccessProcessor(
        Context.load(tmp_path / "ctx"), None, FakeOutput(), snapshot_interval_s=3600
    )  # type: ignore[arg-type]
    res_all.adopt(0, None)
    full_out = res_all.output
    res_all.process(_records(events))
    last = lambda alerts: {a["alert_id"]: a["event_ids"] for a in alerts}  # noqa: E731
    combined = last(out.alerts) | last(out2.alerts)
    assert combined == last(full_out.alerts)  # type: ignore[attr-defined]


def test_end_of_input_flushes_snapshots_and_acknowledges(tmp_path: Path) -> None:
    proc, out, snaps, events = _processor(tmp_path, 20)
    proc.adopt(2, None)
    eof = Record(
        2,
        20,
        b"\x00eof",
        orjson.dumps({"type": "eof", "run": "r1"}),
        [(CONTROL_HEADER, b"eof")],
        1.0,
    )
    res = proc.process(_records(events, partition=2) + [eof])
    assert res.processed == 20
    assert out.controls == [res.acks[0]]
    ack = res.acks[0]
    assert ack["type"] == "eof-ack" and ack["run"] == "r1" and ack["partition"] == 2
    assert ack["events"] == 20 and ack["offset"] == 20
    assert snaps.written[2][0] == 21  # the marker itself is covered


def test_context_marker_waits_for_the_named_offsets(tmp_path: Path) -> None:
    proc, _out, _snaps, _events = _processor(tmp_path, 1)
    synced: list[dict[str, int]] = []
    proc.context_sync = synced.append
    proc.adopt(0, None)
    marker = Record(
        0,
        0,
        b"\x00ctx",
        orjson.dumps({"type": "context", "offsets": {"x.context.sealed:0": 7}}),
        [(CONTROL_HEADER, b"context")],
        1.0,
    )
    res = proc.process([marker])
    assert synced == [{"x.context.sealed:0": 7}] and not res.acks


def test_layout_names() -> None:
    lay = TopicLayout(prefix="h1")
    assert lay.access == "h1.access" and lay.context("sealed") == "h1.context.sealed"
    assert lay.raw("fhir") == "h1.raw.fhir" and lay.snapshots("g") == "h1.snapshots.g"


def test_an_access_stamped_after_its_record_was_produced_is_judged_at_the_records_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A source whose clock runs a day ahead: its access would move the user's and the
    partition's event time a day on and split every visit and window around it."""
    from emrwatch.events import parse_ts

    proc, _out, _snaps, events = _processor(tmp_path, 40)
    proc.adopt(0, None)

    def record(i: int, d: dict[str, Any], produced: float) -> Record:
        return Record(0, i, d["user_id"].encode(), orjson.dumps(d), [(H_SOURCE, b"pacs")], produced)

    recs = [record(i, d, parse_ts(d["ts"]) + 2.0) for i, d in enumerate(events[:30])]
    produced = parse_ts(events[30]["ts"]) + 2.0
    wrong = dict(events[30], ts="2026-03-03T09:00:00+08:00", event_id="wrong-clock")
    late_ok = dict(events[31], event_id="a-minute-ahead")  # within max_clock_ahead_s
    recs.append(record(30, wrong, produced))
    recs.append(record(31, late_ok, parse_ts(late_ok["ts"]) - 60.0))
    with caplog.at_level("WARNING", logger="pipeline.stream_processor"):
        res = proc.process(recs)
    assert res.processed == 32 and res.clock_ahead == 1 and proc.total_clock_ahead == 1
    assert "source pacs: access wrong-clock stamped 26.0 h after" in caplog.text
    engine = proc.parts[0].engine
    # neither the partition's nor the user's event time jumped a day
    assert engine.watermark < parse_ts("2026-03-02T12:00:00+08:00")
    assert engine.users[wrong["user_id"]].last_t <= produced
    # records without a producer timestamp (tests' 1.0, Kafka's -1) are taken as stamped
    res = proc.process(_records([dict(events[32], ts="2026-03-04T09:00:00+08:00")], start=32))
    assert res.clock_ahead == 0 and engine.watermark == parse_ts("2026-03-04T09:00:00+08:00")


@pytest.mark.parametrize("batched", [False, True], ids=["in-order", "hourly-batches"])
def test_each_partition_exports_how_long_it_waits_for_late_accesses(
    tmp_path: Path, batched: bool
) -> None:
    """A log written one workstation's hour at a time: the partition's engine measures the
    delay and waits the hour for late accesses; emrwatch_late_allowance_seconds says so."""
    from prometheus_client import generate_latest

    from pipeline.stream_metrics import StreamMetrics

    events = synthetic_hospital(tmp_path / "ctx", 6000, step_s=3.0)  # 5 hours
    if batched:
        hour = lambda d: int(datetime.fromisoformat(d["ts"]).timestamp() // 3600)  # noqa: E731
        events = [
            d
            for _, _, d in sorted(((hour(d), d["workstation"]), i, d) for i, d in enumerate(events))
        ]
    metrics = StreamMetrics()
    proc = AccessProcessor(Context.load(tmp_path / "ctx"), None, FakeOutput(), metrics=metrics)  # type: ignore[arg-type]
    proc.adopt(0, None)
    for i in range(0, len(events), 500):
        res = proc.process(_records(events[i : i + 500], start=i))
    assert res.late_allowance == {0: 3600.0 if batched else 600.0}
    text = generate_latest(metrics.registry).decode()
    want = "3600.0" if batched else "600.0"
    assert f'emrwatch_late_allowance_seconds{{partition="0"}} {want}' in text


def test_a_workstation_whose_clock_runs_behind_is_judged_at_its_steady_offset(
    tmp_path: Path,
) -> None:
    """ws-7 stamps its accesses 8 h before their records are produced, steadily: once that
    is plain (pipeline.file_clock.SteadyOffset) they are judged 8 h later, counted and
    warned of once. A source merely lagging (offsets that wander) is left as it is."""
    from datetime import timedelta

    from prometheus_client import generate_latest

    from detectors.lateness import STEADY_N
    from pipeline.stream_metrics import StreamMetrics

    events = synthetic_hospital(tmp_path / "ctx", 6000, step_s=3.0)  # 5 hours
    produced = [datetime.fromisoformat(d["ts"]).timestamp() for d in events]
    for d in events:
        if d["workstation"] == "ws-7":
            d["ts"] = (datetime.fromisoformat(d["ts"]) - timedelta(hours=8)).isoformat()
        elif d["workstation"] == "ws-8":  # lags 2-3 h, not steadily
            lag = 2 + int(d["event_id"][-3:]) / 1000
            d["ts"] = (datetime.fromisoformat(d["ts"]) - timedelta(hours=lag)).isoformat()
    recs = [
        Record(0, i, d["user_id"].encode(), orjson.dumps(d), None, produced[i])
        for i, d in enumerate(events)
    ]
    metrics = StreamMetrics()
    proc = AccessProcessor(Context.load(tmp_path / "ctx"), None, FakeOutput(), metrics=metrics)  # type: ignore[arg-type]
    proc.adopt(0, None)
    behind = sum(proc.process(recs[i : i + 500]).clock_behind for i in range(0, len(recs), 500))
    n7 = sum(d["workstation"] == "ws-7" for d in events)
    assert n7 - 60 < behind <= n7 - (STEADY_N - 1)  # all of ws-7's but its first half hour
    assert proc.total_clock_behind == behind
    assert (
        f"emrwatch_events_clock_behind_total {float(behind)}"
        in generate_latest(metrics.registry).decode()
    )
    # the engine saw ws-7's accesses at their producer time: the partition's event time
    # never went back 8 h, and ws-8's stayed as stamped (2-3 h behind, far behind no one)
    assert proc.parts[0].engine.watermark == max(produced)
    # a worker that takes the partition over from a snapshot two hours in knows the clock
    # already: it judges every ws-7 access after the snapshot
    snaps = FakeSnapshots()
    first = AccessProcessor(Context.load(tmp_path / "ctx"), None, FakeOutput(), snapshots=snaps)  # type: ignore[arg-type]
    first.adopt(0, None)
    half = 2400
    before = sum(first.process(recs[i : i + 400]).clock_behind for i in range(0, half, 400))
    first.snapshot_all()
    offset, data = snaps.written[0]
    second = AccessProcessor(Context.load(tmp_path / "ctx"), None, FakeOutput())  # type: ignore[arg-type]
    second.adopt(0, Snapshot(0, offset, data, "s", "other", half))
    after = sum(second.process(recs[i : i + 400]).clock_behind for i in range(half, 6000, 400))
    assert after == sum(d["workstation"] == "ws-7" for d in events[half:])
    assert before + after == behind


def test_a_clock_behind_does_not_hold_the_late_allowance_wide(tmp_path: Path) -> None:
    """ws-7's accesses before its offset was steady were taken as stamped, 8 h late, and
    widened the partition's late allowance to its cap; once the clock is known to be
    behind they are forgiven, and the partition waits the floor again, not for a day."""
    from datetime import timedelta

    events = synthetic_hospital(tmp_path / "ctx", 6000, step_s=3.0)  # 5 hours
    produced = [datetime.fromisoformat(d["ts"]).timestamp() for d in events]
    for d in events:
        if d["workstation"] == "ws-7":
            d["ts"] = (datetime.fromisoformat(d["ts"]) - timedelta(hours=8)).isoformat()
    recs = [
        Record(0, i, d["user_id"].encode(), orjson.dumps(d), None, produced[i])
        for i, d in enumerate(events)
    ]
    proc = AccessProcessor(Context.load(tmp_path / "ctx"), None, FakeOutput())  # type: ignore[arg-type]
    proc.adopt(0, None)
    seen = [proc.process(recs[i : i + 500]).late_allowance[0] for i in range(0, len(recs), 500)]
    cfg = proc.parts[0].engine.cfg
    assert seen[0] == cfg.late_allowance_max_s  # the first hour, before it has measured
    assert seen[-1] == cfg.model_visit_lateness_s
    assert proc.parts[0].engine.stats().too_late > 0  # they did come too late, as stamped
