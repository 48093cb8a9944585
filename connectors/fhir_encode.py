"""Canonical event → FHIR R4 AuditEvent (the inverse of :mod:`connectors.fhir`).

Used by the simulator and by tests: whatever we write, our own parser must read back
to the same canonical event. An access is a RESTful operation (``type`` ``rest``); an
authentication or security-alert event (``event_category``) gets the DICOM event type
that :mod:`connectors.atna`'s encoder writes too (110114 User Authentication, 110113
Security Alert).

>>> from emrwatch.events import AccessEvent
>>> login = AccessEvent.from_dict({"event_id": "l1", "ts": "2026-03-01T08:00:00Z",
...     "user_id": "dr7", "action": "execute", "event_category": "authentication"})
>>> res = to_audit_event(login)
>>> res["type"]["code"], res["entity"]
('110114', [])
"""

from __future__ import annotations

from typing import Any

from connectors.audit_codes import ACTION_OUT, CATEGORY_OUT, DCM_SYSTEM, EMERGENCY_PURPOSES
from emrwatch.events import AccessEvent

_SUBTYPE = {
    "create": "create",
    "view": "read",
    "query": "search",
    "update": "update",
    "delete": "delete",
    "print": "print",
    "export": "export",
    "copy": "copy",
    "forward": "forward",
}
_REST = "http://hl7.org/fhir/restful-interaction"
_BALP = "http://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
_REST_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}


def to_audit_event(e: AccessEvent) -> dict[str, Any]:
    """One FHIR R4 AuditEvent resource for one access."""
    sub = _SUBTYPE.get(e.action)
    category = CATEGORY_OUT.get(e.event_category)
    res: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": e.event_id,
        "type": (
            dict(_REST_TYPE)
            if category is None
            else {"system": DCM_SYSTEM, "code": category[0], "display": category[1]}
        ),
        "action": ACTION_OUT.get(e.action, "E"),
        "recorded": e.ts,
        "outcome": "0" if e.outcome == "success" else "4",
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                            "code": "PROV",
                        }
                    ]
                },
                "who": {"identifier": {"value": e.user_id}},
                "requestor": True,
                **({"network": {"address": e.workstation, "type": "2"}} if e.workstation else {}),
            }
        ],
        "source": {"observer": {"display": e.source or "emr"}},
        "entity": [],
    }
    if sub:
        rest = sub in ("create", "read", "search", "update", "delete")
        res["subtype"] = [{"system": _REST if rest else "urn:emrwatch:subtype", "code": sub}]
    codes = [e.purpose] if e.purpose else []
    if e.emergency and not EMERGENCY_PURPOSES & set(codes):
        codes.append("BTG")
    if codes:
        res["purposeOfUse"] = [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": c}
                ]
            }
            for c in codes
        ]
    if e.patient_id:
        res["entity"].append(
            {
                "what": {"reference": f"Patient/{e.patient_id}"},
                "type": {"system": _BALP, "code": "1"},
                "role": {"code": "1"},
            }
        )
    if e.resource_type and e.resource_type != "Patient":
        res["entity"].append(
            {
                "what": {"reference": f"{e.resource_type}/{e.event_id}-r"},
                "type": {"system": _BALP, "code": "2"},
                "role": {"code": "4"},
            }
        )
    if e.encounter_id:
        res["entity"].append(
            {"what": {"reference": f"Encounter/{e.encounter_id}"}, "role": {"code": "3"}}
        )
    return res
