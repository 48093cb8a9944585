"""FHIR AuditEvent (R4 and R5) → canonical :class:`AccessEvent` (CONTRACTS §3).

The inverse of :mod:`connectors.fhir_encode`. Three paths, one result:

* :func:`_parse_struct` reads the common R4 shape straight from a line's bytes: a
  ``msgspec`` decoder fills typed structs of a closed R4 schema (no dict, no untyped
  value) and the structs are mapped to the event by the general path's rules. Replay
  must reach 100k events/s *including* parsing, so this path is the budget. A line it is
  not sure of (another field or type, invalid JSON, any event error) goes on to orjson
  and the two paths below, so results and error messages are theirs.
* :func:`_parse_fast` handles the R4 shape our encoder and BALP-style servers emit
  (one agent, or BALP's user + client + server agents, with ``who.identifier.value``;
  relative references; Coding-shaped type/subtype/role) with direct dict access: for
  decoded dicts (:func:`parse_audit_event`) and lines the struct path hands on.
* :func:`_parse_general` handles every variant the contract and real feeds need: R5,
  several agents, ``who.reference`` (relative, absolute, versioned), identifier-only
  patients, codes as Coding *or* CodeableConcept, missing optional parts. It is
  defensive about types, so garbage input ends as :class:`EventError`, never as a
  ``TypeError`` deep in a worker.

Whenever the struct or fast path sees anything it does not fully understand it returns
``None`` and the next path decides; differential tests hold each of them to the general
path's answer. The code tables and the rules that are not about FHIR's shape (action
refinement, category, emergency, outcome, which requestor is the user) come from
:mod:`connectors.audit_codes`, shared with :mod:`connectors.atna`.

>>> e = parse_fhir_line(b'{"resourceType":"AuditEvent","id":"a1","action":"R",'
...     b'"recorded":"2026-03-01T08:00:00+08:00","outcome":"0",'
...     b'"agent":[{"who":{"reference":"Practitioner/dr7"},"requestor":true}],'
...     b'"entity":[{"what":{"reference":"Patient/p9"}},'
...     b'{"what":{"reference":"Observation/o1"}}]}')
>>> e.user_id, e.patient_id, e.action, e.resource_type
('dr7', 'p9', 'view', 'Observation')
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import msgspec
import orjson
from msgspec import Struct

from connectors.audit_codes import (
    ACTION_CODES,
    DICOM_EXPORT,
    EMERGENCY_OVERRIDE,
    EMERGENCY_PURPOSES,
    EVENT_CATEGORIES,
    EXFIL_ACTIONS,
    IHE_ACTIONS,
    OUTCOMES,
    REST_ACTIONS,
    SOURCE_ROLE,
    event_category,
    is_emergency,
    refine_action,
    requestor_candidates,
)
from emrwatch.events import AccessEvent, EventError, parse_ts

__all__ = ["parse_audit_event", "parse_fhir_line"]

_Event = AccessEvent
#: The positional order the fast path builds :class:`AccessEvent` in.
_FIELD_ORDER = (
    "event_id",
    "ts",
    "t",
    "user_id",
    "patient_id",
    "action",
    "resource_type",
    "workstation",
    "outcome",
    "emergency",
    "purpose",
    "source",
    "encounter_id",
    "event_category",
)


def _check_field_order() -> None:
    """Fail at import, not silently per event, if AccessEvent's fields are ever reordered."""
    names = tuple(f.name for f in fields(AccessEvent))[: len(_FIELD_ORDER)]
    if names != _FIELD_ORDER:
        raise ImportError(
            f"connectors.fhir builds AccessEvent positionally; fields are now {names}"
        )


_check_field_order()

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError

# The code tables and the format-independent rules live in connectors.audit_codes, shared
# with connectors.atna so that the two connectors cannot drift apart. Tables whose methods
# the hot paths call are bound to module names here: CPython 3.11 compiles ``NAME.get(...)``
# on an imported name to a plain attribute load plus a bound-method object per call (no
# LOAD_METHOD), which cost ~2% of the per-event budget.
_ACTION_CODES = ACTION_CODES
_EVENT_CATEGORIES = EVENT_CATEGORIES
_OUTCOMES = OUTCOMES
_FAST_OUTCOMES = {code: out for code, out in OUTCOMES.items() if code.isdigit()}
_BALP_ENTITY_TYPE = frozenset(
    {
        "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
        "http://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
    }
)
#: Codes that change the result when they appear as a type/subtype code. The fast path
#: leaves any event carrying one it cannot resolve on its own to the general path.
_SPECIAL_CODES = frozenset(
    {
        *REST_ACTIONS,
        *EXFIL_ACTIONS,
        DICOM_EXPORT,
        *IHE_ACTIONS,
        *EVENT_CATEGORIES,
        EMERGENCY_OVERRIDE,
    }
)
_REFINE = {**REST_ACTIONS, **EXFIL_ACTIONS}

#: Resource types seen all day in an EMR log: a set lookup instead of three str methods.
_COMMON_TYPES = frozenset(
    {
        "AllergyIntolerance",
        "Appointment",
        "CarePlan",
        "CareTeam",
        "Claim",
        "Communication",
        "Composition",
        "Condition",
        "Consent",
        "Coverage",
        "DiagnosticReport",
        "DocumentReference",
        "Encounter",
        "EpisodeOfCare",
        "Flag",
        "Goal",
        "ImagingStudy",
        "Immunization",
        "List",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationRequest",
        "MedicationStatement",
        "NutritionOrder",
        "Observation",
        "Procedure",
        "QuestionnaireResponse",
        "RelatedPerson",
        "ServiceRequest",
        "Specimen",
        "Task",
    }
)

_EMPTY: dict[str, Any] = {}  # read-only stand-in for a missing object; never mutated

_MMSS = {f":{m:02d}:{sec:02d}": m * 60 + sec for m in range(60) for sec in range(60)}
_HOURS = frozenset(f"{h:02d}" for h in range(24))
_HOUR_CACHE: dict[str, float] = {}  # "YYYY-MM-DDTHH" + zone → POSIX seconds of HH:00:00
_HOUR_CACHE_MAX = 1 << 16


# --------------------------------------------------------------------------- public API


def parse_fhir_line(line: bytes | bytearray | memoryview | str) -> AccessEvent:
    """One NDJSON line → event. Invalid JSON is an :class:`EventError` like any bad record."""
    try:
        record = _decode(line)
    except _STRUCT_ERRORS:
        pass  # not the closed R4 schema (or not JSON): the orjson paths decide
    else:
        event = _parse_struct(record)
        if event is not None:
            return event
    try:
        obj = _loads(line)
    except _JSONDecodeError as exc:
        raise EventError(f"invalid JSON: {exc}") from None
    if type(obj) is dict and obj.get("resourceType") == "AuditEvent":
        event = _parse_fast(obj)  # inlined parse_audit_event: one call less per event
        if event is not None:
            return event
    return parse_audit_event(obj)


def parse_audit_event(obj: Any) -> AccessEvent:
    """A decoded FHIR R4 or R5 AuditEvent → event; :class:`EventError` says why not."""
    if type(obj) is not dict:
        raise EventError(f"expected a JSON object, got {_kind(obj)}")
    rtype = obj.get("resourceType")
    if rtype != "AuditEvent":
        if rtype is None:
            raise EventError("not an AuditEvent: no resourceType")
        raise EventError(f"not an AuditEvent: resourceType is {_short(rtype)}")
    event = _parse_fast(obj)
    if event is not None:
        return event
    try:
        return _parse_general(obj)
    except EventError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError) as exc:
        # Belt and braces: the general path is written not to get here (a fuzz test
        # checks), but a worker must never die on one record.
        raise EventError(f"malformed AuditEvent ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- struct path
#
# A closed R4 schema. ``forbid_unknown_fields`` is what makes this path exact, not only
# fast: msgspec skips an unknown field without checking it the way orjson does (invalid
# UTF-8 in a string, a number beyond float range), so a line orjson rejects could be read
# here. With every field declared and typed (strings, booleans, structs, lists: no
# number, no ``Any``, no ``Raw``), every byte is checked, and anything else, including
# every R5 field, fails validation and takes the orjson paths. ``null`` is accepted only
# where a field is declared ``| None``: there it means "absent", as in the general path.
# Declared-but-unread fields (``meta``, ``system``, ...) are ones no path reads; if the
# general path ever reads one, read it here too (the differential tests edit them).


class _Coding(Struct, forbid_unknown_fields=True, gc=False):
    system: str = ""
    version: str = ""
    code: str = ""
    display: str = ""
    userSelected: bool = False


class _Concept(Struct, forbid_unknown_fields=True, gc=False):
    """CodeableConcept. No ``code``: a Coding-shaped concept is left to the general path."""

    coding: list[_Coding] = []
    text: str = ""


class _Identifier(Struct, forbid_unknown_fields=True, gc=False):
    use: str = ""
    type: _Concept | None = None
    system: str = ""
    value: str = ""


class _Reference(Struct, forbid_unknown_fields=True, gc=False):
    reference: str = ""
    type: str = ""
    identifier: _Identifier | None = None
    display: str = ""


class _Network(Struct, forbid_unknown_fields=True, gc=False):
    address: str = ""
    type: str = ""


class _Agent(Struct, forbid_unknown_fields=True, gc=False):
    type: _Concept | None = None
    role: list[_Concept] = []
    who: _Reference | None = None
    altId: str = ""
    name: str = ""
    requestor: bool = False
    location: _Reference | None = None
    policy: list[str] = []
    media: _Coding | None = None
    network: _Network | None = None
    purposeOfUse: list[_Concept] = []


class _Source(Struct, forbid_unknown_fields=True, gc=False):
    site: str = ""
    observer: _Reference | None = None
    type: list[_Coding] = []


class _Detail(Struct, forbid_unknown_fields=True, gc=False):
    type: str = ""
    valueString: str = ""
    valueBase64Binary: str = ""


class _Entity(Struct, forbid_unknown_fields=True, gc=False):
    what: _Reference | None = None
    type: _Coding | None = None
    role: _Coding | None = None
    lifecycle: _Coding | None = None
    securityLabel: list[_Coding] = []
    name: str = ""
    description: str = ""
    query: str = ""
    detail: list[_Detail] = []


class _Meta(Struct, forbid_unknown_fields=True, gc=False):
    versionId: str = ""
    lastUpdated: str = ""
    source: str = ""
    profile: list[str] = []
    security: list[_Coding] = []
    tag: list[_Coding] = []


class _AuditEvent(Struct, forbid_unknown_fields=True, gc=False):
    resourceType: str = ""
    id: str = ""
    meta: _Meta | None = None
    type: _Coding | None = None
    subtype: list[_Coding] = []
    action: str | None = None
    recorded: str | None = None
    outcome: str | None = None
    outcomeDesc: str = ""
    purposeOfUse: list[_Concept] = []
    agent: list[_Agent] = []
    source: _Source | None = None
    entity: list[_Entity] = []


_decode = msgspec.json.Decoder(_AuditEvent).decode
#: What the decoder raises on a line it will not read (ValidationError is a DecodeError;
#: UnicodeError: a str argument with lone surrogates; TypeError: not bytes-like or str).
_STRUCT_ERRORS = (msgspec.DecodeError, UnicodeError, RecursionError, TypeError)
#: Reference heads whose split :func:`_ref` would give unchanged (one "/", a type name).
_PLAIN_HEADS = frozenset({*_COMMON_TYPES, "Patient", "Encounter"})


def _parse_struct(a: _AuditEvent) -> AccessEvent | None:
    """:func:`_parse_general`, rule for rule, on the closed schema; ``None`` means "ask the
    orjson paths" (they also give every error, so this never raises one)."""
    event_id = a.id
    ts = a.recorded
    agents = a.agent
    if not event_id or ts is None or not agents or a.resourceType != "AuditEvent":
        return None
    agent = agents[0]
    if len(agents) > 1:  # _requestor
        marked = None
        for other in agents:
            if other.requestor:
                if marked is not None:
                    return None  # several requestors: the general path ranks them
                marked = other
        if marked is not None:
            agent = marked

    who = agent.who  # _user_id
    if who is None:
        return None
    ident = who.identifier
    user_id = ident.value if ident is not None else ""
    if not user_id:
        user_id = _ref(who.reference)[1]
        if not user_id:
            return None

    action = a.action  # _action and _category
    if action is None:
        action = "view"
    else:
        action = _ACTION_CODES.get(action)
        if action is None:
            return None
    category = "access"
    override = False  # DICOM 110127 Emergency Override among the codes
    typ = a.type
    subtype = a.subtype
    if len(subtype) <= 1 and (typ is None or typ.code not in _SPECIAL_CODES):
        if subtype:  # the one code that can matter
            code = subtype[0].code
            refined = _REFINE.get(code)
            if refined is not None:
                action = refined
            elif code in _SPECIAL_CODES:
                category = _EVENT_CATEGORIES.get(code, "access")
                action = refine_action(action, (code,))
                override = code == EMERGENCY_OVERRIDE
    else:
        codes = [] if typ is None or not typ.code else [typ.code]
        codes += [sub.code for sub in subtype if sub.code]
        category = event_category(codes)
        action = refine_action(action, codes)
        override = EMERGENCY_OVERRIDE in codes

    patient_id = resource_type = encounter_id = ""  # _entities
    for ent in a.entity:
        what = ent.what
        if what is None:
            rtype = rid = ""
        else:
            head, sep, rid = what.reference.partition("/")
            if sep and head in _PLAIN_HEADS and "/" not in rid:
                if head == "Patient" and rid:  # the branch below, taken once an event
                    if not patient_id:
                        patient_id = rid
                    continue
                rtype = head
            else:
                rtype, rid = _ref(what.reference)
                if not rtype:
                    rtype = _type_name(what.type)
        role = ent.role  # _marked_patient: role code 1, or the BALP entity type 1
        etype = ent.type
        if (
            rtype == "Patient"
            or (role is not None and role.code == "1")
            or (etype is not None and etype.code == "1" and etype.system in _BALP_ENTITY_TYPE)
        ):
            if not patient_id:
                patient_id = rid if rtype == "Patient" and rid else _ident_value(what) or rid
        elif rtype == "Encounter":
            if not encounter_id:
                encounter_id = rid or _ident_value(what)
        elif rtype and not resource_type:
            resource_type = rtype
    if not patient_id and category == "access":
        return None

    purpose = ""  # _purposes
    emergency = override
    if agent.purposeOfUse:
        codes = _concept_codes(a.purposeOfUse)
        agent_codes = _concept_codes(agent.purposeOfUse)
        emergency = override or is_emergency((), codes, agent_codes)
        purpose = (codes or agent_codes)[0] if codes or agent_codes else ""
    else:
        for concept in a.purposeOfUse:
            for coding in concept.coding:
                code = coding.code
                if code:
                    if not purpose:
                        purpose = code
                    if code.upper() in EMERGENCY_PURPOSES:
                        emergency = True

    net = agent.network  # _workstation
    workstation = net.address if net is not None else ""
    if not workstation and len(agents) > 1:
        for other in agents:
            if other is not agent and _is_source_role(other):
                net = other.network
                if net is not None and net.address:
                    workstation = net.address
                    break

    outcome = a.outcome  # _outcome
    if outcome is None:
        outcome = "success"
    else:
        outcome = _OUTCOMES.get(outcome.lower())
        if outcome is None:
            return None

    source = ""  # _source
    src = a.source
    if src is not None:
        observer = src.observer
        if observer is not None:
            source = observer.display or _ident_value(observer)
        if not source:
            source = src.site or (observer.reference if observer is not None else "")

    try:
        t = _time(ts)
    except EventError:
        return None
    return _Event(
        event_id,
        ts,
        t,
        user_id,
        patient_id,
        action,
        resource_type or "Patient",
        workstation,
        outcome,
        emergency,
        purpose,
        source,
        encounter_id,
        category,
    )


def _ident_value(ref: _Reference | None) -> str:
    if ref is None or ref.identifier is None:
        return ""
    return ref.identifier.value


def _concept_codes(concepts: list[_Concept]) -> list[str]:
    """:func:`_codes` of CodeableConcepts without ``code``: their codings' codes."""
    return [coding.code for concept in concepts for coding in concept.coding if coding.code]


def _is_source_role(agent: _Agent) -> bool:
    """``SOURCE_ROLE in _codes(agent.type, agent.role)``."""
    concepts = agent.role if agent.type is None else [agent.type, *agent.role]
    return SOURCE_ROLE in _concept_codes(concepts)


# --------------------------------------------------------------------------- fast path


def _parse_fast(obj: dict[str, Any]) -> AccessEvent | None:
    """The common R4 shape, by direct access; ``None`` means "ask the general path".

    Every check here mirrors a decision of :func:`_parse_general`; where the two could
    differ (R5 keys, several agents, identifier-only entities, special codes, absolute
    or versioned references, agent-level purposes) this returns ``None``.
    """
    try:
        if "category" in obj or "code" in obj or "authorization" in obj or "encounter" in obj:
            return None
        agents = obj["agent"]
        if type(agents) is not list:
            return None
        if len(agents) == 1:
            agent = agents[0]
            if "purposeOfUse" in agent or "authorization" in agent:
                return None
            user_id = agent["who"]["identifier"]["value"]
            net = agent.get("network")
            if net is None:
                if "networkString" in agent or "networkUri" in agent:
                    return None
                workstation = ""
            else:
                workstation = net["address"]
                if type(workstation) is not str or not workstation:
                    return None
        else:
            picked = _fast_agents(agents)
            if picked is None:
                return None
            user_id, workstation = picked
        event_id = obj["id"]
        ts = obj["recorded"]
        if type(event_id) is not str or type(user_id) is not str or type(ts) is not str:
            return None
        if not event_id or not user_id:
            return None

        typ = obj["type"]
        type_code = typ["code"]
        if type(type_code) is not str or type_code in _SPECIAL_CODES or "coding" in typ:
            return None
        action = _ACTION_CODES[obj["action"]]
        subtype = obj.get("subtype")
        if subtype is not None:
            if type(subtype) is not list or len(subtype) != 1:
                return None
            sub = subtype[0]
            if "coding" in sub:
                return None
            code = sub["code"]
            if type(code) is not str:
                return None
            refined = _REFINE.get(code)
            if refined is None:
                if code in _SPECIAL_CODES:
                    return None
            else:
                action = refined
        outcome = _FAST_OUTCOMES[obj["outcome"]]

        purpose = ""
        emergency = False
        pou = obj.get("purposeOfUse")
        if pou is not None:
            if type(pou) is not list:
                return None
            for concept in pou:
                if "code" in concept:
                    return None
                for coding in concept["coding"]:
                    code = coding["code"]
                    if type(code) is not str or not code:
                        return None
                    if not purpose:
                        purpose = code
                    if code.upper() in EMERGENCY_PURPOSES:
                        emergency = True

        source = ""
        src = obj.get("source")
        if src is not None:
            source = src["observer"]["display"]
            if type(source) is not str or not source:
                return None

        patient_id = resource_type = encounter_id = ""
        for ent in obj["entity"]:
            head, _, rid = ent["what"]["reference"].partition("/")
            if not rid or "/" in rid:
                return None
            if head == "Patient":
                if not patient_id:
                    patient_id = rid
                continue
            if head not in _COMMON_TYPES and not _is_type(head):
                return None
            role = ent.get("role")
            if role is not None and (
                type(role) is not dict
                or "coding" in role
                or type(role.get("code", ""))
                is not str  # e.g. a numeric 1: the general path decides
                or role.get("code") == "1"
            ):
                return None
            etype = ent.get("type")
            if type(etype) is dict and (
                etype.get("code") == "1" or type(etype.get("code", "")) is not str
            ):
                return None
            if head == "Encounter":
                if not encounter_id:
                    encounter_id = rid
            elif not resource_type:
                resource_type = head
        if not patient_id:
            return None
    except (KeyError, TypeError, IndexError, AttributeError):
        return None
    # Positional: half the cost of keywords. _check_field_order() guards the order.
    return _Event(
        event_id,
        ts,
        _time(ts),
        user_id,
        patient_id,
        action,
        resource_type or "Patient",
        workstation,
        outcome,
        emergency,
        purpose,
        source,
        encounter_id,
        "access",
    )


def _fast_agents(agents: list[Any]) -> tuple[str, str] | None:
    """(user_id, workstation) for several agents (BALP's user + client + server), with the
    general path's own helpers; ``None`` where the general path must decide."""
    dicts = [a for a in agents if type(a) is dict]
    if not dicts:
        return None
    agent = _requestor(dicts)
    if "purposeOfUse" in agent or "authorization" in agent:
        return None
    who = agent.get("who")
    if type(who) is not dict:
        return None
    ident = who.get("identifier")
    user_id = ident.get("value") if type(ident) is dict else None
    if type(user_id) is not str or not user_id:
        return None
    return user_id, _workstation(agent, dicts)


# --------------------------------------------------------------------------- general path


def _parse_general(obj: dict[str, Any]) -> AccessEvent:
    """Every R4/R5 variant; each helper owns one canonical field and its error message."""
    event_id = _s(obj.get("id"))
    if not event_id:
        raise EventError("AuditEvent has no id")
    ts = _recorded(obj)
    agents = [a for a in _list(obj.get("agent")) if type(a) is dict]
    if not agents:
        raise EventError("AuditEvent has no agent")
    agent = _requestor(agents)
    user_id = _user_id(agent)
    codes = _event_codes(obj)
    category = event_category(codes)
    patient_id, resource_type, encounter_id = _entities(obj, category)
    purposes, emergency = _purposes(obj, agent, codes)
    return AccessEvent(
        event_id=event_id,
        ts=ts,
        t=_time(ts),
        user_id=user_id,
        patient_id=patient_id,
        action=_action(obj.get("action"), codes),
        resource_type=resource_type,
        workstation=_workstation(agent, agents),
        outcome=_outcome(obj.get("outcome")),
        emergency=emergency,
        purpose=purposes[0] if purposes else "",
        source=_source(obj.get("source")),
        encounter_id=encounter_id,
        event_category=category,
    )


def _recorded(obj: dict[str, Any]) -> str:
    """``recorded`` (R4/R5), else when it happened: R5 ``occurred[x]``, R4 ``period``."""
    for value in (
        obj.get("recorded"),
        obj.get("occurredDateTime"),
        _dict(obj.get("occurredPeriod")).get("start"),
        _dict(obj.get("period")).get("start"),
    ):
        if value is not None:
            if type(value) is not str:
                raise EventError(f"recorded time is not a string: {_short(value)}")
            return value
    raise EventError(
        "AuditEvent has no recorded time (recorded, occurredDateTime or occurredPeriod.start)"
    )


def _time(ts: str) -> float:
    """POSIX seconds of ``ts``, exactly as :func:`parse_ts` computes them, but cheaper.

    ``datetime.timestamp()`` on an aware datetime costs ~0.5 µs, a tenth of the per-event
    budget. Access logs repeat the same date, hour and offset for thousands of events, so
    the common whole-second shape (``YYYY-MM-DDTHH:MM:SS`` + ``Z`` or ``±HH:MM``) is
    answered from a per-hour cache plus minutes and seconds. Everything else, and every
    error, goes through :func:`parse_ts` itself, so the two cannot disagree.
    """
    n = len(ts)
    if n == 25 or n == 20:
        mmss = _MMSS.get(ts[13:19])  # ":MM:SS" → seconds past the hour; validates both
        if mmss is not None:
            key = ts[:13] + ts[19:]
            base = _HOUR_CACHE.get(key)
            if base is None:
                base = _parse_hour(ts, key)
            if base is not None:
                return base + mmss
    return _parse_time(ts)


def _parse_hour(ts: str, key: str) -> float | None:
    """Seconds of ``ts`` with minutes and seconds zeroed, cached under ``key``.

    Only a plain ``YYYY-MM-DDTHH`` prefix is cached, so a cache hit also proves the
    prefix's shape. ``None`` means "not the common shape": :func:`_parse_time` then
    answers (or raises) for the original string.
    """
    if ts[4] != "-" or ts[7] != "-" or ts[10] != "T" or ts[11:13] not in _HOURS:
        return None  # also no "24": newer Pythons read T24:00:00 as the next midnight
    if ts[19] not in "Z+-":
        return None  # fractions stay exact only through parse_ts itself
    try:
        base = parse_ts(ts[:13] + ":00:00" + ts[19:])
    except (EventError, OverflowError, ValueError, OSError):
        return None
    if len(_HOUR_CACHE) >= _HOUR_CACHE_MAX:
        _HOUR_CACHE.clear()
    _HOUR_CACHE[key] = base
    return base


def _parse_time(ts: str) -> float:
    """:func:`parse_ts` with the field named in the error, so an integrator knows where to look."""
    try:
        return parse_ts(ts)
    except EventError as exc:
        raise EventError(f"recorded: {exc}") from None
    except (OverflowError, ValueError, OSError) as exc:  # out-of-range dates
        raise EventError(f"recorded: bad timestamp {_short(ts)} ({exc})") from None


def _requestor(agents: list[dict[str, Any]]) -> dict[str, Any]:
    """The agent with ``requestor: true`` (the user who asked), else the first.

    Several requestors (IHE puts the client machine next to the user): a person before a
    machine role (Source, Destination, Application), the first one with a user id; the
    rule :func:`connectors.audit_codes.requestor_candidates` shares with ATNA.
    """
    candidates = requestor_candidates(agents, _is_requestor, _agent_roles)
    if len(candidates) > 1:
        for agent in candidates:
            if _agent_user_id(agent):
                return agent
    return candidates[0]


def _is_requestor(agent: dict[str, Any]) -> bool:
    return agent.get("requestor") is True


def _agent_roles(agent: dict[str, Any]) -> list[str]:
    return _codes(agent.get("type"), agent.get("role"))


def _agent_user_id(agent: dict[str, Any]) -> str:
    """``who.identifier.value``, else the id in ``who.reference``; ``""`` when neither."""
    who = _dict(agent.get("who"))
    return _s(_dict(who.get("identifier")).get("value")) or _ref(who.get("reference"))[1]


def _user_id(agent: dict[str, Any]) -> str:
    user_id = _agent_user_id(agent)
    if not user_id:
        raise EventError("requesting agent has no user id (who.identifier.value or who.reference)")
    return user_id


def _workstation(agent: dict[str, Any], agents: list[dict[str, Any]]) -> str:
    """The requestor's network address; if it has none, the DICOM Source Role ID agent's.

    BALP puts the client machine's address on a separate "Source Role ID" agent, not on
    the user agent; without this fallback every BALP event would lose its workstation.
    """
    address = _address(agent)
    if address:
        return address
    for other in agents:
        if other is not agent and SOURCE_ROLE in _agent_roles(other):
            address = _address(other)
            if address:
                return address
    return ""


def _address(agent: dict[str, Any]) -> str:
    """R4 ``network.address``; R5 ``networkString`` / ``networkUri``."""
    return (
        _s(_dict(agent.get("network")).get("address"))
        or _s(agent.get("networkString"))
        or _s(agent.get("networkUri"))
    )


def _event_codes(obj: dict[str, Any]) -> list[str]:
    """All event type codes: R4 ``type``/``subtype``, R5 ``category``/``code``.

    Pooled because R5 servers disagree on which of ``category`` and ``code`` carries the
    REST interaction; the code lists we map (words vs DICOM numbers) cannot collide.
    """
    return _codes(obj.get("type"), obj.get("subtype"), obj.get("category"), obj.get("code"))


def _action(code: Any, codes: list[str]) -> str:
    """``action`` refined by the event codes (:func:`connectors.audit_codes.refine_action`):
    exfiltration > DICOM Export > REST > DICOM Query / IHE transaction > action."""
    if code is None:
        base = "view"
    else:
        found = _ACTION_CODES.get(code) if type(code) is str else None
        if found is None:
            raise EventError(f"unknown action code {_short(code)} (expected C, R, U, D or E)")
        base = found
    return refine_action(base, codes)


def _outcome(value: Any) -> str:
    """R4 code string, or R5 ``outcome.code`` (Coding, or CodeableConcept in the wild)."""
    if value is None:
        return "success"
    if type(value) is dict:
        codes = _codes(value.get("code"))
        if not codes:
            raise EventError("outcome has no code")
        code = codes[0]
    else:
        code = _s(value)
    outcome = _OUTCOMES.get(code.lower())
    if outcome is None:
        shown = _short(code) if code else _short(value)
        raise EventError(f"unknown outcome code {shown} (expected 0, 4, 8 or 12)")
    return outcome


def _purposes(
    obj: dict[str, Any], agent: dict[str, Any], codes: list[str]
) -> tuple[list[str], bool]:
    """Purpose codes, event-level first (R4 ``purposeOfUse``, R5 ``authorization``), else
    the requestor's own; break-the-glass if ETREAT or BTG appears at either level, or the
    event codes hold DICOM 110127 Emergency Override Started."""
    event_codes = _codes(obj.get("purposeOfUse"), obj.get("authorization"))
    agent_codes = _codes(agent.get("purposeOfUse"), agent.get("authorization"))
    return event_codes or agent_codes, is_emergency(codes, event_codes, agent_codes)


def _source(value: Any) -> str:
    """Observer display, observer identifier, site (R4 string / R5 Reference), observer ref."""
    src = _dict(value)
    observer = _dict(src.get("observer"))
    name = _s(observer.get("display")) or _s(_dict(observer.get("identifier")).get("value"))
    if name:
        return name
    site = src.get("site")
    if type(site) is dict:
        name = (
            _s(site.get("display"))
            or _s(_dict(site.get("identifier")).get("value"))
            or _s(site.get("reference"))
        )
    else:
        name = _s(site)
    return name or _s(observer.get("reference"))


def _entities(obj: dict[str, Any], category: str) -> tuple[str, str, str]:
    """(patient_id, resource_type, encounter_id) from the entities.

    The patient is the first entity referencing ``Patient/ID`` or marked as the patient
    (role ``1``, or the BALP entity type ``1``); Encounter entities give the encounter and
    are never the resource type; the resource type is the first other typed entity, else
    ``Patient``. R5's top-level ``patient`` / ``encounter`` are the fallbacks.
    """
    patient_id = resource_type = encounter_id = ""
    unnamed_patient = False
    for ent in _list(obj.get("entity")):
        if type(ent) is not dict:
            continue
        what = _dict(ent.get("what"))
        rtype, rid = _ref(what.get("reference"))
        if not rtype:
            rtype = _type_name(what.get("type"))
        if rtype == "Patient" or _marked_patient(ent):
            if not patient_id:
                if rtype == "Patient" and rid:
                    patient_id = rid
                else:
                    patient_id = _s(_dict(what.get("identifier")).get("value")) or rid
                unnamed_patient = unnamed_patient or not patient_id
        elif rtype == "Encounter":
            if not encounter_id:
                encounter_id = rid or _s(_dict(what.get("identifier")).get("value"))
        elif rtype and not resource_type:
            resource_type = rtype
    if not patient_id:
        patient_id = _ref_id(obj.get("patient"))
    if not encounter_id:
        encounter_id = _ref_id(obj.get("encounter"))
    if not patient_id and category == "access":
        if unnamed_patient:
            raise EventError("patient entity has no id (what.reference or what.identifier.value)")
        raise EventError(
            "no patient entity (what.reference 'Patient/ID', or role 1 with what.identifier.value)"
        )
    return patient_id, resource_type or "Patient", encounter_id


def _marked_patient(ent: dict[str, Any]) -> bool:
    """Role code 1 (object-role Patient; R4 Coding or R5 CodeableConcept) or BALP type 1."""
    if "1" in _codes(ent.get("role")):
        return True
    etype = _dict(ent.get("type"))
    return etype.get("code") == "1" and etype.get("system") in _BALP_ENTITY_TYPE


# --------------------------------------------------------------------------- JSON helpers


def _ref(ref: Any) -> tuple[str, str]:
    """A FHIR reference → (resource type, id); the type is ``""`` when it cannot be told.

    >>> _ref("Practitioner/7"), _ref("http://x/fhir/PractitionerRole/7/_history/2")
    (('Practitioner', '7'), ('PractitionerRole', '7'))
    >>> _ref("urn:uuid:1f2e"), _ref("http://x/fhir/7")
    (('', 'urn:uuid:1f2e'), ('', '7'))
    """
    if type(ref) is not str:
        return "", ""
    cut = ref.find("/_history/")
    if cut >= 0:
        ref = ref[:cut]
    head, sep, rid = ref.rpartition("/")
    if not sep:
        return "", ref
    rtype = head.rpartition("/")[2]
    return (rtype if _is_type(rtype) else ""), rid


def _ref_id(value: Any) -> str:
    """Id of an R5 top-level Reference (``patient``, ``encounter``)."""
    ref = _dict(value)
    return _ref(ref.get("reference"))[1] or _s(_dict(ref.get("identifier")).get("value"))


def _type_name(value: Any) -> str:
    """``Reference.type``: 'Patient' or 'http://hl7.org/fhir/StructureDefinition/Patient'."""
    if type(value) is not str:
        return ""
    name = value.rpartition("/")[2]
    return name if _is_type(name) else ""


def _is_type(name: str) -> bool:
    """FHIR resource type names are ASCII, alphanumeric and capitalised."""
    return name[:1].isupper() and name.isalnum() and name.isascii()


def _codes(*values: Any) -> list[str]:
    """Codes of Codings, CodeableConcepts or lists of either, in document order."""
    out: list[str] = []
    for value in values:
        for item in _list(value):
            if type(item) is not dict:
                continue
            code = _s(item.get("code"))
            if code:
                out.append(code)
            for coding in _list(item.get("coding")):
                if type(coding) is dict:
                    code = _s(coding.get("code"))
                    if code:
                        out.append(code)
    return out


def _dict(value: Any) -> dict[str, Any]:
    return value if type(value) is dict else _EMPTY


def _list(value: Any) -> list[Any] | tuple[Any, ...]:
    """Lists as is; a lone object (a common producer slip for 0..* fields) as a 1-list."""
    if type(value) is list:
        return value
    return () if value is None else (value,)


def _s(value: Any) -> str:
    """A string-ish JSON scalar as str (ids are sometimes numbers); anything else → ''."""
    if type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    return ""


def _kind(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _short(value: Any, limit: int = 60) -> str:
    """repr, cut short: error messages end up on stderr and in dead-letter records."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
