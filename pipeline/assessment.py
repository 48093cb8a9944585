"""``emrwatch assessment``: a hospital's periodic security assessment of EMR access, and
``emrwatch assessment-compare``: the regulator's table of many hospitals' assessments.

The rules emrwatch serves (FIELD.md) ask each hospital to run regular security
assessments, and provincial regulators to supervise and evaluate hospital by hospital.
An assessment is one JSON document per hospital and period, with the same indicators for
every hospital, so a regulator can line them up without access to any hospital's data:

* **the log**: accesses, users and patients, accesses per log source, unreadable lines,
  and the local days in the period with no access logged at all (a source that stopped);
* **explanation**: the share of accesses a reason explains (the detectors' own judgement,
  replayed over the whole history), and break-the-glass accesses nothing explained;
* **sealing**: sealed records, and accesses to them by users the seal does not list;
* **accounts** (the access review at the period's end): time-limited roles without an end
  date, accounts used outside their validity, dormant accounts, clearance above use;
* **alerts and response** (from the alert store, when given): cases raised per 10,000
  accesses, by severity, verdicts, hours to the first triage step and cases first
  triaged after their severity's target, cases open for more than 30 days;
* **concerns**: each indicator past its threshold (:data:`CONCERNS`), in words.

It names no patient and no member of staff: only counts, days and source names. The
comparison reads only these documents.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from connectors.readers import ParseStats
from emrwatch.context import Context
from pipeline.history import history_state
from pipeline.signing import (
    SignatureError,
    Signer,
    Verifier,
    generate_key_pair,
    load_private_key,
    load_public_key,
    shared_key_from_env,
    sign_document,
    verify_document,
)

KIND = "emrwatch assessment"
VERSION = 1
EXPLAINED_MIN = 0.90  # EBAS explains 94%+; under 90% the context feeds are likely incomplete
BAD_LINES_MAX = 0.01
EMERGENCY_UNEXPLAINED_MAX = 0.05
UNKNOWN_MAX = 0.01  # accesses to patients the context does not know
SOURCE_DAILY = 0.8  # a source logging on this share of the log's days is expected daily
OPEN_AGE_OLD = "over 30 days"  # the privacy report's oldest backlog bucket


class AssessmentError(ValueError):
    """An assessment that cannot be made or read (a missing file, a bad period)."""


@dataclass
class Assessment:
    hospital: str
    period_from: str
    period_to: str  # exclusive
    timezone: str
    generated_at: str
    log: dict[str, Any] = field(default_factory=dict)
    explanation: dict[str, Any] = field(default_factory=dict)
    sealing: dict[str, Any] = field(default_factory=dict)
    accounts: dict[str, Any] = field(default_factory=dict)
    alerts: dict[str, Any] | None = None  # None: no alert store was given
    concerns: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what limits the indicators

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "version": VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, sort_keys=False)

    def to_text(self) -> str:
        lg, ex, se, ac, al = self.log, self.explanation, self.sealing, self.accounts, self.alerts
        out = [
            f"EMR access security assessment: {self.hospital}",
            f"{self.period_from} to {self.period_to} (exclusive; {self.timezone}), "
            f"made {self.generated_at}",
            "",
            f"Log: {lg['accesses']:,} accesses by {lg['users']:,} users to "
            f"{lg['patients']:,} patients; {lg['bad_lines']:,} unreadable lines; sources: "
            + (", ".join(f"{k} {v:,}" for k, v in lg["sources"].items()) or "-"),
            f"  days with no access logged: {', '.join(lg['silent_days']) or 'none'}",
            "  sources silent on a day: "
            + (
                "; ".join(f"{k} {', '.join(v)}" for k, v in lg["source_silent_days"].items())
                or "none"
            )
            + f"; accesses to patients the context does not know: "
            f"{lg['unknown_patient_accesses']:,}",
            f"Explained: {_pct(ex['share'])} of accesses ({ex['unexplained']:,} unexplained); "
            f"break-the-glass {ex['emergency']:,}, of which {ex['emergency_unexplained']:,} "
            "unexplained",
            f"Sealed records: {se['sealed_records']:,} ({se['sealed_in_period']:,} sealed in the "
            f"period); accesses by users not authorised: {se['unauthorised_accesses']:,}",
            "Accounts at the period's end: "
            + ", ".join(f"{_ACCOUNT_WORDS[k]} {ac[k]}" for k in _ACCOUNT_WORDS)
            + f" (of {ac['roster']:,} on the roster)",
        ]
        if al is None:
            out.append("Alerts: no alert store given")
        else:
            out += [
                f"Alerts: {al['alerts']:,} cases ({al['per_10k']:.2f} per 10,000 accesses; "
                + ", ".join(f"{k} {v}" for k, v in al["by_severity"].items())
                + f"); {al['decided']} decided, {al['confirmed']} confirmed misuse",
                f"  hours to the first triage step: median {_h(al['first_step_median_h'])}, "
                f"90th percentile {_h(al['first_step_p90_h'])}; first step after the target: "
                f"{al['first_step_late']}; open over 30 days: {al['open_over_30_days']}",
                f"  the monitor's audit log: {al['audit_log_entries']:,} entries, "
                + (
                    "intact (hash chain verified)"
                    if not al["audit_log_breaks"]
                    else f"TAMPERED ({al['audit_log_breaks']} break(s) in its hash chain)"
                )
                + (f"; head {al['audit_log_head']}" if al["audit_log_head"] else ""),
            ]
        out += ["", f"Concerns: {len(self.concerns) or 'none'}"]
        out += [f"  - {c['text']}" for c in self.concerns]
        if self.notes:
            out += ["", "Notes"] + [f"  - {n}" for n in self.notes]
        return "\n".join(out) + "\n"


_ACCOUNT_WORDS = {
    "open_ended": "time-limited roles without an end date",
    "outside_validity": "used outside their validity",
    "dormant": "dormant",
    "clearance_above_use": "clearance above use",
    "ending_soon": "ending soon",
}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} h"


#: (code, section, key, words): a concern whenever the count is above zero
_COUNT_CONCERNS = (
    ("sealed", "sealing", "unauthorised_accesses",
     "{n} access(es) to sealed records by users the seal does not list"),
    ("open_ended", "accounts", "open_ended",
     "{n} trainee, vendor or researcher account(s) without an end date"),
    ("outside_validity", "accounts", "outside_validity",
     "{n} account(s) used outside their validity or not on the roster"),
    ("response", "alerts", "first_step_late",
     "{n} case(s) first triaged after their severity's target"),
    ("backlog", "alerts", "open_over_30_days", "{n} case(s) open for more than 30 days"),
    ("audit_log", "alerts", "audit_log_breaks",
     "the monitor's audit log was changed outside emrwatch ({n} break(s) in its hash chain)"),
)  # fmt: skip


def concerns_of(a: Assessment) -> list[dict[str, str]]:
    """The indicators past their thresholds, each with a code and a sentence."""
    out: list[tuple[str, str]] = []
    lg, ex, al = a.log, a.explanation, a.alerts
    if not lg["accesses"]:
        out.append(("no_accesses", "no access was logged in the period"))
    elif lg["silent_days"]:
        n = len(lg["silent_days"])
        out.append(("silent_days", f"{n} day(s) with no access logged: a log source may "
                    f"have stopped ({', '.join(lg['silent_days'][:5])}{'…' if n > 5 else ''})"))  # fmt: skip
    for src, quiet in lg["source_silent_days"].items():
        out.append(("source_silent", f"source {src} logged nothing on {len(quiet)} day(s) "
                    f"although it logs on most days ({', '.join(quiet[:5])}"
                    f"{'…' if len(quiet) > 5 else ''}): it may have stopped"))  # fmt: skip
    if lg["accesses"] and lg["unknown_patient_accesses"] / lg["accesses"] > UNKNOWN_MAX:
        out.append(("unknown_patients", f"{lg['unknown_patient_accesses'] / lg['accesses']:.1%}"
                    " of accesses are to patients the context does not know: the patient "
                    "feed may be incomplete"))  # fmt: skip
    total_lines = lg["accesses_in_log"] + lg["bad_lines"]
    if total_lines and lg["bad_lines"] / total_lines > BAD_LINES_MAX:
        out.append(("unreadable", f"{lg['bad_lines'] / total_lines:.1%} of the log's lines "
                    f"are unreadable (more than {BAD_LINES_MAX:.0%})"))  # fmt: skip
    if lg["accesses"] and ex["share"] < EXPLAINED_MIN:
        out.append(("explained", f"only {ex['share']:.1%} of accesses are explained (under "
                    f"{EXPLAINED_MIN:.0%}): care, roster or grant data may be missing"))  # fmt: skip
    if (
        ex["emergency"]
        and ex["emergency_unexplained"] / ex["emergency"] > EMERGENCY_UNEXPLAINED_MAX
    ):
        out.append(("break_the_glass", f"{ex['emergency_unexplained']} of {ex['emergency']} "
                    "break-the-glass accesses are unexplained"))  # fmt: skip
    for code, section, key, words in _COUNT_CONCERNS:
        counts = getattr(a, section)
        if counts is not None and counts.get(key):
            out.append((code, words.format(n=counts[key])))
    if al is None:
        out.append(("no_alert_store", "no alert store given: the response to alerts is "
                    "not assessed"))  # fmt: skip
    return [{"code": c, "text": t} for c, t in out]


def assess(
    hospital: str,
    context_dir: str | Path,
    events_path: str | Path,
    start: date,
    end: date,
    config: Any = None,
    store: Any = None,
    workers: int = 1,
    fmt: str = "auto",
) -> Assessment:
    """The assessment of ``hospital`` for local dates ``start`` to ``end`` (exclusive) from
    a history directory (context CSVs and the log, which should begin at least 14 days
    before ``start`` so that notes and orders can explain) and, if given, the alert store."""
    from detectors.config import DetectionConfig
    from pipeline.access_report import counted_events
    from pipeline.access_review import access_review
    from pipeline.replay import replay_file

    if end <= start:
        raise AssessmentError(f"the period must end after it starts ({start} to {end})")
    if not Path(events_path).is_file():
        raise AssessmentError(f"no such events file: {events_path}")
    cfg = config or DetectionConfig()
    ctx = Context.load(context_dir, cfg.timezone)
    clock = ctx.clock
    t0, t1 = clock.day_start(start), clock.day_start(end)

    # what the detectors explained: the whole log replayed, as the stream judged it
    res = replay_file(
        context_dir, events_path, fmt, cfg.timezone, cfg, workers=workers, collect_unexplained=True
    )
    unexplained_ids = res.stats.unexplained_ids

    stats = ParseStats()
    users: set[str] = set()
    patients: set[str] = set()
    sources: Counter[str] = Counter()
    days: set[date] = set()
    source_days: dict[str, set[date]] = {}
    unknown_patient = unknown_user = 0
    n = unexplained = emergency = emergency_unexplained = unauthorised = failures = 0
    log_first = math.inf
    for e in counted_events(events_path, fmt, stats):
        t = e.t
        log_first = min(log_first, t)
        if t >= t1:
            continue
        src = e.source or "-"
        day = datetime.fromtimestamp(t, clock.tz).date()
        source_days.setdefault(src, set()).add(day)
        if t < t0:
            continue
        n += 1
        users.add(e.user_id)
        patients.add(e.patient_id)
        sources[src] += 1
        days.add(day)
        unknown_patient += e.patient_id not in ctx.patients
        unknown_user += e.user_id not in ctx.staff
        unexp = e.event_id in unexplained_ids
        unexplained += unexp
        if e.outcome != "success":
            failures += 1
        elif ctx.seal_applies(e.patient_id, e.user_id, t) is not None:
            unauthorised += 1
        if e.emergency:
            emergency += 1
            emergency_unexplained += unexp
    every_day = [start + timedelta(days=i) for i in range((end - start).days)]
    # the days a source is judged on: from the log's first day to the period's last
    first_day = min(datetime.fromtimestamp(log_first, clock.tz).date(), start)
    judged = (end - first_day).days if log_first < math.inf else 0
    a = Assessment(
        hospital=hospital,
        period_from=start.isoformat(),
        period_to=end.isoformat(),
        timezone=cfg.timezone,
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        log={
            "accesses": n,
            "users": len(users),
            "patients": len(patients),
            "denied": failures,
            "sources": dict(sources.most_common()),
            "accesses_in_log": stats.ok,
            "bad_lines": stats.bad,
            "silent_days": [d.isoformat() for d in every_day if d not in days],
            # a source that logs on most days (of the log up to the period's end), and
            # not on these days of the period
            "source_silent_days": {
                src: quiet
                for src, seen in sorted(source_days.items())
                if sources[src]
                and len(seen) >= SOURCE_DAILY * judged
                and (quiet := [d.isoformat() for d in every_day if d not in seen])
            },
            "unknown_patient_accesses": unknown_patient,
            "unknown_user_accesses": unknown_user,
        },
        explanation={
            "explained": n - unexplained,
            "unexplained": unexplained,
            "share": round((n - unexplained) / n, 4) if n else None,
            "emergency": emergency,
            "emergency_unexplained": emergency_unexplained,
        },
        sealing={
            "sealed_records": sum(1 for s in ctx.seals.values() if s.sealed_at < t1),
            "sealed_in_period": sum(1 for s in ctx.seals.values() if t0 <= s.sealed_at < t1),
            "unauthorised_accesses": unauthorised,
        },
    )
    rev = access_review(ctx, events_path, as_of=t1 - 1, fmt=fmt)
    a.accounts = {"roster": rev.accounts, **{k: len(rev.section(k)) for k in _ACCOUNT_WORDS}}
    if store is not None:
        a.alerts = _alerts(store, start, end, cfg.timezone, n)
    a.concerns = concerns_of(a)
    lookback = cfg.documented_window_s
    if n and log_first > t0 - lookback:
        a.notes.append(
            f"the log begins {clock.local_iso(log_first)[:10]}, less than "
            f"{lookback / 86400:.0f} days before the period: notes and orders written before "
            "it are not seen, so some accesses early in the period may count as unexplained"
        )
    return a


def _alerts(store: Any, start: date, end: date, timezone: str, accesses: int) -> dict[str, Any]:
    from pipeline.alerting.report import privacy_report

    rep = privacy_report(store, start, end, timezone)
    return {
        "alerts": rep.alerts,
        "per_10k": round(rep.alerts * 10_000 / accesses, 2) if accesses else 0.0,
        "by_severity": rep.by_severity,
        "by_detector": rep.by_detector,
        "decided": rep.decided,
        "confirmed": rep.confirmed,
        "benign": rep.benign,
        "first_step_median_h": rep.to_first_step.median_h,
        "first_step_p90_h": rep.to_first_step.p90_h,
        "first_step_late": sum(rep.first_step_late.values()),
        "open_at_end": rep.open_at_end,
        "open_over_30_days": rep.open_by_age.get(OPEN_AGE_OLD, 0),
        **_audit_chain(store),
    }


def _audit_chain(store: Any) -> dict[str, Any]:
    """Whether the monitor's own audit log is intact (its hash chain), and its head."""
    from pipeline.alerting.chain import verify_store

    check = verify_store(store)
    h = check.heads.get("audit_log")
    return {
        "audit_log_entries": check.entries.get("audit_log", 0),
        "audit_log_breaks": len(check.broken),
        "audit_log_head": f"{h[0]}:{h[1]}" if h else "",
    }


def mail_assessment(
    router: Any,
    history_dir: str | Path,
    hospital: str,
    detection: Any = None,
    now: datetime | None = None,
) -> int:
    """Once a month is over and the history has been written since, the month's
    assessment for every ``email.report_to`` address of ``router`` (an
    :class:`pipeline.alerting.AlertRouter`), through its outbox: once per month whichever
    service or restart gets there first, like the monthly privacy report. Returns the mails
    queued. A month before the history's first event is not assessed (the monitor was not
    running). ``emrwatch alerts`` calls this after each update of ``feed.history_dir``."""

    from detectors.config import DetectionConfig
    from emrwatch.timeutil import zone
    from pipeline.alerting.report import default_period

    e = router.config.email
    if not e.report_to or "email" not in router.sinks:
        return 0
    tz = zone(e.report_timezone)
    now = now or router.store.clock()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    start, end = default_period(e.report_timezone, now)
    tag = f"assessment:{start.isoformat()}"
    if not router.outbox.missing(tag, "email", e.report_to):
        return 0
    history = Path(history_dir)
    h = history_state(history)
    if h is None or h.start is None:
        return 0  # no history written yet
    month_end = datetime.combine(end, datetime.min.time(), tz)
    if h.written < month_end or h.start >= month_end:
        return 0  # not written since the month ended, or the monitor started after it
    cfg = DetectionConfig.in_zone(detection, e.report_timezone)
    a = assess(hospital, history, history / "events.jsonl", start, end, cfg, router.store)
    feed = router.config.feed_url.rstrip("/")
    link = f"{feed}/reports/assessment?from={start}&to={end}"
    text = f"{a.to_text()}\nIn the alert feed, with the JSON for the regulator: {link}\n"
    payload = {
        "subject": f"emrwatch security assessment {hospital} {start} to {end}",
        "text": text,
        "html": (
            "<!doctype html><html><head><meta charset='utf-8'></head><body><pre>"
            f"{html.escape(a.to_text())}</pre><p><a href='{html.escape(link)}'>"
            "Open it in the alert feed</a>, with the JSON for the regulator.</p></body></html>\n"
        ),
    }
    added = int(router.outbox.enqueue_report(tag, "email", e.report_to, payload))
    if added:
        router.outbox.wake()
    return added


# ---------------------------------------------------------------- the regulator's table

#: (label, how to read it from an assessment) for the comparison, in order
INDICATORS: tuple[tuple[str, str], ...] = (
    ("accesses", "log.accesses"),
    ("users", "log.users"),
    ("days with no access logged", "log.silent_days#"),
    ("sources silent for a day", "log.source_silent_days#"),
    ("accesses to unknown patients", "log.unknown_patient_accesses"),
    ("unreadable lines", "log.bad_lines"),
    ("accesses explained", "explanation.share%"),
    ("break-the-glass accesses", "explanation.emergency"),
    ("… of them unexplained", "explanation.emergency_unexplained"),
    ("sealed records", "sealing.sealed_records"),
    ("sealed: accesses not authorised", "sealing.unauthorised_accesses"),
    ("time-limited accounts without end", "accounts.open_ended"),
    ("accounts used outside validity", "accounts.outside_validity"),
    ("dormant accounts", "accounts.dormant"),
    ("alert cases", "alerts.alerts"),
    ("cases per 10,000 accesses", "alerts.per_10k"),
    ("confirmed misuse", "alerts.confirmed"),
    ("median hours to first triage", "alerts.first_step_median_h"),
    ("first triage after target", "alerts.first_step_late"),
    ("open over 30 days", "alerts.open_over_30_days"),
    ("audit log breaks (tampering)", "alerts.audit_log_breaks"),
    ("concerns", "concerns#"),
)
#: the concern codes each indicator row is marked by
_ROW_CONCERNS = {
    "days with no access logged": {"silent_days", "no_accesses"},
    "unreadable lines": {"unreadable"},
    "sources silent for a day": {"source_silent"},
    "accesses to unknown patients": {"unknown_patients"},
    "accesses explained": {"explained"},
    "… of them unexplained": {"break_the_glass"},
    "sealed: accesses not authorised": {"sealed"},
    "time-limited accounts without end": {"open_ended"},
    "accounts used outside validity": {"outside_validity"},
    "alert cases": {"no_alert_store"},
    "first triage after target": {"response"},
    "open over 30 days": {"backlog"},
    "audit log breaks (tampering)": {"audit_log"},
}


def load_assessment(path: str | Path) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AssessmentError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(d, dict) or d.get("kind") != KIND:
        raise AssessmentError(f"{path}: not an emrwatch assessment")
    if d.get("version") != VERSION:
        raise AssessmentError(f"{path}: assessment version {d.get('version')}, not {VERSION}")
    return d


def _value(d: dict[str, Any], how: str) -> tuple[str, str]:
    """An indicator of an assessment as (shown, for machines): "61,865" and "61865",
    "98.2%" and "0.9821", "-" and "" where it was not assessed."""
    suffix = how[-1] if how[-1] in "%#" else ""
    v: Any = d
    for k in (how[:-1] if suffix else how).split("."):
        v = v.get(k) if isinstance(v, dict) else None
    if v is None:
        return "-", ""
    if suffix == "#":
        return str(len(v)), str(len(v))
    if suffix == "%":
        return f"{v:.1%}", str(v)
    if isinstance(v, float):
        return f"{v:,.2f}".rstrip("0").rstrip("."), str(v)
    return (f"{v:,}" if isinstance(v, int) else str(v)), str(v)


@dataclass
class Comparison:
    hospitals: list[str]
    #: label, values shown, values for machines, a concern per hospital
    rows: list[tuple[str, list[str], list[str], list[bool]]]
    concerns: dict[str, list[str]]  # hospital → sentences
    notes: list[str]

    def to_text(self) -> str:
        w0 = max(len(r[0]) for r in self.rows)
        ws = [
            max(len(h), *(len(r[1][i]) + 1 for r in self.rows))
            for i, h in enumerate(self.hospitals)
        ]
        out = [
            " " * w0 + "  " + "  ".join(h.rjust(w) for h, w in zip(self.hospitals, ws, strict=True))
        ]
        for label, values, _raw, marks in self.rows:
            cells = [
                (v + ("!" if m else " ")).rjust(w)
                for v, m, w in zip(values, marks, ws, strict=True)
            ]
            out.append(label.ljust(w0) + "  " + "  ".join(cells))
        out += ["", "! marks a concern."]
        for h, texts in self.concerns.items():
            out += ["", f"{h}: {len(texts) or 'no'} concern(s)"] + [f"  - {t}" for t in texts]
        if self.notes:
            out += ["", "Notes"] + [f"  - {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["indicator", *self.hospitals])
        for label, _shown, raw, _marks in self.rows:
            w.writerow([label, *raw])
        return buf.getvalue()

    def to_html(self) -> str:
        e = html.escape
        head = "".join(f"<th>{e(h)}</th>" for h in self.hospitals)
        body = "".join(
            f"<tr><th scope='row'>{e(label)}</th>"
            + "".join(
                f"<td class='concern'>{e(v)}</td>" if m else f"<td>{e(v)}</td>"
                for v, m in zip(values, marks, strict=True)
            )
            + "</tr>"
            for label, values, _raw, marks in self.rows
        )
        lists = "".join(
            f"<h2>{e(h)}</h2>"
            + (
                "<ul>" + "".join(f"<li>{e(t)}</li>" for t in texts) + "</ul>"
                if texts
                else "<p>No concern.</p>"
            )
            for h, texts in self.concerns.items()
        )
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes)
        return (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<title>EMR access assessments</title><style>"
            "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "th[scope=row]{text-align:left}td.concern{background:#fde2e1;font-weight:bold}"
            "</style></head><body><h1>EMR access assessments</h1>"
            f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"{lists}" + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "") + "</body></html>\n"
        )

    def render(self, fmt: str) -> str:
        return {"text": self.to_text, "csv": self.to_csv, "html": self.to_html}[fmt]()


def compare(docs: Iterable[dict[str, Any]]) -> Comparison:
    """The regulator's table: one column per assessment, one row per indicator, concerns
    marked. A hospital assessed for several periods (a trend) gets a column per period,
    named with its first day; the notes say when hospitals' periods differ."""
    docs = list(docs)
    if not docs:
        raise AssessmentError("no assessment to compare")
    names = [d["hospital"] for d in docs]
    columns = [
        h if names.count(h) == 1 else f"{h} {d['period_from']}"
        for h, d in zip(names, docs, strict=True)
    ]
    twice = sorted(c for c, k in Counter(columns).items() if k > 1)
    if twice:
        raise AssessmentError(f"the same hospital and period twice: {', '.join(twice)}")
    notes = []
    periods = {(d["period_from"], d["period_to"]) for d in docs}
    if len(periods) > 1 and len(set(names)) > 1:
        notes.append(
            "the periods differ: "
            + "; ".join(
                f"{c} {d['period_from']} to {d['period_to']}"
                for c, d in zip(columns, docs, strict=True)
            )
        )
    notes += [f"{c}: {n}" for c, d in zip(columns, docs, strict=True) for n in d.get("notes") or []]
    codes = [{c["code"] for c in d.get("concerns") or []} for d in docs]
    rows = []
    for label, how in INDICATORS:
        marks = [bool(_ROW_CONCERNS.get(label, set()) & cs) for cs in codes]
        values = [_value(d, how) for d in docs]
        rows.append((label, [v[0] for v in values], [v[1] for v in values], marks))
    concerns = {
        c: [x["text"] for x in d.get("concerns") or []] for c, d in zip(columns, docs, strict=True)
    }
    return Comparison(columns, rows, concerns, notes)


# ---------------------------------------------------------------- commands


def add_assessment_arguments(p: Any) -> None:
    p.add_argument(
        "--service-config",
        default=None,
        help="the YAML file of emrwatch alerts: the hospital's name (feed.hospital), its "
        "history (feed.history_dir), the alert store, the timezone and the detection "
        "settings from there; the flags below override it",
    )
    p.add_argument(
        "--hospital", default=None, help="the hospital's name, as the regulator knows it"
    )
    p.add_argument(
        "--context", default=None, help="directory with the context CSVs (a history export)"
    )
    p.add_argument("--events", default=None, help="the log: FHIR NDJSON, JSONL or CSV")
    p.add_argument("--format", default="auto", choices=["auto", "fhir", "jsonl", "csv"])
    p.add_argument("--from", dest="start", default=None, help="first day (default: last month's)")
    p.add_argument("--to", dest="end", default=None, help="day after the last, YYYY-MM-DD")
    p.add_argument("--store", default=None, help="the alert store's URL, for alerts and response")
    p.add_argument("--config", default=None, help="the detection configuration")
    p.add_argument("--timezone", default=None, help="the hospital's")
    p.add_argument("--workers", type=int, default=1, help="replay processes")
    p.add_argument("--output", default="text", choices=["text", "json"])
    p.add_argument(
        "--sign-key",
        metavar="FILE",
        help="sign the JSON (Ed25519) with this private key (emrwatch assessment-keygen); "
        "the regulator verifies it with the public key",
    )
    p.add_argument(
        "--sign-key-passphrase-env",
        metavar="NAME",
        help="the --sign-key file is encrypted: its passphrase is in this environment variable",
    )
    p.add_argument(
        "--sign-key-env",
        metavar="NAME",
        help="sign the JSON (HMAC-SHA256) with the key in this environment variable, shared "
        "with the regulator (instead of --sign-key)",
    )
    p.add_argument("--out", default="-", help="file to write (default: standard output)")


def _from_service(args: Any) -> Any:
    """``args`` with what ``--service-config`` (the alert service's YAML) says filled in
    where no flag gave it; the detection settings as well (None without the file)."""
    if not args.service_config:
        return None
    from pipeline.alert_service import _load

    settings, alerting, feed, _ctx = _load(args.service_config)
    if feed is not None:
        args.hospital = args.hospital or feed.hospital or feed.title
        args.context = args.context or feed.history_dir or None
    args.store = args.store or alerting.store_url
    args.timezone = args.timezone or settings.timezone
    return settings.detection_config()


def _signer(args: Any) -> Signer | None:
    """The key ``--sign-key`` or ``--sign-key-env`` names (None: unsigned)."""
    if args.sign_key and args.sign_key_env:
        raise ValueError("give --sign-key (Ed25519) or --sign-key-env (HMAC), not both")
    if (args.sign_key or args.sign_key_env) and args.output != "json":
        raise ValueError("a signature signs the JSON: give --output json")
    if args.sign_key:
        return load_private_key(args.sign_key, args.sign_key_passphrase_env)
    if args.sign_key_passphrase_env:
        raise ValueError("--sign-key-passphrase-env goes with --sign-key")
    return shared_key_from_env(args.sign_key_env) if args.sign_key_env else None


def cmd_assessment(args: Any) -> int:
    from dataclasses import replace

    from pipeline.access_report import write_output
    from pipeline.alerting.report import default_period
    from pipeline.cli import _config
    from pipeline.evaluate import find_events_file

    try:
        detection = _from_service(args)
    except ValueError as exc:  # the config errors are ValueErrors
        print(f"emrwatch assessment: {exc}", file=sys.stderr)
        return 2
    missing = [f for f, v in (("--hospital", args.hospital), ("--context", args.context)) if not v]
    if missing:
        print(f"emrwatch assessment: give {' and '.join(missing)} (or --service-config with "
              "feed.history_dir)", file=sys.stderr)  # fmt: skip
        return 2
    if detection is not None and not args.config:
        cfg = replace(detection, timezone=args.timezone or detection.timezone)
    else:
        cfg = _config(args.config, args.timezone, args.context)
    try:
        events = args.events or find_events_file(Path(args.context))
        last = default_period(cfg.timezone)
        start = date.fromisoformat(args.start) if args.start else last[0]
        end = date.fromisoformat(args.end) if args.end else (last[1] if not args.start else None)
        if end is None:
            raise ValueError("--from needs --to")
        signer = _signer(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"emrwatch assessment: {exc}", file=sys.stderr)
        return 2
    store = None
    try:
        if args.store:
            from pipeline.alerting.store import AlertStore

            store = AlertStore(args.store, migrate=False)
        a = assess(args.hospital, args.context, events, start, end, cfg, store,
                   args.workers, args.format)  # fmt: skip
    except (AssessmentError, OSError) as exc:
        print(f"emrwatch assessment: {exc}", file=sys.stderr)
        return 2
    finally:
        if store is not None:
            store.close()
    if args.output == "json":
        doc = sign_document(a.to_dict(), signer) if signer else a.to_dict()
        write_output(args.out, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    else:
        write_output(args.out, a.to_text())
    print(
        f"assessment of {a.hospital} {a.period_from} to {a.period_to}: "
        f"{a.log['accesses']:,} accesses, {len(a.concerns)} concern(s)",
        file=sys.stderr,
    )
    return 0


def add_assessment_compare_arguments(p: Any) -> None:
    p.add_argument("files", nargs="+", help="assessments (JSON, from emrwatch assessment)")
    p.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="HOSPITAL=FILE",
        help="verify HOSPITAL's Ed25519 signatures with its public key (repeat per "
        "hospital); a document of such a hospital that is unsigned, altered or signed under "
        "another key is refused",
    )
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="HOSPITAL=ENV",
        help="the same for a hospital that signs with a shared HMAC key, in $ENV",
    )
    p.add_argument("--output", default="text", choices=["text", "csv", "html"])
    p.add_argument("--out", default="-", help="file to write (default: standard output)")


def cmd_assessment_compare(args: Any) -> int:
    from pipeline.access_report import write_output

    try:
        keys: dict[str, Verifier] = {}
        for flag, specs, load in (("--public-key", args.public_key, load_public_key),
                                  ("--key", args.key, shared_key_from_env)):  # fmt: skip
            for spec in specs:
                hospital, sep, where = spec.rpartition("=")
                if not sep or not hospital or not where:
                    form = "FILE" if flag == "--public-key" else "ENV"
                    raise AssessmentError(f"{flag} {spec!r}: give HOSPITAL={form}")
                if hospital in keys:
                    raise AssessmentError(f"{hospital}: one key per hospital")
                keys[hospital] = load(where)
        docs = [load_assessment(f) for f in args.files]
        for d in docs:
            if d["hospital"] in keys:
                verify_document(d, keys[d["hospital"]], f"{d['hospital']} {d.get('period_from')}")
        c = compare(docs)
        unchecked = sorted({d["hospital"] for d in docs} - set(keys))
        if keys:
            c.notes.append(
                "signatures verified: "
                + ", ".join(sorted(set(keys) & {d["hospital"] for d in docs}))
                + (f"; not verified (no --key): {', '.join(unchecked)}" if unchecked else "")
            )
    except (AssessmentError, SignatureError) as exc:
        print(f"emrwatch assessment-compare: {exc}", file=sys.stderr)
        return 2
    write_output(args.out, c.render(args.output))
    return 0


def add_assessment_keygen_arguments(p: Any) -> None:
    p.add_argument(
        "--out",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.key (the private key, owner-only: keep it on the hospital's "
        "side) and PREFIX.pub (the public key: send it to the regulator)",
    )
    p.add_argument(
        "--passphrase-env",
        metavar="NAME",
        help="encrypt the private key with the passphrase in this environment variable",
    )


def cmd_assessment_keygen(args: Any) -> int:
    try:
        key, pub = generate_key_pair(args.out, args.passphrase_env)
        fingerprint = load_public_key(pub).fingerprint
    except (SignatureError, OSError) as exc:
        print(f"emrwatch assessment-keygen: {exc}", file=sys.stderr)
        return 2
    print(f"private key {key} (keep it: emrwatch assessment --sign-key {key})")
    print(f"public key  {pub} (give it to the regulator: assessment-compare --public-key)")
    print(f"fingerprint {fingerprint}")
    return 0
