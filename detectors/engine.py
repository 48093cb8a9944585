"""The detection engine: explain, match rules, build cases, emit alerts.

It is plain Python with no I/O, so the same object runs in ``emrwatch replay``, in the
Faust workers and in notebooks. State is per user (one user's events always reach one
engine: the stream is keyed by user), and can be snapshotted for crash recovery.

>>> from emrwatch.context import Context
>>> eng = Engine(Context())
>>> eng.process_dict({"event_id": "e1", "ts": "2026-03-02T09:00:00+08:00",
...                   "user_id": "ghost", "patient_id": "p1", "action": "view"})[0].detector
['account-outside-validity']
"""

from __future__ import annotations

import logging
import math
import statistics
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson

from detectors.alerts import Alert
from detectors.cases import (
    LEARNED_RULE,
    LEARNED_RULE_ID,
    AlertBuilder,
    Case,
    Evidence,
    new_case,
)
from detectors.config import DetectionConfig
from detectors.explain import DOCUMENTED, EMERGENCY, GRANT, EncounterState, Explainer
from detectors.lateness import LateAllowance, Misstamped, SteadyOffset
from detectors.rules import FACT_FIELDS, Aggregate, Rule, compile_matcher, load_rules
from emrwatch.context import KNOWN_ROLES, Context, Grant, Staff
from emrwatch.events import EXFIL_ACTIONS, WRITE_ACTIONS, AccessEvent

# imported here, not lazily: river's import takes a second, and replay workers fork from a
# parent that has already paid it
from models.features import FEATURES, VISIT_GAP_S
from models.runtime import ModelScorer, UserModels, VisitScore

SNAPSHOT_VERSION = 1
#: how often (seconds of event time) the engine closes visits its watermark has passed
SWEEP_EVERY_S = 300.0


@dataclass
class EngineStats:
    """What an engine saw; engines over different partitions merge with ``+``."""

    events: int = 0
    explained: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    findings: dict[str, int] = field(default_factory=dict)
    suppressed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    unexplained_ids: set[str] = field(default_factory=set)
    #: accesses more than :data:`FAR_BEHIND_S` behind a newer one of the same user: a source
    #: far behind the others, or a wrong clock that stamped that newer one ahead
    far_behind: int = 0
    #: accesses a replay judged at the file's time, stamped far ahead of it
    #: (:mod:`pipeline.file_clock`), and the first few of their event ids
    clock_ahead: int = 0
    clock_ahead_ids: list[str] = field(default_factory=list)
    #: where they came from: workstation (or source, when the access names none) → count
    clock_ahead_from: dict[str, int] = field(default_factory=dict)
    #: accesses a replay judged later, from a source whose clock is steadily behind the
    #: file's: source → count, and source → by how much (seconds)
    clock_behind_from: dict[str, int] = field(default_factory=dict)
    clock_behind_by: dict[str, float] = field(default_factory=dict)
    #: the widest the late allowance grew past ``model_visit_lateness_s`` to fit the
    #: input's delays (:mod:`detectors.lateness`; 0: it never did), the largest delay
    #: behind the newest access seen, and the accesses that came later than the allowance
    #: then in force (their visit may have been scored without them)
    late_allowance: float = 0.0
    latest_lag: float = 0.0
    too_late: int = 0
    #: cases whose correlations were withdrawn: accesses of a clock behind, taken as
    #: stamped before its offset was steady, had made them (Engine.forgive_late)
    withdrawn: int = 0

    @property
    def explained_share(self) -> float:
        return self.explained / self.events if self.events else 0.0

    @property
    def clock_behind(self) -> int:
        return sum(self.clock_behind_from.values())

    def __add__(self, other: EngineStats) -> EngineStats:
        def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}

        sup = {k: list(v) for k, v in self.suppressed.items()}
        for k, v in other.suppressed.items():
            sup.setdefault(k, []).extend(v)
        return EngineStats(
            self.events + other.events,
            self.explained + other.explained,
            add(self.reasons, other.reasons),
            add(self.findings, other.findings),
            sup,
            self.unexplained_ids | other.unexplained_ids,
            self.far_behind + other.far_behind,
            self.clock_ahead + other.clock_ahead,
            (self.clock_ahead_ids + other.clock_ahead_ids)[:CLOCK_AHEAD_IDS],
            add(self.clock_ahead_from, other.clock_ahead_from),
            add(self.clock_behind_from, other.clock_behind_from),
            {**self.clock_behind_by, **other.clock_behind_by},
            max(self.late_allowance, other.late_allowance),
            max(self.latest_lag, other.latest_lag),
            self.too_late + other.too_late,
            self.withdrawn + other.withdrawn,
        )


#: how many event ids of accesses judged at the file's time EngineStats keeps
CLOCK_AHEAD_IDS = 5

_time = itemgetter(0)  # an entry's event time


class Window:
    """One correlation rule's event-time window for one user.

    ``distinct`` False skips the per-key counts, for windows that never count distinct keys
    (the engine's ``switches`` windows). An ``events`` window's keys are event ids, so an
    access delivered twice counts once."""

    __slots__ = ("entries", "distinct", "switches", "_track", "old")

    def __init__(self, distinct: bool = True) -> None:
        # (t, key, switched, explained, evidence)
        self.entries: deque[tuple[float, str, bool, bool, Evidence]] = deque()
        #: accesses older than the span, kept ``grace`` longer while the input's accesses
        #: arrive that late (detectors.lateness), for late ones to correlate with
        self.old: deque[tuple[float, str, bool, bool, Evidence]] = deque()
        self.distinct: dict[str, int] = {}
        self.switches = 0
        self._track = distinct

    @classmethod
    def counting(cls, kind: str) -> Window:
        """A window for an aggregate's ``count`` kind. An ``events`` window counts distinct
        event ids: a record delivered twice (a connector re-sending after a crash) is one
        access."""
        return cls(kind != "switches")

    def push(
        self,
        t: float,
        key: str,
        explained: bool,
        ev: Evidence,
        span: float,
        grace: float = 0.0,
        gte: int = 0,
    ) -> bool | list[tuple[float, str, bool, bool, Evidence]]:
        """Add an access at event time ``t``: True, and the window is the span up to its
        newest access. One that arrives late (behind the newest) is put in its place in
        time. One older than the span behind the newest is too late for the window: False;
        unless ``grace`` (the input's measured delay) keeps older accesses, then it is
        correlated with those around it: the accesses of the span around it that count at
        least ``gte``, or False."""
        entries = self.entries
        if entries and t < entries[-1][0]:
            if t < entries[-1][0] - span:
                return self._correlate_old(t, key, explained, ev, span, grace, gte)
            return self._insert_late(t, key, explained, ev, span)
        switched = bool(entries) and entries[-1][1] != key
        entries.append((t, key, switched, explained, ev))
        track = self._track
        if track:
            distinct = self.distinct
            distinct[key] = distinct.get(key, 0) + 1
        if switched:
            self.switches += 1
        horizon = t - span
        if entries[0][0] >= horizon:
            return True
        old = self.old
        while entries and entries[0][0] < horizon:
            x = entries.popleft()
            if grace:
                old.append(x)
            _, k, sw, _, _ = x
            if sw:
                self.switches -= 1
            if track:
                n = self.distinct[k] - 1
                if n:
                    self.distinct[k] = n
                else:
                    del self.distinct[k]
            if entries and entries[0][2]:
                # the new head's predecessor left the window: its switch no longer counts
                head = entries[0]
                entries[0] = (head[0], head[1], False, head[3], head[4])
                self.switches -= 1
        if old:
            horizon -= grace
            while old and old[0][0] < horizon:
                old.popleft()
        return True

    def _correlate_old(
        self, t: float, key: str, explained: bool, ev: Evidence, span: float, grace: float, gte: int
    ) -> bool | list[tuple[float, str, bool, bool, Evidence]]:
        """A late access older than the span: kept with the older accesses, and the window of
        the span around it that counts most, if it counts at least ``gte``."""
        entries, old = self.entries, self.old
        if not grace or t < entries[-1][0] - span - grace:
            return False
        old.insert(bisect_right(old, t, key=_time), (t, key, False, explained, ev))
        # the accesses within the span on either side, in time order (``old`` comes first)
        seq = [x for x in old if x[0] >= t - span]
        for x in entries:
            if x[0] > t + span:
                break
            seq.append(x)
        best, best_n = (0, -1), 0
        n = len(seq)
        if not self._track:  # switches between consecutive accesses
            last = 0  # the window's last access
            sums = [0] * n
            for i in range(1, n):
                sums[i] = sums[i - 1] + (seq[i][1] != seq[i - 1][1])
            for first in range(n):
                if seq[first][0] > t:
                    break
                while last + 1 < n and seq[last + 1][0] <= seq[first][0] + span:
                    last += 1
                if sums[last] - sums[first] > best_n:
                    best, best_n = (first, last), sums[last] - sums[first]
        else:  # distinct keys
            counts: dict[str, int] = {}
            last = -1  # the window's last access, counted in ``counts``
            for first in range(n):
                if seq[first][0] > t:
                    break
                while last + 1 < n and seq[last + 1][0] <= seq[first][0] + span:
                    last += 1
                    counts[seq[last][1]] = counts.get(seq[last][1], 0) + 1
                if len(counts) > best_n:
                    best, best_n = (first, last), len(counts)
                k = seq[first][1]
                counts[k] -= 1
                if not counts[k]:
                    del counts[k]
        if best_n < gte or best_n == 0:
            return False
        return seq[best[0] : best[1] + 1]

    def _insert_late(self, t: float, key: str, explained: bool, ev: Evidence, span: float) -> bool:
        """A late access, in its place in time among the entries (after those of the same
        time), with the switches around it recounted. Nothing leaves the window: its
        newest time has not moved."""
        entries = self.entries
        if t < entries[-1][0] - span:
            return False
        i = bisect_right(entries, t, key=_time)  # before the first one later than t
        # the new head's predecessor is outside the window: no switch
        switched = i > 0 and entries[i - 1][1] != key
        after = entries[i]
        after_switched = after[1] != key
        self.switches += switched + after_switched - after[2]
        entries[i] = (after[0], after[1], after_switched, after[3], after[4])
        entries.insert(i, (t, key, switched, explained, ev))
        if self._track:
            self.distinct[key] = self.distinct.get(key, 0) + 1
        return True

    def count(self, kind: str) -> int:
        if kind == "switches":
            return self.switches
        return len(self.distinct)


class DayCounter:
    """Distinct patients per local day, against the user's own history of days.

    ``unexplained_only``: the count (today's and each history day's) is of the patients no
    reason explained; a day the user worked with none of them enters the history as 0."""

    __slots__ = (
        "day",
        "patients",
        "unexplained",
        "unexplained_patients",
        "history",
        "fired",
        "unexplained_only",
    )

    def __init__(self, unexplained_only: bool = False) -> None:
        self.day = -1
        self.fired = False  # fired today: later events only add themselves
        self.patients: set[str] = set()
        self.unexplained: list[Evidence] = []
        self.unexplained_patients: set[str] = set()
        self.history: deque[int] = deque(maxlen=14)
        self.unexplained_only = unexplained_only

    @classmethod
    def for_aggregate(cls, agg: Aggregate) -> DayCounter:
        """A counter for a day rule: of unexplained patients only with ``of: unexplained``."""
        return cls(agg.of == "unexplained")

    def count(self) -> int:
        """Today's count: distinct patients, or distinct unexplained ones."""
        return len(self.unexplained_patients if self.unexplained_only else self.patients)

    def holds(self, agg: Aggregate) -> bool:
        """Today's count passes ``agg``'s thresholds against the history."""
        n = self.count()
        return (
            n >= agg.gte
            and len(self.history) >= agg.min_history_days
            and len(self.unexplained_patients) >= agg.min_unexplained
            and n >= agg.baseline_ratio * statistics.median(self.history)
        )

    def forget(self, patient_id: str, since: float) -> None:
        """The user documented for ``patient_id``: today's unexplained reads of that patient
        from ``since`` on were consults after all."""
        if patient_id not in self.unexplained_patients:
            return
        self.unexplained = [ev for ev in self.unexplained if ev[2] != patient_id or ev[1] < since]
        if not any(ev[2] == patient_id for ev in self.unexplained):
            self.unexplained_patients.discard(patient_id)

    def roll(self, day: int, history_days: int) -> None:
        if day != self.day:
            if self.day >= 0 and self.patients:
                if self.history.maxlen != history_days:
                    self.history = deque(self.history, maxlen=history_days)
                self.history.append(self.count())
            self.day = day
            self.patients = set()
            self.unexplained = []
            self.unexplained_patients = set()
            self.fired = False


class UserState:
    __slots__ = ("writes", "windows", "days", "case", "browse", "last_t", "models", "rel")

    def __init__(self) -> None:
        self.writes: dict[str, float] = {}
        self.windows: dict[str, Window] = {}
        self.days: dict[str, DayCounter] = {}
        self.case: Case | None = None
        #: a browsing case (Case.browsing) the rules' gap took out of ``case``: the user's
        #: learned evidence still joins it, for ``model_case_gap_s`` after its last finding
        self.browse: Case | None = None
        self.last_t = 0.0
        self.models: UserModels | None = None
        #: cache, not state: patient → what the context says about this user and patient
        self.rel: dict[str, _Rel] = {}


#: a user's relationship cache is cleared when it holds more patients than this
log = logging.getLogger(__name__)
REL_CACHE_SIZE = 64
#: an access this far behind a newer one of the same user is counted (EngineStats.far_behind)
FAR_BEHIND_S = 6 * 3600.0
_INF = float("inf")


def work_day_start(shift: bool, start_min: int, end_min: int) -> int:
    """Where a user's working day begins, in seconds after local midnight: at midnight,
    unless their shift runs across it (23:00–07:00); then in the middle of their hours off
    (15:00), so that one night's work is one day for the day counts (``timespan: day``).

    >>> work_day_start(True, 23 * 60, 7 * 60) // 3600, work_day_start(True, 7 * 60, 15 * 60)
    (15, 0)
    """
    if shift and start_min > end_min:
        return (start_min + end_min) * 30
    return 0


_WARNED: set[tuple[str, float, float]] = set()


def _warn_trained_otherwise(
    cfg: DetectionConfig, trained: dict[str, Any], versions: dict[str, str]
) -> None:
    """Say once per model version when the config's shift grace is not the one the visit
    models were trained with: their ``off_shift`` then means something else live."""
    grace = trained.get("shift_grace_s")
    if grace is None or float(grace) == cfg.shift_grace_s:
        return
    key = (versions.get("visits", ""), float(grace), cfg.shift_grace_s)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(
            "shift_grace_s is %g s but visit models %s were trained with %g s: their "
            "off-shift feature means something else here; retrain with this config",
            cfg.shift_grace_s,
            key[0],
            float(grace),
        )


def duty_window(shift: bool, start_min: int, end_min: int, grace_min: int) -> tuple[int, int]:
    """The minutes of the day a user is on duty, as (start, end) with end exclusive and
    wrapping midnight when start > end: their shift widened by ``grace_min`` either side.
    (0, 0) means always on duty: no shift set, or hours off no longer than twice the grace.

    >>> duty_window(True, 7 * 60, 19 * 60, 30), duty_window(True, 23 * 60, 7 * 60, 30)
    ((390, 1170), (1350, 450))
    >>> duty_window(True, 8 * 60, 20 * 60, 6 * 60), duty_window(False, 0, 0, 30)
    ((0, 0), (0, 0))
    """
    if not shift:
        return 0, 0
    length = (end_min - start_min) % 1440
    if length + 2 * grace_min >= 1440:
        return 0, 0
    return (start_min - grace_min) % 1440, (end_min + grace_min) % 1440


class _UserInfo:
    """What the context says about one user, valid for one context version."""

    __slots__ = (
        "version",
        "staff",
        "dept_kind",
        "in_ed",
        "static",
        "template",
        "valid_from",
        "valid_until",
        "shift",
        "shift_start",
        "shift_end",
        "duty_start",
        "duty_end",
        "day_start",
        "clearance",
        "grants",
    )

    def __init__(
        self,
        version: int,
        staff: Staff | None,
        dept_kind: str,
        in_ed: bool,
        static: dict[str, Any],
        grants: list[Grant] | None,
        grace_min: int = 0,
    ) -> None:
        self.version = version
        self.staff = staff
        self.dept_kind = dept_kind
        self.in_ed = in_ed
        self.static = static
        #: every fact, the user's filled in: facts() copies it and sets the rest
        self.template: dict[str, Any] = {k: None for k in FACT_FIELDS}
        self.template["explanations"] = ()
        self.template.update(static)
        self.grants = grants
        if staff is not None:
            self.valid_from, self.valid_until = staff.valid_from, staff.valid_until
            self.clearance = staff.clearance
            s, e = staff.shift_start, staff.shift_end
            self.shift = not (s is None or e is None or s == e)
            self.shift_start, self.shift_end = s or 0, e or 0
        else:
            self.valid_from, self.valid_until = _INF, -_INF
            self.clearance = 0
            self.shift, self.shift_start, self.shift_end = False, 0, 0
        self.day_start = work_day_start(self.shift, self.shift_start, self.shift_end)
        #: the minutes of the day the user counts as on duty: the shift widened by the grace;
        #: duty_start == duty_end means always on duty (no shift, or the grace closes the gap)
        self.duty_start, self.duty_end = duty_window(
            self.shift, self.shift_start, self.shift_end, grace_min
        )


class _Rel:
    """What the context says about one user's access to one patient (one context version):
    the patient facts, from when a seal applies, and the encounter state of the explanation
    with the times it holds for."""

    __slots__ = ("version", "facts", "template", "sensitivity", "seal_from", "enc")

    def __init__(
        self,
        version: int,
        facts: dict[str, Any],
        sensitivity: int,
        seal_from: float,
        template: dict[str, Any],
    ) -> None:
        self.version = version
        self.facts = facts
        #: the user's fact template with these patient facts filled in (one copy an event)
        self.template = {**template, **facts}
        self.sensitivity = sensitivity
        self.seal_from = seal_from
        self.enc: EncounterState | None = None


class Engine:
    """Explain-first rule detection with case accumulation, one instance per worker."""

    def __init__(
        self,
        context: Context,
        config: DetectionConfig | None = None,
        rules: list[Rule] | None = None,
        models: ModelScorer | None | str = "config",
    ) -> None:
        self.ctx = context
        self.cfg = config or DetectionConfig()
        self.rules = (
            rules
            if rules is not None
            else load_rules(
                self.cfg.rules_dir or None, self.cfg.disabled_rules, self.cfg.rule_overrides
            )
        )
        self.rule_by_id = {r.id: r for r in self.rules}
        self.rule_by_id[LEARNED_RULE_ID] = LEARNED_RULE
        self.event_rules = [r for r in self.rules if r.aggregate is None]
        self.agg_rules = [r for r in self.rules if r.aggregate is not None]
        self._match_event = compile_matcher(self.event_rules)
        self._match_agg = compile_matcher(self.agg_rules)
        self.retractable = {r.id for r in self.rules if r.retract_on_documentation}
        #: rules of level low: with learned evidence, a case of only these is browsing
        self.low_rules = frozenset(r.id for r in self.rules if r.level == "low")
        #: day counters whose unexplained patients documentation takes back
        self._retract_days = tuple(
            r.id
            for r in self.agg_rules
            if r.retract_on_documentation
            and r.aggregate is not None
            and r.aggregate.count == "day_distinct"
        )
        self.explainer = Explainer(context, self.cfg)
        self.builder = AlertBuilder(context, self.cfg, self.rule_by_id)
        #: the learned models (``models/``), from the registry the config names, or None
        self.models: ModelScorer | None = (
            ModelScorer.from_registry(context, self.cfg.model_registry)
            if models == "config"
            else models  # type: ignore[assignment]
        )
        self.builder.feature_words = FEATURES
        if self.models is not None:
            self.builder.model_versions = self.models.versions
            _warn_trained_otherwise(self.cfg, self.models.bundle.detection, self.models.versions)
        self.users: dict[str, UserState] = {}
        self.grant_only = frozenset(self.cfg.grant_only_roles)
        self.clerks = frozenset(self.cfg.clerk_roles)
        self.non_clinical = frozenset(self.cfg.non_clinical_resources)
        self.exceptions = list(self.cfg.exceptions)
        # statistics for evaluation and metrics
        self.events = 0
        self.explained = 0
        self.finding_counts: dict[str, int] = {r.id: 0 for r in self.rules}
        self.suppressed: dict[str, list[tuple[str, str]]] = {}  # exception id → [(rule, event)]
        self._clock = context.clock
        #: set it to a set() to collect the ids of unexplained events (evaluation)
        self.unexplained_ids: set[str] | None = None
        self.far_behind = 0  # see EngineStats.far_behind
        self.withdrawn = 0  # see EngineStats.withdrawn
        self.clock_ahead = 0  # see EngineStats.clock_ahead
        self.clock_ahead_ids: list[str] = []
        self.clock_ahead_from: dict[str, int] = {}
        self.clock_behind_from: dict[str, int] = {}
        self.clock_behind_by: dict[str, float] = {}
        self._user_cache: dict[str, _UserInfo] = {}
        self._documented_window = self.cfg.documented_window_s
        self._grace_min = int(self.cfg.shift_grace_s // 60)
        self._reason_tuples: dict[tuple[str, ...], int] = {}  # reason codes → events
        self._reason_order: list[str] = []
        self._hour0 = self._hour1 = 0.0  # the hour whose UTC offset is cached
        self._offset = 0
        # the correlation rules, unpacked for the hot path
        self._agg_plan = [
            (
                r,
                r.aggregate,
                r.aggregate.count,
                r.aggregate.field,
                r.aggregate.timespan_s,
                r.aggregate.gte,
            )
            for r in self.agg_rules
            if r.aggregate is not None
        ]
        self._dirty: dict[
            str, tuple[str, Case]
        ] = {}  # alert id → (user, case) changed since the last drain
        #: event-time watermark (the latest event time seen) and when it next closes visits
        self._wm = -math.inf
        self._sweep_at = -math.inf
        #: users who may have open visits (the sweep looks at these only)
        self._open: dict[str, UserState] = {}
        #: in the stream: workstation (or source) → its run of accesses stamped long before
        #: their records were produced (a clock behind, once steady); the worker keeps it
        #: here so that it goes with the partition's snapshot
        self.clock_runs: dict[str, SteadyOffset] = {}
        self._late = (
            LateAllowance(self.cfg.model_visit_lateness_s, self.cfg.late_allowance_max_s)
            if self.cfg.late_allowance_max_s > self.cfg.model_visit_lateness_s
            else None
        )
        #: how long an idle visit waits for late accesses, and how much longer than their
        #: span the correlation windows keep accesses for them (detectors.lateness)
        self._allowance = self._late.allowance if self._late else self.cfg.model_visit_lateness_s
        self._grace = self._late.widened if self._late else 0.0

    # ------------------------------------------------------------------ facts
    def _user_info(self, user_id: str) -> _UserInfo:
        """The user's static facts, cached until the context changes."""
        info = self._user_cache.get(user_id)
        ctx = self.ctx
        if info is not None and info.version == ctx.version:
            return info
        staff = ctx.staff.get(user_id)
        if staff is not None:
            dept = ctx.departments.get(staff.department_id)
            dept_kind = dept.kind if dept is not None else "clinical"
            in_ed = dept is not None and dept.is_emergency
            role = staff.role
        else:
            dept_kind, in_ed, role = "", False, ""
        static = {
            "role": role,
            "known_role": role in KNOWN_ROLES,
            "user_department": staff.department_id if staff is not None else "",
            "user_department_kind": dept_kind,
            "user_in_emergency_department": in_ed,
            "clearance": staff.clearance if staff is not None else 0,
            "known_user": staff is not None,
            "grant_only_role": role in self.grant_only,
            "clerk_role": role in self.clerks,
        }
        info = _UserInfo(
            ctx.version,
            staff,
            dept_kind,
            in_ed,
            static,
            ctx.grants.get(user_id),
            self._grace_min,
        )
        self._user_cache[user_id] = info
        return info

    def _user_facts(self, user_id: str) -> tuple[Any, str, bool, dict[str, Any]]:
        """(staff, department kind, in ED, facts that depend only on the user), cached until
        the context changes."""
        info = self._user_info(user_id)
        return info.staff, info.dept_kind, info.in_ed, info.static

    def _rel(self, info: _UserInfo, user_id: str, patient_id: str, st: UserState) -> _Rel:
        """The patient facts of ``user_id``'s access to ``patient_id`` (cached per user)."""
        ctx = self.ctx
        patient = ctx.patients.get(patient_id) if patient_id else None
        staff = info.staff
        if patient is not None:
            sensitivity = patient.sensitivity
            emp = patient.employee_user_id
            self_access = emp == user_id
            family = (
                bool(patient.family_key)
                and staff is not None
                and patient.family_key == staff.family_key
            )
            seal = ctx.seals.get(patient_id)
            seal_from = (
                seal.sealed_at if seal is not None and user_id not in seal.authorized else _INF
            )
            vip = patient.vip
        else:
            sensitivity, emp, self_access, family, seal_from, vip = 0, "", False, False, _INF, False
        facts = {
            "known_patient": patient is not None,
            "sensitivity": sensitivity,
            "vip": vip,
            "patient_is_employee": bool(emp),
            "self_access": self_access,
            "coworker": bool(emp) and not self_access,
            "family": family and not self_access,
            "above_clearance": patient is not None and sensitivity > info.clearance,
        }
        rel = _Rel(ctx.version, facts, sensitivity, seal_from, info.template)
        cache = st.rel
        if len(cache) >= REL_CACHE_SIZE:
            cache.clear()
        cache[patient_id] = rel
        return rel

    def facts(self, e: AccessEvent, st: UserState) -> dict[str, Any]:
        """Everything the rules may test about one access (``rules.FACT_FIELDS``), plus
        ``explanations`` (the reason codes)."""
        return self._facts(e, st, e.t + self._clock.offset(e.t))

    def _facts(self, e: AccessEvent, st: UserState, lt: float) -> dict[str, Any]:
        """:meth:`facts`, given the event's local time ``lt``.

        The hot path: what depends only on the user, or on the user and the patient, is
        cached (per context version), and the explanation's encounter scan is reused while
        the event time stays in the range over which its outcome cannot change."""
        t = e.t
        user_id = e.user_id
        patient_id = e.patient_id
        info = self._user_cache.get(user_id)
        if info is None or info.version != self.ctx.version:
            info = self._user_info(user_id)
        rel = st.rel.get(patient_id)
        if rel is None or rel.version != info.version:
            rel = self._rel(info, user_id, patient_id, st)
        action = e.action
        outcome = e.outcome
        write = action in WRITE_ACTIONS and outcome == "success"
        staff = info.staff
        if staff is not None:
            active = info.valid_from <= t < info.valid_until
            s0, s1 = info.duty_start, info.duty_end
            if s0 != s1:
                m = int((lt % 86400) // 60)  # LocalClock.minute_of_day
                off_shift = not (s0 <= m < s1) if s0 < s1 else not (m >= s0 or m < s1)
            else:
                off_shift = False
            es = rel.enc
            if es is None or not (
                es.lo_in <= t and es.lo_ex < t and t <= es.hi_in and t < es.hi_ex
            ):
                es = rel.enc = self.explainer.encounter_state(
                    user_id, staff, patient_id, t, info.dept_kind, info.in_ed
                )
            # the per-event part of Explainer.finish, inlined
            grant_covered = False
            grants = info.grants
            if grants:
                for g in grants:
                    if g.covers(t, action, es.seen):
                        grant_covered = True
                        break
            last_write = t if write else st.writes.get(patient_id)
            idx = GRANT if grant_covered else 0
            if last_write is not None and t - last_write <= self._documented_window:
                idx |= DOCUMENTED
            if e.emergency:
                idx |= EMERGENCY
            reasons = es.table[idx]
        else:
            active = off_shift = grant_covered = False
            reasons = ()
        f = rel.template.copy()
        f["action"] = action
        f["resource_type"] = e.resource_type
        f["outcome"] = outcome
        f["emergency"] = e.emergency
        f["purpose"] = e.purpose
        f["workstation"] = e.workstation
        f["source"] = e.source
        f["event_category"] = e.event_category
        f["account_active"] = active
        f["explained"] = bool(reasons)
        f["explanations"] = reasons
        f["sealed_violation"] = t >= rel.seal_from
        f["off_shift"] = off_shift
        f["clinical_resource"] = e.resource_type not in self.non_clinical
        f["exfiltration"] = action in EXFIL_ACTIONS
        f["write"] = write
        f["denied"] = outcome == "failure"
        f["grant_covered"] = grant_covered
        return f

    # ------------------------------------------------------------------ processing
    def process_dict(self, d: dict[str, Any]) -> list[Alert]:
        return self.process(AccessEvent.from_dict(d))

    def process_many(self, events: Iterable[AccessEvent]) -> list[Alert]:
        """Process a batch; each alert it changed is returned once, in its last version."""
        ingest = self.ingest
        for e in events:
            ingest(e)
        return self.drain()

    def process(self, e: AccessEvent) -> list[Alert]:
        """Ingest one event and return the alerts it opened, updated or retracted."""
        self.ingest(e)
        return self.drain() if self._dirty else []

    def drain(self) -> list[Alert]:
        """Build the current version of every case changed since the last drain.

        Building an alert sorts its evidence, so callers that process batches (the stream's
        ``take()``, replay) drain once a batch rather than once an event."""
        out: list[Alert] = []
        cfg = self.cfg
        models = self.models
        if models is not None:
            if models.maybe_reload(cfg.model_reload_s):
                self.builder.model_versions = models.versions
            if self._dirty:
                self._rate(c for _, c in self._dirty.values() if c.dirty)
        for user_id, case in self._dirty.values():
            if not case.dirty:
                continue
            case.dirty = False
            above = self._above(case)
            if not case.alerted:
                if not above:
                    continue
                case.alerted = True
            elif not above and case.retracted:
                continue  # the sinks already know it was retracted
            case.retracted = not above
            out.append(self.builder.build(user_id, case))
        self._dirty.clear()
        return out

    def _rate(self, cases: Iterable[Case]) -> None:
        """Set each case's ``model_p``: the case model's P(misuse) where it can change the
        case's fate (:meth:`Case.undecided`), else None. Scored in one batch."""
        models = self.models
        if models is None or models.case_model is None:
            return
        rules, cfg = self.rule_by_id, self.cfg
        todo = []
        for c in cases:
            if c.undecided(rules, cfg):
                todo.append(c)
            else:
                c.model_p = None
        if todo:
            rows = [c.features(rules, cfg) for c in todo]
            for c, p in zip(todo, models.case_model.score(rows), strict=True):
                c.model_p = round(p, 4)

    def _above(self, case: Case) -> bool:
        """Whether ``case``, with its ``model_p`` as rated, is at or above the threshold."""
        return case.immediate or case.risk(self.rule_by_id, self.cfg) >= self.cfg.alert_threshold

    def _local(self, t: float) -> float:
        """``t`` shifted to local time (the clock's per-hour UTC offset, cached for the hour
        the events are in: consecutive events mostly share it)."""
        if not (self._hour0 <= t < self._hour1):
            h = int(t // 3600)
            self._hour0, self._hour1 = h * 3600.0, (h + 1) * 3600.0
            self._offset = self._clock.offset(t)
        return t + self._offset

    def ingest(self, e: AccessEvent) -> None:
        """Update state and cases for one event; alerts come out of :meth:`drain`."""
        user_id = e.user_id
        t = e.t
        if t > self._wm:
            self._wm = t
            if t >= self._sweep_at:
                self._sweep(t)
        elif self._late is not None and self._wm - t > self._late.floor:
            self._late.late(self._wm - t)
        st = self.users.get(user_id)
        if st is None:
            st = self.users[user_id] = UserState()
        late = t < st.last_t  # behind the user's newest access: delivered late
        if not late:
            st.last_t = t
        elif st.last_t - t > FAR_BEHIND_S:
            self.far_behind += 1
        if not (self._hour0 <= t < self._hour1):  # self._local(t), inlined
            h = int(t // 3600)
            self._hour0, self._hour1 = h * 3600.0, (h + 1) * 3600.0
            self._offset = self._clock.offset(t)
        lt = t + self._offset
        f = self._facts(e, st, lt)
        self.events += 1
        reasons = f["explanations"]
        if reasons:
            self.explained += 1
            rt = self._reason_tuples
            n = rt.get(reasons)
            if n is None:
                rt[reasons] = 1
                # codes in order of first appearance, as counting them one by one gives
                self._reason_order.extend(r for r in reasons if r not in self._reason_order)
            else:
                rt[reasons] = n + 1
        elif self.unexplained_ids is not None:
            self.unexplained_ids.add(e.event_id)
        explained = f["explained"]
        patient_id = e.patient_id
        um = st.models
        if um is not None and t - um.behaviour.oldest > VISIT_GAP_S:
            # visits this access finds idle close first, each at its own time
            self._close_idle(st, user_id, t - VISIT_GAP_S)
        case = self._lapse_for_rules(st, t) if st.case is not None else None
        cfg = self.cfg
        opened = case
        version0 = case.version if case is not None else -1
        fired0 = len(case.fired) if case is not None else -1
        if f["write"] and patient_id:
            st.writes[patient_id] = t
            if case is not None and self.retractable:
                case.retract(self.retractable, patient_id, t - cfg.documented_grace_s)
            for rid in self._retract_days:
                dc = st.days.get(rid)
                if dc is not None:
                    dc.forget(patient_id, t - cfg.documented_grace_s)
        ev: Evidence = (
            e.event_id,
            t,
            patient_id,
            e.action,
            e.resource_type,
            e.workstation,
            f["sensitivity"],
        )
        models = self.models
        if models is not None and patient_id:
            um = st.models
            if um is None:
                um = st.models = models.new_user()
            bh = um.behaviour
            if (
                late
                and patient_id not in bh.open
                and t <= bh.patients.get(patient_id, -_INF) + VISIT_GAP_S
            ):
                # the visit this access belongs to is scored already (or it would have
                # extended it): it is not scored again as a visit of its own
                pass
            else:
                visits = models.observe(e, f, um, ev)
                self._open[user_id] = st  # the user has an open visit: the sweep looks at it
                if visits:
                    for vs in visits:
                        case = self._learned(st, user_id, vs, case, t)
        matched = self._match_event(f)
        if matched:
            event_rules = self.event_rules
            hits = [
                event_rules[i]
                for i in matched
                if not (self.exceptions and self._suppressed(event_rules[i], e, f))
            ]
            if hits:
                if case is None or case.quiet_for(hits, t, cfg):
                    case = st.case = new_case(user_id, e.event_id, t)
                for rule in hits:
                    case.add(rule, ev)
                    self.finding_counts[rule.id] += 1
        agg_rules = self._agg_plan
        for i in self._match_agg(f):
            rule, agg, kind, fld, span, gte = agg_rules[i]
            if kind == "day_distinct":
                # today's distinct count, inlined up to the thresholds: it runs for most events
                dc = st.days.get(rule.id)
                if dc is None:
                    dc = st.days[rule.id] = DayCounter.for_aggregate(agg)
                # the user's working day: one night shift is one day
                day = int((lt - self._user_cache[user_id].day_start) // 86400)
                if day != dc.day:
                    if day < dc.day:
                        continue  # a late access to a day already closed into the history
                    dc.roll(day, cfg.volume_history_days)
                dc.patients.add(patient_id)
                if not explained:
                    dc.unexplained.append(ev)
                    dc.unexplained_patients.add(patient_id)
                if (
                    len(dc.unexplained_patients if dc.unexplained_only else dc.patients) < gte
                    or len(dc.history) < agg.min_history_days
                    or len(dc.unexplained_patients) < agg.min_unexplained
                ):
                    continue
                fired, extras = self._day_fires(rule, st, dc, explained, ev)
            else:
                # windowed correlation, inlined: it runs for most events
                w = st.windows.get(rule.id)
                if w is None:
                    w = st.windows[rule.id] = Window.counting(kind)
                got = w.push(
                    t,
                    e.event_id if kind == "events" else getattr(e, fld),
                    explained,
                    ev,
                    span,
                    self._grace,
                    gte,
                )
                if got is True:
                    n = w.switches if kind == "switches" else len(w.distinct)
                    if n < gte:
                        continue
                    held: Iterable[tuple[float, str, bool, bool, Evidence]] = w.entries
                elif not got:
                    continue  # too late to correlate, or no window around it holds enough
                else:
                    held = got
                if agg.evidence == "unexplained":
                    fired = [x[4] for x in held if not x[3]]
                else:
                    fired = [x[4] for x in held]
                extras = None
            if not fired or (self.exceptions and self._suppressed(rule, e, f)):
                continue
            if case is None or case.quiet_for((rule,), t, cfg):
                # the id comes from the event that opened the case, which no other case can
                # share (a window's first event may already belong to a closed case)
                case = st.case = new_case(user_id, e.event_id, t)
            if extras:
                case.extras[rule.id] = extras
            for item in fired:
                case.add(rule, item)
            if rule.id not in case.fired:
                case.fired.add(rule.id)
                self.finding_counts[rule.id] += 1
                case.dirty = True
        if case is not None:
            # activity is a change made by *this* event (``dirty`` may be left over from an
            # earlier event not yet drained, and drains fall differently per partition)
            if (case is not opened or case.version != version0 or len(case.fired) != fired0) and (
                t > case.touched_t
            ):
                case.touched_t = t
            if case.dirty:
                self._dirty[case.alert_id] = (user_id, case)

    @property
    def watermark(self) -> float:
        """The latest event time this engine has seen."""
        return self._wm

    @property
    def late_allowance(self) -> float:
        """How long (event time) an idle visit now waits for late accesses before it is
        scored: ``model_visit_lateness_s``, widened to the input's delays (the cap,
        ``late_allowance_max_s``, for the first hour, before they are measured)."""
        return self._allowance

    def sweep_to(self, t: float) -> None:
        """End of input (or of a partition's input) up to event time ``t``: close the visits
        that ``t`` leaves idle, as the watermark would. Replay's partitions and the stream's
        end-of-input marker pass the input's last event time, so every engine closes the
        same visits a single engine closes; :meth:`drain` then gives the alerts."""
        if t > self._wm:
            self._wm = t
        if self.models is not None and self._wm > -math.inf:
            self._sweep(self._wm)

    def _sweep(self, wm: float) -> None:
        """Close the visits the watermark ``wm`` has left idle (by the late allowance, at
        least ``model_visit_lateness_s``, more than the visit gap), so learned evidence does
        not wait for the user's next access: a user who browses and logs off is scored
        minutes later, not at their next shift. Each visit closes at its own time (:meth:`_close_idle`), so the outcome is
        the same whichever events trigger it: replay with any number of workers and the
        stream's partitions agree, unless an access arrives later than the lateness."""
        self._sweep_at = wm + SWEEP_EVERY_S
        if self._late is not None:
            self._allowance = self._late.update(wm, self.events)
            self._grace = self._late.widened
        if self.models is None:
            return
        horizon = wm - self._allowance - VISIT_GAP_S
        done = []
        for user_id, st in self._open.items():
            um = st.models
            assert um is not None  # a user enters ``_open`` with models only
            if um.behaviour.oldest < horizon:
                self._close_idle(st, user_id, horizon)
            if not um.behaviour.open:
                done.append(user_id)
        for user_id in done:
            del self._open[user_id]

    def _close_idle(self, st: UserState, user_id: str, horizon: float) -> None:
        """Score the user's visits idle since before ``horizon``, each as of the moment it
        went idle (last access + the visit gap): the case it joins is the one open then."""
        assert self.models is not None and st.models is not None
        for vs in self.models.expire(user_id, st.models, horizon):
            tc = vs.visit.last_t + VISIT_GAP_S
            self._learned(st, user_id, vs, self._case_for_learned(st, tc), tc)

    def _case_for_learned(self, st: UserState, t: float) -> Case | None:
        """The case learned evidence at ``t`` joins: the user's browsing case while it is
        open to it (``model_case_gap_s``), else their current case unless it has lapsed."""
        case = st.browse
        if case is not None:
            if not case.lapsed(t, self.cfg, browsing=True):
                return case
            st.browse = None
        case = self._lapse_for_rules(st, t)
        return case if case is not None else st.browse  # the case it just put aside, if any

    def _follows_up(self, case: Case, t: float) -> bool:
        """Whether learned evidence at ``t`` still joins ``case`` once the rules' gap has
        closed it: a browsing case that raises an alert, within ``model_case_gap_s`` of its
        last finding (the next day's browsing belongs to the alert the first day raised)."""
        return (
            case.browsing(self.low_rules)
            and not case.lapsed(t, self.cfg, browsing=True)
            and self._raises_alert(case)
        )

    def _raises_alert(self, case: Case) -> bool:
        """Whether ``case`` as it stands raises an alert: what :meth:`drain` decides, decided
        now (not the flag the last drain set, which depends on how input is batched)."""
        if case.immediate:
            return True
        self._rate((case,))
        return self._above(case)

    def _lapse_for_rules(self, st: UserState, t: float) -> Case | None:
        """The user's current case for the rules' findings at ``t``: None once it has
        lapsed; a browsing case then stays open to learned evidence (``st.browse``)."""
        case = st.case
        if case is not None and case.lapsed(t, self.cfg):
            if self._follows_up(case, t):
                st.browse = case
            st.case = case = None
        return case

    def _learned(
        self, st: UserState, user_id: str, vs: VisitScore, case: Case | None, t: float
    ) -> Case | None:
        """A visit the models scored: learned evidence if unusual enough, else (for an open
        case that holds the patient) a level the case model sees."""
        cfg = self.cfg
        pid = vs.visit.patient_id
        if vs.level >= cfg.model_min_level and (vs.explained or not cfg.model_explained_only):
            if case is None:
                # the id comes from the visit's first access, with a prefix no rule case has
                case = st.case = new_case(user_id, "learned:" + vs.visit.evidence[0][0], t)
            case.add_learned(
                vs.visit.evidence,  # type: ignore[arg-type]
                pid,
                vs.level,
                vs.attribution,
                cfg.model_min_level,
                vs.extrapolated_from,
            )
            if t > case.touched_t:
                case.touched_t = t
            self._dirty[case.alert_id] = (user_id, case)
            return case
        if (
            case is not None
            and self.models is not None
            and self.models.case_model is not None
            and any(pid in pc for pc in case.patients.values())
            and case.see(pid, vs.level)
        ):
            # the case model reads these levels: the alert must be rebuilt from them
            case.dirty = True
            self._dirty[case.alert_id] = (user_id, case)
        if (
            case is not None
            and 0 < cfg.model_follow_level <= vs.level
            and (vs.explained or not cfg.model_explained_only)
            and LEARNED_RULE_ID in case.evidence
            and case.follow(vs.visit.evidence)  # type: ignore[arg-type]
        ):
            self._dirty[case.alert_id] = (user_id, case)
        return case

    def _day_fires(
        self, rule: Rule, st: UserState, dc: DayCounter, explained: bool, ev: Evidence
    ) -> tuple[list[Evidence], dict[str, Any] | None]:
        """Today's count passed the cheap thresholds :meth:`ingest` checks inlined: does it
        hold (:meth:`DayCounter.holds`), and with what evidence?"""
        agg = rule.aggregate
        assert agg is not None
        if not dc.holds(agg):  # the thresholds are the ones the rule's examples are run on
            return [], None
        n = dc.count()
        base = statistics.median(dc.history)
        extras = {
            "day_patients": n,
            "baseline": round(base, 1),
            "ratio": round(n / max(base, 1), 1),
        }
        if dc.fired:
            # today's case grows while it is open; once closed, volume alone reopens nothing
            case = st.case
            if explained or case is None or rule.id not in case.fired:
                return [], None
            return [ev], extras
        dc.fired = True
        return list(dc.unexplained), extras

    def _suppressed(self, rule: Rule, e: AccessEvent, f: dict[str, Any]) -> bool:
        if not self.exceptions:
            return False
        day = self._clock.local_iso(e.t)[:10]
        for ex in self.exceptions:
            if ex.matches(
                rule.id,
                e.user_id,
                f["role"],
                f["user_department"],
                e.patient_id,
                e.workstation,
                day,
            ):
                self.suppressed.setdefault(ex.id, []).append((rule.id, e.event_id))
                return True
        return False

    def advance(self, t: float) -> list[Alert]:
        """Event-time watermark from the stream: bound memory without changing any result.

        Replay never calls this, so it must not change what later events see: it leaves
        users, cases and model state alone (other users' events drive the watermark, so a
        user's next event may be older than it) and only drops documentation entries too
        old, by a day's margin, to explain anything any more."""
        cut = t - self.cfg.documented_window_s - 86400.0
        for st in self.users.values():
            if len(st.writes) > 256:
                st.writes = {p: w for p, w in st.writes.items() if w >= cut}
        return []

    def flush(self) -> list[Alert]:
        """End of input. Alerts were emitted as they changed; nothing is pending.

        Visits still open are *not* closed here: a stream never knows its input ended, and
        replay must give what the stream gives. A visit is scored when the user's own later
        events close it or the watermark leaves it idle (:meth:`sweep_to`)."""
        return []

    # ------------------------------------------------------------------ stats
    @property
    def reason_counts(self) -> dict[str, int]:
        """Explained events per reason code."""
        rc: dict[str, int] = dict.fromkeys(self._reason_order, 0)
        for reasons, n in self._reason_tuples.items():
            for r in reasons:
                rc[r] = rc.get(r, 0) + n
        return rc

    @property
    def explained_share(self) -> float:
        return self.explained / self.events if self.events else 0.0

    def on_clock_ahead(self, e: AccessEvent, judged_at: float) -> None:
        """Counts an access a replay judges at the file's time (pipeline.file_clock)."""
        self.clock_ahead += 1
        if len(self.clock_ahead_ids) < CLOCK_AHEAD_IDS:
            self.clock_ahead_ids.append(e.event_id)
        where = e.workstation or e.source or "unknown"
        self.clock_ahead_from[where] = self.clock_ahead_from.get(where, 0) + 1

    def on_clock_behind(self, e: AccessEvent, judged_at: float) -> None:
        """Counts an access a replay judges later: its source's clock is steadily behind
        the file's (pipeline.file_clock)."""
        where = e.workstation or e.source or "unknown"
        self.clock_behind_from[where] = self.clock_behind_from.get(where, 0) + 1
        self.clock_behind_by[where] = judged_at - e.t

    def forgive_late(self, m: Misstamped) -> None:
        """A source's accesses taken as stamped (``m``) came from a clock now known to be
        ``m.offset`` behind: their delays leave the late allowance's measure
        (:meth:`detectors.lateness.LateAllowance.forgive`), and the correlations they
        made with the user's other accesses are withdrawn from the open cases
        (:meth:`detectors.cases.Case.withdraw`); an alert that then falls below the
        threshold is retracted."""
        if self._late is not None:
            self._late.forgive(m.n, m.lo, m.hi)
        if not m.event_ids:
            return
        ids = frozenset(m.event_ids)
        why = (
            f"{m.where}'s clock runs {m.offset / 3600:.1f} h behind, so its accesses were "
            "placed at hours they did not happen"
        )
        for user_id, st in self.users.items():
            case = st.case
            if case is not None and case.withdraw(ids, self.rule_by_id, why):
                self.withdrawn += 1
                self._dirty[case.alert_id] = (user_id, case)

    def stats(self) -> EngineStats:
        return EngineStats(
            events=self.events,
            explained=self.explained,
            reasons=dict(self.reason_counts),
            findings=dict(self.finding_counts),
            suppressed={k: list(v) for k, v in self.suppressed.items()},
            unexplained_ids=set(self.unexplained_ids or ()),
            far_behind=self.far_behind,
            clock_ahead=self.clock_ahead,
            clock_ahead_ids=list(self.clock_ahead_ids),
            clock_ahead_from=dict(self.clock_ahead_from),
            clock_behind_from=dict(self.clock_behind_from),
            clock_behind_by=dict(self.clock_behind_by),
            late_allowance=(
                self._late.widest if self._late and self._late.widest > self._late.floor else 0.0
            ),
            latest_lag=self._late.latest_lag if self._late else 0.0,
            too_late=self._late.too_late if self._late else 0,
            withdrawn=self.withdrawn,
        )

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, users: Iterable[str] | None = None) -> bytes:
        """Per-user state and the partition's clock (event time, late allowance) as JSON
        (not pickle: a snapshot is data, never code)."""
        keys = self.users.keys() if users is None else [u for u in users if u in self.users]
        out: dict[str, Any] = {}
        for u in keys:
            st = self.users[u]
            out[u] = {
                "writes": st.writes,
                "last_t": st.last_t,
                "windows": {
                    r: [list(x) for x in (*w.old, *w.entries)] for r, w in st.windows.items()
                },
                "days": {
                    r: [d.day, sorted(d.patients), d.unexplained, list(d.history), d.fired]
                    for r, d in st.days.items()
                },
                "case": st.case.to_obj() if st.case is not None else None,
                "browse": st.browse.to_obj() if st.browse is not None else None,
                "models": st.models.to_obj() if st.models is not None else None,
            }
        finite = math.isfinite
        clock = {
            "wm": self._wm if finite(self._wm) else None,
            "sweep_at": self._sweep_at if finite(self._sweep_at) else None,
            "late": self._late.to_obj(self.events) if self._late is not None else None,
            "behind": {k: run.to_obj() for k, run in self.clock_runs.items()},
        }
        return orjson.dumps({"version": SNAPSHOT_VERSION, "users": out, "clock": clock})

    def restore_state(self, data: bytes) -> None:
        doc = orjson.loads(data)
        if doc.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {doc.get('version')} is not {SNAPSHOT_VERSION}")
        # the partition's event time and late allowance (snapshots before them have none)
        clock = doc.get("clock") or {}
        if clock.get("wm") is not None and clock["wm"] > self._wm:
            self._wm = clock["wm"]
            self._sweep_at = clock.get("sweep_at") or self._sweep_at
        self.clock_runs.update(
            (k, SteadyOffset.from_obj(o)) for k, o in (clock.get("behind") or {}).items()
        )
        if self._late is not None and clock.get("late"):
            self._late.restore(clock["late"], self.events)
            self._allowance, self._grace = self._late.allowance, self._late.widened
        for u, o in doc["users"].items():
            st = UserState()
            st.writes = o["writes"]
            st.last_t = o["last_t"]
            for rid, entries in o["windows"].items():
                rule = self.rule_by_id.get(rid)
                if rule is None or rule.aggregate is None:
                    continue
                w = st.windows[rid] = Window.counting(rule.aggregate.count)
                for t, key, _sw, explained, ev in entries:
                    w.push(t, key, explained, tuple(ev), rule.aggregate.timespan_s, self._grace)  # type: ignore[arg-type]
            for rid, (day, patients, unexplained, history, fired) in o["days"].items():
                rule = self.rule_by_id.get(rid)
                if rule is None or rule.aggregate is None:
                    continue
                dc = st.days[rid] = DayCounter.for_aggregate(rule.aggregate)
                dc.day = day
                dc.fired = fired
                dc.patients = set(patients)
                dc.unexplained = [tuple(x) for x in unexplained]  # type: ignore[misc]
                dc.unexplained_patients = {x[2] for x in unexplained}
                dc.history = deque(history, maxlen=self.cfg.volume_history_days)
            st.case = Case.from_obj(o["case"]) if o["case"] else None
            st.browse = Case.from_obj(o["browse"]) if o.get("browse") else None
            if o.get("models") and self.models is not None:
                st.models = self.models.restore_user(o["models"])
                if st.models.behaviour.open:
                    self._open[u] = st
            self.users[u] = st

    @classmethod
    def restore(cls, context: Context, config: DetectionConfig | None, data: bytes) -> Engine:
        eng = cls(context, config)
        eng.restore_state(data)
        return eng
