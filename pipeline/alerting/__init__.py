"""Alerts reach people: the alert store, the notification outbox, Slack and e-mail.

:class:`AlertRouter` takes alert dicts (from the alert topic, or from ``replay`` output),
upserts them into the :class:`~pipeline.alerting.store.AlertStore` and, in the same
transaction, writes the notifications they call for into the outbox; a delivery loop
then sends them to Slack and by e-mail, retrying through outages. Feeding the same alerts
twice changes nothing and sends nothing twice (see :mod:`pipeline.alerting.outbox` for
exactly when a notification is due: first sight, severity escalation, retraction).

Configuration: the ``alerting:`` section of the YAML config file. Every key is optional;
unknown keys are an error, so a typo never silently keeps a default. Secrets can come
from the environment (``*_env`` keys) instead of the file::

    alerting:
      store_url: sqlite:///var/lib/emrwatch/alerts.sqlite3
                      # SQLAlchemy URL of the alert store and outbox (one database).
                      # Default sqlite:///emrwatch-alerts.sqlite3 (relative to the working
                      # directory). Production: postgresql://user@host:5432/emrwatch
                      # (postgresql:// and postgres:// use the psycopg 3 driver).
                      # The schema is created/upgraded by Alembic migrations on start-up.
      feed_url: https://emrwatch.hospital.example
                      # base URL of the alert feed; messages link to {feed_url}/cases/{alert_id}
      digest_interval_s: 3600
                      # low/medium e-mails are bundled into one digest per recipient once the
                      # oldest waiting line is this old (default 3600)
      overdue_after_h: {critical: 4, high: 24}
                      # a case still untriaged (state new) this many hours after it arrived
                      # sends one reminder to everyone told about it (0/absent: never)
      audit_verify_every_h: 24
                      # the alert service verifies the audit log's hash chain this often
                      # (pipeline.alerting.chain; a break shows in /metrics); 0: never
      slack:          # Slack is on when token or token_env is set
        token: xoxb-...                 # bot token (chat:write); prefer token_env
        token_env: EMRWATCH_SLACK_TOKEN # name of the environment variable holding the token
        base_url: https://slack.com/api/ # Web API base; must end in /api/ (tests: a local server)
        default_channel: "#privacy-alerts"
                      # used when no route matches (empty: such alerts are not posted)
        routes:       # every matching route's channel gets the message
          - channel: "#privacy-critical"
            severities: [critical]      # empty or absent: any severity
          - channel: "#oncology-privacy"
            departments: [ONC]          # empty or absent: any department
            severities: [high, critical]
        min_severity: medium            # alerts below this are never posted (default medium)
        timeout_s: 10                   # HTTP timeout per request
        rate_limit_retries: 3           # 429s honoured in place (Retry-After) before the
                                        # outbox takes over with its own backoff
      smtp:           # e-mail is on when host is set
        host: smtp.hospital.example
        port: 587                       # 587 STARTTLS (default), 465 implicit TLS
        starttls: true                  # upgrade with STARTTLS before AUTH (default true)
        implicit_tls: false             # TLS from the first byte (port 465); excludes starttls
        username: emrwatch              # AUTH user; empty: no AUTH
        password: ...                   # prefer password_env
        password_env: EMRWATCH_SMTP_PASSWORD
        from: emrwatch@hospital.example # the From address (default emrwatch@localhost)
        ca_file: /etc/emrwatch/smtp-ca.pem  # private CA for the server certificate
        verify: true                    # verify the server certificate (default true)
        timeout_s: 30
      email:
        address_template: "{user_id}@hospital.example"
                      # staff.csv has no addresses: a manager's address is addresses[user_id],
                      # else this template; neither: logged, counted (unaddressable), skipped
        addresses: {u0012: zhang.wei@hospital.example}
        always_to: [privacy-office@hospital.example]
                      # also receive every escalation and digest (default none)
        min_severity: low               # alerts below this are never mailed (default low)
        immediate_severities: [high, critical]
                      # mailed at once; the other severities go into the digest
        report_to: [privacy-office@hospital.example]
                      # the monthly privacy report (pipeline/alerting/report.py), mailed once
                      # per recipient when a month is over (default none)
        report_timezone: Asia/Shanghai  # the hospital's: months are its local months
      delivery:       # the outbox's delivery loop
        retry_base_s: 2                 # first retry after ~2 s, then doubling ...
        retry_max_s: 300                # ... up to 5 minutes; retries never give up
        poll_interval_s: 1              # idle wake-up; new notifications wake it at once
        lease_s: 60                     # an entry being sent is hidden from other workers
                                        # this long (several routers may share one database)
        batch_size: 100

Recipients of e-mail are the suspected user's supervisor (``staff.csv`` ``supervisor_id``)
and their department's head (``departments.csv`` ``head_user_id``), never the user.

Minimal use::

    router = AlertRouter(AlertingConfig.load("emrwatch.yaml"), context=ctx)
    router.start()                     # background delivery
    router.handle(alert_dicts)         # from the alert topic, any number of times
    ...
    router.close()
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, time, timedelta
from time import monotonic as _monotonic
from typing import Any

from detectors.alerts import Alert
from pipeline.alerting.config import (
    AlertingConfig,
    AlertingConfigError,
    DeliverySettings,
    EmailSettings,
    SlackSettings,
    SmtpSettings,
)
from pipeline.alerting.email import EmailSink, recipients_for
from pipeline.alerting.outbox import (
    Decision,
    DeliveryReport,
    Notification,
    Outbox,
    RetryPolicy,
    Sink,
    SinkCounters,
    SinkError,
)
from pipeline.alerting.render import severity_rank
from pipeline.alerting.slack import SlackRoute, SlackSink, route_channels
from pipeline.alerting.store import (
    AlertFilter,
    AlertStore,
    AlertSummary,
    AuditEntry,
    HistoryEntry,
    InvalidTransition,
    Label,
    Page,
    StoredAlert,
    Suppression,
    SuppressionPreview,
    SuppressionSpec,
    UnknownAlert,
    UpsertCounts,
)

__all__ = [
    "AlertFilter",
    "AlertRouter",
    "AlertStore",
    "AlertSummary",
    "AlertingConfig",
    "AlertingConfigError",
    "AuditEntry",
    "DeliveryReport",
    "DeliverySettings",
    "EmailSettings",
    "EmailSink",
    "HistoryEntry",
    "InvalidTransition",
    "Label",
    "Outbox",
    "Page",
    "SinkCounters",
    "SinkError",
    "SlackRoute",
    "SlackSettings",
    "SlackSink",
    "SmtpSettings",
    "StoredAlert",
    "Suppression",
    "SuppressionPreview",
    "SuppressionSpec",
    "UnknownAlert",
    "UpsertCounts",
]

log = logging.getLogger(__name__)
#: how often the delivery loop looks for cases waiting past ``overdue_after_h``
OVERDUE_CHECK_S = 60.0


def build_sinks(config: AlertingConfig) -> dict[str, Sink]:
    """The sinks the config switches on."""
    sinks: dict[str, Sink] = {}
    if config.slack.enabled:
        sinks["slack"] = SlackSink(
            token=config.slack.resolved_token(),
            feed_url=config.feed_url,
            base_url=config.slack.base_url,
            timeout_s=config.slack.timeout_s,
            rate_limit_retries=config.slack.rate_limit_retries,
        )
    if config.smtp.enabled:
        s = config.smtp
        sinks["email"] = EmailSink(
            s.host,
            s.port,
            sender=s.sender,
            feed_url=config.feed_url,
            username=s.username,
            password=s.resolved_password() if s.username else "",
            starttls=s.starttls,
            implicit_tls=s.implicit_tls,
            ssl_context=s.ssl_context(),
            timeout_s=s.timeout_s,
        )
    return sinks


class AlertRouter:
    """Alert versions in; stored, triaged and notified out.

    ``context`` is the hospital :class:`emrwatch.context.Context` (or a callable returning
    the current one, for streaming context that changes) used to find supervisors and
    department heads; without it only ``email.always_to`` is mailed.
    """

    def __init__(
        self,
        config: AlertingConfig | None = None,
        context: Any = None,
        *,
        store: AlertStore | None = None,
        sinks: dict[str, Sink] | None = None,
        clock: Callable[[], datetime] | None = None,
        on_event: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.config = config or AlertingConfig()
        self._context = context
        self.store = store or AlertStore(self.config.store_url, clock=clock)
        self.sinks = build_sinks(self.config) if sinks is None else sinks
        d = self.config.delivery
        self.outbox = Outbox(
            self.store,
            self.sinks,
            retry=RetryPolicy(base_s=d.retry_base_s, max_s=d.retry_max_s),
            lease_s=d.lease_s,
            digest_interval_s=self.config.digest_interval_s,
            batch_size=d.batch_size,
            on_event=on_event,
        )
        self.unaddressable = 0  # managers without a configured address (counted, logged)
        self._reported = ""  # the last month whose report needs nothing more
        self.malformed = 0  # alert records that could not be read
        self._overdue_checked = float("-inf")

    @property
    def context(self) -> Any:
        return self._context() if callable(self._context) else self._context

    @property
    def counters(self) -> dict[str, SinkCounters]:
        """Per-sink delivered / failed / retried / enqueued, for the Prometheus layer."""
        return self.outbox.counters

    # ------------------------------------------------------------------ in
    def handle(self, alerts: Iterable[Alert | dict[str, Any]]) -> UpsertCounts:
        """Store alert versions and enqueue their notifications (one transaction per batch)."""
        counts = self.store.upsert(alerts, hook=self._plan)
        if counts.applied:
            self.outbox.wake()  # after the commit, so the loop sees the new rows
        return counts

    def handle_json_lines(self, lines: Iterable[str | bytes]) -> UpsertCounts:
        """Alerts as JSON lines (``replay --alerts`` output, alert-topic values); a malformed
        line is counted and skipped."""
        batch: list[dict[str, Any]] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict) or not d.get("alert_id"):
                    raise ValueError("not an alert object")
            except ValueError as exc:
                self.malformed += 1
                log.warning("alert line %d skipped: %s", n, exc)
                continue
            batch.append(d)
        return self.handle(batch)

    def _plan(self, conn: Any, changes: list[Any]) -> None:
        for ch in changes:
            self.outbox.plan(conn, ch.alert, self.route)

    def route(self, alert: dict[str, Any], decision: Decision) -> list[Notification]:
        """Targets of a new or escalated alert: Slack channels and manager mailboxes."""
        sev = str(alert.get("severity", "high"))
        dept = str(alert.get("department_id", ""))
        out: list[Notification] = []
        if "slack" in self.sinks:
            s = self.config.slack
            channels = route_channels(s.routes, s.default_channel, s.min_severity, sev, dept)
            # an escalation also reaches the channels that heard about the alert before
            channels += [tg for sk, tg in decision.notified if sk == "slack"]
            for ch in dict.fromkeys(channels):
                out.append(Notification("slack", ch))
        e = self.config.email
        if "email" in self.sinks and severity_rank(sev) >= severity_rank(e.min_severity):
            kind = "message" if sev in e.immediate_severities else "digest_item"
            ctx = self.context
            staff = ctx.staff.get(str(alert.get("user_id", ""))) if ctx is not None else None
            name = staff.display_name if staff is not None else ""
            for r in recipients_for(
                alert, ctx, e.addresses, e.address_template, e.always_to, self._missing
            ):
                out.append(
                    Notification("email", r.address, kind, {"why": r.why, "user_name": name})
                )
        return out

    def _missing(self, _user_id: str) -> None:
        self.unaddressable += 1

    # ------------------------------------------------------------------ out
    def enqueue_reports(self, now: datetime | None = None) -> int:
        """Once a month is over, its privacy report for every ``email.report_to`` address
        (one outbox row each, keyed by the month: never twice, whichever router or restart
        gets there first); returns rows added. Months before the store's first alert are
        not reported (the monitor was not running); a quiet month after it is."""
        e = self.config.email
        if not e.report_to or "email" not in self.sinks:
            return 0
        from zoneinfo import ZoneInfo

        from pipeline.alerting.report import default_period, privacy_report

        start, end = default_period(e.report_timezone, now or self.store.now())
        tag = f"report:{start.isoformat()}"
        if tag == self._reported:  # settled: mailed, or a month before the first alert
            return 0
        if not self.outbox.missing(tag, "email", e.report_to):
            self._reported = tag
            return 0
        first = self.store.first_received()
        month_end = datetime.combine(end, time(), ZoneInfo(e.report_timezone))
        if first is None or first >= month_end:  # stored alerts are stamped now: it stays so
            self._reported = tag
            return 0
        rep = privacy_report(self.store, start, end, e.report_timezone)
        feed = self.config.feed_url.rstrip("/")
        link = f"{feed}/reports?from={start}&to={end}"
        assessment = f"{feed}/reports/assessment?from={start}&to={end}"
        payload = {
            "subject": rep.title,
            "text": f"{rep.to_text()}\nIn the alert feed: {link}\n"
            f"The month's security assessment (for the regulator): {assessment}\n",
            "html": rep.to_html(link, assessment),
        }
        added = self.outbox.enqueue_report(tag, "email", e.report_to, payload)
        if added:
            self.outbox.wake()
        return added

    def enqueue_overdue(self, now: datetime | None = None) -> int:
        """A reminder, once, to everyone told about an open case that has waited untouched
        (triage state ``new``) longer than ``overdue_after_h`` allows for its severity;
        returns rows added."""
        if not self.sinks:
            return 0
        now = now or self.store.clock()
        added = 0
        for sev, hours in self.config.overdue_after_h.items():
            if not hours:
                continue
            for row in self.outbox.overdue(sev, now - timedelta(hours=hours)):
                received = row.received_at.replace(tzinfo=UTC)
                waited_h = (now - received).total_seconds() / 3600
                added += self.outbox.remind(dict(row.payload), waited_h)
        if added:
            self.outbox.wake()
        return added

    def deliver(self, now: datetime | None = None) -> DeliveryReport:
        """One delivery pass (the background loop calls this)."""
        self.enqueue_reports(now)
        self.enqueue_overdue(now)
        return self.outbox.deliver_due(now)

    def flush_digest(self, now: datetime | None = None) -> int:
        """Mail every waiting digest line now, one mail per recipient; returns mails sent."""
        return self.outbox.flush_digest(now)

    def start(self) -> None:
        self.outbox.start(self.config.delivery.poll_interval_s, before=self._tick)

    def _tick(self) -> None:
        try:
            self.enqueue_reports()
        except Exception:  # noqa: BLE001 - a report must never stop alert delivery
            log.exception("monthly privacy report could not be prepared")
        if _monotonic() - self._overdue_checked >= OVERDUE_CHECK_S:
            self._overdue_checked = _monotonic()
            try:
                self.enqueue_overdue()
            except Exception:  # noqa: BLE001 - nor a reminder
                log.exception("overdue reminders could not be prepared")

    def stop(self) -> None:
        self.outbox.stop()

    def close(self) -> None:
        self.stop()
        self.store.close()

    def __enter__(self) -> AlertRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
