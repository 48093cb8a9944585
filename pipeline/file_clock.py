"""A file's own clock: accesses stamped far ahead of the lines around them, or steadily behind.

The stream judges an access stamped after its Kafka record was produced at the record's
time (:mod:`pipeline.stream_processor`). A file has no such time, but it has an order: the
lines around an access tell what time it is there. An access stamped more than
``ahead_s`` after every access the file has shown so far, *and* after the lines that
follow it, comes from a wrong clock (a workstation a day ahead, a source writing local
time as UTC); taken as it is, its user's windows, visits and day counts jump ahead with
it, and the access itself is judged at an hour its user is off shift and its patient
discharged. It is judged at the file's time there instead.

What is *not* taken for a wrong clock:

- the first access after a quiet night, or any jump the file makes (the lines after it
  are as far on);
- an access of a source whose backlog (hours behind) fills the lines around it: it is not
  ahead of what the file has shown before the backlog;
- files in another order (by user, by source): the lines that follow must be of at least
  :data:`MIN_OTHER_USERS` other users within ``ahead_s`` of each other, which a file sorted
  by user, or a stretch of it that jumps about, does not have;
- a run of more than half a window of accesses all stamped alike: the file's time moves
  with them (majority rules, as it must without another clock).

A clock that runs *behind* (a source writing UTC with the local offset, or local time as
UTC west of Greenwich) cannot be told from a late delivery by one access: a source lagging
or delivering in batches stamps its accesses hours behind the file too. What tells them
apart is that a wrong clock is steady (:class:`detectors.lateness.SteadyOffset`): a source
(workstation, else source name) whose accesses have come more than ``ahead_s`` behind the
file's time, by offsets that stay within minutes of each other, for long enough, has a
clock that far behind; its accesses from then on are judged that much later, until one of
them comes in time. A batch (offsets from the batch's length down to 0), a backlog
delivered at once (the file's time does not move) or catching up (offsets shrink), and a
source whose lag wanders are left as they are; a source lagging steadily by hours, to the
minute, would be taken for a wrong clock (replay warns with its offset;
``replay_clock_ahead_s: 0`` takes stamps as they are). Its first accesses, until the
offset is steady, are taken as stamped; once it is, the engine withdraws the correlations
they made (an account "at two workstations at once" with its own accesses hours apart).

The check looks :data:`WINDOW` events ahead, so events come out that many later; their
order is untouched. It is per input stream: replay's partitions judge each on their own
lines, so with several workers an access so judged may be put at a time some seconds
different (identical alerts are promised for inputs with no access so judged).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Protocol

from detectors.lateness import Misstamped, SteadyOffset, steady_offset
from emrwatch.events import AccessEvent

#: events looked at after an access (its confirmation) and the fewest needed to judge it
WINDOW = 128
MIN_FOLLOWING = 16
#: other users the lines that follow must have for the file to tell the time
MIN_OTHER_USERS = 3


class ClockSink(Protocol):
    """Told of each access judged at the file's time (the engine counts them), and of a
    clock behind's earlier accesses, taken as stamped, once its offset is steady (the
    engine forgives their delays and withdraws the correlations they made)."""

    def on_clock_ahead(self, e: AccessEvent, judged_at: float) -> None: ...

    def on_clock_behind(self, e: AccessEvent, judged_at: float) -> None: ...

    def forgive_late(self, m: Misstamped) -> None: ...


def file_clock(
    events: Iterable[AccessEvent], ahead_s: float, sink: ClockSink | None = None
) -> Iterator[AccessEvent]:
    """``events`` in the same order, each access stamped more than ``ahead_s`` ahead of the
    file around it re-stamped to the file's time there (see the module's doc). ``ahead_s``
    of 0 or less passes every event through as it is."""
    if ahead_s <= 0:
        yield from events
        return
    buf: deque[AccessEvent] = deque()
    # the file's time so far: the latest stamp the file has borne out (an access within
    # ahead_s of it, or a jump the lines after it followed); an access that could not be
    # judged passes as it is but moves it no further
    high = float("-inf")
    behind: dict[str, SteadyOffset] = {}  # source → its accesses far behind the file's time
    forgive = sink.forgive_late if sink is not None else None

    def judged(x: AccessEvent) -> AccessEvent:
        nonlocal high
        t = x.t
        if t <= high + ahead_s:
            if t >= high - ahead_s:
                if t > high:
                    high = t
                if behind:
                    behind.pop(x.workstation or x.source, None)  # in time: no wrong clock
                return x
            off = steady_offset(
                behind, x.workstation or x.source, high - t, high, None, forgive, x.event_id
            )
            if off:
                if sink is not None:
                    sink.on_clock_behind(x, t + off)
                return replace(x, t=t + off)
            return x
        if len(buf) < MIN_FOLLOWING:
            return x  # too near the end to tell
        verdict, at = _file_time(x, buf, high, ahead_s)
        if verdict is JUMP:
            high = t
        elif verdict is AHEAD:
            if sink is not None:
                sink.on_clock_ahead(x, at)
            return replace(x, t=at)
        return x

    for e in events:
        buf.append(e)
        if len(buf) > WINDOW:
            yield judged(buf.popleft())
    while buf:
        yield judged(buf.popleft())


#: what the lines after an access far ahead of the file's time say
JUMP, AHEAD, UNSURE = "jump", "ahead", "unsure"


def _file_time(
    x: AccessEvent, following: deque[AccessEvent], high: float, ahead_s: float
) -> tuple[str, float]:
    """For ``x``, stamped more than ``ahead_s`` after the file's time so far (``high``):
    JUMP when the lines after it go on as far (the file jumps on with it); AHEAD and the
    file's time at ``x`` when they are more than ``ahead_s`` behind it; UNSURE when they
    cannot tell the time (too spread out, too few other users)."""
    times = sorted(e.t for e in following)
    n = len(times)
    mid = times[n // 2]
    if x.t <= mid + ahead_s:
        return JUMP, x.t
    # most of what follows within ahead_s of its middle: a file in time order there (a
    # busy source with a wrong clock may be a good part of it)
    lo = bisect_left(times, mid - ahead_s)
    if 2 * (bisect_right(times, mid + ahead_s) - lo) < n:
        return UNSURE, x.t
    others = {e.user_id for e in following}
    others.discard(x.user_id)
    if len(others) < MIN_OTHER_USERS:
        return UNSURE, x.t  # one or two users' lines (a file sorted by user): no file time
    # the line before it, or (the file's first) the earliest of those after it
    return AHEAD, max(high, times[lo])
