"""What the feed's pages show, as plain data: masking, times, the case's timeline.

Masking happens here, on the server, before anything is rendered or sent: a page or an
event stream for a role that may not see patient identifiers never carries them.

>>> short_time("2026-03-02T10:05:09+08:00")
'2026-03-02 10:05'
>>> short_time("2026-03-02T10:05:09+08:00", seconds=True)
'2026-03-02 10:05:09'
>>> Masker(False, ["p00123"]).text("saw p00123 twice")
'saw p•••23 twice'
>>> Masker(True, ["p00123"]).id("p00123")
'p00123'
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from detectors.alerts import retraction_why
from detectors.explain import REASONS
from pipeline.alerting.records import (
    RESPONSE_TARGET_H,
    TRANSITIONS,
    AlertSummary,
    HistoryEntry,
    StoredAlert,
)
from pipeline.alerting.render import mask_id, mask_text

MAX_TIMELINE_ROWS = 500  # evidence rows listed on the case page (all are counted)
STATE_LABELS = {
    "new": "New",
    "acknowledged": "Acknowledged",
    "investigating": "Investigating",
    "closed_confirmed": "Closed: confirmed misuse",
    "closed_benign": "Closed: benign",
}
#: triage buttons: action → (target state, label); closing from ``acknowledged`` passes
#: through ``investigating`` (the store's workflow), which the history shows
ACTIONS = {
    "acknowledge": ("acknowledged", "Acknowledge"),
    "investigate": ("investigating", "Start investigation"),
    "close_confirmed": ("closed_confirmed", "Close: confirmed misuse"),
    "close_benign": ("closed_benign", "Close: benign"),
    "reopen": ("investigating", "Re-open"),
}


def short_time(iso: str, seconds: bool = False) -> str:
    """An ISO time as the hospital wrote it (its own offset), for reading."""
    if not iso:
        return ""
    try:
        dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    return dt.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def time_range(first: str, last: str) -> str:
    """``first → last``, the date written once when both fall on the same day.

    >>> time_range("2026-03-02T10:00:00+08:00", "2026-03-02T10:05:09+08:00")
    '2026-03-02 10:00:00 → 10:05:09'
    """
    a, b = short_time(first, seconds=True), short_time(last, seconds=True)
    if not a or not b or a == b:
        return a or b
    if a[:10] == b[:10]:
        return f"{a} → {b[11:]}"
    return f"{a} → {b}"


def _epoch(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


class Masker:
    """Patient identifiers as this reader may see them."""

    def __init__(self, unmasked: bool, patient_ids: Iterable[str]) -> None:
        self.unmasked = unmasked
        self.patient_ids = [str(p) for p in patient_ids if p]

    def id(self, pid: str) -> str:
        return pid if self.unmasked or not pid else mask_id(pid)

    def text(self, text: str) -> str:
        return text if self.unmasked else mask_text(text, self.patient_ids)


@dataclass(frozen=True)
class Row:
    """One feed row."""

    alert_id: str
    severity: str
    score: float
    user_id: str
    role: str
    department_id: str
    detectors: list[str]
    reason: str
    first_seen: str
    last_seen: str
    last_seen_iso: str
    n_events: int
    n_patients: int
    status: str
    state: str
    state_label: str
    assignee: str
    version: int
    received_iso: str = ""  # when the store first had it (UTC)
    target_h: float = 0.0  # hours it may wait for a first triage step
    late_h: int | None = None  # hours waited untouched, once past target_h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def row(
    s: AlertSummary, patient_ids: Iterable[str], unmasked: bool, now: datetime | None = None
) -> Row:
    m = Masker(unmasked, patient_ids)
    return Row(
        alert_id=s.alert_id,
        severity=s.severity,
        score=s.score,
        user_id=s.user_id,
        role=s.role,
        department_id=s.department_id,
        detectors=list(s.detectors),
        reason=m.text(s.reason),
        first_seen=short_time(s.first_seen),
        last_seen=short_time(s.last_seen),
        last_seen_iso=s.last_seen,
        n_events=s.n_events,
        n_patients=s.n_patients,
        status=s.status,
        state=s.state,
        state_label=STATE_LABELS.get(s.state, s.state),
        assignee=s.assignee or "",
        version=s.version,
        received_iso=s.received_at.isoformat(timespec="seconds") if s.received_at else "",
        target_h=RESPONSE_TARGET_H.get(s.severity, RESPONSE_TARGET_H["low"]),
        late_h=s.late_h(now or datetime.now(UTC)),
    )


def case(
    stored: StoredAlert, unmasked: bool, max_rows: int | None = MAX_TIMELINE_ROWS
) -> dict[str, Any]:
    """Everything the case page shows about one alert, masked for the reader (the evidence
    timeline cut at ``max_rows``; None: all of it)."""
    al = stored.alert
    evidence = list(al.get("evidence") or [])
    pids = list(al.get("patient_ids") or []) + [str(e.get("patient_id") or "") for e in evidence]
    m = Masker(unmasked, pids)
    findings = [
        {
            "rule": f.get("rule", ""),
            "title": f.get("title") or f.get("rule", ""),
            "level": f.get("level", ""),
            "events": f.get("events"),
            "patients": f.get("patients"),
            "reason": m.text(str(f.get("reason") or "")),
        }
        for f in al.get("findings") or []
    ]
    explanations = [
        {"code": c, "text": REASONS.get(c, c.replace("_", " "))}
        for c in al.get("explanations_checked") or []
    ]
    times = [_epoch(str(e.get("ts") or "")) for e in evidence]
    known = [x for x in times if x is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 0.0)
    span = hi - lo
    timeline: list[dict[str, Any]] = []
    for e, x in zip(evidence, times, strict=True):
        timeline.append(
            {
                "event_id": str(e.get("event_id") or ""),
                "ts": str(e.get("ts") or ""),
                "time": short_time(str(e.get("ts") or ""), seconds=True),
                "patient": m.id(str(e.get("patient_id") or "")),
                "action": str(e.get("action") or ""),
                "resource_type": str(e.get("resource_type") or ""),
                "workstation": str(e.get("workstation") or ""),
                "rules": [str(r) for r in e.get("rules") or []],
                # where on the strip between the first and the last event (percent)
                "at": 50.0 if x is None or span <= 0 else round(100 * (x - lo) / span, 2),
            }
        )
    rules = list(dict.fromkeys(r for e in timeline for r in e["rules"]))
    return {
        "alert_id": stored.alert_id,
        "version": stored.version,
        "severity": al.get("severity", "high"),
        "score": float(al.get("score") or 0.0),
        "risk": float(al.get("risk") or 0.0),
        "user_id": al.get("user_id", ""),
        "role": al.get("role", "") or "unknown role",
        "department_id": al.get("department_id", "") or "unknown department",
        "detectors": list(al.get("detector") or []),
        "status": al.get("status", "open"),
        "reason": m.text(str(al.get("reason") or "")),
        "retracted_why": m.text(retraction_why(str(al.get("reason") or ""))),
        "when": time_range(str(al.get("first_seen") or ""), str(al.get("last_seen") or "")),
        "findings": findings,
        "explanations": explanations,
        "patients": [m.id(str(p)) for p in al.get("patient_ids") or []],
        "n_events": len(al.get("event_ids") or []),
        "event_ids": [str(e) for e in al.get("event_ids") or []] if not evidence else [],
        "timeline": timeline[:max_rows] if max_rows is not None else timeline,
        "timeline_total": len(timeline),
        "timeline_rules": rules,
        "model_versions": dict(al.get("model_versions") or {}),
        "state": stored.state,
        "state_label": STATE_LABELS.get(stored.state, stored.state),
        "assignee": stored.assignee or "",
        "verdict": stored.verdict or "",
        "decided_by": stored.decided_by or "",
        "decided_at": stored.decided_at.strftime("%Y-%m-%d %H:%M UTC") if stored.decided_at else "",
        "received_at": stored.received_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "unmasked": unmasked,
    }


def actions_for(state: str) -> list[tuple[str, str]]:
    """The triage buttons a case in ``state`` offers: (action, label)."""
    nxt = set(TRANSITIONS.get(state, ()))
    out = []
    for action, (to, label) in ACTIONS.items():
        reopening = state.startswith("closed_")
        if action == "reopen" and not reopening:
            continue
        if action == "investigate" and reopening:
            continue
        closing = to.startswith("closed_")
        if to in nxt or (closing and state == "acknowledged"):
            out.append((action, label))
    return out


def history(entries: list[HistoryEntry]) -> list[dict[str, Any]]:
    return [
        {
            "at": e.at.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "actor": e.actor,
            "from": STATE_LABELS.get(e.from_state, e.from_state),
            "to": STATE_LABELS.get(e.to_state, e.to_state),
            "changed": e.from_state != e.to_state,
            "assignee": e.assignee,
            "note": e.note,
        }
        for e in reversed(entries)
    ]


def sign_in_notice(entries: Iterable[Any], tz: Any) -> tuple[str, str] | None:
    """What a user is told when they sign in: their previous sign-in (when, from where)
    and the failed sign-ins under their name since, so they notice someone else using or
    guessing their account. ``entries``: their audit entries, newest first, this sign-in
    not among them. None before their first sign-in with nothing failed.

    >>> from types import SimpleNamespace as E
    >>> at = datetime(2026, 3, 2, 1, 14, tzinfo=UTC)
    >>> ok = E(action="login", at=at, detail='{"address": "10.1.2.3"}')
    >>> sign_in_notice([ok], UTC)
    ('info', 'Your last sign-in: 2026-03-02 01:14 from 10.1.2.3.')
    >>> bad = E(action="login.failed", at=at, detail='{"address": "198.51.100.7"}')
    >>> sign_in_notice([bad, bad, ok], UTC)[0]
    'warn'
    >>> sign_in_notice([bad, bad, ok], UTC)[1].split(". ", 1)[1]
    '2 failed sign-ins under your name since then (from 198.51.100.7): if they were not yours, tell the privacy office.'
    """
    failed: list[str] = []
    last = None
    for e in entries:
        if e.action == "login":
            last = e
            break
        if e.action == "login.failed":
            failed.append(str(audit_detail(e.detail).get("address") or "?"))
    text = ""
    if last is not None:
        where = audit_detail(last.detail).get("address")
        when = last.at.astimezone(tz).strftime("%Y-%m-%d %H:%M")
        text = f"Your last sign-in: {when}" + (f" from {where}." if where else ".")
    if failed:
        n = len(failed)
        addresses = ", ".join(dict.fromkeys(failed))
        since = "since then" if last is not None else "before this one"
        text += (
            f"{' ' if text else ''}{n} failed sign-in{'s' if n > 1 else ''} under your name "
            f"{since} (from {addresses}): if they were not yours, tell the privacy office."
        )
        return "warn", text
    return ("info", text) if text else None


def audit_detail(text: str) -> dict[str, Any]:
    """An audit entry's detail as a mapping ({} when it is not a JSON object)."""
    try:
        d = json.loads(text) if text else {}
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}
