"""Slack sink: one Block Kit message per outbox entry, through slack-sdk's ``WebClient``.

A message says how severe, who (user id, role, department — never a name, and patient ids
only masked), what and why (the alert's reason), how much evidence, and links to the case
in the feed (``{feed_url}/cases/{alert_id}``), where the rest is behind login and audit.
``text`` is always sent too: it is the notification and screen-reader fallback.

Rate limits: slack-sdk's ``RateLimitErrorRetryHandler`` sleeps for ``Retry-After`` and
retries transparently (``rate_limit_retries`` times); a 429 that outlasts that, a 5xx, a
network error or an ``ok: false`` answer raises :class:`SinkError`, and the outbox retries
with backoff (no sooner than ``Retry-After``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from pipeline.alerting.outbox import OutboxEntry, SinkError
from pipeline.alerting.render import (
    SEVERITY_EMOJI,
    case_url,
    evidence_line,
    headline,
    severity_rank,
    when_line,
)


@dataclass(frozen=True)
class SlackRoute:
    """Alerts of these severities (empty: any) from these departments (empty: any) go to
    ``channel``."""

    channel: str
    severities: tuple[str, ...] = ()
    departments: tuple[str, ...] = ()

    def matches(self, severity: str, department_id: str) -> bool:
        return (not self.severities or severity in self.severities) and (
            not self.departments or department_id in self.departments
        )


def route_channels(
    routes: Sequence[SlackRoute],
    default_channel: str,
    min_severity: str,
    severity: str,
    department_id: str,
) -> list[str]:
    """Every matching route's channel; the default channel when none matches.

    >>> r = [SlackRoute("#crit", ("critical",)), SlackRoute("#onc", (), ("ONC",))]
    >>> route_channels(r, "#alerts", "medium", "critical", "ONC")
    ['#crit', '#onc']
    >>> route_channels(r, "#alerts", "medium", "high", "ORTH")
    ['#alerts']
    >>> route_channels(r, "#alerts", "medium", "low", "ONC")
    []
    """
    if severity_rank(severity) < severity_rank(min_severity):
        return []
    out = [r.channel for r in routes if r.matches(severity, department_id)]
    if not out and default_channel:
        out = [default_channel]
    return list(dict.fromkeys(out))


def _esc(text: str) -> str:
    """Slack mrkdwn control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def build_message(
    view: dict[str, Any], event: str, feed_url: str, previous_severity: str = ""
) -> tuple[str, list[dict[str, Any]]]:
    """(``text``, ``blocks``) for one alert notification."""
    url = case_url(feed_url, view["alert_id"])
    title = headline(view, event, previous_severity)
    emoji = (
        ":white_check_mark:" if event == "retracted" else SEVERITY_EMOJI.get(view["severity"], "")
    )
    text = f"{title}. {view['reason']} ({evidence_line(view)}) {url}"
    patients = ", ".join(view["patients_masked"])
    if view["patients"] > len(view["patients_masked"]):
        patients += f" and {view['patients'] - len(view['patients_masked'])} more"
    fields = [
        f"*Severity*\n{view['severity'].upper()} (score {view['score']:.2f})",
        f"*User*\n`{_esc(view['user_id'])}`",
        f"*Role*\n{_esc(view['role'])}",
        f"*Department*\n{_esc(view['department_id'])}",
        f"*Evidence*\n{evidence_line(view)}",
        f"*Patients (masked)*\n{_esc(patients) or '—'}",
    ]
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": f"{title}"[:150], "emoji": True},
        },
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"{emoji} *What and why:* {_esc(view['reason'])}"[:3000],
            },
        },
        {
            "type": "actions",
            "elements": [
                {
                    "type": "button",
                    "text": {"type": "plain_text", "text": "Open case"},
                    "url": url,
                    "action_id": "open_case",
                    **({"style": "danger"} if view["severity"] == "critical" else {}),
                }
            ],
        },
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": (
                        f"{_esc(when_line(view))} · rules: {_esc(', '.join(view['detector']))}"
                        f" · case `{view['alert_id']}` v{view['version']}"
                    ),
                }
            ],
        },
    ]
    return text, blocks


class SlackSink:
    """Posts outbox entries with ``chat.postMessage``."""

    name = "slack"

    def __init__(
        self,
        token: str,
        feed_url: str,
        base_url: str = "https://slack.com/api/",
        timeout_s: float = 10.0,
        rate_limit_retries: int = 3,
        client: WebClient | None = None,
    ) -> None:
        if not base_url.endswith("/"):
            base_url += "/"
        self.feed_url = feed_url
        self.client = client or WebClient(
            token=token,
            base_url=base_url,
            timeout=int(max(1, timeout_s)),
            retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=rate_limit_retries)],
        )

    def send(self, entry: OutboxEntry) -> None:
        view = entry.payload["alert"]
        text, blocks = build_message(
            view, entry.event, self.feed_url, entry.payload.get("previous_severity", "")
        )
        try:
            self.client.chat_postMessage(
                channel=entry.target,
                text=text,
                blocks=blocks,
                unfurl_links=False,
                unfurl_media=False,
            )
        except SlackApiError as exc:
            resp = exc.response
            status = getattr(resp, "status_code", 0)
            retry_after = None
            if status == 429:
                headers = {k.lower(): v for k, v in (getattr(resp, "headers", {}) or {}).items()}
                ra = headers.get("retry-after")
                if isinstance(ra, list):
                    ra = ra[0] if ra else None
                try:
                    retry_after = float(ra) if ra is not None else None
                except ValueError:
                    retry_after = None
            err = (resp.get("error") if hasattr(resp, "get") else None) or f"HTTP {status}"
            raise SinkError(f"slack {entry.target}: {err}", retry_after=retry_after) from exc
