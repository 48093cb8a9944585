"""The partitioned replay's line reader and the explanation cache give what the plain
paths give (they are optimisations only)."""

from __future__ import annotations

import zlib
from pathlib import Path

import orjson
import pytest

import pipeline.replay as replay
from connectors.readers import read_lines
from detectors.config import DetectionConfig
from detectors.engine import Engine, UserState
from emrwatch.context import Context
from emrwatch.events import AccessEvent
from tests.hospital import ev, write_hospital

LINE = (
    b'{"resourceType":"AuditEvent","id":"%s","recorded":"2026-03-02T09:00:00+08:00",'
    b'"agent":[{"who":{"identifier":{"value":"%s"}},"requestor":true}]}'
)
ODD = [
    b"",
    b"   ",
    b"\t\r",
    b'{"who": {"identifier": {"value": "U1"}}}',
    b'{"who":{"identifier":{"value":"U\\"1"}}}\r\r',
    b'{"who":{"identifier":{"value":"U1"}},"x":{"who":{"identifier":{"value":"U2"}}}}',
    b'{"who":{"identifier":{"value":"U3"} }}',
    b"not json",
]


def _expected(path: Path, p: int, parts: int, fmt: str) -> list[tuple[int, bytes, bool]]:
    out = []
    for no, raw, _ in read_lines(path, fmt):
        hint = replay.owner_hint(raw, fmt)
        if hint is None or zlib.crc32(hint) % parts == p:
            out.append((no, raw, hint is not None))
    return out


@pytest.mark.parametrize("trail", [b"", b"\n", b"\n\n", b"\n  "])
@pytest.mark.parametrize("block", [7, 64, 4096, 1 << 22])
def test_partition_lines_match_read_lines_and_owner_hint(tmp_path, monkeypatch, trail, block):
    lines = [b"\xef\xbb\xbf" + LINE % (b"e0", b"U9") + b"\r"]
    lines += [LINE % (b"e%d" % i, b"U%d" % (i % 7)) for i in range(1, 40)]
    lines[10:10] = ODD
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\n".join(lines) + trail)
    monkeypatch.setattr(replay, "READ_BLOCK", block)
    for parts in (2, 3):
        for p in range(parts):
            got = list(replay._partition_lines(str(path), p, parts, "fhir"))
            assert got == _expected(path, p, parts, "fhir")


@pytest.mark.parametrize("block", [512, 4096, 1 << 16])
def test_whole_block_split_matches_line_by_line(tmp_path, monkeypatch, block):
    """Blocks of compact lines are split in one pass; any odd line (two "who", an escape,
    spaces, CRLF, a "who" in a value) sends its block back to the line-by-line path."""
    lines = [LINE % (b"e%d" % i, b"U%d" % (i % 11)) for i in range(600)]
    lines[150] = lines[150] + b"\r"
    lines[300] = LINE % (b"e300", b"U1") + b'"who"'
    lines[301] = b'{"x":"who","who":{"identifier":{"value":"U4"}}}'
    lines[420] = ODD[5]
    lines[421] = ODD[4]
    lines[480] = b'{"a":"\\"who\\"","who":{"identifier":{"value":"U2"}}}'
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setattr(replay, "READ_BLOCK", block)
    for parts in (2, 3):
        for p in range(parts):
            got = list(replay._partition_lines(str(path), p, parts, "fhir"))
            assert got == _expected(path, p, parts, "fhir")
    data = b"".join(x + b"\n" for x in lines[1:100])
    assert replay._block_owners(data, len(data)) is not None
    for odd in (lines[300], lines[301], ODD[5], ODD[4], b"", b"{}"):
        data = b"".join(x + b"\n" for x in [*lines[1:50], odd, *lines[50:99]])
        assert replay._block_owners(data, len(data)) is None


def test_fast_owner_hint_is_owner_hint():
    for raw in [LINE % (b"e", b"U1"), *ODD]:
        assert replay.fast_owner_hint(raw, "fhir") == replay.owner_hint(raw, "fhir")
    for raw in [
        b'{"user_id":"a"}',
        b'{"user_id": "a"}',
        b'{"user_id":"a\\"b"}',
        b'{"user_id":"a","user_id":"b"}',
        b'{"user_id":1}',
    ]:
        assert replay.fast_owner_hint(raw, "jsonl") == replay.owner_hint(raw, "jsonl")


def test_balanced_workers_are_deterministic_and_cover_the_heavy_users(tmp_path):
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\n".join(LINE % (b"e%d" % i, b"U%d" % (i % 5)) for i in range(500)))
    a = replay.balance_users(str(path), "fhir", 2)
    assert a == replay.balance_users(str(path), "fhir", 2)
    assert set(a) == {b"U%d" % i for i in range(5)} and set(a.values()) == {0, 1}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context.load(write_hospital(tmp_path_factory.mktemp("hospital")))


def test_cached_explanations_equal_a_fresh_scan(ctx):
    """The engine reuses a (user, patient) encounter scan while the time stays in its range:
    the same facts as an engine that scans afresh for every access."""
    times = [f"2026-03-0{d}T{h:02d}:00:00" for d in (1, 2, 3, 5, 9) for h in (0, 9, 23)]
    users = ["n-card", "p-card", "t-rad", "c-bill", "v-it", "n-ed", "leaver", "nobody"]
    patients = ["P1", "P2", "P-DIS", "P-SEAL", "P-VIP"]
    cached = Engine(ctx, DetectionConfig(model_registry="none"))
    states: dict[str, UserState] = {}
    for at in times:
        for u in users:
            for pid in patients:
                e = AccessEvent.from_dict(ev(u, pid, at=at))
                fresh = Engine(ctx, DetectionConfig(model_registry="none"))
                st = states.setdefault(u, UserState())
                assert cached.facts(e, st) == fresh.facts(e, UserState()), (u, pid, at)


def test_input_end_time_reads_the_latest_time_at_the_end(tmp_path, monkeypatch):
    """Where each partition's watermark ends: the latest event among the file's last lines,
    past a bad last line and a line cut by the tail window; None when it cannot tell."""
    import gzip

    from emrwatch.events import parse_ts

    rows = [orjson.dumps(ev("U1", "P1", at=f"2026-03-02T09:{m:02d}:00")) for m in (9, 1, 7, 3)]
    plain = tmp_path / "events.jsonl"
    plain.write_bytes(b"\n".join([*rows, b"not json", b""]))
    latest = parse_ts("2026-03-02T09:09:00+08:00")
    assert replay.input_end_time(plain, "jsonl") == latest
    assert replay.input_end_time(plain, "auto") == latest
    # a tail window that starts inside the first line skips it (the rest end at 09:07)
    monkeypatch.setattr(replay, "END_TAIL_BYTES", len(b"\n".join(rows[1:])) + 12)
    assert replay.input_end_time(plain, "jsonl") == parse_ts("2026-03-02T09:07:00+08:00")
    monkeypatch.undo()
    packed = tmp_path / "events.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert replay.input_end_time(packed, "jsonl") is None
    assert replay.input_end_time("-", "jsonl") is None
    assert replay.input_end_time(tmp_path / "missing.jsonl", "jsonl") is None
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"not json\n")
    assert replay.input_end_time(bad, "jsonl") is None
