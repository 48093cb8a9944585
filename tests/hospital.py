"""A tiny hand-written hospital for engine tests: every fact here is chosen on purpose."""

from __future__ import annotations

from pathlib import Path

from emrwatch.context import write_context_csv

DEPARTMENTS = [
    {"department_id": "CARD", "name": "Cardiology", "kind": "clinical", "head_user_id": "d-card"},
    {"department_id": "ORTH", "name": "Orthopedics", "kind": "clinical", "head_user_id": "d-orth"},
    {
        "department_id": "ED",
        "name": "Emergency Department",
        "kind": "clinical",
        "head_user_id": "d-ed",
    },
    {"department_id": "RAD", "name": "Radiology", "kind": "service", "head_user_id": "d-rad"},
    {
        "department_id": "BILL",
        "name": "Billing",
        "kind": "administrative",
        "head_user_id": "d-bill",
    },
    {"department_id": "IT", "name": "IT", "kind": "administrative", "head_user_id": "d-it"},
]


def _staff(
    uid,
    role,
    dept,
    clearance=3,
    shift=("07:00", "15:00"),
    valid=("", ""),
    family="Wang",
    address="1 Elm Rd",
):
    return {
        "user_id": uid,
        "family_name": family,
        "given_name": uid,
        "role": role,
        "department_id": dept,
        "clearance": clearance,
        "shift_start": shift[0],
        "shift_end": shift[1],
        "valid_from": valid[0],
        "valid_until": valid[1],
        "supervisor_id": f"d-{dept.lower()}",
        "address": address,
    }


STAFF = [
    _staff("n-card", "nurse", "CARD", family="Li", address="5 Oak St"),
    _staff("n-orth", "nurse", "ORTH", family="Zhou", address="9 Pine St"),
    _staff(
        "p-card",
        "physician",
        "CARD",
        clearance=4,
        shift=("08:00", "17:00"),
        family="Chen",
        address="2 Ash Ln",
    ),
    _staff(
        "p-orth",
        "physician",
        "ORTH",
        clearance=4,
        shift=("08:00", "17:00"),
        family="Sun",
        address="3 Fir Ln",
    ),
    _staff("n-ed", "nurse", "ED", family="Gao", address="8 Bay Rd"),
    _staff("t-rad", "technician", "RAD", family="Hu", address="4 Sea Rd"),
    _staff("c-bill", "clerk", "BILL", clearance=1, family="Ma", address="6 Hill Rd"),
    _staff(
        "v-it",
        "vendor",
        "IT",
        clearance=2,
        valid=("2026-03-01", "2026-03-31"),
        family="Xu",
        address="7 Lake Rd",
    ),
    _staff(
        "leaver",
        "nurse",
        "CARD",
        valid=("2025-01-01", "2026-03-01"),
        family="He",
        address="10 Vale Rd",
    ),
]

PATIENTS = [
    {
        "patient_id": "P1",
        "family_name": "Zhao",
        "given_name": "A",
        "address": "11 Main St",
        "sensitivity": 1,
    },
    {
        "patient_id": "P2",
        "family_name": "Qian",
        "given_name": "B",
        "address": "12 Main St",
        "sensitivity": 1,
    },
    {
        "patient_id": "P-VIP",
        "family_name": "Star",
        "given_name": "C",
        "address": "1 Hill",
        "sensitivity": 2,
        "vip": 1,
    },
    {
        "patient_id": "P-EMP",
        "family_name": "Zhou",
        "given_name": "n-orth",
        "address": "9 Pine St",
        "sensitivity": 1,
        "employee_user_id": "n-orth",
    },
    {
        "patient_id": "P-REL",
        "family_name": "Li",
        "given_name": "D",
        "address": "5 Oak St",
        "sensitivity": 1,
    },
    {
        "patient_id": "P-PSY",
        "family_name": "Feng",
        "given_name": "E",
        "address": "13 Main St",
        "sensitivity": 4,
    },
    {
        "patient_id": "P-SEAL",
        "family_name": "Wei",
        "given_name": "F",
        "address": "14 Main St",
        "sensitivity": 2,
    },
    {
        "patient_id": "P-DIS",
        "family_name": "Shen",
        "given_name": "G",
        "address": "15 Main St",
        "sensitivity": 1,
    },
] + [
    {
        "patient_id": f"X{i}",
        "family_name": "Yang",
        "given_name": str(i),
        "address": f"{i} Far Rd",
        "sensitivity": 1,
    }
    for i in range(40)
]

ENCOUNTERS = [
    {
        "encounter_id": "E1",
        "patient_id": "P1",
        "department_id": "CARD",
        "start": "2026-03-01T10:00:00+08:00",
        "end": "",
        "attending_user_id": "p-card",
    },
    {
        "encounter_id": "E2",
        "patient_id": "P2",
        "department_id": "ORTH",
        "start": "2026-03-01T10:00:00+08:00",
        "end": "",
        "attending_user_id": "p-orth",
    },
    {
        "encounter_id": "E3",
        "patient_id": "P-VIP",
        "department_id": "CARD",
        "start": "2026-03-01T10:00:00+08:00",
        "end": "",
        "attending_user_id": "p-card",
    },
    {
        "encounter_id": "E4",
        "patient_id": "P-SEAL",
        "department_id": "CARD",
        "start": "2026-03-01T10:00:00+08:00",
        "end": "",
        "attending_user_id": "p-card",
    },
    {
        "encounter_id": "E5",
        "patient_id": "P-DIS",
        "department_id": "ORTH",
        "start": "2026-02-01T10:00:00+08:00",
        "end": "2026-02-10T10:00:00+08:00",
        "attending_user_id": "p-orth",
    },
    {
        "encounter_id": "E6",
        "patient_id": "P-PSY",
        "department_id": "CARD",
        "start": "2026-03-01T10:00:00+08:00",
        "end": "",
        "attending_user_id": "p-card",
    },
]

SEALED = [
    {
        "patient_id": "P-SEAL",
        "sealed_at": "2026-03-02T00:00:00+08:00",
        "reason": "medical dispute",
        "authorized_user_ids": "p-card",
    },
]

GRANTS = [
    {
        "user_id": "v-it",
        "departments": "RAD",
        "actions": "view;query",
        "purpose": "PACS maintenance",
        "valid_from": "2026-03-01",
        "valid_until": "2026-03-31",
    },
]


def write_hospital(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_context_csv(directory / "departments.csv", "departments", DEPARTMENTS)
    write_context_csv(directory / "staff.csv", "staff", STAFF)
    write_context_csv(directory / "patients.csv", "patients", PATIENTS)
    write_context_csv(directory / "encounters.csv", "encounters", ENCOUNTERS)
    write_context_csv(directory / "sealed.csv", "sealed", SEALED)
    write_context_csv(directory / "grants.csv", "grants", GRANTS)
    return directory


_counter = iter(range(10**9))


def ev(user, patient, at="2026-03-02T09:00:00", action="view", resource="Observation", **kw):
    """A canonical event dict at local time ``at`` (+08:00)."""
    d = {
        "event_id": kw.pop("event_id", f"ev{next(_counter):06d}"),
        "ts": at if "+" in at else at + "+08:00",
        "user_id": user,
        "patient_id": patient,
        "action": action,
        "resource_type": resource,
        "workstation": kw.pop("workstation", "ws-1"),
        "outcome": kw.pop("outcome", "success"),
    }
    d.update(kw)
    return d
