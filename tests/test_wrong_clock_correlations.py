"""A workstation whose clock goes 8 h behind: until its offset is steady its accesses are
taken as stamped, and a user who was at another workstation 8 h earlier looks as if at two
at once. Once the clock is known to be behind, that correlation is withdrawn and its alert
retracted (detectors.cases.Case.withdraw), in replay and in the stream alike; a real
shared account in time stays alerted."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from detectors.alerts import Alert
from detectors.cases import Case
from detectors.engine import Engine
from detectors.rules import load_rules
from emrwatch.context import Context
from emrwatch.events import AccessEvent
from pipeline.replay import collapse, run_engine
from pipeline.stream_metrics import StreamMetrics
from pipeline.stream_processor import AccessProcessor, Record
from pipeline.stream_state import Snapshot
from tests.conftest import synthetic_hospital
from tests.test_stream_processor import FakeOutput, FakeSnapshots

HOUR = 3600.0
START = "2026-03-02T07:00:00+08:00"
WRONG = "ws-7"  # its clock goes 8 h behind at 16:00
HOME, SHARED = "u0001", "u0002"  # at a VPN at 08:00 / really sharing at 09:00


def _access(user: str, at: datetime, n: int, ws: str, patient: str) -> dict[str, Any]:
    return {
        "event_id": f"x-{user}-{n:03d}",
        "ts": at.isoformat(),
        "user_id": user,
        "patient_id": patient,
        "action": "view",
        "resource_type": "Observation",
        "workstation": ws,
        "outcome": "success",
        "source": "emr",
    }


def hospital(ctx: Path) -> tuple[list[dict[str, Any]], list[float]]:
    """Twelve hours of a small hospital, in the order the accesses happened, and the time
    each happened (a file's order; a record's producer time). ``HOME`` works from a VPN
    at 08:00–08:12 and at ws-7 at 16:00–16:12, just after its clock went 8 h behind;
    ``SHARED``'s account is used at ws-2 and a VPN at once at 09:00–09:12."""
    events = synthetic_hospital(ctx, 14400, step_s=3.0, start=START)
    events = [d for d in events if d["user_id"] not in (HOME, SHARED)]
    t0 = datetime.fromisoformat(START)
    extra = []
    for i in range(12):
        # ORTH patients (the users' department): every access explained
        extra.append(_access(HOME, t0 + timedelta(hours=1, minutes=i), i, "vpn-1", "p00001"))
        extra.append(
            _access(HOME, t0 + timedelta(hours=9, minutes=i, seconds=30), 20 + i, WRONG, "p00007")
        )
        for k, ws in enumerate(("ws-2", "vpn-2")):
            at = t0 + timedelta(hours=2, minutes=i, seconds=30 * k)
            extra.append(_access(SHARED, at, 40 + 2 * i + k, ws, "p00013"))
    events = sorted(events + extra, key=lambda d: datetime.fromisoformat(d["ts"]))
    happened = [datetime.fromisoformat(d["ts"]).timestamp() for d in events]
    wrong_from = (t0 + timedelta(hours=9)).timestamp()
    for d, t in zip(events, happened, strict=True):
        if d["workstation"] == WRONG and t >= wrong_from:
            d["ts"] = (datetime.fromisoformat(d["ts"]) - timedelta(hours=8)).isoformat()
    return events, happened


def _of(alerts: list[Alert] | list[dict[str, Any]], user: str) -> list[Any]:
    return [a for a in alerts if (a.user_id if isinstance(a, Alert) else a["user_id"]) == user]


def test_replay_withdraws_what_the_clock_behind_correlated(tmp_path: Path) -> None:
    events, _ = hospital(tmp_path / "ctx")
    eng = Engine(Context.load(tmp_path / "ctx"))
    last = run_engine(eng, (AccessEvent.from_dict(d) for d in events))
    home = _of(list(last.values()), HOME)
    # it had been alerted as at two workstations at once, and is now retracted, saying why
    assert len(home) == 1 and home[0].status == "retracted", home
    assert "ws-7's clock runs 8.0 h behind" in home[0].reason
    assert "credential-sharing" not in home[0].detector
    assert eng.stats().withdrawn == 1
    assert eng.stats().clock_behind_from.get(WRONG, 0) > 0
    final = collapse(last.values())
    assert not _of(final, HOME)
    shared = _of(final, SHARED)
    assert len(shared) == 1 and "credential-sharing" in shared[0].detector


def test_without_the_withdrawal_the_user_would_stay_alerted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same input with nothing withdrawn (as before): the false alert stands. This is
    what the first test guards against."""
    monkeypatch.setattr(Case, "withdraw", lambda self, ids, rules, why: False)
    events, _ = hospital(tmp_path / "ctx")
    eng = Engine(Context.load(tmp_path / "ctx"))
    final = collapse(run_engine(eng, (AccessEvent.from_dict(d) for d in events)).values())
    home = _of(final, HOME)
    assert len(home) == 1 and "credential-sharing" in home[0].detector
    assert eng.stats().withdrawn == 0


def test_the_stream_withdraws_it_too(tmp_path: Path) -> None:
    """Records produced when the accesses happened: the stream tells the clock behind by
    the producer time, and its sinks get the retraction."""
    events, happened = hospital(tmp_path / "ctx")
    recs = [
        Record(0, i, d["user_id"].encode(), orjson.dumps(d), None, happened[i])
        for i, d in enumerate(events)
    ]
    out, metrics = FakeOutput(), StreamMetrics()
    proc = AccessProcessor(Context.load(tmp_path / "ctx"), None, out, metrics=metrics)  # type: ignore[arg-type]
    proc.adopt(0, None)
    withdrawn = sum(proc.process(recs[i : i + 500]).withdrawn for i in range(0, len(recs), 500))
    assert withdrawn == 1
    assert "emrwatch_cases_withdrawn_total 1.0" in generate_latest(metrics.registry).decode()
    home = _of(out.alerts, HOME)
    assert [a["status"] for a in home][-1] == "retracted"
    assert home[0]["status"] == "open" and "credential-sharing" in home[0]["detector"]
    assert "ws-7's clock runs 8.0 h behind" in home[-1]["reason"]
    shared = _of(out.alerts, SHARED)
    assert shared and all(a["status"] == "open" for a in shared)


def test_a_worker_taking_the_partition_over_withdraws_it(tmp_path: Path) -> None:
    """The snapshot, taken after the false alert and before ws-7's offset is steady,
    carries the ids of ws-7's accesses taken as stamped and the open case: the worker
    that takes over retracts the alert the first worker raised."""
    events, happened = hospital(tmp_path / "ctx")
    recs = [
        Record(0, i, d["user_id"].encode(), orjson.dumps(d), None, happened[i])
        for i, d in enumerate(events)
    ]
    split = datetime.fromisoformat(START).timestamp() + 9.25 * HOUR  # 16:15
    half = next(i for i, t in enumerate(happened) if t >= split)
    snaps, out1 = FakeSnapshots(), FakeOutput()
    first = AccessProcessor(Context.load(tmp_path / "ctx"), None, out1, snapshots=snaps)  # type: ignore[arg-type]
    first.adopt(0, None)
    for i in range(0, half, 500):
        first.process(recs[i : min(i + 500, half)])
    assert [a["status"] for a in _of(out1.alerts, HOME)] == ["open"]
    first.snapshot_all()
    offset, data = snaps.written[0]
    out2 = FakeOutput()
    second = AccessProcessor(Context.load(tmp_path / "ctx"), None, out2)  # type: ignore[arg-type]
    second.adopt(0, Snapshot(0, offset, data, "s", "other", half))
    for i in range(half, len(recs), 500):
        second.process(recs[i : i + 500])
    home = _of(out2.alerts, HOME)
    assert home and home[-1]["status"] == "retracted"
    assert home[-1]["alert_id"] == _of(out1.alerts, HOME)[0]["alert_id"]


def test_withdraw_drops_the_burst_around_the_wrong_accesses_only() -> None:
    """A windowed correlation loses its evidence within the rule's span of the wrong
    accesses, keeping an earlier burst of the same rule; per-access findings stay."""
    rules = {r.id: r for r in load_rules()}
    share, sealed = rules["credential-sharing"], rules["sealed-record-touch"]
    case = Case("a", 0.0)

    def ev(k: str, t: float, ws: str) -> tuple[str, float, str, str, str, str, int]:
        return (k, t, "p1", "view", "Observation", ws, 1)

    for i in range(6):  # an earlier burst, in time, an hour before
        case.add(share, ev(f"early{i}", 100.0 + 30 * i, f"ws-{i % 2}"))
    for i in range(6):
        case.add(share, ev(f"late{i}", HOUR + 30 * i, "vpn" if i % 2 else WRONG))
    case.add(sealed, ev("late1", HOUR + 30, WRONG))
    case.fired.add(share.id)
    assert case.withdraw({"late0", "late2"}, rules, "a clock behind")
    assert set(case.evidence[share.id]) == {f"early{i}" for i in range(6)}
    assert set(case.evidence[sealed.id]) == {"late1"}
    assert share.id in case.fired and case.withdrawn == "a clock behind"
    assert not case.withdraw({"late0"}, rules, "again")  # nothing left of it
    assert case.withdraw({"early3"}, rules, "all")
    assert share.id not in case.evidence and share.id not in case.fired
    # documentation retracting a finding later: the case's last change says why, not the clock
    nocare = rules["no-care-relationship"]
    case.add(nocare, ev("n1", 2 * HOUR, "ws-1"))
    assert case.retract({nocare.id}, "p1", HOUR) and case.withdrawn == ""


def test_a_retraction_says_why_or_the_usual_reasons() -> None:
    from detectors.alerts import RETRACTED_WHY, retraction_why

    assert retraction_why("Shared; retracted: a clock behind") == "a clock behind"
    assert retraction_why("retracted: later notes") == "later notes"
    assert retraction_why("No care relationship") == RETRACTED_WHY
    assert retraction_why("x; retracted: ") == RETRACTED_WHY
