"""``emrwatch access-report``: who opened a patient's chart, when, and why.

The question a privacy office answers most often does not start from an alert: a patient
asks who has looked at their record, a complaint names a colleague or a relative, or an
investigation needs everything one user opened last month. The report replays the log
through the same engine as ``emrwatch replay`` (same parsers, same clock checks, same
rules and models) and lists every access of the patient (or by the user) in the period
with what explained it at the time, in words and with the evidence behind it (the
encounter and its department, the user's own note or order, the grant), or, for an access
nothing explained, what was checked and not found. Each access also carries what makes
it sensitive (a colleague's or a relative's record, a VIP, a sealed record, outside the
user's shift, data exported) and the alerts that hold it.

Explanations depend on the user's own earlier accesses (a note or order explains reads
for ``documented_window_s`` after it) and alerts on the user's own history, and on nothing
of other users' (the engine keeps its state per user: replay's partitions rely on it), so
only the users who accessed the patient are replayed, from the start of the log: give it
history from at least 14 days before the period.

``--patient-copy`` writes the version a patient may be given: when, who (name, role,
department) and what (the action and the part of the record), successful accesses only,
without the internal explanations, workstations or alerts.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import sys
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

from connectors.readers import ParseStats, read_events
from detectors.alerts import Alert, retraction_why
from detectors.config import DetectionConfig
from detectors.engine import Engine, UserState
from detectors.explain import REASONS
from detectors.lateness import Misstamped
from emrwatch.context import Context, Encounter, Grant, Staff
from emrwatch.events import WRITE_ACTIONS, AccessEvent, EventError
from emrwatch.timeutil import LocalClock
from pipeline.alerting.render import spreadsheet_safe
from pipeline.file_clock import file_clock
from pipeline.replay import DRAIN_EVERY, paused_gc

#: an access's action, as the report says it
ACTION_WORDS = {
    "view": "viewed",
    "query": "searched",
    "create": "created",
    "update": "updated",
    "delete": "deleted",
    "execute": "ran",
    "print": "printed",
    "export": "exported",
    "copy": "copied",
    "forward": "forwarded",
}
#: an action in a patient's words (the patient's copy)
PATIENT_ACTION_WORDS = {
    **ACTION_WORDS,
    "query": "looked up",
    "create": "added to",
    "delete": "deleted from",
    "execute": "used",
    "forward": "sent on",
}
#: columns of ``--output csv`` (and keys of each access in JSON)
CSV_COLUMNS = (
    "time",
    "event_id",
    "user_id",
    "user_name",
    "role",
    "department",
    "patient_id",
    "patient_name",
    "action",
    "resource_type",
    "workstation",
    "outcome",
    "explained",
    "reasons",
    "because",
    "not_explained_because",
    "documented_after",
    "flags",
    "alerts",
)
PATIENT_COPY_COLUMNS = ("from", "to", "name", "role", "department", "what they did")
#: a FHIR resource type in a patient's words (the patient's copy); others as they are
RECORD_PARTS = {
    "Patient": "your details and chart summary",
    "Encounter": "your visits and stays",
    "Observation": "test results and measurements",
    "DocumentReference": "clinical notes and documents",
    "MedicationRequest": "prescriptions",
    "MedicationAdministration": "medicines given",
    "MedicationDispense": "medicines dispensed",
    "MedicationStatement": "medicines",
    "DiagnosticReport": "test and imaging reports",
    "Condition": "diagnoses",
    "CarePlan": "care plan",
    "ImagingStudy": "imaging",
    "ServiceRequest": "orders and referrals",
    "AllergyIntolerance": "allergies",
    "Procedure": "procedures",
    "Specimen": "samples taken",
    "Immunization": "vaccinations",
    "Consent": "consents",
    "Account": "billing",
    "Claim": "billing",
    "Coverage": "insurance",
    "ChargeItem": "billing",
    "Provenance": "record history",
    "Device": "devices",
}


class ReportError(ValueError):
    """A request the report cannot answer (bad period, unreadable input)."""


@dataclass
class Access:
    """One access in the report, with what explained it or what was checked and not found."""

    event_id: str
    t: float
    time: str  # local ISO time (judged time when a wrong clock was corrected)
    user_id: str
    patient_id: str
    action: str
    resource_type: str
    workstation: str
    outcome: str
    emergency: bool
    purpose: str
    source: str
    #: reason codes that held at the time (``detectors.explain.REASONS``); empty: unexplained
    reasons: list[str]
    #: each reason in words, with its evidence (encounter, note, grant)
    because: list[str]
    #: for an unexplained access: what was checked, and what the context said instead
    not_because: list[str]
    #: the user's own note or order on the patient soon after (``documented_grace_s``): the
    #: detectors take the access's findings back for it
    documented_after: str = ""
    #: what makes the access sensitive whatever explained it
    flags: list[str] = field(default_factory=list)
    #: ids of the alerts whose evidence holds this access
    alerts: list[str] = field(default_factory=list)
    #: the time the source stamped, when a clock found wrong was corrected (README: Input)
    stamped: str = ""
    #: that time in seconds (None: as stamped)
    stamped_t: float | None = None

    @property
    def explained(self) -> bool:
        return bool(self.reasons)


@dataclass(kw_only=True)
class _Tally:
    """How many accesses, how many explained, first and last (in time order)."""

    accesses: int = 0
    explained: int = 0
    first: str = ""
    last: str = ""
    alerts: list[str] = field(default_factory=list)

    def count(self, r: Access) -> None:
        if not self.accesses:
            self.first = r.time
        self.accesses += 1
        self.explained += r.explained
        self.last = r.time

    def least_explained_first(self) -> tuple[float, int]:
        return (self.explained / self.accesses, -self.accesses)

    def text_line(self, who: str, notes: Iterable[str] = ()) -> str:
        """The text report's line for ``who``: the counts, the period, ``notes`` and the
        alerts."""
        return (
            f"  {who}: {self.accesses} access(es), {self.explained} explained, "
            f"{_local(self.first)} to {_local(self.last)}"
            + "".join(f"; {n}" for n in notes)
            + (f"; alerts {', '.join(self.alerts)}" if self.alerts else "")
        )


@dataclass
class UserSummary(_Tally):
    user_id: str
    name: str
    role: str
    department: str


@dataclass
class PatientSummary(_Tally):
    """One patient's accesses in the report: for a user's report, where they went."""

    patient_id: str
    name: str
    flags: list[str] = field(default_factory=list)  # every flag of any access, once


@dataclass
class AccessReport:
    """The report; ``to_text``, ``to_csv``, ``to_json`` and ``to_html`` write it."""

    patients: list[str]
    users: list[str]
    period: tuple[str, str]  # local ISO start, end (end exclusive); "" when open
    timezone: str
    generated_at: str
    subjects: list[dict[str, Any]]  # the patients' (or users') context, for the header
    accesses: list[Access]
    summary: list[UserSummary]
    alerts: list[dict[str, Any]]
    events_read: int = 0
    bad_lines: int = 0
    log_first: str = ""
    log_last: str = ""
    notes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # user/patient id → display name
    #: per patient, least explained first (a user's report lists it before the accesses)
    patient_summary: list[PatientSummary] = field(default_factory=list)
    break_the_glass: bool = False  # only emergency accesses

    @property
    def title(self) -> str:
        if self.break_the_glass:
            who = "break-the-glass accesses"
            if self.patients:
                who += f" of patient {', '.join(self.patients)}"
            if self.users:
                who += f" by user {', '.join(self.users)}"
            return f"Access report: {who}"
        who = (
            f"patient {', '.join(self.patients)}"
            if self.patients
            else f"user {', '.join(self.users)}"
        )
        if self.patients and self.users:
            who += f" by user {', '.join(self.users)}"
        return f"Access report: {who}"

    def _period_words(self) -> str:
        a, b = self.period
        a, b = _local(a), _local(b)
        if a and b:
            return f"{a} to {b} (end exclusive)"
        if a:
            return f"from {a}"
        if b:
            return f"until {b} (exclusive)"
        return "the whole log"

    # ------------------------------------------------------------------ JSON, CSV
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["title"] = self.title
        for a, row in zip(self.accesses, d["accesses"], strict=True):
            row["explained"] = a.explained
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def csv_rows(self) -> Iterator[dict[str, str]]:
        names = self.names
        staff = {u.user_id: u for u in self.summary}
        for a in self.accesses:
            u = staff.get(a.user_id)
            yield {
                "time": a.time,
                "event_id": a.event_id,
                "user_id": a.user_id,
                "user_name": names.get(a.user_id, ""),
                "role": u.role if u else "",
                "department": u.department if u else "",
                "patient_id": a.patient_id,
                "patient_name": names.get(a.patient_id, ""),
                "action": a.action,
                "resource_type": a.resource_type,
                "workstation": a.workstation,
                "outcome": a.outcome,
                "explained": "yes" if a.explained else "no",
                "reasons": " ".join(a.reasons),
                "because": "; ".join(a.because),
                "not_explained_because": "; ".join(a.not_because),
                "documented_after": a.documented_after,
                "flags": "; ".join(a.flags),
                "alerts": " ".join(a.alerts),
            }

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: spreadsheet_safe(v) for k, v in r.items()} for r in self.csv_rows())
        return buf.getvalue()

    # ------------------------------------------------------------------ text
    def to_text(self) -> str:
        out = [self.title, "=" * len(self.title), ""]
        out.append(f"Period: {self._period_words()}, {self.timezone}.")
        out.append(
            f"Log read: {self.events_read:,} events ({self.bad_lines:,} bad lines skipped), "
            f"{self.log_first or '-'} to {self.log_last or '-'}. Generated {self.generated_at}."
        )
        for s in self.subjects:
            out.append("")
            out.append(s["heading"])
            out.extend(f"  {line}" for line in s["lines"])
        n = len(self.accesses)
        unexplained = sum(1 for a in self.accesses if not a.explained)
        out += [
            "",
            f"{n} access(es) by {len(self.summary)} user(s); {n - unexplained} explained, "
            f"{unexplained} not explained; {len(self.alerts)} alert(s).",
        ]
        if self.summary:
            out += ["", "Users"]
            out += [
                u.text_line(f"{u.user_id} {u.name} ({u.role}, {u.department})")
                for u in self.summary
            ]
        if self.users and not self.patients and self.patient_summary:
            out += ["", "Patients, least explained first"]
            out += [
                ps.text_line(f"{ps.patient_id} {ps.name}", ps.flags) for ps in self.patient_summary
            ]
        if self.accesses:
            out += [
                "",
                "Accesses (a user's run of accesses to one patient that the same reasons explain)",
            ]
        for g in _runs(self.accesses):
            a, z = g[0], g[-1]
            who = (
                ""
                if len(self.users) == 1 and not self.patients
                else f" {a.user_id} {self.names.get(a.user_id, '')}".rstrip()
            )
            whom = f"{a.patient_id} {self.names.get(a.patient_id, '')}".strip()
            when = _local(a.time) + (
                ""
                if a is z
                else "–" + (z.time[11:19] if z.time[:10] == a.time[:10] else _local(z.time))
            )
            did = _did(g)
            places = sorted({x.workstation for x in g if x.workstation})
            out.append(
                f"  {when}{who}: {did}"
                + (f" of {whom}" if not self.patients or len(self.patients) > 1 else "")
                + (f" at {', '.join(places)}" if places else "")
            )
            if a.explained:
                said: dict[str, str] = {}  # each reason as the run's first access with it says it
                for x in g:
                    for code, b in zip(x.reasons, x.because, strict=True):
                        said.setdefault(code, b)
                out.extend(f"      explained: {b}" for b in said.values())
            else:
                out.append("      NOT EXPLAINED: " + "; ".join(a.not_because))
            for x in g:
                if x.documented_after:
                    out.append(f"      {x.documented_after}")
                    break
            if a.flags:
                out.append(f"      note: {'; '.join(a.flags)}")
            moved = [x.t - x.stamped_t for x in g if x.stamped_t is not None]
            if moved:
                lo_h, hi_h = min(moved) / 3600, max(moved) / 3600
                by = (
                    f"{abs(lo_h):.1f} h"
                    if round(lo_h, 1) == round(hi_h, 1)
                    else (f"{abs(lo_h):.1f}–{abs(hi_h):.1f} h")
                )
                out.append(
                    f"      {len(moved)} of these stamped {by} "
                    f"{'earlier' if lo_h > 0 else 'later'} by a source whose clock runs "
                    f"{'behind' if lo_h > 0 else 'ahead'}: listed at the corrected time"
                )
            if a.alerts:
                out.append(f"      in alert(s): {', '.join(a.alerts)}")
        if self.alerts:
            out += ["", "Alerts"]
            for al in self.alerts:
                out.append(
                    f"  {al['alert_id']} {al['severity']} {al['status']} user {al['user_id']} "
                    f"{al['first_seen']} to {al['last_seen']}: {al['reason']}"
                )
        if self.notes:
            out += ["", "Notes"]
            out.extend(f"  - {x}" for x in self.notes)
        return "\n".join(out) + "\n"

    # ------------------------------------------------------------------ HTML
    def to_html(self) -> str:
        e = html.escape
        rows = []
        for a in self.accesses:
            if a.explained:
                why = "<br>".join(e(b) for b in a.because)
                cls = ""
            else:
                why = "<b>Not explained:</b> " + e("; ".join(a.not_because))
                cls = " class='unexplained'"
            extra = [x for x in (a.documented_after, "; ".join(a.flags), a.stamped) if x]
            if extra:
                why += "<br><i>" + "<br>".join(e(x) for x in extra) + "</i>"
            rows.append(
                f"<tr{cls}><td>{e(a.time)}</td><td>{e(a.user_id)}<br>{e(self.names.get(a.user_id, ''))}"
                f"</td><td>{e(a.patient_id)}<br>{e(self.names.get(a.patient_id, ''))}</td>"
                f"<td>{e(ACTION_WORDS.get(a.action, a.action))} {e(a.resource_type)}"
                f"{' (denied)' if a.outcome == 'failure' else ''}</td><td>{e(a.workstation)}</td>"
                f"<td>{why}</td><td>{'<br>'.join(e(x) for x in a.alerts)}</td></tr>"
            )
        subjects = "".join(
            f"<h2>{e(s['heading'])}</h2><ul>{''.join(f'<li>{e(x)}</li>' for x in s['lines'])}</ul>"
            for s in self.subjects
        )
        users = "".join(
            f"<tr><td>{e(u.user_id)}</td><td>{e(u.name)}</td><td>{e(u.role)}</td>"
            f"<td>{e(u.department)}</td><td class='num'>{u.accesses}</td>"
            f"<td class='num'>{u.explained}</td><td>{e(u.first)}</td><td>{e(u.last)}</td>"
            f"<td>{'<br>'.join(e(x) for x in u.alerts)}</td></tr>"
            for u in self.summary
        )
        alerts = "".join(
            f"<tr><td>{e(al['alert_id'])}</td><td>{e(al['severity'])}</td><td>{e(al['status'])}</td>"
            f"<td>{e(al['user_id'])}</td><td>{e(al['first_seen'])}</td><td>{e(al['reason'])}</td></tr>"
            for al in self.alerts
        )
        notes = "".join(f"<li>{e(x)}</li>" for x in self.notes)
        patients = (
            "<h2>Patients, least explained first</h2><table><tr><th>patient</th><th>name</th>"
            "<th>accesses</th><th>explained</th><th>first</th><th>last</th><th>notes</th>"
            "<th>alerts</th></tr>"
            + "".join(
                f"<tr><td>{e(p.patient_id)}</td><td>{e(p.name)}</td><td class='num'>{p.accesses}"
                f"</td><td class='num'>{p.explained}</td><td>{e(_local(p.first))}</td>"
                f"<td>{e(_local(p.last))}</td><td>{e('; '.join(p.flags))}</td>"
                f"<td>{'<br>'.join(e(x) for x in p.alerts)}</td></tr>"
                for p in self.patient_summary
            )
            + "</table>"
            if self.users and not self.patients and self.patient_summary
            else ""
        )
        n = len(self.accesses)
        unexplained = sum(1 for a in self.accesses if not a.explained)
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{e(self.title)}</h1><p>Period: {e(self._period_words())}, {e(self.timezone)}. "
            f"Log read: {self.events_read:,} events ({self.bad_lines:,} bad lines skipped), "
            f"{e(self.log_first or '-')} to {e(self.log_last or '-')}. "
            f"Generated {e(self.generated_at)}.</p>{subjects}"
            f"<p class='summary'>{n} access(es) by {len(self.summary)} user(s); "
            f"{n - unexplained} explained, {unexplained} not explained; "
            f"{len(self.alerts)} alert(s).</p>"
            "<h2>Users</h2><table><tr><th>user</th><th>name</th><th>role</th><th>department</th>"
            "<th>accesses</th><th>explained</th><th>first</th><th>last</th><th>alerts</th></tr>"
            f"{users}</table>{patients}"
            "<h2>Accesses</h2><table><tr><th>time</th><th>user</th><th>patient</th>"
            "<th>action</th><th>workstation</th><th>why</th><th>alerts</th></tr>"
            f"{''.join(rows)}</table>"
            + (
                "<h2>Alerts</h2><table><tr><th>alert</th><th>severity</th><th>status</th>"
                f"<th>user</th><th>first seen</th><th>reason</th></tr>{alerts}</table>"
                if alerts
                else ""
            )
            + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
            + "</body></html>\n"
        )

    # ------------------------------------------------------------------ the patient's copy
    def patient_copy_rows(self) -> list[dict[str, str]]:
        """One row per visit to the record (a user's run of accesses, :func:`_runs`): when,
        who and what, in a patient's words; attempts the system refused are left out."""
        staff = {u.user_id: u for u in self.summary}
        done = [a for a in self.accesses if a.outcome == "success"]
        out = []
        for g in _runs(done, by_reason=False):
            a, z = g[0], g[-1]
            u = staff.get(a.user_id)
            what: dict[str, list[str]] = {}
            for x in g:
                part = RECORD_PARTS.get(x.resource_type, x.resource_type)
                parts = what.setdefault(PATIENT_ACTION_WORDS.get(x.action, x.action), [])
                if part not in parts:
                    parts.append(part)
            out.append(
                {
                    "from": _local(a.time)[:16],
                    "to": _local(z.time)[:16],
                    "name": self.names.get(a.user_id, "") or "unknown account",
                    "role": u.role if u else "",
                    "department": u.department if u else "",
                    "what they did": "; ".join(f"{k} {', '.join(v)}" for k, v in what.items()),
                }
            )
        return out

    def patient_copy(self, fmt: str) -> str:
        """The report as a patient may be given it (``fmt``: text, csv, json or html)."""
        rows = self.patient_copy_rows()
        names = ", ".join(self.names.get(p, p) for p in self.patients)
        title = f"Record of access to the medical record of {names}"
        if fmt == "json":
            return json.dumps(
                {
                    "title": title,
                    "period": self._period_words(),
                    "timezone": self.timezone,
                    "accesses": rows,
                },
                indent=2,
                ensure_ascii=False,
            )
        if fmt == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=PATIENT_COPY_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            return buf.getvalue()
        a, b = (_local(x)[:16] for x in self.period)
        period = (
            f"from {a} to {b}"
            if a and b
            else (f"from {a}" if a else (f"until {b}" if b else "over the whole record kept"))
        )
        lead = (
            f"Everyone who opened the record {period} (times in {self.timezone}): when, who, "
            f"and what they did. Accesses close together by one person are one line. "
            f"{len(rows)} line(s)."
        )
        if fmt == "html":
            e = html.escape
            body = "".join(
                "<tr>" + "".join(f"<td>{e(r[c])}</td>" for c in PATIENT_COPY_COLUMNS) + "</tr>"
                for r in rows
            )
            head = "".join(f"<th>{e(c)}</th>" for c in PATIENT_COPY_COLUMNS)
            return (
                f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1><p>{e(lead)}</p>"
                f"<table><tr>{head}</tr>{body}</table></body></html>\n"
            )
        out = [title, "", lead, ""]
        out += [
            f"{r['from']}{'–' + r['to'][11:] if r['to'] != r['from'] else ''}  {r['name']} "
            f"({r['role']}, {r['department']}): {r['what they did']}"
            for r in rows
        ]
        return "\n".join(out) + "\n"

    def render(self, fmt: str, patient_copy: bool = False) -> str:
        if patient_copy:
            return self.patient_copy(fmt)
        if fmt == "json":
            return self.to_json() + "\n"
        if fmt == "csv":
            return self.to_csv()
        if fmt == "html":
            return self.to_html()
        return self.to_text()


#: accesses of one user to one patient at most this far apart are one run in the text
RUN_GAP_S = 30 * 60


def _runs(accesses: list[Access], by_reason: bool = True) -> list[list[Access]]:
    """Runs of one user's accesses to one patient, each access within :data:`RUN_GAP_S` of
    the one before; ``by_reason``: also all explained (or all not, for the same reasons),
    with the same notes and alerts, so that the text report says them once per run. In
    order of each run's first access."""
    runs: list[list[Access]] = []
    open_: dict[tuple[str, str], list[Access]] = {}
    for a in accesses:
        key = (a.user_id, a.patient_id)
        g = open_.get(key)
        if g is not None and a.t - g[-1].t <= RUN_GAP_S:
            b = g[0]
            if not by_reason or (
                a.explained == b.explained
                and a.not_because == b.not_because
                and a.flags == b.flags
                and a.alerts == b.alerts
            ):
                g.append(a)
                continue
        g = open_[key] = [a]
        runs.append(g)
    return runs


def _local(iso: str) -> str:
    """``2026-03-04T00:53:09+08:00`` → ``2026-03-04 00:53:09`` (the header gives the zone)."""
    return iso[:19].replace("T", " ")


def _did(run: list[Access]) -> str:
    """What a run did, counted: "viewed Patient, viewed Observation ×2, created Observation"."""
    counts: dict[str, int] = {}
    for a in run:
        k = f"{ACTION_WORDS.get(a.action, a.action)} {a.resource_type}" + (
            " (denied)" if a.outcome == "failure" else ""
        )
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(k if n == 1 else f"{k} ×{n}" for k, n in counts.items())


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;width:100%;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:4px 6px;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}td.num{text-align:right}tr.unexplained td{background:#fff3f0}"
    "@media print{body{margin:0}}"
)


# ---------------------------------------------------------------------- building it
class _Sink:
    """The engine's clock sink, remembering the accesses a wrong clock had stamped."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.stamped: dict[str, tuple[float, str]] = {}  # event id → (stamp, ahead|behind)

    def on_clock_ahead(self, e: AccessEvent, judged_at: float) -> None:
        self.stamped[e.event_id] = (e.t, "ahead")
        self.eng.on_clock_ahead(e, judged_at)

    def on_clock_behind(self, e: AccessEvent, judged_at: float) -> None:
        self.stamped[e.event_id] = (e.t, "behind")
        self.eng.on_clock_behind(e, judged_at)

    def forgive_late(self, m: Misstamped) -> None:
        self.eng.forgive_late(m)


def validity_words(lo: float, hi: float, clock: LocalClock) -> str:
    """A validity window ``[lo, hi)`` in local dates: "2026-03-01 to 2026-03-31",
    "from 2026-03-01", "until 2026-03-31" or "with no start or end date"."""
    a = "" if math.isinf(lo) else clock.local_iso(lo)[:10]
    b = "" if math.isinf(hi) else clock.local_iso(hi - 1)[:10]
    if a and b:
        return f"{a} to {b}"
    return f"from {a}" if a else (f"until {b}" if b else "with no start or end date")


class _Describer:
    """Turns an access's facts into the report's words, from the context and the config."""

    def __init__(self, ctx: Context, cfg: DetectionConfig) -> None:
        self.ctx, self.cfg = ctx, cfg

    def when(self, t: float) -> str:
        return "open" if math.isinf(t) else self.ctx.clock.local_iso(t)

    def day(self, t: float) -> str:
        return "ongoing" if math.isinf(t) else self.ctx.clock.local_iso(t)[:16].replace("T", " ")

    def dates(self, lo: float, hi: float) -> str:
        return validity_words(lo, hi, self.ctx.clock)

    def grant(self, g: Grant) -> str:
        """A grant in words, the same everywhere: purpose (departments; actions; dates)."""
        depts = "all departments" if g.departments is None else ", ".join(sorted(g.departments))
        actions = "all actions" if g.actions is None else ", ".join(sorted(g.actions))
        return f"{g.purpose or 'grant'} ({depts}; {actions}; {self.dates(g.valid_from, g.valid_until)})"

    def dept(self, dept_id: str) -> str:
        d = self.ctx.departments.get(dept_id)
        return f"{d.name} ({dept_id})" if d is not None and d.name else dept_id or "no department"

    def enc(self, enc: Encounter) -> str:
        att = self.ctx.staff.get(enc.attending_user_id)
        who = f", attending {enc.attending_user_id}" + (
            f" {att.display_name}" if att is not None else ""
        )
        return (
            f"encounter {enc.encounter_id} in {self.dept(enc.department_id)}, "
            f"{self.day(enc.start)} to {self.day(enc.end)}{who}"
        )

    def near(self, patient_id: str, t: float, before: float, after: float) -> list[Encounter]:
        return [
            enc
            for enc in self.ctx.encounters_of(patient_id)
            if enc.start - before <= t <= enc.end + after
        ]

    def because(
        self, e: AccessEvent, staff: Staff | None, reasons: Iterable[str], last_write: float | None
    ) -> list[str]:
        cfg = self.cfg
        out = []
        for r in reasons:
            if r == "attending":
                encs = [
                    x
                    for x in self.near(
                        e.patient_id, e.t, cfg.care_margin_before_s, cfg.care_margin_after_s
                    )
                    if x.attending_user_id == e.user_id
                ]
                out.append(f"the user is the attending: {'; '.join(map(self.enc, encs))}")
            elif r == "care_department":
                dept = staff.department_id if staff else ""
                encs = [
                    x
                    for x in self.near(
                        e.patient_id, e.t, cfg.care_margin_before_s, cfg.care_margin_after_s
                    )
                    if x.department_id == dept
                ]
                out.append(f"under care of the user's department: {'; '.join(map(self.enc, encs))}")
            elif r == "documented":
                at = f" on {self.day(last_write)}" if last_write is not None else ""
                out.append(f"the user charted or ordered for the patient{at}")
            elif r == "service_department":
                encs = self.near(e.patient_id, e.t, cfg.care_margin_before_s, cfg.service_margin_s)
                out.append(
                    f"{self.dept(staff.department_id if staff else '')} serving "
                    f"{'; '.join(map(self.enc, encs))}"
                )
            elif r == "administrative":
                encs = self.near(
                    e.patient_id, e.t, cfg.care_margin_before_s, cfg.admin_after_discharge_s
                )
                out.append(
                    f"administrative work ({staff.role if staff else ''}) on "
                    f"{'; '.join(map(self.enc, encs))}"
                )
            elif r == "grant":
                # as the detectors judge it: the departments that have treated the patient
                # up to the access (a department grant looks back)
                seen = [
                    x.department_id
                    for x in self.ctx.encounters_of(e.patient_id)
                    if x.start - cfg.care_margin_before_s <= e.t
                ]
                grants = self.ctx.grants.get(e.user_id) or []
                covering = [g for g in grants if g.covers(e.t, e.action, seen)] or [
                    g for g in grants if g.valid_from <= e.t < g.valid_until
                ]
                out.append("a grant covers it: " + "; ".join(map(self.grant, covering)))
            elif r == "emergency_department":
                encs = self.near(e.patient_id, e.t, cfg.emergency_margin_s, cfg.care_margin_after_s)
                ed = [
                    x
                    for x in encs
                    if (d := self.ctx.departments.get(x.department_id)) and d.is_emergency
                ]
                out.append(f"emergency department work: {'; '.join(map(self.enc, ed))}")
            else:
                out.append(REASONS.get(r, r))
        return out

    def not_because(
        self, e: AccessEvent, staff: Staff | None, last_write: float | None
    ) -> list[str]:
        cfg = self.cfg
        if staff is None:
            return ["the account is not on the staff roster, so nothing can explain it"]
        if not e.patient_id:
            return ["no patient recorded for the access"]
        if e.patient_id not in self.ctx.patients:
            out = ["the patient is not in the patient list"]
        else:
            out = []
        encs = self.near(e.patient_id, e.t, cfg.care_margin_before_s, cfg.admin_after_discharge_s)
        if encs:
            out.append(
                f"the user ({staff.role}, {self.dept(staff.department_id)}) is not on the care "
                f"team of the patient's recent encounters: {'; '.join(map(self.enc, encs))}"
            )
        else:
            out.append("the patient had no encounter at the hospital around that time")
        days = cfg.documented_window_s / 86400
        if last_write is None:
            out.append(f"no note or order by the user for the patient in the {days:g} days before")
        else:
            out.append(
                f"the user's last note or order for the patient ({self.day(last_write)}) is "
                f"more than {days:g} days before"
            )
        grants = self.ctx.grants.get(e.user_id)
        if grants:
            out.append("the user's grants do not cover it: " + "; ".join(map(self.grant, grants)))
        else:
            out.append("no grant")
        return out

    def flags(self, e: AccessEvent, f: dict[str, Any], staff: Staff | None) -> list[str]:
        ctx = self.ctx
        out = []
        if f["self_access"]:
            out.append("the user's own record")
        if f["family"]:
            out.append("same family name and address as the user")
        if f["coworker"]:
            p = ctx.patients.get(e.patient_id)
            out.append(f"a colleague's record (staff account {p.employee_user_id if p else ''})")
        if f["vip"]:
            out.append("VIP record")
        if f["sealed_violation"]:
            seal = ctx.seals.get(e.patient_id)
            why = f" ({seal.reason})" if seal is not None and seal.reason else ""
            out.append(f"sealed record{why}; the user is not on its authorised list")
        if f["above_clearance"]:
            out.append(
                f"record sensitivity {f['sensitivity']} above the user's clearance {f['clearance']}"
            )
        if staff is None:
            out.append("account not on the staff roster")
        elif not f["account_active"]:
            out.append(
                f"account used outside its validity ({self.dates(staff.valid_from, staff.valid_until)})"
            )
        if f["off_shift"]:
            shift = staff.shift_words if staff else ""
            out.append(f"outside the user's shift{f' ({shift})' if shift else ''}")
        if e.emergency:
            out.append("emergency (break-the-glass) access")
        if f["exfiltration"]:
            out.append(f"data taken out of the record system ({e.action})")
        if f["denied"]:
            out.append("the system denied it")
        return out


def parse_bound(value: str | None, ctx: Context) -> float | None:
    """A period bound: a date (the hospital's local midnight) or an ISO date-time (local
    when it has no offset)."""
    if not value:
        return None
    try:
        if len(value) == 10:
            return ctx.clock.day_start(date.fromisoformat(value))
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ReportError(
            f"{value!r} is not a date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM[+HH:MM])"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ctx.clock.tz)
    return dt.timestamp()


def counted_events(
    path: str | Path,
    fmt: str,
    stats: ParseStats,
    errors: IO[str] | None = None,
    prefilter: Callable[[bytes], bool] | None = None,
) -> Iterator[AccessEvent]:
    """The events of ``path``, each line counted in ``stats`` and each bad one also
    reported on ``errors``."""
    for line_no, item, _raw in stats.track(read_events(path, fmt, prefilter)):
        if isinstance(item, EventError):
            if errors is not None:
                errors.write(f"{path}:{line_no}: skipped: {item}\n")
        else:
            yield item


def access_report(
    context: Context,
    events_path: str | Path,
    patients: Iterable[str] = (),
    users: Iterable[str] = (),
    start: float | None = None,
    end: float | None = None,
    config: DetectionConfig | None = None,
    fmt: str = "auto",
    errors: IO[str] | None = None,
    break_the_glass: bool = False,
) -> AccessReport:
    """Every access of ``patients`` (by ``users``, when given) or by ``users`` in
    [``start``, ``end``), explained (see the module's doc); ``break_the_glass``: only the
    emergency accesses (all of them in the period when neither is given: the review most
    hospitals' policies ask for)."""
    cfg = config or DetectionConfig()
    want_p, want_u = frozenset(patients), frozenset(users)
    if not want_p and not want_u and not break_the_glass:
        raise ReportError("give at least one patient or one user, or ask for break-the-glass")
    path = str(events_path)
    if path == "-":
        raise ReportError("the report reads the log twice: give a file, not standard input")
    if not Path(path).is_file():
        raise ReportError(f"no such events file: {path}")
    if want_p and not want_u:
        # the users to replay: whoever accessed the patients (the whole log: a note of theirs
        # before the period explains accesses in it)
        scan = ParseStats()
        # only a line that holds one of the ids can be an access of theirs (JSON escapes
        # aside: with a quote, backslash, slash or non-ASCII character, every line is parsed)
        needles = [p.encode() for p in want_p]
        plain = all(
            n.isascii() and b'"' not in n and b"\\" not in n and b"/" not in n for n in needles
        )

        def holds(raw: bytes) -> bool:
            return any(n in raw for n in needles)

        replayed = {
            e.user_id
            for e in counted_events(path, fmt, scan, None, holds if plain else None)
            if e.patient_id in want_p and (e.emergency or not break_the_glass)
        }
    elif want_u:
        replayed = set(want_u)
    else:
        # whoever broke the glass around the period (a day either side: a clock found wrong
        # moves an access by hours)
        scan = ParseStats()
        s0 = -math.inf if start is None else start - 86400
        s1 = math.inf if end is None else end + 86400
        replayed = {
            e.user_id for e in counted_events(path, fmt, scan) if e.emergency and s0 <= e.t < s1
        }

    eng = Engine(context, cfg)
    sink = _Sink(eng)
    say = _Describer(context, cfg)
    counts = ParseStats()
    lo = -math.inf if start is None else start
    hi = math.inf if end is None else end
    picked: list[tuple[AccessEvent, dict[str, Any], float | None]] = []
    writes: dict[tuple[str, str], list[float]] = defaultdict(list)
    alerts: dict[str, Alert] = {}
    first_t, last_t = math.inf, -math.inf
    users_state = eng.users
    n = 0
    with paused_gc():
        for e in file_clock(
            counted_events(path, fmt, counts, errors), cfg.replay_clock_ahead_s, sink
        ):
            t = e.t
            if t < first_t:
                first_t = t
            if t > last_t:
                last_t = t
            uid = e.user_id
            if uid not in replayed:
                continue
            pid = e.patient_id
            if (not want_p or pid in want_p) and (not want_u or uid in want_u):
                if e.action in WRITE_ACTIONS and e.outcome == "success":
                    writes[(uid, pid)].append(t)
                if lo <= t < hi and (e.emergency or not break_the_glass):
                    st = users_state.get(uid)
                    if st is None:
                        st = users_state[uid] = UserState()
                    # the facts as the engine judges this access: before it takes it in
                    picked.append((e, eng.facts(e, st), st.writes.get(pid)))
            eng.ingest(e)
            n += 1
            if n % DRAIN_EVERY == 0:
                for a in eng.drain():
                    alerts[a.alert_id] = a
        eng.sweep_to(last_t if last_t > -math.inf else eng.watermark)
        for a in eng.drain() + eng.flush():
            alerts[a.alert_id] = a

    holding: dict[str, list[str]] = defaultdict(list)
    for a in sorted(alerts.values(), key=lambda a: (a.first_seen, a.alert_id)):
        for ev_id in a.event_ids:
            holding[ev_id].append(a.alert_id)

    ctx = context
    grace = cfg.documented_grace_s
    answered = ", ".join(sorted(eng.retractable)) or "none"
    for ws in writes.values():
        ws.sort()  # a log delivered late is not in time order
    picked.sort(key=lambda x: x[0].t)  # the report reads in time order (stable: ties as read)
    rows: list[Access] = []
    for e, f, prior in picked:
        staff = ctx.staff.get(e.user_id)
        reasons = list(f["explanations"])
        last_write = e.t if f["write"] else prior
        after = ""
        if not reasons:
            ws = writes.get((e.user_id, e.patient_id), [])
            i = bisect_right(ws, e.t)
            if i < len(ws) and ws[i] - e.t <= grace:
                mins = (ws[i] - e.t) / 60
                after = (
                    f"the user charted or ordered for the patient {mins:.0f} min later "
                    f"({say.day(ws[i])}): the findings of the rules a note answers "
                    f"({answered}) are taken back"
                )
        st_ = sink.stamped.get(e.event_id)
        rows.append(
            Access(
                event_id=e.event_id,
                t=e.t,
                time=say.when(e.t),
                user_id=e.user_id,
                patient_id=e.patient_id,
                action=e.action,
                resource_type=e.resource_type,
                workstation=e.workstation,
                outcome=e.outcome,
                emergency=e.emergency,
                purpose=e.purpose,
                source=e.source,
                reasons=reasons,
                because=say.because(e, staff, reasons, last_write) if reasons else [],
                not_because=[] if reasons else say.not_because(e, staff, last_write),
                documented_after=after,
                flags=say.flags(e, f, staff),
                alerts=list(holding.get(e.event_id, ())),
                stamped=(
                    f"stamped {say.day(st_[0])} by a source whose clock runs {st_[1]}; "
                    f"judged at {say.day(e.t)}"
                    if st_
                    else ""
                ),
                stamped_t=st_[0] if st_ else None,
            )
        )

    # the alerts to list: those whose evidence holds a reported access
    listed = {x for r in rows for x in r.alerts}
    alert_rows = [
        {
            "alert_id": a.alert_id,
            "severity": a.severity,
            "status": a.status
            + (f" ({retraction_why(a.reason)})" if a.status == "retracted" else ""),
            "user_id": a.user_id,
            "detector": a.detector,
            "first_seen": a.first_seen,
            "last_seen": a.last_seen,
            "reason": a.reason,
            "event_ids": a.event_ids,
        }
        for a in sorted(alerts.values(), key=lambda a: (a.first_seen, a.alert_id))
        if a.alert_id in listed
    ]

    summary = _summary(rows, ctx, say, alert_rows)
    names: dict[str, str] = {}
    for r in rows:
        s = ctx.staff.get(r.user_id)
        names[r.user_id] = s.display_name if s is not None else ""
        p = ctx.patients.get(r.patient_id)
        names[r.patient_id] = f"{p.family_name} {p.given_name}".strip() if p is not None else ""
    for pid in want_p:
        p = ctx.patients.get(pid)
        names.setdefault(pid, f"{p.family_name} {p.given_name}".strip() if p else "")
    for uid in want_u:
        s = ctx.staff.get(uid)
        names.setdefault(uid, s.display_name if s else "")

    notes = []
    window = cfg.documented_window_s
    if first_t < math.inf and any(not r.explained and r.t < first_t + window for r in rows):
        notes.append(
            f"The log begins {say.day(first_t)}: a note or order from before then cannot "
            f"explain accesses up to {window / 86400:g} days later, and some accesses in "
            "that stretch are not explained. Give the report older history to rule that out."
        )
    if want_p and not rows:
        notes.append("No access to the patient in the period.")
    elif break_the_glass and not rows:
        notes.append("No break-the-glass access in the period.")
    unknown_p = sorted(p for p in want_p if p not in ctx.patients)
    if unknown_p:
        notes.append(f"Not in the patient list: {', '.join(unknown_p)}.")
    unknown_u = sorted(u for u in want_u if u not in ctx.staff)
    if unknown_u:
        notes.append(f"Not on the staff roster: {', '.join(unknown_u)}.")
    stamped = sum(1 for r in rows if r.stamped)
    if stamped:
        notes.append(
            f"{stamped} access(es) came from a source whose clock was found wrong; they are "
            "listed at the time they were judged at, with the time the source stamped."
        )

    return AccessReport(
        patients=sorted(want_p),
        users=sorted(want_u),
        period=(
            say.when(start) if start is not None else "",
            say.when(end) if end is not None else "",
        ),
        timezone=ctx.clock.name,
        generated_at=datetime.now(ctx.clock.tz).isoformat(timespec="seconds"),
        subjects=[_patient_subject(ctx, say, p, lo, hi) for p in sorted(want_p)]
        + ([] if want_p else [_user_subject(ctx, say, u) for u in sorted(want_u)]),
        accesses=rows,
        summary=summary,
        alerts=alert_rows,
        events_read=counts.ok,
        bad_lines=counts.bad,
        log_first=say.day(first_t) if first_t < math.inf else "",
        log_last=say.day(last_t) if last_t > -math.inf else "",
        notes=notes,
        names=names,
        break_the_glass=break_the_glass,
        patient_summary=_patient_summary(rows, names),
    )


def _summary(
    rows: list[Access], ctx: Context, say: _Describer, alert_rows: list[dict[str, Any]]
) -> list[UserSummary]:
    by_user: dict[str, UserSummary] = {}
    for r in rows:
        u = by_user.get(r.user_id)
        if u is None:
            s = ctx.staff.get(r.user_id)
            u = by_user[r.user_id] = UserSummary(
                user_id=r.user_id,
                name=s.display_name if s is not None else "unknown account",
                role=s.role if s is not None else "",
                department=say.dept(s.department_id) if s is not None else "",
            )
        u.count(r)
    for al in alert_rows:
        u = by_user.get(al["user_id"])
        if u is not None:
            u.alerts.append(al["alert_id"])
    # the least explained first: where a privacy officer looks
    return sorted(by_user.values(), key=lambda u: (*u.least_explained_first(), u.user_id))


def _patient_summary(rows: list[Access], names: dict[str, str]) -> list[PatientSummary]:
    by: dict[str, PatientSummary] = {}
    for r in rows:
        ps = by.get(r.patient_id)
        if ps is None:
            ps = by[r.patient_id] = PatientSummary(r.patient_id, names.get(r.patient_id, ""))
        ps.count(r)
        ps.flags.extend(f for f in r.flags if f not in ps.flags)
        ps.alerts.extend(a for a in r.alerts if a not in ps.alerts)
    return sorted(by.values(), key=lambda p: (*p.least_explained_first(), p.patient_id))


def _patient_subject(
    ctx: Context, say: _Describer, pid: str, lo: float, hi: float
) -> dict[str, Any]:
    p = ctx.patients.get(pid)
    lines: list[str] = []
    if p is None:
        return {"heading": f"Patient {pid} (not in the patient list)", "lines": lines}
    lines.append(f"sensitivity {p.sensitivity}" + (", VIP" if p.vip else ""))
    if p.employee_user_id:
        lines.append(f"a member of staff (account {p.employee_user_id})")
    seal = ctx.seals.get(pid)
    if seal is not None:
        lines.append(
            f"record sealed since {say.day(seal.sealed_at)}"
            + (f" ({seal.reason})" if seal.reason else "")
            + f"; {len(seal.authorized)} user(s) authorised"
        )
    encs = [x for x in ctx.encounters_of(pid) if x.start < hi and x.end > lo]
    lines.extend(say.enc(x) for x in encs)
    if not encs:
        lines.append("no encounter in the period")
    return {"heading": f"Patient {pid} {p.family_name} {p.given_name}".strip(), "lines": lines}


def _user_subject(ctx: Context, say: _Describer, uid: str) -> dict[str, Any]:
    s = ctx.staff.get(uid)
    if s is None:
        return {"heading": f"User {uid} (not on the staff roster)", "lines": []}
    lines = [f"{s.role} in {say.dept(s.department_id)}, clearance {s.clearance}"]
    if s.shift_words:
        lines.append(f"shift {s.shift_words}")
    lines.append(f"account valid {say.dates(s.valid_from, s.valid_until)}")
    lines += [f"grant: {say.grant(g)}" for g in ctx.grants.get(uid) or []]
    return {"heading": f"User {uid} {s.display_name}", "lines": lines}


# ---------------------------------------------------------------------- the command
def add_access_report_arguments(p: Any) -> None:
    p.add_argument("--context", required=True, help="directory with the context CSVs")
    p.add_argument("--events", required=True, help="the log: FHIR NDJSON, JSONL or CSV (a file)")
    p.add_argument("--format", default="auto", choices=["auto", "fhir", "jsonl", "csv"])
    p.add_argument("--patient", action="append", default=[], help="a patient id (repeatable)")
    p.add_argument(
        "--user",
        action="append",
        default=[],
        help="a user id (repeatable); with --patient: only that user's accesses of the patient",
    )
    p.add_argument(
        "--break-the-glass",
        action="store_true",
        help="only emergency accesses; alone: every one in the period (the break-the-glass review)",
    )
    p.add_argument("--from", dest="start", help="first day (YYYY-MM-DD, local) or date-time")
    p.add_argument("--to", dest="end", help="day after the last (exclusive), or date-time")
    p.add_argument("--config", default=None, help="the detection configuration (YAML)")
    p.add_argument("--timezone", default=None, help="the hospital's")
    p.add_argument("--output", default="text", choices=["text", "csv", "json", "html"])
    p.add_argument("--out", default="-", help="file to write, readable by its owner only")
    p.add_argument(
        "--patient-copy",
        action="store_true",
        help="the version for the patient: when, who, what; no explanations, alerts or workstations",
    )
    p.add_argument(
        "--audit-store",
        metavar="URL",
        default=None,
        help="the alert store (sqlite:///… or postgresql://…) whose audit log records the "
        "report (who, whom, why) before it is written",
    )
    p.add_argument(
        "--requested-by",
        default=None,
        help="who runs the report, for the audit log (default: the login name)",
    )
    p.add_argument("--purpose", default="", help="why, for the audit log: 'patient request 118'")


def write_private(path: str, text: str) -> None:
    """Write ``text`` to a new or replaced file only its owner may read (it holds patient data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_output(out: str, text: str) -> None:
    """``text`` to standard output (``-``) or to the file ``out``, owner-only."""
    if out == "-":
        sys.stdout.write(text)
    else:
        write_private(out, text)


def audit(
    rep: AccessReport, store_url: str, actor: str | None, purpose: str, patient_copy: bool
) -> None:
    """Write the report to the alert store's audit log (``access_report``): who ran it, on
    which patients or users, for which period and why; the privacy report and the feed's
    audit page list it with the case views and unmasks."""
    import getpass

    from pipeline.alerting.store import AlertStore

    store = AlertStore(store_url, migrate=False)
    try:
        store.record_access(
            actor or getpass.getuser(),
            "access_report",
            None,
            {
                "patients": rep.patients,
                "users": rep.users,
                "period": list(rep.period),
                "purpose": purpose,
                "patient_copy": patient_copy,
                "break_the_glass": rep.break_the_glass,
                "accesses": len(rep.accesses),
            },
        )
    finally:
        store.close()


def cmd_access_report(args: Any) -> int:
    from pipeline.cli import _config

    if args.patient_copy and not args.patient:
        print("emrwatch access-report: --patient-copy needs --patient", file=sys.stderr)
        return 2
    cfg = _config(args.config, args.timezone, args.context)
    try:
        ctx = Context.load(args.context, cfg.timezone)
        rep = access_report(
            ctx,
            args.events,
            args.patient,
            args.user,
            parse_bound(args.start, ctx),
            parse_bound(args.end, ctx),
            cfg,
            args.format,
            errors=sys.stderr,
            break_the_glass=args.break_the_glass,
        )
    except (ReportError, OSError) as exc:
        print(f"emrwatch access-report: {exc}", file=sys.stderr)
        return 2
    text = rep.render(args.output, args.patient_copy)
    if args.audit_store:
        try:
            audit(rep, args.audit_store, args.requested_by, args.purpose, args.patient_copy)
        except Exception as exc:  # noqa: BLE001 - no audit entry, no report
            print(
                f"emrwatch access-report: cannot write the audit log at {args.audit_store}, so "
                f"the report is not written: {exc}",
                file=sys.stderr,
            )
            return 2
    write_output(args.out, text)
    if not args.audit_store:
        print(
            "access-report: not recorded in any audit log; --audit-store URL records who ran "
            "it, on whom and why",
            file=sys.stderr,
        )
    unexplained = sum(1 for a in rep.accesses if not a.explained)
    print(
        f"access-report: {len(rep.accesses)} access(es) by {len(rep.summary)} user(s), "
        f"{unexplained} not explained, {len(rep.alerts)} alert(s); {rep.events_read:,} events "
        f"read ({rep.bad_lines:,} bad lines skipped)"
        + (f" → {args.out}" if args.out != "-" else ""),
        file=sys.stderr,
    )
    return 0
