"""Accesses that reach the monitor late, behind newer ones of the same user: a log source that
lags another, a connector catching up after an outage, an EMR writing its audit trail in
batches. The rules' windows and day counts and the learned visits take each in its place in
event time, so late delivery must not turn one person's ordinary work into alerts. A source
whose clock runs ahead is the other side of it: replay judges its accesses at the file's
time (pipeline.file_clock)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest

from detectors.config import DetectionConfig
from pipeline.evaluate import evaluate
from pipeline.simulate import simulate

#: share of the accesses delivered late, and by how much (seconds)
LATE_SHARE, LATE_MIN, LATE_MAX = 0.05, 300.0, 3600.0


def deliver_late(src: Path, dst: Path, seed: int) -> int:
    """``src``'s hospital in ``dst`` with LATE_SHARE of its accesses moved later in the file
    by LATE_MIN..LATE_MAX of event time; returns how many were moved."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "events.ndjson":
            (dst / f.name).write_bytes(f.read_bytes())
    rng = random.Random(seed)
    rows = []
    moved = 0
    with open(src / "events.ndjson", "rb") as fh:
        for i, line in enumerate(fh):
            t = datetime.fromisoformat(orjson.loads(line)["recorded"]).timestamp()
            delay = rng.uniform(LATE_MIN, LATE_MAX) if rng.random() < LATE_SHARE else 0.0
            moved += delay > 0
            rows.append((t + delay, i, line))
    rows.sort()
    with open(dst / "events.ndjson", "wb") as out:
        out.writelines(line for _, _, line in rows)
    return moved


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    base = tmp_path_factory.mktemp("late")
    ordered = base / "ordered"
    simulate(ordered, days=4, seed=15, scale=0.6)  # a tuning seed
    late = base / "late"
    return ordered, late, deliver_late(ordered, late, seed=7)


def test_late_delivery_raises_no_false_alerts_and_loses_no_misuser(
    hospitals: tuple[Path, Path, int],
) -> None:
    ordered, late, moved = hospitals
    assert moved > 1000
    cfg = DetectionConfig()
    a = evaluate(ordered, cfg, workers=2)
    b = evaluate(late, cfg, workers=2)
    assert b["events"] == a["events"] and b["bad_lines"] == 0
    assert b["false_alerts"] <= a["false_alerts"]
    assert b["mean_user_recall"] >= a["mean_user_recall"]
    assert b["min_user_recall"] >= a["min_user_recall"]
    assert b["event_recall"] >= a["event_recall"] - 0.01


def in_hourly_batches(src: Path, dst: Path) -> None:
    """``src``'s hospital in ``dst`` with its log written one workstation's hour at a time:
    the log of a hospital that collects each workstation's (or server's) trail hourly."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "events.ndjson":
            (dst / f.name).write_bytes(f.read_bytes())
    rows = []
    with open(src / "events.ndjson", "rb") as fh:
        for i, line in enumerate(fh):
            d = orjson.loads(line)
            hour = int(datetime.fromisoformat(d["recorded"]).timestamp() // 3600)
            rows.append((hour, d["agent"][0]["network"]["address"], i, line))
    rows.sort()
    with open(dst / "events.ndjson", "wb") as out:
        out.writelines(line for *_, line in rows)


def test_a_log_written_in_hourly_batches_is_judged_as_in_time_order(
    hospitals: tuple[Path, Path, int], tmp_path: Path
) -> None:
    """Accesses arrive up to an hour behind the newest: the engine measures it and waits
    that long (detectors.lateness), so visits stay whole and an account used at two
    workstations, whose accesses come in different batches, still correlates."""
    ordered = hospitals[0]
    batched = tmp_path / "batched"
    in_hourly_batches(ordered, batched)
    cfg = DetectionConfig()
    a = evaluate(ordered, cfg, workers=2)
    b = evaluate(batched, cfg, workers=2)
    assert a["late_allowance_s"] == 0 and a["too_late"] == 0
    assert b["late_allowance_s"] == 3600  # the hour, and no more
    # it waits the cap while it measures the first hour; a few come later than what that
    # hour showed (61 of 79,297 with 2 workers; 94 when it began at the floor)
    assert b["too_late"] < 0.001 * b["events"]
    assert b["false_alerts"] <= a["false_alerts"]
    assert b["mean_user_recall"] >= a["mean_user_recall"]
    assert b["min_user_recall"] >= a["min_user_recall"]
    assert b["event_recall"] >= a["event_recall"] - 0.002
    # what it guards against: a fixed 10 minutes
    c = evaluate(batched, replace(cfg, late_allowance_max_s=cfg.model_visit_lateness_s), workers=2)
    assert c["late_allowance_s"] == 0
    assert c["scenarios"]["credential_sharing"]["user_recall"] < 1.0
    assert c["false_alerts"] > a["false_alerts"]


def clock_ahead(src: Path, dst: Path, hours: float) -> int:
    """``src``'s hospital in ``dst`` with every access of its busiest workstation stamped
    ``hours`` ahead (a source writing local time as UTC); returns how many."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "events.ndjson":
            (dst / f.name).write_bytes(f.read_bytes())
    docs = [orjson.loads(line) for line in (src / "events.ndjson").read_bytes().splitlines()]
    at = Counter(d["agent"][0]["network"]["address"] for d in docs)
    busiest = at.most_common(1)[0][0]
    for d in docs:
        if d["agent"][0]["network"]["address"] == busiest:
            t = datetime.fromisoformat(d["recorded"]) + timedelta(hours=hours)
            d["recorded"] = t.isoformat()
    (dst / "events.ndjson").write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    return at[busiest]


def test_a_source_whose_clock_runs_ahead_raises_no_false_alerts(
    hospitals: tuple[Path, Path, int], tmp_path: Path
) -> None:
    ordered = hospitals[0]
    skewed = tmp_path / "skewed"
    n = clock_ahead(ordered, skewed, hours=8)
    assert n > 1000
    a = evaluate(ordered, DetectionConfig(), workers=2)
    b = evaluate(skewed, DetectionConfig(), workers=2)
    assert a["clock_ahead"] == a["far_behind"] == 0
    assert n * 0.99 <= b["clock_ahead"] <= n and b["far_behind"] == 0  # judged at file time
    assert b["false_alerts"] <= a["false_alerts"]
    assert b["mean_user_recall"] >= a["mean_user_recall"]
    assert b["event_recall"] >= a["event_recall"] - 0.005
    # what it guards against: the stamps taken as they are
    c = evaluate(skewed, DetectionConfig(replay_clock_ahead_s=0), workers=2)
    assert c["false_alerts"] > a["false_alerts"]
    assert c["clock_ahead"] == 0 and c["far_behind"] > 0
