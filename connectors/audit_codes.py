"""Audit code tables and mapping rules shared by the FHIR and ATNA connectors.

A FHIR AuditEvent (:mod:`connectors.fhir`) and a DICOM PS3.15 audit message
(:mod:`connectors.atna`) record the same access with the same DICOM / IHE / FHIR codes;
CONTRACTS §3 says which canonical event each gives. Both connectors import their code
tables and the format-independent rules from here, so they cannot drift apart:

* the action (:func:`refine_action`): the action code C/R/U/D/E, refined by the event
  codes (FHIR ``type``/``subtype``, R5 ``category``/``code``; DICOM ``EventID`` /
  ``EventTypeCode``): exfiltration (print/export/copy/forward) > DICOM 110106 Export >
  FHIR restful-interaction > DICOM 110112 Query and IHE transactions > the action code;
* the category (:func:`event_category`): DICOM 110114 User Authentication,
  110113 Security Alert, else ``access``;
* emergency (:func:`is_emergency`): ETREAT/BTG among the purposes (event level or the
  requestor's), or DICOM 110127 Emergency Override Started among the event codes;
* the outcome (:data:`OUTCOMES`); the user (:func:`requestor_candidates`): the agents
  marked as requestor, persons before machines, else the first agent.

>>> refine_action("execute", ["110112"]), refine_action("view", ["110106", "read"])
('query', 'export')
>>> refine_action("create", ["110107", "ITI-43"]), refine_action("view", ["read", "print"])
('view', 'print')
>>> event_category(["110114", "110122"]), event_category(["rest", "read"])
('authentication', 'access')
>>> is_emergency(["110113", "110127"]), is_emergency([], ["TREAT"], ["btg"])
(True, True)
>>> requestor_candidates(["app", "dr"], lambda p: True, lambda p: ["110150"] * (p == "app"))
['dr', 'app']
>>> requestor_candidates(["srv", "dr"], lambda p: False, lambda p: ())
['srv']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

__all__ = [
    "ACTION_CODES",
    "ACTION_OUT",
    "CATEGORY_OUT",
    "DCM",
    "DCM_SYSTEM",
    "DICOM_EXPORT",
    "EMERGENCY_OVERRIDE",
    "EMERGENCY_PURPOSES",
    "EVENT_CATEGORIES",
    "EXFIL_ACTIONS",
    "IHE_ACTIONS",
    "MACHINE_ROLES",
    "OUTCOMES",
    "REST_ACTIONS",
    "SOURCE_ROLE",
    "event_category",
    "is_emergency",
    "refine_action",
    "requestor_candidates",
]

T = TypeVar("T")

#: AuditEvent.action / DICOM EventActionCode (FHIR R4, R5 and DICOM share the list).
ACTION_CODES = {"C": "create", "R": "view", "U": "update", "D": "delete", "E": "execute"}
#: FHIR restful-interaction codes (any system) that say what the REST call really did.
REST_ACTIONS = {
    "read": "view",
    "vread": "view",
    "history-instance": "view",
    "search": "query",
    "search-type": "query",
    "search-system": "query",
    "history-type": "query",
    "history-system": "query",
    "create": "create",
    "update": "update",
    "patch": "update",
    "delete": "delete",
}
#: Codes (any system) for taking data out of the record system. They win over every other
#: code: "printed a read" is a print, and exfiltration is what a privacy officer must see.
EXFIL_ACTIONS = {"print": "print", "export": "export", "copy": "copy", "forward": "forward"}
#: DICOM 110106 Export: export, unless an exfiltration code says which (CONTRACTS §3).
DICOM_EXPORT = "110106"
#: DICOM / IHE event codes that say what happened; consulted after the FHIR REST codes
#: (a REST code names the interaction itself, a transaction only the profile's intent).
IHE_ACTIONS = {
    "110112": "query",  # DICOM Query
    **dict.fromkeys(
        (
            "ITI-9",  # PIX Query
            "ITI-18",  # Registry Stored Query
            "ITI-21",  # Patient Demographics Query
            "ITI-22",  # PDQ with visit
            "ITI-38",  # Cross Gateway Query
            "ITI-47",  # PDQ HL7 v3
            "ITI-51",  # Multi-Patient Stored Query
            "ITI-63",  # XCF Cross Gateway Fetch
            "ITI-66",  # MHD Find Document Lists
            "ITI-67",  # MHD Find Document References
            "ITI-78",  # PDQm
            "ITI-83",  # PIXm
        ),
        "query",
    ),
    **dict.fromkeys(
        (
            "ITI-17",  # Retrieve Document
            "ITI-39",  # Cross Gateway Retrieve
            "ITI-43",  # Retrieve Document Set
            "ITI-68",  # MHD Retrieve Document
            "RAD-69",  # Retrieve Imaging Document Set
        ),
        "view",
    ),
    **dict.fromkeys(
        (
            "ITI-15",  # Provide and Register Document Set
            "ITI-41",  # Provide and Register Document Set-b
            "ITI-42",  # Register Document Set-b
            "ITI-65",  # MHD Provide Document Bundle
        ),
        "create",
    ),
    "ITI-57": "update",  # Update Document Set
    "ITI-62": "delete",  # Delete Document Set
    "ITI-32": "export",  # Distribute Document Set on Media
}
#: DICOM audit event ids that are not record accesses.
EVENT_CATEGORIES = {"110113": "security_alert", "110114": "authentication"}
#: canonical event_category → the DICOM event id (code, display) the encoders write
CATEGORY_OUT = {
    "authentication": ("110114", "User Authentication"),
    "security_alert": ("110113", "Security Alert"),
}
#: DICOM Security Alert type "Emergency Override Started": break-the-glass.
EMERGENCY_OVERRIDE = "110127"
#: PurposeOfUse codes (any case) that mean emergency access (break-the-glass).
EMERGENCY_PURPOSES = frozenset({"ETREAT", "BTG"})
#: Outcome codes (FHIR ``outcome``, R5 ``outcome.code``, DICOM EventOutcomeIndicator);
#: looked up lower-cased: Firely and some R5 servers send the display word.
OUTCOMES = {
    "0": "success",
    "4": "failure",
    "8": "failure",
    "12": "failure",
    "success": "success",
    "failure": "failure",
}
#: DICOM "Source Role ID": the agent that stands for the client machine (its address is
#: the workstation when the requestor has none).
SOURCE_ROLE = "110153"
#: DICOM role codes of machines and applications (Application, Application Launcher,
#: Destination Role ID, Source Role ID): among several requestors a person is preferred.
MACHINE_ROLES = frozenset({"110150", "110151", "110152", "110153"})
#: canonical action → the action code both encoders write
ACTION_OUT = {
    "create": "C",
    "view": "R",
    "query": "E",
    "update": "U",
    "delete": "D",
    "execute": "E",
    "print": "R",
    "export": "R",
    "copy": "R",
    "forward": "R",
}
#: DICOM code system: as DICOM audit XML names it, and as a FHIR Coding.system
DCM = "DCM"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"


def refine_action(base: str, codes: Sequence[str]) -> str:
    """The canonical action ``base`` (from the action code) refined by the event codes:
    exfiltration > DICOM Export > FHIR REST > DICOM Query / IHE transaction > ``base``;
    within each rank the first code in document order wins."""
    rest = ihe = ""
    for c in codes:
        exfil = EXFIL_ACTIONS.get(c)
        if exfil is not None:
            return exfil
        if not rest:
            rest = REST_ACTIONS.get(c, "")
        if not ihe:
            ihe = IHE_ACTIONS.get(c, "")
    if DICOM_EXPORT in codes:
        return "export"
    return rest or ihe or base


def event_category(codes: Iterable[str]) -> str:
    """The first category code's category; ``access`` when there is none."""
    for code in codes:
        category = EVENT_CATEGORIES.get(code)
        if category:
            return category
    return "access"


def is_emergency(codes: Sequence[str], *purposes: Iterable[str]) -> bool:
    """Emergency access: 110127 among the event ``codes``, or ETREAT/BTG (any case) in
    any of the ``purposes`` lists (event level and the requestor's own)."""
    if EMERGENCY_OVERRIDE in codes:
        return True
    return any(p.upper() in EMERGENCY_PURPOSES for group in purposes for p in group)


def requestor_candidates(
    agents: Sequence[T], is_requestor: Callable[[T], bool], roles: Callable[[T], Iterable[str]]
) -> list[T]:
    """Who the user may be, best first: the agents marked as requestor, persons before
    machines (:data:`MACHINE_ROLES`), each group in document order; if none is marked, the
    first agent (CONTRACTS §3). The caller takes the first candidate with a user id."""
    marked = [a for a in agents if is_requestor(a)]
    if not marked:
        return list(agents[:1])
    if len(marked) > 1:
        marked.sort(key=lambda a: not MACHINE_ROLES.isdisjoint(roles(a)))
    return marked
