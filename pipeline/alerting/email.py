"""E-mail escalation: the "notify higher-level managers" duty.

Each alert goes to the suspected user's **supervisor** (``staff.csv`` ``supervisor_id``) and
the **head of their department** (``departments.csv`` ``head_user_id``), never to the user,
plus any fixed addresses (a privacy office). ``staff.csv`` holds no e-mail addresses, so
they come from config: an explicit ``addresses`` mapping, else ``address_template``
(``"{user_id}@hospital.example"``); a manager with neither is logged and counted, not mailed.

High and critical alerts are mailed at once; low and medium ones wait for the digest (one
mail per recipient per ``digest_interval_s``). Mail goes over SMTP with STARTTLS (or
implicit TLS) and AUTH; certificates are verified (``ca_file`` for a private CA).
Each mail carries a ``Message-ID`` derived from its outbox key, so a resend after a crash
is recognisably the same mail.
"""

from __future__ import annotations

import hashlib
import logging
import smtplib
import ssl
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from pipeline.alerting.outbox import OutboxEntry, SinkError
from pipeline.alerting.render import (
    SEVERITY_ORDER,
    case_url,
    evidence_line,
    headline,
    severity_rank,
    when_line,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipient:
    address: str
    why: str  # "supervisor of u0001", "head of ORTH", "privacy office"
    user_id: str = ""


def address_for(user_id: str, addresses: Mapping[str, str], template: str) -> str | None:
    """A staff member's mail address from config.

    >>> address_for("u1", {"u1": "a@x"}, "{user_id}@h.example"), address_for("u2", {}, "{user_id}@h.example")
    ('a@x', 'u2@h.example')
    >>> address_for("u3", {}, "") is None
    True
    """
    if user_id in addresses:
        return addresses[user_id]
    if template:
        return template.format(user_id=user_id)
    return None


def managers_of(alert: Mapping[str, Any], context: Any) -> list[tuple[str, str]]:
    """(manager user id, why) for an alert: supervisor and department head, not the user."""
    user_id = str(alert.get("user_id", ""))
    out: list[tuple[str, str]] = []
    if context is None:
        return out
    staff = context.staff.get(user_id)
    dept = (staff.department_id if staff else "") or str(alert.get("department_id", ""))
    if staff is not None and staff.supervisor_id:
        out.append((staff.supervisor_id, f"supervisor of {user_id}"))
    d = context.departments.get(dept) if dept else None
    if d is not None and d.head_user_id:
        out.append((d.head_user_id, f"head of {dept}"))
    return [(m, why) for m, why in out if m and m != user_id]


def recipients_for(
    alert: Mapping[str, Any],
    context: Any,
    addresses: Mapping[str, str],
    template: str,
    always_to: Sequence[str] = (),
    on_missing: Any = None,
) -> list[Recipient]:
    """Deduplicated recipients (one address may be supervisor *and* head)."""
    by_addr: dict[str, Recipient] = {}
    for uid, why in managers_of(alert, context):
        addr = address_for(uid, addresses, template)
        if not addr:
            log.warning("no e-mail address for %s (%s); configure email.addresses", uid, why)
            if on_missing is not None:
                on_missing(uid)
            continue
        prev = by_addr.get(addr)
        by_addr[addr] = Recipient(addr, f"{prev.why} and {why}" if prev else why, uid)
    for addr in always_to:
        by_addr.setdefault(addr, Recipient(addr, "privacy office"))
    return list(by_addr.values())


def _message_id(key: str) -> str:
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@emrwatch>"


def render_alert_mail(payload: Mapping[str, Any], event: str, feed_url: str) -> tuple[str, str]:
    """(subject, plain-text body) for one alert."""
    v = payload["alert"]
    title = headline(v, event, payload.get("previous_severity", ""))
    who = v["user_id"] + (f" ({payload['user_name']})" if payload.get("user_name") else "")
    lines = [
        f"You receive this as {payload.get('why', 'a manager')}.",
        "",
        title,
        "",
        f"Severity:    {v['severity'].upper()} (score {v['score']:.2f})",
        f"User:        {who}",
        f"Role:        {v['role']}",
        f"Department:  {v['department_id']}",
        f"When:        {when_line(v)}",
        f"Evidence:    {evidence_line(v)}",
        f"Patients:    {', '.join(v['patients_masked']) or '-'} (masked)",
        f"Rules:       {', '.join(v['detector'])}",
        "",
        "What happened and why it was not explained:",
        f"  {v['reason']}",
        "",
        f"Open the case (login required; every view is audited): {case_url(feed_url, v['alert_id'])}",
        "",
        f"Case {v['alert_id']}, version {v['version']}. Patient details are deliberately",
        "left out of this mail; please do not forward it outside the hospital.",
    ]
    return f"[emrwatch] {title}", "\n".join(lines) + "\n"


def render_digest_mail(items: Sequence[Mapping[str, Any]], feed_url: str) -> tuple[str, str]:
    """(subject, body) for a digest of low/medium alerts to one recipient."""
    sev = Counter(i["alert"]["severity"] for i in items)
    parts = ", ".join(f"{sev[s]} {s}" for s in reversed(SEVERITY_ORDER) if sev[s])
    n = len(items)
    subject = f"[emrwatch] Digest: {n} privacy alert{'s' if n != 1 else ''} ({parts})"
    lines = [
        f"{n} lower-severity privacy alert{'s' if n != 1 else ''} since the last digest.",
        "High and critical alerts are mailed at once and are not repeated here.",
        "",
    ]
    ordered = sorted(
        items, key=lambda i: (-severity_rank(i["alert"]["severity"]), i["alert"]["last_seen"])
    )
    for i, it in enumerate(ordered, 1):
        v = it["alert"]
        lines += [
            f"{i}. {v['severity'].upper()}: {v['user_id']} ({v['role']}, {v['department_id']})"
            f" — you receive this as {it.get('why', 'a manager')}",
            f"   {when_line(v)}; {evidence_line(v)}",
            f"   {v['reason']}",
            f"   {case_url(feed_url, v['alert_id'])}",
            "",
        ]
    lines.append("Patient details are deliberately left out of this mail.")
    return subject, "\n".join(lines) + "\n"


class EmailSink:
    """Sends outbox entries over SMTP (a fresh connection per mail: escalations are rare)."""

    name = "email"

    def __init__(
        self,
        host: str,
        port: int = 587,
        *,
        sender: str,
        feed_url: str,
        username: str = "",
        password: str = "",
        starttls: bool = True,
        implicit_tls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if starttls and implicit_tls:
            raise ValueError("choose STARTTLS or implicit TLS, not both")
        self.host, self.port = host, port
        self.sender, self.feed_url = sender, feed_url
        self.username, self.password = username, password
        self.starttls, self.implicit_tls = starttls, implicit_tls
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.timeout_s = timeout_s

    def build(self, entry: OutboxEntry) -> EmailMessage:
        html_body = ""
        if entry.kind == "digest":
            subject, body = render_digest_mail(entry.payload["items"], self.feed_url)
        elif entry.kind == "report":  # rendered whole by pipeline.alerting.report
            subject, body, html_body = (entry.payload[k] for k in ("subject", "text", "html"))
        else:
            subject, body = render_alert_mail(entry.payload, entry.event, self.feed_url)
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = entry.target
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = _message_id(entry.key)
        msg["Auto-Submitted"] = "auto-generated"
        if entry.alert_id:
            msg["X-Emrwatch-Alert"] = entry.alert_id
        msg.set_content(body)
        if html_body:
            msg.add_alternative(html_body, subtype="html")
        return msg

    def send(self, entry: OutboxEntry) -> None:
        msg = self.build(entry)
        try:
            if self.implicit_tls:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.timeout_s, context=self.ssl_context
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout_s)
            with smtp:
                smtp.ehlo()
                if self.starttls:
                    smtp.starttls(context=self.ssl_context)
                    smtp.ehlo()
                if self.username:
                    smtp.login(self.username, self.password)
                refused = smtp.send_message(msg)
                if refused:
                    raise SinkError(f"smtp refused {sorted(refused)}")
        except SinkError:
            raise
        except smtplib.SMTPResponseException as exc:
            raise SinkError(f"smtp {exc.smtp_code} {exc.smtp_error!r}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise SinkError(f"smtp {self.host}:{self.port}: {exc}") from exc
