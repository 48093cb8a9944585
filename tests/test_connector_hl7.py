"""The hl7-mllp connector: HL7 v2 parsing, ADT → encounters rows, MLLP framing, ACKs that
follow the broker, TLS with client certificates, and fuzzing of the parser."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import ConnectorConfigError, ContextUpdate, NullLedger, RawRecord
from connectors.hl7 import (
    Ack,
    AdtMapper,
    Encoding,
    Hl7MllpConfig,
    Hl7MllpConnector,
    MllpClient,
    _Framer,
    build_ack,
    escape,
    frame,
    hl7_timestamp,
    parse_message,
    to_adt,
    unescape,
)
from connectors.registry import build
from connectors.testing import ConnectorConformance
from emrwatch.context import record_from_row
from emrwatch.events import EventError
from emrwatch.timeutil import LocalClock

ROW = {
    "encounter_id": "V100",
    "patient_id": "P7",
    "department_id": "ORTH",
    "start": "2024-03-01T08:30:00+08:00",
    "end": "",
    "attending_user_id": "U42",
}

A01 = (
    "MSH|^~\\&|HIS|HOSP|EMRWATCH|HOSP|20240301083500||ADT^A01^ADT_A01|MSG0001|P|2.5\r"
    "EVN|A01|20240301083500||||20240301083000\r"
    "PID|1||P7^^^HOSP^MR~123456789^^^SSA^SS||Zhang^Wei||19800101|M|||"
    "1 Main St^Apt 2^Shanghai^^200000^CN|||||||ACC9\r"
    + "|".join(
        ["PV1", "1", "I", "ORTH^201^1^HOSP", "", "", "", "U42^Li^Na", "", "", "MED"]
        + [""] * 8
        + ["V100"]
        + [""] * 24
        + ["20240301083000", ""]
    )
    + "\r"
)


def mapper(**cfg: Any) -> AdtMapper:
    return AdtMapper(Hl7MllpConfig(**cfg))


def rows(message: bytes | str, **cfg: Any) -> list[tuple[str, dict[str, str]]]:
    data = message.encode() if isinstance(message, str) else message
    return [(u.kind, dict(u.row)) for u in mapper(**cfg).rows(data)]


def adt(event: str, row: dict[str, str] | None = None, **kw: Any) -> bytes:
    return to_adt({**ROW, **(row or {})}, event, **kw)


# ---------------------------------------------------------------------------- parsing
def test_parse_fields_components_repetitions() -> None:
    msg = parse_message(A01.encode())
    assert msg.message_type == "ADT" and msg.trigger == "A01" and msg.control_id == "MSG0001"
    assert msg.get("MSH", 1) == "|" and msg.get("MSH", 2) == "^~\\&"
    assert msg.get("PID", 3) == "P7"
    assert msg.get("PID", 3, 4, rep=1) == "SSA"
    assert msg.get("PID", 5, 2) == "Wei"
    assert msg.path("PV1-3.2") == "201"
    assert msg.get("PV1", 44) == "20240301083000"
    assert msg.get("ZZZ", 1) == "" and msg.get("PID", 99) == ""


def test_escape_sequences_round_trip() -> None:
    enc = Encoding()
    assert unescape(r"a\F\b\S\c\T\d\R\e\E\f", enc) == "a|b^c&d~e\\f"
    assert unescape(r"\X4869\ \H\bold\N\ line\.br\2", enc) == "Hi bold line\n2"
    assert (
        unescape(r"unknown \Z99\ and unterminated \F", enc) == r"unknown \Z99\ and unterminated \F"
    )
    for text in ["O'Brien & Sons | ^x~", "back\\slash", "two\nlines"]:
        assert unescape(escape(text, enc), enc) == text
    # custom delimiters from MSH-1/MSH-2
    m = parse_message("MSH#*!$%#A#B#C#D#2024##ADT*A01#X1\rPID#1##id1*x*y*AUTH%ns\r")
    assert m.encoding == Encoding("#", "*", "!", "$", "%")
    assert m.get("PID", 3) == "id1" and m.get("PID", 3, 4, 2) == "ns"


def test_escaped_values_in_rows() -> None:
    msg = A01.replace("P7^^^HOSP^MR", r"P\F\7^^^HOSP^MR").replace("ORTH^201", r"OR\T\TH^201")
    (kind, row), *_ = rows(msg)
    assert row["patient_id"] == "P|7" and row["department_id"] == "OR&TH"


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"])
def test_line_endings(sep: str) -> None:
    text = A01.replace("\r", sep)
    assert rows(text) == rows(A01)
    assert rows(text)[0][1]["encounter_id"] == "V100"


def test_timestamps() -> None:
    assert hl7_timestamp("202403010830") == "2024-03-01T08:30:00+08:00"
    assert hl7_timestamp("20240301083015-0500") == "2024-03-01T08:30:15-05:00"
    assert hl7_timestamp("20240310023000", "America/New_York") == "2024-03-10T02:30:00-05:00"
    assert hl7_timestamp("20240710120000", "America/New_York") == "2024-07-10T12:00:00-04:00"
    for bad in ["2024", "202403", "20241301", "20240301083015+2500", "x", "20240230"]:
        with pytest.raises(ValueError):
            hl7_timestamp(bad)
    # TS with a precision component (v2.4 and earlier) uses component 1
    msg = A01.replace("||20240301083000|", "||20240301083000^S|")
    assert rows(msg)[0][1]["start"] == "2024-03-01T08:30:00+08:00"


def test_malformed_messages_raise_event_errors() -> None:
    m = mapper()
    for bad, why in [
        (b"", "no MSH"),
        (b"hello world", "no MSH"),
        (b"MSH|^~|x|y", "encoding characters"),
        (b"MSH|^~\\&&|A|B", "encoding characters"),
        (b"MSHA^~\\&|", "field separator"),
        (b"FHS|^~\\&|x\rMSH|^~\\&|", "batches"),
        (A01.replace("PID|1", "pid|1").encode(), "not an HL7 segment"),
        (A01.replace("20240301083000|", "2024-03-01|").encode(), "PV1-44"),
        ("MSH|^~\\&|||||||ADT^A01|1|P|2.5\rPID|1||Zhāng\r".encode("utf-16"), "utf-8"),
    ]:
        with pytest.raises(EventError, match=why):
            m.rows(bad)
    with pytest.raises(EventError, match="not valid utf-8"):
        m.rows(A01.replace("Zhang", "Zh\xe4ng").encode("latin-1"))


def test_charset_from_msh18() -> None:
    msg = A01.replace("|P|2.5\r", "|P|2.5||||||GB 18030-2000\r").replace("Zhang^Wei", "张^伟")
    (_, enc), (_, pat) = rows(msg.encode("gb18030"), emit_patients=True)
    assert pat["family_name"] == "张" and pat["given_name"] == "伟"
    with pytest.raises(EventError):
        rows(msg.replace("GB 18030-2000", "").encode("gb18030"), emit_patients=True)
    assert rows(msg.replace("GB 18030-2000", "").encode("gb18030"), encoding="gb18030")


# ---------------------------------------------------------------------------- ADT → rows
def test_a01_admit() -> None:
    [(kind, row)] = rows(A01)
    assert kind == "encounters"
    assert row == {
        "encounter_id": "V100",
        "patient_id": "P7",
        "department_id": "ORTH",
        "start": "2024-03-01T08:30:00+08:00",
        "end": "",
        "attending_user_id": "U42",
    }
    rec = record_from_row("encounters", row, LocalClock())  # the context loader accepts it
    assert rec.start == 1709253000.0


def test_a04_register_outpatient_without_admit_time_uses_event_time() -> None:
    msg = A01.replace("ADT^A01^ADT_A01", "ADT^A04^ADT_A01").replace("20240301083000|", "|")
    [(_, row)] = rows(msg)
    assert row["start"] == "2024-03-01T08:30:00+08:00"  # EVN-6
    msg2 = msg.replace("||||20240301083000\r", "\r")  # no EVN-6: EVN-2
    assert rows(msg2)[0][1]["start"] == "2024-03-01T08:35:00+08:00"


def test_a03_discharge_sets_end() -> None:
    msg = adt("A03", {"end": "2024-03-05T10:00:00+08:00"})
    [(_, row)] = rows(msg)
    assert row["end"] == "2024-03-05T10:00:00+08:00" and row["start"] == ROW["start"]
    # A03 without PV1-45: the event time (EVN-6) is the discharge time
    msg2 = adt("A03", event_time="2024-03-06T09:00:00+08:00")
    assert rows(msg2)[0][1]["end"] == "2024-03-06T09:00:00+08:00"


def test_a02_transfer_moves_the_encounter_and_keeps_the_prior_ward() -> None:
    msg = adt(
        "A02",
        {"department_id": "ICU"},
        prior_department="ORTH",
        event_time="2024-03-02T14:00:00+08:00",
    )
    (k1, now), (k2, before) = rows(msg)
    assert (k1, now["encounter_id"], now["department_id"], now["end"]) == (
        "encounters",
        "V100",
        "ICU",
        "",
    )
    assert before == {
        "encounter_id": "V100@ORTH",
        "patient_id": "P7",
        "department_id": "ORTH",
        "start": ROW["start"],
        "end": "2024-03-02T14:00:00+08:00",
        "attending_user_id": "U42",
    }
    assert len(rows(msg, transfer_history=False)) == 1
    # department_map applies to both locations
    mapped = rows(msg, department_map={"ICU": "D-ICU", "ORTH": "D-ORTH"})
    assert [r["department_id"] for _, r in mapped] == ["D-ICU", "D-ORTH"]
    assert mapped[1][1]["encounter_id"] == "V100@D-ORTH"


def test_a08_update_and_patients_rows_only_when_configured() -> None:
    msg = A01.replace("ADT^A01^ADT_A01", "ADT^A08^ADT_A01")
    assert [k for k, _ in rows(msg)] == ["encounters"]
    out = rows(msg, emit_patients=True)
    assert [k for k, _ in out] == ["encounters", "patients"]
    assert out[1][1] == {
        "patient_id": "P7",
        "family_name": "Zhang",
        "given_name": "Wei",
        "address": "1 Main St, Apt 2, Shanghai, 200000, CN",
    }
    # A08 without a visit (demographics only): no encounter row, not an error
    no_visit = msg.replace("|V100|", "||").replace("||ACC9\r", "||\r")
    assert rows(no_visit) == []
    assert [k for k, _ in rows(no_visit, emit_patients=True)] == ["patients"]
    # A03 never emits patients rows
    assert [k for k, _ in rows(adt("A03"), emit_patients=True)] == ["encounters"]


def test_a08_without_admit_time_is_an_error() -> None:
    msg = A01.replace("ADT^A01^ADT_A01", "ADT^A08^ADT_A01").replace("20240301083000|", "|")
    with pytest.raises(EventError, match="PV1-44"):
        rows(msg)


def test_other_messages_and_events_produce_nothing() -> None:
    assert rows(A01.replace("ADT^A01^ADT_A01", "ADT^A28^ADT_A05")) == []
    assert rows(A01.replace("ADT^A01^ADT_A01", "ORU^R01")) == []
    assert rows("MSH|^~\\&|LAB|H|EW|H|2024||ORU^R01|9|P|2.5\rOBX|garbage line without sep\r") == []
    # events can be extended: A13 cancel discharge clears end
    a13 = adt("A13", {"end": "2024-03-05T10:00:00+08:00"})
    assert rows(a13) == []
    assert rows(a13, events=["A01", "A13"])[0][1]["end"] == ""


def test_a11_cancel_admit_deletes_the_encounter() -> None:
    [update] = mapper().rows(adt("A11"))
    assert (update.kind, dict(update.row), update.delete) == (
        "encounters",
        {"encounter_id": ROW["encounter_id"], "patient_id": ROW["patient_id"]},
        True,
    )
    assert not any(u.delete for u in mapper().rows(adt("A01")))
    assert mapper(events=["A01"]).rows(adt("A11")) == []  # only when listed


def test_identifier_selection_and_fallbacks() -> None:
    [(_, row)] = rows(A01, patient_id_authority="SSA")
    assert row["patient_id"] == "123456789"
    assert rows(A01, patient_id_authority="mr")[0][1]["patient_id"] == "P7"  # CX-5 type code
    with pytest.raises(EventError, match="NOPE"):
        rows(A01, patient_id_authority="NOPE")
    no_visit = A01.replace("|V100|", "||")
    assert rows(no_visit)[0][1]["encounter_id"] == "ACC9"  # PID-18 account number
    with pytest.raises(EventError, match="PV1-19"):
        rows(no_visit, encounter_id_fallback="")
    assert rows(A01, department_field="PV1-10")[0][1]["department_id"] == "MED"
    assert rows(A01, department_map={"ORTH": "D7"})[0][1]["department_id"] == "D7"
    with pytest.raises(EventError, match="patient identifier"):
        rows(A01.replace("P7^^^HOSP^MR~123456789^^^SSA^SS", ""))


def test_explicit_null_reads_as_empty() -> None:
    msg = adt("A08", {"end": "2024-03-05T10:00:00+08:00"}).replace(b"+0800|", b'+0800|""', 1)
    assert rows(msg)[0][1]["end"] == "2024-03-05T10:00:00+08:00"
    nulled = adt("A08").replace(b"|U42|", b'|""|')
    assert rows(nulled)[0][1]["attending_user_id"] == ""


def test_to_adt_round_trips_every_event() -> None:
    for event in ["A01", "A03", "A04", "A08"]:
        row = {**ROW, "end": "2024-03-05T10:00:00+08:00"} if event == "A03" else ROW
        [(_, got)] = rows(to_adt(row, event))
        assert got == row
    assert to_adt(ROW) == to_adt(ROW)  # deterministic control id
    assert parse_message(to_adt(ROW, control_id="C-1")).control_id == "C-1"
    weird = {**ROW, "patient_id": "P|^~\\&1", "department_id": "A&B"}
    assert rows(to_adt(weird))[0][1]["patient_id"] == "P|^~\\&1"


def test_config_validation() -> None:
    for bad, key in [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"events": ["A01", "A99"]}, "events"),
        ({"allowed_subjects": ["x"]}, "cert_file"),
        ({"department_field": "PV1"}, "department_field"),
        ({"encoding": "klingon"}, "encoding"),
        ({"port": 70000}, "port"),
    ]:
        with pytest.raises(ConnectorConfigError, match=key):
            build({"type": "hl7-mllp", **bad})


# ---------------------------------------------------------------------------- ACKs
def test_build_ack_swaps_applications_and_carries_the_reason() -> None:
    from connectors.hl7 import _Header

    h = _Header.parse(A01.encode())
    ack = Ack.parse(build_ack(h, "AA"))
    msg = parse_message(ack.raw)
    assert (ack.code, ack.control_id, ack.ok) == ("AA", "MSG0001", True)
    assert msg.get("MSH", 3) == "EMRWATCH" and msg.get("MSH", 5) == "HIS"
    assert msg.get("MSH", 9, 2) == "A01" and msg.get("MSH", 12) == "2.5"
    bad = Ack.parse(build_ack(h, "AE", "PV1-44: bad | value\r\nhere"))
    assert bad.code == "AE" and bad.control_id == "MSG0001"
    assert bad.text == "PV1-44: bad | value here" and bad.error == bad.text
    # a header with broken encoding characters still gets a well-formed AR
    h2 = _Header.parse(b"MSH|^~|A|B|C|D|2024||ADT^A01|CTL7|P|2.5")
    ar = Ack.parse(build_ack(h2, "AR", "bad encoding characters"))
    assert (ar.code, ar.control_id) == ("AR", "CTL7")


# ---------------------------------------------------------------------------- framing
def test_framer_garbage_oversize_and_interruptions() -> None:
    f = _Framer(200)
    ok = frame(b"MSH|^~\\&|a")
    items = f.feed(b"\r\n" + ok + b"junk!" + ok + b"\x0bpartial" + ok + b"\x0b" + b"x" * 300)
    kinds = [(i.error.split(" ")[0] if i.error else "ok") for i in items]
    assert kinds == ["ok", "5", "ok", "MLLP", "ok", "MLLP"], [i.error for i in items]
    assert items[3].payload == b"partial" and len(items[5].payload) == 200
    assert f.feed(b"yyy\x1c\r" + ok) [0].payload == b"MSH|^~\\&|a"  # fmt: skip
    assert f.feed(b"\x0bunfinished") == []
    [last] = f.finish()
    assert "closed inside" in last.error


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.binary(max_size=300))
@settings(max_examples=100, deadline=None)
def test_framer_is_chunking_invariant(cuts: list[int], noise: bytes) -> None:
    data = frame(A01) + noise + frame(b"MSH|^~\\&|x") + b"\x0b" + noise
    whole = _Framer(500)
    expect = [(i.payload, i.error) for i in whole.feed(data) + whole.finish()]
    f = _Framer(500)
    got: list[tuple[bytes, str]] = []
    pos = 0
    for c in cuts * 20:
        if pos >= len(data):
            break
        got += [(i.payload, i.error) for i in f.feed(data[pos : pos + c])]
        pos += c
    got += [(i.payload, i.error) for i in f.feed(data[pos:]) + f.finish()]
    # garbage runs may be split into more records when cut, but messages never change
    assert [p for p, e in got if not e] == [p for p, e in expect if not e]


# ---------------------------------------------------------------------------- fuzzing
_M = mapper()
_M_ALL = mapper(emit_patients=True, events=sorted({"A01", "A02", "A03", "A04", "A08", "A13"}))
VALID = [
    A01.encode(),
    adt("A02", {"department_id": "ICU"}, prior_department="ORTH"),
    adt("A03", {"end": "2024-03-05T10:00:00+08:00"}),
    adt("A04"),
    adt("A08", patient={"family_name": "Li", "given_name": "Na", "address": "x"}),
]


def _only_rows_or_event_error(data: bytes) -> None:
    for m in (_M, _M_ALL):
        try:
            out = m.rows(data)
        except EventError:
            continue
        for u in out:
            assert isinstance(u, ContextUpdate) and u.kind in ("encounters", "patients")
            assert all(isinstance(v, str) for v in u.row.values())
            if u.kind == "encounters":
                record_from_row("encounters", dict(u.row), LocalClock())


@given(st.binary(max_size=400))
@settings(max_examples=200, deadline=None)
def test_fuzz_random_bytes(data: bytes) -> None:
    _only_rows_or_event_error(data)
    _only_rows_or_event_error(b"MSH|^~\\&|" + data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    msg = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "delim"]))
        pos = draw(st.integers(0, max(0, len(msg) - 1)))
        if op == "flip" and msg:
            msg[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            msg[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del msg[pos : pos + draw(st.integers(1, 10))]
        else:
            msg[pos:pos] = draw(
                st.sampled_from([b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b'""'])
            )
    return bytes(msg)


@given(mutated())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_messages(data: bytes) -> None:
    _only_rows_or_event_error(data)


@given(st.binary(max_size=200), st.text(max_size=120))
@settings(max_examples=200, deadline=None)
def test_fuzz_acks_for_any_header(data: bytes, reason: str) -> None:
    from connectors.hl7 import _Header

    for payload in (b"MSH" + data, b"MSH|^~\\&|" + data):
        h = _Header.parse(payload)
        if h is None:
            continue
        for code in ("AA", "AE", "AR"):
            data = build_ack(h, code, reason)
            [item] = _Framer(1 << 20).feed(frame(data))  # never breaks the MLLP framing
            assert not item.error and Ack.parse(item.payload).code == code


def test_regression_ack_never_carries_block_characters() -> None:
    # found by test_fuzz_acks_for_any_header: a 0x0B copied from MSH-5 split the ACK's frame
    from connectors.hl7 import _Header

    h = _Header.parse(b"MSH|^~\\&|||\x0b|\x1c|2024||ADT^A01|C\x0b1")
    assert h is not None
    data = build_ack(h, "AE", "bad\x1cthing\x0b")
    assert b"\x0b" not in data and b"\x1c" not in data
    [item] = _Framer(4096).feed(frame(data))
    assert Ack.parse(item.payload).text == "bad thing"


@pytest.mark.parametrize(
    "data",
    [
        b"MSH|^~\\&",  # nothing after MSH-2
        b"MSH|^~\\&|||||||ADT^A01",  # ADT without PID/PV1
        b"MSH|^~\\&|||||||ADT^A01|1\rPV1|1|I|W||||||||||||||||V1",  # no PID, no start
        b"MSH|^~\\&|||||||ADT^A02|1\rPID|1||P\rPV1|1|I|W|||X||||||||||||V1"
        + b"|" * 25
        + b"2024010101",  # A02 without any transfer time
        b"\xef\xbb\xbfMSH|^~\\&|||||||ADT^A08\rPID|1||P\\",  # BOM, trailing escape char
        b"MSH|^~\\&|||||||ADT^A01|1||2.5||||||\xff\xfe",  # MSH-18 garbage
        b"MSH|^~\\&|||||||ADT^A01\rPID|1||\\X4\\",  # odd-length hex escape
        b"MSH|^~\\&|||||||ADT^A01\rPID|1||\\Xzz\\",  # bad hex escape
    ],
)
def test_regressions_edge_messages(data: bytes) -> None:
    _only_rows_or_event_error(data)


# ---------------------------------------------------------------------------- the listener
class Acker:
    """Drives ``records()`` the way the runner does, minus the broker: normalise, then call
    ``ack`` / ``reject`` (unless ``auto`` is off)."""

    def __init__(self, connector: Hl7MllpConnector, auto: bool = True) -> None:
        self.c = connector
        self.auto = auto
        self.stop = threading.Event()
        self.records: list[RawRecord] = []
        self.errors: list[str] = []
        self.outputs: list[ContextUpdate] = []
        connector.start()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        for raw in self.c.records(None, self.stop):
            if raw is None:
                continue
            self.records.append(raw)
            try:
                outs = self.c.normalize(raw)
                reason = None
            except EventError as exc:
                reason = str(exc)
                self.errors.append(reason)
                outs = []
            self.outputs.extend(o for o in outs if isinstance(o, ContextUpdate))
            if self.auto:
                if reason is None and raw.ack:
                    raw.ack()
                elif reason is not None and raw.reject:
                    raw.reject(reason)

    def wait(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.records) >= n, [r.position for r in self.records]

    def close(self) -> None:
        self.stop.set()
        self.t.join(5)
        self.c.close()


@contextmanager
def listening(auto: bool = True, **cfg: Any) -> Iterator[tuple[Hl7MllpConnector, Acker]]:
    c = Hl7MllpConnector(
        Hl7MllpConfig(host="127.0.0.1", port=0, **cfg), name="hl7-test", ledger=NullLedger()
    )
    a = Acker(c, auto)
    try:
        yield c, a
    finally:
        a.close()


def test_ack_is_sent_only_from_the_ack_callback() -> None:
    with listening(auto=False) as (c, a), MllpClient("127.0.0.1", c.port, timeout=5) as cl:
        assert c.describe()["port"] == c.port != 0
        cl.send(A01, wait=False)
        a.wait(1)
        raw = a.records[0]
        assert raw.position.endswith("MSG0001 #1") and raw.position.startswith("127.0.0.1:")
        with pytest.raises(TimeoutError):
            cl.read_ack(timeout=0.4)  # nothing before the broker acknowledged
        assert raw.ack is not None
        raw.ack()
        ack = cl.read_ack(timeout=5)
        assert (ack.code, ack.control_id) == ("AA", "MSG0001")


def test_malformed_message_gets_ae_and_connection_survives_garbage() -> None:
    with (
        listening(max_message_bytes=2048) as (c, a),
        MllpClient("127.0.0.1", c.port, timeout=5) as cl,
    ):
        bad = A01.replace("20240301083000|", "20241399|").replace("MSG0001", "BAD1")
        ack = cl.send(bad)
        assert ack is not None and (ack.code, ack.control_id) == ("AE", "BAD1")
        assert "PV1-44" in ack.text and "PV1-44" in ack.error
        cl.send_raw(b"\r\nthis is not MLLP\r\n")  # garbage between frames: no ACK
        assert cl.send(A01).code == "AA"  # type: ignore[union-attr]
        # bad encoding characters: AR, still with the control id
        ar = cl.send("MSH|^~|A|B|C|D|2024||ADT^A01|ENC1|P|2.5\rPID|1||P\r")
        assert ar is not None and (ar.code, ar.control_id) == ("AR", "ENC1")
        # a frame with no MSH: no control id, so no ACK; the connection goes on
        cl.send("just text", wait=False)
        # oversized frame: AR; then a normal message still works
        big = A01.replace("MSG0001", "BIG1").replace("Zhang", "Z" * 3000)
        ar2 = cl.send(big)
        assert ar2 is not None and (ar2.code, ar2.control_id) == ("AR", "BIG1")
        assert "max_message_bytes" in ar2.text
        ack3 = cl.send(A01.replace("MSG0001", "AFTER"))
        assert ack3 is not None and (ack3.code, ack3.control_id) == ("AA", "AFTER")
        errors = list(a.errors)
    assert len(errors) == 5, errors
    assert any("outside an MLLP frame" in e for e in errors)
    assert any("no MSH" in e for e in errors)


@pytest.mark.parametrize("config", [{"max_message_bytes": 2048}])
def test_config_applies(config: dict[str, Any]) -> None:
    c = build({"type": "hl7-mllp", "host": "127.0.0.1", "port": 0, **config})
    assert isinstance(c, Hl7MllpConnector) and c.config.max_message_bytes == 2048


def test_two_concurrent_connections() -> None:
    results: dict[str, list[tuple[str, str]]] = {}

    def client(tag: str, port: int) -> None:
        got = []
        with MllpClient("127.0.0.1", port, timeout=10) as cl:
            for i in range(15):
                row = {**ROW, "encounter_id": f"{tag}-{i}"}
                ack = cl.send(to_adt(row, control_id=f"{tag}{i}"))
                assert ack is not None
                got.append((ack.code, ack.control_id))
        results[tag] = got

    with listening() as (c, a):
        ts = [threading.Thread(target=client, args=(t, c.port)) for t in ("A", "B")]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        a.wait(30)
        ids = sorted(o.row["encounter_id"] for o in a.outputs)
        peers = {r.position.split(" ")[0] for r in a.records}
    for tag in ("A", "B"):
        assert results[tag] == [("AA", f"{tag}{i}") for i in range(15)]
    assert ids == sorted(f"{t}-{i}" for t in "AB" for i in range(15))
    assert len(peers) == 2
    receipts = c.ledger.receipts  # type: ignore[attr-defined]
    assert sorted(r["records"] for r in receipts) == [15, 15]
    assert all(r["status"] == "accepted" and r["bytes"] > 0 for r in receipts)


# ---------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    good = ca.issue_cert("emr01.hospital.example", common_name="emr01")
    intruder = ca.issue_cert("other.example", common_name="intruder")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    return {"ca": ca, "dir": d, "good": good, "intruder": intruder}


def _client_ctx(pki: dict[str, Any], cert: Any = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    pki["ca"].configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        with MllpClient("127.0.0.1", port, timeout=5, ssl_context=ctx) as cl:
            cl.send(A01, timeout=5)
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


def test_tls_with_client_certificates(pki: dict[str, Any]) -> None:
    d: Path = pki["dir"]
    cfg = {
        "cert_file": str(d / "server.pem"),
        "key_file": str(d / "server.key"),
        "ca_file": str(d / "ca.pem"),
        "require_client_cert": True,
        "allowed_subjects": ["emr01"],
    }
    with listening(**cfg) as (c, a):
        with MllpClient(
            "127.0.0.1", c.port, timeout=5, ssl_context=_client_ctx(pki, pki["good"])
        ) as cl:
            ack = cl.send(A01)
            assert ack is not None and (ack.code, ack.control_id) == ("AA", "MSG0001")
            a03 = cl.send(adt("A03", {"end": "2024-03-05T10:00:00+08:00"}))
            assert a03 is not None and a03.ok
        assert "CN=emr01" in a.records[0].peer
        assert _refused(c.port, _client_ctx(pki))  # no client certificate
        assert _refused(c.port, _client_ctx(pki, pki["intruder"]))  # not on the allow-list
        ledger: NullLedger = c.ledger  # type: ignore[assignment]
        deadline = time.monotonic() + 5
        while len(ledger.receipts) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        receipts = list(ledger.receipts)
        assert c.describe()["tls_refused"] == 2
    rejected = [r for r in receipts if r["status"] == "rejected"]
    assert len(rejected) == 2 and all(r["reason"] for r in rejected)
    assert any("intruder" in r["reason"] for r in rejected)
    assert [r["records"] for r in receipts if r["status"] == "accepted"] == [2]


# ---------------------------------------------------------------------------- conformance
class TestHl7MllpConformance(ConnectorConformance):
    connector_type = "hl7-mllp"
    push = True
    # 5 ADT (A02 gives two rows) + ORU (no output) + framed non-HL7 + bytes between frames
    expected = (8, 6, 2)

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": 0}

    def deliver(self, connector: Any) -> None:
        frames = [
            frame(A01),
            frame(adt("A02", {"department_id": "ICU"}, prior_department="ORTH")),
            frame(adt("A03", {"end": "2024-03-05T10:00:00+08:00"})),
            b"garbage between frames",
            frame("MSH|^~\\&|LAB|H|EW|H|20240301||ORU^R01|L1|P|2.5\rOBX|1|ST|x||y\r"),
            frame(adt("A04", {"encounter_id": "V200"})),
            frame(b"not an HL7 message"),
            frame(adt("A08")),
        ]
        # a real sender waits for each ACK; collect() never acknowledges, so send all frames
        # at once and read whatever ACKs come in the background
        sock = socket.create_connection(("127.0.0.1", connector.port), timeout=10)
        sock.sendall(b"".join(frames))
        sock.shutdown(socket.SHUT_WR)

        def drain() -> None:
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            finally:
                sock.close()

        threading.Thread(target=drain, daemon=True).start()


# ---------------------------------------------------------------------------- through the broker
def test_acks_follow_the_broker_end_to_end(broker: Any, tmp_path: Path) -> None:
    from connectors.runner import ConnectorRunner
    from connectors.testing import _read_topics
    from pipeline.stream_config import KafkaSettings
    from pipeline.streaming import make_producer
    from pipeline.topics import TopicLayout, ensure_topics

    layout = TopicLayout(prefix=f"h{uuid.uuid4().hex[:8]}", partitions=1, sources=())
    ensure_topics(broker.bootstrap, layout)
    producer = make_producer(KafkaSettings(bootstrap_servers=broker.bootstrap))
    c = Hl7MllpConnector(Hl7MllpConfig(host="127.0.0.1", port=0), name="hl7-e2e")
    c.start()
    runner = ConnectorRunner(c, producer, layout, bootstrap=broker.bootstrap, linger_s=0.05)
    stop = threading.Event()
    t = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    t.start()
    n = 150
    try:
        with MllpClient("127.0.0.1", c.port, timeout=15) as cl:
            ack = cl.send(A01)
            assert ack is not None and (ack.code, ack.control_id) == ("AA", "MSG0001")
            assert runner.stats.context == 1  # the row was flushed before the ACK went out
            bad = cl.send(A01.replace("20240301083000|", "2024XX|").replace("MSG0001", "BAD9"))
            assert bad is not None and (bad.code, bad.control_id) == ("AE", "BAD9")
            assert "PV1-44" in bad.text
            t0 = time.perf_counter()
            for i in range(n):
                row = {**ROW, "encounter_id": f"E{i}", "department_id": f"D{i % 7}"}
                a = cl.send(to_adt(row, "A01", control_id=f"C{i}"))
                assert a is not None and a.code == "AA" and a.control_id == f"C{i}"
            rate = n / (time.perf_counter() - t0)
    finally:
        stop.set()
        t.join(15)
        producer.close()
    print(f"\nMLLP end to end through the runner and broker, ACK per message: {rate:.0f} msg/s")
    got = _read_topics(broker.bootstrap, layout)
    encounters = [r for r in got["context"] if "encounter_id" in r]
    assert {"encounter_id": "V100", **{k: v for k, v in ROW.items() if k != "encounter_id"}} in (
        encounters
    )
    assert len(encounters) == n + 1
    assert len(got["dead"]) == 1 and "PV1-44" in got["dead"][0]["emrwatch-error"]


def test_normalize_throughput() -> None:
    c = Hl7MllpConnector(Hl7MllpConfig(), name="bench")
    raws = [
        RawRecord(payload=to_adt({**ROW, "encounter_id": f"E{i}"}, "A01"), position=str(i))
        for i in range(2000)
    ]
    t0 = time.perf_counter()
    total = sum(len(c.normalize(r)) for r in raws)
    rate = len(raws) / (time.perf_counter() - t0)
    print(f"\nnormalize: {rate:.0f} ADT messages/s")
    assert total == len(raws)


def test_smoke_test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from connectors.hl7 import main

    msg = tmp_path / "a01.hl7"
    msg.write_text(A01.replace("\r", "\n"))  # as hospital IT would save it
    with listening() as (c, a):
        assert main(["127.0.0.1", str(c.port)]) == 0  # NMQ^N01 test message: AA, no output
        assert main(["127.0.0.1", str(c.port), str(msg)]) == 0
        a.wait(2)
        assert [o.row["encounter_id"] for o in a.outputs] == ["V100"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("AA SMOKE") and out[1] == "AA MSG0001"


def test_max_connections_refuses_extra_peers() -> None:
    with listening(max_connections=1) as (c, a), MllpClient("127.0.0.1", c.port) as first:
        assert first.send(A01).ok  # type: ignore[union-attr]
        with (
            MllpClient("127.0.0.1", c.port, timeout=5) as second,
            pytest.raises((ConnectionError, OSError)),
        ):
            second.send(A01)
        assert first.send(A01).ok  # type: ignore[union-attr]
        assert c.describe()["connections_refused"] == 1
    ledger: NullLedger = c.ledger  # type: ignore[assignment]
    assert any("too many connections" in r["reason"] for r in ledger.receipts)
