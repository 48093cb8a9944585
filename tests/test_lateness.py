"""The learned models' visit lateness follows the input's delays (detectors.lateness)."""

from __future__ import annotations

import random

import orjson
import pytest

from detectors.config import ConfigError, DetectionConfig
from detectors.lateness import (
    MEMORY_S,
    SHARE,
    STEADY_N,
    STEADY_TOL_S,
    STEP_S,
    TAKEN_IDS,
    LateAllowance,
    Misstamped,
    SteadyOffset,
    steady_offset,
)

FLOOR, CAP = 600.0, 7200.0
H = 1_000 * 3600.0  # the start of some hour


def feed(lt: LateAllowance, hours: float, per_hour: int, lag: object, start: float = H) -> int:
    """``per_hour`` accesses an hour for ``hours`` hours of event time, each arriving
    ``lag()`` seconds behind the newest (0: in order), with a sweep every 5 minutes as the
    engine makes them. Returns the accesses fed."""
    n = int(hours * per_hour)
    step = 3600.0 / per_hour
    next_sweep = start
    for i in range(n):
        wm = start + i * step
        if wm >= next_sweep:
            lt.update(wm, i)
            next_sweep = wm + 300.0
        d = lag()  # type: ignore[operator]
        if d > lt.floor:
            lt.late(d)
    lt.update(start + n * step, n)
    return n


def test_a_log_in_time_order_keeps_the_floor() -> None:
    lt = LateAllowance(FLOOR, CAP)
    feed(lt, 30, 2000, lambda: 0.0)
    assert lt.allowance == lt.widest == FLOOR and lt.too_late == 0


def test_a_log_in_hourly_batches_widens_it_to_the_hour() -> None:
    """Half the accesses arrive up to an hour behind (each workstation's hour written at
    once): the lateness takes them all, rounded up to its step, and no more."""
    rng = random.Random(3)
    lt = LateAllowance(FLOOR, CAP)
    feed(lt, 6, 2000, lambda: rng.uniform(0, 3590) if rng.random() < 0.5 else 0.0)
    assert lt.allowance == 3600.0
    assert 3500 < lt.latest_lag <= 3590
    # the first hour waited the cap while it measured: none came too late
    assert lt.too_late == 0


def test_it_waits_the_cap_while_it_learns() -> None:
    """For its first hour of event time it has not measured the input: it waits the cap
    (a batched log's first hour is not cut up), then the measured delay. The wait while
    learning is not reported as a widening."""
    lt = LateAllowance(FLOOR, CAP)
    assert lt.allowance == CAP and lt.widened == CAP
    feed(lt, 0.9, 2000, lambda: 0.0)
    assert lt.allowance == CAP and lt.widest == FLOOR
    feed(lt, 0.2, 2000, lambda: 0.0, start=H + 0.9 * 3600)
    assert lt.allowance == FLOOR and lt.widened == 0.0 and lt.widest == FLOOR


@pytest.mark.parametrize("learned", [False, True])
def test_a_snapshot_keeps_whether_it_has_learned(learned: bool) -> None:
    lt = LateAllowance(FLOOR, CAP)
    feed(lt, 1.5 if learned else 0.5, 2000, lambda: 0.0)
    again = LateAllowance(FLOOR, CAP)
    again.restore(lt.to_obj(3000), 3000)
    again.update(H + (1.6 if learned else 0.55) * 3600, 3100)
    assert again.allowance == (FLOOR if learned else CAP)
    assert again.widest == FLOOR


def test_a_snapshot_from_before_the_learning_hour_counts_as_learned() -> None:
    lt = LateAllowance(FLOOR, CAP)
    feed(lt, 0.5, 2000, lambda: 0.0)
    o = lt.to_obj(1000)
    del o["since"]
    o["allowance"] = FLOOR
    again = LateAllowance(FLOOR, CAP)
    again.restore(o, 1000)
    again.update(H + 0.6 * 3600, 1100)
    assert again.allowance == FLOOR


def test_a_few_stragglers_do_not_widen_it() -> None:
    """Fewer than SHARE of the accesses far behind: the rest are not held up for them."""
    rng = random.Random(4)
    lt = LateAllowance(FLOOR, CAP)
    feed(lt, 10, 2000, lambda: 5000.0 if rng.random() < SHARE / 3 else 0.0)
    assert lt.allowance == FLOOR
    assert lt.too_late > 0  # they are counted as too late all the same


def test_it_stops_at_the_cap_and_forgets_after_a_day() -> None:
    lt = LateAllowance(FLOOR, CAP)
    feed(lt, 3, 2000, lambda: 6 * 3600.0)  # a backlog six hours behind
    assert lt.allowance == CAP
    feed(lt, MEMORY_S / 3600 + 2, 2000, lambda: 0.0, start=H + 3 * 3600)
    assert lt.allowance == FLOOR and lt.widest == CAP


def test_the_steps_fit_the_delays() -> None:
    """Delays of at most 25 min beyond the floor need 30 min beyond it (steps of 5)."""
    lt = LateAllowance(FLOOR, CAP)
    feed(lt, 2, 2000, lambda: FLOOR + 25 * 60 - 1)
    assert lt.allowance == FLOOR + 5 * STEP_S


@pytest.mark.parametrize("key", ["model_visit_lateness_s", "late_allowance_max_s"])
def test_negative_lateness_is_a_config_error(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DetectionConfig.from_dict({key: -1})


def test_a_clock_behind_once_steady_is_forgiven() -> None:
    """A workstation 5 h behind: its accesses before its offset was steady were counted
    late and widened the allowance to the cap; forgiven, they no longer hold it there,
    while a real delay of other accesses (50 min) still counts."""
    lt = LateAllowance(FLOOR, CAP)
    feed(lt, 2, 2000, lambda: 0.0)  # learned: a log in order
    assert lt.allowance == FLOOR
    rng = random.Random(5)
    lags = iter([5 * 3600.0 + rng.uniform(-30, 30) for _ in range(300)] + [3000.0] * 100)
    feed(lt, 0.25, 1600, lambda: next(lags, 0.0), start=H + 2 * 3600)
    assert lt.allowance == CAP
    lt.forgive(300, 5 * 3600.0 - 30, 5 * 3600.0 + 30)
    lt.update(H + 2.3 * 3600, 8000)
    assert lt.allowance == FLOOR + 9 * STEP_S  # the 50 minutes, to the step above them
    lt.forgive(300, 5 * 3600.0 - 30, 5 * 3600.0 + 30)  # nothing more there: no change
    lt.update(H + 2.35 * 3600, 8100)
    assert lt.allowance == FLOOR + 9 * STEP_S


def test_a_steady_offset_run_goes_with_the_snapshot() -> None:
    """What the run has taken as stamped is kept, so a worker that takes the partition
    over forgives them when the offset is steady; a snapshot from before has none."""
    run = SteadyOffset()
    for i in range(10):
        off = steady_offset({"ws": run}, "ws", 8 * 3600.0 + i, 1000.0 + 60 * i, event_id=f"e{i}")
        assert off == 0.0
    again = SteadyOffset.from_obj(orjson.loads(orjson.dumps(run.to_obj())))
    assert (again.taken, again.taken_lo, again.taken_hi) == (10, 8 * 3600.0, 8 * 3600.0 + 9)
    assert list(again.taken_ids) == [f"e{i}" for i in range(10)]
    forgiven: list[Misstamped] = []
    runs = {"ws": again}
    for i in range(10, 40):
        steady_offset(
            runs, "ws", 8 * 3600.0 + i % 10, 1000.0 + 60 * i, None, forgiven.append, f"e{i}"
        )
    # the access that made it steady is judged at the offset: not among them
    assert forgiven == [
        Misstamped(
            "ws",
            8 * 3600.0 + 4,  # the median of the run's offsets
            STEADY_N - 1,
            8 * 3600.0,
            8 * 3600.0 + 9,
            tuple(f"e{i}" for i in range(STEADY_N - 1)),
        )
    ]
    old = SteadyOffset.from_obj(run.to_obj()[:6])
    assert old.taken == 0 and old.n == run.n
    no_ids = run.to_obj()
    no_ids[6] = no_ids[6][:3]  # a snapshot before the ids were kept
    assert not SteadyOffset.from_obj(no_ids).taken_ids


def test_a_steady_offset_keeps_a_bounded_number_of_ids() -> None:
    """A source far behind for long (a backlog that never turns steady) keeps only the
    latest TAKEN_IDS ids (those before the offset turns steady), while it counts them all."""
    run = SteadyOffset()
    for i in range(TAKEN_IDS + 50):  # offsets that wander: never steady
        assert run.add(3600.0 + (i % 2) * 2 * STEADY_TOL_S, 60.0 * i, f"e{i}") == 0.0
    assert run.taken == TAKEN_IDS + 50
    assert list(run.taken_ids) == [f"e{i}" for i in range(50, TAKEN_IDS + 50)]
