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

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
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
from detectors.explain import Explainer
from detectors.rules import Rule, compile_matcher, load_rules
from emrwatch.context import KNOWN_ROLES, Context
from emrwatch.events import EXFIL_ACTIONS, WRITE_ACTIONS, AccessEvent
from emrwatch.timeutil import in_shift

# imported here, not lazily: river's import takes a second, and replay workers fork from a
# parent that has already paid it
from models.features import FEATURES
from models.runtime import ModelScorer, UserModels, VisitScore

SNAPSHOT_VERSION = 1


@dataclass
class EngineStats:
    """What an engine saw; engines over different partitions merge with ``+``."""

    events: int = 0
    explained: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    findings: dict[str, int] = field(default_factory=dict)
    suppressed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    unexplained_ids: set[str] = field(default_factory=set)

    @property
    def explained_share(self) -> float:
        return self.explained / self.events if self.events else 0.0

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
        )


class Window:
    """One correlation rule's event-time window for one user."""

    __slots__ = ("entries", "distinct", "switches")

    def __init__(self) -> None:
        # (t, key, switched, explained, evidence)
        self.entries: deque[tuple[float, str, bool, bool, Evidence]] = deque()
        self.distinct: dict[str, int] = {}
        self.switches = 0

    def push(self, t: float, key: str, explained: bool, ev: Evidence, span: float) -> None:
        entries = self.entries
        switched = bool(entries) and entries[-1][1] != key
        entries.append((t, key, switched, explained, ev))
        self.distinct[key] = self.distinct.get(key, 0) + 1
        self.switches += switched
        horizon = t - span
        while entries and entries[0][0] < horizon:
            _, k, sw, _, _ = entries.popleft()
            self.switches -= sw
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

    def count(self, kind: str) -> int:
        if kind == "events":
            return len(self.entries)
        if kind == "distinct":
            return len(self.distinct)
        return self.switches


class DayCounter:
    """Distinct patients per local day, against the user's own history of days."""

    __slots__ = ("day", "patients", "unexplained", "unexplained_patients", "history", "fired")

    def __init__(self) -> None:
        self.day = -1
        self.fired = False  # fired today: later events only add themselves
        self.patients: set[str] = set()
        self.unexplained: list[Evidence] = []
        self.unexplained_patients: set[str] = set()
        self.history: deque[int] = deque(maxlen=14)

    def roll(self, day: int, history_days: int) -> None:
        if day != self.day:
            if self.day >= 0 and self.patients:
                if self.history.maxlen != history_days:
                    self.history = deque(self.history, maxlen=history_days)
                self.history.append(len(self.patients))
            self.day = day
            self.patients = set()
            self.unexplained = []
            self.unexplained_patients = set()
            self.fired = False


class UserState:
    __slots__ = ("writes", "windows", "days", "case", "last_t", "models")

    def __init__(self) -> None:
        self.writes: dict[str, float] = {}
        self.windows: dict[str, Window] = {}
        self.days: dict[str, DayCounter] = {}
        self.case: Case | None = None
        self.last_t = 0.0
        self.models: UserModels | None = None


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
        self.users: dict[str, UserState] = {}
        self.grant_only = frozenset(self.cfg.grant_only_roles)
        self.clerks = frozenset(self.cfg.clerk_roles)
        self.non_clinical = frozenset(self.cfg.non_clinical_resources)
        self.exceptions = list(self.cfg.exceptions)
        # statistics for evaluation and metrics
        self.events = 0
        self.explained = 0
        self.reason_counts: dict[str, int] = {}
        self.finding_counts: dict[str, int] = {r.id: 0 for r in self.rules}
        self.suppressed: dict[str, list[tuple[str, str]]] = {}  # exception id → [(rule, event)]
        self._clock = context.clock
        #: set it to a set() to collect the ids of unexplained events (evaluation)
        self.unexplained_ids: set[str] | None = None
        self._user_cache: dict[str, tuple[int, tuple[Any, str, bool, dict[str, Any]]]] = {}
        self._dirty: dict[
            str, tuple[str, Case]
        ] = {}  # alert id → (user, case) changed since the last drain

    # ------------------------------------------------------------------ facts
    def _user_facts(self, user_id: str) -> tuple[Any, str, bool, dict[str, Any]]:
        """(staff, department kind, in ED, facts that depend only on the user), cached until
        the context changes."""
        hit = self._user_cache.get(user_id)
        if hit is not None and hit[0] == self.ctx.version:
            return hit[1]
        staff = self.ctx.staff.get(user_id)
        if staff is not None:
            dept = self.ctx.departments.get(staff.department_id)
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
        value = (staff, dept_kind, in_ed, static)
        self._user_cache[user_id] = (self.ctx.version, value)
        return value

    def facts(self, e: AccessEvent, st: UserState) -> dict[str, Any]:
        """Everything the rules may test about one access (``rules.FACT_FIELDS``)."""
        ctx = self.ctx
        t = e.t
        staff, dept_kind, user_in_ed, ufacts = self._user_facts(e.user_id)
        patient = ctx.patients.get(e.patient_id) if e.patient_id else None
        if staff is not None:
            clearance = staff.clearance
            active = staff.valid_from <= t < staff.valid_until
            off_shift = not in_shift(
                self._clock.minute_of_day(t), staff.shift_start, staff.shift_end
            )
        else:
            clearance, active, off_shift = 0, False, False
        write = e.action in WRITE_ACTIONS and e.outcome == "success"
        last_write = t if write else st.writes.get(e.patient_id)
        reasons, grant_covered = self.explainer.explain(e, staff, last_write, dept_kind, user_in_ed)
        if patient is not None:
            sensitivity = patient.sensitivity
            emp = patient.employee_user_id
            self_access = emp == e.user_id
            family = (
                bool(patient.family_key)
                and staff is not None
                and patient.family_key == staff.family_key
            )
            seal = ctx.seals.get(e.patient_id)
            sealed = seal is not None and t >= seal.sealed_at and e.user_id not in seal.authorized
            vip = patient.vip
        else:
            sensitivity, emp, self_access, family, sealed, vip = 0, "", False, False, False, False
        return {
            **ufacts,
            "action": e.action,
            "resource_type": e.resource_type,
            "outcome": e.outcome,
            "emergency": e.emergency,
            "purpose": e.purpose,
            "workstation": e.workstation,
            "source": e.source,
            "event_category": e.event_category,
            "account_active": active,
            "known_patient": patient is not None,
            "sensitivity": sensitivity,
            "vip": vip,
            "patient_is_employee": bool(emp),
            "explained": bool(reasons),
            "explanations": reasons,
            "self_access": self_access,
            "coworker": bool(emp) and not self_access,
            "family": family and not self_access,
            "sealed_violation": sealed,
            "off_shift": off_shift,
            "above_clearance": patient is not None and sensitivity > clearance,
            "clinical_resource": e.resource_type not in self.non_clinical,
            "exfiltration": e.action in EXFIL_ACTIONS,
            "write": write,
            "denied": e.outcome == "failure",
            "grant_covered": grant_covered,
        }

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
            if models.case_model is not None and self._dirty:
                rules = self.rule_by_id
                todo = []
                for _, c in self._dirty.values():
                    if not c.dirty:
                        continue
                    if c.undecided(rules, cfg):
                        todo.append(c)
                    else:
                        c.model_p = None
                if todo:
                    rows = [c.features(rules, cfg) for c in todo]
                    for c, p in zip(todo, models.case_model.score(rows), strict=True):
                        c.model_p = round(p, 4)
        for user_id, case in self._dirty.values():
            if not case.dirty:
                continue
            case.dirty = False
            above = case.immediate or case.risk(self.rule_by_id, cfg) >= cfg.alert_threshold
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

    def ingest(self, e: AccessEvent) -> None:
        """Update state and cases for one event; alerts come out of :meth:`drain`."""
        st = self.users.get(e.user_id)
        if st is None:
            st = self.users[e.user_id] = UserState()
        t = e.t
        if t > st.last_t:
            st.last_t = t
        f = self.facts(e, st)
        self.events += 1
        reasons = f["explanations"]
        if reasons:
            self.explained += 1
            rc = self.reason_counts
            for r in reasons:
                rc[r] = rc.get(r, 0) + 1
        elif self.unexplained_ids is not None:
            self.unexplained_ids.add(e.event_id)
        case = st.case
        cfg = self.cfg
        if case is not None and (
            t - case.touched_t > (cfg.model_case_gap_s if case.learned_only() else cfg.case_gap_s)
            or t - case.opened_t > cfg.case_max_s
        ):
            st.case = case = None
        opened = case
        version0 = case.version if case is not None else -1
        fired0 = len(case.fired) if case is not None else -1
        if f["write"] and e.patient_id:
            st.writes[e.patient_id] = t
            if case is not None and self.retractable:
                case.retract(self.retractable, e.patient_id, t - cfg.documented_grace_s)
        ev: Evidence = (
            e.event_id,
            t,
            e.patient_id,
            e.action,
            e.resource_type,
            e.workstation,
            f["sensitivity"],
        )
        models = self.models
        if models is not None and e.patient_id:
            um = st.models
            if um is None:
                um = st.models = models.new_user()
            for vs in models.observe(e, f, um, ev):
                case = self._learned(st, e.user_id, vs, case, t)
        event_rules = self.event_rules
        for i in self._match_event(f):
            rule = event_rules[i]
            if self._suppressed(rule, e, f):
                continue
            if case is None:
                case = st.case = new_case(e.user_id, e.event_id, t)
            case.add(rule, ev)
            self.finding_counts[rule.id] += 1
        agg_rules = self.agg_rules
        for i in self._match_agg(f):
            rule = agg_rules[i]
            agg = rule.aggregate
            if agg.count == "day_distinct":  # type: ignore[union-attr]
                fired, extras = self._day_count(rule, st, e, f, ev)
            else:
                # windowed correlation, inlined: it runs for most events
                w = st.windows.get(rule.id)
                if w is None:
                    w = st.windows[rule.id] = Window()
                kind = agg.count  # type: ignore[union-attr]
                w.push(
                    t,
                    e.event_id if kind == "events" else getattr(e, agg.field),
                    f["explained"],  # type: ignore[union-attr]
                    ev,
                    agg.timespan_s,
                )  # type: ignore[union-attr]
                n = (
                    len(w.entries)
                    if kind == "events"
                    else (len(w.distinct) if kind == "distinct" else w.switches)
                )
                if n < agg.gte:  # type: ignore[union-attr]
                    continue
                if agg.evidence == "unexplained":  # type: ignore[union-attr]
                    fired = [x[4] for x in w.entries if not x[3]]
                else:
                    fired = [x[4] for x in w.entries]
                extras = None
            if not fired or self._suppressed(rule, e, f):
                continue
            if case is None:
                # the id comes from the event that opened the case, which no other case can
                # share (a window's first event may already belong to a closed case)
                case = st.case = new_case(e.user_id, e.event_id, t)
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
                self._dirty[case.alert_id] = (e.user_id, case)

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
            )
            if t > case.touched_t:
                case.touched_t = t
            self._dirty[case.alert_id] = (user_id, case)
        elif (
            case is not None
            and self.models is not None
            and self.models.case_model is not None
            and any(pid in pc for pc in case.patients.values())
            and case.see(pid, vs.level)
        ):
            # the case model reads these levels: the alert must be rebuilt from them
            case.dirty = True
            self._dirty[case.alert_id] = (user_id, case)
        return case

    def _day_count(
        self, rule: Rule, st: UserState, e: AccessEvent, f: dict[str, Any], ev: Evidence
    ) -> tuple[list[Evidence], dict[str, Any] | None]:
        """Update today's distinct count; return the evidence to add when the rule holds."""
        agg = rule.aggregate
        assert agg is not None
        explained = f["explained"]
        dc = st.days.get(rule.id)
        if dc is None:
            dc = st.days[rule.id] = DayCounter()
        dc.roll(self._clock.local_day(e.t), self.cfg.volume_history_days)
        dc.patients.add(e.patient_id)
        if not explained:
            dc.unexplained.append(ev)
            dc.unexplained_patients.add(e.patient_id)
        n = len(dc.patients)
        hist = dc.history
        if (
            n < agg.gte
            or len(hist) < agg.min_history_days
            or len(dc.unexplained_patients) < agg.min_unexplained
        ):
            return [], None
        base = statistics.median(hist)
        if n < agg.baseline_ratio * base:
            return [], None
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
        events close it."""
        return []

    # ------------------------------------------------------------------ stats
    @property
    def explained_share(self) -> float:
        return self.explained / self.events if self.events else 0.0

    def stats(self) -> EngineStats:
        return EngineStats(
            events=self.events,
            explained=self.explained,
            reasons=dict(self.reason_counts),
            findings=dict(self.finding_counts),
            suppressed={k: list(v) for k, v in self.suppressed.items()},
            unexplained_ids=set(self.unexplained_ids or ()),
        )

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, users: Iterable[str] | None = None) -> bytes:
        """Per-user state as JSON (not pickle: a snapshot is data, never code)."""
        keys = self.users.keys() if users is None else [u for u in users if u in self.users]
        out: dict[str, Any] = {}
        for u in keys:
            st = self.users[u]
            out[u] = {
                "writes": st.writes,
                "last_t": st.last_t,
                "windows": {r: [list(x) for x in w.entries] for r, w in st.windows.items()},
                "days": {
                    r: [d.day, sorted(d.patients), d.unexplained, list(d.history), d.fired]
                    for r, d in st.days.items()
                },
                "case": st.case.to_obj() if st.case is not None else None,
                "models": st.models.to_obj() if st.models is not None else None,
            }
        return orjson.dumps({"version": SNAPSHOT_VERSION, "users": out})

    def restore_state(self, data: bytes) -> None:
        doc = orjson.loads(data)
        if doc.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {doc.get('version')} is not {SNAPSHOT_VERSION}")
        for u, o in doc["users"].items():
            st = UserState()
            st.writes = o["writes"]
            st.last_t = o["last_t"]
            for rid, entries in o["windows"].items():
                rule = self.rule_by_id.get(rid)
                if rule is None or rule.aggregate is None:
                    continue
                w = st.windows[rid] = Window()
                for t, key, _sw, explained, ev in entries:
                    w.push(t, key, explained, tuple(ev), rule.aggregate.timespan_s)  # type: ignore[arg-type]
            for rid, (day, patients, unexplained, history, fired) in o["days"].items():
                dc = st.days[rid] = DayCounter()
                dc.day = day
                dc.fired = fired
                dc.patients = set(patients)
                dc.unexplained = [tuple(x) for x in unexplained]  # type: ignore[misc]
                dc.unexplained_patients = {x[2] for x in unexplained}
                dc.history = deque(history, maxlen=self.cfg.volume_history_days)
            st.case = Case.from_obj(o["case"]) if o["case"] else None
            if o.get("models") and self.models is not None:
                st.models = self.models.restore_user(o["models"])
            self.users[u] = st

    @classmethod
    def restore(cls, context: Context, config: DetectionConfig | None, data: bytes) -> Engine:
        eng = cls(context, config)
        eng.restore_state(data)
        return eng
