"""Benign EMR traffic of the simulated hospital, confounders included.

Staff work in sessions on their shift at one of their usual workstations; sessions of one
user never overlap. In a session they open patients their department serves and read or
write the resources their role uses. On top of that come the things that make real logs
hard: consults on other wards, on-call look-ups at night, break-the-glass in the ED
(sometimes before registration), service departments reading every ward's patients, clerks
on recent discharges, auditors/vendors/researchers under grants, care teams on sealed and VIP
charts, overtime at shift edges, single failed accesses and ~1% residual look-ups with no
recorded reason.

Events are plain tuples (see :data:`EV_FIELDS`) so that 200k+ of them stay cheap.
"""

from __future__ import annotations

import random
from bisect import bisect_right, insort
from collections import defaultdict
from typing import Any

from pipeline.simulate_world import (
    CLINICAL,
    DAY,
    HOUR,
    MINUTE,
    RECENT_DISCHARGE_DAYS,
    Enc,
    StaffMember,
    World,
    weighted_picker,
)

#: one access: (t, user_id, patient_id, action, resource_type, workstation, success,
#: emergency, purpose, source, label). ``label`` is a scenario name for misuse, else "".
EV_FIELDS = (
    "t",
    "user_id",
    "patient_id",
    "action",
    "resource_type",
    "workstation",
    "success",
    "emergency",
    "purpose",
    "source",
    "label",
)
Ev = tuple[int, str, str, str, str, str, bool, bool, str, str, str]
BUCKET = 600  # seconds; care lists are precomputed per department and 10-minute bucket

# what each kind of work reads and writes: (resource, action) → weight
_T = dict[tuple[str, str], float]
TEMPLATES: dict[str, _T] = {
    "nurse": {
        ("Observation", "view"): 14,
        ("Observation", "create"): 10,
        ("Observation", "query"): 4,
        ("MedicationRequest", "view"): 8,
        ("MedicationAdministration", "create"): 6,
        ("DocumentReference", "view"): 6,
        ("DocumentReference", "create"): 4,
        ("Encounter", "view"): 4,
        ("Condition", "view"): 2,
        ("CarePlan", "view"): 3,
        ("CarePlan", "update"): 1,
        ("Patient", "view"): 3,
        ("AllergyIntolerance", "view"): 2,
    },
    "physician": {
        ("Encounter", "view"): 4,
        ("Observation", "view"): 10,
        ("Observation", "query"): 6,
        ("DiagnosticReport", "view"): 10,
        ("DocumentReference", "view"): 8,
        ("DocumentReference", "create"): 5,
        ("DocumentReference", "update"): 3,
        ("MedicationRequest", "view"): 5,
        ("MedicationRequest", "create"): 4,
        ("MedicationRequest", "update"): 1,
        ("ServiceRequest", "create"): 4,
        ("Condition", "view"): 4,
        ("Condition", "create"): 1,
        ("ImagingStudy", "view"): 3,
        ("Procedure", "view"): 2,
        ("Patient", "view"): 2,
    },
    "trainee": {
        ("Observation", "view"): 12,
        ("DiagnosticReport", "view"): 8,
        ("DocumentReference", "view"): 10,
        ("DocumentReference", "create"): 2,
        ("MedicationRequest", "view"): 5,
        ("Condition", "view"): 4,
        ("Encounter", "view"): 3,
        ("Observation", "query"): 3,
        ("ImagingStudy", "view"): 1,
    },
    "rad": {
        ("ImagingStudy", "view"): 10,
        ("ImagingStudy", "create"): 5,
        ("ImagingStudy", "update"): 2,
        ("ServiceRequest", "view"): 6,
        ("DiagnosticReport", "create"): 3,
        ("DiagnosticReport", "view"): 3,
        ("Patient", "view"): 2,
        ("ImagingStudy", "query"): 2,
    },
    "lab": {
        ("Observation", "create"): 10,
        ("Observation", "update"): 3,
        ("Observation", "view"): 5,
        ("Specimen", "create"): 5,
        ("Specimen", "view"): 3,
        ("DiagnosticReport", "create"): 3,
        ("DiagnosticReport", "view"): 2,
        ("ServiceRequest", "view"): 5,
        ("Patient", "view"): 1,
    },
    "pharmacist": {
        ("MedicationRequest", "view"): 12,
        ("MedicationRequest", "update"): 3,
        ("MedicationDispense", "create"): 8,
        ("AllergyIntolerance", "view"): 4,
        ("Observation", "view"): 3,
        ("MedicationRequest", "query"): 3,
        ("Patient", "view"): 1,
    },
    "billing": {
        ("Encounter", "view"): 6,
        ("Account", "view"): 8,
        ("Account", "update"): 3,
        ("Claim", "create"): 4,
        ("Claim", "update"): 3,
        ("Claim", "view"): 4,
        ("Coverage", "view"): 5,
        ("Coverage", "query"): 2,
        ("ChargeItem", "view"): 4,
        ("Patient", "view"): 2,
    },
    "records": {
        ("Encounter", "view"): 8,
        ("Encounter", "update"): 3,
        ("Account", "view"): 3,
        ("Coverage", "view"): 3,
        ("Consent", "view"): 4,
        ("Consent", "create"): 1,
        ("Claim", "view"): 2,
        ("Patient", "view"): 3,
        ("Patient", "update"): 1,
        ("Encounter", "query"): 2,
    },
    "auditor": {
        ("Encounter", "view"): 6,
        ("DocumentReference", "view"): 6,
        ("Observation", "view"): 3,
        ("Provenance", "view"): 3,
        ("DiagnosticReport", "view"): 2,
        ("Encounter", "query"): 2,
        ("Patient", "view"): 2,
    },
    "vendor": {
        ("Observation", "view"): 5,
        ("Observation", "query"): 4,
        ("DiagnosticReport", "view"): 3,
        ("Device", "view"): 3,
        ("Encounter", "view"): 2,
        ("Patient", "view"): 2,
    },
    "researcher": {
        ("Condition", "view"): 5,
        ("Condition", "query"): 3,
        ("Observation", "query"): 5,
        ("Observation", "view"): 5,
        ("DiagnosticReport", "view"): 4,
        ("MedicationRequest", "view"): 3,
        ("Encounter", "view"): 2,
        ("Patient", "view"): 1,
    },
}
#: mean accesses per shift at scale 1, before the user's own rate and daily noise.
VOLUME = {
    "nurse": 97,
    "physician": 96,
    "trainee": 48,
    "rad": 105,
    "lab": 115,
    "pharmacist": 110,
    "billing": 135,
    "records": 120,
    "auditor": 45,
    "vendor": 30,
    "researcher": 55,
}
#: night shifts are quieter: fewer rounds, no clinics
NIGHT_FACTOR = 0.7
#: accesses per patient visit (min, max), first look-up included.
BURST = {
    "nurse": (2, 6),
    "physician": (3, 9),
    "trainee": (2, 6),
    "rad": (2, 5),
    "lab": (2, 5),
    "pharmacist": (2, 5),
    "billing": (2, 6),
    "records": (2, 5),
    "auditor": (2, 7),
    "vendor": (1, 4),
    "researcher": (2, 7),
}
CLINICAL_GROUPS = frozenset({"nurse", "physician", "trainee"})
#: accounts that stay strictly inside their grant or placement: no residual look-ups
SCOPED_GROUPS = frozenset({"auditor", "vendor", "researcher", "trainee"})
#: non-clinical resources (what clerks legitimately touch)
ADMIN_RESOURCES = ("Patient", "Encounter", "Account", "Claim", "Coverage", "ChargeItem")
P_FAILURE = 0.003  # a mistyped search, a locked chart
P_RESIDUAL = 0.03  # per patient visit: a look-up with no recorded reason follows
P_CONSULT = 0.3  # per physician working day
P_ON_CALL_NIGHT = 0.3  # per on-call physician and night


class Traffic:
    """Generates the benign log and remembers what misuse injection needs: every user's
    sessions (time, workstation) and daily distinct patients."""

    def __init__(self, w: World, rng: random.Random) -> None:
        self.w = w
        self.rng = rng
        self.events: list[Ev] = []
        self.sessions: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
        self.daily_patients: dict[tuple[str, int], set[str]] = defaultdict(set)
        self.wrote: dict[str, set[str]] = defaultdict(set)
        self.templates: dict[str, tuple[list[Any], list[float]]] = {
            g: weighted_picker(list(t.items())) for g, t in TEMPLATES.items()
        }
        self._lo = (w.P0 - 2 * DAY) // BUCKET
        self._hi = (w.P1 + 2 * DAY) // BUCKET + 1
        self.buckets: dict[str, list[list[Enc]]] = {d: self._sweep(d) for d in CLINICAL}
        self._all_cache: dict[int, list[Enc]] = {}
        self._admin_cache: dict[int, list[str]] = {}
        self.research_pool = self._research_pool()
        self.audit_pool = [pid for pid in w.patient_ids if w.patients[pid].encs]
        self.dept_starts: dict[str, tuple[list[int], list[Enc]]] = {}
        for d in CLINICAL:
            encs = sorted(
                (e for e in w.dept_encs.get(d, []) if e.kind != "historical"), key=lambda e: e.start
            )
            self.dept_starts[d] = ([e.start for e in encs], encs)

    # ------------------------------------------------------------------ care lists
    def _sweep(self, dept: str) -> list[list[Enc]]:
        """Per 10-minute bucket: encounters active for the whole bucket and the next one, so
        a patient visit that starts in the bucket falls inside the encounter. VIP stays are
        listed twice: a VIP inpatient gets more attention from the ward than others."""
        encs = sorted(
            (
                e
                for e in self.w.dept_encs.get(dept, [])
                if e.kind != "historical" and e.end >= self._lo * BUCKET
            ),
            key=lambda e: e.start,
        )
        out: list[list[Enc]] = []
        active: list[Enc] = []
        i = 0
        for b in range(self._lo, self._hi):
            t0 = b * BUCKET
            while i < len(encs) and encs[i].start <= t0:
                active.append(encs[i])
                i += 1
            thr = t0 + 2 * BUCKET
            active = [e for e in active if e.end >= thr]
            lst: list[Enc] = []
            for e in active:
                lst.append(e)
                if self.w.patients[e.patient_id].vip:
                    lst.append(e)
            out.append(lst)
        return out

    def care_list(self, dept: str, t: int) -> list[Enc]:
        b = t // BUCKET - self._lo
        lst = self.buckets.get(dept)
        if lst is None or not 0 <= b < len(lst):
            return []
        return lst[b]

    def all_clinical(self, t: int) -> list[Enc]:
        b = t // BUCKET
        out = self._all_cache.get(b)
        if out is None:
            out = [e for d in CLINICAL for e in self.care_list(d, t)]
            self._all_cache[b] = out
        return out

    def admin_pool(self, d: int) -> list[str]:
        """Recent discharges (last ~30 days) and current inpatients, for clerks on day ``d``."""
        out = self._admin_cache.get(d)
        if out is None:
            w = self.w
            ds = int(w.day_start(d))
            lo = ds - RECENT_DISCHARGE_DAYS * DAY
            out = [
                e.patient_id
                for e in w.encounters
                if e.kind != "historical"
                and e.start <= ds
                and (lo <= e.end < ds or (e.kind == "inpatient" and e.end > ds + DAY))
            ]
            self._admin_cache[d] = out
        return out

    def _research_pool(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for u in self.w.staff.values():
            for g in u.grants:
                if u.role != "researcher" or g.departments is None:
                    continue
                for d in g.departments:
                    if d not in out:
                        out[d] = [
                            pid
                            for pid in self.w.patient_ids
                            if any(
                                e.dept == d and e.start < self.w.P0
                                for e in self.w.patients[pid].encs
                            )
                        ]
        return out

    # ------------------------------------------------------------------ picking patients
    def pick(self, u: StaffMember, t: int, d: int) -> str | None:
        """A patient this user's job brings them to at ``t``, within policy."""
        rng, w, g = self.rng, self.w, u.group
        scope = _grant_depts(u)
        lst: list[Enc] = []
        pids: list[str] | None = None
        if g in CLINICAL_GROUPS:
            lst = self.care_list(u.dept, t)
            if g == "physician" and lst and rng.random() < 0.55:
                own = [e for e in lst if e.attending == u.user_id]
                if own:
                    lst = own
        elif g in ("rad", "lab", "pharmacist"):
            lst = self.all_clinical(t)
        elif g in ("billing", "records"):
            pids = self.admin_pool(d)
        elif g == "auditor":
            pids = self.audit_pool
        elif g == "researcher":  # retrospective: anyone seen in the studied department
            pids = self.research_pool.get(scope[0], []) if scope else []
        elif g == "vendor":  # the systems they maintain: current patients of those wards
            lst = [e for dd in scope for e in self.care_list(dd, t)]
        else:
            return None
        for _ in range(8):
            if pids is not None:
                if not pids:
                    return None
                pid = pids[int(rng.random() * len(pids))]
            else:
                if not lst:
                    return None
                pid = lst[int(rng.random() * len(lst))].patient_id
            if w.allowed(u, pid, t):
                return pid
        return None

    def unrelated_patient(
        self, u: StaffMember, t: int, avoid: set[str] | None = None
    ) -> str | None:
        """A patient with no recorded reason for ``u`` to open (not VIP, sealed, employee,
        relative, nor above clearance: those are scenarios of their own)."""
        w, rng = self.w, self.rng
        ids = w.patient_ids
        wrote = self.wrote.get(u.user_id, ())
        for _ in range(60):
            pid = ids[int(rng.random() * len(ids))]
            if avoid and pid in avoid:
                continue
            if w.special(pid) or not w.allowed(u, pid, t) or pid in wrote:
                continue
            if not w.related(u, pid, t):
                return pid
        return None

    def add(
        self,
        t: int,
        u: StaffMember,
        pid: str,
        action: str,
        res: str,
        ws: str,
        ok: bool = True,
        emergency: bool = False,
        purpose: str = "",
        label: str = "",
    ) -> None:
        self.events.append(
            (
                t,
                u.user_id,
                pid,
                action,
                res,
                ws,
                ok,
                emergency,
                purpose or u.purpose,
                u.source,
                label,
            )
        )

    # ------------------------------------------------------------------ one patient visit
    def visit(
        self,
        u: StaffMember,
        pid: str,
        t: int,
        ws: str,
        d: int,
        kmax: int | None = None,
        emergency: bool = False,
    ) -> tuple[int, int]:
        """Open one chart and work in it; returns (time after, accesses)."""
        rng = self.rng
        g = u.group
        kmin, kmax_ = BURST[g]
        k = rng.randint(kmin, min(kmax_, kmax) if kmax else kmax_)
        names, cum = self.templates[g]
        purpose = ("ETREAT" if u.role == "physician" else "BTG") if emergency else ""
        n = 0
        if rng.random() < 0.3:
            ok = rng.random() >= P_FAILURE
            self.add(t, u, pid, "query", "Patient", ws, ok, emergency, purpose)
            t += rng.randint(3, 20)
            n += 1
        self.add(t, u, pid, "view", "Patient", ws, True, emergency, purpose)
        n += 1
        for _ in range(k - 1):
            t += rng.randint(4, 45)
            res, action = names[bisect_right(cum, rng.random() * cum[-1])]
            ok = rng.random() >= P_FAILURE or action not in ("view", "query")
            self.add(t, u, pid, action, res, ws, ok, emergency, purpose)
            n += 1
            if action in ("create", "update"):
                self.wrote[u.user_id].add(pid)
        r = rng.random()
        if g in CLINICAL_GROUPS and r < 0.008:  # discharge papers, a referral letter
            t += rng.randint(10, 60)
            self.add(t, u, pid, "print", "DocumentReference", ws, True, emergency, purpose)
            n += 1
        elif g == "billing" and r < 0.02:  # a statement for the patient
            t += rng.randint(10, 60)
            self.add(t, u, pid, "print", "Account", ws)
            n += 1
        self.daily_patients[(u.user_id, d)].add(pid)
        return t, n

    def residual(self, u: StaffMember, t: int, ws: str, d: int) -> tuple[int, int]:
        """A look-up nobody recorded a reason for: a patient about to be transferred in, a
        colleague's question. Scattered, one patient, one or two accesses."""
        rng = self.rng
        pid = None
        if u.dept in self.dept_starts and rng.random() < 0.3:
            starts, encs = self.dept_starts[u.dept]
            i = bisect_right(starts, t)
            nxt = [e for e in encs[i : i + 6] if e.start <= t + 6 * HOUR]
            if nxt:
                e = nxt[rng.randrange(len(nxt))]
                if self.w.allowed(u, e.patient_id, t) and not self.w.special(e.patient_id):
                    pid = e.patient_id
        if pid is None:
            pid = self.unrelated_patient(u, t)
        if pid is None:
            return t, 0
        self.add(t, u, pid, "view", "Patient", ws)
        n = 1
        if rng.random() < 0.5:
            t += rng.randint(5, 40)
            res = (
                "Encounter"
                if u.group in ("billing", "records")
                else rng.choice(("Encounter", "Observation", "DocumentReference"))
            )
            self.add(t, u, pid, "view", res, ws)
            n += 1
        self.daily_patients[(u.user_id, d)].add(pid)
        return t, n

    def consult(self, u: StaffMember, t: int, ws: str, d: int) -> tuple[int, int]:
        """A physician sees a patient on another ward and writes the consult note in the same
        session, before or after reading."""
        rng, w = self.rng, self.w
        others = [x for x in CLINICAL if x not in (u.dept, "ED")]
        dept = others[rng.randrange(len(others))]
        lst = self.care_list(dept, t)
        for _ in range(6):
            if not lst:
                return t, 0
            pid = lst[rng.randrange(len(lst))].patient_id
            if w.allowed(u, pid, t):
                break
        else:
            return t, 0
        reads = [("Patient", "view")] + [
            rng.choice(
                (
                    ("Observation", "view"),
                    ("DiagnosticReport", "view"),
                    ("DocumentReference", "view"),
                    ("MedicationRequest", "view"),
                    ("ImagingStudy", "view"),
                )
            )
            for _ in range(rng.randint(2, 5))
        ]
        note = ("DocumentReference", "create")
        steps = [reads[0], note, *reads[1:]] if rng.random() < 0.3 else [*reads, note]
        for j, (res, action) in enumerate(steps):
            t += rng.randint(20, 120) if j else 0
            self.add(t, u, pid, action, res, ws)
        self.wrote[u.user_id].add(pid)
        self.daily_patients[(u.user_id, d)].add(pid)
        return t, len(steps)

    # ------------------------------------------------------------------ a working day
    def works(self, u: StaffMember, d: int) -> bool:
        """Rosters: weekday office staff, physicians with some Saturdays, rotating 5-of-7 for
        shift workers, a few sick days; vendors come in on some weekdays."""
        rng = self.rng
        wd = self.w.weekday(d)
        if rng.random() < 0.04:
            return False
        if u.group in ("billing", "records", "auditor", "researcher") or (
            u.role == "trainee" and u.shift_start != 420
        ):
            return wd < 5
        if u.group == "vendor":
            return wd < 5 and rng.random() < 0.4
        if u.role == "physician" and u.dept != "ED" and u.group == "physician":
            return wd < 5 or (wd == 5 and rng.random() < 0.25)
        return (wd - u.rest_offset) % 7 not in (0, 1)

    def user_day(self, u: StaffMember, d: int) -> None:
        """Sessions over one shift: slots across the shift, sometimes a few minutes early or
        running over, each at one of the user's usual workstations."""
        if u.group == "idle" or not self.works(u, d):
            return
        rng, w = self.rng, self.w
        t0, t1 = w.shift_window(u, d)
        early = rng.randint(2, 15) * MINUTE if rng.random() < 0.15 else 0
        late = rng.randint(5, 30) * MINUTE if rng.random() < 0.2 else 0
        a, b = t0 - early, t1 + late
        if b <= w.P0 or a >= w.P1 or not (u.vf_ts <= a and b <= u.vu_ts):
            return
        budget = VOLUME[u.group] * u.rate * rng.uniform(0.8, 1.2)
        if u.shift_start >= 22 * 60 or u.shift_start < 5 * 60:
            budget *= NIGHT_FACTOR
        n_sess = max(1, round(budget / rng.uniform(12, 24)))
        slot = (b - a) / n_sess
        per = budget / n_sess
        consult_in = (
            rng.randrange(n_sess)
            if (
                u.group == "physician"
                and u.dept in CLINICAL
                and u.dept != "ED"
                and rng.random() < P_CONSULT
            )
            else -1
        )
        ws_list = u.workstations
        for i in range(n_sess):
            s0 = int(a + i * slot)
            s1 = int(a + (i + 1) * slot) - 2 * MINUTE
            start = s0 + int(rng.random() * 0.35 * slot)
            if i == 0 and early:
                start = a
            r = rng.random()
            ws = (
                ws_list[0]
                if r < 0.7 or len(ws_list) == 1
                else ws_list[1 + int(rng.random() * (len(ws_list) - 1))]
            )
            t, n = start, 0
            first = last = -1  # the session is logged in from its first to its last access
            quota = per * rng.uniform(0.7, 1.3)
            did_consult = i != consult_in
            while n < quota and t < s1:
                t0_visit = t
                if not did_consult and n >= quota / 2:
                    t, k = self.consult(u, t, ws, d)
                    did_consult = True
                else:
                    pid = self.pick(u, t, d)
                    if pid is None:
                        t += rng.randint(2, 10) * MINUTE
                        continue
                    emergency = u.dept == "ED" and rng.random() < 0.2
                    t, k = self.visit(u, pid, t, ws, d, emergency=emergency)
                    if rng.random() < P_RESIDUAL and u.group not in SCOPED_GROUPS:
                        t += rng.randint(20, 120)
                        t, k2 = self.residual(u, t, ws, d)
                        k += k2
                if k:
                    n += k
                    first = t0_visit if first < 0 else first
                    last = t
                t += rng.randint(20, 240)
            if n:
                self.sessions[u.user_id].append((first, last, ws))

    def on_call(self, u: StaffMember, d: int) -> None:
        """An on-call physician checks a few of the ward's patients at night, often from home."""
        rng, w = self.rng, self.w
        if not u.on_call or rng.random() >= P_ON_CALL_NIGHT:
            return
        t = w.wall(d, 20 * 60) + rng.randint(0, 10 * HOUR)
        if not (u.vf_ts <= t and t + HOUR <= u.vu_ts) or t >= w.P1:
            return
        ws = remote_workstation(u) if rng.random() < 0.6 else u.workstations[0]
        start, n, last = t, 0, t
        for _ in range(rng.randint(1, 4)):
            lst = self.care_list(u.dept, t)
            own = [e for e in lst if e.attending == u.user_id]
            lst = own if own and rng.random() < 0.7 else lst
            if not lst:
                break
            pid = lst[rng.randrange(len(lst))].patient_id
            if not w.allowed(u, pid, t):
                continue
            t, k = self.visit(u, pid, t, ws, d, kmax=5)
            n += k
            last = t
            t += rng.randint(30, 300)
        if n:
            self.sessions[u.user_id].append((start, last, ws))

    def ed_registration_lag(self) -> None:
        """ED staff open an arriving patient with break-the-glass minutes before the
        registration clerk creates the encounter."""
        rng, w = self.rng, self.w
        ed_users = [w.staff[x] for x in w.dept_staff.get("ED", [])]
        for e in w.dept_encs.get("ED", []):
            if not e.ed_lag or not (e.start - e.ed_lag >= w.P0 and e.start + HOUR < w.P1):
                continue
            first = e.start - e.ed_lag
            last = e.start + 5 * MINUTE
            cands = [
                (u, s)
                for u in ed_users
                if w.allowed(u, e.patient_id, e.start)
                for s in self.sessions.get(u.user_id, ())
                if s[0] <= first and s[1] >= last
            ]
            if cands:
                u, s = cands[rng.randrange(len(cands))]
                ws = s[2]
            else:  # somebody on shift and not at a terminal steps in: a short session
                free = [
                    u
                    for u in ed_users
                    if w.allowed(u, e.patient_id, e.start)
                    and u.valid_at(first)
                    and u.valid_at(last)
                    and u.in_shift_minute(w.minute_of(first))
                    and u.in_shift_minute(w.minute_of(last))
                    and not self.busy(u.user_id, first, last, margin=2 * MINUTE)
                ]
                if not free:
                    continue
                u = free[rng.randrange(len(free))]
                ws = u.workstations[0]
                insort(self.sessions[u.user_id], (first, last, ws))
            t = first
            for res, action in (
                ("Patient", "view"),
                ("Observation", "view"),
                ("AllergyIntolerance", "view"),
                ("Observation", "create"),
            ):
                if t > last:
                    break
                self.add(
                    t,
                    u,
                    e.patient_id,
                    action,
                    res,
                    ws,
                    True,
                    True,
                    "ETREAT" if u.role == "physician" else "BTG",
                )
                t += rng.randint(30, 100)
            self.daily_patients[(u.user_id, w.day_of(first))].add(e.patient_id)

    def run(self) -> None:
        """All benign traffic. Night shifts that start the evening before the period are
        generated and clipped later, so the first morning is not empty."""
        w = self.w
        staff = list(w.staff.values())
        for d in range(-1, w.days):
            for u in staff:
                self.user_day(u, d)
            for u in staff:
                self.on_call(u, d)
        for lst in self.sessions.values():
            lst.sort()
        self.ed_registration_lag()

    # ------------------------------------------------------------------ for misuse injection
    def sessions_on(self, uid: str, d: int) -> list[tuple[int, int, str]]:
        w = self.w
        lo, hi = w.day_start(d), w.day_start(d + 1)
        return [
            s
            for s in self.sessions.get(uid, ())
            if lo <= s[0] < hi and s[0] >= w.P0 and s[1] < w.P1
        ]

    def ws_at(self, uid: str, t: int, default: str, near: int = 30 * MINUTE) -> str:
        """The workstation the user is at around ``t``: the session covering ``t``, else the
        nearest one within ``near`` seconds, else ``default``. So one account is never in
        two places at once unless a scenario wants it."""
        best, dist = default, near + 1
        for s0, s1, ws in self.sessions.get(uid, ()):
            if s0 <= t <= s1:
                return ws
            gap = s0 - t if t < s0 else t - s1
            if gap < dist:
                best, dist = ws, gap
        return best

    def busy(self, uid: str, a: int, b: int, margin: int = 15 * MINUTE) -> bool:
        return any(s0 - margin < b and a < s1 + margin for s0, s1, _ in self.sessions.get(uid, ()))


def _grant_depts(u: StaffMember) -> tuple[str, ...]:
    """Departments of the user's first scoped grant (vendors, researchers)."""
    for g in u.grants:
        if g.departments is not None:
            return g.departments
    return ()


def remote_workstation(u: StaffMember) -> str:
    """The user's home VPN address: stable per user."""
    n = int(u.user_id[1:])
    return f"vpn-10.250.{n % 251}.{(n // 251) % 250 + 2}"
