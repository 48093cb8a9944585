"""Cases, not event spam: one user's findings accumulate into one case and one alert.

A case opens with a user's first finding and stays open while findings keep arriving
(``case_gap_s``), up to ``case_max_s``. Each rule adds risk once per distinct patient
(repeated accesses add a little more); a correlation rule adds its weight once when it
fires. The case becomes an alert when its risk reaches ``alert_threshold``, or at once
when an ``immediate`` rule (a hard violation) fires. Later findings update the same
alert: same id, more evidence.
"""

from __future__ import annotations

import math
from typing import Any

from detectors.alerts import SEVERITIES, Alert, alert_id_for
from detectors.config import DetectionConfig
from detectors.explain import REASONS
from detectors.rules import Rule
from emrwatch.context import Context

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
        "dirty",
        "retracted",
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
            for k in gone:
                del bucket[k]
            if gone:
                changed = True
                left = pc[patient_id] - len(gone)
                if left:
                    pc[patient_id] = left
                else:
                    del pc[patient_id]
                if not bucket:
                    del self.evidence[rid]
                    del self.patients[rid]
        if changed:
            self.dirty = True
            self.version += 1
        return changed

    def risk(self, rules: dict[str, Rule], cfg: DetectionConfig) -> float:
        total = 0.0
        weights = cfg.level_weights
        for rid, bucket in self.evidence.items():
            rule = rules[rid]
            w = weights[rule.level]
            if rule.aggregate is not None:
                # a correlation's threshold is its own calibration: when it fires, it is a case
                total += max(w, cfg.alert_threshold) if rid in self.fired else 0.0
                continue
            n_events = len(bucket)
            n_patients = len(self.patients[rid])
            total += w * (
                n_patients + cfg.repeat_weight * min(n_events - n_patients, cfg.repeat_cap)
            )
        return total

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
        for rid in order:
            rule = rules[rid]
            evs = sorted(case.evidence[rid].values(), key=lambda ev: (ev[1], ev[0]))
            if rule.aggregate is not None and rid not in case.fired:
                continue
            for ev in evs:
                all_ev[ev[0]] = ev
            values = self._values(staff, evs, case.extras.get(rid, {}))
            try:
                text = rule.reason.format(**values)
            except (KeyError, IndexError, ValueError):
                text = rule.title
            parts.append(text)
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
            reason = (reason + "; " if reason else "") + (
                "retracted: later notes or orders by the user explained the accesses"
            )
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
        )

    def _values(self, staff: Any, evs: list[Evidence], extras: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        patients = {ev[2] for ev in evs if ev[2]}
        workstations = sorted({ev[5] for ev in evs if ev[5]})
        seals = sorted({s.reason or "sealed" for p in patients if (s := ctx.seals.get(p))})
        dept = staff.department_id if staff else "unknown"
        if staff and staff.shift_start is not None and staff.shift_end is not None:
            s, e = staff.shift_start, staff.shift_end
            shift = f"{s // 60:02d}:{s % 60:02d}–{e // 60:02d}:{e % 60:02d}"
        else:
            shift = "not set"
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
