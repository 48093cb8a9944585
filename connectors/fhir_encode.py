"""Canonical event → FHIR R4 AuditEvent (the inverse of :mod:`connectors.fhir`).

Used by the simulator and by tests: whatever we write, our own parser must read back
to the same canonical event.
"""

from __future__ import annotations

from typing import Any

from emrwatch.events import AccessEvent

_ACTION_CODE = {
    "create": "C", "view": "R", "query": "E", "update": "U", "delete": "D", "execute": "E",
    "print": "R", "export": "R", "copy": "R", "forward": "R",
}
_SUBTYPE = {
    "create": "create", "view": "read", "query": "search", "update": "update", "delete": "delete",
    "print": "print", "export": "export", "copy": "copy", "forward": "forward",
}
_REST = "http://hl7.org/fhir/restful-interaction"
_BALP = "http://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"


def to_audit_event(e: AccessEvent) -> dict[str, Any]:
    """One FHIR R4 AuditEvent resource for one access."""
    sub = _SUBTYPE.get(e.action)
    res: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": e.event_id,
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "action": _ACTION_CODE.get(e.action, "E"),
        "recorded": e.ts,
        "outcome": "0" if e.outcome == "success" else "4",
        "agent": [
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass", "code": "PROV"}]},
                "who": {"identifier": {"value": e.user_id}},
                "requestor": True,
                **({"network": {"address": e.workstation, "type": "2"}} if e.workstation else {}),
            }
        ],
        "source": {"observer": {"display": e.source or "emr"}},
        "entity": [],
    }
    if sub:
        sys = _REST if sub in ("create", "read", "search", "update", "delete") else "urn:emrwatch:subtype"
        res["subtype"] = [{"system": sys, "code": sub}]
    codes = [e.purpose] if e.purpose else []
    if e.emergency and not {"ETREAT", "BTG"} & set(codes):
        codes.append("BTG")
    if codes:
        res["purposeOfUse"] = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": c}]}
            for c in codes
        ]
    if e.patient_id:
        res["entity"].append(
            {"what": {"reference": f"Patient/{e.patient_id}"}, "type": {"system": _BALP, "code": "1"}, "role": {"code": "1"}}
        )
    if e.resource_type and e.resource_type != "Patient":
        res["entity"].append(
            {"what": {"reference": f"{e.resource_type}/{e.event_id}-r"}, "type": {"system": _BALP, "code": "2"}, "role": {"code": "4"}}
        )
    if e.encounter_id:
        res["entity"].append({"what": {"reference": f"Encounter/{e.encounter_id}"}, "role": {"code": "3"}})
    return res
