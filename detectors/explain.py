"""Explain first (EBAS, Fabbri & LeFevre): why was this access legitimate?

Most accesses have a reason that a privacy officer would accept. Only accesses with no
reason, or ones that are forbidden whatever the reason, may feed alerts. ``explain``
returns the codes of every reason that holds, in a fixed order; the empty tuple means
unexplained.
"""

from __future__ import annotations

from typing import Any

from detectors.config import DetectionConfig
from emrwatch.context import KNOWN_ROLES, Context, Grant, Staff
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


#: index into :attr:`EncounterState.table`: bit 2 documented, bit 1 grant, bit 0 emergency
DOCUMENTED, GRANT, EMERGENCY = 4, 2, 1
_INF = float("inf")


class EncounterState:
    """What one patient's encounters say about one user's access, and the event times over
    which that holds: ``lo_in <= t``, ``lo_ex < t``, ``t <= hi_in`` and ``t < hi_ex``.

    Within that range the encounter-derived reasons cannot change, so the engine reuses the
    state for a user's next accesses to the same patient (a chart visit is several) and only
    the per-event parts (documentation, grants, the emergency flag) are looked at again.
    ``table`` holds the reason codes for each combination of those per-event parts."""

    __slots__ = ("lo_in", "lo_ex", "hi_in", "hi_ex", "seen", "table")

    def __init__(
        self,
        lo_in: float,
        lo_ex: float,
        hi_in: float,
        hi_ex: float,
        seen: tuple[str, ...],
        table: tuple[tuple[str, ...], ...],
    ) -> None:
        self.lo_in, self.lo_ex, self.hi_in, self.hi_ex = lo_in, lo_ex, hi_in, hi_ex
        self.seen = seen  # every department that has treated the patient up to t
        self.table = table

    def holds(self, t: float) -> bool:
        return self.lo_in <= t and self.lo_ex < t and t <= self.hi_in and t < self.hi_ex


def _reason_table(
    role: str,
    dept_kind: str,
    user_in_ed: bool,
    grant_only: frozenset[str],
    attending: bool,
    care: bool,
    service: bool,
    admin: bool,
    ed: bool,
) -> tuple[tuple[str, ...], ...]:
    """The reason codes for each (documented, grant, emergency) combination, in the fixed
    order of :data:`REASONS`."""
    out: list[tuple[str, ...]] = []
    for idx in range(8):
        documented, grant, emergency = bool(idx & DOCUMENTED), bool(idx & GRANT), bool(idx & 1)
        if role in grant_only:
            out.append(("grant",) if grant else ())
            continue
        reasons: list[str] = []
        if attending:
            reasons.append("attending")
        if role not in KNOWN_ROLES:
            # unknown roles are treated conservatively: only personal reasons count
            if documented:
                reasons.append("documented")
            if grant:
                reasons.append("grant")
            out.append(tuple(reasons))
            continue
        if care and dept_kind == "clinical":
            reasons.append("care_department")
        if documented:
            reasons.append("documented")
        if service and dept_kind == "service":
            reasons.append("service_department")
        if admin and dept_kind == "administrative":
            reasons.append("administrative")
        if grant:
            reasons.append("grant")
        if user_in_ed and (ed or emergency):
            reasons.append("emergency_department")
        out.append(tuple(reasons))
    return tuple(out)


_NO_REASONS: tuple[tuple[str, ...], ...] = ((),) * 8
#: an unknown account: nothing explains it, at any time
UNKNOWN_USER_STATE = EncounterState(-_INF, -_INF, _INF, _INF, (), _NO_REASONS)


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
        "_tables",
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
        self._tables: dict[tuple[str, str, bool, bool, bool, bool, bool, bool], Any] = {}

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
        st = self.encounter_state(e.user_id, staff, e.patient_id, e.t, dept_kind, user_in_ed)
        return self.finish(st, e, last_write, self.ctx.grants.get(e.user_id))

    def finish(
        self,
        st: EncounterState,
        e: AccessEvent,
        last_write: float | None,
        grants: list[Grant] | None,
    ) -> tuple[tuple[str, ...], bool]:
        """The per-event part of :meth:`explain`, given the user's encounter state at ``e.t``."""
        t = e.t
        grant_covered = False
        if grants:
            for g in grants:
                # a department grant covers that department's patients, past ones included:
                # research cohorts and audits look back
                if g.covers(t, e.action, st.seen):
                    grant_covered = True
                    break
        idx = GRANT if grant_covered else 0
        if last_write is not None and t - last_write <= self.documented_window:
            idx |= DOCUMENTED
        if e.emergency:
            idx |= EMERGENCY
        return st.table[idx], grant_covered

    def encounter_state(
        self,
        uid: str,
        staff: Staff,
        patient_id: str,
        t: float,
        dept_kind: str,
        user_in_ed: bool,
    ) -> EncounterState:
        """The encounter-derived part of the explanation of ``uid``'s access to the patient
        at ``t``, and the range of times over which it stays the same."""
        encs = self.ctx.encounters_of(patient_id)
        attending = care = service = admin = ed = False
        seen_depts: list[str] = []
        # each test below is "threshold <= t" (lower) or "t <= threshold" (upper); the state
        # holds while every test keeps its outcome
        lo_in = lo_ex = -_INF
        hi_in = hi_ex = _INF
        if encs:
            uid_dept = staff.department_id
            before, after = self.before, self.after
            service_after, admin_after = self.service_after, self.admin_after
            departments = self.ctx.departments
            for enc in encs:
                start, end = enc.start, enc.end
                a = start - before
                if a <= t:
                    seen_depts.append(enc.department_id)
                    if a > lo_in:
                        lo_in = a
                elif a < hi_ex:
                    hi_ex = a
                b = end + after
                if b >= t:
                    if b < hi_in:
                        hi_in = b
                elif b > lo_ex:
                    lo_ex = b
                s = end + service_after
                if s >= t:
                    if s < hi_in:
                        hi_in = s
                elif s > lo_ex:
                    lo_ex = s
                m = end + admin_after
                if m >= t:
                    if m < hi_in:
                        hi_in = m
                elif m > lo_ex:
                    lo_ex = m
                if a <= t <= b:
                    if enc.attending_user_id == uid:
                        attending = True
                    if enc.department_id == uid_dept:
                        care = True
                if a <= t <= s:
                    service = True
                if a <= t <= m:
                    admin = True
                if user_in_ed:
                    x = start - self.ed_margin
                    if x <= t:
                        if x > lo_in:
                            lo_in = x
                    elif x < hi_ex:
                        hi_ex = x
                    if x <= t <= b:
                        d = departments.get(enc.department_id)
                        if d is not None and d.is_emergency:
                            ed = True
        key = (staff.role, dept_kind, user_in_ed, attending, care, service, admin, ed)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = _reason_table(
                staff.role,
                dept_kind,
                user_in_ed,
                self.grant_only,
                attending,
                care,
                service,
                admin,
                ed,
            )
        return EncounterState(lo_in, lo_ex, hi_in, hi_ex, tuple(seen_depts), table)
