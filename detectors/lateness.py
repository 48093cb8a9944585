"""How long the engine waits for accesses that arrive late: as long as the input needs.

Two parts of the engine wait for late accesses. A learned-model visit (a user's accesses to
one chart) is scored once the event time has moved the visit gap plus an *allowance* past
its last access; an access later than that starts a visit of its own, and a visit cut in
two is judged on half its accesses and half its hour. A correlation window (e.g. one
account at two workstations within 10 minutes) takes a late access in its place in time,
but only within the window's span of its newest access. On a log delivered in batches
(each workstation's or server's hour written at once) the event time runs up to an hour
ahead of a user's next accesses: with a fixed 10 minutes the models rated hundreds of cut
visits unusual, and an account used at two workstations, whose accesses arrive in
different batches, never correlated.

:class:`LateAllowance` measures how far behind the newest access the input's accesses
arrive, over the last :data:`MEMORY_S` of event time, and widens the allowance so that all
but :data:`SHARE` of them arrive within it: from ``model_visit_lateness_s`` (the floor) up
to ``late_allowance_max_s`` (the cap), in steps of :data:`STEP_S`. While it is wider than
the floor, the windows keep their accesses that much longer, so a late one still finds its
neighbours. A log in time order never widens it, except that for the first :data:`LEARN_S`
of event time, before anything is measured, it waits the cap: a batched input's first hour
is not cut up either (on a log in order the alerts are the same; learned ones of that hour
come later). The price is time: learned evidence reaches a case that much later in event
time (rule findings on accesses in order do not wait).

:class:`SteadyOffset` tells a late delivery from a clock that runs behind: a source whose
accesses come hours behind the time they reach us *steadily* (to the minute, for half an
hour and more) has a wrong clock, and replay (:mod:`pipeline.file_clock`) and the stream
judge its accesses at that offset. Its accesses before then were taken as stamped; they are
reported once (:class:`Misstamped`): the allowance forgets their delays and the engine
withdraws the correlations they made.

Cost per access: one subtraction and one comparison, and a count for an access that
arrives more than the floor behind; the rest runs at the engine's sweeps (every 5 min of
event time).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: how far back (event time) arrival delays are remembered
MEMORY_S = 24 * 3600.0
#: the share of accesses allowed to arrive later than the allowance
SHARE = 0.001
#: the allowance moves in steps of this many seconds
STEP_S = 300.0
#: for this long (event time) from its first access an engine has not measured its input's
#: delays yet, and waits the cap
LEARN_S = 3600.0
_HOUR = 3600.0

#: a source's clock is steadily behind after this many accesses far behind the time they
#: reached us (a file's time; a record's producer time), by offsets this close together,
#: over this much of that time
STEADY_N = 32
STEADY_TOL_S = 300.0
STEADY_SPAN_S = 1800.0
#: once steady, an offset this much smaller still fits (a file's time lags at night)
QUIET_S = 900.0
#: the ids kept of a source's accesses taken as stamped before its clock was found behind
#: (the latest; 31–76 per source on simulated wrong clocks), in every snapshot of a
#: source far behind: a backlog keeps this many per workstation until it catches up
TAKEN_IDS = 128


class LateAllowance:
    """The allowance in force for one engine (one partition), and what it has seen."""

    __slots__ = (
        "floor",
        "cap",
        "allowance",
        "widest",
        "too_late",
        "latest_lag",
        "_bins",
        "_hours",
        "_hour",
        "_events_at",
        "_since",
    )

    def __init__(self, floor: float, cap: float) -> None:
        self.floor = floor
        self.cap = max(floor, cap)
        #: the allowance in force now (the cap while it learns), and the widest it has been
        #: once learned
        self.allowance = self.cap
        self.widest = floor
        #: accesses that came later than the allowance then in force (their visit may have
        #: been scored already), and the largest delay seen
        self.too_late = 0
        self.latest_lag = 0.0
        n = max(1, math.ceil((self.cap - floor) / STEP_S))
        #: this hour's accesses more than the floor behind, by delay: bin k holds delays in
        #: [floor + k·STEP_S, floor + (k+1)·STEP_S), the last one everything beyond the cap
        self._bins = [0] * n
        #: earlier hours: (hour, accesses in it, its bins)
        self._hours: deque[tuple[int, int, list[int]]] = deque()
        self._hour = -1
        self._events_at = 0  # the engine's access count when this hour began
        #: the event time of the first update; it learns until LEARN_S after it
        self._since = math.nan

    def _bin(self, lag: float) -> int:
        """The bin of a delay of ``lag`` seconds (the last: beyond the cap)."""
        return min(len(self._bins) - 1, max(0, int((lag - self.floor) // STEP_S)))

    def late(self, lag: float) -> None:
        """An access arrived ``lag`` seconds (more than the floor) behind the newest one."""
        self._bins[self._bin(lag)] += 1
        if lag > self.allowance:
            self.too_late += 1
        if lag > self.latest_lag:
            self.latest_lag = lag

    def forgive(self, n: int, lo: float, hi: float) -> None:
        """``n`` accesses counted late by about ``lo``…``hi`` seconds came from a clock
        behind (:class:`SteadyOffset`), now steady and judged at its offset: they say
        nothing of the input's delays, and are taken out of the measure (the latest first),
        so the allowance does not stay widened for a day for them."""
        k0, k1 = self._bin(lo - STEADY_TOL_S), self._bin(hi + STEADY_TOL_S)
        for bins in (self._bins, *(b for *_, b in reversed(self._hours))):
            for k in range(k1, k0 - 1, -1):
                if n <= 0:
                    return
                take = min(n, bins[k])
                bins[k] -= take
                n -= take

    # ----------------------------------------------------------------- snapshots
    def to_obj(self, events: int) -> dict[str, object]:
        """The state as JSON-able data; ``events`` is the engine's access count now."""
        return {
            "allowance": self.allowance,
            "widest": self.widest,
            "too_late": self.too_late,
            "latest_lag": self.latest_lag,
            "bins": list(self._bins),
            "hours": [[h, n, list(b)] for h, n, b in self._hours],
            "hour": self._hour,
            "in_hour": events - self._events_at,
            "since": None if math.isnan(self._since) else self._since,
        }

    def restore(self, o: dict[str, Any], events: int) -> None:
        """Take the state of :meth:`to_obj` (``events``: the restored engine's access
        count). One measured in other steps (floor or cap changed since) is left out."""
        if len(o["bins"]) != len(self._bins) or any(
            len(b) != len(self._bins) for *_, b in o["hours"]
        ):
            return
        self.allowance = min(self.cap, max(self.floor, float(o["allowance"])))
        self.widest = max(self.floor, float(o["widest"]))
        self.too_late = int(o["too_late"])
        self.latest_lag = float(o["latest_lag"])
        self._bins = [int(c) for c in o["bins"]]
        self._hours = deque((int(h), int(n), [int(c) for c in b]) for h, n, b in o["hours"])
        self._hour = int(o["hour"])
        self._events_at = events - int(o["in_hour"])
        since = o.get("since", -math.inf)  # snapshots before the learning hour had learned
        self._since = -math.inf if since is None else float(since)

    @property
    def widened(self) -> float:
        """The allowance when it is wider than the floor, else 0 (how much longer the
        correlation windows keep their accesses)."""
        return self.allowance if self.allowance > self.floor else 0.0

    def update(self, wm: float, events: int) -> float:
        """At a sweep: the event time is ``wm`` and the engine has taken ``events`` accesses.
        Closes the hour when a new one has begun and returns the allowance now in force."""
        h = int(wm // _HOUR)
        if h != self._hour:
            if self._hour >= 0:
                self._hours.append((self._hour, events - self._events_at, self._bins))
                self._bins = [0] * len(self._bins)
            self._hour, self._events_at = h, events
            oldest = h - int(MEMORY_S // _HOUR)
            while self._hours and self._hours[0][0] < oldest:
                self._hours.popleft()
        if math.isnan(self._since):
            self._since = wm
        if wm - self._since < LEARN_S:
            self.allowance = self.cap  # not measured yet: a batched input's first hour
            return self.allowance
        total = events - self._events_at
        bins = list(self._bins)
        for _, n, b in self._hours:
            total += n
            for k, c in enumerate(b):
                if c:
                    bins[k] += c
        allowed = SHARE * total
        above = 0
        k = len(bins)
        while k > 0 and above + bins[k - 1] <= allowed:
            k -= 1
            above += bins[k]
        self.allowance = min(self.cap, self.floor + k * STEP_S)
        if self.allowance > self.widest:
            self.widest = self.allowance
        return self.allowance


@dataclass(frozen=True, slots=True)
class Misstamped:
    """A source's accesses taken as stamped, so counted late and judged at the wrong time,
    before its clock was found steadily ``offset`` seconds behind: ``n`` of them, about
    ``lo``…``hi`` behind the time they reached us, and the ids of the latest
    :data:`TAKEN_IDS` (what the engine withdraws the correlations of)."""

    where: str
    offset: float
    n: int
    lo: float
    hi: float
    event_ids: tuple[str, ...] = ()


class SteadyOffset:
    """One source's run of accesses stamped far behind the time they reached us (the file's
    time; in the stream, their records' producer time), by offsets within
    :data:`STEADY_TOL_S` of each other: a clock that far behind, once steady."""

    __slots__ = (
        "lo",
        "hi",
        "n",
        "since",
        "offsets",
        "steady",
        "taken",
        "taken_lo",
        "taken_hi",
        "taken_ids",
    )

    def __init__(self) -> None:
        self.lo = self.hi = 0.0  # the run's least and greatest offset
        self.n = 0
        self.since = 0.0  # the file's time at the run's first access
        self.offsets: list[float] = []  # the run's first STEADY_N offsets
        self.steady = 0.0  # the offset once steady, else 0
        #: the source's accesses taken as stamped (far behind, no steady offset for them)
        #: since it was last steady, over every run, their least and greatest offset, and
        #: the latest TAKEN_IDS of their ids
        self.taken = 0
        self.taken_lo = self.taken_hi = 0.0
        self.taken_ids: deque[str] = deque(maxlen=TAKEN_IDS)

    def add(self, offset: float, high: float, event_id: str = "") -> float:
        """Record one, the time it reached us being ``high``; returns the steady offset
        (0: not steady, so this access is taken as stamped)."""
        if self.steady and self.steady - QUIET_S <= offset <= self.steady + STEADY_TOL_S:
            # a quiet file's time lags the hour, so a steady clock's offsets look smaller
            self.n += 1
            return self.steady
        if self.n and min(self.lo, offset) >= max(self.hi, offset) - STEADY_TOL_S:
            self.lo, self.hi = min(self.lo, offset), max(self.hi, offset)
            self.n += 1
        else:  # the first, or it moved: a wrong clock does not, a lag does
            self.lo = self.hi = offset
            self.n, self.since, self.offsets, self.steady = 1, high, [], 0.0
        if len(self.offsets) < STEADY_N:
            self.offsets.append(offset)
        if not self.steady and self.n >= STEADY_N and high - self.since >= STEADY_SPAN_S:
            self.steady = sorted(self.offsets)[len(self.offsets) // 2]
        if self.steady:
            return self.steady  # judged at the offset: not taken as stamped
        if self.taken:
            self.taken_lo, self.taken_hi = min(self.taken_lo, offset), max(self.taken_hi, offset)
        else:
            self.taken_lo = self.taken_hi = offset
        self.taken += 1
        if event_id:
            self.taken_ids.append(event_id)
        return 0.0

    def forgiven(self, where: str) -> Misstamped:
        """Once steady: the accesses of ``where`` taken as stamped before; they are
        forgotten here."""
        out = Misstamped(
            where, self.steady, self.taken, self.taken_lo, self.taken_hi, tuple(self.taken_ids)
        )
        self.taken = 0
        self.taken_ids.clear()
        return out

    def to_obj(self) -> list[Any]:
        return [
            self.lo,
            self.hi,
            self.n,
            self.since,
            list(self.offsets),
            self.steady,
            [self.taken, self.taken_lo, self.taken_hi, list(self.taken_ids)],
        ]

    @classmethod
    def from_obj(cls, o: list[Any]) -> SteadyOffset:
        run = cls()
        run.lo, run.hi, run.n, run.since = float(o[0]), float(o[1]), int(o[2]), float(o[3])
        run.offsets, run.steady = [float(x) for x in o[4]], float(o[5])
        if len(o) > 6:  # snapshots before these have none
            taken = o[6]
            run.taken, run.taken_lo, run.taken_hi = int(taken[0]), float(taken[1]), float(taken[2])
            if len(taken) > 3:
                run.taken_ids.extend(str(x) for x in taken[3])
        return run


def steady_offset(
    runs: dict[str, SteadyOffset],
    where: str,
    offset: float,
    at: float,
    limit: int | None = None,
    forgive: Callable[[Misstamped], None] | None = None,
    event_id: str = "",
) -> float:
    """An access of ``where`` (workstation, else source) stamped ``offset`` seconds before
    the time ``at`` it reached us: added to the source's run in ``runs``, and that run's
    steady offset returned (0: not steady, so far a late delivery). With ``limit``, no
    more sources than that are followed. When the run becomes steady, ``forgive`` is told
    of the source's accesses taken as stamped before (:class:`Misstamped`): the late
    allowance forgets their delays (:meth:`LateAllowance.forgive`) and the engine
    withdraws the correlations they made. Replay's file clock and the stream share it."""
    run = runs.get(where)
    if run is None:
        if limit is not None and len(runs) >= limit:
            return 0.0
        run = runs[where] = SteadyOffset()
    was = run.steady
    off = run.add(offset, at, event_id)
    if off and not was:
        m = run.forgiven(where)
        if forgive is not None and m.n > 0:
            forgive(m)
    return off
