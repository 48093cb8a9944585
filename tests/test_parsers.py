"""Event parsers: FHIR R4/R5 AuditEvent, canonical JSONL/CSV, and the file readers.

The FHIR examples are written by hand after the shapes in the FHIR R4/R5 AuditEvent
examples, IHE BALP and real servers (Firely, atna2fhir); every variant CONTRACTS §3 names
has its own case. Bad input must always end as EventError with a message that says why.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import gzip
import io
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from connectors import fhir
from connectors.canonical import iter_csv, parse_canonical, parse_csv_row, parse_jsonl_line
from connectors.fhir import parse_audit_event, parse_fhir_line
from connectors.fhir_encode import to_audit_event
from connectors.readers import ParseStats, detect_format, read_events
from emrwatch.events import ACTIONS, AccessEvent, EventError, parse_ts
from pipeline.simulate import simulate

DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
BALP_ENTITY = "http://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
OUTCOME_SYS = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"


def ev(**kw: Any) -> AccessEvent:
    """An expected event: canonical defaults, ``t`` computed from ``ts``."""
    kw.setdefault("ts", "2026-03-02T09:15:27+08:00")
    kw.setdefault("event_id", "ae-1")
    kw.setdefault("user_id", "N0042")
    kw.setdefault("patient_id", "P000123")
    kw.setdefault("action", "view")
    return AccessEvent(t=parse_ts(kw["ts"]), **kw)


def r4(**over: Any) -> dict[str, Any]:
    """A minimal R4 AuditEvent (one user agent, one patient); ``over`` replaces keys,
    a value of None removes the key."""
    obj: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": "ae-1",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
        },
        "action": "R",
        "recorded": "2026-03-02T09:15:27+08:00",
        "outcome": "0",
        "agent": [{"who": {"identifier": {"value": "N0042"}}, "requestor": True}],
        "entity": [{"what": {"reference": "Patient/P000123"}}],
    }
    for key, value in over.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


# --------------------------------------------------------------------------- R4 examples

BALP_R4_PATIENT_READ: dict[str, Any] = {
    "resourceType": "AuditEvent",
    "id": "ex-auditPatientRead",
    "meta": {
        "profile": [
            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
        ]
    },
    "type": {
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest",
        "display": "Restful Operation",
    },
    "subtype": [{"system": REST, "code": "read", "display": "read"}],
    "action": "R",
    "recorded": "2026-03-02T09:15:27.713+08:00",
    "outcome": "0",
    "agent": [
        {
            "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
            "who": {"display": "ws-icu-07.hospital.example"},
            "requestor": False,
            "network": {"address": "10.20.30.41", "type": "2"},
        },
        {
            "type": {
                "coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]
            },
            "who": {"display": "emr.hospital.example"},
            "requestor": False,
            "network": {"address": "http://emr.hospital.example/fhir", "type": "5"},
        },
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                        "code": "IRCP",
                        "display": "information recipient",
                    }
                ]
            },
            "who": {
                "identifier": {"system": "urn:oid:1.2.156.112604.1", "value": "N0042"},
                "display": "Li Wei",
            },
            "requestor": True,
        },
    ],
    "source": {
        "site": "emr.hospital.example",
        "observer": {"display": "EMR FHIR server"},
        "type": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4",
                "display": "Application Server",
            }
        ],
    },
    "entity": [
        {
            "what": {"reference": "Observation/bp-2031"},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
        },
        {
            "what": {"reference": "Patient/P000123"},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        },
    ],
}


def test_balp_r4_patient_read() -> None:
    """Requestor is the third agent; its workstation is on the Source Role ID agent."""
    assert parse_audit_event(BALP_R4_PATIENT_READ) == ev(
        event_id="ex-auditPatientRead",
        ts="2026-03-02T09:15:27.713+08:00",
        resource_type="Observation",
        workstation="10.20.30.41",
        source="EMR FHIR server",
    )


#: FHIR R4's 'example-error': a create that failed (outcome 8), observer by identifier.
R4_ERROR_EXAMPLE: dict[str, Any] = {
    "resourceType": "AuditEvent",
    "id": "example-error",
    "type": {"code": "rest"},
    "subtype": [{"system": REST, "code": "create"}],
    "action": "C",
    "recorded": "2017-09-07T23:42:24Z",
    "outcome": "8",
    "outcomeDesc": "Invalid request to create an Operation resource on the Patient endpoint.",
    "agent": [
        {"who": {"identifier": {"value": "95"}}, "altId": "601847123", "requestor": True},
        {
            "type": {"coding": [{"system": DCM, "code": "110153"}]},
            "who": {"identifier": {"value": "2.16.840.1.113883.4.2"}},
            "requestor": False,
            "network": {"address": "Workstation1.ehr.familyclinic.com", "type": "1"},
        },
    ],
    "source": {"site": "Cloud", "observer": {"identifier": {"value": "hl7connect.example"}}},
    "entity": [{"what": {"reference": "Patient/example"}, "role": {"code": "1"}}],
}


def test_r4_error_example_create_failure() -> None:
    """After the FHIR R4 'example-error': create that failed (outcome 8), observer by identifier."""
    obj = R4_ERROR_EXAMPLE
    assert parse_audit_event(obj) == ev(
        event_id="example-error",
        ts="2017-09-07T23:42:24Z",
        user_id="95",
        patient_id="example",
        action="create",
        outcome="failure",
        workstation="Workstation1.ehr.familyclinic.com",
        source="hl7connect.example",
    )


@pytest.mark.parametrize(
    ("who", "user_id"),
    [
        ({"identifier": {"value": "N0042"}}, "N0042"),
        ({"reference": "Practitioner/N0042"}, "N0042"),
        ({"reference": "PractitionerRole/PR-77"}, "PR-77"),
        ({"reference": "http://emr.example.org/fhir/Practitioner/N0042"}, "N0042"),
        ({"reference": "Practitioner/N0042/_history/3"}, "N0042"),
        ({"reference": "https://x.example/fhir/PractitionerRole/PR-77/_history/1"}, "PR-77"),
        # identifier wins over reference when both are there
        ({"identifier": {"value": "N0042"}, "reference": "Practitioner/other"}, "N0042"),
    ],
)
def test_user_id_variants(who: dict[str, Any], user_id: str) -> None:
    obj = r4(agent=[{"who": who, "requestor": True}])
    assert parse_audit_event(obj).user_id == user_id


def test_requestor_true_wins_else_first_agent() -> None:
    server = {"who": {"identifier": {"value": "server"}}, "requestor": False}
    user = {"who": {"identifier": {"value": "N0042"}}, "requestor": True}
    other = {"who": {"identifier": {"value": "other"}}}
    assert parse_audit_event(r4(agent=[server, other, user])).user_id == "N0042"
    assert parse_audit_event(r4(agent=[other, server])).user_id == "other"


def test_missing_optional_parts_give_defaults() -> None:
    """No network, source, subtype or purposeOfUse: still one complete event."""
    assert parse_audit_event(r4()) == ev()


def test_network_source_and_purpose_of_the_r4_shape() -> None:
    obj = r4(
        agent=[
            {
                "who": {"identifier": {"value": "N0042"}},
                "requestor": True,
                "network": {"address": "ws-ward3-02", "type": "1"},
            }
        ],
        source={"site": "Main campus"},
        purposeOfUse=[
            {"coding": [{"system": ACT_REASON, "code": "TREAT"}]},
            {"coding": [{"system": ACT_REASON, "code": "ETREAT"}]},
        ],
    )
    got = parse_audit_event(obj)
    assert (got.workstation, got.source, got.purpose, got.emergency) == (
        "ws-ward3-02",
        "Main campus",
        "TREAT",
        True,
    )


def test_agent_level_purpose_of_use_break_the_glass() -> None:
    agent = {
        "who": {"identifier": {"value": "N0042"}},
        "requestor": True,
        "purposeOfUse": [{"coding": [{"system": ACT_REASON, "code": "BTG"}]}],
    }
    got = parse_audit_event(r4(agent=[agent]))
    assert (got.purpose, got.emergency) == ("BTG", True)


def test_purpose_is_kept_as_string_and_not_emergency_otherwise() -> None:
    got = parse_audit_event(r4(purposeOfUse=[{"coding": [{"code": "HPAYMT"}]}]))
    assert (got.purpose, got.emergency) == ("HPAYMT", False)


@pytest.mark.parametrize(
    ("entity", "patient_id"),
    [
        ({"what": {"reference": "Patient/P9"}}, "P9"),
        ({"what": {"reference": "http://emr.example.org/fhir/Patient/P9/_history/2"}}, "P9"),
        (
            {
                "what": {"identifier": {"system": "urn:oid:1.2.3", "value": "MRN-9"}},
                "role": {"system": OBJECT_ROLE, "code": "1"},
            },
            "MRN-9",
        ),
        (  # R4 producer that wrote role as a CodeableConcept
            {"what": {"identifier": {"value": "MRN-9"}}, "role": {"coding": [{"code": "1"}]}},
            "MRN-9",
        ),
        (
            {
                "what": {"identifier": {"value": "MRN-9"}},
                "type": {"system": BALP_ENTITY, "code": "1"},
            },
            "MRN-9",
        ),
        ({"what": {"type": "Patient", "identifier": {"value": "MRN-9"}}}, "MRN-9"),
    ],
)
def test_patient_entity_variants(entity: dict[str, Any], patient_id: str) -> None:
    obj = r4(entity=[{"what": {"reference": "Observation/o1"}}, entity])
    got = parse_audit_event(obj)
    assert (got.patient_id, got.resource_type) == (patient_id, "Observation")


def test_entity_type_one_of_another_system_is_not_the_patient() -> None:
    """audit-entity-type 1 is 'Person' (could be staff): only the BALP system marks a patient."""
    person = {
        "what": {"identifier": {"value": "N0099"}},
        "type": {"system": ENTITY_TYPE, "code": "1"},
    }
    with pytest.raises(EventError, match="no patient entity"):
        parse_audit_event(r4(entity=[person]))


def test_encounter_entity_sets_encounter_not_resource_type() -> None:
    enc = {"what": {"reference": "Encounter/E-9"}, "role": {"code": "3"}}
    doc = {"what": {"reference": "DocumentReference/d1"}}
    patient = {"what": {"reference": "Patient/P000123"}}
    got = parse_audit_event(r4(entity=[enc, patient, doc]))
    assert (got.encounter_id, got.resource_type) == ("E-9", "DocumentReference")
    only_enc = parse_audit_event(r4(entity=[patient, enc]))
    assert (only_enc.encounter_id, only_enc.resource_type) == ("E-9", "Patient")


def test_resource_type_is_first_other_entity_and_patient_when_none() -> None:
    ents = [
        {"what": {"reference": "Patient/P000123"}},
        {"what": {"reference": "http://x.example/fhir/MedicationRequest/m1"}},
        {"what": {"reference": "Observation/o1"}},
    ]
    assert parse_audit_event(r4(entity=ents)).resource_type == "MedicationRequest"
    assert parse_audit_event(r4()).resource_type == "Patient"


@pytest.mark.parametrize(
    ("action", "subtypes", "expected"),
    [
        ("C", None, "create"),
        ("R", None, "view"),
        ("U", None, "update"),
        ("D", None, "delete"),
        ("E", None, "execute"),
        ("R", ["read"], "view"),
        ("R", ["vread"], "view"),
        ("E", ["search"], "query"),
        ("E", ["search-type"], "query"),
        ("R", ["search-system"], "query"),
        ("C", ["create"], "create"),
        ("U", ["update"], "update"),
        ("D", ["delete"], "delete"),
        ("R", ["print"], "print"),
        ("R", ["export"], "export"),
        ("R", ["copy"], "copy"),
        ("R", ["forward"], "forward"),
        ("R", ["read", "print"], "print"),  # exfiltration beats the REST code
        ("E", ["GET", "search-type"], "query"),  # http-verb subtype is ignored
        ("R", ["110122"], "view"),  # unknown code: the action code stands
    ],
)
def test_action_and_subtype(action: str, subtypes: list[str] | None, expected: str) -> None:
    sub = None if subtypes is None else [{"system": "urn:any", "code": c} for c in subtypes]
    assert parse_audit_event(r4(action=action, subtype=sub)).action == expected


def test_dicom_export_type_means_export_unless_subtype_says_which_exfiltration() -> None:
    export_type = {"system": DCM, "code": "110106", "display": "Export"}
    assert parse_audit_event(r4(type=export_type)).action == "export"
    assert parse_audit_event(r4(type=export_type, subtype=[{"code": "read"}])).action == "export"
    assert parse_audit_event(r4(type=export_type, subtype=[{"code": "print"}])).action == "print"


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [("0", "success"), ("4", "failure"), ("8", "failure"), ("12", "failure"), (None, "success")],
)
def test_r4_outcome(outcome: str | None, expected: str) -> None:
    assert parse_audit_event(r4(outcome=outcome)).outcome == expected


def test_authentication_event_needs_no_patient() -> None:
    login = r4(
        type={"system": DCM, "code": "110114", "display": "User Authentication"},
        subtype=[{"system": DCM, "code": "110122", "display": "Login"}],
        action="E",
        entity=None,
    )
    got = parse_audit_event(login)
    assert (got.event_category, got.patient_id, got.action) == ("authentication", "", "execute")


# --------------------------------------------------------------------------- R5 examples

R5_READ: dict[str, Any] = {
    "resourceType": "AuditEvent",
    "id": "r5-read-1",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                    "code": "rest",
                    "display": "Restful Operation",
                }
            ]
        }
    ],
    "code": {"coding": [{"system": REST, "code": "vread", "display": "vread"}]},
    "action": "R",
    "severity": "informational",
    "occurredDateTime": "2026-03-02T09:15:26+08:00",
    "recorded": "2026-03-02T09:15:27+08:00",
    "outcome": {"code": {"system": OUTCOME_SYS, "code": "0", "display": "Success"}},
    "authorization": [{"coding": [{"system": ACT_REASON, "code": "TREAT"}]}],
    "patient": {"reference": "Patient/P000999"},
    "agent": [
        {
            "type": {"coding": [{"code": "IRCP"}]},
            "who": {"reference": "http://emr.example.org/fhir/PractitionerRole/PR-77/_history/3"},
            "requestor": True,
            "networkString": "ws-icu-07",
        },
        {
            "type": {"coding": [{"system": DCM, "code": "110152"}]},
            "who": {"reference": "Device/fhir-server"},
            "requestor": False,
            "networkUri": "http://emr.example.org/fhir",
        },
    ],
    "source": {
        "site": {"display": "Main campus"},
        "observer": {"reference": "Device/fhir-server"},
        "type": [{"coding": [{"code": "4"}]}],
    },
    "entity": [
        {
            "what": {"identifier": {"system": "urn:oid:1.2.3", "value": "MRN-555"}},
            "role": {"coding": [{"system": OBJECT_ROLE, "code": "1", "display": "Patient"}]},
        },
        {"what": {"reference": "Encounter/E-9"}, "role": {"coding": [{"code": "3"}]}},
        {"what": {"reference": "DiagnosticReport/dr-5"}, "role": {"coding": [{"code": "4"}]}},
    ],
}


def test_r5_read() -> None:
    assert parse_audit_event(R5_READ) == ev(
        event_id="r5-read-1",
        user_id="PR-77",
        patient_id="MRN-555",  # the entity, before the top-level patient
        resource_type="DiagnosticReport",
        workstation="ws-icu-07",
        purpose="TREAT",
        source="Main campus",
        encounter_id="E-9",
    )


def test_r5_firely_style_search() -> None:
    """After Firely Server's R5 audit output: outcome as the word, search-type in ``code``."""
    obj = {
        "resourceType": "AuditEvent",
        "id": "f-1",
        "category": [
            {"coding": [{"code": "rest"}]},
            {"coding": [{"system": "http://hl7.org/fhir/http-verb", "code": "GET"}]},
        ],
        "code": {"coding": [{"system": REST, "code": "search-type"}]},
        "action": "E",
        "recorded": "2022-10-18T13:05:19.152+00:00",
        "outcome": {
            "code": {"system": OUTCOME_SYS, "code": "success"},
            "detail": [{"text": "200"}],
        },
        "agent": [
            {"who": {"display": "Li Wei", "identifier": {"value": "N0042"}}, "requestor": True},
            {
                "type": {"coding": [{"system": DCM, "code": "110153"}]},
                "who": {"identifier": {"value": "client-app"}},
                "networkString": "127.0.0.1",
            },
        ],
        "source": {"site": {"display": "Firely Server"}, "observer": {"display": "Firely Server"}},
        "entity": [{"what": {"reference": "Patient/P000123"}, "role": {"coding": [{"code": "1"}]}}],
    }
    assert parse_audit_event(obj) == ev(
        event_id="f-1",
        ts="2022-10-18T13:05:19.152+00:00",
        action="query",
        workstation="127.0.0.1",
        source="Firely Server",
    )


def test_r5_category_carries_the_rest_code() -> None:
    """HL7's R5 'example-advanced-create' puts the interaction in category, 'rest' in code."""
    obj = {
        "resourceType": "AuditEvent",
        "id": "example-advanced-create",
        "category": [{"coding": [{"system": REST, "code": "create"}]}],
        "code": {"coding": [{"code": "rest"}]},
        "action": "C",
        "occurredDateTime": "2020-04-29T09:49:00Z",
        "recorded": "2020-04-29T09:49:00Z",
        "outcome": {"code": {"system": OUTCOME_SYS, "code": "0"}},
        "patient": {"reference": "Patient/example"},
        "encounter": {"reference": "Encounter/home"},
        "agent": [
            {"who": {"identifier": {"value": "myMachine.example.org"}}, "requestor": False},
            {"who": {"identifier": {"value": "Betty Jones"}}, "requestor": True},
        ],
        "entity": [{"what": {"reference": "List/example"}, "role": {"coding": [{"code": "4"}]}}],
    }
    got = parse_audit_event(obj)
    assert (got.user_id, got.patient_id, got.encounter_id, got.action, got.resource_type) == (
        "Betty Jones",
        "example",
        "home",
        "create",
        "List",
    )


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ({"code": {"code": "4"}}, "failure"),
        ({"code": {"coding": [{"system": OUTCOME_SYS, "code": "12"}]}}, "failure"),
        ({"code": {"code": "8"}, "detail": [{"text": "403"}]}, "failure"),
        ({"code": {"code": "failure"}}, "failure"),
        ({"code": {"code": "0"}}, "success"),
    ],
)
def test_r5_outcome_object(outcome: dict[str, Any], expected: str) -> None:
    obj = copy.deepcopy(R5_READ)
    obj["outcome"] = outcome
    assert parse_audit_event(obj).outcome == expected


def test_r5_occurred_fallbacks_and_network_uri() -> None:
    obj = copy.deepcopy(R5_READ)
    del obj["recorded"], obj["occurredDateTime"]
    obj["occurredPeriod"] = {
        "start": "2026-03-02T09:00:00+08:00",
        "end": "2026-03-02T09:01:00+08:00",
    }
    obj["agent"][0] = {
        "who": {"reference": "Practitioner/N0042"},
        "networkUri": "urn:ipv4:10.0.0.7",
    }
    got = parse_audit_event(obj)
    assert (got.ts, got.t, got.workstation, got.user_id) == (
        "2026-03-02T09:00:00+08:00",
        parse_ts("2026-03-02T09:00:00+08:00"),
        "urn:ipv4:10.0.0.7",
        "N0042",  # no requestor flag anywhere: the first agent
    )
    del obj["occurredPeriod"]
    obj["occurredDateTime"] = "2026-03-02T10:00:00Z"
    assert parse_audit_event(obj).ts == "2026-03-02T10:00:00Z"


def test_r5_top_level_patient_when_no_patient_entity() -> None:
    obj = copy.deepcopy(R5_READ)
    obj["entity"] = [{"what": {"reference": "Binary/b1"}}]
    obj.pop("encounter", None)
    got = parse_audit_event(obj)
    assert (got.patient_id, got.resource_type) == ("P000999", "Binary")


def test_r5_export_print_and_emergency() -> None:
    obj = copy.deepcopy(R5_READ)
    obj["category"] = [{"coding": [{"system": DCM, "code": "110106", "display": "Export"}]}]
    obj["code"] = {"coding": [{"code": "read"}]}
    obj["authorization"] = [{"coding": [{"code": "TREAT"}, {"code": "ETREAT"}]}]
    got = parse_audit_event(obj)
    assert (got.action, got.purpose, got.emergency) == ("export", "TREAT", True)
    obj["code"] = {"coding": [{"system": "urn:vendor:actions", "code": "print"}]}
    assert parse_audit_event(obj).action == "print"


def test_r5_security_alert() -> None:
    obj = {
        "resourceType": "AuditEvent",
        "id": "alert-1",
        "category": [{"coding": [{"system": DCM, "code": "110113", "display": "Security Alert"}]}],
        "code": {"coding": [{"system": DCM, "code": "110127", "display": "Emergency Override"}]},
        "action": "E",
        "recorded": "2026-03-02T03:12:00+08:00",
        "outcome": {"code": {"code": "0"}},
        "agent": [{"who": {"reference": "Practitioner/N0042"}, "requestor": True}],
        "source": {"observer": {"display": "EMR"}},
    }
    got = parse_audit_event(obj)
    assert (got.event_category, got.patient_id, got.user_id, got.action) == (
        "security_alert",
        "",
        "N0042",
        "execute",
    )


# --------------------------------------------------------------------------- round trip


ROUND_TRIP = [
    ev(source="emr"),
    ev(action="create", resource_type="Observation", workstation="ws-1", source="emr"),
    ev(action="update", resource_type="MedicationRequest", encounter_id="E-1", source="emr"),
    ev(action="delete", resource_type="DocumentReference", outcome="failure", source="emr"),
    ev(action="query", source="portal", purpose="TREAT"),
    ev(action="execute", source="emr", ts="2026-03-02T01:15:27Z"),
    ev(action="print", resource_type="DiagnosticReport", source="emr", purpose="TREAT"),
    ev(action="export", source="emr", purpose="BTG", emergency=True, encounter_id="E-2"),
    ev(action="copy", source="emr", purpose="TREAT", emergency=True),
    ev(action="forward", source="emr", outcome="failure", workstation="10.0.0.1"),
    ev(
        action="view",
        source="emr",
        purpose="ETREAT",
        emergency=True,
        ts="2026-03-02T09:15:27.5+08:00",
    ),
]


@pytest.mark.parametrize("event", ROUND_TRIP, ids=lambda e: f"{e.action}-{e.outcome}")
def test_round_trip(event: AccessEvent) -> None:
    assert parse_audit_event(to_audit_event(event)) == event
    assert parse_fhir_line(orjson.dumps(to_audit_event(event))) == event


def test_round_trip_covers_every_action() -> None:
    assert {e.action for e in ROUND_TRIP} == set(ACTIONS)


def test_encoder_quirks_are_read_back_as_encoded() -> None:
    """The encoder writes 'emr' for an empty source and BTG for an emergency without purpose:
    those are what the AuditEvent says, so that is what we read."""
    got = parse_audit_event(to_audit_event(ev(source="", emergency=True)))
    assert (got.source, got.purpose, got.emergency) == ("emr", "BTG", True)


ids = st.text(
    st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/"),
    min_size=1,
    max_size=12,
)
timestamps = st.builds(
    lambda when, off, frac: when.strftime("%Y-%m-%dT%H:%M:%S") + frac + off,
    st.datetimes(min_value=dt.datetime(1971, 1, 2), max_value=dt.datetime(2099, 12, 30)),
    st.sampled_from(["Z", "+08:00", "-05:00", "+05:30", "+00:00"]),
    st.sampled_from(["", ".5", ".123", ".123456"]),
)


@st.composite
def access_events(draw: st.DrawFn) -> AccessEvent:
    action = draw(st.sampled_from(sorted(ACTIONS)))
    purpose = draw(st.sampled_from(["", "TREAT", "ETREAT", "BTG", "HPAYMT"]))
    emergency = purpose in ("ETREAT", "BTG") or (bool(purpose) and draw(st.booleans()))
    return ev(
        event_id=draw(ids),
        ts=draw(timestamps),
        user_id=draw(ids),
        patient_id=draw(ids),
        action=action,
        resource_type=draw(st.sampled_from(["Patient", "Observation", "Binary", "ImagingStudy"])),
        workstation=draw(st.sampled_from(["", "ws-01", "10.1.2.3"])),
        outcome=draw(st.sampled_from(["success", "failure"])),
        emergency=emergency,
        purpose=purpose,
        source=draw(st.sampled_from(["emr", "lab-system", "医院EMR"])),
        encounter_id=draw(st.sampled_from(["", "E-1"]) | ids),
    )


@given(access_events())
@settings(max_examples=300, deadline=None)
def test_round_trip_property(event: AccessEvent) -> None:
    line = orjson.dumps(to_audit_event(event))
    assert parse_fhir_line(line) == event


# --------------------------------------------------------------------------- fast path


def test_encoder_output_takes_the_fast_path() -> None:
    """The speed budget rests on this: the typical event must not fall to the general path."""
    for event in ROUND_TRIP:
        assert fhir._parse_fast(to_audit_event(event)) is not None, event


def _variants(obj: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Small edits that the fast path must either decline or handle exactly like the general one."""
    junk = st.one_of(
        st.none(),
        st.integers(-3, 110114),
        st.sampled_from(["", "1", "read", "print", "110106", "110113", "Patient/x", "X", "0", "4"]),
        st.sampled_from(["110112", "ITI-43", "ITI-18", "110127", "110153"]),
        st.sampled_from(
            [
                "Patient/P9/_history/2",
                "Encounter/E-7/_history/1",
                "Observation/a/b",
                "http://x.example/fhir/Patient/P9",
                "urn:uuid:7d2c",
                "Patient/",
                "observation/o1",
                "Binary/b1",
            ]
        ),
        st.just([]),
        st.just({}),
        st.just({"code": "1"}),
        st.just({"coding": [{"code": "1"}]}),
        st.just([{"code": "print"}]),
        st.just([{"coding": [{"code": "ETREAT"}]}]),
    )
    paths = [
        ("id",),
        ("action",),
        ("outcome",),
        ("recorded",),
        ("type",),
        ("type", "code"),
        ("subtype",),
        ("purposeOfUse",),
        ("category",),
        ("code",),
        ("authorization",),
        ("encounter",),
        ("source",),
        ("source", "observer"),
        ("agent",),
        ("agent", 0, "who"),
        ("agent", 0, "who", "identifier", "value"),
        ("agent", 0, "network"),
        ("agent", 0, "networkString"),
        ("agent", 0, "purposeOfUse"),
        ("agent", 0, "requestor"),
        ("entity",),
        ("entity", 0, "what", "reference"),
        ("entity", 0, "role"),
        ("entity", 1, "what", "reference"),
        ("entity", 1, "role"),
        ("entity", 1, "type"),
    ]

    @st.composite
    def mutate(draw: st.DrawFn) -> dict[str, Any]:
        out = copy.deepcopy(obj)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            node: Any = out
            try:
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = draw(junk)
            except (KeyError, IndexError, TypeError):
                pass
        return out

    return mutate()


_TYPICAL = to_audit_event(
    ev(
        resource_type="Observation",
        workstation="ws-1",
        source="emr",
        purpose="TREAT",
        encounter_id="E-1",
    )
)


@given(_variants(_TYPICAL) | _variants(BALP_R4_PATIENT_READ))
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_path_agrees_with_general_path(obj: dict[str, Any]) -> None:
    _assert_paths_agree(obj)


def test_balp_multi_agent_shape_takes_the_fast_path() -> None:
    assert _assert_paths_agree(copy.deepcopy(BALP_R4_PATIENT_READ))


@pytest.mark.parametrize(
    "agents",
    [
        [
            {"requestor": True, "who": {"reference": "Practitioner/N1"}},
            {"who": {"identifier": {"value": "x"}}},
        ],
        [{"who": {"identifier": {"value": "first"}}}, {"who": {"identifier": {"value": "second"}}}],
        [
            {"who": {"display": "no id"}},
            {"who": {"identifier": {"value": "x"}}, "requestor": False},
        ],
        ["junk", {"who": {"identifier": {"value": "N1"}}, "requestor": True}],
        [{"who": {"identifier": {"value": 7}}, "requestor": True}, {}],
        [
            {"who": {"identifier": {"value": "N1"}}, "requestor": True, "networkString": "ws-9"},
            {"type": {"coding": [{"code": "110153"}]}, "network": {"address": "10.0.0.1"}},
        ],
        [
            {
                "who": {"identifier": {"value": "N1"}},
                "requestor": True,
                "purposeOfUse": [{"coding": [{"code": "BTG"}]}],
            },
            {"who": {"identifier": {"value": "x"}}},
        ],
        [],
    ],
)
def test_fast_path_agrees_on_agent_lists(agents: list[Any]) -> None:
    obj = copy.deepcopy(BALP_R4_PATIENT_READ)
    obj["agent"] = agents
    _assert_paths_agree(obj)


def _assert_paths_agree(obj: dict[str, Any]) -> bool:
    """The fast path may decline (None); if it answers, event or error, it is the general
    one's answer. Returns whether the fast path answered."""
    try:
        fast: AccessEvent | str | None = fhir._parse_fast(obj)
    except EventError as exc:  # a bad timestamp is reported from the fast path directly
        fast = f"error: {exc}"
    try:
        general: AccessEvent | str = fhir._parse_general(obj)
    except EventError as exc:
        general = f"error: {exc}"
    if fast is not None:
        assert fast == general
    return fast is not None


_EDGE_REFERENCES = [
    "Patient/P9/_history/2",
    "Encounter/E-7/_history/1",
    "Observation/o1/_history/4",
    "Observation/a/b",
    "http://x.example/fhir/Patient/P9",
    "urn:uuid:7d2c",
    "Patient/",
    "observation/o1",
    "Binary/b1",
    "Obs ervation/o1",
]
_EDGE_CASES: list[tuple[tuple[Any, ...], Any]] = [
    *[(("entity", i, "what", "reference"), ref) for i in range(3) for ref in _EDGE_REFERENCES],
    *[
        (path, code)
        for path in (("subtype", 0, "code"), ("type", "code"))
        for code in (
            *(110106, 110113, 110114, "110106", "110114", "print", "vread", 1),
            *("110112", "ITI-43", "ITI-67", "110127"),
        )
    ],
    *[(("entity", 1, "role"), role) for role in ({"code": "1"}, {"coding": [{"code": "1"}]}, "1")],
    *[
        (("entity", 1, "type"), etype)
        for etype in ({"system": BALP_ENTITY, "code": "1"}, {"system": ENTITY_TYPE, "code": "1"})
    ],
    *[(("agent", 0, "network"), net) for net in ({"address": ""}, {"address": 5}, {})],
    *[(("agent", 0, "who", "identifier", "value"), v) for v in (42, "", None)],
    *[(("purposeOfUse", 0, "coding", 0, "code"), c) for c in ("btg", 7, "")],
    *[
        (("recorded",), ts)
        for ts in (
            "2026-03-02T09:15:27.1234Z",
            "2026-03-02T09:15:27.9876Z",
            "2026-03-02T24:00:00Z",
            "2026-03-02 09:15:27+08:00",
            "2026-03-02T09:15:60+08:00",
        )
    ],
]


@pytest.mark.parametrize(("path", "value"), _EDGE_CASES, ids=repr)
def test_fast_path_agrees_on_edge_cases(path: tuple[Any, ...], value: Any) -> None:
    obj = copy.deepcopy(_TYPICAL)
    node: Any = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _assert_paths_agree(obj)


@given(
    timestamps
    | st.text(max_size=30)
    | st.from_regex(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[Z+-].{0,5}", fullmatch=True)
    # any separators, hour 24, second 60, odd offsets: shapes the hour cache must refuse
    | st.from_regex(
        r"[0-9]{4}.[01][0-9].[0-3][0-9].[0-2][0-9]:[0-6][0-9]:[0-6][0-9](\.[0-9]{1,6})?"
        r"(Z|[+-][0-2][0-9]:[0-6][0-9])",
        fullmatch=True,
    )
)
@settings(max_examples=500, deadline=None)
def test_cached_time_parse_equals_parse_ts(ts: str) -> None:
    try:
        expected: float | str = parse_ts(ts)
    except (EventError, OverflowError, ValueError):
        expected = "error"
    for _ in range(2):  # the second call is answered from the hour cache
        try:
            got: float | str = fhir._time(ts)
        except EventError:
            got = "error"
        assert got == expected


# --------------------------------------------------------------------------- struct path
#
# parse_fhir_line first reads a line with msgspec into the closed R4 schema
# (fhir._parse_struct). Whenever that path answers, its answer must be the general path's
# and what parse_fhir_line gave before it existed (orjson, then the fast or general path).


def _outcome_of(parse: Any, arg: Any) -> AccessEvent | str:
    try:
        return parse(arg)
    except EventError as exc:
        return f"error: {exc}"


def _orjson_paths(line: bytes) -> AccessEvent | str:
    """parse_fhir_line as it was before the struct path: orjson, then fast or general."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"error: invalid JSON: {exc}"
    return _outcome_of(parse_audit_event, obj)


def _assert_struct_path_agrees(line: bytes) -> bool:
    """The struct path may decline (None); if it answers, it is the general path's and the
    old parse_fhir_line's answer; parse_fhir_line as a whole is unchanged either way.
    Returns whether the struct path answered."""
    try:
        record = fhir._decode(line)
    except fhir._STRUCT_ERRORS:
        record = None
    struct = None if record is None else fhir._parse_struct(record)  # never raises
    before = _orjson_paths(line)
    assert _outcome_of(parse_fhir_line, line) == before
    if struct is not None:
        assert struct == before
        assert struct == _outcome_of(fhir._parse_general, orjson.loads(line))
    return struct is not None


def test_struct_path_reads_the_common_shapes() -> None:
    """The speed budget rests on this: encoder output, the BALP multi-agent shape and the
    R4 spec's shapes are read by the struct path, not handed on."""
    lines = [orjson.dumps(to_audit_event(event)) for event in ROUND_TRIP]
    lines.append(orjson.dumps(BALP_R4_PATIENT_READ))
    lines.append(
        orjson.dumps(r4(agent=[{"who": {"reference": "Practitioner/N0042"}, "requestor": True}]))
    )
    lines.append(  # identifier-only patient, marked by BALP entity type 1
        orjson.dumps(
            r4(
                entity=[
                    {"what": {"reference": "Observation/o1"}},
                    {
                        "what": {"identifier": {"value": "MRN-9"}},
                        "type": {"system": BALP_ENTITY, "code": "1"},
                    },
                ]
            )
        )
    )
    for line in lines:
        assert _assert_struct_path_agrees(line), line


def test_struct_path_hands_r5_and_bad_events_on() -> None:
    assert not _assert_struct_path_agrees(orjson.dumps(R5_READ))
    assert not _assert_struct_path_agrees(orjson.dumps(r4(id="")))
    assert not _assert_struct_path_agrees(orjson.dumps(r4(outcome="3")))
    assert not _assert_struct_path_agrees(orjson.dumps(r4(recorded="2026-03-02T24:15:27Z")))
    assert not _assert_struct_path_agrees(orjson.dumps(r4(outcome=0)))  # a number: no str


@pytest.mark.parametrize(
    "line",
    [
        # msgspec would skip or accept these; orjson rejects them, and so must we
        b'{"resourceType":"AuditEvent","id":"a","x":1e400,',
        b'{"resourceType":"AuditEvent","outcomeDesc":1e400,',
        b'{"resourceType":"AuditEvent","outcomeDesc":' + b"9" * 400 + b",",
        b'{"resourceType":"AuditEvent","outcomeDesc":"\xff",',
        b'{"resourceType":"AuditEvent","outcomeDesc":"\xed\xa0\x80",',
        b'{"resourceType":"AuditEvent","x\xc0\xaf":"",',
        b'{"resourceType":"AuditEvent","outcomeDesc":"\\ud800",',
    ],
)
def test_struct_path_refuses_what_orjson_refuses(line: bytes) -> None:
    line += orjson.dumps(r4(resourceType=None))[1:]
    assert not _assert_struct_path_agrees(line)
    with pytest.raises(EventError, match="invalid JSON"):
        parse_fhir_line(line)


@given(access_events())
@settings(max_examples=300, deadline=None)
def test_struct_path_reads_generated_events(event: AccessEvent) -> None:
    line = orjson.dumps(to_audit_event(event))
    assert _assert_struct_path_agrees(line)
    assert parse_fhir_line(line) == event


@given(_variants(_TYPICAL) | _variants(BALP_R4_PATIENT_READ))
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_struct_path_agrees_on_fast_path_variants(obj: dict[str, Any]) -> None:
    _assert_struct_path_agrees(_line_of(obj))


#: R4 'example-error' after the spec: observer by identifier beside a site, the user first,
#: the workstation on a later Source Role ID agent, a patient marked by role 1.
_R4_ERROR_SHAPE: dict[str, Any] = {
    **R4_ERROR_EXAMPLE,
    "entity": [
        {"what": {"reference": "Observation/o1"}},
        {"what": {"reference": "Patient/example"}, "role": {"code": "1"}},
    ],
}
_STRUCT_BASES = [_TYPICAL, BALP_R4_PATIENT_READ, _R4_ERROR_SHAPE]
#: Where to edit: the fields the struct path reads or declares, and some it does not.
#: An index one past the end of a list appends.
_STRUCT_PATHS: list[tuple[Any, ...]] = [
    ("resourceType",),
    ("id",),
    ("meta",),
    ("meta", "profile"),
    ("period",),
    ("outcome",),
    ("outcomeDesc",),
    ("action",),
    ("recorded",),
    ("extension",),
    ("purposeOfEvent",),
    ("type",),
    ("type", "code"),
    ("type", "system"),
    ("type", "coding"),
    ("subtype",),
    ("subtype", 0),
    ("subtype", 0, "code"),
    ("subtype", 1),
    ("purposeOfUse",),
    ("purposeOfUse", 0, "coding", 0, "code"),
    ("purposeOfUse", 0, "text"),
    ("purposeOfUse", 0, "code"),
    ("purposeOfUse", 1),
    ("agent",),
    ("agent", 0, "requestor"),
    ("agent", 0, "type"),
    ("agent", 0, "role"),
    ("agent", 0, "who"),
    ("agent", 0, "who", "reference"),
    ("agent", 0, "who", "identifier"),
    ("agent", 0, "who", "identifier", "value"),
    ("agent", 0, "network"),
    ("agent", 0, "network", "address"),
    ("agent", 0, "purposeOfUse"),
    ("agent", 0, "altId"),
    ("agent", 1),
    ("agent", 1, "requestor"),
    ("agent", 1, "network"),
    ("agent", 1, "network", "address"),
    ("agent", 1, "type"),
    ("agent", 1, "role"),
    ("agent", 2),
    ("agent", 2, "requestor"),
    ("agent", 2, "type"),
    ("source",),
    ("source", "site"),
    ("source", "observer"),
    ("source", "observer", "display"),
    ("source", "observer", "identifier"),
    ("source", "observer", "reference"),
    ("entity",),
    ("entity", 0, "what"),
    ("entity", 0, "what", "reference"),
    ("entity", 0, "what", "identifier"),
    ("entity", 0, "what", "type"),
    ("entity", 0, "role"),
    ("entity", 0, "type"),
    ("entity", 1, "what", "reference"),
    ("entity", 1, "what", "identifier"),
    ("entity", 1, "role"),
    ("entity", 1, "role", "code"),
    ("entity", 1, "type"),
    ("entity", 1, "type", "code"),
    ("entity", 1, "type", "system"),
    ("entity", 2),
    ("entity", 3),
]
#: What to put there: wrong types, codes with a meaning, references of every form.
_STRUCT_VALUES: list[Any] = [
    None,
    True,
    0,
    1,
    "",
    "1",
    "0",
    "8",
    "SUCCESS",
    "X",
    "110153",
    "110106",
    "110114",
    "110112",
    "110127",
    "ITI-43",
    "rest",
    "read",
    "print",
    "BTG",
    "btg",
    "Patient",
    "Patient/P5",
    "Patient/",
    "Encounter/E5",
    "Binary/b1",
    "observation/o1",
    "Observation/a/b",
    "http://x.example/fhir/Patient/P9/_history/2",
    "http://hl7.org/fhir/StructureDefinition/Observation",
    "urn:uuid:7d2c",
    "2026-03-02T09:15:60Z",
    BALP_ENTITY,
    ENTITY_TYPE,
    [],
    {},
    {"code": "1"},
    {"code": 1},
    {"system": BALP_ENTITY, "code": "1"},
    {"value": "X9"},
    {"reference": "Patient/P5"},
    {"reference": "Practitioner/N7"},
    {"identifier": {"value": "N7"}},
    {"coding": [{"code": "110153"}]},
    {"coding": [{"code": "1"}]},
    {"code": "110106"},
    {"code": "print"},
    {"code": "ITI-18"},
    {"code": "110127"},
    {"coding": [{"code": "110150"}]},
    {"who": {"identifier": {"value": "M1"}}, "requestor": True, "type": {"code": "110153"}},
    {"requestor": True, "role": [{"coding": [{"code": "110152"}]}], "who": {"display": "srv"}},
    {"address": "10.9.9.9"},
    {"what": {"reference": "Patient/P5"}},
    {"what": {"identifier": {"value": "MRN-5"}}, "role": {"code": "1"}},
    {"what": {"reference": "Encounter/E5"}},
    {"what": {"reference": "DocumentReference/d5"}},
    {"who": {"identifier": {"value": "N7"}}, "requestor": True},
    {"type": {"coding": [{"code": "110153"}]}, "network": {"address": "10.9.9.9"}},
    [{"coding": [{"code": "ETREAT"}]}],
    [{"coding": [{"code": "TREAT"}, {"code": "BTG"}]}],
    [{"code": "print"}],
]


def _edited(obj: dict[str, Any], edits: list[tuple[tuple[Any, ...], Any]]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    for path, value in edits:
        node: Any = out
        try:
            for key in path[:-1]:
                node = node[key]
            if type(node) is list and path[-1] == len(node):
                node.append(None)
            if type(node) is dict and not isinstance(path[-1], str):
                continue  # an earlier edit turned a list into an object: JSON keys are strings
            node[path[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            pass
    return out


def test_struct_path_agrees_on_every_single_edit() -> None:
    """Every path × every value × every base, each edit alone."""
    answered = 0
    for base in _STRUCT_BASES:
        for path in _STRUCT_PATHS:
            for value in _STRUCT_VALUES:
                answered += _assert_struct_path_agrees(orjson.dumps(_edited(base, [(path, value)])))
    assert answered > 1000  # the struct path is exercised, not only declining


@given(
    st.sampled_from(_STRUCT_BASES),
    st.lists(
        st.tuples(st.sampled_from(_STRUCT_PATHS), st.sampled_from(_STRUCT_VALUES)),
        min_size=2,
        max_size=5,
    ),
)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_struct_path_agrees_on_combined_edits(
    base: dict[str, Any], edits: list[tuple[tuple[Any, ...], Any]]
) -> None:
    _assert_struct_path_agrees(orjson.dumps(_edited(base, edits)))


def _line_of(obj: dict[str, Any]) -> bytes:
    """The fast path's variants share ``st.just`` values, so an edit can make a cycle."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        assume(False)
        raise


_SNIPPETS = [
    b"1e400",
    b"-1E+400",
    b"9" * 400,
    b"1.5",
    b"12",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b'"\xff"',
    b'"\xed\xa0\x80"',
    b'"\xc0\xaf"',
    b'"\xf4\x90\x80\x80"',
    b'"caf\xc3\xa9"',
    b'"\\ud800"',
    b'"\\udc00x"',
    b'"\\ud83d\\ude00"',
    b'"\\u0000"',
    b'"\x01"',
    b'"\t"',
    b'"\\/"',
    b'"1"',
]


@given(st.data())
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_struct_path_agrees_on_raw_json_edits(data: st.DataObject) -> None:
    """Byte-level edits: a new member in some object, bytes at the start of some string,
    or bytes anywhere. msgspec and orjson do not refuse the same JSON (msgspec skips unknown
    values unchecked); the struct path may only answer where orjson reads the same."""
    line = orjson.dumps(data.draw(st.sampled_from(_STRUCT_BASES)))
    for _ in range(data.draw(st.integers(1, 2))):
        how = data.draw(st.sampled_from(["member", "string", "anywhere"]))
        if how == "member":
            at = data.draw(st.sampled_from([i + 1 for i, c in enumerate(line) if c == ord("{")]))
            key = data.draw(
                st.sampled_from([b'"x"', b'"display"', b'"system"', b'"code"', b'"\\u0069d"'])
            )
            insert = key + b":" + data.draw(st.sampled_from(_SNIPPETS)) + b","
        elif how == "string":
            at = data.draw(
                st.sampled_from([i + 2 for i in range(len(line)) if line[i] == ord(":")])
            )
            insert = data.draw(st.sampled_from([s.strip(b'"') for s in _SNIPPETS]))
        else:
            at = data.draw(st.integers(0, len(line)))
            insert = data.draw(st.sampled_from([*_SNIPPETS, b" ", b",", b'"', b"}", b"\x00"]))
        cut = data.draw(st.integers(0, 3))
        line = line[:at] + insert + line[at + cut :]
    _assert_struct_path_agrees(line)


@pytest.fixture(scope="module")
def hospital_lines(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    out = tmp_path_factory.mktemp("hospital")
    simulate(out, days=1, seed=5, scale=0.5)
    return (out / "events.ndjson").read_bytes().splitlines()


def test_struct_path_reads_every_simulated_event(hospital_lines: list[bytes]) -> None:
    assert len(hospital_lines) > 5000
    declined = [line for line in hospital_lines if not _assert_struct_path_agrees(line)]
    assert declined == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"resourceType": "AuditEvent", "id": "x"', "invalid JSON"),
        (b"\x00\xff\xfe\x01binary", "invalid JSON"),
        (b"", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object, got array"),
        (b'"AuditEvent"', "expected a JSON object, got string"),
        (b"null", "expected a JSON object, got null"),
        (
            b'{"resourceType": "Patient", "id": "p1"}',
            "not an AuditEvent: resourceType is 'Patient'",
        ),
        (b'{"id": "x"}', "not an AuditEvent: no resourceType"),
    ],
)
def test_bad_lines(line: bytes, message: str) -> None:
    with pytest.raises(EventError) as info:
        parse_fhir_line(line)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"id": None}, "AuditEvent has no id"),
        ({"id": ""}, "AuditEvent has no id"),
        ({"agent": None}, "AuditEvent has no agent"),
        ({"agent": []}, "AuditEvent has no agent"),
        ({"agent": ["N0042"]}, "AuditEvent has no agent"),
        (
            {"agent": [{"who": {"display": "Li Wei"}, "requestor": True}]},
            "requesting agent has no user id",
        ),
        ({"agent": [{"requestor": True}]}, "requesting agent has no user id"),
        ({"recorded": None}, "AuditEvent has no recorded time"),
        ({"recorded": "yesterday"}, "recorded: bad timestamp 'yesterday'"),
        ({"recorded": "2026-03-02T09:15:27"}, "has no UTC offset"),
        ({"recorded": "2026-02-30T09:15:27Z"}, "recorded: bad timestamp"),
        ({"recorded": "2026-03-02T24:15:27Z"}, "recorded: bad timestamp"),
        ({"recorded": 1772414127}, "recorded time is not a string: 1772414127"),
        ({"entity": None}, "no patient entity"),
        ({"entity": [{"what": {"reference": "Observation/o1"}}]}, "no patient entity"),
        (
            {"entity": [{"what": {"display": "someone"}, "role": {"code": "1"}}]},
            "patient entity has no id",
        ),
        ({"action": "X"}, "unknown action code 'X' (expected C, R, U, D or E)"),
        ({"action": ["R"]}, "unknown action code ['R']"),
        ({"outcome": "3"}, "unknown outcome code '3'"),
        ({"outcome": {"detail": [{"text": "403"}]}}, "outcome has no code"),
        ({"outcome": {"code": {"code": "maybe"}}}, "unknown outcome code 'maybe'"),
    ],
)
def test_bad_audit_events(over: dict[str, Any], message: str) -> None:
    with pytest.raises(EventError) as info:
        parse_audit_event(r4(**over))
    assert message in str(info.value)


def test_not_a_dict_is_an_event_error() -> None:
    with pytest.raises(EventError, match="expected a JSON object, got array"):
        parse_audit_event([BALP_R4_PATIENT_READ])


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_fuzz_random_bytes_only_event_error(data: bytes) -> None:
    with contextlib.suppress(EventError):
        parse_fhir_line(data)


@given(json_values)
@settings(max_examples=500, deadline=None)
def test_fuzz_random_json_only_event_error(value: Any) -> None:
    for obj in (value, {"resourceType": "AuditEvent", "x": value}):
        with contextlib.suppress(EventError):
            parse_fhir_line(orjson.dumps(obj))


@given(st.data())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mangled_audit_events_fail_cleanly(data: st.DataObject) -> None:
    """Random JSON in random places of real AuditEvents: only EventError, and never from the
    last-resort net (which would mean a helper met a type it did not expect)."""
    base = data.draw(st.sampled_from([BALP_R4_PATIENT_READ, R5_READ, _TYPICAL]))
    obj = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 4))):
        node: Any = obj
        while True:
            keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = data.draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and data.draw(st.booleans()):
                node = child
                continue
            node[key] = data.draw(json_values)
            break
    try:
        parse_audit_event(obj)
    except EventError as exc:
        assert not str(exc).startswith("malformed AuditEvent"), exc


# --------------------------------------------------------------------------- canonical


CANONICAL = {
    "event_id": "e1",
    "ts": "2026-03-02T09:15:27+08:00",
    "user_id": "N0042",
    "patient_id": "P000123",
    "action": "print",
    "resource_type": "DiagnosticReport",
    "workstation": "ws-1",
    "outcome": "failure",
    "emergency": True,
    "purpose": "ETREAT",
    "source": "emr",
    "encounter_id": "E-1",
}


def test_jsonl_line() -> None:
    got = parse_jsonl_line(orjson.dumps(CANONICAL))
    assert got == ev(
        event_id="e1",
        action="print",
        resource_type="DiagnosticReport",
        workstation="ws-1",
        outcome="failure",
        emergency=True,
        purpose="ETREAT",
        source="emr",
        encounter_id="E-1",
    )
    assert parse_jsonl_line(orjson.dumps(got.to_dict())) == got


def test_jsonl_nested_extra_fields_are_kept() -> None:
    got = parse_canonical({**CANONICAL, "context": {"ward": "ICU", "beds": [1, 2]}})
    assert got.extra == {"context": {"ward": "ICU", "beds": [1, 2]}}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("1", True),
        ("0", False),
        ("true", True),
        ("false", False),
        ("", False),
        (None, False),
    ],
)
def test_emergency_spellings(value: Any, expected: bool) -> None:
    assert parse_canonical({**CANONICAL, "emergency": value}).emergency is expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{oops", "invalid JSON"),
        (b"[]", "expected a JSON object, got array"),
        (b'{"ts": "2026-03-02T09:15:27Z", "user_id": "u"}', "missing required field 'event_id'"),
        (b'{"event_id": "e", "ts": "2026-03-02T09:15:27Z", "user_id": ""}', "must be non-empty"),
        (b'{"event_id": "e", "ts": "noon", "user_id": "u"}', "bad timestamp 'noon'"),
        (
            b'{"event_id": "e", "ts": "2026-03-02T09:15:27Z", "user_id": "u", "action": "peek"}',
            "unknown action 'peek'",
        ),
        (
            b'{"event_id": "e", "ts": "2026-03-02T09:15:27Z", "user_id": {"id": 1}}',
            "field 'user_id' must be a string, got object",
        ),
        (
            b'{"event_id": "e", "ts": "2026-03-02T09:15:27Z", "user_id": "u", "action": 5}',
            "malformed event",
        ),
    ],
)
def test_bad_jsonl(line: bytes, message: str) -> None:
    with pytest.raises(EventError) as info:
        parse_jsonl_line(line)
    assert message in str(info.value)


@given(st.binary(max_size=200) | json_values.map(orjson.dumps))
@settings(max_examples=400, deadline=None)
def test_fuzz_jsonl_only_event_error(data: bytes) -> None:
    with contextlib.suppress(EventError):
        parse_jsonl_line(data)


def test_csv_rows_match_jsonl() -> None:
    header = list(CANONICAL)
    values = ["1" if k == "emergency" else str(v) for k, v in CANONICAL.items()]
    assert parse_csv_row(header, values) == parse_jsonl_line(orjson.dumps(CANONICAL))
    with pytest.raises(EventError, match="row has 2 fields, header has 12"):
        parse_csv_row(header, values[:2])


def test_iter_csv_numbers_lines_and_keeps_raw_bytes() -> None:
    lines = [
        "\ufeffevent_id, ts ,user_id,patient_id,action,emergency,note\n".encode(),
        b"e1,2026-03-02T09:15:27+08:00,N0042,P1,view,0,\n",
        b"\n",
        b'e2,2026-03-02T09:16:00+08:00,N0042,P2,print,true,"said ""urgent"", then printed"\r\n',
        b"e3,2026-03-02T09:17:00+08:00,N0042\n",
        b'e4,2026-03-02T09:18:00+08:00,N0042,P4,view,1,"unterminated\n',
        b"e5,2026-03-02T09:19:00+08:00,N0\xff42,P5,view,1,x\n",
    ]
    out = list(iter_csv(lines))
    assert [n for n, _, _ in out] == [2, 4, 5, 6, 7]
    e1, e2 = out[0][1], out[1][1]
    assert isinstance(e1, AccessEvent) and isinstance(e2, AccessEvent)
    assert (e1.emergency, e1.extra, e2.action, e2.emergency) == (False, {}, "print", True)
    assert e2.extra == {"note": 'said "urgent", then printed'}
    assert out[1][2] == lines[3].rstrip(b"\r\n")
    assert "row has 3 fields, header has 7" in str(out[2][1])
    assert "bad CSV row" in str(out[3][1])
    assert "not valid UTF-8" in str(out[4][1])


def test_iter_csv_header_without_required_column() -> None:
    out = list(iter_csv([b"id,ts,user\n", b"e1,2026-03-02T09:15:27Z,u\n"]))
    assert len(out) == 1 and "CSV header (line 1) has no event_id, user_id column" in str(out[0][1])


# --------------------------------------------------------------------------- readers


def _lines_of(event: AccessEvent) -> bytes:
    return orjson.dumps(to_audit_event(event))


GOOD1 = _lines_of(ev(event_id="g1", source="emr"))
GOOD2 = _lines_of(ev(event_id="g2", source="emr", action="print"))
GOOD3 = _lines_of(ev(event_id="g3", source="emr", action="query"))
GOOD4 = _lines_of(ev(event_id="g4", source="emr", outcome="failure"))
NO_AGENT = orjson.dumps(r4(id="bad-agent", agent=None))

MIXED_FHIR = [
    GOOD1,  # 1
    b"",  # 2 blank
    b"{not json at all",  # 3
    NO_AGENT,  # 4 missing fields
    GOOD2[: len(GOOD2) // 2],  # 5 truncated
    b"\x00\x9f\xff\xfe\x01\x02garbage\x80",  # 6 binary
    GOOD2,  # 7
    b"   \t",  # 8 whitespace only
    b"[1,2,3]",  # 9
    GOOD3 + b"\r",  # 10 CRLF
    GOOD4,  # 11, no final newline
]


def _write(path: Path, lines: list[bytes], final_newline: bool = False) -> Path:
    path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline else b""))
    return path


def _check_mixed(records: list[Any]) -> None:
    numbers = [n for n, _, _ in records]
    assert numbers == [1, 3, 4, 5, 6, 7, 9, 10, 11]
    kinds = {n: r for n, r, _ in records}
    assert [n for n, r in kinds.items() if isinstance(r, AccessEvent)] == [1, 7, 10, 11]
    assert [kinds[n].event_id for n in (1, 7, 10, 11)] == ["g1", "g2", "g3", "g4"]
    assert "invalid JSON" in str(kinds[3])
    assert "AuditEvent has no agent" in str(kinds[4])
    assert "invalid JSON" in str(kinds[5])
    assert "invalid JSON" in str(kinds[6])
    assert "expected a JSON object, got array" in str(kinds[9])
    raws = {n: raw for n, _, raw in records}
    assert raws[1] == GOOD1 and raws[6] == MIXED_FHIR[5] and raws[10] == GOOD3


def test_read_events_mixed_fhir_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.ndjson", MIXED_FHIR)
    records = list(read_events(path))
    _check_mixed(records)
    stats = ParseStats(keep=3)
    assert len(list(stats.track(read_events(path, "fhir")))) == 9
    assert (stats.ok, stats.bad, stats.total) == (4, 5, 9)
    assert [n for n, _ in stats.first_bad] == [3, 4, 5]
    assert "AuditEvent has no agent" in stats.first_bad[1][1]
    summary = stats.summary()
    assert summary.startswith("4 events read, 5 malformed lines skipped")
    assert "line 4: AuditEvent has no agent" in summary and "... and 2 more" in summary


def test_read_events_gzip_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"\n".join(MIXED_FHIR)
    gz = tmp_path / "audit.ndjson.gz"
    gz.write_bytes(gzip.compress(data))
    _check_mixed(list(read_events(gz)))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(data))))
    _check_mixed(list(read_events("-")))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    _check_mixed(list(read_events("-", "fhir")))


def test_truncated_gzip_ends_with_one_error_record(tmp_path: Path) -> None:
    lines = [_lines_of(ev(event_id=f"g{i}", source="emr")) for i in range(3000)]
    blob = gzip.compress(b"\n".join(lines) + b"\n")
    path = tmp_path / "cut.ndjson.gz"
    path.write_bytes(blob[: len(blob) // 2])
    records = list(read_events(path))
    *good, last = records
    assert good and all(isinstance(r, AccessEvent) for _, r, _ in good)
    assert [n for n, _, _ in good] == list(range(1, len(good) + 1))
    assert last[0] == len(good) + 1
    assert isinstance(last[1], EventError) and "corrupt or truncated" in str(last[1])


def test_read_events_jsonl_and_csv_files(tmp_path: Path) -> None:
    good = orjson.dumps(CANONICAL)
    jsonl = _write(
        tmp_path / "events.jsonl", [good, b"", b'{"event_id": "x"}', good[:20], b"\xff\xfe"], True
    )
    out = list(read_events(jsonl))
    assert [(n, isinstance(r, AccessEvent)) for n, r, _ in out] == [
        (1, True),
        (3, False),
        (4, False),
        (5, False),
    ]
    assert "missing required field 'ts'" in str(out[1][1])

    rows = [
        b"event_id,ts,user_id,patient_id,action,resource_type,workstation,outcome,emergency,purpose,source",
        b"c1,2026-03-02T09:15:27+08:00,N0042,P1,view,Observation,ws-1,success,0,TREAT,emr",
        b"",
        b"c2,2026-03-02T09:15:28+08:00,N0042,P1,view,,,,1,,",
        b"c3,2026-03-02T09:15:29+08:00,N0042",
        b"\x00\x01\x02\xff",
        b"c4,not-a-time,N0042,P1,view,,,,,,",
    ]
    csv_path = _write(tmp_path / "events.csv", rows, True)
    out = list(read_events(csv_path))
    assert [n for n, _, _ in out] == [2, 4, 5, 6, 7]
    assert [isinstance(r, AccessEvent) for _, r, _ in out] == [True, True, False, False, False]
    c2 = out[1][1]
    assert isinstance(c2, AccessEvent)
    assert (c2.emergency, c2.resource_type, c2.outcome) == (True, "Patient", "success")
    assert out[2][2] == rows[4]
    assert "bad timestamp 'not-a-time'" in str(out[4][1])


@given(
    st.lists(
        st.sampled_from([GOOD1, GOOD2, b"", b"  ", b"{", b"[]", NO_AGENT, b"\x00\xff", GOOD3[:40]]),
        max_size=30,
    )
)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_read_events_yields_every_non_blank_line_once(tmp_path: Path, lines: list[bytes]) -> None:
    assume(any(line.strip() for line in lines))
    path = _write(tmp_path / "p.ndjson", lines)
    records = list(read_events(path, "fhir"))
    expected = [i for i, line in enumerate(lines, 1) if line.strip()]
    assert [n for n, _, _ in records] == expected
    assert [raw for _, _, raw in records] == [lines[i - 1] for i in expected]
    good = {GOOD1, GOOD2}
    assert [isinstance(r, AccessEvent) for _, r, _ in records] == [
        lines[i - 1] in good for i in expected
    ]


# --------------------------------------------------------------------------- format detection


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        ("a.ndjson", GOOD1 + b"\n", "fhir"),
        ("a.json", b"\n\n" + GOOD1, "fhir"),
        ("a.jsonl", orjson.dumps(CANONICAL), "jsonl"),
        ("a.ndjson", b"{garbage\n" + GOOD1, "fhir"),  # a bad first line does not decide alone
        ("a.jsonl", b"not json at all\n", "jsonl"),  # the extension still says JSON
        ("a.ndjson", b"", "jsonl"),
        ("a.csv", GOOD1, "csv"),  # the extension wins for CSV
        ("events", GOOD1, "fhir"),
        ("events.txt", orjson.dumps(CANONICAL), "jsonl"),
        ("events.log", b"event_id,ts,user_id\ne1,2026-03-02T09:15:27Z,u\n", "csv"),
        ("events", b"", "csv"),
    ],
)
def test_detect_format(tmp_path: Path, name: str, content: bytes, fmt: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert detect_format(path) == fmt
    gz = tmp_path / (name + ".gz")
    gz.write_bytes(gzip.compress(content))
    assert detect_format(gz) == fmt
    hidden = tmp_path / ("z" + name)  # gzip found by its magic bytes, not by name
    hidden.write_bytes(gzip.compress(content))
    assert detect_format(hidden) == fmt


def test_read_events_refuses_bad_arguments_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        read_events(tmp_path / "x.ndjson", "xml")
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / "missing.ndjson")
    with pytest.raises(ValueError, match="stdin"):
        detect_format("-")
