"""The ``alerting:`` section of the config file (documented in ``pipeline.alerting``)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from emrwatch.timeutil import zone
from pipeline.alerting.records import RESPONSE_TARGET_H
from pipeline.alerting.render import SEVERITY_ORDER
from pipeline.alerting.slack import SlackRoute
from pipeline.alerting.store import DEFAULT_URL


class AlertingConfigError(ValueError):
    """A setting that cannot be used; the message names the key."""


def _secret(value: str, env: str, key: str) -> str:
    if env:
        v = os.environ.get(env, "")
        if not v:
            raise AlertingConfigError(f"alerting.{key}_env: ${env} is not set")
        return v
    return value


@dataclass(frozen=True)
class SlackSettings:
    token: str = ""
    token_env: str = ""
    base_url: str = "https://slack.com/api/"
    default_channel: str = ""
    routes: tuple[SlackRoute, ...] = ()
    min_severity: str = "medium"
    timeout_s: float = 10.0
    rate_limit_retries: int = 3

    @property
    def enabled(self) -> bool:
        return bool(self.token or self.token_env)

    def resolved_token(self) -> str:
        return _secret(self.token, self.token_env, "slack.token")


@dataclass(frozen=True)
class SmtpSettings:
    host: str = ""
    port: int = 587
    starttls: bool = True
    implicit_tls: bool = False
    username: str = ""
    password: str = ""
    password_env: str = ""
    sender: str = "emrwatch@localhost"
    ca_file: str = ""
    verify: bool = True
    timeout_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    def resolved_password(self) -> str:
        return _secret(self.password, self.password_env, "smtp.password")

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True)
class EmailSettings:
    addresses: dict[str, str] = field(default_factory=dict)
    address_template: str = ""
    always_to: tuple[str, ...] = ()
    min_severity: str = "low"
    immediate_severities: tuple[str, ...] = ("high", "critical")
    #: receive the privacy report (pipeline.alerting.report) of each month once it is over
    report_to: tuple[str, ...] = ()
    report_timezone: str = "Asia/Shanghai"


@dataclass(frozen=True)
class DeliverySettings:
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    poll_interval_s: float = 1.0
    lease_s: float = 60.0
    batch_size: int = 100


@dataclass(frozen=True)
class AlertingConfig:
    store_url: str = DEFAULT_URL
    feed_url: str = "http://127.0.0.1:8080"
    digest_interval_s: float = 3600.0
    #: severity → hours a case may wait untouched (triage state ``new``) before everyone
    #: told about it gets one reminder; 0 or absent: no reminder for that severity
    overdue_after_h: dict[str, float] = field(
        default_factory=lambda: {k: RESPONSE_TARGET_H[k] for k in ("critical", "high")}
    )
    #: hours between two verifications of the audit log's hash chain by the alert
    #: service (pipeline.alerting.chain; a break shows in /metrics); 0: never
    audit_verify_every_h: float = 24.0
    slack: SlackSettings = field(default_factory=SlackSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    email: EmailSettings = field(default_factory=EmailSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)

    @classmethod
    def load(cls, path: str | Path | None) -> AlertingConfig:
        """From the ``alerting:`` section of a YAML file (a file without it: defaults)."""
        if path is None:
            return cls()
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise AlertingConfigError(f"{path}: top level must be a mapping")
        return cls.from_dict(data.get("alerting") or {}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "alerting") -> AlertingConfig:
        data = dict(data)
        sub: dict[str, Any] = {}
        smtp = dict(data.pop("smtp", None) or {})
        if "from" in smtp:
            smtp["sender"] = smtp.pop("from")
        slack = dict(data.pop("slack", None) or {})
        routes = []
        for i, r in enumerate(slack.pop("routes", None) or []):
            r = _check(SlackRoute, dict(r), f"{source}: slack.routes[{i}]")
            routes.append(
                SlackRoute(
                    channel=str(r["channel"]),
                    severities=tuple(r.get("severities") or ()),
                    departments=tuple(r.get("departments") or ()),
                )
            )
        slack["routes"] = tuple(routes)
        sub["slack"] = SlackSettings(**_check(SlackSettings, slack, f"{source}: slack"))
        sub["smtp"] = SmtpSettings(**_check(SmtpSettings, smtp, f"{source}: smtp"))
        email = _check(EmailSettings, dict(data.pop("email", None) or {}), f"{source}: email")
        for k in ("always_to", "immediate_severities", "report_to"):
            if k in email:
                email[k] = tuple(email[k] or ())
        email["addresses"] = {str(k): str(v) for k, v in (email.get("addresses") or {}).items()}
        sub["email"] = EmailSettings(**email)
        sub["delivery"] = DeliverySettings(
            **_check(
                DeliverySettings, dict(data.pop("delivery", None) or {}), f"{source}: delivery"
            )
        )
        if "overdue_after_h" in data:
            over = data["overdue_after_h"]
            if not isinstance(over, dict):
                raise AlertingConfigError(f"{source}: overdue_after_h must map severities to hours")
            data["overdue_after_h"] = {str(k): v for k, v in over.items()}
        cfg = cls(**_check(cls, data, source), **sub)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "alerting") -> None:
        sevs = [self.slack.min_severity, self.email.min_severity, *self.email.immediate_severities]
        for r in self.slack.routes:
            sevs += list(r.severities)
            if not r.channel:
                raise AlertingConfigError(f"{source}: slack.routes: a route needs a channel")
        bad = [s for s in sevs if s not in SEVERITY_ORDER]
        if bad:
            raise AlertingConfigError(f"{source}: unknown severity {bad}; use {SEVERITY_ORDER}")
        if self.slack.enabled and not (self.slack.default_channel or self.slack.routes):
            raise AlertingConfigError(f"{source}: slack needs default_channel or routes")
        if self.smtp.starttls and self.smtp.implicit_tls:
            raise AlertingConfigError(
                f"{source}: smtp: starttls and implicit_tls exclude each other"
            )
        if self.email.address_template and "{user_id}" not in self.email.address_template:
            raise AlertingConfigError(f"{source}: email.address_template needs {{user_id}}")
        if self.smtp.ca_file and not Path(self.smtp.ca_file).is_file():
            raise AlertingConfigError(f"{source}: smtp.ca_file {self.smtp.ca_file} does not exist")
        try:
            zone(self.email.report_timezone)
        except ValueError as exc:
            raise AlertingConfigError(f"{source}: email.report_timezone: {exc}") from None
        for sev, hours in self.overdue_after_h.items():
            if sev not in SEVERITY_ORDER:
                raise AlertingConfigError(
                    f"{source}: overdue_after_h: unknown severity {sev!r}; use {SEVERITY_ORDER}"
                )
            if not isinstance(hours, int | float) or hours < 0:
                raise AlertingConfigError(
                    f"{source}: overdue_after_h.{sev} must be a number of hours >= 0"
                )
        if not isinstance(self.audit_verify_every_h, int | float) or self.audit_verify_every_h < 0:
            raise AlertingConfigError(f"{source}: audit_verify_every_h must be hours >= 0")
        if self.digest_interval_s <= 0 or self.delivery.retry_base_s <= 0:
            raise AlertingConfigError(f"{source}: intervals must be positive")


def _check(cls: Any, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise AlertingConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
    return data


def add_store_arguments(parser: Any, required: bool = True) -> None:
    """``--store URL`` or ``--config FILE`` (its ``alerting.store_url``), for the commands
    that read the alert store."""
    where = parser.add_mutually_exclusive_group(required=required)
    where.add_argument("--store", help="the alert store's URL (sqlite:///… or postgresql://…)")
    where.add_argument(
        "--config", help="the YAML file of emrwatch run / alerts: its alerting.store_url"
    )
