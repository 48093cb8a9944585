"""Nothing lost, nothing doubled: kill -9 workers mid-stream against the real broker.

Recovery uses engine snapshots (``<prefix>.snapshots.<group>``), not Faust changelogs, whose recovery
stops early on the embedded broker. The checks do not trust any offset the broker reports:
every partition's end-of-input acknowledgement carries the count of events its engine
lineage processed (carried through snapshots), which must equal what was produced, and the
collapsed alerts must equal an uninterrupted in-process replay, evidence list for evidence
list. A lost event lowers the count or changes some evidence; a doubled one raises it.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.stream_state import SnapshotStore
from tests.conftest import StreamHarness, replay_reference, synthetic_hospital


def _feed_in_background(
    harness: StreamHarness, events: list[dict[str, Any]], rate: float
) -> threading.Thread:
    t = threading.Thread(target=harness.produce, args=(events,), kwargs={"rate": rate}, daemon=True)
    t.start()
    return t


def _snapshot_events(harness: StreamHarness, group: str) -> dict[int, int]:
    store = SnapshotStore(harness.layout.snapshots(group), harness.producer, harness.bootstrap)
    out = {}
    for p in range(harness.layout.partitions):
        snap = store.read_latest(p)
        out[p] = snap.events if snap is not None else 0
    return out


def _assigned(log: str) -> list[list[int]]:
    return [
        [int(x) for x in m.split(",") if x.strip()]
        for m in re.findall(r"assigned access partitions \[([0-9, ]*)\]", log)
    ]


def test_kill9_mid_stream_then_restart_loses_and_doubles_nothing(
    harness: StreamHarness, spawn_worker: Any, tmp_path: Path
) -> None:
    events = synthetic_hospital(tmp_path / "ctx", 12000, seed=21)
    harness.publish_context(tmp_path / "ctx")
    a = spawn_worker(harness.layout, "g-kill", "--snapshot-interval", "1")
    a.wait_for_log("positioned at snapshot offsets")
    feed = _feed_in_background(harness, events, rate=3000)
    deadline = time.monotonic() + 60
    while sum(_snapshot_events(harness, "g-kill").values()) == 0:  # some progress is durable
        assert time.monotonic() < deadline, a.log()[-3000:]
        time.sleep(0.3)
    a.kill9()
    at_kill = _snapshot_events(harness, "g-kill")
    assert 0 < sum(at_kill.values()) < len(events), at_kill  # really mid-stream
    b = spawn_worker(harness.layout, "g-kill", "--snapshot-interval", "1")
    feed.join(timeout=60)
    run, parts = harness.eof()
    acks = harness.wait_acks(run, parts, workers=(b,), timeout=180)
    processed = sum(x["events"] for x in acks.values())
    got, records = harness.alerts()
    ref = replay_reference(tmp_path / "ctx", events)
    print(
        f"\nkill -9: produced {len(events)}, processed {processed}; snapshot at kill covered "
        f"{sum(at_kill.values())}; alerts {len(got)} (replay {len(ref)}), "
        f"alert records on topic {records}"
    )
    assert processed == len(events)
    assert "restored snapshot" in b.log()
    assert set(got) == set(ref)
    for aid, alert in ref.items():
        assert got[aid]["event_ids"] == alert.event_ids  # no evidence lost or doubled


def test_two_workers_one_killed_the_other_takes_over(
    harness: StreamHarness, spawn_worker: Any, tmp_path: Path
) -> None:
    events = synthetic_hospital(tmp_path / "ctx", 10000, seed=22)
    harness.publish_context(tmp_path / "ctx")
    a = spawn_worker(harness.layout, "g-pair", "--snapshot-interval", "1")
    b = spawn_worker(harness.layout, "g-pair", "--snapshot-interval", "1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        la, lb = _assigned(a.log()), _assigned(b.log())
        if la and lb and la[-1] and lb[-1] and len(la[-1]) + len(lb[-1]) == 4:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(
            f"the group never split the partitions: {_assigned(a.log())} {_assigned(b.log())}"
        )
    a_parts = _assigned(a.log())[-1]
    feed = _feed_in_background(harness, events, rate=3000)
    time.sleep(2.0)
    a.kill9()
    feed.join(timeout=60)
    run, parts = harness.eof()
    acks = harness.wait_acks(run, parts, workers=(b,), timeout=180)
    took_over = _assigned(b.log())[-1]
    processed = sum(x["events"] for x in acks.values())
    got, records = harness.alerts()
    ref = replay_reference(tmp_path / "ctx", events)
    print(
        f"\ntakeover: worker A had {a_parts}, B ends with {took_over}; produced {len(events)}, "
        f"processed {processed}; alerts {len(got)} (replay {len(ref)}), records {records}"
    )
    assert sorted(took_over) == [0, 1, 2, 3]
    assert {x["writer"] for x in acks.values()} == {acks[0]["writer"]}  # all acknowledged by B
    assert processed == len(events)
    assert set(got) == set(ref)
    for aid, alert in ref.items():
        assert got[aid]["event_ids"] == alert.event_ids


def test_a_dead_engine_process_stops_its_worker_and_a_restart_recovers(
    harness: StreamHarness, spawn_worker: Any, tmp_path: Path
) -> None:
    import os
    import signal

    events = synthetic_hospital(tmp_path / "ctx", 4000, seed=23)
    harness.publish_context(tmp_path / "ctx")
    a = spawn_worker(harness.layout, "g-child", "--snapshot-interval", "1")
    a.wait_for_log("positioned at snapshot offsets")
    harness.produce(events[:2000])
    children = Path(f"/proc/{a.pid}/task/{a.pid}/children").read_text().split()
    engines = [
        c
        for c in children
        if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
        and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()
    ]
    assert len(engines) == 1, "the worker runs its engines in one child process"
    os.kill(int(engines[0]), signal.SIGKILL)
    a.proc.wait(timeout=30)  # the worker notices and stops instead of running blind
    assert a.proc.returncode != 0 and "engine host failed" in a.log()
    b = spawn_worker(harness.layout, "g-child", "--snapshot-interval", "1")
    harness.produce(events[2000:])
    run, parts = harness.eof()
    acks = harness.wait_acks(run, parts, workers=(b,), timeout=120)
    assert sum(x["events"] for x in acks.values()) == len(events)
    got, _ = harness.alerts()
    ref = replay_reference(tmp_path / "ctx", events)
    assert {k: v["event_ids"] for k, v in got.items()} == {k: v.event_ids for k, v in ref.items()}
