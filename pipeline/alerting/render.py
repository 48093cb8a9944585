"""What a notification says, shared by the Slack and e-mail sinks.

Notifications leave the hospital's systems (chat, mail), so they carry ids, never patient
names, and patient ids are masked. The case link lets an authorised reader see the rest in
the feed, where every view is audited.

>>> mask_id("p00123")
'p•••23'
>>> mask_id("p1")
'••'
>>> mask_text("viewed p00123 and p00077", ["p00123", "p00077"])
'viewed p•••23 and p•••77'
>>> case_url("https://feed.example/", "ew-1")
'https://feed.example/cases/ew-1'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from detectors.alerts import retraction_why

SEVERITY_ORDER = ("low", "medium", "high", "critical")
SEVERITY_EMOJI = {
    "low": ":large_blue_circle:",
    "medium": ":large_yellow_circle:",
    "high": ":large_orange_circle:",
    "critical": ":red_circle:",
}
MASK = "•"


def severity_rank(severity: str) -> int:
    """0 (low) .. 3 (critical); an unknown severity counts as high, conservatively."""
    try:
        return SEVERITY_ORDER.index(severity)
    except ValueError:
        return 2


def mask_id(value: str) -> str:
    """Keep the first character and the last two; shorter ids are masked whole."""
    if len(value) < 5:
        return MASK * len(value)
    return value[0] + MASK * (len(value) - 3) + value[-2:]


def mask_text(text: str, ids: Iterable[str]) -> str:
    """Mask every occurrence of the given ids inside free text (longest first)."""
    for pid in sorted({i for i in ids if i}, key=len, reverse=True):
        text = text.replace(pid, mask_id(pid))
    return text


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text from the logs (a user id, a reason)
    that starts like a formula gets a leading quote (OWASP's CSV injection advice);
    numbers and everything else pass unchanged.

    >>> [spreadsheet_safe(v) for v in ("=HYPERLINK(1)", "+1 ward", "-", "-3.5", "ok", 7)]
    ["'=HYPERLINK(1)", "'+1 ward", '-', '-3.5', 'ok', 7]
    """
    if not isinstance(value, str) or len(value) < 2 or value[0] not in "=+-@\t\r":
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def case_url(feed_url: str, alert_id: str) -> str:
    return f"{feed_url.rstrip('/')}/cases/{alert_id}"


def notification_view(alert: dict[str, Any], max_patients: int = 5) -> dict[str, Any]:
    """The slim, masked snapshot an outbox entry carries (nothing more leaves the store)."""
    patients = [str(p) for p in alert.get("patient_ids") or []]
    detector = alert.get("detector") or []
    if isinstance(detector, str):
        detector = [detector]
    return {
        "alert_id": alert["alert_id"],
        "version": int(alert.get("version", 1)),
        "severity": alert.get("severity", "high"),
        "score": float(alert.get("score", 0.0)),
        "status": alert.get("status", "open"),
        "user_id": alert.get("user_id", ""),
        "role": alert.get("role", "") or "unknown role",
        "department_id": alert.get("department_id", "") or "unknown department",
        "detector": list(detector),
        "reason": mask_text(str(alert.get("reason", "")), patients),
        "events": len(alert.get("event_ids") or []),
        "patients": len(patients),
        "patients_masked": [mask_id(p) for p in patients[:max_patients]],
        "first_seen": alert.get("first_seen", ""),
        "last_seen": alert.get("last_seen", ""),
    }


def headline(view: dict[str, Any], event: str, previous: str = "") -> str:
    """One line: what kind of notification this is."""
    sev = view["severity"].upper()
    who = f"{view['user_id']} ({view['role']}, {view['department_id']})"
    if event == "retracted":
        return f"Retracted: privacy alert on {who}: {retraction_why(view.get('reason', ''))}"
    if event == "overdue":
        waited = float(view.get("waited_h", 0.0))
        return f"Still untriaged after {waited:.0f} h: {sev} privacy alert on {who}"
    if event == "escalated":
        was = f" from {previous.upper()}" if previous else ""
        return f"Escalated to {sev}{was}: privacy alert on {who}"
    return f"{sev} privacy alert: {who}"


def evidence_line(view: dict[str, Any]) -> str:
    n, p = view["events"], view["patients"]
    return f"{n} access event{'s' if n != 1 else ''} on {p} patient{'s' if p != 1 else ''}"


def when_line(view: dict[str, Any]) -> str:
    a, b = view.get("first_seen", ""), view.get("last_seen", "")
    if a and b and a != b:
        return f"{a} – {b}"
    return a or b
