"""The atna-syslog connector: IHE ATNA (DICOM audit XML over syslog, TLS/TCP/UDP)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.atna import (
    AtnaSyslogConnector,
    octet_frame,
    parse_atna,
    parse_cx,
    split_frames,
    split_syslog,
    to_audit_message,
)
from connectors.base import Connector, ConnectorConfigError, NullLedger, RawRecord
from connectors.fhir import parse_audit_event
from connectors.fhir_encode import to_audit_event
from connectors.net import peer_identity, server_ssl_context, subject_allowed, subject_cn
from connectors.registry import build
from connectors.testing import ConnectorConformance, collect
from emrwatch.events import AccessEvent, EventError

TS = "2026-03-01T08:15:00+08:00"


# ---------------------------------------------------------------------------- fixtures
class Pki:
    """A test CA with a server certificate and two client certificates (PEM files)."""

    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA(organization_name="Test Hospital CA")
        self.ca_file = str(root / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        server = self.ca.issue_cert("127.0.0.1", "localhost", common_name="atna-server")
        self.cert_file = str(root / "server.pem")
        self.key_file = str(root / "server.key")
        server.cert_chain_pems[0].write_to_path(self.cert_file)
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(self.cert_file, append=True)
        server.private_key_pem.write_to_path(self.key_file)
        self.clients: dict[str, tuple[str, str]] = {}
        for cn in ("emr01", "intruder"):
            c = self.ca.issue_cert(
                f"{cn}.hospital.test", common_name=cn, organization_name="Hospital"
            )
            cert, key = str(root / f"{cn}.pem"), str(root / f"{cn}.key")
            c.cert_chain_pems[0].write_to_path(cert)
            c.private_key_pem.write_to_path(key)
            self.clients[cn] = (cert, key)

    def server_config(self, **extra: Any) -> dict[str, Any]:
        return {
            "transport": "tls",
            "port": 0,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "ca_file": self.ca_file,
            **extra,
        }

    def client_context(self, client: str | None = "emr01") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if client:
            ctx.load_cert_chain(*self.clients[client])
        return ctx


_PKI: Pki | None = None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _pki(tmp_path_factory.mktemp("pki"))


def _pki(root: Path) -> Pki:
    global _PKI
    if _PKI is None:
        _PKI = Pki(root)
    return _PKI


def event(**kw: Any) -> AccessEvent:
    d: dict[str, Any] = {
        "event_id": "ev-1",
        "ts": TS,
        "user_id": "dr.wang",
        "patient_id": "P000123",
        "action": "view",
        "workstation": "10.1.2.3",
        "source": "emr-core",
    }
    d.update(kw)
    return AccessEvent.from_dict(d)


def tls_send(pki: Pki, port: int, payload: bytes, client: str | None = "emr01") -> bytes:
    """Connect, send ``payload``, close; whatever the server sent back (normally nothing)."""
    ctx = pki.client_context(client)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(payload)
        s.settimeout(0.5)
        try:
            return s.recv(100)
        except (TimeoutError, ssl.SSLError, OSError):
            return b""


class Running:
    """A started connector whose records() runs in a thread, collecting raw records."""

    def __init__(self, connector: AtnaSyslogConnector) -> None:
        self.c = connector
        self.stop = threading.Event()
        self.records: list[RawRecord] = []
        connector.start()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        for raw in self.c.records(None, self.stop):
            if raw is not None:
                self.records.append(raw)

    def wait(self, n: int, timeout: float = 10.0) -> list[RawRecord]:
        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.records)

    def close(self) -> None:
        self.stop.set()
        self.c.close()
        self.t.join(5)


@pytest.fixture()
def running() -> Iterator[Any]:
    started: list[Running] = []

    def make(config: dict[str, Any], ledger: NullLedger | None = None) -> Running:
        c = build({"type": "atna-syslog", **config}, ledger=ledger or NullLedger())
        assert isinstance(c, AtnaSyslogConnector)
        r = Running(c)
        started.append(r)
        return r

    yield make
    for r in started:
        r.close()


def receipts_of(ledger: NullLedger, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(ledger.receipts) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(ledger.receipts)


# ---------------------------------------------------------------------------- conformance
def _messages() -> list[bytes]:
    """Six messages: four good ones (assorted PRI/BOM/SD), two unusable ones."""
    good = [
        to_audit_message(event(event_id="c1")),
        to_audit_message(event(event_id="c2", action="export"), pri=85, bom=False),
        to_audit_message(event(event_id="c3", action="query", resource_type="Observation"), pri=13),
        to_audit_message(event(event_id="c4", emergency=True), with_event_id=False),
    ]
    not_xml = b"<13>1 2026-03-01T08:00:00Z host app - - - this is not an audit message"
    bad_action = to_audit_message(event(event_id="c6")).replace(
        b'EventActionCode="R"', b'EventActionCode="X"'
    )
    return good[:2] + [not_xml] + good[2:] + [bad_action]


class TestAtnaTlsConformance(ConnectorConformance):
    connector_type = "atna-syslog"
    expected = (6, 4, 2)
    push = True

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        pki = _pki(tmp_path)
        return pki.server_config(require_client_cert=True, allowed_subjects=["emr01"])

    def deliver(self, connector: Connector) -> None:
        assert isinstance(connector, AtnaSyslogConnector)
        assert connector.wait_ready(10)
        assert _PKI is not None
        tls_send(_PKI, connector.port, b"".join(octet_frame(m) for m in _messages()))


class TestAtnaUdpConformance(ConnectorConformance):
    connector_type = "atna-syslog"
    expected = (6, 4, 2)
    push = True

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"transport": "udp", "port": 0}

    def deliver(self, connector: Connector) -> None:
        assert isinstance(connector, AtnaSyslogConnector)
        assert connector.wait_ready(10)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for m in _messages():
                s.sendto(m, ("127.0.0.1", connector.port))


# ---------------------------------------------------------------------------- real-world variants
#: an RFC 3881-era message: ``code`` / ``codeSystem`` / ``displayName``, "TRUE", a namespace
OLD_STYLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<AuditMessage xmlns="urn:example:audit" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <EventIdentification EventActionCode="R" EventDateTime="2026-03-01T00:15:00Z"
                       EventOutcomeIndicator="0">
    <EventID code="110110" codeSystem="1.2.840.10008.2.16.4" displayName="Patient Record"/>
  </EventIdentification>
  <ActiveParticipant UserID="alice@HOSP" UserIsRequestor="TRUE"
                     NetworkAccessPointID="ws-77" NetworkAccessPointTypeCode="1"/>
  <AuditSourceIdentification AuditSourceID="pacs-1"/>
  <ParticipantObjectIdentification ParticipantObjectID="12345^^^&amp;1.2.3&amp;ISO"
      ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1">
    <ParticipantObjectIDTypeCode code="2" codeSystemName="RFC-3881"/>
  </ParticipantObjectIdentification>
  <ParticipantObjectIdentification ParticipantObjectID="1.2.840.113619.2.55"
      ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">
    <ParticipantObjectIDTypeCode code="110180" codeSystemName="DCM"/>
  </ParticipantObjectIdentification>
</AuditMessage>
"""


def dicom(
    event_id: str = "110110",
    action: str = "R",
    types: tuple[str, ...] = (),
    purposes: tuple[str, ...] = (),
    requestor: str = 'UserID="dr.li" UserIsRequestor="true" NetworkAccessPointID="ws-1"',
    objects: str | None = None,
    when: str = TS,
    outcome: str = "0",
) -> bytes:
    """A DICOM 2011+ audit message (csd-code) with the given codes."""
    type_xml = "".join(
        f'<EventTypeCode csd-code="{t}" codeSystemName="DCM" originalText="t"/>' for t in types
    )
    purpose_xml = "".join(
        f'<PurposeOfUse csd-code="{p}" codeSystemName="2.16.840.1.113883.5.8"/>' for p in purposes
    )
    if objects is None:
        objects = (
            '<ParticipantObjectIdentification ParticipantObjectID="P9^^^HOSP&amp;1.2.3&amp;ISO" '
            'ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1">'
            '<ParticipantObjectIDTypeCode csd-code="2" codeSystemName="RFC-3881"/>'
            "</ParticipantObjectIdentification>"
        )
    return (
        f'<AuditMessage><EventIdentification EventActionCode="{action}" EventDateTime="{when}" '
        f'EventOutcomeIndicator="{outcome}"><EventID csd-code="{event_id}" codeSystemName="DCM" '
        f'originalText="x"/>{type_xml}{purpose_xml}</EventIdentification>'
        f"<ActiveParticipant {requestor}/>"
        '<AuditSourceIdentification AuditSourceID="emr-core"/>'
        f"{objects}</AuditMessage>"
    ).encode()


def syslog(xml: bytes, pri: int = 110, sd: str = "-", bom: bool = True) -> bytes:
    head = f"<{pri}>1 2026-03-01T00:15:00.003Z emr01 emr 1234 IHE+DICOM {sd} ".encode()
    return head + (b"\xef\xbb\xbf" if bom else b"") + xml


def test_old_style_code_attributes_and_namespace() -> None:
    e = parse_atna(syslog(OLD_STYLE, pri=13, bom=False))
    assert (e.user_id, e.patient_id, e.action, e.resource_type) == (
        "alice@HOSP",
        "12345",
        "view",
        "ImagingStudy",
    )
    assert (e.workstation, e.source, e.ts, e.outcome) == (
        "ws-77",
        "pacs-1",
        "2026-03-01T00:15:00Z",
        "success",
    )
    assert e.t == AccessEvent.from_dict({"event_id": "x", "ts": TS, "user_id": "u"}).t


def test_csd_code_and_code_give_the_same_event() -> None:
    new = OLD_STYLE.replace(b' code="', b' csd-code="').replace(b"codeSystem=", b"codeSystemName=")
    a, b = parse_atna(new).to_dict(), parse_atna(OLD_STYLE).to_dict()
    assert a.pop("event_id") != b.pop("event_id")  # a hash of the XML as sent
    assert a == b


@pytest.mark.parametrize("pri", [0, 13, 85, 110, 191])
@pytest.mark.parametrize("bom", [True, False])
@pytest.mark.parametrize("sd", ["-", '[origin ip="10.0.0.5" software="EMR"][meta sequenceId="7"]'])
def test_header_variants(pri: int, bom: bool, sd: str) -> None:
    e = parse_atna(syslog(dicom(), pri=pri, sd=sd, bom=bom))
    assert (e.user_id, e.patient_id, e.action, e.workstation) == ("dr.li", "P9", "view", "ws-1")
    # the id comes from the XML only: the same audit record under any header has one id
    assert e.event_id == parse_atna(dicom()).event_id
    assert e.event_id.startswith("atna-")


def test_nilvalue_header_rfc3164_and_bare_xml() -> None:
    xml = dicom()
    want = parse_atna(xml).to_dict()
    for data in (
        b"<13>1 - - - - - - " + xml,
        b"<13>1 - - - - - -  \xef\xbb\xbf \n" + xml + b"\n",
        b"<85>Mar  1 00:15:00 emr01 atna[42]: " + xml,
        b"<110>Mar  1 00:15:00 emr01 atna: \xef\xbb\xbf" + xml,
        b"\xef\xbb\xbf" + xml,
    ):
        assert parse_atna(data).to_dict() == want, data[:40]
    m = split_syslog(b"<13>1 - - - - - - " + xml)
    assert (m.format, m.hostname, m.timestamp, m.structured_data) == ("rfc5424", "-", "-", {})


def test_structured_data_escapes_and_event_id() -> None:
    raw = syslog(dicom(), sd='[emrwatch@32473 eventId="a\\"b\\]c"][x@1 y="z"]')
    m = split_syslog(raw)
    assert m.structured_data["x@1"] == {"y": "z"}
    assert parse_atna(raw).event_id == 'a"b]c'


def test_requestor_case_and_human_preferred() -> None:
    objects_free = '<ActiveParticipant UserID="dr.li" UserIsRequestor="True"/>'
    xml = dicom(requestor='UserID="sys" UserIsRequestor="false"').replace(
        b"<AuditSourceIdentification", objects_free.encode() + b"<AuditSourceIdentification"
    )
    assert parse_atna(xml).user_id == "dr.li"
    # IHE ITI layout: the Source machine (role 110153) and the human are both requestors;
    # the human is the user, the machine's address is the workstation
    source = (
        '<ActiveParticipant UserID="urn:oid:1.2.3.4" UserIsRequestor="true" '
        'NetworkAccessPointID="10.9.9.9" NetworkAccessPointTypeCode="2">'
        '<RoleIDCode csd-code="110153" codeSystemName="DCM"/></ActiveParticipant>'
    )
    xml = dicom(requestor='UserID="nurse.zhao" UserIsRequestor="true"').replace(
        b"<ActiveParticipant", source.encode() + b"<ActiveParticipant", 1
    )
    e = parse_atna(xml)
    assert (e.user_id, e.workstation) == ("nurse.zhao", "10.9.9.9")
    # no participant marked as requestor: the first one, as for FHIR (CONTRACTS §3)
    assert parse_atna(dicom(requestor='UserID="a" UserIsRequestor="false"')).user_id == "a"


def test_strip_user_domain_only_when_configured() -> None:
    c = build({"type": "atna-syslog", "transport": "udp", "port": 0, "strip_user_domain": True})
    raw = RawRecord(syslog(OLD_STYLE), "t #1")
    assert c.normalize(raw)[0].user_id == "alice"  # type: ignore[union-attr]
    plain = build({"type": "atna-syslog", "transport": "udp", "port": 0})
    assert plain.normalize(raw)[0].user_id == "alice@HOSP"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- mapping
def test_parse_cx() -> None:
    assert parse_cx("12345^^^&1.2.3&ISO") == ("12345", "", "1.2.3")
    assert parse_cx("12345^^^HOSP&1.2.3&ISO^MR") == ("12345", "HOSP", "1.2.3")
    assert parse_cx("12345") == ("12345", "", "")
    assert parse_cx(" 77 ^^^HOSP") == ("77", "HOSP", "")
    assert parse_cx("a\\S\\b\\T\\c^^^X") == ("a^b&c", "X", "")


def test_assigning_authority_filter() -> None:
    two = (
        '<ParticipantObjectIdentification ParticipantObjectID="EXT-1^^^&amp;9.9.9&amp;ISO" '
        'ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1"/>'
        '<ParticipantObjectIdentification ParticipantObjectID="P9^^^HOSP&amp;1.2.3&amp;ISO" '
        'ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1"/>'
    )
    xml = dicom(objects=two)
    assert parse_atna(xml).patient_id == "EXT-1"
    assert parse_atna(xml, authorities=["1.2.3"]).patient_id == "P9"
    assert parse_atna(xml, authorities=["HOSP"]).patient_id == "P9"
    with pytest.raises(EventError, match="assigning authorities"):
        parse_atna(xml, authorities=["7.7.7"])
    c = build(
        {"type": "atna-syslog", "transport": "udp", "port": 0, "patient_id_authorities": ["HOSP"]}
    )
    assert c.normalize(RawRecord(xml, "x"))[0].patient_id == "P9"  # type: ignore[union-attr]


def test_resource_types_and_encounter() -> None:
    patient = (
        '<ParticipantObjectIdentification ParticipantObjectID="P9" '
        'ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1"/>'
    )

    def obj(id_: str, role: str, code: str = "", system: str = "") -> str:
        inner = f'<ParticipantObjectIDTypeCode csd-code="{code}" codeSystemName="{system}"/>'
        return (
            f'<ParticipantObjectIdentification ParticipantObjectID="{id_}" '
            f'ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="{role}">'
            f"{inner if code else ''}</ParticipantObjectIdentification>"
        )

    xds = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
    cases = {
        obj("1.2.3.99", "3", xds, "IHE XDS Metadata"): "DocumentReference",
        obj("doc-1", "3"): "DocumentReference",  # role Report, no id type
        obj("x", "4", "Observation", "http://hl7.org/fhir/resource-types"): "Observation",
        obj(
            "https://fhir.example/r4/MedicationRequest/5", "4", "12", "RFC-3881"
        ): "MedicationRequest",
        obj("q", "24", "ITI-18", "IHE Transactions"): "Patient",  # a query: no resource
    }
    for objects, want in cases.items():
        assert parse_atna(dicom(objects=patient + objects)).resource_type == want, objects
    enc = obj("E77^^^HOSP", "4", "3", "RFC-3881")
    e = parse_atna(dicom(objects=patient + enc))
    assert (e.encounter_id, e.resource_type) == ("E77", "Patient")


@pytest.mark.parametrize(
    ("event_id", "action", "types", "want"),
    [
        ("110110", "R", (), "view"),
        ("110110", "C", (), "create"),
        ("110110", "U", (), "update"),
        ("110110", "D", (), "delete"),
        ("110110", "E", (), "execute"),
        ("110106", "R", (), "export"),  # DICOM Export
        ("110106", "R", ("ITI-43",), "export"),  # as connectors.fhir: 110106 wins over codes
        ("110104", "R", (), "view"),  # DICOM Instances Accessed
        ("110104", "D", (), "delete"),
        ("110112", "E", (), "query"),  # DICOM Query
        ("110107", "C", ("ITI-43",), "view"),  # Import by a document consumer
        ("110112", "E", ("ITI-18",), "query"),
        ("110110", "R", ("print",), "print"),
        ("110110", "R", ("read",), "view"),
        ("110110", "E", ("search",), "query"),
        ("110106", "R", ("copy",), "copy"),  # exfiltration codes beat DICOM Export
    ],
)
def test_action_mapping(event_id: str, action: str, types: tuple[str, ...], want: str) -> None:
    assert parse_atna(dicom(event_id=event_id, action=action, types=types)).action == want


def test_outcomes() -> None:
    for code, want in (("0", "success"), ("4", "failure"), ("8", "failure"), ("12", "failure")):
        assert parse_atna(dicom(outcome=code)).outcome == want
    with pytest.raises(EventError, match="EventOutcomeIndicator"):
        parse_atna(dicom(outcome="3"))


def test_break_the_glass() -> None:
    btg = parse_atna(dicom(event_id="110113", action="E", types=("110127",)))
    assert (btg.emergency, btg.event_category, btg.action) == (True, "security_alert", "execute")
    assert btg.patient_id == "P9"
    stopped = parse_atna(dicom(event_id="110113", action="E", types=("110138",)))
    assert (stopped.emergency, stopped.event_category) == (False, "security_alert")
    for purposes in (("ETREAT",), ("TREAT", "BTG"), ("btg",)):
        e = parse_atna(dicom(purposes=purposes))
        assert e.emergency and e.purpose == purposes[0]
    e = parse_atna(dicom(purposes=("TREAT",)))
    assert (e.emergency, e.purpose) == (False, "TREAT")


def test_authentication_needs_no_patient() -> None:
    e = parse_atna(dicom(event_id="110114", action="E", types=("110122",), objects=""))
    assert (e.event_category, e.patient_id, e.user_id) == ("authentication", "", "dr.li")
    with pytest.raises(EventError, match="no patient object"):
        parse_atna(dicom(objects=""))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"<13>1 - - - - - - plain text, no xml", "not XML"),
        (b"<13>1 - - - - - - ", "empty"),
        (b"<300>1 - - - - - - <a/>", "bad PRI"),
        (b"<13>1 - - -", "header ends"),
        (b"<13>1 - - - - - [broken <a/>", "structured data"),
        (b"<13>1 - - - - - - <AuditMessage>", "invalid XML"),
        (b"<13>1 - - - - - - <Other/>", "not AuditMessage"),
        (b"<AuditMessage/>", "no EventIdentification"),
        (dicom(when=""), "no EventDateTime"),
        (dicom(when="2026-03-01T08:15:00"), "no UTC offset"),
        (dicom(when="yesterday"), "bad timestamp"),
        (dicom(action="X"), "EventActionCode"),
        (dicom(requestor='UserIsRequestor="false"'), 'UserIsRequestor="true", and the first'),
        (dicom(requestor='UserIsRequestor="true"'), "no UserID"),
        (
            dicom(
                objects='<ParticipantObjectIdentification ParticipantObjectID="" '
                'ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1"/>'
            ),
            "empty",
        ),
    ],
)
def test_unusable_messages(data: bytes, reason: str) -> None:
    with pytest.raises(EventError, match=reason):
        parse_atna(data)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<AuditMessage>&lol9;</AuditMessage>"""

XXE = b"""<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<AuditMessage>&x;</AuditMessage>"""


@pytest.mark.parametrize(
    "xml", [BILLION_LAUGHS, XXE, b'<!DOCTYPE AuditMessage SYSTEM "x.dtd"><AuditMessage/>']
)
def test_dtd_and_entities_refused(xml: bytes) -> None:
    t0 = time.perf_counter()
    with pytest.raises(EventError, match="DTDs and entity declarations are not allowed"):
        parse_atna(syslog(xml))
    assert time.perf_counter() - t0 < 1.0


def test_framing_error_record_is_a_dead_letter() -> None:
    c = build({"type": "atna-syslog", "transport": "udp", "port": 0})
    raw = RawRecord(b"xx", "p #1", meta={"framing_error": "bad frame length 'xx'"})
    with pytest.raises(EventError, match="syslog framing: bad frame length"):
        c.normalize(raw)


# ---------------------------------------------------------------------------- equivalence with FHIR
EQUIVALENT = [
    event(),
    event(event_id="e2", action="export", resource_type="DocumentReference"),
    event(event_id="e3", action="query", workstation=""),
    event(event_id="e4", action="print", outcome="failure", ts="2026-03-01T00:15:00Z"),
    event(event_id="e5", action="create", resource_type="Observation", encounter_id="E-9"),
    event(event_id="e6", action="update", emergency=True),
    event(event_id="e7", action="delete", purpose="ETREAT", emergency=True),
    event(event_id="e8", action="copy", purpose="TREAT"),
    event(event_id="e9", action="forward", user_id="o'brien & <co>", patient_id="P^1&2"),
    event(event_id="e10", action="execute", resource_type="MedicationRequest"),
    # other categories: both encoders write the DICOM event type (110114, 110113)
    event(event_id="e11", action="view", event_category="authentication", patient_id=""),
    event(event_id="e12", action="execute", event_category="security_alert", emergency=True),
    event(event_id="e13", action="query", event_category="authentication"),
]


@pytest.mark.parametrize("e", EQUIVALENT, ids=lambda e: f"{e.event_id}-{e.action}")
def test_atna_and_fhir_give_the_same_canonical_event(e: AccessEvent) -> None:
    via_fhir = parse_audit_event(to_audit_event(e))
    via_atna = parse_atna(to_audit_message(e))
    assert via_atna.to_dict() == via_fhir.to_dict()
    want = e.to_dict()
    if e.emergency and not e.purpose:
        want["purpose"] = "BTG"  # both encoders say "emergency" with the BTG purpose code
    assert via_atna.to_dict() == want
    assert via_atna.t == via_fhir.t


def test_to_audit_message_through_the_connector(pki: Pki) -> None:
    """The simulator's path: to_audit_message → octet frames over TLS → normalize."""
    c = build({"type": "atna-syslog", **pki.server_config()}, ledger=NullLedger())
    events = EQUIVALENT[:5]

    def deliver(conn: Connector) -> None:
        assert isinstance(conn, AtnaSyslogConnector) and conn.wait_ready()
        tls_send(pki, conn.port, b"".join(octet_frame(to_audit_message(e)) for e in events))

    records = collect(c, push=True, deliver=deliver, expect=len(events))
    got = [c.normalize(r)[0].to_dict() for r in records]  # type: ignore[union-attr]
    assert got == [e.to_dict() for e in events]
    assert all(r.position.endswith(f"#{i}") for i, r in enumerate(records, 1))
    assert all("CN=emr01," in r.peer and r.peer.endswith(",O=Hospital") for r in records)


# ---------------------------------------------------------------------------- listener behaviour
def test_describe_exposes_the_bound_port(running: Any) -> None:
    r = running({"transport": "tcp", "port": 0})
    d = r.c.describe()
    assert d["port"] == r.c.port > 0 and d["listening"] and d["transport"] == "tcp"


def test_config_validation(pki: Pki) -> None:
    with pytest.raises(ConnectorConfigError, match="cert_file"):
        build({"type": "atna-syslog", "transport": "tls"})
    with pytest.raises(ConnectorConfigError, match="need transport tls"):
        build({"type": "atna-syslog", "transport": "udp", "require_client_cert": True})
    with pytest.raises(ConnectorConfigError, match="transport"):
        build({"type": "atna-syslog", "transport": "sctp"})
    with pytest.raises(ConnectorConfigError, match="allowed_subjects needs ca_file"):
        build({"type": "atna-syslog", **pki.server_config(ca_file="", allowed_subjects=["a"])})
    with pytest.raises(ConnectorConfigError, match="port"):
        build({"type": "atna-syslog", "transport": "udp", "port": 70000})
    bad = build({"type": "atna-syslog", **pki.server_config(cert_file=pki.ca_file + ".missing")})
    with pytest.raises(ConnectorConfigError, match="cannot load certificate"):
        bad.start()


def test_mutual_tls_refuses_client_without_certificate(pki: Pki, running: Any) -> None:
    ledger = NullLedger()
    r = running(pki.server_config(require_client_cert=True), ledger)
    frame = octet_frame(to_audit_message(event()))
    # TLS 1.2 fails the handshake; TLS 1.3 may only show it on a later read or write
    with contextlib.suppress(ssl.SSLError, OSError):
        assert tls_send(pki, r.c.port, frame, client=None) == b""
    rec = receipts_of(ledger, 1)[0]
    assert rec["status"] == "rejected"
    assert "certificate" in rec["reason"].lower(), rec
    assert r.wait(1, timeout=0.5) == []
    # a client with a certificate is still served
    tls_send(pki, r.c.port, frame)
    assert len(r.wait(1)) == 1


def test_mutual_tls_refuses_subject_not_allowed(pki: Pki, running: Any) -> None:
    ledger = NullLedger()
    r = running(pki.server_config(require_client_cert=True, allowed_subjects=["emr01"]), ledger)
    frame = octet_frame(to_audit_message(event()))
    tls_send(pki, r.c.port, frame, client="intruder")
    rec = receipts_of(ledger, 1)[0]
    assert rec["status"] == "rejected"
    assert "'CN=intruder," in rec["reason"] and "allowed_subjects" in rec["reason"]
    assert "CN=intruder" in rec["peer"]
    tls_send(pki, r.c.port, frame + frame, client="emr01")
    assert len(r.wait(2)) == 2
    time.sleep(0.2)
    assert len(r.records) == 2  # nothing from the intruder
    ok = receipts_of(ledger, 2)[1]
    assert (ok["status"], ok["records"], ok["bytes"]) == ("accepted", 2, 2 * len(frame))
    assert "CN=emr01," in ok["peer"] and len(ok["digest"]) == 64


def test_framing_error_does_not_kill_the_listener(pki: Pki, running: Any) -> None:
    ledger = NullLedger()
    r = running(pki.server_config(max_message_bytes=4096), ledger)
    good = octet_frame(to_audit_message(event(event_id="g1")))
    ctx = pki.client_context()
    with socket.create_connection(("127.0.0.1", r.c.port), timeout=5) as raw_b:
        b = ctx.wrap_socket(raw_b, server_hostname="localhost")  # a second, healthy connection
        b.sendall(good)
        tls_send(pki, r.c.port, good + b"12x <13>1 broken" + good)  # one good frame, then junk
        tls_send(pki, r.c.port, b"999999 " + b"x" * 100)  # longer than max_message_bytes
        b.sendall(octet_frame(to_audit_message(event(event_id="g2"))))
        b.close()
    tls_send(pki, r.c.port, octet_frame(to_audit_message(event(event_id="g3"))))  # new conn
    records = r.wait(6)
    assert len(records) == 6, [x.position for x in records]
    dead = [x for x in records if x.meta.get("framing_error")]
    assert len(dead) == 2
    assert dead[0].payload.startswith(b"12x") or dead[1].payload.startswith(b"12x")
    for d in dead:
        with pytest.raises(EventError, match="syslog framing"):
            r.c.normalize(d)
    ids = sorted(r.c.normalize(x)[0].event_id for x in records if x not in dead)
    assert ids == ["g1", "g1", "g2", "g3"]  # the frame after the junk is lost with it
    statuses = sorted(x["status"] for x in receipts_of(ledger, 4))
    assert statuses == ["accepted", "accepted", "error", "error"]
    assert any("bad frame length" in x["reason"] for x in ledger.receipts)


def test_sender_that_closes_without_reading_loses_nothing(pki: Pki, running: Any) -> None:
    """Regression: with TLS 1.3 session tickets unread in the sender's buffer, its close()
    sent a RST and frames not yet read by the listener were dropped (17186 of 20000)."""
    ledger = NullLedger()
    r = running(pki.server_config(), ledger)
    n = 3000
    payload = octet_frame(to_audit_message(event())) * n
    raw = socket.create_connection(("127.0.0.1", r.c.port), timeout=5)
    s = pki.client_context().wrap_socket(raw, server_hostname="localhost")
    s.sendall(payload)
    s.close()  # no shutdown, no read: what a fire-and-forget syslog sender does
    assert len(r.wait(n, timeout=20)) == n
    rec = receipts_of(ledger, 1)[0]
    assert (rec["records"], rec["bytes"]) == (n, len(payload))


def test_truncated_frame_and_idle_timeout(running: Any) -> None:
    ledger = NullLedger()
    r = running({"transport": "tcp", "port": 0, "idle_timeout_s": 1}, ledger)
    good = octet_frame(to_audit_message(event()))
    with socket.create_connection(("127.0.0.1", r.c.port), timeout=5) as s:
        s.sendall(good + b"500 <13>1 - - - - - - <Audit")  # the sender dies mid-frame
    quiet = socket.create_connection(("127.0.0.1", r.c.port), timeout=5)  # says nothing
    records = r.wait(2)
    assert "connection closed inside a frame" in records[1].meta["framing_error"]
    rec = receipts_of(ledger, 2, timeout=5)
    quiet.close()
    by_records = sorted(rec, key=lambda x: x["records"])
    assert (by_records[0]["status"], by_records[0]["reason"]) == ("accepted", "idle for 1 s")
    assert (by_records[1]["status"], by_records[1]["records"]) == ("error", 2)


def test_lf_framing_on_plain_tcp(running: Any) -> None:
    r = running({"transport": "tcp", "port": 0})
    pretty = syslog(OLD_STYLE)  # multi-line XML: ends at the line after </AuditMessage>
    one_line = to_audit_message(event(event_id="l2"))
    with socket.create_connection(("127.0.0.1", r.c.port), timeout=5) as s:
        s.sendall(pretty + b"\n" + one_line + b"\r\n" + b"<13>1 - - - - - - not xml\n")
        s.sendall(octet_frame(to_audit_message(event(event_id="l4"))))  # mixed framing
        s.sendall(to_audit_message(event(event_id="l5")))  # the last line needs no LF
    records = r.wait(5)
    assert len(records) == 5, [x.payload[:30] for x in records]
    assert r.c.normalize(records[0])[0].patient_id == "12345"
    assert r.c.normalize(records[1])[0].event_id == "l2"
    with pytest.raises(EventError):
        r.c.normalize(records[2])
    assert [r.c.normalize(x)[0].event_id for x in records[3:]] == ["l4", "l5"]
    assert records[0].position.endswith("#1") and records[4].position.endswith("#5")


def test_lf_framing_can_be_turned_off(running: Any) -> None:
    ledger = NullLedger()
    r = running({"transport": "tcp", "port": 0, "allow_lf_framing": False}, ledger)
    with socket.create_connection(("127.0.0.1", r.c.port), timeout=5) as s:
        s.sendall(to_audit_message(event()) + b"\n")
    records = r.wait(1)
    assert len(records) == 1 and "expected an octet count" in records[0].meta["framing_error"]


def test_udp_oversized_datagram_is_a_dead_letter(running: Any) -> None:
    ledger = NullLedger()
    r = running({"transport": "udp", "port": 0, "max_message_bytes": 2000}, ledger)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"<13>1 - - - - - - " + b"x" * 3000, ("127.0.0.1", r.c.port))
        s.sendto(to_audit_message(event()), ("127.0.0.1", r.c.port))
    records = r.wait(2)
    assert len(records) == 2
    assert "exceeds max_message_bytes" in records[0].meta["framing_error"]
    assert r.c.normalize(records[1])[0].user_id == "dr.wang"
    r.close()
    (rec,) = ledger.receipts
    assert (rec["records"], rec["status"]) == (2, "accepted")


def test_split_frames_incremental() -> None:
    frames = [to_audit_message(event(event_id=f"s{i}")) for i in range(3)]
    stream = b"".join(octet_frame(f) for f in frames)
    buf = bytearray()
    got: list[bytes] = []
    for i in range(0, len(stream), 7):  # byte dribble: frames only once complete
        buf += stream[i : i + 7]
        out, used, err = split_frames(buf, 1 << 20)
        assert not err
        got += out
        del buf[:used]
    assert got == frames and not buf
    assert split_frames(b"5 ab", 100, final=True)[2].startswith("connection closed inside")


# ---------------------------------------------------------------------------- net helpers
def test_net_helpers(pki: Pki) -> None:
    assert subject_cn("CN=emr01,O=Hospital") == "emr01"
    assert subject_allowed("CN=emr01,O=Hospital", ["emr01"])
    assert subject_allowed("CN=emr01,O=Hospital", ["CN=emr01,O=Hospital"])
    assert not subject_allowed("CN=emr02,O=Hospital", ["emr01"])
    assert not subject_allowed("", ["emr01"])
    assert subject_allowed("", [])
    ctx = server_ssl_context(pki.cert_file, pki.key_file, pki.ca_file, require_client_cert=True)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert server_ssl_context(pki.cert_file, pki.key_file).verify_mode == ssl.CERT_NONE
    with pytest.raises(ValueError, match="cert_file"):
        server_ssl_context("", "")
    # peer_identity on a live mutual-TLS connection
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []

    def accept() -> None:
        conn, _ = srv.accept()
        with ctx.wrap_socket(conn, server_side=True) as t:
            seen.append(peer_identity(t))
            t.recv(10)

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    tls_send(pki, srv.getsockname()[1], b"hi")
    th.join(5)
    srv.close()
    (subject,) = seen
    assert subject.startswith("CN=emr01,OU=") and subject.endswith(",O=Hospital")  # RFC 4514
    assert subject_cn(subject) == "emr01"


# ---------------------------------------------------------------------------- fuzzing
_VALID = [
    to_audit_message(event()),
    syslog(OLD_STYLE),
    syslog(dicom(event_id="110113", action="E", types=("110127",), purposes=("BTG",))),
]


def _check(data: bytes) -> None:
    try:
        out = parse_atna(data)
    except EventError as exc:
        assert str(exc)
        return
    assert isinstance(out, AccessEvent) and out.user_id and out.event_id and out.ts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check(data)
    _check(b"<13>1 - - - - - - " + data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_VALID),
    st.lists(
        st.tuples(st.integers(0, 5000), st.integers(0, 40), st.binary(max_size=12)),
        min_size=1,
        max_size=4,
    ),
)
def test_fuzz_mutated_messages(base: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    data = bytearray(base)
    for at, cut, insert in edits:
        at %= len(data) + 1
        data[at : at + cut] = insert
    _check(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(64, 500), st.booleans(), st.booleans())
def test_fuzz_split_frames(data: bytes, max_bytes: int, allow_lf: bool, final: bool) -> None:
    frames, used, err = split_frames(data, max_bytes, allow_lf, final)
    assert 0 <= used <= len(data)
    assert all(len(f) <= max_bytes for f in frames)
    if final and not err:
        assert not data[used:].strip(b"\r\n\x00 \t")


# ---------------------------------------------------------------------------- graceful stop
def test_a_graceful_stop_hands_over_queued_messages_instead_of_dropping_them() -> None:
    """Syslog has no acknowledgement: what the listener queued must still be yielded after
    stop (the runner reads on for ``drain_on_stop`` sources), then records() ends."""
    c = build({"type": "atna-syslog", "transport": "tcp", "port": 0, "queue_size": 1000})
    assert isinstance(c, AtnaSyslogConnector) and c.drain_on_stop
    c.start()
    try:
        assert c.wait_ready(10)
        msgs = _messages()
        with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
            s.sendall(b"".join(octet_frame(m) for m in msgs))
        deadline = time.monotonic() + 10
        while c.counters["messages"] < len(msgs) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.counters["messages"] == len(msgs)  # all queued, none read yet
        stop = threading.Event()
        stop.set()  # stop before the first read: a restart or SIGTERM now
        got = [r for r in c.records(None, stop) if r is not None]
        assert len(got) == len(msgs)
        assert c.describe()["listening"] is False  # nothing new is accepted meanwhile
    finally:
        c.close()
