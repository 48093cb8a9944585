"""The alert (CONTRACTS §4): one case, its evidence and its explanation."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("low", "medium", "high", "critical")
#: what a retracted alert's reason ends with, before why it was retracted
RETRACTED_MARK = "retracted: "
#: why, when a reason does not say
RETRACTED_WHY = "later documentation or the case model explained the accesses"


def retraction_why(reason: str) -> str:
    """Why a retracted alert was retracted, from its reason (the detectors append it)."""
    _, mark, why = reason.rpartition(RETRACTED_MARK)
    return why.strip() if mark and why.strip() else RETRACTED_WHY


def alert_id_for(user_id: str, first_event_id: str) -> str:
    """Stable id: a case is identified by its user and the first event that opened it, so a
    replay or a redelivery of the same evidence yields the same id."""
    h = hashlib.sha256(f"{user_id}\x1f{first_event_id}".encode()).hexdigest()
    return f"ew-{h[:24]}"


@dataclass
class Alert:
    alert_id: str
    detector: list[str]
    severity: str
    score: float
    user_id: str
    patient_ids: list[str]
    event_ids: list[str]
    first_seen: str
    last_seen: str
    reason: str
    # additions to the contract, for triage
    department_id: str = ""
    role: str = ""
    risk: float = 0.0
    version: int = 1
    #: "retracted" when documentation, the case model or a clock found wrong took back
    #: enough of the evidence (the reason ends with why: retraction_why)
    status: str = "open"
    findings: list[dict[str, Any]] = field(default_factory=list)
    explanations_checked: list[str] = field(default_factory=list)
    model_versions: dict[str, str] = field(default_factory=dict)
    #: one entry per evidence event (time, patient, action, resource, workstation, rules), for
    #: the case timeline; ``event_ids`` stays the contract's list
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)
