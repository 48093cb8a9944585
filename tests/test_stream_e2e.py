"""End to end against the embedded broker: connector → Kafka → Faust worker → alert topic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import StreamHarness, replay_reference, synthetic_hospital


def _assert_same_as_replay(got: dict[str, dict[str, Any]], ref: dict[str, Any]) -> None:
    assert ref, "the data set must raise some alerts"
    assert set(got) == set(ref)
    for aid, a in ref.items():
        assert got[aid]["event_ids"] == a.event_ids
        assert got[aid]["severity"] == a.severity


@pytest.mark.parametrize("engines", ["--engine-process", "--no-engine-process"])
def test_stream_raises_the_same_alerts_as_replay(
    harness: StreamHarness, spawn_worker: Any, tmp_path: Path, engines: str
) -> None:
    events = synthetic_hospital(tmp_path / "ctx", 6000, seed=11)
    harness.publish_context(tmp_path / "ctx")
    harness.produce(events)
    run, parts = harness.eof()
    w = spawn_worker(harness.layout, "g-e2e", engines)
    acks = harness.wait_acks(run, parts, workers=(w,))
    assert sum(a["events"] for a in acks.values()) == len(events)
    got, records = harness.alerts()
    _assert_same_as_replay(got, replay_reference(tmp_path / "ctx", events))
    assert records >= len(got)  # upserts: an alert may have several versions on the topic


def test_malformed_messages_are_dead_lettered_and_the_stream_continues(
    harness: StreamHarness, spawn_worker: Any, tmp_path: Path
) -> None:
    events = synthetic_hospital(tmp_path / "ctx", 3000, seed=12)
    harness.publish_context(tmp_path / "ctx")
    w = spawn_worker(harness.layout, "g-dead")
    harness.produce(events[:1500])
    bad = {
        b"{not json": "JSONDecodeError",
        orjson.dumps({"event_id": "b1", "user_id": "u0001"}): "missing required field 'ts'",
        orjson.dumps({"event_id": "b2", "user_id": "u0002", "ts": "yesterday"}): "bad timestamp",
        orjson.dumps(
            {
                "event_id": "b3",
                "user_id": "u0003",
                "ts": "2026-03-02T09:00:00+08:00",
                "action": "teleport",
            }
        ): "unknown action",
        orjson.dumps([1, 2, 3]): "",
    }
    for value in bad:
        harness.produce_raw(b"u0001", value)
    harness.produce(events[1500:])
    run, parts = harness.eof()
    acks = harness.wait_acks(run, parts, workers=(w,))
    assert sum(a["events"] for a in acks.values()) == len(events)  # nothing after them was lost
    assert sum(a["deadletters"] for a in acks.values()) == len(bad)
    dead = harness.deadletters()
    assert [v for v, _ in dead] == list(bad)  # original bytes, in order
    for (_v, h), reason in zip(dead, bad.values(), strict=True):
        assert reason in h["emrwatch-error"]
        assert h["emrwatch-source"] == harness.layout.access
        partition, _, offset = h["emrwatch-position"].partition(":")
        assert partition.isdigit() and offset.isdigit()
    got, _ = harness.alerts()
    _assert_same_as_replay(got, replay_reference(tmp_path / "ctx", events))


def test_a_seal_published_mid_stream_applies_to_the_next_events(
    harness: StreamHarness, spawn_worker: Any, tmp_path: Path
) -> None:
    from pipeline.stream_context import publish_rows

    synthetic_hospital(tmp_path / "ctx", 0)
    harness.publish_context(tmp_path / "ctx")
    w = spawn_worker(harness.layout, "g-seal")

    # u0001 (ORTH) reads p00001, an ORTH in-patient: explained, no alert
    def access(n: int, hhmm: str) -> dict[str, Any]:
        return {
            "event_id": f"seal-{n}",
            "ts": f"2026-03-02T{hhmm}:00+08:00",
            "user_id": "u0001",
            "patient_id": "p00001",
            "action": "view",
            "resource_type": "Observation",
        }

    harness.produce([access(1, "09:00"), access(2, "09:05")])
    run1, parts = harness.eof()
    harness.wait_acks(run1, parts, workers=(w,))
    got, _ = harness.alerts()
    assert not got
    # the record is sealed while the worker runs; the very next access breaks the seal
    publish_rows(
        harness.producer,
        harness.layout,
        [
            (
                "sealed",
                {
                    "patient_id": "p00001",
                    "sealed_at": "2026-03-02T09:10:00+08:00",
                    "reason": "dispute",
                    "authorized_user_ids": "u0000",
                },
            )
        ],
        sync=True,
    )
    harness.produce([access(3, "09:20")])
    run2, parts = harness.eof()
    harness.wait_acks(run2, parts, workers=(w,))
    got, _ = harness.alerts()
    assert len(got) == 1
    (alert,) = got.values()
    assert "sealed-record-touch" in alert["detector"]
    assert alert["event_ids"] == ["seal-3"]
