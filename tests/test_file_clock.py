"""A file's own clock (pipeline.file_clock): an access stamped far ahead of the lines around
it is judged at the file's time there; jumps, backlogs and files in other orders are not."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from detectors.config import ConfigError, DetectionConfig
from detectors.lateness import STEADY_N, STEADY_SPAN_S, STEADY_TOL_S, Misstamped
from emrwatch.events import AccessEvent
from pipeline.file_clock import MIN_FOLLOWING, WINDOW, file_clock

HOUR = 3600.0
DAY = 86400.0
T0 = 1_772_409_600.0  # 2026-03-02 08:00 +08:00


def access(user: str, t: float, n: int, ws: str = "ws-1") -> AccessEvent:
    return AccessEvent.from_dict(
        {
            "event_id": f"e{n:06d}",
            "ts": datetime.fromtimestamp(t, UTC).isoformat(),
            "user_id": user,
            "patient_id": f"P{n % 50}",
            "action": "view",
            "resource_type": "Observation",
            "workstation": ws,
            "outcome": "success",
        },
        t=t,
    )


def busy(n: int, start: float = T0, step: float = 6.0, users: int = 20) -> list[AccessEvent]:
    """``n`` accesses of ``users`` users, one every ``step`` seconds, in time order."""
    return [access(f"u{i % users:02d}", start + i * step, i) for i in range(n)]


class Sink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []
        self.behind: list[tuple[str, float]] = []
        self.forgiven: list[Misstamped] = []

    def on_clock_ahead(self, e: AccessEvent, judged_at: float) -> None:
        self.seen.append((e.event_id, judged_at))

    def on_clock_behind(self, e: AccessEvent, judged_at: float) -> None:
        self.behind.append((e.event_id, judged_at))

    def forgive_late(self, m: Misstamped) -> None:
        self.forgiven.append(m)


def run(events: list[AccessEvent], ahead_s: float = HOUR) -> tuple[list[AccessEvent], Sink]:
    sink = Sink()
    out = list(file_clock(events, ahead_s, sink))
    assert [e.event_id for e in out] == [e.event_id for e in events]  # order and count kept
    return out, sink


def moved(before: list[AccessEvent], after: list[AccessEvent]) -> dict[str, float]:
    return {a.event_id: b.t for a, b in zip(before, after, strict=True) if a.t != b.t}


@pytest.mark.parametrize("at", [0, 300, 999])  # the file's first line, its middle, its end
def test_an_access_a_day_ahead_is_judged_at_the_files_time(at: int) -> None:
    events = busy(1000)
    wrong = events[at]
    events[at] = access(wrong.user_id, wrong.t + DAY, at)
    out, sink = run(events)
    if at == 999:  # nothing after it to tell the time by: taken as it is
        assert not moved(events, out) and not sink.seen
        return
    got = moved(events, out)
    assert list(got) == [wrong.event_id]
    assert abs(got[wrong.event_id] - wrong.t) < 10 * 60  # about when the file was there
    assert sink.seen == [(wrong.event_id, got[wrong.event_id])]


def test_a_wrong_clock_on_one_source_among_many() -> None:
    # every seventh access comes from a workstation writing local time as UTC (+8 h)
    events = busy(3000)
    events = [
        access(e.user_id, e.t + 8 * HOUR, i) if i % 7 == 3 else e for i, e in enumerate(events)
    ]
    out, sink = run(events)
    got = moved(events, out)
    assert set(got) == {e.event_id for i, e in enumerate(events) if i % 7 == 3 and i < 3000 - 16}
    assert all(
        abs(got[e.event_id] - (e.t - 8 * HOUR)) < 15 * 60 for e in events if e.event_id in got
    )


def test_the_file_jumping_on_is_not_a_wrong_clock() -> None:
    # a quiet night: the morning's first access is hours after the last one, and so are
    # the accesses after it
    events = busy(400) + busy(400, start=T0 + 10 * HOUR)
    events = [access(e.user_id, e.t, i) for i, e in enumerate(events)]
    out, sink = run(events)
    assert not moved(events, out) and not sink.seen


def test_live_accesses_among_a_sources_backlog_are_not_ahead() -> None:
    # a source six hours behind delivers its backlog; the live accesses of the others come
    # in among it, hours after the lines around them but not after the file's time
    live = busy(300)
    now = live[-1].t
    backlog = [access(f"b{i % 10}", now - 6 * HOUR + i * 20, 1000 + i) for i in range(600)]
    mixed: list[AccessEvent] = []
    for i, b in enumerate(backlog):
        mixed.append(b)
        if i % 4 == 0:
            mixed.append(access("live", now + i * 2, 5000 + i))
    events = live + mixed
    out, sink = run(events)
    assert not moved(events, out) and not sink.seen


def test_a_file_sorted_by_user_is_taken_as_it_is() -> None:
    rng = random.Random(3)
    events = [
        access(f"u{u:02d}", T0 + d * DAY + rng.uniform(0, 8 * HOUR), u * 1000 + k)
        for u in range(12)
        for d in range(rng.randrange(1, 7), 7)
        for k in range(rng.randrange(1, 30))
    ]
    events.sort(key=lambda e: (e.user_id, e.t))
    out, sink = run(events)
    assert not moved(events, out) and not sink.seen


def test_a_run_of_accesses_stamped_alike_moves_the_files_time() -> None:
    # more than half the window all a day on: without another clock, the file's time is
    # theirs (majority rules), and they pass as they are
    events = busy(1000)
    events[500 : 500 + WINDOW] = [
        access(e.user_id, e.t + DAY, 500 + i) for i, e in enumerate(events[500 : 500 + WINDOW])
    ]
    out, sink = run(events)
    assert not moved(events, out) and not sink.seen


def test_too_few_lines_or_users_after_it_cannot_tell_the_time() -> None:
    two_users = busy(200, users=2)
    two_users[50] = access(two_users[50].user_id, two_users[50].t + DAY, 50)
    out, sink = run(two_users)
    assert not moved(two_users, out) and not sink.seen
    short = busy(MIN_FOLLOWING)
    short[0] = access(short[0].user_id, short[0].t + DAY, 0)
    out, sink = run(short)
    assert not moved(short, out) and not sink.seen


def test_zero_takes_every_stamp_as_it_is() -> None:
    events = busy(300)
    events[100] = access(events[100].user_id, events[100].t + DAY, 100)
    out, sink = run(events, ahead_s=0)
    assert out == events and not sink.seen


@pytest.mark.parametrize("key", ["replay_clock_ahead_s", "max_clock_ahead_s", "max_clock_behind_s"])
def test_a_negative_clock_tolerance_is_a_config_error(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DetectionConfig.from_dict({key: -60})
    assert getattr(DetectionConfig.from_dict({key: 0}), key) == 0


def test_partitions_add_up_what_they_judged_and_where_from() -> None:
    from detectors.engine import CLOCK_AHEAD_IDS, EngineStats

    a = EngineStats(clock_ahead=2, clock_ahead_ids=["e1", "e2"], clock_ahead_from={"ws-a": 2})
    ids = [f"f{i}" for i in range(CLOCK_AHEAD_IDS)]
    b = EngineStats(clock_ahead=6, clock_ahead_ids=ids, clock_ahead_from={"ws-a": 1, "ws-b": 5})
    both = a + b
    assert both.clock_ahead == 8 and both.clock_ahead_from == {"ws-a": 3, "ws-b": 5}
    assert both.clock_ahead_ids == ["e1", "e2", *ids][:CLOCK_AHEAD_IDS]
    c = EngineStats(clock_behind_from={"ws-tz": 3}, clock_behind_by={"ws-tz": 8 * HOUR})
    d = EngineStats(clock_behind_from={"ws-tz": 4, "ws-b": 1}, clock_behind_by={"ws-b": HOUR})
    assert (c + d).clock_behind == 8 and (c + d).clock_behind_from == {"ws-tz": 7, "ws-b": 1}
    assert (c + d).clock_behind_by == {"ws-tz": 8 * HOUR, "ws-b": HOUR}


def with_source(events: list[AccessEvent], every: int, ws: str, shift: object) -> list[AccessEvent]:
    """Every ``every``-th access from ``ws``, stamped ``shift(i, t)`` seconds off."""
    return [
        access(e.user_id, e.t + shift(i, e.t), i, ws) if i % every == 3 else e  # type: ignore[operator]
        for i, e in enumerate(events)
    ]


@pytest.mark.parametrize("hours", [8, 5, 1.5])  # UTC as +08:00; New York local as UTC
def test_a_clock_steadily_behind_is_judged_that_much_later(hours: float) -> None:
    """A workstation whose accesses all come ``hours`` behind the file, steadily: from its
    STEADY_N-th on (once the file has moved on STEADY_SPAN_S), each is judged that much
    later; the first ones pass as stamped."""
    events = with_source(busy(6000), 7, "ws-tz", lambda i, t: -hours * HOUR)
    out, sink = run(events)
    got = moved(events, out)
    at = [i for i, e in enumerate(events) if e.workstation == "ws-tz"]
    wrong = [events[i] for i in at]
    # the file's time at each: the line before it (in time)
    first = next(
        k
        for k in range(STEADY_N - 1, len(at))
        if events[at[k] - 1].t - events[at[0] - 1].t >= STEADY_SPAN_S
    )
    assert set(got) == {e.event_id for e in wrong[first:]}
    assert all(abs(got[e.event_id] - (e.t + hours * HOUR)) < 60 for e in wrong[first:])
    assert sink.behind == [(e.event_id, got[e.event_id]) for e in wrong[first:]]
    assert not sink.seen
    # the ones before, taken as stamped, are reported once: their number, offsets and ids
    # (the late allowance forgives them, the engine withdraws what they correlated)
    assert len(sink.forgiven) == 1
    m = sink.forgiven[0]
    assert m.where == "ws-tz" and abs(m.offset - hours * HOUR) < 60
    assert m.n == first and abs(m.lo - hours * HOUR) < 60 and abs(m.hi - hours * HOUR) < 60
    assert m.event_ids == tuple(e.event_id for e in wrong[:first])


def test_a_source_writing_its_hours_in_batches_is_not_a_wrong_clock() -> None:
    """Each hour of ws-b's accesses comes after the hour's others: offsets from an hour
    down to nothing, never steady."""
    events = with_source(busy(6000, step=3.0), 5, "ws-b", lambda i, t: 0.0)
    batched = sorted(events, key=lambda e: (int(e.t // HOUR), e.workstation == "ws-b", e.t))
    batched = [access(e.user_id, e.t, i, e.workstation) for i, e in enumerate(batched)]
    # two-hour batches: offsets up to two hours, beyond ahead_s
    two = sorted(events, key=lambda e: (int(e.t // (2 * HOUR)), e.workstation == "ws-b", e.t))
    two = [access(e.user_id, e.t, i, e.workstation) for i, e in enumerate(two)]
    for order in (batched, two):
        out, sink = run(order)
        assert not moved(order, out) and not sink.behind and not sink.seen and not sink.forgiven


def test_a_backlog_or_a_wandering_lag_is_not_a_wrong_clock() -> None:
    # six hours of ws-b delivered at once: the file's time stands still meanwhile
    live = busy(1000)
    now = live[-1].t
    backlog = [access(f"b{i % 10}", now - 6 * HOUR + i * 20, 1000 + i, "ws-b") for i in range(900)]
    events = live + backlog + busy(500, start=now + 10)
    out, sink = run(events)
    assert not moved(events, out) and not sink.behind and not sink.forgiven
    # ws-b catching up: six hours behind, then less and less, among the live accesses
    catching = with_source(busy(6000), 4, "ws-b", lambda i, t: -6 * HOUR * (1 - i / 6000))
    out, sink = run(catching)
    assert not moved(catching, out) and not sink.behind
    # a lag that wanders between two and three hours
    rng = random.Random(5)
    wandering = with_source(busy(6000), 4, "ws-b", lambda i, t: -rng.uniform(2, 3) * HOUR)
    out, sink = run(wandering)
    assert not moved(wandering, out) and not sink.behind
    assert 2 * STEADY_TOL_S < HOUR  # "wandering" is wider than the tolerance


def test_an_access_in_time_from_the_source_ends_the_wrong_clock() -> None:
    # ws-tz runs 8 h behind, then its clock is fixed: from the first access in time on,
    # nothing more is moved
    fixed_at = 4000
    events = with_source(busy(6000), 7, "ws-tz", lambda i, t: -8 * HOUR if i < fixed_at else 0.0)
    out, sink = run(events)
    got = moved(events, out)
    assert got and all(int(e[1:]) < fixed_at for e in got)
    assert sink.behind
