"""FHIR AuditEvent and IHE ATNA audit messages map to the same canonical events.

Both connectors take their code tables and format-independent rules from
:mod:`connectors.audit_codes` (CONTRACTS §3 where it is explicit, one shared rule where it
is silent). Two kinds of checks:

* encoded: a broad set of canonical events, written by each encoder
  (:func:`connectors.fhir_encode.to_audit_event`, :func:`connectors.atna.to_audit_message`)
  and read back by each connector, must give identical canonical events;
* hand-written: the same audit record written the way a FHIR server and an ATNA actor
  would write it, with the less common codes and participant layouts (IHE transactions,
  DICOM Query/Export/Emergency Override, several requestors, agent-level purposes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import orjson
import pytest

from connectors import audit_codes, fhir
from connectors.atna import AtnaSyslogConnector, octet_frame, to_audit_message
from connectors.base import RawRecord
from connectors.fhir import parse_audit_event, parse_fhir_line
from connectors.fhir_encode import to_audit_event
from connectors.registry import build
from connectors.testing import collect, normalize_all
from emrwatch.events import ACTIONS, AccessEvent, EventError

TS = "2026-03-01T08:15:00+08:00"
DCM = audit_codes.DCM_SYSTEM


@pytest.fixture(scope="module")
def atna() -> AtnaSyslogConnector:
    c = build({"type": "atna-syslog", "transport": "udp", "port": 0})
    assert isinstance(c, AtnaSyslogConnector)
    return c


def via_atna(c: AtnaSyslogConnector, message: bytes) -> AccessEvent:
    """The connector's own normalize(), as the runner calls it."""
    (out,) = c.normalize(RawRecord(message, "udp 127.0.0.1:5000 #1"))
    assert isinstance(out, AccessEvent)
    return out


def via_fhir(obj: dict[str, Any]) -> AccessEvent:
    """Every FHIR path: the struct/orjson line parser and the decoded-dict parser agree."""
    from_line = parse_fhir_line(orjson.dumps(obj))
    from_dict = parse_audit_event(obj)
    assert from_line.to_dict() == from_dict.to_dict()
    assert from_line.t == from_dict.t
    return from_dict


# ---------------------------------------------------------------------------- encoded events


def event(**kw: Any) -> AccessEvent:
    base: dict[str, Any] = {
        "event_id": "e1",
        "ts": TS,
        "user_id": "dr.li",
        "patient_id": "P9",
        "action": "view",
        "workstation": "ws-3",
        "source": "emr-core",
    }
    return AccessEvent.from_dict({**base, **kw})


def _events() -> list[AccessEvent]:
    out: list[AccessEvent] = []
    n = itertools.count(1)
    # every action in every category, with and without a patient where that is allowed
    for category, action in itertools.product(
        ("access", "authentication", "security_alert"), sorted(ACTIONS)
    ):
        out.append(event(event_id=f"a{next(n)}", action=action, event_category=category))
        if category != "access":
            out.append(
                event(event_id=f"a{next(n)}", action=action, event_category=category, patient_id="")
            )
    # outcome, emergency, purposes, resource types, encounters, odd characters
    variants: list[dict[str, Any]] = [
        {"outcome": "failure"},
        {"outcome": "failure", "action": "export", "resource_type": "DocumentReference"},
        {"emergency": True},
        {"emergency": True, "purpose": "ETREAT"},
        {"emergency": True, "purpose": "BTG", "action": "print"},
        {"emergency": True, "purpose": "TREAT"},  # the encoders add BTG after TREAT
        {"purpose": "TREAT"},
        {"purpose": "HPAYMT", "action": "query"},
        {"purpose": "etreat"},  # any case: emergency
        {"resource_type": "DocumentReference"},
        {"resource_type": "Observation", "action": "create", "encounter_id": "E-9"},
        {"resource_type": "DiagnosticReport", "action": "print"},
        {"resource_type": "ImagingStudy", "action": "export"},
        {"resource_type": "MedicationRequest", "action": "update"},
        {"resource_type": "Condition", "action": "delete", "outcome": "failure"},
        {"encounter_id": "E-1", "action": "copy"},
        {"workstation": "", "action": "forward"},
        {"source": "", "user_id": "o'brien & <co>", "patient_id": "P^1&2"},
        {"ts": "2026-03-01T00:15:00Z", "action": "query", "resource_type": "Observation"},
        {"event_category": "authentication", "patient_id": "", "outcome": "failure"},
        {"event_category": "authentication", "patient_id": "", "workstation": ""},
        {"event_category": "security_alert", "emergency": True},
        {"event_category": "security_alert", "emergency": True, "patient_id": ""},
        {"event_category": "security_alert", "purpose": "ETREAT", "action": "execute"},
        {"event_category": "security_alert", "outcome": "failure", "action": "delete"},
    ]
    for kw in variants:
        out.append(event(event_id=f"v{next(n)}", **kw))
    return out


EVENTS = _events()


def expected(e: AccessEvent) -> dict[str, Any]:
    want = e.to_dict()
    if e.emergency and not e.purpose:
        want["purpose"] = "BTG"  # both encoders say "emergency" with the BTG purpose code
    if want["purpose"].upper() in audit_codes.EMERGENCY_PURPOSES:
        want["emergency"] = True
    if not want.get("source"):
        want["source"] = "emr"  # both encoders' default observer
    return want


def test_the_event_set_is_broad() -> None:
    assert {e.action for e in EVENTS} == ACTIONS
    assert {e.event_category for e in EVENTS} == {"access", "authentication", "security_alert"}
    assert {e.outcome for e in EVENTS} == {"success", "failure"}
    assert any(e.emergency for e in EVENTS) and any(e.purpose for e in EVENTS)
    assert any(not e.patient_id for e in EVENTS if e.event_category == "authentication")
    assert {"DocumentReference", "Observation"} <= {e.resource_type for e in EVENTS}


@pytest.mark.parametrize("e", EVENTS, ids=lambda e: f"{e.event_id}-{e.event_category}-{e.action}")
def test_encoded_fhir_and_atna_give_identical_events(e: AccessEvent, atna: Any) -> None:
    got_fhir = via_fhir(to_audit_event(e))
    got_atna = via_atna(atna, to_audit_message(e))
    assert got_fhir.to_dict() == got_atna.to_dict()
    assert got_fhir.t == got_atna.t
    assert got_fhir.to_dict() == expected(e)


def test_encoded_events_through_both_connectors(tmp_path: Path, atna: Any) -> None:
    """The fhir-file connector over one NDJSON file; ATNA frames split as the listener does."""
    p = tmp_path / "audit.ndjson"
    p.write_bytes(b"".join(orjson.dumps(to_audit_event(e)) + b"\n" for e in EVENTS))
    c = build({"type": "fhir-file", "path": str(p)})
    outs, errs = normalize_all(c, collect(c))
    assert not errs
    from connectors.atna import split_frames

    stream = b"".join(octet_frame(to_audit_message(e)) for e in EVENTS)
    frames, used, error = split_frames(stream, 1 << 20, final=True)
    assert (used, error) == (len(stream), "")
    got_atna = [via_atna(atna, f).to_dict() for f in frames]
    assert [o.to_dict() for o in outs] == got_atna == [expected(e) for e in EVENTS]


def test_fhir_encoder_writes_the_dicom_event_type_of_a_category() -> None:
    login = to_audit_event(event(event_category="authentication", patient_id=""))
    alert = to_audit_event(event(event_category="security_alert"))
    access = to_audit_event(event())
    assert (login["type"]["system"], login["type"]["code"]) == (DCM, "110114")
    assert (alert["type"]["system"], alert["type"]["code"]) == (DCM, "110113")
    assert access["type"]["code"] == "rest"
    assert login["entity"] == []


def test_the_simulators_access_events_still_take_the_fast_paths() -> None:
    for e in EVENTS:
        if e.event_category == "access":
            obj = to_audit_event(e)
            assert fhir._parse_fast(obj) is not None, e
            assert fhir._parse_struct(fhir._decode(orjson.dumps(obj))) is not None, e


# ---------------------------------------------------------------------------- hand-written


@dataclass(frozen=True)
class Agent:
    """One agent / ActiveParticipant, written into both formats."""

    user: str = "dr.li"
    requestor: bool = True
    roles: tuple[str, ...] = ()
    address: str = ""
    purposes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Record:
    """One audit record; :func:`as_fhir` and :func:`as_atna` write it as each source would."""

    codes: tuple[str, ...] = ("110110",)  # FHIR type + subtype; DICOM EventID + EventTypeCode
    action: str = "R"
    agents: tuple[Agent, ...] = (Agent(address="ws-1"),)
    purposes: tuple[str, ...] = ()
    patient: str = "P9"
    resource: str = ""
    outcome: str = "0"


def as_fhir(r: Record) -> dict[str, Any]:
    def agent(a: Agent) -> dict[str, Any]:
        out: dict[str, Any] = {
            "who": {"identifier": {"value": a.user}} if a.user else {"display": "unknown"},
            "requestor": a.requestor,
        }
        if a.roles:  # the first role as the agent type (BALP), the others as roles
            out["type"] = {"coding": [{"system": DCM, "code": a.roles[0]}]}
            if a.roles[1:]:
                out["role"] = [{"coding": [{"system": DCM, "code": c}]} for c in a.roles[1:]]
        if a.address:
            out["network"] = {"address": a.address, "type": "2"}
        if a.purposes:
            out["purposeOfUse"] = [{"coding": [{"code": c}]} for c in a.purposes]
        return out

    obj: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": "h1",
        "type": {"system": DCM, "code": r.codes[0]},
        "action": r.action,
        "recorded": TS,
        "outcome": r.outcome,
        "agent": [agent(a) for a in r.agents],
        "source": {"observer": {"display": "emr-core"}},
        "entity": [],
    }
    if r.codes[1:]:
        obj["subtype"] = [{"system": "urn:ihe:event-type-code", "code": c} for c in r.codes[1:]]
    if r.purposes:
        obj["purposeOfUse"] = [{"coding": [{"code": c}]} for c in r.purposes]
    if r.patient:
        obj["entity"].append({"what": {"reference": f"Patient/{r.patient}"}})
    if r.resource:
        obj["entity"].append({"what": {"reference": r.resource}})
    return obj


def as_atna(r: Record) -> bytes:
    def coded(tag: str, code: str, system: str = "DCM") -> str:
        return f"<{tag} csd-code={quoteattr(code)} codeSystemName={quoteattr(system)}/>"

    def participant(a: Agent) -> str:
        attrs = f"UserID={quoteattr(a.user)} " if a.user else ""
        attrs += f'UserIsRequestor="{str(a.requestor).lower()}"'
        if a.address:
            attrs += f' NetworkAccessPointID={quoteattr(a.address)} NetworkAccessPointTypeCode="2"'
        inner = "".join(coded("RoleIDCode", c) for c in a.roles)
        inner += "".join(coded("PurposeOfUse", c, "2.16.840.1.113883.5.8") for c in a.purposes)
        return f"<ActiveParticipant {attrs}>{inner}</ActiveParticipant>"

    objects = ""
    if r.patient:
        objects += (
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(r.patient)}"
            ' ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1">'
            + coded("ParticipantObjectIDTypeCode", "2", "RFC-3881")
            + "</ParticipantObjectIdentification>"
        )
    if r.resource:
        objects += (
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(r.resource)}"
            ' ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="4">'
            + coded("ParticipantObjectIDTypeCode", r.resource.partition("/")[0], "FHIR-types")
            + "</ParticipantObjectIdentification>"
        )
    xml = (
        f'<AuditMessage><EventIdentification EventActionCode="{r.action}" EventDateTime="{TS}"'
        f' EventOutcomeIndicator="{r.outcome}">'
        + coded("EventID", r.codes[0])
        + "".join(coded("EventTypeCode", c, "IHE Transactions") for c in r.codes[1:])
        + "".join(coded("PurposeOfUse", c, "2.16.840.1.113883.5.8") for c in r.purposes)
        + "</EventIdentification>"
        + "".join(participant(a) for a in r.agents)
        + '<AuditSourceIdentification AuditSourceID="emr-core"/>'
        + objects
        + "</AuditMessage>"
    )
    head = '<110>1 2026-03-01T00:15:00Z emr01 emr - IHE+DICOM [emrwatch@32473 eventId="h1"] '
    return head.encode() + xml.encode()


HUMAN = Agent(user="nurse.zhao")
SOURCE = Agent(user="urn:oid:1.2.3.4", roles=("110153",), address="10.9.9.9")
DEST = Agent(user="emr01", roles=("110152",), address="10.0.0.1")
APP = Agent(user="viewer-app", roles=("110150",), address="10.8.8.8")

#: (record, the canonical fields it must give, whatever the format)
HAND_WRITTEN: dict[str, tuple[Record, dict[str, Any]]] = {
    # ---- actions: DICOM 110112 Query and IHE transactions (shared rule; the contract is
    # silent), after the FHIR REST codes; 110106 Export and exfiltration as in CONTRACTS §3
    "dicom-query": (Record(codes=("110112",), action="E"), {"action": "query"}),
    "dicom-query-iti18": (Record(codes=("110112", "ITI-18"), action="E"), {"action": "query"}),
    "mhd-find-iti67": (Record(codes=("110112", "ITI-67"), action="E"), {"action": "query"}),
    "pdq-iti21": (Record(codes=("110112", "ITI-21"), action="E"), {"action": "query"}),
    "import-iti43": (Record(codes=("110107", "ITI-43"), action="C"), {"action": "view"}),
    "mhd-retrieve-iti68": (Record(codes=("110106", "ITI-68"), action="R"), {"action": "export"}),
    "retrieve-iti68": (Record(codes=("110110", "ITI-68"), action="R"), {"action": "view"}),
    "xds-iti41": (Record(codes=("110106", "ITI-41"), action="R"), {"action": "export"}),
    "register-iti42": (Record(codes=("110107", "ITI-42"), action="C"), {"action": "create"}),
    "update-iti57": (Record(codes=("110110", "ITI-57"), action="U"), {"action": "update"}),
    "delete-iti62": (Record(codes=("110110", "ITI-62"), action="D"), {"action": "delete"}),
    "media-iti32": (Record(codes=("110110", "ITI-32"), action="R"), {"action": "export"}),
    "rest-beats-ihe": (Record(codes=("110112", "read"), action="E"), {"action": "view"}),
    "export-beats-rest": (Record(codes=("110106", "read"), action="R"), {"action": "export"}),
    "export-beats-ihe": (Record(codes=("110106", "ITI-43"), action="R"), {"action": "export"}),
    "exfil-beats-export": (Record(codes=("110106", "copy"), action="R"), {"action": "copy"}),
    "print-beats-query": (Record(codes=("110112", "print"), action="E"), {"action": "print"}),
    "unknown-code": (Record(codes=("110104", "110122"), action="D"), {"action": "delete"}),
    "plain-execute": (Record(codes=("110110",), action="E"), {"action": "execute"}),
    # ---- categories and emergency
    "login-no-patient": (
        Record(codes=("110114", "110122"), action="E", patient=""),
        {"event_category": "authentication", "patient_id": "", "action": "execute"},
    ),
    "login-failed": (
        Record(codes=("110114", "110122"), action="E", patient="", outcome="4"),
        {"event_category": "authentication", "outcome": "failure", "action": "execute"},
    ),
    "emergency-override": (
        Record(codes=("110113", "110127"), action="E"),
        {"event_category": "security_alert", "emergency": True, "purpose": "", "action": "execute"},
    ),
    "override-stopped": (
        Record(codes=("110113", "110138"), action="E", patient=""),
        {"event_category": "security_alert", "emergency": False, "action": "execute"},
    ),
    "agent-level-btg": (
        Record(purposes=("TREAT",), agents=(Agent(address="ws-1", purposes=("BTG",)),)),
        {"emergency": True, "purpose": "TREAT", "workstation": "ws-1"},
    ),
    "agent-level-purpose-only": (
        Record(agents=(Agent(purposes=("ETREAT",)),)),
        {"emergency": True, "purpose": "ETREAT"},
    ),
    "outcome-8": (Record(outcome="8"), {"outcome": "failure"}),
    "outcome-12": (Record(outcome="12"), {"outcome": "failure"}),
    # ---- several requestors: a person before a machine role (shared rule; the contract
    # only says "the agent with requestor: true, else the first agent")
    "source-machine-first": (
        Record(agents=(SOURCE, HUMAN)),
        {"user_id": "nurse.zhao", "workstation": "10.9.9.9"},
    ),
    "app-and-destination-first": (
        Record(agents=(APP, DEST, Agent(user="dr.wu", address="ws-7"))),
        {"user_id": "dr.wu", "workstation": "ws-7"},
    ),
    "two-people": (
        Record(agents=(Agent(user="a.first", address="ws-a"), Agent(user="b.second"))),
        {"user_id": "a.first", "workstation": "ws-a"},
    ),
    "machines-only": (
        Record(agents=(DEST, SOURCE)),
        {"user_id": "emr01", "workstation": "10.0.0.1"},
    ),
    "machine-with-two-roles": (
        Record(agents=(Agent(user="gw", roles=("110151", "110153"), address="10.7.7.7"), HUMAN)),
        {"user_id": "nurse.zhao", "workstation": "10.7.7.7"},
    ),
    "person-without-user-id": (
        Record(agents=(Agent(user="", address="ws-x"), SOURCE)),
        {"user_id": "urn:oid:1.2.3.4", "workstation": "10.9.9.9"},
    ),
    "non-requestor-person-ignored": (
        Record(agents=(Agent(user="bystander", requestor=False), SOURCE)),
        {"user_id": "urn:oid:1.2.3.4", "workstation": "10.9.9.9"},
    ),
    "no-requestor-first-agent": (  # CONTRACTS §3: else the first agent
        Record(agents=(Agent(user="first", requestor=False), Agent(user="x", requestor=False))),
        {"user_id": "first", "workstation": ""},
    ),
    "no-requestor-machine-first": (
        Record(agents=(Agent(user="srv", requestor=False, roles=("110152",)), HUMAN)),
        {"user_id": "nurse.zhao"},  # the human is the one marked requestor
    ),
    # ---- resource types
    "document-reference": (
        Record(codes=("110110", "ITI-68"), resource="DocumentReference/d1"),
        {"resource_type": "DocumentReference", "action": "view"},
    ),
    "observation": (Record(resource="Observation/o1"), {"resource_type": "Observation"}),
}


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_records_map_the_same(name: str, atna: Any) -> None:
    record, want = HAND_WRITTEN[name]
    got_fhir = via_fhir(as_fhir(record)).to_dict()
    got_atna = via_atna(atna, as_atna(record)).to_dict()
    assert got_fhir == got_atna
    full = {
        "event_id": "h1",
        "ts": TS,
        "user_id": "dr.li",
        "patient_id": "P9",
        "action": "view",
        "resource_type": "Patient",
        "workstation": "ws-1",
        "outcome": "success",
        "emergency": False,
        "purpose": "",
        "source": "emr-core",
        "event_category": "access",
    }
    if record.agents != Record().agents:
        full["workstation"] = ""
    full.update(want)
    if full["event_category"] == "access":
        del full["event_category"]  # to_dict() leaves the default out
    if record.patient == "":
        full["patient_id"] = ""
    assert got_fhir == full


@pytest.mark.parametrize(
    "record",
    [
        Record(agents=(Agent(user=""),)),  # the only requestor has no user id
        Record(agents=(Agent(user=""), Agent(user="x", requestor=False))),  # marked: no id
        Record(patient=""),  # an access needs a patient
        Record(outcome="3"),
        Record(action="X"),
    ],
    ids=["no-user-id", "requestor-without-id", "no-patient", "bad-outcome", "bad-action"],
)
def test_hand_written_records_both_refuse(record: Record, atna: Any) -> None:
    with pytest.raises(EventError):
        via_fhir(as_fhir(record))
    with pytest.raises(EventError):
        via_atna(atna, as_atna(record))


def test_both_connectors_use_the_shared_tables() -> None:
    """One module of codes: nothing for the two connectors to drift apart on."""
    from connectors import atna as atna_module

    for name in ("ACTION_CODES", "REST_ACTIONS", "EXFIL_ACTIONS", "IHE_ACTIONS", "OUTCOMES"):
        table = getattr(audit_codes, name)
        for module in (fhir, atna_module):  # no own copy; a private alias is the same object
            assert getattr(module, f"_{name}", table) is table, (module.__name__, name)
    assert atna_module.refine_action is fhir.refine_action is audit_codes.refine_action
    assert atna_module.requestor_candidates is audit_codes.requestor_candidates
    assert set(audit_codes.IHE_ACTIONS) | {audit_codes.EMERGENCY_OVERRIDE} <= fhir._SPECIAL_CODES
