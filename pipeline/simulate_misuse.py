"""Labelled misuse for the simulated hospital: one table row per scenario.

Each :class:`Scenario` says which accounts could plausibly commit it (``eligible``), on which
days (``days``), and how one episode unfolds (``episode``, returning accesses). The runner
(:func:`inject`) picks users, gives each one or two episodes on random days and labels every
access it adds with exactly one scenario. Misuse users keep their benign work.

To add a scenario: write an ``_ep_xxx`` function (and eligibility if the stock ones do not
fit), append a :class:`Scenario` to :data:`SCENARIO_TABLE`. Nothing else changes.

Misuse is modelled as it happens, not as a detector would like it: snooping happens inside
ordinary work sessions at the user's usual workstation, targets are chosen for curiosity
(a VIP in the news, a colleague, a relative), off-hours and bulk behaviour come from home or
the ward at night. Targets of one scenario avoid the special patients of other scenarios
(VIP, sealed, employee, relatives, above clearance) unless the scenario's own description
says otherwise, so that each label means one thing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.simulate_traffic import CLINICAL_GROUPS, Traffic, remote_workstation
from pipeline.simulate_world import CLINICAL, DAY, HOUR, MINUTE, WARDS, StaffMember, World

SEALED_RECORD = "sealed_record"
NO_CARE_RELATIONSHIP = "no_care_relationship"
OFF_HOURS_BULK = "off_hours_bulk"
VIP_SNOOPING = "vip_snooping"
COWORKER_SNOOPING = "coworker_snooping"
FAMILY_SNOOPING = "family_snooping"
SELF_ACCESS = "self_access"
ACCOUNT_VALIDITY = "account_validity"
GRANT_OUT_OF_SCOPE = "grant_out_of_scope"
SENSITIVITY_ABOVE_CLEARANCE = "sensitivity_above_clearance"
BULK_EXPORT = "bulk_export"
CREDENTIAL_SHARING = "credential_sharing"
DENIED_PROBING = "denied_probing"
BREAK_THE_GLASS_ABUSE = "break_the_glass_abuse"
ROLE_RESOURCE_MISMATCH = "role_resource_mismatch"
VOLUME_ANOMALY = "volume_anomaly"
#: no rule names this one: only learned models can catch it
EXPLAINED_BROWSING = "explained_browsing"

#: one misuse access: (t, patient_id, action, resource_type, workstation, success,
#: emergency, purpose ('' = the user's usual purpose))
Access = tuple[int, str, str, str, str, bool, bool, str]

#: groups that do ordinary patient work (the pool for most snooping scenarios)
WORKERS = frozenset({"nurse", "physician", "rad", "lab", "pharmacist", "billing", "records"})
CLERKS = frozenset({"billing", "records"})
CLINICAL_READS = (
    ("Patient", "view"),
    ("Encounter", "view"),
    ("Observation", "view"),
    ("DocumentReference", "view"),
    ("DiagnosticReport", "view"),
    ("Condition", "view"),
    ("MedicationRequest", "view"),
    ("Observation", "query"),
)
ADMIN_READS = (
    ("Patient", "view"),
    ("Encounter", "view"),
    ("Account", "view"),
    ("Coverage", "view"),
    ("Claim", "view"),
)
CLINICAL_NOTES = ("DocumentReference", "Observation", "DiagnosticReport")
#: what a curious reader opens in a chart: notes, problems, reports, the stay itself
CURIOUS_READS = (
    ("DocumentReference", "view"),
    ("DocumentReference", "view"),
    ("DocumentReference", "view"),
    ("Condition", "view"),
    ("Condition", "view"),
    ("DiagnosticReport", "view"),
    ("Encounter", "view"),
    ("Observation", "view"),
    ("MedicationRequest", "view"),
    ("ImagingStudy", "view"),
)
#: service departments' traffic groups: their service reason explains any active encounter
SERVICE_GROUPS = frozenset({"lab", "rad", "pharmacist"})


class Injector:
    """Shared helpers for episodes: times inside a user's sessions, off-hours windows,
    targets with no relation, reads that fit the user's role."""

    def __init__(self, w: World, tr: Traffic, rng: random.Random) -> None:
        self.w = w
        self.tr = tr
        self.rng = rng
        self.sens4 = [pid for pid in w.patient_ids if w.patients[pid].sensitivity == 4]
        self.vips = [pid for pid in w.patient_ids if w.patients[pid].vip]
        self.employees = [pid for pid in w.patient_ids if w.patients[pid].employee_user_id]
        self._baseline: dict[str, float] = {}
        self._times: dict[str, list[int]] | None = None
        self._ward_of_interest: dict[str, str] = {}

    # ------------------------------------------------------------------ accounts and days
    def steady(self, u: StaffMember) -> bool:
        """An ordinary account valid over the whole period (so its misuse is not also an
        account-validity case)."""
        w = self.w
        return (
            u.vf_ts <= w.P0 - DAY and u.vu_ts >= w.P1 + DAY and u.kind not in ("leaver", "trainee")
        )

    def steady_grant(self, u: StaffMember) -> bool:
        """Account and grants valid over the whole period: the violation is scope, not time."""
        w = self.w
        return (
            u.vf_ts <= w.P0 - DAY
            and u.vu_ts >= w.P1 + DAY
            and all(g.vf_ts <= w.P0 and g.vu_ts >= w.P1 for g in u.grants)
        )

    def session_days(self, u: StaffMember) -> list[int]:
        return [d for d in range(self.w.days) if self.tr.sessions_on(u.user_id, d)]

    def all_days(self, u: StaffMember) -> list[int]:
        return list(range(self.w.days))

    # ------------------------------------------------------------------ times
    def session_burst(
        self, u: StaffMember, d: int, n: int, span: int, after: int = 0
    ) -> list[tuple[int, str]]:
        """``n`` times within ``span`` seconds inside one of the user's sessions on day ``d``."""
        rng = self.rng
        sess = [s for s in self.tr.sessions_on(u.user_id, d) if s[1] > after + 2 * MINUTE]
        if not sess:
            return []
        s0, s1, ws = sess[rng.randrange(len(sess))]
        s0 = max(s0, after + MINUTE)
        start = s0 + int(rng.random() * max(0, s1 - s0 - span))
        end = min(start + span, self.w.P1 - MINUTE)
        times = sorted(start + int(rng.random() * max(1, end - start)) for _ in range(n))
        return [(t, self.tr.ws_at(u.user_id, t, ws)) for t in times]

    def day_spread(self, u: StaffMember, d: int, n: int) -> list[tuple[int, str]]:
        """``n`` times scattered over the user's sessions on day ``d``."""
        rng = self.rng
        sess = self.tr.sessions_on(u.user_id, d)
        if not sess:
            return []
        out = []
        for _ in range(n):
            s0, s1, ws = sess[rng.randrange(len(sess))]
            t = s0 + int(rng.random() * max(1, s1 - s0))
            out.append((t, self.tr.ws_at(u.user_id, t, ws)))
        out.sort()
        return out

    def off_hours(self, u: StaffMember, d: int, dur: int, margin: int = HOUR) -> int | None:
        """A start time on (the night after) day ``d`` such that ``[start, start+dur]`` and an
        hour either side are outside the user's shift and away from any session of theirs."""
        rng, w = self.rng, self.w
        for _ in range(80):
            minute = rng.randrange(1440)
            t = w.wall(d, minute)
            if t < w.P0 or t + dur >= w.P1 or not u.valid_at(t) or not u.valid_at(t + dur):
                continue
            probe = t - margin
            ok = True
            while probe <= t + dur + margin:
                if u.in_shift_minute(w.minute_of(probe)):
                    ok = False
                    break
                probe += 5 * MINUTE
            if ok and not self.tr.busy(u.user_id, t, t + dur, margin=30 * MINUTE):
                return t
        return None

    # ------------------------------------------------------------------ targets and reads
    def reads(self, u: StaffMember) -> tuple[tuple[str, str], ...]:
        return ADMIN_READS if u.group in CLERKS else CLINICAL_READS

    def chart(
        self,
        u: StaffMember,
        pid: str,
        times: list[tuple[int, str]],
        emergency: bool = False,
        purpose: str = "",
        ok: bool = True,
    ) -> list[Access]:
        """Open a chart and read around in it, as a curious user would."""
        reads = self.reads(u)
        out: list[Access] = []
        for i, (t, ws) in enumerate(times):
            res, action = ("Patient", "view") if i == 0 else reads[self.rng.randrange(len(reads))]
            out.append((t, pid, action, res, ws, ok, emergency, purpose))
        return out

    def user_times(self, uid: str) -> list[int]:
        """Times of the user's benign accesses (indexed once, on first use)."""
        if self._times is None:
            idx: dict[str, list[int]] = {}
            for e in self.tr.events:
                if not e[10]:
                    idx.setdefault(e[1], []).append(e[0])
            self._times = idx
        return self._times.get(uid, [])

    def fits(self, u: StaffMember, pid: str, t: int) -> bool:
        """Not own record/relative, not above clearance, not a seal the user breaks."""
        return self.w.allowed(u, pid, t)

    def baseline(self, u: StaffMember) -> float:
        """The user's usual number of distinct patients on a working day: the busiest
        ordinary day, so that "3–5× usual" holds against any reasonable notion of usual."""
        v = self._baseline.get(u.user_id)
        if v is None:
            counts = [
                len(self.tr.daily_patients.get((u.user_id, d), ()))
                for d in range(self.w.days)
                if self.tr.sessions_on(u.user_id, d)
            ]
            v = float(max(counts)) if counts else 0.0
            self._baseline[u.user_id] = v
        return v

    def ward_of_interest(self, u: StaffMember) -> str:
        """The one ward a curious user keeps coming back to (an acquaintance's ward, a
        rumour): chosen once per user, so that episodes on several days agree."""
        ward = self._ward_of_interest.get(u.user_id)
        if ward is None:
            wards = [x for x in WARDS if x not in ("PSY", u.dept)]
            ward = self._ward_of_interest[u.user_id] = wards[self.rng.randrange(len(wards))]
        return ward


# =========================================================================== episodes
def _ep_sealed(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """An unauthorised user opens a sealed record (curiosity about the dispute)."""
    w, rng = inj.w, inj.rng
    seals = [
        s
        for s in w.seals.values()
        if u.user_id not in s.authorized
        and w.patients[s.patient_id].sensitivity <= u.clearance
        and s.sealed_at < w.day_start(d + 1) - HOUR
    ]
    if not seals:
        return []
    same = [s for s in seals if s.dept == u.dept]
    s = (
        same[rng.randrange(len(same))]
        if same and rng.random() < 0.5
        else seals[rng.randrange(len(seals))]
    )
    times = inj.session_burst(
        u, d, rng.randint(2, 6), rng.randint(3, 15) * MINUTE, after=s.sealed_at + 10 * MINUTE
    )
    times = [x for x in times if x[0] > s.sealed_at]
    return inj.chart(u, s.patient_id, times)


def _ep_no_care(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """Browse 8–20 patients with no relation, in one session or over the day."""
    rng = inj.rng
    n = rng.randint(8, 20)
    if rng.random() < 0.5:
        starts = inj.session_burst(u, d, n, rng.randint(20, 60) * MINUTE)
    else:
        starts = inj.day_spread(u, d, n)
    out: list[Access] = []
    seen: set[str] = set()
    for t, ws in starts:
        pid = inj.tr.unrelated_patient(u, t, seen)
        if pid is None:
            continue
        seen.add(pid)
        times = [(t + i * rng.randint(10, 50), ws) for i in range(rng.randint(1, 3))]
        out += inj.chart(u, pid, times)
    return out


def _ep_off_hours(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """20–60 distinct unrelated charts viewed within 30–90 minutes, away from the shift."""
    rng = inj.rng
    dur = rng.randint(30, 90) * MINUTE
    t0 = inj.off_hours(u, d, dur)
    if t0 is None:
        return []
    ws = remote_workstation(u) if rng.random() < 0.6 else u.workstations[0]
    n = rng.randint(20, 60)
    times = sorted(t0 + int(rng.random() * dur) for _ in range(n))
    out: list[Access] = []
    seen: set[str] = set()
    for t in times:
        pid = inj.tr.unrelated_patient(u, t, seen)
        if pid is None:
            continue
        seen.add(pid)
        out.append((t, pid, "view", "Patient", ws, True, False, ""))
        if rng.random() < 0.25:
            out.append(
                (
                    t + rng.randint(5, 25),
                    pid,
                    "view",
                    rng.choice(("Encounter", "Observation")),
                    ws,
                    True,
                    False,
                    "",
                )
            )
    return out


def _ep_vip(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """A VIP in the news, opened 2–6 times by someone with no part in their care."""
    w, rng = inj.w, inj.rng
    t_day = int(w.day_start(d)) + 12 * HOUR
    vips = [
        p
        for p in inj.vips
        if p not in w.seals and inj.fits(u, p, t_day) and not w.related(u, p, t_day)
    ]
    if not vips:
        return []
    current = [p for p in vips if w.encounter_at(p, t_day)]
    pid = (current or vips)[rng.randrange(len(current or vips))]
    return inj.chart(
        u, pid, inj.session_burst(u, d, rng.randint(2, 6), rng.randint(2, 20) * MINUTE)
    )


def _ep_coworker(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """A colleague's own record (often someone from the same department), no care reason."""
    w, rng = inj.w, inj.rng
    t_day = int(w.day_start(d)) + 12 * HOUR
    cands = [
        p
        for p in inj.employees
        if w.patients[p].employee_user_id != u.user_id
        and p not in u.excluded
        and not w.patients[p].vip
        and p not in w.seals
        and inj.fits(u, p, t_day)
        and not w.related(u, p, t_day)
    ]
    if not cands:
        return []
    same = [p for p in cands if w.staff[w.patients[p].employee_user_id].dept == u.dept]
    pool = same if same and rng.random() < 0.7 else cands
    pid = pool[rng.randrange(len(pool))]
    return inj.chart(
        u, pid, inj.session_burst(u, d, rng.randint(2, 6), rng.randint(2, 15) * MINUTE)
    )


def _ep_family(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """A relative (same surname and address) the user does not treat."""
    w, rng = inj.w, inj.rng
    t_day = int(w.day_start(d)) + 12 * HOUR
    rel = [
        p
        for p in u.relatives
        if not w.related(u, p, t_day)
        and w.patients[p].sensitivity <= u.clearance
        and p not in w.seals
    ]
    if not rel:
        return []
    out: list[Access] = []
    for pid in rng.sample(rel, min(len(rel), rng.choice((1, 1, 2)))):
        out += inj.chart(
            u, pid, inj.session_burst(u, d, rng.randint(2, 6), rng.randint(2, 15) * MINUTE)
        )
    return out


def _ep_self(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """The user looks up their own results."""
    rng = inj.rng
    times = inj.session_burst(u, d, rng.randint(1, 5), rng.randint(1, 8) * MINUTE)
    out = inj.chart(u, u.own_pid, times)
    if u.group not in CLERKS:  # mostly their lab results
        out = [
            (
                t,
                p,
                a,
                r if i == 0 else rng.choice(("Observation", "DiagnosticReport", r)),
                ws,
                ok,
                e,
                pu,
            )
            for i, (t, p, a, r, ws, ok, e, pu) in enumerate(out)
        ]
    return out


def _validity_days(inj: Injector, u: StaffMember) -> list[int]:
    w = inj.w
    out = []
    for d in range(w.days):
        t0, t1 = w.shift_window(u, d)
        if t0 >= w.P0 and t1 + HOUR < w.P1 and (t1 <= u.vf_ts or t0 >= u.vu_ts):
            out.append(d)
    return out


def _ep_validity(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """A leaver's account after its end date, or a trainee's before or after the placement,
    used at the usual hours on the old ward's patients and a few others."""
    w, tr, rng = inj.w, inj.tr, inj.rng
    t0, t1 = w.shift_window(u, d)
    dur = rng.randint(10, 60) * MINUTE
    start = t0 + int(rng.random() * max(1, t1 - t0 - dur))
    ws = remote_workstation(u) if rng.random() < 0.4 else u.workstations[0]
    out: list[Access] = []
    for _ in range(rng.randint(3, 10)):
        t = start + int(rng.random() * dur)
        pid = None
        if rng.random() < 0.6:
            lst = tr.care_list(u.dept, t) if u.dept in CLINICAL else []
            for _ in range(5):
                if lst:
                    cand = lst[rng.randrange(len(lst))].patient_id
                    if inj.fits(u, cand, t) and not w.special(cand):
                        pid = cand
                        break
        pid = pid or tr.unrelated_patient(u, t)
        if pid is None:
            continue
        out += inj.chart(
            u, pid, [(t + i * rng.randint(10, 60), ws) for i in range(rng.randint(1, 3))]
        )
    return [a for a in out if not u.valid_at(a[0])]


def _ep_grant_scope(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """A vendor or researcher outside its grant: other departments (psychiatry is the
    classic), or actions the grant does not give (export, print, copy)."""
    w, tr, rng = inj.w, inj.tr, inj.rng
    g = u.grants[0]
    inside = list(g.departments or ())
    outside = [x for x in CLINICAL if x not in inside and x != "ED"]
    variant = rng.choices(("dept", "action", "both"), (0.4, 0.35, 0.25))[0]
    times = inj.session_burst(u, d, 1, 30 * MINUTE)
    if times:
        t, ws = times[0]
    else:
        t = w.wall(d, u.shift_start + rng.randint(30, 400))
        ws = tr.ws_at(u.user_id, t, u.workstations[0])
    if t + HOUR >= w.P1 or t < w.P0:
        return []
    dept = (
        inside[rng.randrange(len(inside))]
        if variant == "action"
        else ("PSY" if rng.random() < 0.4 else outside[rng.randrange(len(outside))])
    )
    # retrospective: anybody ever seen in that department, not only today's patients
    pool = [
        pid
        for pid in w.patient_ids
        if dept in w.patients[pid].depts and not w.special(pid) and pid not in u.excluded
    ]
    if variant != "action":  # nobody the grant would cover through another stay
        pool = [pid for pid in pool if not any(x in w.patients[pid].depts for x in inside)]
    if not pool:
        return []
    out: list[Access] = []
    for pid in rng.sample(pool, min(len(pool), rng.randint(4, 12))):
        for _ in range(rng.randint(1, 3)):
            t += rng.randint(15, 120)
            if variant == "dept":
                res, action = rng.choice(
                    (
                        ("Patient", "view"),
                        ("Observation", "query"),
                        ("DiagnosticReport", "view"),
                        ("Condition", "query"),
                    )
                )
            else:
                res = rng.choice(
                    ("DocumentReference", "DiagnosticReport", "Observation", "Patient")
                )
                action = rng.choices(("export", "copy", "print"), (0.6, 0.25, 0.15))[0]
            out.append((t, pid, action, res, tr.ws_at(u.user_id, t, ws), True, False, ""))
    return out


def _ep_sensitivity(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """A clearance-1/2 user opens a psychiatric or HIV record (sometimes one on their own
    ward they are not cleared for)."""
    w, tr, rng = inj.w, inj.tr, inj.rng
    times = inj.session_burst(u, d, rng.randint(2, 6), rng.randint(2, 15) * MINUTE)
    if not times:
        return []
    t = times[0][0]
    ward = (
        [e.patient_id for e in tr.care_list(u.dept, t) if w.patients[e.patient_id].sensitivity == 4]
        if u.dept in CLINICAL
        else []
    )
    pool = ward if ward and rng.random() < 0.5 else inj.sens4
    pool = [p for p in pool if not w.special(p) and p not in u.excluded]
    if not pool:
        return []
    return inj.chart(u, pool[rng.randrange(len(pool))], times)


def _ep_bulk_export(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """20–100 exports/prints/copies within the hour, often at night: own patients and others."""
    w, tr, rng = inj.w, inj.tr, inj.rng
    n = rng.randint(20, 100)
    dur = rng.randint(15, 60) * MINUTE
    if rng.random() < 0.6:
        t0 = inj.off_hours(u, d, dur)
        if t0 is None:
            return []
        ws = remote_workstation(u) if rng.random() < 0.5 else u.workstations[0]
    else:
        first = inj.session_burst(u, d, 1, dur)
        if not first:
            return []
        t0, ws = first[0]
        t0 = min(t0, w.P1 - dur - MINUTE)
    pids: list[str] = []
    for i in range(rng.randint(5, min(40, n))):
        t = t0 + i
        pid = tr.pick(u, t, d) if i % 2 == 0 else tr.unrelated_patient(u, t, set(pids))
        if pid and not w.special(pid) and pid not in pids:
            pids.append(pid)
    if not pids:
        return []
    clerk = u.group in CLERKS
    out: list[Access] = []
    for t in sorted(t0 + int(rng.random() * dur) for _ in range(n)):
        pid = pids[rng.randrange(len(pids))]
        if clerk:
            res = rng.choice(("Patient", "Encounter", "Account", "Claim"))
        else:
            res = rng.choices(
                ("DocumentReference", "DiagnosticReport", "Observation", "Patient", "ImagingStudy"),
                (40, 20, 15, 15, 10),
            )[0]
        action = rng.choices(("export", "print", "copy"), (55, 30, 15))[0]
        out.append((t, pid, action, res, tr.ws_at(u.user_id, t, ws), True, False, ""))
    return out


def _ep_credential(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """Someone else works under this account on another ward while the owner is logged in:
    two workstations in different places, interleaved within minutes. Only the second
    workstation's accesses are the misuse."""
    w, tr, rng = inj.w, inj.tr, inj.rng
    sess = [s for s in tr.sessions_on(u.user_id, d) if s[1] - s[0] >= 15 * MINUTE]
    if not sess:
        return []
    s0, s1, _ = sess[rng.randrange(len(sess))]
    depts = [x for x in CLINICAL if x != u.dept]
    dept = depts[rng.randrange(len(depts))]
    pool = [x for x in w.dept_ws[dept] if x not in u.workstations]
    if not pool:
        return []
    ws2 = pool[rng.randrange(len(pool))]
    out: list[Access] = []
    # the other person works while the owner does: each access a few minutes from one of
    # the owner's own in this session
    own = [t for t in inj.user_times(u.user_id) if s0 <= t <= s1]
    if not own:
        return []
    times = sorted(
        min(w.P1 - 1, max(s0, own[rng.randrange(len(own))] + rng.randint(-4 * MINUTE, 4 * MINUTE)))
        for _ in range(rng.randint(6, 25))
    )
    pid = None
    for t in times:
        if pid is None or rng.random() < 0.4:
            lst = tr.care_list(dept, t)
            pid = None
            for _ in range(5):
                if lst:
                    cand = lst[rng.randrange(len(lst))].patient_id
                    if inj.fits(u, cand, t) and not w.special(cand):
                        pid = cand
                        break
            pid = pid or tr.unrelated_patient(u, t)
            if pid is None:
                continue
            out.append((t, pid, "view", "Patient", ws2, True, False, ""))
            continue
        res, action = CLINICAL_READS[rng.randrange(len(CLINICAL_READS))]
        if u.group in CLINICAL_GROUPS and rng.random() < 0.2:
            res, action = "Observation", "create"
        out.append((t, pid, action, res, ws2, True, False, ""))
    return out


def _ep_denied(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """8–20 refused attempts on various charts within minutes: probing what the account
    can open."""
    rng, tr = inj.rng, inj.tr
    n = rng.randint(8, 20)
    span = rng.randint(2, 10) * MINUTE
    if rng.random() < 0.7:
        times = inj.session_burst(u, d, n, span)
    else:
        t0 = inj.off_hours(u, d, span)
        times = (
            []
            if t0 is None
            else sorted((t0 + int(rng.random() * span), u.workstations[0]) for _ in range(n))
        )
    out: list[Access] = []
    seen: set[str] = set()
    clerk = u.group in CLERKS
    for t, ws in times:
        pid = (
            tr.unrelated_patient(u, t, seen) if rng.random() < 0.8 or not seen else sorted(seen)[0]
        )
        if pid is None:
            continue
        seen.add(pid)
        res = (
            rng.choice(("Patient", "Encounter"))
            if clerk
            else rng.choices(("Patient", "DocumentReference", "Observation"), (60, 20, 20))[0]
        )
        action = "view" if rng.random() < 0.6 else "query"
        out.append((t, pid, action, res, ws, False, False, ""))
    return out


def _ep_btg(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """Break-the-glass used outside the ED on patients with no relation, several times."""
    w, tr, rng = inj.w, inj.tr, inj.rng
    out: list[Access] = []
    seen: set[str] = set()
    for t, ws in inj.day_spread(u, d, rng.randint(3, 8)):
        pid = tr.unrelated_patient(u, t, seen)
        if pid is None:
            continue
        e = w.encounter_at(pid, t)
        if e is not None and e.dept == "ED":
            continue
        seen.add(pid)
        purpose = "BTG" if rng.random() < 0.8 else "ETREAT"
        times = [(t + i * rng.randint(15, 90), ws) for i in range(rng.randint(1, 4))]
        out += inj.chart(u, pid, times, emergency=True, purpose=purpose)
    return out


def _ep_role_mismatch(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """A clerk reads clinical notes and results of patients from their own work list."""
    tr, rng = inj.tr, inj.rng
    times = inj.session_burst(u, d, rng.randint(5, 20), rng.randint(10, 60) * MINUTE)
    out: list[Access] = []
    pid = None
    for t, ws in times:
        if pid is None or rng.random() < 0.35:
            pid = tr.pick(u, t, d)
            if pid is None:
                continue
        res = CLINICAL_NOTES[rng.randrange(3)]
        out.append((t, pid, "view" if rng.random() < 0.9 else "query", res, ws, True, False, ""))
    return out


def _ep_volume(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """One day with 3–5× the user's usual number of distinct patients; the extra ones have
    no relation to the user."""
    tr, rng = inj.tr, inj.rng
    base = inj.baseline(u)
    today = len(tr.daily_patients.get((u.user_id, d), ()))
    extra = max(8, round(base * rng.uniform(3.2, 4.5)) - today)
    out: list[Access] = []
    seen = set(tr.daily_patients.get((u.user_id, d), ()))
    for t, ws in inj.day_spread(u, d, extra):
        pid = tr.unrelated_patient(u, t, seen)
        if pid is None:
            continue
        seen.add(pid)
        out.append((t, pid, "view", "Patient", ws, True, False, ""))
        if rng.random() < 0.5:
            res, action = inj.reads(u)[1 + rng.randrange(len(inj.reads(u)) - 1)]
            out.append((t + rng.randint(10, 60), pid, action, res, ws, True, False, ""))
    return out


def _ep_explained_browsing(inj: Injector, u: StaffMember, d: int) -> list[Access]:
    """A laboratory, radiology or pharmacy user, over two or three days, reads the notes,
    problems and reports of two to five inpatients a day on one ward, in ordinary sessions at
    the usual workstation. Every access is explained: the service reason covers any patient
    with an active encounter. Nothing is written or exported, the volume is ordinary, and no
    rule names it; what gives it away is that the user reads what their work never needs,
    on patients outside the community of patients they usually serve."""
    w, tr, rng = inj.w, inj.tr, inj.rng
    ward = inj.ward_of_interest(u)
    days = [x for x in range(d, min(w.days, d + rng.randint(2, 3))) if tr.sessions_on(u.user_id, x)]
    out: list[Access] = []
    seen: set[str] = set()
    for day in days:
        for t, ws in inj.day_spread(u, day, rng.randint(2, 5)):
            lst = tr.care_list(ward, t)
            pid = None
            for _ in range(8):
                if not lst:
                    break
                cand = lst[rng.randrange(len(lst))].patient_id
                if cand not in seen and inj.fits(u, cand, t) and not w.special(cand):
                    pid = cand
                    break
            if pid is None:
                continue
            seen.add(pid)
            out.append((t, pid, "view", "Patient", ws, True, False, ""))
            for _ in range(rng.randint(2, 5)):
                t += rng.randint(15, 90)
                res, action = CURIOUS_READS[rng.randrange(len(CURIOUS_READS))]
                out.append((t, pid, action, res, tr.ws_at(u.user_id, t, ws), True, False, ""))
    return out


# =========================================================================== the table
Eligible = Callable[[Injector, StaffMember], bool]
Days = Callable[[Injector, StaffMember], list[int]]
Episode = Callable[[Injector, StaffMember, int], list[Access]]


@dataclass(frozen=True)
class Scenario:
    """One kind of misuse: who may commit it, when, and how an episode goes."""

    name: str
    description: str
    eligible: Eligible
    episode: Episode
    days: Days = Injector.session_days
    min_users: int = 5
    users_per_scale: float = 6.0
    max_episodes: int = 2


def _worker(inj: Injector, u: StaffMember) -> bool:
    return u.group in WORKERS and inj.steady(u)


def _has_seal_target(inj: Injector, u: StaffMember) -> bool:
    return _worker(inj, u) and any(
        u.user_id not in s.authorized and inj.w.patients[s.patient_id].sensitivity <= u.clearance
        for s in inj.w.seals.values()
    )


def _sealed_days(inj: Injector, u: StaffMember) -> list[int]:
    first = min(
        (s.sealed_at for s in inj.w.seals.values() if u.user_id not in s.authorized),
        default=inj.w.P1,
    )
    return [
        d
        for d in inj.session_days(u)
        if any(s[1] > first + 15 * MINUTE for s in inj.tr.sessions_on(u.user_id, d))
    ]


def _off_hours_days(inj: Injector, u: StaffMember) -> list[int]:
    return inj.all_days(u)


SCENARIO_TABLE: tuple[Scenario, ...] = (
    Scenario(
        SEALED_RECORD,
        "an unauthorised user opens a sealed record after sealing",
        _has_seal_target,
        _ep_sealed,
        _sealed_days,
    ),
    Scenario(
        NO_CARE_RELATIONSHIP,
        "browses 8–20 patients with no care relationship",
        lambda inj, u: _worker(inj, u) and u.group != "pharmacist",
        _ep_no_care,
    ),
    Scenario(
        OFF_HOURS_BULK,
        "views 20–60 unrelated charts within 30–90 min outside the shift",
        _worker,
        _ep_off_hours,
        _off_hours_days,
    ),
    Scenario(VIP_SNOOPING, "opens a VIP's chart with no care relationship", _worker, _ep_vip),
    Scenario(
        COWORKER_SNOOPING,
        "opens a colleague's own record with no care relationship",
        _worker,
        _ep_coworker,
    ),
    Scenario(
        FAMILY_SNOOPING,
        "opens a relative's record (same surname and address)",
        lambda inj, u: _worker(inj, u) and bool(u.relatives),
        _ep_family,
    ),
    Scenario(
        SELF_ACCESS,
        "opens own record",
        lambda inj, u: (
            _worker(inj, u)
            and bool(u.own_pid)
            and inj.w.patients[u.own_pid].sensitivity <= u.clearance
        ),
        _ep_self,
    ),
    Scenario(
        ACCOUNT_VALIDITY,
        "a leaver's or trainee's account used outside its validity",
        lambda inj, u: u.kind in ("leaver", "trainee"),
        _ep_validity,
        _validity_days,
    ),
    Scenario(
        GRANT_OUT_OF_SCOPE,
        "a vendor or researcher outside its grant's departments/actions",
        lambda inj, u: (
            u.role in ("vendor", "researcher") and bool(u.grants) and inj.steady_grant(u)
        ),
        _ep_grant_scope,
        Injector.all_days,
    ),
    Scenario(
        SENSITIVITY_ABOVE_CLEARANCE,
        "a clearance-1/2 user opens a sensitivity-4 record",
        lambda inj, u: _worker(inj, u) and u.clearance <= 2,
        _ep_sensitivity,
    ),
    Scenario(
        BULK_EXPORT,
        "20–100 exports/prints/copies within an hour",
        _worker,
        _ep_bulk_export,
        Injector.all_days,
    ),
    Scenario(
        CREDENTIAL_SHARING,
        "the account used from two workstations in different places at once",
        lambda inj, u: _worker(inj, u) and u.group not in CLERKS,
        _ep_credential,
    ),
    Scenario(DENIED_PROBING, "a burst of 8–20 failed accesses within minutes", _worker, _ep_denied),
    Scenario(
        BREAK_THE_GLASS_ABUSE,
        "break-the-glass outside the ED on unrelated patients",
        lambda inj, u: (
            u.group in ("physician", "nurse")
            and u.dept in CLINICAL
            and u.dept != "ED"
            and inj.steady(u)
        ),
        _ep_btg,
    ),
    Scenario(
        ROLE_RESOURCE_MISMATCH,
        "a clerk reads clinical notes and results",
        lambda inj, u: u.group in CLERKS and inj.steady(u),
        _ep_role_mismatch,
    ),
    Scenario(
        VOLUME_ANOMALY,
        "3–5× the usual number of distinct patients in one day",
        lambda inj, u: (
            u.group in ("nurse", "physician")
            and inj.steady(u)
            and u.shift_start < u.shift_end
            and inj.baseline(u) >= 5
        ),
        _ep_volume,
        max_episodes=1,
    ),
    Scenario(
        EXPLAINED_BROWSING,
        "a lab, radiology or pharmacy user reads notes and reports of a few patients a day on "
        "one ward over several days; every access is explained by the service reason",
        lambda inj, u: u.group in SERVICE_GROUPS and inj.steady(u),
        _ep_explained_browsing,
        max_episodes=1,
    ),
)
#: scenario names as written in labels.csv
SCENARIOS: tuple[str, ...] = tuple(s.name for s in SCENARIO_TABLE)


# =========================================================================== runner
@dataclass
class InjectionResult:
    users: dict[str, list[str]]
    events: dict[str, int]
    covering_events: int


def inject(
    w: World,
    tr: Traffic,
    rng: random.Random,
    covering: float = 0.0,
    table: tuple[Scenario, ...] = SCENARIO_TABLE,
) -> InjectionResult:
    """Add labelled misuse to ``tr.events``.

    Scenarios with the fewest eligible accounts choose first, so scarce accounts (vendors,
    clerks, leavers) go where they are needed; an account is reused by a second scenario
    only when a scenario would otherwise fall short of its user count.

    ``covering`` > 0 adds, per misuse episode, that fraction of extra *unlabelled* accesses
    by the same user to patients their job explains, interleaved in the episode's time span
    (the "covering accesses" that hide misuse in a normal-looking access pattern).
    """
    inj = Injector(w, tr, rng)
    staff = list(w.staff.values())
    eligible = {
        sc.name: [u for u in staff if sc.eligible(inj, u) and sc.days(inj, u)] for sc in table
    }
    order = sorted(table, key=lambda sc: (len(eligible[sc.name]), sc.name))
    used: set[str] = set()
    users: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    n_cover = 0
    for sc in order:
        want = max(sc.min_users, round(sc.users_per_scale * w.scale))
        cands = eligible[sc.name]
        fresh = [u for u in cands if u.user_id not in used]
        again = [u for u in cands if u.user_id in used]
        queue = rng.sample(fresh, len(fresh)) + rng.sample(again, len(again))
        got: list[str] = []
        n_events = 0
        for u in queue:
            if len(got) >= want:
                break
            days = sc.days(inj, u)
            k = min(len(days), sc.max_episodes, 2 if rng.random() < 0.35 else 1)
            added = 0
            for d in sorted(rng.sample(days, k)):
                acc = [a for a in sc.episode(inj, u, d) if w.P0 <= a[0] < w.P1]
                for t, pid, action, res, ws, ok, emergency, purpose in acc:
                    tr.add(t, u, pid, action, res, ws, ok, emergency, purpose, label=sc.name)
                added += len(acc)
                if acc and covering > 0:
                    n_cover += _cover(inj, u, d, acc, covering)
            if added:
                got.append(u.user_id)
                used.add(u.user_id)
                n_events += added
        users[sc.name] = sorted(got)
        counts[sc.name] = n_events
    return InjectionResult(
        users={n: users.get(n, []) for n in (sc.name for sc in table)},
        events={n: counts.get(n, 0) for n in (sc.name for sc in table)},
        covering_events=n_cover,
    )


def _cover(inj: Injector, u: StaffMember, d: int, acc: list[Access], covering: float) -> int:
    """Unlabelled accesses that hide an episode in ordinary work (covering accesses, USENIX
    Security 2023): about ``covering`` accesses per misuse access, interleaved in the episode's
    time span, as whole chart visits the user's job makes (the user's usual reads and writes),
    to patients the job explains. Where the job also explains patients of the targets' wards
    (service and administrative departments), half of the visits go there, so that the targets
    look like part of the community of patients the user usually serves."""
    rng, tr, w = inj.rng, inj.tr, inj.w
    lo, hi = min(a[0] for a in acc), max(a[0] for a in acc)
    wards: list[str] = []
    if u.group in SERVICE_GROUPS or u.group in CLERKS:
        for a in acc:
            enc = w.encounter_at(a[1], a[0])
            if enc is not None and enc.dept in CLINICAL and enc.dept not in wards:
                wards.append(enc.dept)
    budget = round(covering * len(acc))
    n = tries = 0
    while n < budget and tries < 3 * budget + 10:
        tries += 1
        t = lo + int(rng.random() * max(1, hi - lo))
        if not u.valid_at(t):
            continue  # an account outside its validity has no job to hide behind
        pid = None
        if wards and rng.random() < 0.5:
            lst = tr.care_list(wards[rng.randrange(len(wards))], t)
            if lst:
                cand = lst[rng.randrange(len(lst))].patient_id
                if w.allowed(u, cand, t) and not w.special(cand):
                    pid = cand
        pid = pid or tr.pick(u, t, w.day_of(t))
        if pid is None:
            continue
        before = len(tr.events)
        tr.visit(u, pid, t, tr.ws_at(u.user_id, t, acc[0][4]), w.day_of(t))
        n += len(tr.events) - before
    return n
