"""Explain first (EBAS, Fabbri & LeFevre): why was this access legitimate?

Most accesses have a reason that a privacy officer would accept. Only accesses with no
reason, or ones that are forbidden whatever the reason, may feed alerts. ``explain``
returns the codes of every reason that holds, in a fixed order; the empty tuple means
unexplained.
"""

from __future__ import annotations

from detectors.config import DetectionConfig
from emrwatch.context import KNOWN_ROLES, Context, Staff
from emrwatch.events import AccessEvent

#: reason code → what it means, in words for the case view.
REASONS: dict[str, str] = {
    "attending": "the user is the attending physician of the patient's encounter",
    "care_department": "the patient is under care in the user's department",
    "documented": "the user charted or ordered for this patient recently",
    "service_department": "a service department serving the patient's active encounter",
    "administrative": "administrative work on a current or recently discharged patient",
    "grant": "an explicit grant covers this department, action and date",
    "emergency_department": "emergency department work",
}


class Explainer:
    """Per-event explanation over the context's indexes: a scan of one patient's few encounters."""

    __slots__ = (
        "ctx",
        "before",
        "after",
        "service_after",
        "admin_after",
        "ed_margin",
        "grant_only",
        "documented_window",
    )

    def __init__(self, ctx: Context, cfg: DetectionConfig) -> None:
        self.ctx = ctx
        self.before = cfg.care_margin_before_s
        self.after = cfg.care_margin_after_s
        self.service_after = cfg.service_margin_s
        self.admin_after = cfg.admin_after_discharge_s
        self.ed_margin = cfg.emergency_margin_s
        self.grant_only = frozenset(cfg.grant_only_roles)
        self.documented_window = cfg.documented_window_s

    def explain(
        self,
        e: AccessEvent,
        staff: Staff | None,
        last_write: float | None,
        dept_kind: str,
        user_in_ed: bool,
    ) -> tuple[tuple[str, ...], bool]:
        """(reason codes, grant_covered) for one access."""
        if staff is None:
            return (), False
        t = e.t
        uid = e.user_id
        encs = self.ctx.encounters_of(e.patient_id)
        role = staff.role
        reasons: list[str] = []
        attending = care = service = admin = ed = False
        near_depts: list[str] = []  # departments caring for the patient around t
        seen_depts: list[str] = []  # every department that has treated the patient up to t
        if encs:
            dept = staff.department_id
            before, after = self.before, self.after
            departments = self.ctx.departments
            for enc in encs:
                start, end = enc.start, enc.end
                if start - before <= t:
                    seen_depts.append(enc.department_id)
                if start - before <= t <= end + after:
                    near_depts.append(enc.department_id)
                    if enc.attending_user_id == uid:
                        attending = True
                    if enc.department_id == dept:
                        care = True
                if start - before <= t <= end + self.service_after:
                    service = True
                if start - before <= t <= end + self.admin_after:
                    admin = True
                if user_in_ed and start - self.ed_margin <= t <= end + after:
                    d = departments.get(enc.department_id)
                    if d is not None and d.is_emergency:
                        ed = True
        grant_covered = False
        grants = self.ctx.grants.get(uid)
        if grants:
            for g in grants:
                # a department grant covers that department's patients, past ones included:
                # research cohorts and audits look back
                if g.covers(t, e.action, seen_depts):
                    grant_covered = True
                    break
        if role in self.grant_only:
            return (("grant",) if grant_covered else ()), grant_covered
        documented = last_write is not None and t - last_write <= self.documented_window
        if attending:
            reasons.append("attending")
        if role not in KNOWN_ROLES:
            # unknown roles are treated conservatively: only personal reasons count
            if documented:
                reasons.append("documented")
            if grant_covered:
                reasons.append("grant")
            return tuple(reasons), grant_covered
        if care and dept_kind == "clinical":
            reasons.append("care_department")
        if documented:
            reasons.append("documented")
        if service and dept_kind == "service":
            reasons.append("service_department")
        if admin and dept_kind == "administrative":
            reasons.append("administrative")
        if grant_covered:
            reasons.append("grant")
        if user_in_ed and (ed or e.emergency):
            reasons.append("emergency_department")
        return tuple(reasons), grant_covered
