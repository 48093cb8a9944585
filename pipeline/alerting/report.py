"""The periodic privacy report: what supervisors, the privacy office and regulators ask for.

For a period (a month, by default the last full one, in the hospital's timezone) the alert
store answers:

* **Alerts**: how many cases were raised, by severity, detector and department.
* **Outcomes**: cases decided in the period, confirmed misuse against benign.
* **Response**: hours from a case's arrival to its first triage step and to its verdict
  (median, 90th percentile), and how many waited longer than the target for their
  severity (``RESPONSE_TARGET_H``: critical 4 h, high 24 h, medium 72 h, low 7 days).
* **Backlog** at the period's end: open cases by age and severity.
* **Repeat users**: staff with two or more confirmed cases up to the period's end.
* **Oversight of the monitor itself**: case views, unmasks and access reports
  (``emrwatch access-report``) by whom, suppressions created.

It names staff (user and department ids), never patients: a report is read by more people
than a case is. Run it with ``emrwatch report`` (text, JSON or HTML) or open ``/reports`` in
the alert feed (supervisors and auditors).
"""

from __future__ import annotations

import html
import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select

from pipeline.alerting import schema as t
from pipeline.alerting.chain import head
from pipeline.alerting.records import RESPONSE_TARGET_H
from pipeline.alerting.render import SEVERITY_ORDER

__all__ = [
    "RESPONSE_TARGET_H",
    "PrivacyReport",
    "default_period",
    "last_full_month",
    "privacy_report",
]

#: hours within which a case of each severity should have had its first triage step
#: age buckets of the open backlog, in days: (label, lower bound)
AGE_BUCKETS = (("under 1 day", 0.0), ("1–7 days", 1.0), ("7–30 days", 7.0), ("over 30 days", 30.0))
CLOSED = ("closed_confirmed", "closed_benign")


@dataclass
class Hours:
    """Durations in hours: how many, the median and the 90th percentile."""

    n: int = 0
    median_h: float | None = None
    p90_h: float | None = None

    @classmethod
    def of(cls, hours: list[float]) -> Hours:
        if not hours:
            return cls()
        s = sorted(hours)
        p90 = s[min(len(s) - 1, int(0.9 * len(s)))]
        return cls(len(s), round(statistics.median(s), 2), round(p90, 2))


@dataclass
class PrivacyReport:
    period_from: str
    period_to: str  # exclusive
    timezone: str
    generated_at: str
    alerts: int = 0
    by_severity: dict[str, int] = field(default_factory=dict)
    by_detector: dict[str, int] = field(default_factory=dict)
    by_department: dict[str, int] = field(default_factory=dict)
    decided: int = 0
    confirmed: int = 0
    benign: int = 0
    to_first_step: Hours = field(default_factory=Hours)
    to_verdict: Hours = field(default_factory=Hours)
    first_step_late: dict[str, int] = field(default_factory=dict)
    open_at_end: int = 0
    open_by_age: dict[str, int] = field(default_factory=dict)
    open_by_severity: dict[str, int] = field(default_factory=dict)
    repeat_users: list[dict[str, Any]] = field(default_factory=list)
    case_views: int = 0
    unmasks: int = 0
    unmasks_by_actor: dict[str, int] = field(default_factory=dict)
    #: ``emrwatch access-report`` runs recorded in the audit log, by whom
    access_reports_by_actor: dict[str, int] = field(default_factory=dict)
    suppressions_created: list[dict[str, Any]] = field(default_factory=list)
    #: the audit log's head when the report was made (``ID:HASH``): kept with the report,
    #: it is an anchor for ``emrwatch audit-verify`` (pipeline.alerting.chain)
    audit_anchor: str = ""

    @property
    def title(self) -> str:
        return f"emrwatch privacy report {self.period_from} to {self.period_to}"

    @property
    def confirmed_share(self) -> float | None:
        return self.confirmed / self.decided if self.decided else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["confirmed_share"] = self.confirmed_share
        d["response_target_h"] = dict(RESPONSE_TARGET_H)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ------------------------------------------------------------------ text
    def to_text(self) -> str:
        share = self.confirmed_share
        lines = [
            f"emrwatch privacy report {self.period_from} to {self.period_to} "
            f"(end exclusive, {self.timezone})",
            "",
            f"Cases raised: {self.alerts}",
            f"  by severity:   {_pairs(self.by_severity)}",
            f"  by detector:   {_pairs(self.by_detector)}",
            f"  by department: {_pairs(self.by_department)}",
            "",
            f"Decided in the period: {self.decided} (confirmed misuse {self.confirmed}, "
            f"benign {self.benign}" + (f"; {share:.0%} confirmed)" if share is not None else ")"),
            f"Hours to the first triage step: {_hours(self.to_first_step)}",
            f"Hours to a verdict:             {_hours(self.to_verdict)}",
            "First step later than the target "
            f"({', '.join(f'{k} {v:g} h' for k, v in RESPONSE_TARGET_H.items())}): "
            f"{_pairs(self.first_step_late) or 'none'}",
            "",
            f"Open at the end of the period: {self.open_at_end}",
            f"  by age:      {_pairs(self.open_by_age)}",
            f"  by severity: {_pairs(self.open_by_severity)}",
            "",
            "Staff with two or more confirmed cases: "
            + (
                "; ".join(
                    f"{u['user_id']} ({u['department_id']}): {u['confirmed']}"
                    for u in self.repeat_users
                )
                or "none"
            ),
            "",
            f"Oversight: {self.case_views} case views, {self.unmasks} unmasks"
            + (f" ({_pairs(self.unmasks_by_actor)})" if self.unmasks_by_actor else "")
            + f", {sum(self.access_reports_by_actor.values())} access reports"
            + (f" ({_pairs(self.access_reports_by_actor)})" if self.access_reports_by_actor else "")
            + f", {len(self.suppressions_created)} suppressions created",
        ]
        for s in self.suppressions_created:
            lines.append(f"  suppression {s['id']} by {s['created_by']}: {s['scope']}")
        if self.audit_anchor:
            lines += ["", f"Audit log head (keep it: emrwatch audit-verify --anchor): "
                          f"{self.audit_anchor}"]  # fmt: skip
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ html
    def to_html_fragment(self) -> str:
        """The report as an HTML fragment (escaped), for the feed's page and for e-mail."""

        def table(title: str, counts: dict[str, Any]) -> str:
            head = f"<div class='block'><h3>{html.escape(title)}</h3>"
            if not counts:
                return head + "<p class='muted'>none</p></div>"
            rows = "".join(
                f"<tr><td>{html.escape(str(k))}</td><td class='num'>{html.escape(str(v))}</td></tr>"
                for k, v in counts.items()
            )
            return f"{head}<table class='report'>{rows}</table></div>"

        share = self.confirmed_share
        parts = [
            "<section class='report'>",
            f"<p>Cases raised: <strong>{self.alerts}</strong>. Decided: {self.decided} "
            f"(confirmed misuse {self.confirmed}, benign {self.benign}"
            + (f"; {share:.0%} confirmed" if share is not None else "")
            + f"). Open at the end: <strong>{self.open_at_end}</strong>.</p>",
            table("By severity", self.by_severity),
            table("By detector", self.by_detector),
            table("By department", self.by_department),
            table(
                "Response (hours)",
                {
                    "to the first triage step": _hours(self.to_first_step),
                    "to a verdict": _hours(self.to_verdict),
                },
            ),
            table("First step later than the target", self.first_step_late),
            table("Open backlog by age", self.open_by_age),
            table("Open backlog by severity", self.open_by_severity),
            table(
                "Staff with two or more confirmed cases",
                {
                    f"{u['user_id']} ({u['department_id']})": u["confirmed"]
                    for u in self.repeat_users
                },
            ),
            table(
                "Oversight of the monitor",
                {
                    "case views": self.case_views,
                    "unmasks": self.unmasks,
                    **{f"unmasks by {k}": v for k, v in self.unmasks_by_actor.items()},
                    "access reports": sum(self.access_reports_by_actor.values()),
                    **{
                        f"access reports by {k}": v for k, v in self.access_reports_by_actor.items()
                    },
                    "suppressions created": len(self.suppressions_created),
                },
            ),
            (
                f"<p class='muted anchor'>Audit log head when this report was made (keep it: "
                f"<code>emrwatch audit-verify --anchor</code>): "
                f"<code>{html.escape(self.audit_anchor)}</code></p>"
                if self.audit_anchor
                else ""
            ),
            "</section>",
        ]
        return "".join(parts)

    def to_html(self, link: str = "", assessment: str = "") -> str:
        """The report as a whole HTML document (a file, an e-mail), with a ``link`` to the
        same period in the alert feed and one to its security ``assessment`` when given."""
        title = html.escape(self.title)
        more = f"<p><a href='{html.escape(link)}'>Open it in the alert feed</a></p>" if link else ""
        if assessment:
            more += (
                f"<p><a href='{html.escape(assessment)}'>The period's security assessment</a> "
                "(for the regulator)</p>"
            )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto}"
            "table.report td{padding:0 1em 0 0}.num{text-align:right}</style></head>"
            f"<body><h1>{title}</h1><p>End exclusive, {html.escape(self.timezone)}; "
            f"generated {html.escape(self.generated_at)}.</p>{self.to_html_fragment()}"
            f"{more}</body></html>\n"
        )


def _pairs(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _hours(h: Hours) -> str:
    if not h.n:
        return "no cases"
    return f"median {h.median_h:g}, 90th percentile {h.p90_h:g} (n={h.n})"


def _ranked(counter: Counter[str], limit: int | None = None) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])


def _by_severity(counter: Counter[str]) -> dict[str, int]:
    return {s: counter[s] for s in reversed(SEVERITY_ORDER) if counter[s]}


def last_full_month(today: date) -> tuple[date, date]:
    first = today.replace(day=1)
    prev = (first - timedelta(days=1)).replace(day=1)
    return prev, first


def default_period(timezone: str, now: datetime | None = None) -> tuple[date, date]:
    """The last full month in the hospital's timezone, as of ``now`` (default: now)."""
    zone = ZoneInfo(timezone)
    return last_full_month((now or datetime.now(zone)).astimezone(zone).date())


def _utc(d: date, zone: ZoneInfo) -> datetime:
    """Local midnight of ``d`` as a naive UTC datetime (how the store keeps times)."""
    local = datetime(d.year, d.month, d.day, tzinfo=zone)
    return local.astimezone(ZoneInfo("UTC")).replace(tzinfo=None)


def privacy_report(
    store: Any,
    start: date,
    end: date,
    timezone: str = "Asia/Shanghai",
    detector_limit: int = 15,
) -> PrivacyReport:
    """The report for local dates ``start`` (inclusive) to ``end`` (exclusive)."""
    if end <= start:
        raise ValueError(f"the period must end after it starts ({start} to {end})")
    zone = ZoneInfo(timezone)
    t0, t1 = _utc(start, zone), _utc(end, zone)
    a, h, lg, sp = t.alerts, t.triage_history, t.audit_log, t.suppressions
    rep = PrivacyReport(
        period_from=start.isoformat(),
        period_to=end.isoformat(),
        timezone=timezone,
        generated_at=store.now().replace(microsecond=0).isoformat() + "Z",
    )
    with store.read() as conn:
        raised = conn.execute(
            select(a.c.alert_id, a.c.severity, a.c.detectors, a.c.department_id, a.c.received_at)
            .where(a.c.received_at >= t0, a.c.received_at < t1)
            .where(a.c.status != "retracted")
        ).all()
        decided = conn.execute(
            select(a.c.alert_id, a.c.verdict, a.c.received_at, a.c.decided_at).where(
                a.c.decided_at >= t0, a.c.decided_at < t1, a.c.verdict.is_not(None)
            )
        ).all()
        # first triage step of every case raised in the period (one query, then grouped)
        ids = [r.alert_id for r in raised]
        first_step: dict[str, datetime] = {}
        for i in range(0, len(ids), 500):
            for r in conn.execute(
                select(h.c.alert_id, h.c.at)
                .where(h.c.alert_id.in_(ids[i : i + 500]))
                .order_by(h.c.alert_id, h.c.at, h.c.id)
            ):
                first_step.setdefault(r.alert_id, r.at)
        backlog = conn.execute(
            select(a.c.severity, a.c.received_at, a.c.state, a.c.decided_at)
            .where(a.c.received_at < t1, a.c.status != "retracted")
            .where((a.c.verdict.is_(None)) | (a.c.decided_at >= t1))
        ).all()
        repeat = conn.execute(
            select(a.c.user_id, a.c.department_id).where(
                a.c.verdict == "confirmed", a.c.decided_at < t1
            )
        ).all()
        audit = conn.execute(
            select(lg.c.actor, lg.c.action).where(
                lg.c.at >= t0,
                lg.c.at < t1,
                lg.c.action.in_(("case.view", "unmask", "access_report")),
            )
        ).all()
        created = conn.execute(
            select(sp).where(sp.c.created_at >= t0, sp.c.created_at < t1).order_by(sp.c.id)
        ).all()
        anchor = head(conn)
    if anchor is not None:
        rep.audit_anchor = f"{anchor[0]}:{anchor[1]}"

    rep.alerts = len(raised)
    rep.by_severity = _by_severity(Counter(r.severity for r in raised))
    rep.by_detector = _ranked(
        Counter(d for r in raised for d in r.detectors.split(",") if d), detector_limit
    )
    rep.by_department = _ranked(Counter(r.department_id or "(none)" for r in raised))

    rep.decided = len(decided)
    rep.confirmed = sum(1 for r in decided if r.verdict == "confirmed")
    rep.benign = sum(1 for r in decided if r.verdict == "benign")
    rep.to_verdict = Hours.of(
        [(r.decided_at - r.received_at).total_seconds() / 3600 for r in decided]
    )

    waits: list[float] = []
    late: Counter[str] = Counter()
    now = store.now().replace(tzinfo=None)
    for r in raised:
        at = first_step.get(r.alert_id)
        waited = ((at if at is not None else min(now, t1)) - r.received_at).total_seconds() / 3600
        if at is not None:
            waits.append(waited)
        if waited > RESPONSE_TARGET_H.get(r.severity, RESPONSE_TARGET_H["low"]):
            late[r.severity] += 1  # also a case still untouched past its target
    rep.to_first_step = Hours.of(waits)
    rep.first_step_late = _by_severity(late)

    rep.open_at_end = len(backlog)
    ages: Counter[str] = Counter()
    for r in backlog:
        days = (t1 - r.received_at).total_seconds() / 86400
        label = next(lbl for lbl, lo in reversed(AGE_BUCKETS) if days >= lo)
        ages[label] += 1
    rep.open_by_age = {lbl: ages[lbl] for lbl, _ in AGE_BUCKETS if ages[lbl]}
    rep.open_by_severity = _by_severity(Counter(r.severity for r in backlog))

    per_user: Counter[tuple[str, str]] = Counter((r.user_id, r.department_id) for r in repeat)
    rep.repeat_users = [
        {"user_id": u, "department_id": d, "confirmed": n}
        for (u, d), n in sorted(per_user.items(), key=lambda kv: (-kv[1], kv[0]))
        if n >= 2
    ]

    rep.case_views = sum(1 for r in audit if r.action == "case.view")
    rep.unmasks_by_actor = _ranked(Counter(r.actor for r in audit if r.action == "unmask"))
    rep.unmasks = sum(rep.unmasks_by_actor.values())
    rep.access_reports_by_actor = _ranked(
        Counter(r.actor for r in audit if r.action == "access_report")
    )
    rep.suppressions_created = [
        {
            "id": s.id,
            "created_by": s.created_by,
            "scope": ", ".join(
                f"{k}={getattr(s, k)}"
                for k in ("rule", "user_id", "role", "department", "workstation")
                if getattr(s, k)
            )
            + (", patients" if s.patient_id else "")
            + (f" until {s.until}" if s.until else ""),
            "active": bool(s.active),
        }
        for s in created
    ]
    return rep


# ---------------------------------------------------------------------------- command line
def add_report_arguments(parser: Any) -> None:
    from pipeline.alerting.config import add_store_arguments

    add_store_arguments(parser)
    parser.add_argument("--from", dest="start", help="first day, YYYY-MM-DD (default: last month)")
    parser.add_argument("--to", dest="end", help="day after the last, YYYY-MM-DD (exclusive)")
    parser.add_argument(
        "--timezone", help="the hospital's (default: the config's, else Asia/Shanghai)"
    )
    parser.add_argument("--format", choices=("text", "json", "html"), default="text")
    parser.add_argument("--out", default="-", help="file to write (default: standard output)")


def _store_and_zone(args: Any) -> tuple[str, str]:
    if args.store:
        return args.store, args.timezone or "Asia/Shanghai"
    from pipeline.alert_service import _load

    settings, alerting, _feed, _ctx = _load(args.config)
    return alerting.store_url, args.timezone or settings.timezone


def cmd_report(args: Any) -> int:
    import sys

    from pipeline.alerting.store import AlertStore

    url, zone = _store_and_zone(args)
    default_start, default_end = default_period(zone)
    try:
        start = date.fromisoformat(args.start) if args.start else default_start
        end = (
            date.fromisoformat(args.end)
            if args.end
            else (default_end if not args.start else datetime.now(ZoneInfo(zone)).date())
        )
    except ValueError as exc:
        print(f"emrwatch report: {exc}", file=sys.stderr)
        return 2
    from sqlalchemy.exc import SQLAlchemyError

    store = AlertStore(url, migrate=False)
    try:
        rep = privacy_report(store, start, end, zone)
    except ValueError as exc:
        print(f"emrwatch report: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)  # a DBAPIError's driver error
        reason = str(orig) if orig is not None else str(exc)
        print(f"emrwatch report: cannot read the alert store {url}: {reason}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.format == "json":
        text = rep.to_json() + "\n"
    elif args.format == "html":
        text = rep.to_html()
    else:
        text = rep.to_text()
    from pipeline.access_report import write_output

    write_output(args.out, text)  # a file is owner-only: the report names staff
    return 0
