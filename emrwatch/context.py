"""Hospital reference data (CONTRACTS §2) as time-aware, indexed lookups.

Detectors ask questions per event ("is this patient under care in the user's department
right now?"), so everything is keyed by id and answered with dict lookups and a scan of one
patient's handful of encounters, never of a whole table.

The same record types are built from the CSVs, from compacted context topics and from
HL7/FHIR connectors: :func:`record_from_row` is the single place that turns a CSV-shaped
row into a typed record, and :meth:`Context.upsert` applies it, so context that changes
while the pipeline runs takes effect at once.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from emrwatch.events import parse_ts
from emrwatch.timeutil import DEFAULT_TIMEZONE, LocalClock, parse_hhmm

INF = math.inf
KNOWN_ROLES = frozenset(
    {
        "physician",
        "nurse",
        "trainee",
        "technician",
        "pharmacist",
        "clerk",
        "auditor",
        "vendor",
        "researcher",
    }
)
DEPARTMENT_KINDS = frozenset({"clinical", "service", "administrative"})
EMERGENCY_HINTS = ("emergency", "急诊")

CONTEXT_FILES: dict[str, tuple[str, ...]] = {
    "departments": ("department_id", "name", "kind", "head_user_id"),
    "staff": (
        "user_id",
        "family_name",
        "given_name",
        "role",
        "department_id",
        "clearance",
        "shift_start",
        "shift_end",
        "valid_from",
        "valid_until",
        "supervisor_id",
        "address",
    ),
    "patients": (
        "patient_id",
        "family_name",
        "given_name",
        "address",
        "sensitivity",
        "vip",
        "employee_user_id",
    ),
    "encounters": (
        "encounter_id",
        "patient_id",
        "department_id",
        "start",
        "end",
        "attending_user_id",
    ),
    "sealed": ("patient_id", "sealed_at", "reason", "authorized_user_ids"),
    "grants": ("user_id", "departments", "actions", "purpose", "valid_from", "valid_until"),
}


class ContextError(ValueError):
    """A context row that cannot be used; the message names the file, line and field."""


def normal_name(name: str) -> str:
    """A name as family matching compares it: lower case, single spaces."""
    return " ".join((name or "").lower().split())


def normal_address(address: str) -> str:
    """An address as family matching compares it: lower case, commas as spaces, single
    spaces."""
    return " ".join((address or "").lower().replace(",", " ").split())


def family_key(family_name: str, address: str) -> str:
    """Same surname and same address, normalised; '' when either is missing."""
    f = normal_name(family_name)
    a = normal_address(address)
    return f"{f}|{a}" if f and a else ""


def _split(cell: str) -> frozenset[str] | None:
    """';'-separated list; '*' means all (None); empty means none."""
    cell = (cell or "").strip()
    if cell == "*":
        return None
    return frozenset(x.strip() for x in cell.split(";") if x.strip())


@dataclass(slots=True)
class Department:
    department_id: str
    name: str
    kind: str
    head_user_id: str
    is_emergency: bool = False


@dataclass(slots=True)
class Staff:
    user_id: str
    family_name: str
    given_name: str
    role: str
    department_id: str
    clearance: int
    shift_start: int | None
    shift_end: int | None
    valid_from: float
    valid_until: float
    supervisor_id: str
    address: str
    family_key: str = ""

    @property
    def display_name(self) -> str:
        return f"{self.family_name} {self.given_name}".strip()

    @property
    def shift_words(self) -> str:
        """ "07:00–15:00", or "" when the roster gives no shift."""
        on, off = self.shift_start, self.shift_end
        if on is None or off is None:
            return ""
        return f"{on // 60:02d}:{on % 60:02d}–{off // 60:02d}:{off % 60:02d}"


@dataclass(slots=True)
class Patient:
    patient_id: str
    family_name: str
    given_name: str
    address: str
    sensitivity: int
    vip: bool
    employee_user_id: str
    family_key: str = ""


@dataclass(slots=True)
class Encounter:
    encounter_id: str
    patient_id: str
    department_id: str
    start: float
    end: float  # INF while ongoing
    attending_user_id: str


@dataclass(slots=True)
class Seal:
    patient_id: str
    sealed_at: float
    reason: str
    authorized: frozenset[str]


@dataclass(slots=True)
class Grant:
    user_id: str
    departments: frozenset[str] | None  # None = all
    actions: frozenset[str] | None  # None = all
    purpose: str
    valid_from: float
    valid_until: float

    def covers(self, t: float, action: str, departments: Iterable[str]) -> bool:
        if not (self.valid_from <= t < self.valid_until):
            return False
        if self.actions is not None and action not in self.actions:
            return False
        if self.departments is None:
            return True
        return any(d in self.departments for d in departments)


Record = Department | Staff | Patient | Encounter | Seal | Grant


def _int(row: dict[str, str], key: str, default: int, lo: int, hi: int) -> int:
    raw = (row.get(key) or "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ContextError(f"{key}: {raw!r} is not a whole number") from None
    if not lo <= v <= hi:
        raise ContextError(f"{key}: {v} is outside {lo}..{hi}")
    return v


def _ts(row: dict[str, str], key: str, default: float) -> float:
    raw = (row.get(key) or "").strip()
    if not raw:
        return default
    try:
        return parse_ts(raw)
    except ValueError as exc:
        raise ContextError(f"{key}: {exc}") from None


def _date(row: dict[str, str], key: str, clock: LocalClock, end: bool) -> float:
    raw = (row.get(key) or "").strip()
    if not raw:
        return INF if end else -INF
    try:
        d = date.fromisoformat(raw[:10])
    except ValueError:
        raise ContextError(f"{key}: {raw!r} is not YYYY-MM-DD") from None
    return clock.day_end(d) if end else clock.day_start(d)


def record_from_row(kind: str, row: dict[str, str], clock: LocalClock) -> Record:
    """Turn one CSV-shaped row of context ``kind`` into its typed record."""
    g = lambda k: (row.get(k) or "").strip()  # noqa: E731
    if kind == "departments":
        dkind = g("kind").lower() or "clinical"
        if dkind not in DEPARTMENT_KINDS:
            raise ContextError(f"kind: {dkind!r} is not one of {sorted(DEPARTMENT_KINDS)}")
        name = g("name")
        emergency = g("department_id").upper() in ("ED", "ER") or any(
            h in name.lower() for h in EMERGENCY_HINTS
        )
        return Department(g("department_id"), name, dkind, g("head_user_id"), emergency)
    if kind == "staff":
        role = g("role").lower()
        return Staff(
            user_id=g("user_id"),
            family_name=g("family_name"),
            given_name=g("given_name"),
            role=role,
            department_id=g("department_id"),
            clearance=_int(row, "clearance", 1, 1, 4),
            shift_start=parse_hhmm(g("shift_start")),
            shift_end=parse_hhmm(g("shift_end")),
            valid_from=_date(row, "valid_from", clock, end=False),
            valid_until=_date(row, "valid_until", clock, end=True),
            supervisor_id=g("supervisor_id"),
            address=g("address"),
            family_key=family_key(g("family_name"), g("address")),
        )
    if kind == "patients":
        return Patient(
            patient_id=g("patient_id"),
            family_name=g("family_name"),
            given_name=g("given_name"),
            address=g("address"),
            sensitivity=_int(row, "sensitivity", 1, 1, 4),
            vip=g("vip").lower() in ("1", "true", "yes"),
            employee_user_id=g("employee_user_id"),
            family_key=family_key(g("family_name"), g("address")),
        )
    if kind == "encounters":
        start = _ts(row, "start", -INF)
        if start == -INF:
            raise ContextError("start: required")
        return Encounter(
            g("encounter_id"),
            g("patient_id"),
            g("department_id"),
            start,
            _ts(row, "end", INF),
            g("attending_user_id"),
        )
    if kind == "sealed":
        return Seal(
            g("patient_id"),
            _ts(row, "sealed_at", -INF),
            g("reason"),
            _split(g("authorized_user_ids")) or frozenset(),
        )
    if kind == "grants":
        return Grant(
            user_id=g("user_id"),
            departments=_split(g("departments")),
            actions=_split(g("actions")),
            purpose=g("purpose"),
            valid_from=_date(row, "valid_from", clock, end=False),
            valid_until=_date(row, "valid_until", clock, end=True),
        )
    raise ContextError(f"unknown context kind {kind!r}")


class Context:
    """All reference data, indexed for per-event questions."""

    def __init__(self, timezone: str = DEFAULT_TIMEZONE) -> None:
        self.clock = LocalClock(timezone)
        self.departments: dict[str, Department] = {}
        self.staff: dict[str, Staff] = {}
        self.patients: dict[str, Patient] = {}
        self.encounters: dict[str, Encounter] = {}
        self.encounters_by_patient: dict[str, list[Encounter]] = {}
        self.seals: dict[str, Seal] = {}
        self.grants: dict[str, list[Grant]] = {}
        self.version = 0  # bumped on every change, so caches can tell

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, directory: str | Path, timezone: str = DEFAULT_TIMEZONE) -> Context:
        ctx = cls(timezone)
        directory = Path(directory)
        if not directory.is_dir():
            raise ContextError(f"context directory {directory} does not exist")
        for kind in CONTEXT_FILES:
            path = directory / f"{kind}.csv"
            if path.exists():
                for rec in read_context_csv(path, kind, ctx.clock):
                    ctx.upsert(rec)
        return ctx

    def upsert(self, rec: Record) -> None:
        """Insert or replace one record. Grants are keyed by (user, departments, actions, purpose)."""
        self.version += 1
        if isinstance(rec, Staff):
            self.staff[rec.user_id] = rec
        elif isinstance(rec, Patient):
            self.patients[rec.patient_id] = rec
        elif isinstance(rec, Encounter):
            self._drop_encounter(rec.encounter_id)
            self.encounters[rec.encounter_id] = rec
            lst = self.encounters_by_patient.setdefault(rec.patient_id, [])
            lst.append(rec)
            lst.sort(key=lambda e: e.start)
        elif isinstance(rec, Seal):
            self.seals[rec.patient_id] = rec
        elif isinstance(rec, Grant):
            self._drop_grant(rec.user_id, _grant_key(rec))
            self.grants.setdefault(rec.user_id, []).append(rec)
        elif isinstance(rec, Department):
            self.departments[rec.department_id] = rec
        else:  # pragma: no cover - typing guards this
            raise ContextError(f"not a context record: {rec!r}")

    def remove(self, kind: str, key: Sequence[str]) -> bool:
        """Forget one record (a tombstone on its context topic): ``key`` holds the values of
        the kind's key columns (``pipeline.topics.CONTEXT_KEY_COLUMNS``). Accesses after
        this are judged without it (a cancelled admission no longer explains them); what
        was judged before stays as it was. True if there was such a record."""
        first = key[0] if key else ""
        if kind == "staff":
            found = self.staff.pop(first, None) is not None
        elif kind == "patients":
            found = self.patients.pop(first, None) is not None
        elif kind == "departments":
            found = self.departments.pop(first, None) is not None
        elif kind == "sealed":
            found = self.seals.pop(first, None) is not None
        elif kind == "encounters":
            found = self._drop_encounter(first) is not None
        elif kind == "grants":
            if len(key) != 4:
                raise ContextError(f"a grant's key has 4 parts, got {len(key)}")
            user_id, depts, actions, purpose = key
            found = self._drop_grant(
                user_id.strip(), (_split(depts), _split(actions), purpose.strip())
            )
        else:
            raise ContextError(f"unknown context kind {kind!r}")
        if not found:
            return False
        self.version += 1
        return True

    def _drop_encounter(self, encounter_id: str) -> Encounter | None:
        """Take an encounter out of both indexes; the one that was there, if any."""
        enc = self.encounters.pop(encounter_id, None)
        if enc is not None:
            left = [e for e in self.encounters_by_patient.get(enc.patient_id, []) if e is not enc]
            if left:
                self.encounters_by_patient[enc.patient_id] = left
            else:
                self.encounters_by_patient.pop(enc.patient_id, None)
        return enc

    def _drop_grant(self, user_id: str, key: tuple[Any, ...]) -> bool:
        """Take out the user's grant with this (departments, actions, purpose); whether
        there was one."""
        lst = self.grants.get(user_id, [])
        keep = [g for g in lst if _grant_key(g) != key]
        if len(keep) == len(lst):
            return False
        if keep:
            self.grants[user_id] = keep
        else:
            self.grants.pop(user_id, None)
        return True

    def upsert_row(self, kind: str, row: dict[str, str]) -> Record:
        rec = record_from_row(kind, row, self.clock)
        self.upsert(rec)
        return rec

    # ---------------------------------------------------------------- questions
    def encounters_of(self, patient_id: str) -> list[Encounter]:
        return self.encounters_by_patient.get(patient_id, _EMPTY)

    def seal_applies(self, patient_id: str, user_id: str, t: float) -> Seal | None:
        """The seal this access breaks, if any."""
        s = self.seals.get(patient_id)
        if s is None or t < s.sealed_at or user_id in s.authorized:
            return None
        return s

    def account_valid(self, staff: Staff, t: float) -> bool:
        return staff.valid_from <= t < staff.valid_until

    def stats(self) -> dict[str, int]:
        return {
            "departments": len(self.departments),
            "staff": len(self.staff),
            "patients": len(self.patients),
            "encounters": len(self.encounters),
            "sealed": len(self.seals),
            "grants": sum(len(v) for v in self.grants.values()),
        }


_EMPTY: list[Encounter] = []


def _grant_key(g: Grant) -> tuple[Any, ...]:
    """What tells a user's grants apart (the grants topic's key, parsed)."""
    return (g.departments, g.actions, g.purpose)


def read_context_csv(path: Path, kind: str, clock: LocalClock) -> Iterator[Record]:
    """Typed records from one context CSV; a bad row raises with file and line."""
    required = CONTEXT_FILES[kind]
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required[:1] if c not in (reader.fieldnames or [])]
        if missing:
            raise ContextError(f"{path.name}: missing column(s) {missing}")
        for row in reader:
            try:
                yield record_from_row(kind, row, clock)
            except ContextError as exc:
                raise ContextError(f"{path.name}:{reader.line_num}: {exc}") from None


def write_context_csv(path: Path, kind: str, rows: Iterable[dict[str, Any]]) -> None:
    cols = CONTEXT_FILES[kind]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
