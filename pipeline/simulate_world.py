"""The simulated hospital's reference data: departments, staff, patients, encounters, seals, grants.

Everything here is what a hospital's HR, ADT and records systems would hold. It is built
first, then :mod:`pipeline.simulate_traffic` (benign work) and :mod:`pipeline.simulate_misuse`
(labelled misuse) generate accesses against it. The model follows how hospitals work
(census, length of stay, shifts, transfers, households) rather than any detector: nothing in
here knows a threshold.

All randomness comes from ``random.Random`` instances handed in by the caller; sets are never
iterated where the order would reach the random stream, so a seed gives byte-identical output.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from emrwatch.timeutil import LocalClock

DAY = 86_400
HOUR = 3_600
MINUTE = 60
#: "ongoing": an encounter end far beyond any simulated period.
INF_T = 1 << 62
#: inpatient history simulated before the period, so the census is full on day one and
#: billing clerks have recently discharged patients to work on.
HISTORY_DAYS = 40
#: outpatient and ED history before the period (billing works on the last ~30 days).
VISIT_HISTORY_DAYS = 30
#: administrative departments work on encounters that ended within this many days.
RECENT_DISCHARGE_DAYS = 30


# --------------------------------------------------------------------------- departments
@dataclass(frozen=True, slots=True)
class DeptSpec:
    """One department at scale 1: staffing and patient flow."""

    department_id: str
    name: str
    kind: str
    physicians: int = 0
    nurses: int = 0
    beds: float = 0.0  # mean inpatient census
    los_days: float = 0.0  # mean length of stay
    outpatients: float = 0.0  # clinic visits per weekday
    from_ed: float = 0.0  # share of admissions that arrive through the ED
    technicians: int = 0
    pharmacists: int = 0
    clerks: int = 0


DEPARTMENT_SPECS: tuple[DeptSpec, ...] = (
    DeptSpec("CARD", "Cardiology", "clinical", 10, 20, 28, 5.0, 14, 0.35),
    DeptSpec("ORTH", "Orthopedics", "clinical", 9, 18, 26, 6.0, 12, 0.30),
    DeptSpec("IM", "Internal Medicine", "clinical", 14, 28, 40, 7.0, 20, 0.40),
    DeptSpec("SURG", "General Surgery", "clinical", 11, 24, 32, 6.0, 10, 0.30),
    DeptSpec("PED", "Pediatrics", "clinical", 8, 16, 20, 4.0, 14, 0.30),
    DeptSpec("OB", "Obstetrics", "clinical", 7, 16, 18, 3.0, 10, 0.20),
    DeptSpec("ONC", "Oncology", "clinical", 8, 16, 24, 8.0, 8, 0.10),
    DeptSpec("PSY", "Psychiatry", "clinical", 5, 12, 18, 14.0, 6, 0.15),
    DeptSpec("NEURO", "Neurology", "clinical", 7, 14, 20, 7.0, 10, 0.35),
    DeptSpec("ICU", "Intensive Care Unit", "clinical", 7, 24, 12, 4.0, 0, 0.50),
    DeptSpec("ED", "Emergency Department", "clinical", 12, 24),
    DeptSpec("RAD", "Radiology", "service", physicians=4, technicians=9),
    DeptSpec("LAB", "Laboratory", "service", physicians=1, technicians=11),
    DeptSpec("PHARM", "Pharmacy", "service", pharmacists=10),
    DeptSpec("HIM", "Medical Records", "administrative", clerks=8),
    DeptSpec("BILL", "Billing", "administrative", clerks=10),
    DeptSpec("IT", "Information Technology", "administrative", technicians=2),
)
DEPT_BY_ID = {d.department_id: d for d in DEPARTMENT_SPECS}
CLINICAL = tuple(d.department_id for d in DEPARTMENT_SPECS if d.kind == "clinical")
WARDS = tuple(d for d in CLINICAL if d != "ED")  # departments with beds
SERVICE = tuple(d.department_id for d in DEPARTMENT_SPECS if d.kind == "service")
ADMIN_WORK = ("HIM", "BILL")  # administrative departments that work on patient records
#: ED visits per day at scale 1 that go home (admitted ones come from the wards' admissions).
ED_DISCHARGED_VISITS = 45.0
#: share of ED visits opened (break-the-glass) minutes before registration creates them.
ED_LAG_SHARE = 0.15
#: where the ED admits to, and where ICU patients step down to.
ICU_STEP_DOWN = ("IM", "SURG", "CARD", "NEURO")

# --------------------------------------------------------------------------- shifts (minutes)
OFFICE = (510, 1050)  # 08:30–17:30
PHYSICIAN_DAY = (480, 1020)  # 08:00–17:00
NURSE_SHIFTS = ((420, 900), (900, 1380), (1380, 420))  # 07–15, 15–23, 23–07
ED_PHYSICIAN_SHIFTS = ((480, 1200), (1200, 480))  # 08–20, 20–08
RAD_SHIFTS = ((480, 1020), (1020, 60))  # 08–17, 17–01
LAB_SHIFTS = ((480, 960), (960, 0), (0, 480))  # 08–16, 16–24, 00–08
PHARM_SHIFTS = ((480, 1020), (960, 0))  # 08–17, 16–24
VENDOR_HOURS = (540, 1080)  # 09:00–18:00

# --------------------------------------------------------------------------- names
#: common Chinese surnames (pinyin) with rough population shares, so that Wang/Li/Zhang are
#: as common among patients as they are in life: sharing a surname alone means nothing.
SURNAMES: tuple[tuple[str, float], ...] = (
    ("Li", 7.19),
    ("Wang", 7.12),
    ("Zhang", 6.79),
    ("Liu", 5.38),
    ("Chen", 4.53),
    ("Yang", 3.08),
    ("Zhao", 2.29),
    ("Huang", 2.23),
    ("Zhou", 2.12),
    ("Wu", 2.05),
    ("Xu", 1.67),
    ("Sun", 1.54),
    ("Hu", 1.31),
    ("Zhu", 1.26),
    ("Gao", 1.21),
    ("Lin", 1.18),
    ("He", 1.17),
    ("Guo", 1.15),
    ("Ma", 1.05),
    ("Luo", 0.86),
    ("Liang", 0.85),
    ("Song", 0.81),
    ("Zheng", 0.78),
    ("Xie", 0.72),
    ("Han", 0.68),
    ("Tang", 0.65),
    ("Feng", 0.64),
    ("Yu", 0.62),
    ("Dong", 0.61),
    ("Xiao", 0.59),
    ("Cheng", 0.57),
    ("Cao", 0.57),
    ("Yuan", 0.54),
    ("Deng", 0.54),
    ("Fu", 0.51),
    ("Shen", 0.50),
    ("Zeng", 0.50),
    ("Peng", 0.49),
    ("Lv", 0.47),
    ("Su", 0.46),
    ("Lu", 0.46),
    ("Jiang", 0.45),
    ("Cai", 0.44),
    ("Jia", 0.43),
    ("Ding", 0.42),
    ("Wei", 0.41),
    ("Xue", 0.40),
    ("Ye", 0.39),
    ("Yan", 0.38),
    ("Pan", 0.37),
    ("Du", 0.36),
    ("Dai", 0.35),
    ("Xia", 0.34),
    ("Zhong", 0.33),
    ("Tian", 0.32),
    ("Ren", 0.31),
    ("Fan", 0.30),
    ("Fang", 0.29),
    ("Shi", 0.29),
    ("Yao", 0.28),
    ("Tan", 0.28),
    ("Liao", 0.27),
    ("Zou", 0.26),
    ("Xiong", 0.26),
    ("Jin", 0.25),
    ("Hao", 0.24),
    ("Kong", 0.23),
    ("Bai", 0.23),
    ("Cui", 0.22),
    ("Kang", 0.21),
    ("Mao", 0.21),
    ("Qiu", 0.21),
    ("Qin", 0.20),
    ("Gu", 0.19),
    ("Hou", 0.19),
    ("Shao", 0.19),
    ("Meng", 0.18),
    ("Long", 0.18),
    ("Wan", 0.17),
    ("Duan", 0.17),
    ("Lei", 0.16),
    ("Qian", 0.16),
    ("Yin", 0.15),
    ("Yi", 0.15),
    ("Chang", 0.14),
    ("Qiao", 0.14),
    ("Lai", 0.13),
    ("Gong", 0.13),
    ("Wen", 0.13),
)
GIVEN_SYLLABLES: tuple[str, ...] = (
    "wei",
    "fang",
    "na",
    "min",
    "jing",
    "li",
    "qiang",
    "lei",
    "jun",
    "yang",
    "yong",
    "yan",
    "jie",
    "juan",
    "tao",
    "ming",
    "chao",
    "xia",
    "ping",
    "gang",
    "hua",
    "hui",
    "yu",
    "hao",
    "xin",
    "yi",
    "zi",
    "han",
    "xuan",
    "rui",
    "bo",
    "lin",
    "ying",
    "hong",
    "jian",
    "guo",
    "zhi",
    "wen",
    "bin",
    "kai",
    "lan",
    "mei",
    "qing",
    "shu",
    "ting",
    "xue",
    "yun",
    "zhen",
    "feng",
    "long",
    "peng",
    "fei",
    "dan",
    "lu",
    "ning",
    "qian",
    "shan",
    "xiu",
    "yue",
    "cheng",
    "hai",
    "jia",
    "chen",
    "xiao",
    "an",
    "le",
    "ran",
    "si",
    "tian",
    "yao",
    "zhe",
    "hang",
    "kun",
    "sheng",
    "wu",
)
STREETS: tuple[str, ...] = (
    "Wenyi Road",
    "Tianmushan Road",
    "Jiefang Road",
    "Renmin Road",
    "Zhongshan Road",
    "Yanan Road",
    "Hubin Road",
    "Qingchun Road",
    "Fengqi Road",
    "Moganshan Road",
    "Gudun Road",
    "Shixiang Road",
    "Jianguo Road",
    "Dongxin Road",
    "Qiutao Road",
    "Wulin Road",
    "Xueyuan Road",
    "Wensan Road",
    "Jiaogong Road",
    "Binsheng Road",
    "Jiangnan Avenue",
    "Xixi Road",
    "Wener Road",
    "Tiancheng Road",
    "Kaixuan Road",
    "Changqing Street",
    "Nanshan Road",
    "Shaoxing Road",
    "Huancheng North Road",
    "Qianjiang Road",
    "Jiangling Road",
    "Stadium Road",
)
DISTRICTS: tuple[str, ...] = (
    "Xihu",
    "Gongshu",
    "Shangcheng",
    "Binjiang",
    "Xiaoshan",
    "Yuhang",
    "Linping",
    "Qiantang",
)
SEAL_REASONS: tuple[str, ...] = (
    "medical dispute",
    "medical dispute",
    "medical dispute",
    "litigation hold",
    "patient complaint under investigation",
    "court order",
)


# --------------------------------------------------------------------------- records
@dataclass(slots=True)
class StaffMember:
    """One account. ``kind`` says how the simulator treats it (never written out)."""

    user_id: str
    family_name: str
    given_name: str
    role: str
    dept: str
    clearance: int
    shift_start: int
    shift_end: int
    valid_from: date | None
    valid_until: date | None
    supervisor_id: str = ""
    address: str = ""
    kind: str = (
        "regular"  # regular, head, head_nurse, leaver, trainee, vendor, researcher, auditor, it
    )
    vf_ts: float = -math.inf
    vu_ts: float = math.inf
    workstations: list[str] = field(default_factory=list)
    rate: float = 1.0
    on_call: bool = False
    rest_offset: int = 0
    own_pid: str = ""
    relatives: list[str] = field(default_factory=list)  # patient ids: same surname and address
    housemates: list[str] = field(default_factory=list)  # same address, other surname
    excluded: set[str] = field(default_factory=set)  # own record + relatives: never benign
    grants: list[Grant] = field(default_factory=list)
    purpose: str = "TREAT"
    source: str = "EMR"
    group: str = ""  # traffic group: nurse, physician, trainee, technician, ...

    def valid_at(self, t: float) -> bool:
        return self.vf_ts <= t < self.vu_ts

    def in_shift_minute(self, minute: int) -> bool:
        s, e = self.shift_start, self.shift_end
        if s < e:
            return s <= minute < e
        return minute >= s or minute < e


@dataclass(slots=True)
class Grant:
    """An explicit permission (CONTRACTS §2 grants.csv)."""

    user_id: str
    departments: tuple[str, ...] | None  # None = all
    actions: tuple[str, ...] | None
    purpose: str
    valid_from: date
    valid_until: date
    vf_ts: float = -math.inf
    vu_ts: float = math.inf


@dataclass(slots=True)
class Enc:
    """One encounter; ``end`` is :data:`INF_T` while ongoing past the period."""

    encounter_id: str
    patient_id: str
    dept: str
    start: int
    end: int
    attending: str
    kind: str  # inpatient, outpatient, emergency, historical
    ed_lag: int = 0  # seconds the ED looked at the patient before registration


@dataclass(slots=True)
class PatientRec:
    """One patient. ``depts``/``attendings`` cover every encounter, past and current."""

    patient_id: str
    family_name: str
    given_name: str
    address: str
    sensitivity: int = 1
    vip: bool = False
    employee_user_id: str = ""
    relative_of: str = ""  # staff user id when created as that staff member's relative
    hiv: bool = False
    encs: list[Enc] = field(default_factory=list)
    depts: set[str] = field(default_factory=set)
    attendings: set[str] = field(default_factory=set)
    busy_until: int = -INF_T


@dataclass(slots=True)
class Seal:
    patient_id: str
    sealed_at: int
    reason: str
    authorized: list[str]
    dept: str


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw (Knuth for small means, a rounded normal for large ones)."""
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def weighted_picker(items: list[tuple[Any, float]]) -> tuple[list[Any], list[float]]:
    """Names and cumulative weights for :func:`pick_weighted`."""
    names: list[Any] = []
    cum: list[float] = []
    total = 0.0
    for name, w in items:
        total += w
        names.append(name)
        cum.append(total)
    return names, cum


def pick_weighted(rng: random.Random, names: list, cum: list[float]) -> object:
    return names[bisect_right(cum, rng.random() * cum[-1])]


class World:
    """The hospital: reference data plus the calendar. Built by :func:`build_world`."""

    def __init__(self, start: date, days: int, scale: float, timezone: str) -> None:
        self.start = start
        self.days = days
        self.scale = scale
        self.tz = ZoneInfo(timezone)
        self.clock = LocalClock(timezone)
        self.P0 = int(self.day_start(0))
        self.P1 = int(self.day_start(days))
        self.staff: dict[str, StaffMember] = {}
        self.patients: dict[str, PatientRec] = {}
        self.patient_ids: list[str] = []
        self.encounters: list[Enc] = []
        self.seals: dict[str, Seal] = {}
        self.grants: list[Grant] = []
        self.heads: dict[str, str] = {}
        self.dept_staff: dict[str, list[str]] = {}
        self.dept_ws: dict[str, list[str]] = {}
        self.dept_encs: dict[str, list[Enc]] = {}

    # ------------------------------------------------------------------ calendar
    @lru_cache(maxsize=4096)  # noqa: B019 - one World per run; the cache dies with it
    def day_start(self, d: int) -> float:
        """POSIX seconds of local midnight starting day ``d`` (0 = ``start``)."""
        return datetime.combine(self.start + timedelta(days=d), time(0, 0), self.tz).timestamp()

    @lru_cache(maxsize=65536)  # noqa: B019
    def wall(self, d: int, minute: int) -> int:
        """POSIX seconds of local wall-clock ``minute`` (may exceed 1440) on day ``d``."""
        extra, minute = divmod(minute, 1440)
        dt = datetime.combine(
            self.start + timedelta(days=d + extra), time(minute // 60, minute % 60), self.tz
        )
        return int(dt.timestamp())

    def date_ts(self, d: date, end: bool) -> float:
        """A date bound as the context loader reads it: day start, or the first instant after."""
        if end:
            d = d + timedelta(days=1)
        return datetime.combine(d, time(0, 0), self.tz).timestamp()

    def day_of(self, t: float) -> int:
        """Local day index of ``t`` relative to ``start``."""
        return self.clock.local_day(t) - self.clock.local_day(self.P0)

    def weekday(self, d: int) -> int:
        return (self.start + timedelta(days=d)).weekday()

    def minute_of(self, t: float) -> int:
        return self.clock.minute_of_day(t)

    def shift_window(self, u: StaffMember, d: int) -> tuple[int, int]:
        """The shift of ``u`` that starts on local day ``d`` (it may end the next day)."""
        s, e = u.shift_start, u.shift_end
        return self.wall(d, s), self.wall(d, e if e > s else e + 1440)

    # ------------------------------------------------------------------ questions
    def encounter_at(self, pid: str, t: int) -> Enc | None:
        """The patient's encounter active at ``t``, if any."""
        for e in self.patients[pid].encs:
            if e.start <= t < e.end:
                return e
        return None

    def related(self, u: StaffMember, pid: str, t: int) -> bool:
        """Is there any recorded reason for ``u`` to open ``pid`` around ``t``?

        Used to pick *unrelated* targets (misuse, residual look-ups): department care at any
        time, attending, service to an active encounter, administrative work on a recent
        discharge, a grant. Own record and relatives are checked separately (``excluded``)."""
        p = self.patients[pid]
        if u.dept in p.depts or u.user_id in p.attendings:
            return True
        kind = DEPT_BY_ID[u.dept].kind
        if kind == "service":
            for e in p.encs:
                if e.start - DAY <= t < e.end + DAY:
                    return True
        elif u.dept in ADMIN_WORK:
            for e in p.encs:
                if e.start <= t and e.end >= t - (RECENT_DISCHARGE_DAYS + 2) * DAY:
                    return True
        for g in u.grants:
            if g.departments is None or any(d in p.depts for d in g.departments):
                return True
        return False

    def special(self, pid: str) -> bool:
        """Patients whose unexplained access is itself a misuse scenario (VIP, sealed,
        employee): kept out of residual look-ups and of other scenarios' targets."""
        p = self.patients[pid]
        return p.vip or bool(p.employee_user_id) or pid in self.seals

    def allowed(self, u: StaffMember, pid: str, t: int, ahead: int = 20 * MINUTE) -> bool:
        """Hospital policy that benign work respects: never own record or relatives, never
        above clearance, never a sealed record unless on its care team (nor a chart that
        will be sealed within ``ahead`` seconds, while the visit is still going on)."""
        if pid in u.excluded:
            return False
        p = self.patients[pid]
        if p.sensitivity > u.clearance:
            return False
        s = self.seals.get(pid)
        return not (s is not None and t + ahead >= s.sealed_at and u.user_id not in s.authorized)


# =========================================================================== building
def build_world(rng: random.Random, start: date, days: int, scale: float, timezone: str) -> World:
    """The whole hospital for one run. Order matters for determinism: staff, patients,
    encounters, sensitivity, VIP, seals, grants."""
    w = World(start, days, scale, timezone)
    names = _Names(random.Random(rng.getrandbits(64)))
    _build_staff(w, random.Random(rng.getrandbits(64)), names)
    _build_patients(w, random.Random(rng.getrandbits(64)), names)
    _build_encounters(w, random.Random(rng.getrandbits(64)))
    _finish_patients(w, random.Random(rng.getrandbits(64)))
    _build_seals(w, random.Random(rng.getrandbits(64)))
    _build_grants(w)
    return w


class _Names:
    """Chinese-style names and unique addresses (pinyin, ASCII)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.surnames, self.cum = weighted_picker(list(SURNAMES))
        self.used_addresses: set[str] = set()

    def family(self) -> str:
        return str(pick_weighted(self.rng, self.surnames, self.cum))

    def given(self) -> str:
        r = self.rng
        if r.random() < 0.3:
            return r.choice(GIVEN_SYLLABLES).capitalize()
        return (r.choice(GIVEN_SYLLABLES) + r.choice(GIVEN_SYLLABLES)).capitalize()

    def address(self) -> str:
        """A fresh household address: no two households share one by accident."""
        r = self.rng
        while True:
            a = (
                f"Rm {r.randint(1, 28)}{r.randint(1, 6):02d}, Bldg {r.randint(1, 40)}, "
                f"No. {r.randint(1, 399)} {r.choice(STREETS)}, {r.choice(DISTRICTS)} District"
            )
            if a not in self.used_addresses:
                self.used_addresses.add(a)
                return a


def _scaled(base: float, scale: float, minimum: int) -> int:
    return max(minimum, round(base * scale))


def _build_staff(w: World, rng: random.Random, names: _Names) -> None:
    """~400 accounts at scale 1: clinical teams, service and administrative staff, heads,
    auditors, vendors, researchers, trainees and leavers."""
    s = w.scale
    ids = rng.sample(range(10000, 99999), 300 + int(600 * s))
    id_iter = iter(ids)

    def hire_date() -> date:
        return w.start - timedelta(days=rng.randint(60, 20 * 365))

    def add(
        role: str,
        dept: str,
        clearance: int,
        shift: tuple[int, int],
        kind: str = "regular",
        valid_from: date | None = None,
        valid_until: date | None = None,
    ) -> StaffMember:
        u = StaffMember(
            user_id=f"U{next(id_iter)}",
            family_name=names.family(),
            given_name=names.given(),
            role=role,
            dept=dept,
            clearance=clearance,
            shift_start=shift[0],
            shift_end=shift[1],
            valid_from=valid_from if valid_from is not None else hire_date(),
            valid_until=valid_until,
            address=names.address(),
            kind=kind,
        )
        u.rate = rng.lognormvariate(0.0, 0.28)
        u.rest_offset = rng.randrange(7)
        w.staff[u.user_id] = u
        w.dept_staff.setdefault(dept, []).append(u.user_id)
        return u

    for spec in DEPARTMENT_SPECS:
        dept = spec.department_id
        if spec.kind == "clinical":
            n_phys = _scaled(spec.physicians, s, 2)
            n_nurse = _scaled(spec.nurses, s, 3)
            high = dept in ("PSY", "ONC")
            for i in range(n_phys):
                shift = ED_PHYSICIAN_SHIFTS[i % 2] if dept == "ED" else PHYSICIAN_DAY
                clearance = 4 if (i == 0 or high or rng.random() < 0.6) else 3
                u = add("physician", dept, clearance, shift, "head" if i == 0 else "regular")
                u.on_call = dept != "ED" and i > 0 and rng.random() < 0.45
            for i in range(n_nurse):
                shift = NURSE_SHIFTS[(0, 0, 1, 2, 0, 1, 0, 2)[i % 8]]
                if dept == "PSY":
                    clearance = 4
                elif high or dept in ("ED", "ICU"):
                    clearance = rng.choice((3, 4))
                else:
                    clearance = 2 if rng.random() < 0.45 else 3
                if i == 0:
                    clearance = max(clearance, 3)
                add("nurse", dept, clearance, shift, "head_nurse" if i == 0 else "regular")
        elif dept == "RAD" or dept == "LAB":
            shifts = RAD_SHIFTS if dept == "RAD" else LAB_SHIFTS
            for _ in range(_scaled(spec.physicians, s, 1)):
                add(
                    "physician",
                    dept,
                    4,
                    PHYSICIAN_DAY,
                    "head" if dept not in w.dept_staff else "regular",
                )
            for i in range(_scaled(spec.technicians, s, 2)):
                add(
                    "technician",
                    dept,
                    rng.choice((2, 3)),
                    shifts[(0, 0, 1, 0, 2)[i % 5] % len(shifts)],
                )
        elif dept == "PHARM":
            for i in range(_scaled(spec.pharmacists, s, 2)):
                add(
                    "pharmacist",
                    dept,
                    4 if i == 0 else 3,
                    PHARM_SHIFTS[(0, 0, 1)[i % 3]],
                    "head" if i == 0 else "regular",
                )
        elif dept in ADMIN_WORK:
            for i in range(_scaled(spec.clerks, s, 4)):
                clearance = 4 if i == 0 else (1 if rng.random() < 0.35 else 2)
                add("clerk", dept, clearance, OFFICE, "head" if i == 0 else "regular")
            if dept == "HIM":
                for _ in range(3 if s >= 0.8 else 2):
                    add(
                        "auditor",
                        dept,
                        4,
                        OFFICE,
                        "auditor",
                        valid_from=w.start - timedelta(days=rng.randint(400, 3000)),
                    )
        elif dept == "IT":
            for i in range(_scaled(spec.technicians, s, 1)):
                add("technician", dept, 1, OFFICE, "head" if i == 0 else "it")
            for _ in range(_scaled(4, s, 3)):
                add(
                    "vendor",
                    dept,
                    rng.choice((1, 2)),
                    VENDOR_HOURS,
                    "vendor",
                    valid_from=w.start - timedelta(days=rng.randint(20, 120)),
                    valid_until=w.start + timedelta(days=w.days + rng.randint(20, 120)),
                )
        w.dept_ws[dept] = []
    # researchers sit in the department they study
    for dept in ("ONC", "NEURO", "CARD", "IM")[: _scaled(2, s, 2)]:
        add(
            "researcher",
            dept,
            3,
            VENDOR_HOURS,
            "researcher",
            valid_from=w.start - timedelta(days=rng.randint(30, 300)),
            valid_until=w.start + timedelta(days=w.days + rng.randint(30, 300)),
        )
    _add_trainees(w, rng, add)
    _mark_leavers(w, rng)
    _heads_and_supervisors(w, rng)
    _workstations(w, rng)
    for u in w.staff.values():
        u.vf_ts = w.date_ts(u.valid_from, end=False) if u.valid_from else -math.inf
        u.vu_ts = w.date_ts(u.valid_until, end=True) if u.valid_until else math.inf
        u.group = _group(u)
        u.purpose = _purpose(u)
        u.source = {"RAD": "PACS", "LAB": "LIS", "PHARM": "PIS", "BILL": "HIS-billing"}.get(
            u.dept, "EMR"
        )


def _add_trainees(w: World, rng: random.Random, add: Callable[..., StaffMember]) -> None:
    """Trainees: some cover the period, some start or leave mid-period (or, with one day,
    just before/after it)."""
    n = _scaled(12, w.scale, 6)
    depts = [d for d in CLINICAL if d != "PSY"]
    for i in range(n):
        dept = depts[rng.randrange(len(depts))]
        mode = ("whole", "late", "early")[i % 3]
        if mode == "whole":
            vf = w.start - timedelta(days=rng.randint(20, 150))
            vu = w.start + timedelta(days=w.days + rng.randint(10, 90))
        elif mode == "late":
            r = rng.randint(1, w.days - 1) if w.days >= 2 else rng.randint(1, 10)
            vf = w.start + timedelta(days=r)
            vu = vf + timedelta(days=rng.randint(60, 180))
        else:
            r = rng.randint(1, w.days - 1) if w.days >= 2 else -rng.randint(1, 10)
            vu = w.start + timedelta(days=r - 1)
            vf = vu - timedelta(days=rng.randint(60, 180))
        shift = NURSE_SHIFTS[0] if rng.random() < 0.4 else PHYSICIAN_DAY
        add("trainee", dept, 2, shift, "trainee", valid_from=vf, valid_until=vu)


def _mark_leavers(w: World, rng: random.Random) -> None:
    """Leavers: ordinary staff whose account ends before the last day (HR closed the
    contract; the account may not be disabled everywhere)."""
    pool = [
        u
        for u in w.staff.values()
        if u.kind == "regular" and u.role in ("nurse", "physician", "technician", "clerk")
    ]
    for u in rng.sample(pool, min(len(pool), _scaled(8, w.scale, 5))):
        r = rng.randint(-3, w.days - 2) if w.days >= 2 else rng.randint(-3, -1)
        u.valid_until = w.start + timedelta(days=r)
        u.kind = "leaver"


def _heads_and_supervisors(w: World, rng: random.Random) -> None:
    for dept, uids in w.dept_staff.items():
        head = next((x for x in uids if w.staff[x].kind == "head"), uids[0])
        w.heads[dept] = head
    director = w.heads["IM"]
    for dept, uids in w.dept_staff.items():
        head = w.heads[dept]
        head_nurse = next((x for x in uids if w.staff[x].kind == "head_nurse"), head)
        for uid in uids:
            u = w.staff[uid]
            if uid == head:
                u.supervisor_id = director if uid != director else w.heads["ICU"]
            elif u.role == "nurse" and uid != head_nurse:
                u.supervisor_id = head_nurse
            elif u.role == "vendor":
                u.supervisor_id = w.heads["IT"]
            else:
                u.supervisor_id = head
    _ = rng


def _workstations(w: World, rng: random.Random) -> None:
    """Shared department workstations; each user has one to three usual ones."""
    for dept, uids in w.dept_staff.items():
        n = max(2, math.ceil(len(uids) / 3))
        pool = [f"WS-{dept}-{i + 1:02d}" for i in range(n)]
        w.dept_ws[dept] = pool
        for uid in uids:
            u = w.staff[uid]
            if u.role == "vendor":
                u.workstations = [f"VND-{uid[1:]}-{i}" for i in range(1, 3)]
                continue
            k = min(len(pool), rng.choice((1, 2, 2, 3)))
            u.workstations = rng.sample(pool, k)


def _group(u: StaffMember) -> str:
    """Traffic group: what kind of work the account does."""
    if u.role in ("auditor", "vendor", "researcher", "trainee", "pharmacist"):
        return u.role
    if u.dept == "IT":
        return "idle"
    if u.role == "technician" or (u.role == "physician" and u.dept in SERVICE):
        return "rad" if u.dept == "RAD" else "lab"
    if u.role == "clerk":
        return "billing" if u.dept == "BILL" else "records"
    return u.role  # physician, nurse


def _purpose(u: StaffMember) -> str:
    """The purpose of use the user's EMR client stamps on every access."""
    return {
        "billing": "HPAYMT",
        "records": "HOPERAT",
        "auditor": "HCOMPL",
        "vendor": "HSYSADMIN",
        "researcher": "HRESCH",
        "idle": "HSYSADMIN",
    }.get(u.group, "TREAT")


# --------------------------------------------------------------------------- patients
def _build_patients(w: World, rng: random.Random, names: _Names) -> None:
    """Employees' own records, staff relatives (same surname and address), housemates with
    another surname, and the general population in households."""
    n_total = _scaled(4000, w.scale, 300)
    pid_numbers = rng.sample(range(1_000_000, 9_999_999), n_total + 50)
    it = iter(pid_numbers)

    def new(family: str, given: str, address: str) -> PatientRec:
        p = PatientRec(f"P{next(it)}", family, given, address)
        w.patients[p.patient_id] = p
        return p

    staff = [u for u in w.staff.values() if u.role != "vendor"]
    for u in rng.sample(staff, max(8, round(0.09 * len(staff)))):
        p = new(u.family_name, u.given_name, u.address)
        p.employee_user_id = u.user_id
        u.own_pid = p.patient_id
        u.excluded.add(p.patient_id)
    for u in rng.sample(staff, max(14, round(0.13 * len(staff)))):
        for _ in range(1 if rng.random() < 0.6 else 2):
            p = new(u.family_name, names.given(), u.address)
            p.relative_of = u.user_id
            u.relatives.append(p.patient_id)
            u.excluded.add(p.patient_id)
    for u in rng.sample(staff, max(5, round(0.05 * len(staff)))):
        fam = names.family()
        while fam == u.family_name:
            fam = names.family()
        p = new(fam, names.given(), u.address)  # spouse: same address, own surname
        u.housemates.append(p.patient_id)
    households: list[tuple[str, str]] = []
    while len(w.patients) < n_total:
        if households and rng.random() < 0.25:
            fam, addr = households[rng.randrange(len(households))]
            fam = fam if rng.random() < 0.7 else names.family()
        else:
            fam, addr = names.family(), names.address()
            households.append((fam, addr))
        new(fam, names.given(), addr)
    w.patient_ids = list(w.patients)


# --------------------------------------------------------------------------- encounters
def _admission_minute(rng: random.Random) -> int:
    """Elective admissions cluster in working hours; others come at any time."""
    if rng.random() < 0.7:
        return rng.randint(8 * 60, 17 * 60)
    return rng.randint(0, 1439)


class _EncounterMaker:
    """Creates encounters and keeps each patient's encounters from overlapping."""

    def __init__(self, w: World, rng: random.Random) -> None:
        self.w = w
        self.rng = rng
        self.physicians = {
            d: [x for x in w.dept_staff.get(d, []) if w.staff[x].role == "physician"]
            for d in CLINICAL
        }
        self.general = [pid for pid, p in w.patients.items() if not p.employee_user_id]

    def attending(self, dept: str, p: PatientRec | None = None) -> str:
        """A physician of ``dept``; never the patient themself or their relative (a
        physician does not treat their own family here: policy in most hospitals)."""
        lst = self.physicians[dept]
        avoid = (p.employee_user_id, p.relative_of) if p is not None else ()
        for _ in range(10):
            uid = lst[self.rng.randrange(len(lst))]
            if uid not in avoid:
                return uid
        return next((x for x in lst if x not in avoid), lst[0])

    def free_patient(self, t: int, pool: list[str] | None = None) -> PatientRec | None:
        pool = pool or self.w.patient_ids
        for _ in range(30):
            p = self.w.patients[pool[self.rng.randrange(len(pool))]]
            if p.busy_until <= t:
                return p
        return None

    def add(
        self, p: PatientRec, dept: str, start: int, end: int, kind: str, attending: str = ""
    ) -> Enc:
        e = Enc("", p.patient_id, dept, start, end, attending or self.attending(dept, p), kind)
        p.encs.append(e)
        p.busy_until = max(p.busy_until, end)
        self.w.encounters.append(e)
        return e

    def discharge_time(self, t: int, dept: str) -> int:
        """Wards discharge late morning to afternoon; the ICU steps down at any hour."""
        if dept == "ICU":
            return t
        d = self.w.day_of(t)
        minute = self.rng.randint(9 * 60 + 30, 16 * 60)
        out = self.w.wall(d, minute)
        return out if out >= t else self.w.wall(d + 1, minute)

    def stay(self, p: PatientRec, dept: str, admit: int, depth: int = 0) -> int:
        """An inpatient stay, possibly continued by a transfer; returns the final end."""
        spec = DEPT_BY_ID[dept]
        los = self.rng.lognormvariate(math.log(spec.los_days) - 0.18, 0.6) * DAY
        end = max(self.discharge_time(int(admit + los), dept), admit + 4 * HOUR)
        e = self.add(p, dept, admit, end, "inpatient")
        if depth < 2:
            r = self.rng.random()
            if dept == "ICU" and r < 0.7:
                ward = ICU_STEP_DOWN[self.rng.randrange(len(ICU_STEP_DOWN))]
                return self.stay(p, ward, end, depth + 1)
            if dept in ("SURG", "CARD", "NEURO", "IM") and r < 0.04:
                return self.stay(p, "ICU", end, depth + 1)  # deteriorated: moved to the ICU
        return e.end

    def stay_from_ed(self, p: PatientRec, dept: str, admit: int) -> None:
        ed_start = admit - self.rng.randint(1 * HOUR, 6 * HOUR)
        e = self.add(p, "ED", ed_start, admit, "emergency")
        if self.rng.random() < ED_LAG_SHARE:
            e.ed_lag = self.rng.randint(60, 600)
        self.stay(p, dept, admit)


def _build_encounters(w: World, rng: random.Random) -> None:
    """ADT history: admissions (some through the ED), transfers, clinic and ED visits over
    the period and the weeks before it, plus older history for most patients."""
    m = _EncounterMaker(w, rng)
    s = w.scale
    # VIPs and employees first, so their stays are guaranteed and others do not collide
    general = m.general
    vips = rng.sample(general, max(3, round(0.005 * len(w.patients))))
    for pid in vips:
        w.patients[pid].vip = True
    for pid in vips[: (len(vips) + 2) // 3]:  # a third are in hospital now
        dept = rng.choice(("CARD", "IM", "SURG", "ORTH", "NEURO", "ONC"))
        admit = w.P0 - rng.randint(6 * HOUR, 3 * DAY)
        m.add(w.patients[pid], dept, admit, admit + rng.randint(4, 12) * DAY, "inpatient")
    employees = [p for p in w.patients.values() if p.employee_user_id]
    for emp in rng.sample(employees, max(1, round(0.3 * len(employees)))):
        dept = rng.choice(CLINICAL[:-2])
        t = w.wall(rng.randrange(w.days), rng.randint(8 * 60, 16 * 60))
        if rng.random() < 0.3:
            m.add(emp, dept, t - rng.randint(1, 3) * DAY, t + rng.randint(1, 4) * DAY, "inpatient")
        else:
            m.add(emp, dept, t, t + rng.randint(30, 150) * MINUTE, "outpatient")
    # inpatient admissions, day by day
    for d in range(-HISTORY_DAYS, w.days):
        weekend = w.weekday(d) >= 5
        for dept in WARDS:
            spec = DEPT_BY_ID[dept]
            lam = spec.beds * s / spec.los_days * (0.75 if weekend else 1.1)
            for _ in range(poisson(rng, lam)):
                admit = w.wall(d, _admission_minute(rng))
                from_ed = rng.random() < spec.from_ed
                p = m.free_patient(admit - (6 * HOUR if from_ed else 0))
                if p is None:
                    continue
                if from_ed:
                    m.stay_from_ed(p, dept, admit)
                else:
                    m.stay(p, dept, admit)
    # clinic visits and ED visits that go home
    for d in range(-VISIT_HISTORY_DAYS, w.days):
        wd = w.weekday(d)
        factor = 1.0 if wd < 5 else (0.3 if wd == 5 else 0.0)
        for dept in WARDS:
            for _ in range(poisson(rng, DEPT_BY_ID[dept].outpatients * s * factor)):
                t = w.wall(d, rng.randint(8 * 60, 16 * 60 + 30))
                p = m.free_patient(t)
                if p is not None:
                    m.add(p, dept, t, t + rng.randint(20, 180) * MINUTE, "outpatient")
        for _ in range(poisson(rng, ED_DISCHARGED_VISITS * s)):
            minute = rng.randint(0, 1439) if rng.random() < 0.35 else rng.randint(8 * 60, 23 * 60)
            t = w.wall(d, minute)
            p = m.free_patient(t)
            if p is not None:
                e = m.add(p, "ED", t, t + rng.randint(60, 480) * MINUTE, "emergency")
                if rng.random() < ED_LAG_SHARE:
                    e.ed_lag = rng.randint(60, 600)
    # older history (ended before anything above)
    horizon = w.P0 - (HISTORY_DAYS + 45) * DAY
    for pid in w.patient_ids:
        p = w.patients[pid]
        if rng.random() < 0.55:
            t = horizon - rng.randint(30 * DAY, 3 * 365 * DAY)
            for _ in range(rng.choice((1, 1, 2, 3))):
                dept = WARDS[rng.randrange(len(WARDS))] if rng.random() < 0.8 else "ED"
                length = (
                    rng.randint(2 * DAY, 10 * DAY)
                    if rng.random() < 0.3
                    else rng.randint(HOUR, 5 * HOUR)
                )
                if t + length >= horizon:
                    break
                e = Enc("", pid, dept, t, t + length, m.attending(dept, p), "historical")
                p.encs.append(e)
                w.encounters.append(e)
                t += length + rng.randint(20 * DAY, 300 * DAY)
    # ids in time order, like an ADT system's sequence; ongoing stays have no end
    w.encounters.sort(key=lambda e: (e.start, e.patient_id, e.dept))
    for i, e in enumerate(w.encounters):
        e.encounter_id = f"E{2_000_000 + i}"
        if e.end >= w.P1:
            e.end = INF_T if e.kind != "historical" else e.end
    for p in w.patients.values():
        p.encs.sort(key=lambda e: e.start)
        p.depts = {e.dept for e in p.encs}
        p.attendings = {e.attending for e in p.encs}
    for e in w.encounters:
        w.dept_encs.setdefault(e.dept, []).append(e)


def _finish_patients(w: World, rng: random.Random) -> None:
    """Sensitivity: psychiatric and HIV records are grade 4; the rest mostly 1–2."""
    for pid in w.patient_ids:
        p = w.patients[pid]
        r = rng.random()
        p.sensitivity = 1 if r < 0.74 else (2 if r < 0.96 else 3)
        p.hiv = rng.random() < 0.005
        if p.hiv or "PSY" in p.depts:
            p.sensitivity = 4


def _build_seals(w: World, rng: random.Random) -> None:
    """~0.3% of patients sealed after a dispute about a recent stay; the care team of that
    stay (attending, a few of the ward's nurses) and the records head stay authorised."""
    n = _scaled(0.003 * len(w.patients), 1.0, 3)
    cands: list[tuple[PatientRec, Enc]] = []
    for pid in w.patient_ids:
        p = w.patients[pid]
        if p.vip or p.employee_user_id or p.relative_of or p.sensitivity >= 4:
            continue
        for e in p.encs:
            if e.kind == "inpatient" and e.start < w.P0 - DAY and e.end >= w.P0 - 20 * DAY:
                cands.append((p, e))
                break
    # prefer stays that go on into the period: the ward keeps treating a sealed patient
    cands.sort(key=lambda pe: 0 if pe[1].end > w.P0 + DAY else 1)
    head = cands[: max(n * 3, 12)]
    for p, e in rng.sample(head, min(n, len(head))):
        lo = max(e.start + 12 * HOUR, w.P0 - 10 * DAY)
        hi = max(lo + HOUR, w.P0 + max(0.0, w.days - 1.5) * DAY)
        sealed_at = int(lo + rng.random() * (hi - lo))
        nurses = [x for x in w.dept_staff[e.dept] if w.staff[x].role == "nurse"]
        team = [
            e.attending,
            *rng.sample(nurses, min(len(nurses), rng.randint(2, 4))),
            w.heads["HIM"],
        ]
        w.seals[p.patient_id] = Seal(
            p.patient_id, sealed_at, rng.choice(SEAL_REASONS), list(dict.fromkeys(team)), e.dept
        )


def _build_grants(w: World) -> None:
    """Explicit permissions: audits hospital-wide, vendor maintenance and research scoped to
    departments, teaching for about half of the trainees."""
    far_past = w.start - timedelta(days=365)
    far_future = w.start + timedelta(days=w.days + 365)
    vendor_depts = [d for d in WARDS if d != "PSY"]
    k = 0
    for u in w.staff.values():
        g: Grant | None = None
        if u.role == "auditor":
            g = Grant(u.user_id, None, ("view", "query"), "audit", far_past, far_future)
        elif u.role == "vendor":
            a = vendor_depts[(3 * k) % len(vendor_depts)]
            b = vendor_depts[(3 * k + 1) % len(vendor_depts)]
            k += 1
            g = Grant(
                u.user_id,
                (a, b),
                ("view", "query"),
                "system maintenance",
                u.valid_from or far_past,
                u.valid_until or far_future,
            )
        elif u.role == "researcher":
            g = Grant(
                u.user_id,
                (u.dept,),
                ("view", "query"),
                "research",
                u.valid_from or far_past,
                u.valid_until or far_future,
            )
        elif u.role == "trainee" and int(u.user_id[1:]) % 2 == 0:
            g = Grant(
                u.user_id,
                (u.dept,),
                ("view", "query"),
                "teaching",
                u.valid_from or far_past,
                u.valid_until or far_future,
            )
        if g is not None:
            g.vf_ts = w.date_ts(g.valid_from, end=False)
            g.vu_ts = w.date_ts(g.valid_until, end=True)
            u.grants.append(g)
            w.grants.append(g)
