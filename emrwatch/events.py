"""The canonical access event (CONTRACTS §3) and its JSON form.

Every connector produces :class:`AccessEvent`; every detector consumes it.

>>> e = AccessEvent.from_dict({"event_id": "e1", "ts": "2026-03-01T08:00:00+08:00",
...     "user_id": "u1", "patient_id": "p1", "action": "view"})
>>> e.t
1772323200.0
>>> e.outcome, e.emergency
('success', False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ACTIONS = frozenset(
    {"create", "view", "update", "delete", "execute", "query", "print", "export", "copy", "forward"}
)
#: actions that write clinical data: they are evidence of a care relationship.
WRITE_ACTIONS = frozenset({"create", "update"})
#: actions that take data out of the record system.
EXFIL_ACTIONS = frozenset({"print", "export", "copy", "forward"})

CANONICAL_FIELDS = (
    "event_id",
    "ts",
    "user_id",
    "patient_id",
    "action",
    "resource_type",
    "workstation",
    "outcome",
    "emergency",
    "purpose",
    "source",
)

_TRUE = frozenset({"1", "true", "yes", "y", "t"})


class EventError(ValueError):
    """A record that cannot become a canonical event. The message says why."""


def parse_ts(value: str) -> float:
    """ISO 8601 with a UTC offset → POSIX seconds. A missing offset is an error: access
    logs without a zone are ambiguous and would shift every shift check."""
    try:
        dt = datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise EventError(f"bad timestamp {value!r}") from exc
    if dt.tzinfo is None:
        raise EventError(f"timestamp {value!r} has no UTC offset")
    return dt.timestamp()


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    return str(value).strip().lower() in _TRUE


@dataclass(slots=True)
class AccessEvent:
    """One access to one patient's record by one account."""

    event_id: str
    ts: str
    t: float  # POSIX seconds of ``ts``
    user_id: str
    patient_id: str
    action: str
    resource_type: str = "Patient"
    workstation: str = ""
    outcome: str = "success"
    emergency: bool = False
    purpose: str = ""
    source: str = ""
    encounter_id: str = ""
    event_category: str = "access"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], t: float | None = None) -> AccessEvent:
        """Build from a canonical JSON object / CSV row; raise :class:`EventError` if unusable.

        ``t`` skips re-parsing ``ts`` when the caller already has it."""
        try:
            event_id = d["event_id"]
            ts = d["ts"]
            user_id = d["user_id"]
        except KeyError as exc:
            raise EventError(f"missing required field {exc.args[0]!r}") from None
        if not event_id or not user_id or not ts:
            raise EventError("event_id, ts and user_id must be non-empty")
        action = (d.get("action") or "view").lower()
        if action not in ACTIONS:
            raise EventError(f"unknown action {action!r}")
        outcome = str(d.get("outcome") or "success").lower()
        if outcome not in ("success", "failure"):
            raise EventError(f"unknown outcome {outcome!r}")
        known = {k: d[k] for k in d if k not in _KNOWN}
        return cls(
            event_id=str(event_id),
            ts=str(ts),
            t=parse_ts(str(ts)) if t is None else t,
            user_id=str(user_id),
            patient_id=str(d.get("patient_id") or ""),
            action=action,
            resource_type=str(d.get("resource_type") or "Patient"),
            workstation=str(d.get("workstation") or ""),
            outcome=outcome,
            emergency=as_bool(d.get("emergency")),
            purpose=str(d.get("purpose") or ""),
            source=str(d.get("source") or ""),
            encounter_id=str(d.get("encounter_id") or ""),
            event_category=str(d.get("event_category") or "access"),
            extra=known,
        )

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON object (CONTRACTS §3), extras included."""
        d: dict[str, Any] = {
            "event_id": self.event_id,
            "ts": self.ts,
            "user_id": self.user_id,
            "patient_id": self.patient_id,
            "action": self.action,
            "resource_type": self.resource_type,
            "workstation": self.workstation,
            "outcome": self.outcome,
            "emergency": self.emergency,
            "purpose": self.purpose,
            "source": self.source,
        }
        if self.encounter_id:
            d["encounter_id"] = self.encounter_id
        if self.event_category != "access":
            d["event_category"] = self.event_category
        if self.extra:
            d.update(self.extra)
        return d


_KNOWN = frozenset(CANONICAL_FIELDS) | {"encounter_id", "event_category", "t"}
