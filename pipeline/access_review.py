"""``emrwatch access-review``: which accounts and grants to re-check, from the roster and the log.

Rules for EMR access (FIELD.md) ask for least-privilege access by job, role and time;
trainees, visiting staff and vendors limited in scope and time; and access re-checked as
jobs change. The detectors alert on an account used outside its window; this review is
the periodic other half, for the managers who grant access. From the context (the staff
roster and the grants) and the access log it lists:

1. **time-limited roles without an end date**: trainee, vendor and researcher accounts
   (``time_limited_roles``) that never expire;
2. **ending soon**: accounts and grants whose last day falls within ``ending_days`` of the
   review date, to renew or let lapse on purpose;
3. **dormant**: accounts valid on the review date that the log shows unused for
   ``idle_days`` (or at all): candidates to disable;
4. **used outside their validity**: accounts the log shows used before they started,
   after they ended, or not on the roster (each also an alert, here counted);
5. **clearance above use**: accounts whose clearance is above the most sensitive record
   they opened over the log, used on ``min_days_used`` days or more: candidates to lower.

Each line names the account, its role, department and supervisor (who re-checks it), and
no patient. The review date is the log's last access unless given.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from connectors.readers import ParseStats
from emrwatch.context import Context, Staff
from pipeline.access_report import counted_events, validity_words

TIME_LIMITED_ROLES = ("trainee", "vendor", "researcher")
SECTIONS = {
    "open_ended": "Time-limited roles without an end date",
    "ending_soon": "Accounts and grants ending soon",
    "dormant": "Dormant accounts",
    "outside_validity": "Accounts used outside their validity",
    "clearance_above_use": "Clearance above use",
}
DAY = 86400.0


class ReviewError(ValueError):
    """A review that cannot be made (no such file, a bad date)."""


@dataclass
class Finding:
    section: str
    user_id: str
    name: str
    role: str
    department: str
    supervisor: str
    what: str  # in words
    #: for sorting and machines: the date or number the finding rests on
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Use:
    last: float = -math.inf
    days: set[int] = field(default_factory=set)
    max_sensitivity: int = 0
    before: int = 0  # accesses before valid_from
    after: int = 0  # after valid_until
    outside_last: float = -math.inf


@dataclass
class AccessReview:
    as_of: str
    timezone: str
    log_first: str
    log_last: str
    events_read: int
    bad_lines: int
    accounts: int
    findings: list[Finding]
    notes: list[str]

    def section(self, key: str) -> list[Finding]:
        return [f for f in self.findings if f.section == key]

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "findings"},
            "sections": {k: [asdict(f) for f in self.section(k)] for k in SECTIONS},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_csv(self) -> str:
        buf = io.StringIO()
        cols = ("section", "user_id", "name", "role", "department", "supervisor", "what")
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for f in self.findings:
            w.writerow(asdict(f))
        return buf.getvalue()

    def to_text(self) -> str:
        out = [
            f"Access review as of {self.as_of} ({self.timezone})",
            "",
            f"{self.accounts} accounts on the roster; log read: {self.events_read:,} events "
            f"({self.bad_lines:,} bad lines skipped), {self.log_first or '-'} to "
            f"{self.log_last or '-'}.",
        ]
        for key, title in SECTIONS.items():
            items = self.section(key)
            out += ["", f"{title}: {len(items) or 'none'}"]
            out += [
                f"  {f.user_id} {f.name} ({f.role}, {f.department}; supervisor "
                f"{f.supervisor or '-'}): {f.what}"
                for f in items
            ]
        if self.notes:
            out += ["", "Notes"] + [f"  - {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def render(self, fmt: str) -> str:
        if fmt == "json":
            return self.to_json() + "\n"
        if fmt == "csv":
            return self.to_csv()
        return self.to_text()


def access_review(
    context: Context,
    events_path: str | Path,
    as_of: float | None = None,
    idle_days: float = 90,
    ending_days: float = 14,
    min_days_used: int = 20,
    time_limited_roles: Iterable[str] = TIME_LIMITED_ROLES,
    fmt: str = "auto",
) -> AccessReview:
    """The review (see the module's doc) of ``context``'s roster and grants against the log."""
    if not Path(events_path).is_file():
        raise ReviewError(f"no such events file: {events_path}")
    ctx = context
    use: dict[str, _Use] = {}
    stats = ParseStats()
    first_t, last_t = math.inf, -math.inf
    patients = ctx.patients
    staff = ctx.staff
    for e in counted_events(events_path, fmt, stats):
        t = e.t
        first_t = min(first_t, t)
        last_t = max(last_t, t)
        u = use.get(e.user_id)
        if u is None:
            u = use[e.user_id] = _Use()
        u.last = max(u.last, t)
        u.days.add(ctx.clock.local_day(t))
        p = patients.get(e.patient_id)
        if p is not None and e.outcome == "success" and p.sensitivity > u.max_sensitivity:
            u.max_sensitivity = p.sensitivity
        s = staff.get(e.user_id)
        if s is None or t < s.valid_from or t >= s.valid_until:
            if s is not None and t < s.valid_from:
                u.before += 1
            else:
                u.after += 1
            u.outside_last = max(u.outside_last, t)
    now = as_of if as_of is not None else (last_t if last_t > -math.inf else None)
    if now is None:
        raise ReviewError("the log has no access, and no review date was given (--as-of)")
    day = ctx.clock.local_iso

    def date_of(t: float) -> str:
        return "open" if math.isinf(t) else day(t)[:10]

    def window(lo: float, hi: float) -> str:
        return validity_words(lo, hi, ctx.clock)

    def who(s: Staff) -> dict[str, str]:
        dept = ctx.departments.get(s.department_id)
        return {
            "user_id": s.user_id,
            "name": s.display_name,
            "role": s.role,
            "department": f"{dept.name} ({s.department_id})" if dept else s.department_id,
            "supervisor": s.supervisor_id,
        }

    findings: list[Finding] = []
    limited = frozenset(time_limited_roles)
    valid_now = [s for s in staff.values() if s.valid_from <= now < s.valid_until]
    for s in sorted(staff.values(), key=lambda s: (s.department_id, s.user_id)):
        if s.role in limited and math.isinf(s.valid_until) and s.valid_from <= now:
            findings.append(
                Finding(
                    "open_ended",
                    **who(s),
                    what=f"a {s.role} account valid from {date_of(s.valid_from)} with no end date",
                    detail={"valid_from": date_of(s.valid_from)},
                )
            )
    horizon = now + ending_days * DAY
    for s in sorted(valid_now, key=lambda s: (s.valid_until, s.user_id)):
        if s.valid_until <= horizon:
            last = date_of(s.valid_until - 1)
            findings.append(
                Finding("ending_soon", **who(s), what=f"account ends {last}", detail={"ends": last})
            )
    for uid, grants in sorted(ctx.grants.items()):
        s = staff.get(uid)
        for g in grants:
            if g.valid_from <= now < g.valid_until <= horizon and s is not None:
                last = date_of(g.valid_until - 1)
                depts = (
                    "all departments" if g.departments is None else ", ".join(sorted(g.departments))
                )
                findings.append(
                    Finding(
                        "ending_soon",
                        **who(s),
                        what=f"grant '{g.purpose or 'grant'}' ({depts}) ends {last}",
                        detail={"ends": last, "grant": g.purpose},
                    )
                )
    covered = (now - first_t) / DAY if first_t < math.inf else 0.0
    idle = min(idle_days, covered)
    notes = []
    if covered < idle_days:
        notes.append(
            f"The log covers {covered:.0f} days before the review date, less than the "
            f"{idle_days:g} a dormant account is judged on: 'dormant' means unused for all "
            f"{covered:.0f} of them. Give it a longer history for a sounder list."
        )
    if last_t > -math.inf and now - last_t > DAY:
        notes.append(
            f"The log ends {date_of(last_t)}, {(now - last_t) / DAY:.0f} days before the review "
            "date: what happened after it is not known here."
        )
    if idle >= 1:
        for s in sorted(valid_now, key=lambda s: (s.department_id, s.user_id)):
            u = use.get(s.user_id)
            if s.valid_from > now - idle * DAY:
                continue  # too new to be dormant
            if u is None or u.last < now - idle * DAY:
                since = (
                    "not used in the log"
                    if u is None
                    else f"last used {date_of(u.last)}, {(now - u.last) / DAY:.0f} days before"
                )
                findings.append(
                    Finding(
                        "dormant",
                        **who(s),
                        what=f"{since}; valid {window(s.valid_from, s.valid_until)}",
                        detail={"last_used": date_of(u.last) if u else ""},
                    )
                )
    for uid, u in sorted(use.items()):
        if not (u.before or u.after):
            continue
        s = staff.get(uid)
        if s is None:
            findings.append(
                Finding(
                    "outside_validity",
                    user_id=uid,
                    name="",
                    role="",
                    department="",
                    supervisor="",
                    what=f"not on the roster: {u.after} access(es), last {date_of(u.outside_last)}",
                    detail={"accesses": u.after},
                )
            )
            continue
        parts = []
        if u.before:
            parts.append(f"{u.before} before its start {date_of(s.valid_from)}")
        if u.after:
            parts.append(f"{u.after} after its end {date_of(s.valid_until - 1)}")
        findings.append(
            Finding(
                "outside_validity",
                **who(s),
                what="used " + " and ".join(parts) + f"; last {date_of(u.outside_last)}",
                detail={"before": u.before, "after": u.after},
            )
        )
    for s in sorted(valid_now, key=lambda s: (s.department_id, s.user_id)):
        u = use.get(s.user_id)
        if u is None or len(u.days) < min_days_used or s.clearance <= u.max_sensitivity:
            continue
        findings.append(
            Finding(
                "clearance_above_use",
                **who(s),
                what=f"clearance {s.clearance}; the most sensitive record opened on "
                f"{len(u.days)} days of use: {u.max_sensitivity}",
                detail={"clearance": s.clearance, "max_opened": u.max_sensitivity},
            )
        )
    return AccessReview(
        as_of=day(now)[:10],
        timezone=ctx.clock.name,
        log_first=day(first_t)[:16].replace("T", " ") if first_t < math.inf else "",
        log_last=day(last_t)[:16].replace("T", " ") if last_t > -math.inf else "",
        events_read=stats.ok,
        bad_lines=stats.bad,
        accounts=len(staff),
        findings=findings,
        notes=notes,
    )


# ---------------------------------------------------------------------- the command
def add_access_review_arguments(p: Any) -> None:
    p.add_argument("--context", required=True, help="directory with the context CSVs")
    p.add_argument("--events", required=True, help="the log: FHIR NDJSON, JSONL or CSV")
    p.add_argument("--format", default="auto", choices=["auto", "fhir", "jsonl", "csv"])
    p.add_argument("--as-of", default=None, help="review date, YYYY-MM-DD (default: the log's end)")
    p.add_argument("--idle-days", type=float, default=90, help="unused this long: dormant")
    p.add_argument("--ending-days", type=float, default=14, help="ends within this: ending soon")
    p.add_argument(
        "--min-days-used", type=int, default=20, help="days of use before clearance is judged"
    )
    p.add_argument("--timezone", default=None, help="the hospital's")
    p.add_argument("--config", default=None, help="the detection configuration (its timezone)")
    p.add_argument("--output", default="text", choices=["text", "csv", "json"])
    p.add_argument("--out", default="-", help="file to write (default: standard output)")


def cmd_access_review(args: Any) -> int:
    from pipeline.access_report import write_output
    from pipeline.cli import _config

    cfg = _config(args.config, args.timezone, args.context)
    try:
        ctx = Context.load(args.context, cfg.timezone)
        as_of = None
        if args.as_of:
            try:
                as_of = ctx.clock.day_end(datetime.fromisoformat(args.as_of).date()) - 1
            except ValueError:
                raise ReviewError(f"--as-of {args.as_of!r} is not a date (YYYY-MM-DD)") from None
        rev = access_review(
            ctx,
            args.events,
            as_of,
            args.idle_days,
            args.ending_days,
            args.min_days_used,
            fmt=args.format,
        )
    except (ReviewError, OSError) as exc:
        print(f"emrwatch access-review: {exc}", file=sys.stderr)
        return 2
    text = rev.render(args.output)
    write_output(args.out, text)
    counts = ", ".join(f"{k} {len(rev.section(k))}" for k in SECTIONS)
    print(f"access-review as of {rev.as_of}: {counts}", file=sys.stderr)
    return 0
