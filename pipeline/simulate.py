"""``emrwatch simulate``: a simulated hospital with labelled misuse.

The detectors are evaluated on this data, so it models a hospital, not a test: a census
with admissions, transfers, clinic and ED visits; staff on rosters and shifts working in
sessions at their usual workstations; the confounders real logs have (consults, on-call
look-ups, break-the-glass in the ED, service departments, billing on recent discharges,
grants, residual unexplained look-ups); and sixteen kinds of misuse, each access labelled
with exactly one scenario (:data:`SCENARIOS`).

Output (``out_dir``): the six context CSVs of CONTRACTS §2, ``events.ndjson`` (FHIR R4
AuditEvent per line, sorted by ``recorded``), ``labels.csv`` (``event_id,scenario,user_id``,
misuse only) and ``manifest.json`` (parameters and summary).

Determinism: every random choice comes from ``random.Random(seed)`` (and generators seeded
from it), there is no wall clock, and event ids are 32 hex digits drawn from the same
stream, so the same (seed, days, scale, start, timezone, covering) gives byte-identical files.

Where this package is layered:
:mod:`pipeline.simulate_world` (reference data) → :mod:`pipeline.simulate_traffic` (benign
work) → :mod:`pipeline.simulate_misuse` (scenario table and injection) → here (files).
"""

from __future__ import annotations

import argparse
import csv
import gc
import random
import sys
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from connectors.fhir_encode import to_audit_event
from emrwatch.context import write_context_csv
from emrwatch.events import AccessEvent
from emrwatch.timeutil import DEFAULT_TIMEZONE, LocalClock
from pipeline.simulate_misuse import (
    ACCOUNT_VALIDITY,
    BREAK_THE_GLASS_ABUSE,
    BULK_EXPORT,
    COWORKER_SNOOPING,
    CREDENTIAL_SHARING,
    DENIED_PROBING,
    FAMILY_SNOOPING,
    GRANT_OUT_OF_SCOPE,
    NO_CARE_RELATIONSHIP,
    OFF_HOURS_BULK,
    ROLE_RESOURCE_MISMATCH,
    SCENARIO_TABLE,
    SCENARIOS,
    SEALED_RECORD,
    SELF_ACCESS,
    SENSITIVITY_ABOVE_CLEARANCE,
    VIP_SNOOPING,
    VOLUME_ANOMALY,
    Scenario,
    inject,
)
from pipeline.simulate_traffic import Traffic
from pipeline.simulate_world import DEPARTMENT_SPECS, INF_T, World, build_world

__all__ = [
    "SCENARIOS",
    "SCENARIO_TABLE",
    "Scenario",
    "simulate",
    "main",
    "SEALED_RECORD",
    "NO_CARE_RELATIONSHIP",
    "OFF_HOURS_BULK",
    "VIP_SNOOPING",
    "COWORKER_SNOOPING",
    "FAMILY_SNOOPING",
    "SELF_ACCESS",
    "ACCOUNT_VALIDITY",
    "GRANT_OUT_OF_SCOPE",
    "SENSITIVITY_ABOVE_CLEARANCE",
    "BULK_EXPORT",
    "CREDENTIAL_SHARING",
    "DENIED_PROBING",
    "BREAK_THE_GLASS_ABUSE",
    "ROLE_RESOURCE_MISMATCH",
    "VOLUME_ANOMALY",
]

FORMAT_VERSION = 1
DEFAULT_START = date(2026, 3, 2)


class _IsoFormatter:
    """POSIX seconds → ISO 8601 local time with offset, cached per local hour (fast enough
    for 200k+ events; right for any zone, DST and half-hour offsets included)."""

    def __init__(self, clock: LocalClock) -> None:
        self.clock = clock
        self.cache: dict[tuple[int, int], tuple[str, str]] = {}

    def __call__(self, t: int) -> str:
        off = self.clock.offset(t)
        lt = t + off
        key = (lt // 3600, off)
        p = self.cache.get(key)
        if p is None:
            dt = datetime(1970, 1, 1) + timedelta(seconds=key[0] * 3600)
            a = abs(off)
            p = (
                dt.strftime("%Y-%m-%dT%H:"),
                f"{'+' if off >= 0 else '-'}{a // 3600:02d}:{a % 3600 // 60:02d}",
            )
            self.cache[key] = p
        r = lt % 3600
        return f"{p[0]}{r // 60:02d}:{r % 60:02d}{p[1]}"


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _write_context(w: World, out: Path, iso: _IsoFormatter) -> None:
    """The six context CSVs with exactly the CONTRACTS §2 columns, rows sorted by id."""
    write_context_csv(
        out / "departments.csv",
        "departments",
        (
            {
                "department_id": d.department_id,
                "name": d.name,
                "kind": d.kind,
                "head_user_id": w.heads.get(d.department_id, ""),
            }
            for d in DEPARTMENT_SPECS
        ),
    )
    write_context_csv(
        out / "staff.csv",
        "staff",
        (
            {
                "user_id": u.user_id,
                "family_name": u.family_name,
                "given_name": u.given_name,
                "role": u.role,
                "department_id": u.dept,
                "clearance": u.clearance,
                "shift_start": _hhmm(u.shift_start),
                "shift_end": _hhmm(u.shift_end),
                "valid_from": u.valid_from.isoformat() if u.valid_from else "",
                "valid_until": u.valid_until.isoformat() if u.valid_until else "",
                "supervisor_id": u.supervisor_id,
                "address": u.address,
            }
            for u in sorted(w.staff.values(), key=lambda u: u.user_id)
        ),
    )
    write_context_csv(
        out / "patients.csv",
        "patients",
        (
            {
                "patient_id": p.patient_id,
                "family_name": p.family_name,
                "given_name": p.given_name,
                "address": p.address,
                "sensitivity": p.sensitivity,
                "vip": int(p.vip),
                "employee_user_id": p.employee_user_id,
            }
            for p in sorted(w.patients.values(), key=lambda p: p.patient_id)
        ),
    )
    write_context_csv(
        out / "encounters.csv",
        "encounters",
        (
            {
                "encounter_id": e.encounter_id,
                "patient_id": e.patient_id,
                "department_id": e.dept,
                "start": iso(e.start),
                "end": "" if e.end >= INF_T else iso(e.end),
                "attending_user_id": e.attending,
            }
            for e in w.encounters
        ),
    )
    write_context_csv(
        out / "sealed.csv",
        "sealed",
        (
            {
                "patient_id": s.patient_id,
                "sealed_at": iso(s.sealed_at),
                "reason": s.reason,
                "authorized_user_ids": ";".join(s.authorized),
            }
            for s in sorted(w.seals.values(), key=lambda s: s.patient_id)
        ),
    )
    write_context_csv(
        out / "grants.csv",
        "grants",
        (
            {
                "user_id": g.user_id,
                "departments": "*" if g.departments is None else ";".join(g.departments),
                "actions": "*" if g.actions is None else ";".join(g.actions),
                "purpose": g.purpose,
                "valid_from": g.valid_from.isoformat(),
                "valid_until": g.valid_until.isoformat(),
            }
            for g in sorted(w.grants, key=lambda g: g.user_id)
        ),
    )


def _write_events(
    w: World, tr: Traffic, out: Path, iso: _IsoFormatter, rng: random.Random
) -> tuple[int, list[tuple[str, str, str]]]:
    """events.ndjson sorted by time (ties keep generation order); returns the count and the
    label rows. Events outside the period (night shifts straddling its edges) are dropped."""
    evs = [e for e in tr.events if w.P0 <= e[0] < w.P1]
    evs.sort(key=lambda e: e[0])
    labels: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    dumps = orjson.dumps
    with (out / "events.ndjson").open("wb") as fh:
        buf: list[bytes] = []
        for t, uid, pid, action, res, ws, ok, emergency, purpose, source, label in evs:
            eid = f"{rng.getrandbits(128):032x}"
            while eid in seen:  # pragma: no cover - 2^-128
                eid = f"{rng.getrandbits(128):032x}"
            seen.add(eid)
            enc = w.encounter_at(pid, t)
            ev = AccessEvent(
                event_id=eid,
                ts=iso(t),
                t=float(t),
                user_id=uid,
                patient_id=pid,
                action=action,
                resource_type=res,
                workstation=ws,
                outcome="success" if ok else "failure",
                emergency=emergency,
                purpose=purpose,
                source=source,
                encounter_id=enc.encounter_id if enc else "",
            )
            buf.append(dumps(to_audit_event(ev)))
            if label:
                labels.append((eid, label, uid))
            if len(buf) >= 20_000:
                fh.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            fh.write(b"\n".join(buf) + b"\n")
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(("event_id", "scenario", "user_id"))
        wr.writerows(labels)
    return len(evs), labels


def simulate(
    out_dir: Path,
    days: int = 7,
    seed: int = 1,
    scale: float = 1.0,
    start: date = DEFAULT_START,
    timezone: str = DEFAULT_TIMEZONE,
    covering: float = 0.0,
) -> dict[str, Any]:
    """Write a simulated hospital and its labelled access log into ``out_dir``.

    ``scale`` multiplies staff, patients and traffic (~30,000 events a day at 1).
    ``covering`` (default 0) adds that fraction of unlabelled, job-explained accesses around
    each misuse episode, to study covering-access evasion. Returns the summary that is also
    stored in ``manifest.json``.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    if scale <= 0:
        raise ValueError("scale must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # hundreds of thousands of small tuples and dicts, no reference cycles: the cyclic GC
    # would only rescan them over and over (a third of the run time)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(out, days, seed, scale, start, timezone, covering)
    finally:
        if gc_was_enabled:
            gc.enable()


def _simulate(
    out: Path, days: int, seed: int, scale: float, start: date, timezone: str, covering: float
) -> dict[str, Any]:
    master = random.Random(seed)
    w = build_world(random.Random(master.getrandbits(64)), start, days, scale, timezone)
    tr = Traffic(w, random.Random(master.getrandbits(64)))
    tr.run()
    res = inject(w, tr, random.Random(master.getrandbits(64)), covering=covering)
    iso = _IsoFormatter(w.clock)
    _write_context(w, out, iso)
    n_events, labels = _write_events(w, tr, out, iso, random.Random(master.getrandbits(64)))
    by_scn = Counter(lbl for _, lbl, _ in labels)
    users_by_scn: dict[str, set[str]] = {}
    for _, lbl, uid in labels:
        users_by_scn.setdefault(lbl, set()).add(uid)
    summary: dict[str, Any] = {
        "period": {"start": iso(w.P0), "end": iso(w.P1), "days": days, "timezone": timezone},
        "departments": len(DEPARTMENT_SPECS),
        "staff": len(w.staff),
        "patients": len(w.patients),
        "encounters": len(w.encounters),
        "sealed": len(w.seals),
        "grants": len(w.grants),
        "events": n_events,
        "benign_events": n_events - len(labels),
        "misuse_events": len(labels),
        "covering_events": res.covering_events,
        "misuse_events_by_scenario": {s: by_scn.get(s, 0) for s in SCENARIOS},
        "misuse_users_by_scenario": {s: sorted(users_by_scn.get(s, ())) for s in SCENARIOS},
        "misuse_user_counts": {s: len(users_by_scn.get(s, ())) for s in SCENARIOS},
    }
    manifest = {
        "generator": "emrwatch simulate",
        "format_version": FORMAT_VERSION,
        "parameters": {
            "days": days,
            "seed": seed,
            "scale": scale,
            "start": start.isoformat(),
            "timezone": timezone,
            "covering": covering,
        },
        "files": {
            "context": [
                "departments.csv",
                "staff.csv",
                "patients.csv",
                "encounters.csv",
                "sealed.csv",
                "grants.csv",
            ],
            "events": "events.ndjson",
            "events_format": "FHIR R4 AuditEvent, one per line, sorted by recorded",
            "labels": "labels.csv",
        },
        "scenarios": {sc.name: sc.description for sc in SCENARIO_TABLE},
        "summary": summary,
    }
    (out / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.simulate --out DIR``: the same as ``emrwatch simulate``."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.simulate", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", required=True)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--start", type=date.fromisoformat, default=DEFAULT_START)
    p.add_argument("--timezone", default=DEFAULT_TIMEZONE)
    p.add_argument("--covering", type=float, default=0.0)
    a = p.parse_args(argv)
    summary = simulate(Path(a.out), a.days, a.seed, a.scale, a.start, a.timezone, a.covering)
    sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
