"""Cases, not event spam: one user's findings accumulate into one case and one alert.

A case opens with a user's first finding and stays open while findings keep arriving
(``case_gap_s``), up to ``case_max_s``. Each rule adds risk once per distinct patient
(repeated accesses add a little more); a correlation rule adds its weight once when it
fires. The case becomes an alert when its risk reaches ``alert_threshold``, or at once
when an ``immediate`` rule (a hard violation) fires. Later findings update the same
alert: same id, more evidence.

Learned models (``models/``) take part in two ways. A visit the models find unusual enough
is *learned evidence* under the pseudo-rule :data:`LEARNED_RULE_ID`: it adds
``model_weight`` risk per level above ``model_min_level``, once per patient (its highest
level), and can open a case by itself. And a case model scores the whole case; soft rule
risk is scaled by ``0.5 + P(misuse)`` (hard, ``immediate`` rules alert whatever it says);
in a *mixed* case (rule findings and learned evidence) whose learned evidence is a single
patient's visit, that visit's learned risk is scaled by :func:`learned_scale`, from
:data:`LEARNED_FLOOR` up to 1: the case model can take a benign mixed case back under the
threshold even when its learned evidence alone would pass it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

from detectors.alerts import RETRACTED_MARK, SEVERITIES, Alert, alert_id_for
from detectors.config import DetectionConfig
from detectors.explain import REASONS
from detectors.rules import Rule
from emrwatch.context import Context

#: the pseudo-rule under which learned models add evidence to a case
LEARNED_RULE_ID = "learned-behaviour"
LEARNED_RULE = Rule(
    id=LEARNED_RULE_ID,
    title="Behaviour unusual for the user and their peers (learned models)",
    level="medium",
    description="Visits to patients' charts that the learned models score as rare among "
    "the ordinary visits of the user's peers or of the user's own history.",
    reason="{learned_why}",
    detection={},
    predicate=lambda f: False,
    scenario="",
)

#: the least the case model keeps of the learned risk of a mixed case whose learned evidence
#: is one patient's visit (at P(misuse) = 0; all of it from P = 0.5 on). The learned evidence
#: is calibrated on its own, so the case model may only take a little off it: enough to let
#: a lone unusual visit next to a few no-care accesses fall back under the threshold, not
#: enough to drop one very unusual visit. Several unusual visits are left whole: they are
#: the pattern the learned models exist for, and the verdict classifier has never seen that
#: misuse (``models.train.UNSEEN_SCENARIOS``), so it cannot judge it. (Chosen on the tuning
#: seeds, leave-one-seed-out.)
LEARNED_FLOOR = 0.75


def learned_scale(p: float) -> float:
    """What a case model's P(misuse) ``p`` keeps of a lone learned visit's risk in a mixed
    case."""
    return min(1.0, LEARNED_FLOOR + 2.0 * (1.0 - LEARNED_FLOOR) * p)


#: evidence tuple: (event_id, t, patient_id, action, resource_type, workstation, sensitivity)
Evidence = tuple[str, float, str, str, str, str, int]


class Case:
    __slots__ = (
        "alert_id",
        "first_t",
        "last_t",
        "opened_t",
        "touched_t",
        "evidence",
        "patients",
        "fired",
        "alerted",
        "immediate",
        "version",
        "extras",
        "followups",
        "dirty",
        "retracted",
        "levels",
        "extrapolated",
        "seen_levels",
        "why",
        "model_p",
        "withdrawn",
    )

    def __init__(self, alert_id: str, t: float) -> None:
        self.alert_id = alert_id
        self.first_t = t  # earliest evidence
        self.last_t = t  # latest evidence
        # processing time (event time of the events that opened and last fed the case):
        # evidence of a correlation may be older than the case itself
        self.opened_t = t
        self.touched_t = t
        self.evidence: dict[str, dict[str, Evidence]] = {}  # rule id → event id → evidence
        self.patients: dict[str, dict[str, int]] = {}  # rule id → patient → events (kept in step)
        self.fired: set[str] = set()  # correlation rules that fired in this case
        self.alerted = False
        self.retracted = False
        self.immediate = False
        self.version = 0
        self.extras: dict[str, dict[str, Any]] = {}  # rule id → values for its reason
        self.dirty = False
        self.levels: dict[str, float] = {}  # patient → highest level of its learned evidence
        #: patient → ordinary visits behind its level, when that level was extrapolated
        self.extrapolated: dict[str, int] = {}
        self.seen_levels: dict[str, float] = {}  # patient → highest level of any visit
        self.why: dict[str, float] = {}  # feature → weight in the learned evidence
        self.model_p: float | None = None  # the case model's P(misuse), set when drained
        #: why correlations were withdrawn from it (a clock found behind), for the reason
        self.withdrawn = ""
        #: accesses of the user's other somewhat unusual visits while the case holds learned
        #: evidence (``model_follow_level``): shown with it, never counted in its risk
        self.followups: dict[str, Evidence] = {}

    def add(self, rule: Rule, ev: Evidence) -> bool:
        bucket = self.evidence.setdefault(rule.id, {})
        if ev[0] in bucket:
            return False
        bucket[ev[0]] = ev
        pc = self.patients.setdefault(rule.id, {})
        pc[ev[2]] = pc.get(ev[2], 0) + 1
        if ev[1] > self.last_t:
            self.last_t = ev[1]
        if ev[1] < self.first_t:
            self.first_t = ev[1]
        if rule.immediate:
            self.immediate = True
        self.dirty = True
        self.version += 1  # counts changes, so it does not depend on batch sizes
        return True

    def retract(self, rule_ids: set[str], patient_id: str, since: float) -> bool:
        """Drop soft findings on ``patient_id`` newer than ``since``: documentation explained them."""
        changed = False
        for rid in rule_ids:
            bucket = self.evidence.get(rid)
            if not bucket:
                continue
            pc = self.patients[rid]
            if patient_id not in pc:
                continue
            gone = [k for k, ev in bucket.items() if ev[2] == patient_id and ev[1] >= since]
            if gone:
                changed = True
                self._drop(rid, gone)
        if changed:
            self.withdrawn = ""  # the latest change says why it went
            self.dirty = True
            self.version += 1
        return changed

    def _drop(self, rid: str, keys: Iterable[str]) -> bool:
        """Remove the evidence ``keys`` of rule ``rid``, its patient counts in step; True
        (and the rule gone from the case) when none of its evidence is left."""
        bucket, pc = self.evidence[rid], self.patients[rid]
        for k in keys:
            p = bucket.pop(k)[2]
            if pc[p] > 1:
                pc[p] -= 1
            else:
                del pc[p]
        if bucket:
            return False
        del self.evidence[rid], self.patients[rid]
        return True

    def withdraw(self, event_ids: Collection[str], rules: dict[str, Rule], why: str) -> bool:
        """Drop the correlations that ``event_ids`` (accesses whose stamps were wrong) took
        part in: each windowed rule's evidence within its span of them. Findings on single
        accesses and day counts stay: an access judged a few hours off still happened,
        while a correlation joined accesses that did not happen together."""
        changed = False
        for rid in list(self.evidence):
            rule = rules.get(rid)
            agg = rule.aggregate if rule is not None else None
            if agg is None or agg.count == "day_distinct":
                continue
            bucket = self.evidence[rid]
            hit = [ev[1] for k, ev in bucket.items() if k in event_ids]
            if not hit:
                continue
            lo, hi = min(hit) - agg.timespan_s, max(hit) + agg.timespan_s
            if self._drop(rid, [k for k, ev in bucket.items() if lo <= ev[1] <= hi]):
                self.fired.discard(rid)  # nothing left of the correlation
                self.extras.pop(rid, None)
            changed = True
        if changed:
            self.withdrawn = why
            self.dirty = True
            self.version += 1
        return changed

    def add_learned(
        self,
        evidence: list[Evidence],
        patient_id: str,
        level: float,
        attribution: dict[str, float],
        min_level: float,
        extrapolated_from: int = 0,
    ) -> None:
        """A visit the learned models flagged: its accesses become evidence.
        ``extrapolated_from``: the calibration's ordinary visits, when ``level`` lies beyond
        what they can tell."""
        bucket = self.evidence.setdefault(LEARNED_RULE_ID, {})
        pc = self.patients.setdefault(LEARNED_RULE_ID, {})
        for ev in evidence:
            if ev[0] in bucket:
                continue
            bucket[ev[0]] = ev
            pc[ev[2]] = pc.get(ev[2], 0) + 1
            if ev[1] > self.last_t:
                self.last_t = ev[1]
            if ev[1] < self.first_t:
                self.first_t = ev[1]
        if level > self.levels.get(patient_id, 0.0):
            self.levels[patient_id] = round(level, 4)
            if extrapolated_from:
                self.extrapolated[patient_id] = extrapolated_from
            else:
                self.extrapolated.pop(patient_id, None)
        weight = max(0.1, level - min_level)
        for k, share in attribution.items():
            self.why[k] = round(self.why.get(k, 0.0) + share * weight, 4)
        self.see(patient_id, level)
        self.dirty = True
        self.version += 1

    def follow(self, evidence: list[Evidence]) -> bool:
        """A somewhat unusual visit of the user while the case holds learned evidence:
        its accesses join the alert's evidence (the burst around the flagged visits) but
        not its risk or the case model's features. True if any was new."""
        held = {k for b in self.evidence.values() for k in b}
        new = [ev for ev in evidence if ev[0] not in held and ev[0] not in self.followups]
        for ev in new:
            self.followups[ev[0]] = ev
        if new:
            self.dirty = True
            self.version += 1
        return bool(new)

    def see(self, patient_id: str, level: float) -> bool:
        """Remember how unusual a visit of the user was while the case is open; True if
        that raised the patient's level."""
        if level > self.seen_levels.get(patient_id, -1.0):
            self.seen_levels[patient_id] = round(level, 4)
            return True
        return False

    def undecided(self, rules: dict[str, Rule], cfg: DetectionConfig) -> bool:
        """Whether the case model can change this case's fate: the risk it scales (rule risk
        by 0.5 … 1.5, a lone learned visit's in a mixed case by :data:`LEARNED_FLOOR` … 1)
        straddles the threshold. Only such cases are scored, so the others keep their risk as
        it is; and only once the models have scored the visits of at least half of the case's
        rule patients (before that, the rules alone decide)."""
        if self.immediate or not cfg.model_fusion:
            return False
        # judged only once the models have scored the visits of most of its patients
        rule_patients = {
            p for rid, pc in self.patients.items() if rid != LEARNED_RULE_ID for p in pc
        }
        seen = sum(1 for p in rule_patients if p in self.seen_levels)
        if not rule_patients or 2 * seen < len(rule_patients):
            return False
        r = self.rule_risk(rules, cfg)
        if r <= 0:
            return False
        lr = self.learned_risk(cfg) if self.levels else 0.0
        # rule risk scales by 0.5 … 1.5, a lone learned visit's by LEARNED_FLOOR … 1
        floor = LEARNED_FLOOR if len(self.levels) == 1 else 1.0
        return 0.5 * r + floor * lr < cfg.alert_threshold <= 1.5 * r + lr

    def learned_only(self) -> bool:
        return len(self.evidence) == 1 and LEARNED_RULE_ID in self.evidence

    def quiet_for(self, rules: Iterable[Rule], t: float, cfg: DetectionConfig) -> bool:
        """Do the findings of ``rules`` at ``t`` open a case of their own instead of joining
        this one? A case of learned evidence only stays open longer (``model_case_gap_s``)
        to add up slow browsing, and low-level findings (no care relationship) still join
        it: weak evidence is weighed together. A named misuse (any higher level) after the
        rules' own gap (``case_gap_s``) is another incident: weighed together with days-old
        visits, the case model could rate it down."""
        return (
            t - self.touched_t > cfg.case_gap_s
            and self.learned_only()
            and any(r.level != "low" for r in rules)
        )

    def lapsed(self, t: float, cfg: DetectionConfig, browsing: bool = False) -> bool:
        """Whether a finding at ``t`` comes too late for this case: past its gap since the
        last finding (longer, ``model_case_gap_s``, for a case of learned evidence only, or
        for learned evidence joining a ``browsing`` case) or its longest span."""
        slow = browsing or self.learned_only()
        gap = cfg.model_case_gap_s if slow else cfg.case_gap_s
        return t - self.touched_t > gap or t - self.opened_t > cfg.case_max_s

    def browsing(self, low: Collection[str]) -> bool:
        """Learned evidence, and besides it only findings of ``low`` rules (no care
        relationship): slow browsing, which goes on for days. When the rules' gap closes
        such a case to findings of the rules, later learned evidence still joins it."""
        ev = self.evidence
        return LEARNED_RULE_ID in ev and all(r == LEARNED_RULE_ID or r in low for r in ev)

    def rule_risk(self, rules: dict[str, Rule], cfg: DetectionConfig) -> float:
        total = 0.0
        weights = cfg.level_weights
        for rid, bucket in self.evidence.items():
            if rid == LEARNED_RULE_ID:
                continue
            rule = rules[rid]
            w = weights[rule.level]
            if rule.aggregate is not None:
                # a correlation's threshold is its own calibration: when it fires, it is a case
                # (unless documentation has since taken back enough of its patients)
                if rid in self.fired and (
                    not rule.retract_on_documentation
                    or len(self.patients.get(rid, ())) >= rule.aggregate.gte
                ):
                    total += max(w, cfg.alert_threshold)
                continue
            n_events = len(bucket)
            n_patients = len(self.patients[rid])
            total += w * (
                n_patients + cfg.repeat_weight * min(n_events - n_patients, cfg.repeat_cap)
            )
        return total

    def learned_risk(self, cfg: DetectionConfig) -> float:
        lo = cfg.model_min_level
        return cfg.model_weight * sum(max(0.0, lv - lo) for lv in self.levels.values())

    def risk(self, rules: dict[str, Rule], cfg: DetectionConfig) -> float:
        """Rule risk (scaled by the case model when there is one) plus learned risk."""
        r = self.rule_risk(rules, cfg)
        lr = self.learned_risk(cfg) if self.levels else 0.0
        if self.model_p is not None and cfg.model_fusion:
            r *= 0.5 + self.model_p
            if len(self.levels) == 1:
                lr *= learned_scale(self.model_p)
        return r + lr

    def features(self, rules: dict[str, Rule], cfg: DetectionConfig) -> dict[str, float]:
        """The numbers a case model scores (``models.batch.CASE_FEATURES``)."""
        rids = [r for r in self.evidence if r != LEARNED_RULE_ID]
        patients = {p for pc in self.patients.values() for p in pc}
        seen = [lv for p, lv in self.seen_levels.items() if p in patients]
        return {
            "rule_risk": self.rule_risk(rules, cfg),
            "patients": float(len(patients)),
            "events": float(self.event_count()),
            "rules": float(len(rids)),
            "max_rule_level": float(
                max((SEVERITIES.index(rules[r].level) for r in rids), default=0)
            ),
            "correlation": 1.0 if self.fired else 0.0,
            "no_care": float(len(self.evidence.get("no-care-relationship", ()))),
            "max_level": max(seen, default=0.0),
            "mean_level": sum(seen) / len(seen) if seen else 0.0,
            "learned_patients": float(len(self.levels)),
            "span_hours": min(72.0, (self.last_t - self.first_t) / 3600.0),
        }

    def event_count(self) -> int:
        return len({k for b in self.evidence.values() for k in b})

    # ------------------------------------------------------------------ persistence
    def to_obj(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "first_t": self.first_t,
            "last_t": self.last_t,
            "opened_t": self.opened_t,
            "touched_t": self.touched_t,
            "evidence": {r: list(b.values()) for r, b in self.evidence.items()},
            "fired": sorted(self.fired),
            "alerted": self.alerted,
            "retracted": self.retracted,
            "immediate": self.immediate,
            "version": self.version,
            "extras": self.extras,
            "levels": self.levels,
            "extrapolated": self.extrapolated,
            "seen_levels": self.seen_levels,
            "why": self.why,
            "model_p": self.model_p,
            "withdrawn": self.withdrawn,
            **({"followups": list(self.followups.values())} if self.followups else {}),
        }

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> Case:
        c = cls(o["alert_id"], o["first_t"])
        c.last_t = o["last_t"]
        c.opened_t = o["opened_t"]
        c.touched_t = o["touched_t"]
        c.evidence = {r: {ev[0]: tuple(ev) for ev in evs} for r, evs in o["evidence"].items()}  # type: ignore[misc]
        for r, bucket in c.evidence.items():
            pc = c.patients[r] = {}
            for ev in bucket.values():
                pc[ev[2]] = pc.get(ev[2], 0) + 1
        c.fired = set(o["fired"])
        c.alerted = o["alerted"]
        c.retracted = o.get("retracted", False)
        c.immediate = o["immediate"]
        c.version = o["version"]
        c.extras = o.get("extras", {})
        c.levels = dict(o.get("levels", {}))
        c.extrapolated = {k: int(n) for k, n in o.get("extrapolated", {}).items()}
        c.seen_levels = dict(o.get("seen_levels", {}))
        c.why = dict(o.get("why", {}))
        c.model_p = o.get("model_p")
        c.withdrawn = o.get("withdrawn", "")
        c.followups = {ev[0]: tuple(ev) for ev in o.get("followups", ())}  # type: ignore[misc]
        return c


def new_case(user_id: str, opening_event_id: str, t: float) -> Case:
    return Case(alert_id_for(user_id, opening_event_id), t)


def _span(ctx: Context, first: float, last: float) -> str:
    clock = ctx.clock
    d1, d2 = clock.local_iso(first)[:10], clock.local_iso(last)[:10]
    if d1 == d2:
        if clock.hhmm(first) == clock.hhmm(last):
            return f"on {d1} at {clock.hhmm(first)}"
        return f"on {d1} {clock.hhmm(first)}–{clock.hhmm(last)}"
    return f"from {d1} {clock.hhmm(first)} to {d2} {clock.hhmm(last)}"


def _counted(values: list[str]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(
        f"{k}×{n}" if n > 1 else k for k, n in sorted(counts.items(), key=lambda kv: -kv[1])
    )


def _fmt_date(t: float, ctx: Context) -> str:
    return "open" if math.isinf(t) else ctx.clock.local_iso(t)[:10]


class AlertBuilder:
    """Turns a case into the alert a privacy officer reads."""

    def __init__(self, ctx: Context, cfg: DetectionConfig, rules: dict[str, Rule]) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.rules = rules
        #: model name → version of the learned models that scored the cases (every alert
        #: records it)
        self.model_versions: dict[str, str] = {}
        #: feature → plain words, for the learned finding's reason
        self.feature_words: dict[str, str] = {}

    def build(self, user_id: str, case: Case) -> Alert:
        ctx, rules = self.ctx, self.rules
        staff = ctx.staff.get(user_id)
        risk = case.risk(rules, self.cfg)
        order = sorted(
            case.evidence,
            key=lambda rid: (-SEVERITIES.index(rules[rid].level), rid),
        )
        parts: list[str] = []
        findings: list[dict[str, Any]] = []
        all_ev: dict[str, Evidence] = {}
        flagged_by: dict[str, list[str]] = {}  # event id → the rules it is evidence for
        why_said = False  # the alert's reason says once why the user has no care relationship
        for rid in order:
            rule = rules[rid]
            evs = sorted(case.evidence[rid].values(), key=lambda ev: (ev[1], ev[0]))
            if rule.aggregate is not None and rid not in case.fired:
                continue
            for ev in evs:
                all_ev[ev[0]] = ev
                flagged_by.setdefault(ev[0], []).append(rid)
            extras = (
                {"learned_why": self._learned_why(staff, case, evs)}
                if rid == LEARNED_RULE_ID
                else case.extras.get(rid, {})
            )
            values = self._values(staff, evs, extras)
            try:
                text = rule.reason.format(**values)
            except (KeyError, IndexError, ValueError):
                text = rule.title
            part = text
            if "{unexplained_why}" in rule.reason:
                if why_said:
                    # the same words (they depend on the user only) once is enough
                    part = part.replace(values["unexplained_why"], "").strip().rstrip(";,").strip()
                why_said = True
            parts.append(part)
            findings.append(
                {
                    "rule": rid,
                    "title": rule.title,
                    "level": rule.level,
                    "events": len(evs),
                    "patients": values["patients_n"],
                    "reason": text,
                }
            )
        if LEARNED_RULE_ID in case.evidence:  # the user's other somewhat unusual visits
            for ev in case.followups.values():
                if ev[0] not in all_ev:
                    all_ev[ev[0]] = ev
                    flagged_by[ev[0]] = [LEARNED_RULE_ID]
        levels = [SEVERITIES.index(rules[f["rule"]].level) for f in findings] or [0]
        sev = max(levels)
        if risk >= 3 * self.cfg.alert_threshold and sev < 3:
            sev += 1
        evs_sorted = sorted(all_ev.values(), key=lambda ev: (ev[1], ev[0]))
        patients: list[str] = []
        for ev in evs_sorted:
            if ev[2] and ev[2] not in patients:
                patients.append(ev[2])
        reason = "; ".join(parts)
        reason = reason[:1].upper() + reason[1:]
        status = "open"
        if not case.immediate and risk < self.cfg.alert_threshold:
            status = "retracted"
            why = case.withdrawn or "later notes or orders by the user explained the accesses"
            if (
                case.model_p is not None
                and case.rule_risk(rules, self.cfg) >= self.cfg.alert_threshold
            ):
                why = f"the case model rates it unlikely misuse (P={case.model_p:.2f})"
            reason = (reason + "; " if reason else "") + RETRACTED_MARK + why
        return Alert(
            alert_id=case.alert_id,
            detector=[f["rule"] for f in findings],
            severity=SEVERITIES[sev],
            score=round(1.0 - math.exp(-risk), 4),
            user_id=user_id,
            patient_ids=patients,
            event_ids=[ev[0] for ev in evs_sorted],
            first_seen=ctx.clock.local_iso(evs_sorted[0][1]) if evs_sorted else "",
            last_seen=ctx.clock.local_iso(evs_sorted[-1][1]) if evs_sorted else "",
            reason=reason,
            department_id=staff.department_id if staff else "",
            role=staff.role if staff else "",
            risk=round(risk, 4),
            version=case.version,
            findings=findings,
            explanations_checked=list(REASONS),
            status=status,
            model_versions=dict(self.model_versions),
            evidence=[
                {
                    "event_id": ev[0],
                    "ts": ctx.clock.local_iso(ev[1]),
                    "patient_id": ev[2],
                    "action": ev[3],
                    "resource_type": ev[4],
                    "workstation": ev[5],
                    "rules": flagged_by.get(ev[0], []),
                }
                for ev in evs_sorted
            ],
        )

    def _learned_why(self, staff: Any, case: Case, evs: list[Evidence]) -> str:
        """The learned finding in words: how rare, compared with whom, and which features."""
        top_patient = max(case.levels, key=lambda p: (case.levels[p], p), default="")
        top = case.levels.get(top_patient, 0.0)
        known = case.extrapolated.get(top_patient, 0)
        peers = f"{staff.role}s of {staff.department_id}" if staff else "peers"
        n = len(case.levels)
        total = sum(case.why.values())
        words = self.feature_words
        drivers = [
            f"{words.get(k, k.replace('_', ' '))} ({v / total:.0%})"
            for k, v in sorted(case.why.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            if total > 0 and v / total >= 0.1
        ]
        span = _span(self.ctx, evs[0][1], evs[-1][1]) if evs else ""
        text = f"{n} patient chart(s) used in ways rare for this user and for {peers} {span} " + (
            f"(the most unusual: rarer than any of the {known:,} ordinary visits the models "
            f"were calibrated on; extrapolated, about 1 in {10**top:,.0f})"
            if known
            else f"(the most unusual: about 1 in {10**top:,.0f} ordinary visits)"
        )
        return text + (": " + "; ".join(drivers) if drivers else "")

    def _values(self, staff: Any, evs: list[Evidence], extras: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        patients = {ev[2] for ev in evs if ev[2]}
        workstations = sorted({ev[5] for ev in evs if ev[5]})
        seals = sorted({s.reason or "sealed" for p in patients if (s := ctx.seals.get(p))})
        dept = staff.department_id if staff else "unknown"
        shift = (staff.shift_words if staff else "") or "not set"
        grants = ctx.grants.get(staff.user_id, []) if staff else []
        grant_scope = (
            "; ".join(
                f"{'all departments' if g.departments is None else ','.join(sorted(g.departments))}: "
                f"{'all actions' if g.actions is None else ','.join(sorted(g.actions))} "
                f"{_fmt_date(g.valid_from, ctx)}..{_fmt_date(g.valid_until - 1, ctx)}"
                for g in grants
            )
            or "no grant"
        )
        validity = (
            f"valid {_fmt_date(staff.valid_from, ctx)} to {_fmt_date(staff.valid_until - 1, ctx)}"
            if staff
            else "not on the staff roster"
        )
        values: dict[str, Any] = {
            "events_n": len(evs),
            "patients_n": len(patients),
            "span": _span(ctx, evs[0][1], evs[-1][1]) if evs else "",
            "shift": shift,
            "department": dept,
            "role": staff.role if staff else "unknown account",
            "clearance": staff.clearance if staff else "none",
            "max_sensitivity": max((ev[6] for ev in evs), default=0),
            "seal_reasons": ", ".join(seals) or "sealed",
            "validity": validity,
            "grant_scope": grant_scope,
            "actions": _counted([ev[3] for ev in evs]),
            "resources": _counted([ev[4] for ev in evs]),
            "workstations": ", ".join(workstations),
            "workstations_n": len(workstations),
            "switches": sum(1 for a, b in zip(evs, evs[1:], strict=False) if a[5] != b[5]),
            "unexplained_why": (
                f"not attending, not under care of {dept}, no notes or orders by the user, "
                "no service or administrative role for the encounter, no grant"
            ),
        }
        values.update(extras)
        return values
