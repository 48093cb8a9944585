"""The simulated hospital: determinism, file contracts, and that every label means what it
says (misuse facts hold) while benign traffic keeps the hospital's policy.

Runs are small (2 days, scale 0.4) to stay fast; one module-scoped run serves most tests.
Events are decoded here with a small reader written from CONTRACTS §3, independent of the
connector under test elsewhere; one test checks that the two agree.
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from emrwatch.context import CONTEXT_FILES, Context
from emrwatch.events import EXFIL_ACTIONS, parse_ts
from emrwatch.timeutil import in_shift
from pipeline.simulate import SCENARIO_TABLE, SCENARIOS, simulate

DAYS, SEED, SCALE = 2, 7, 0.4
FILES = (
    "departments.csv",
    "staff.csv",
    "patients.csv",
    "encounters.csv",
    "sealed.csv",
    "grants.csv",
    "events.ndjson",
    "labels.csv",
    "manifest.json",
)
CLINICAL_NOTES = {"DocumentReference", "Observation", "DiagnosticReport"}
_SUBTYPE_ACTION = {
    "read": "view",
    "vread": "view",
    "search": "query",
    "search-type": "query",
    "create": "create",
    "update": "update",
    "delete": "delete",
    "print": "print",
    "export": "export",
    "copy": "copy",
    "forward": "forward",
}


@dataclass(frozen=True)
class Ev:
    event_id: str
    ts: str
    t: float
    user_id: str
    workstation: str
    patient_id: str
    resource_type: str
    action: str
    success: bool
    emergency: bool
    purposes: tuple[str, ...]


def decode(line: bytes) -> Ev:
    """CONTRACTS §3, for exactly the shape the simulator writes."""
    o = orjson.loads(line)
    agent = next((a for a in o["agent"] if a.get("requestor")), o["agent"][0])
    pid, res = "", "Patient"
    for ent in o.get("entity", []):
        ref = ent["what"].get("reference", "")
        kind, _, ident = ref.partition("/")
        if kind == "Patient":
            pid = ident
        elif kind != "Encounter":
            res = kind
    codes = [s["code"] for s in o.get("subtype", [])]
    action = {"C": "create", "R": "view", "U": "update", "D": "delete", "E": "execute"}[o["action"]]
    for c in codes:
        action = _SUBTYPE_ACTION.get(c, action)
    purposes = tuple(c["code"] for p in o.get("purposeOfUse", []) for c in p["coding"])
    return Ev(
        o["id"],
        o["recorded"],
        parse_ts(o["recorded"]),
        agent["who"]["identifier"]["value"],
        agent.get("network", {}).get("address", ""),
        pid,
        res,
        action,
        o["outcome"] == "0",
        bool({"ETREAT", "BTG"} & set(purposes)),
        purposes,
    )


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    ctx: Context
    events: list[Ev]
    labels: dict[str, tuple[str, str]]

    @property
    def benign(self) -> list[Ev]:
        return [e for e in self.events if e.event_id not in self.labels]

    def labelled(self, scenario: str) -> list[Ev]:
        return [e for e in self.events if self.labels.get(e.event_id, ("",))[0] == scenario]


def _load(path: Path, summary: dict[str, Any]) -> Run:
    ctx = Context.load(path)
    with (path / "events.ndjson").open("rb") as fh:
        events = [decode(line) for line in fh]
    with (path / "labels.csv").open(newline="") as fh:
        labels = {r["event_id"]: (r["scenario"], r["user_id"]) for r in csv.DictReader(fh)}
    return Run(path, summary, ctx, events, labels)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    path = tmp_path_factory.mktemp("sim")
    return _load(path, simulate(path, days=DAYS, seed=SEED, scale=SCALE))


def _minute(run: Run, t: float) -> int:
    return run.ctx.clock.minute_of_day(t)


def _unrelated(run: Run, uid: str, pid: str) -> bool:
    """No encounter ever in the user's department and never their attending patient."""
    s = run.ctx.staff[uid]
    return all(
        e.department_id != s.department_id and e.attending_user_id != uid
        for e in run.ctx.encounters_of(pid)
    )


# ------------------------------------------------------------------ determinism and files
def test_same_arguments_give_byte_identical_files(run: Run, tmp_path: Path) -> None:
    again = tmp_path / "again"
    simulate(again, days=DAYS, seed=SEED, scale=SCALE)
    for name in FILES:
        assert (run.path / name).read_bytes() == (again / name).read_bytes(), name


def test_identical_in_a_fresh_process_with_other_hash_seed(run: Run, tmp_path: Path) -> None:
    """Set iteration order changes with PYTHONHASHSEED: output must not depend on it."""
    out = tmp_path / "proc"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.simulate",
        "--out",
        str(out),
        "--days",
        str(DAYS),
        "--seed",
        str(SEED),
        "--scale",
        str(SCALE),
    ]
    subprocess.run(
        cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL
    )
    for name in FILES:
        assert (run.path / name).read_bytes() == (out / name).read_bytes(), name


def test_another_seed_gives_another_hospital(run: Run, tmp_path: Path) -> None:
    other = tmp_path / "other"
    simulate(other, days=DAYS, seed=SEED + 1, scale=SCALE)
    for name in ("staff.csv", "patients.csv", "events.ndjson", "labels.csv"):
        assert (run.path / name).read_bytes() != (other / name).read_bytes(), name


def test_context_files_have_exactly_the_contract_columns(run: Run) -> None:
    for kind, cols in CONTEXT_FILES.items():
        with (run.path / f"{kind}.csv").open(newline="") as fh:
            assert tuple(next(csv.reader(fh))) == cols, kind
    stats = run.ctx.stats()
    assert stats["departments"] == 17
    assert stats["staff"] == run.summary["staff"] and stats["patients"] == run.summary["patients"]
    assert stats["encounters"] == run.summary["encounters"] and stats["sealed"] >= 3
    assert run.ctx.departments["ED"].name == "Emergency Department"
    assert run.ctx.departments["ED"].is_emergency


def test_summary_and_manifest_match_the_files(run: Run) -> None:
    s = run.summary
    assert s["events"] == len(run.events)
    assert s["misuse_events"] == len(run.labels)
    assert s["benign_events"] == len(run.events) - len(run.labels)
    assert Counter(scn for scn, _ in run.labels.values()) == Counter(
        {k: v for k, v in s["misuse_events_by_scenario"].items() if v}
    )
    manifest = orjson.loads((run.path / "manifest.json").read_bytes())
    assert manifest["parameters"] == {
        "days": DAYS,
        "seed": SEED,
        "scale": SCALE,
        "start": "2026-03-02",
        "timezone": "Asia/Shanghai",
        "covering": 0.0,
    }
    assert manifest["summary"] == orjson.loads(orjson.dumps(s))
    assert tuple(manifest["scenarios"]) == SCENARIOS


def test_events_unique_sorted_and_local_time(run: Run) -> None:
    ids = [e.event_id for e in run.events]
    assert len(ids) == len(set(ids))
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    ts = [e.t for e in run.events]
    assert ts == sorted(ts)
    assert all(e.ts.endswith("+08:00") for e in run.events)
    start = parse_ts("2026-03-02T00:00:00+08:00")
    assert start <= ts[0] and ts[-1] < start + DAYS * 86400


def test_every_user_and_patient_exists(run: Run) -> None:
    # no intentional exception: even misuse comes from accounts in staff.csv
    assert {e.user_id for e in run.events} <= set(run.ctx.staff)
    assert {e.patient_id for e in run.events} <= set(run.ctx.patients)


def test_volume_is_a_hospital_day(run: Run) -> None:
    # ~30,000 a day for ~400 accounts at scale 1; small runs keep minimum staffing, so
    # compare per account
    per_account_day = len(run.events) / DAYS / len(run.ctx.staff)
    assert 50 <= per_account_day <= 110


# ------------------------------------------------------------------ labels
def test_every_scenario_present_with_promised_users(run: Run) -> None:
    assert len(SCENARIOS) == 17 and len(set(SCENARIOS)) == 17
    assert {sc.name for sc in SCENARIO_TABLE} == set(SCENARIOS)
    users: dict[str, set[str]] = defaultdict(set)
    for scn, uid in run.labels.values():
        users[scn].add(uid)
    assert set(users) == set(SCENARIOS)
    for scn in SCENARIOS:
        assert len(users[scn]) >= 5, scn


def test_labels_point_at_real_events_of_that_user(run: Run) -> None:
    by_id = {e.event_id: e for e in run.events}
    for eid, (_, uid) in run.labels.items():
        assert eid in by_id
        assert by_id[eid].user_id == uid
    with (run.path / "labels.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["event_id", "scenario", "user_id"]
    assert len(rows) - 1 == len(run.labels)  # one row per event, none twice


def test_account_validity_really_outside_window(run: Run) -> None:
    evs = run.labelled("account_validity")
    assert evs
    for e in evs:
        s = run.ctx.staff[e.user_id]
        assert s.role in ("trainee", "physician", "nurse", "technician", "clerk")
        assert not run.ctx.account_valid(s, e.t)


def test_off_hours_bulk_really_outside_shift_and_bulk(run: Run) -> None:
    evs = run.labelled("off_hours_bulk")
    by_user: dict[str, list[Ev]] = defaultdict(list)
    for e in evs:
        s = run.ctx.staff[e.user_id]
        assert not in_shift(_minute(run, e.t), s.shift_start, s.shift_end)
        assert e.action == "view" and _unrelated(run, e.user_id, e.patient_id)
        by_user[e.user_id].append(e)
    for lst in by_user.values():  # each episode: ≥20 distinct charts within 90 minutes
        lst.sort(key=lambda e: e.t)
        best = max(len({x.patient_id for x in lst if e.t <= x.t <= e.t + 5400}) for e in lst)
        assert best >= 20


def test_sealed_record_after_seal_by_unauthorised(run: Run) -> None:
    evs = run.labelled("sealed_record")
    assert evs
    for e in evs:
        assert run.ctx.seal_applies(e.patient_id, e.user_id, e.t) is not None


def test_relatives_share_surname_and_address(run: Run) -> None:
    evs = run.labelled("family_snooping")
    assert evs
    for e in evs:
        s, p = run.ctx.staff[e.user_id], run.ctx.patients[e.patient_id]
        assert p.family_name == s.family_name and p.address == s.address
        assert p.employee_user_id != e.user_id
        assert _unrelated(run, e.user_id, e.patient_id)
    # the confounder exists: patients with a staff member's surname who are no relatives
    staff_keys = {s.family_key for s in run.ctx.staff.values()}
    staff_names = Counter(s.family_name for s in run.ctx.staff.values())
    strangers = [
        p
        for p in run.ctx.patients.values()
        if p.family_name in staff_names and p.family_key not in staff_keys
    ]
    assert len(strangers) > len(run.ctx.patients) / 4
    # and housemates with another surname (same address, not a relative by the rule)
    addresses = {s.address: s for s in run.ctx.staff.values()}
    assert any(
        p.address in addresses and p.family_name != addresses[p.address].family_name
        for p in run.ctx.patients.values()
    )


def test_misuse_targets_are_what_the_scenario_says(run: Run) -> None:
    ctx = run.ctx
    for e in run.labelled("self_access"):
        assert ctx.patients[e.patient_id].employee_user_id == e.user_id
    for e in run.labelled("coworker_snooping"):
        p = ctx.patients[e.patient_id]
        assert p.employee_user_id and p.employee_user_id != e.user_id
        assert _unrelated(run, e.user_id, e.patient_id)
    for e in run.labelled("vip_snooping"):
        assert ctx.patients[e.patient_id].vip and _unrelated(run, e.user_id, e.patient_id)
    for e in run.labelled("sensitivity_above_clearance"):
        assert ctx.patients[e.patient_id].sensitivity == 4 and ctx.staff[e.user_id].clearance <= 2
    for e in run.labelled("break_the_glass_abuse"):
        assert e.emergency and ctx.staff[e.user_id].department_id != "ED"
        assert _unrelated(run, e.user_id, e.patient_id)
    for e in run.labelled("role_resource_mismatch"):
        assert ctx.staff[e.user_id].role == "clerk" and e.resource_type in CLINICAL_NOTES
    for e in run.labelled("denied_probing"):
        assert not e.success
    for e in run.labelled("no_care_relationship"):
        assert _unrelated(run, e.user_id, e.patient_id)
    for e in run.labelled("grant_out_of_scope"):
        s = ctx.staff[e.user_id]
        assert s.role in ("vendor", "researcher")
        depts = [x.department_id for x in ctx.encounters_of(e.patient_id)]
        assert not any(g.covers(e.t, e.action, depts) for g in ctx.grants[e.user_id])
        assert ctx.account_valid(s, e.t)


def test_bulk_export_is_bulk(run: Run) -> None:
    by_user: dict[str, list[float]] = defaultdict(list)
    for e in run.labelled("bulk_export"):
        assert e.action in EXFIL_ACTIONS
        by_user[e.user_id].append(e.t)
    assert len(by_user) >= 5
    for ts in by_user.values():
        ts.sort()
        assert max(sum(1 for x in ts if t <= x < t + 3600) for t in ts) >= 20


def test_credential_sharing_two_places_at_once(run: Run) -> None:
    evs = run.labelled("credential_sharing")
    own: dict[str, list[Ev]] = defaultdict(list)
    for e in run.benign:
        own[e.user_id].append(e)
    for e in evs:
        others = [x for x in own[e.user_id] if abs(x.t - e.t) <= 20 * 60]
        assert others, "the owner is not working at the same time"
        assert all(x.workstation != e.workstation for x in others)
        owner_dept = run.ctx.staff[e.user_id].department_id
        assert f"-{owner_dept}-" not in e.workstation


def test_volume_anomaly_is_three_times_usual(run: Run) -> None:
    day = lambda t: run.ctx.clock.local_day(t)  # noqa: E731
    benign: dict[tuple[str, int], set[str]] = defaultdict(set)
    for e in run.benign:
        benign[(e.user_id, day(e.t))].add(e.patient_id)
    extra: dict[tuple[str, int], set[str]] = defaultdict(set)
    for e in run.labelled("volume_anomaly"):
        extra[(e.user_id, day(e.t))].add(e.patient_id)
        assert _unrelated(run, e.user_id, e.patient_id)
    assert extra
    for (uid, d), pids in extra.items():
        usual = statistics.median(len(v) for (u, _), v in benign.items() if u == uid)
        assert len(pids | benign[(uid, d)]) >= 2.8 * usual


# ------------------------------------------------------------------ benign traffic
def test_benign_shift_work_mostly_within_shifts(run: Run) -> None:
    inside: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for e in run.benign:
        s = run.ctx.staff[e.user_id]
        total[s.role] += 1
        inside[s.role] += in_shift(_minute(run, e.t), s.shift_start, s.shift_end)
    for role in ("nurse", "physician", "clerk", "technician", "pharmacist"):
        assert inside[role] / total[role] >= 0.9, role
    # but not all: on-call look-ups and overtime exist
    assert inside["physician"] < total["physician"]


def test_benign_traffic_keeps_hospital_policy(run: Run) -> None:
    ctx = run.ctx
    for e in run.benign:
        s, p = ctx.staff[e.user_id], ctx.patients[e.patient_id]
        assert p.employee_user_id != e.user_id
        assert not (s.family_key and s.family_key == p.family_key)
        assert p.sensitivity <= s.clearance
        assert ctx.seal_applies(e.patient_id, e.user_id, e.t) is None
        assert ctx.account_valid(s, e.t)
        assert not e.emergency or s.department_id == "ED"
        assert not (s.role == "clerk" and e.resource_type in CLINICAL_NOTES)
        if s.role in ("vendor", "researcher", "auditor"):
            depts = [x.department_id for x in ctx.encounters_of(e.patient_id)]
            assert any(g.covers(e.t, e.action, depts) for g in ctx.grants[e.user_id])


def test_benign_sessions_never_in_two_places(run: Run) -> None:
    last: dict[str, Ev] = {}
    for e in run.benign:
        prev = last.get(e.user_id)
        if prev is not None and prev.workstation != e.workstation:
            assert e.t - prev.t >= 60, (prev, e)
        last[e.user_id] = e


def test_benign_confounders_exist(run: Run) -> None:
    ctx = run.ctx
    benign = run.benign
    # ED break-the-glass, some before the encounter is registered
    ed = [e for e in benign if e.emergency]
    assert ed and all(ctx.staff[e.user_id].department_id == "ED" for e in ed)
    assert any(not any(x.start <= e.t < x.end for x in ctx.encounters_of(e.patient_id)) for e in ed)
    # consults: a physician writes a note for a patient of another department
    assert any(
        e.action == "create"
        and e.resource_type == "DocumentReference"
        and ctx.staff[e.user_id].role == "physician"
        and not any(
            x.department_id == ctx.staff[e.user_id].department_id and x.start <= e.t < x.end
            for x in ctx.encounters_of(e.patient_id)
        )
        for e in benign
    )
    # single failures and the odd print, never bursts
    fails = [e for e in benign if not e.success]
    assert fails and len(fails) < 0.01 * len(benign)
    assert any(e.action == "print" for e in benign)
    # residual look-ups with no recorded relation (not even a note written): present but
    # rare (~1%)
    wrote = {(e.user_id, e.patient_id) for e in benign if e.action in ("create", "update")}
    unrelated = sum(
        1
        for e in benign
        if ctx.departments[ctx.staff[e.user_id].department_id].kind == "clinical"
        and ctx.staff[e.user_id].role in ("nurse", "physician")
        and (e.user_id, e.patient_id) not in wrote
        and _unrelated(run, e.user_id, e.patient_id)
    )
    clinical = sum(
        1
        for e in benign
        if ctx.staff[e.user_id].role in ("nurse", "physician")
        and ctx.departments[ctx.staff[e.user_id].department_id].kind == "clinical"
    )
    assert 0.003 < unrelated / clinical < 0.03
    # care teams read sealed charts, wards read their VIPs
    assert any(e.patient_id in ctx.seals for e in benign)
    assert any(ctx.patients[e.patient_id].vip for e in benign)
    # staff who are patients are seen by their own care team
    assert any(ctx.patients[e.patient_id].employee_user_id for e in benign)


def test_hospital_reference_data_is_plausible(run: Run) -> None:
    ctx = run.ctx
    staff = ctx.staff
    assert all(s.supervisor_id in staff for s in staff.values())
    assert all(d.head_user_id in staff for d in ctx.departments.values())
    roles = Counter(s.role for s in staff.values())
    assert roles["auditor"] >= 2 and roles["vendor"] >= 3 and roles["researcher"] >= 2
    assert roles["trainee"] >= 5 and roles["nurse"] > roles["physician"]
    grants = ctx.grants
    auditors = [s.user_id for s in staff.values() if s.role == "auditor"]
    assert all(
        any(g.departments is None and g.actions == {"view", "query"} for g in grants[a])
        for a in auditors
    )
    vendors = [s.user_id for s in staff.values() if s.role == "vendor"]
    assert all(g.departments and len(g.departments) <= 2 for v in vendors for g in grants[v])
    encs = list(ctx.encounters.values())
    assert any(e.end == float("inf") for e in encs)  # ongoing stays
    transfers = sum(
        1
        for lst in ctx.encounters_by_patient.values()
        for a, b in zip(lst, lst[1:], strict=False)
        if a.end == b.start and a.department_id != b.department_id
    )
    assert transfers > 20
    for s in ctx.seals.values():
        assert ctx.departments["HIM"].head_user_id in s.authorized and len(s.authorized) >= 3
    psych = [
        p
        for p in ctx.patients.values()
        if any(e.department_id == "PSY" for e in ctx.encounters_of(p.patient_id))
    ]
    assert psych and all(p.sensitivity == 4 for p in psych)
    vip = sum(p.vip for p in ctx.patients.values())
    assert 3 <= vip <= 0.02 * len(ctx.patients)
    assert sum(bool(p.employee_user_id) for p in ctx.patients.values()) >= 8
    assert all(p.employee_user_id in staff for p in ctx.patients.values() if p.employee_user_id)


def test_connector_reads_what_simulator_writes(run: Run) -> None:
    fhir = pytest.importorskip("connectors.fhir")
    with (run.path / "events.ndjson").open("rb") as fh:
        lines = fh.readlines()
    for line, mine in zip(lines[::37], run.events[::37], strict=True):
        e = fhir.parse_fhir_line(line)
        assert (
            e.event_id,
            e.user_id,
            e.patient_id,
            e.action,
            e.resource_type,
            e.workstation,
            e.outcome == "success",
            e.emergency,
        ) == (
            mine.event_id,
            mine.user_id,
            mine.patient_id,
            mine.action,
            mine.resource_type,
            mine.workstation,
            mine.success,
            mine.emergency,
        )


def test_covering_accesses_hook(tmp_path: Path) -> None:
    s = simulate(tmp_path, days=1, seed=SEED, scale=0.3, covering=0.5)
    assert s["covering_events"] > 0
    assert s["events"] == s["benign_events"] + s["misuse_events"]
    assert all(n >= 5 for n in s["misuse_user_counts"].values())
