"""fhir-rest, fhir-bulk-export and fhir-context against a real local FHIR-like HTTP server.

:class:`FakeFhir` is a small ``ThreadingHTTPServer`` on 127.0.0.1 that behaves like the parts
of a FHIR server the connectors use: searchset Bundles paged by ``next`` links with
``_lastUpdated`` (gt/ge) filtering and ``_include``/``_revinclude``, Bulk Data ``$export``
(kick-off, 202 status with X-Progress, manifest, NDJSON files, DELETE), bearer tokens,
scripted 429/503 answers with Retry-After, and optionally TLS with client certificates.
"""

from __future__ import annotations

import bisect
import functools
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import ContextUpdate, NullLedger, RawRecord
from connectors.fhir_encode import to_audit_event
from connectors.fhir_rest import (
    FhirBulkExportConnector,
    FhirContextConnector,
    FhirError,
    FhirHttpError,
    FhirRestConnector,
)
from connectors.registry import build
from connectors.testing import ConnectorConformance, collect, normalize_all
from emrwatch.events import AccessEvent, EventError

T0 = "2026-03-01T08:00:00.000+00:00"
T1 = "2026-03-01T08:00:01.000+00:00"
T2 = "2026-03-01T08:00:02.000+00:00"
T3 = "2026-03-01T08:00:03.000+00:00"


@functools.cache
def _t(value: str) -> datetime:
    dt = datetime.fromisoformat(value)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------- the server
def _order(resource: dict[str, Any]) -> tuple[datetime, str]:
    return _t(resource["meta"]["lastUpdated"]), resource["id"]


class FakeFhir:
    """State and behaviour of the local FHIR server (see the module docstring)."""

    def __init__(self, tls: ssl.SSLContext | None = None, token: str = "") -> None:
        self.store: dict[str, list[dict[str, Any]]] = {}
        self.token = token
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        #: path prefix → answers to give before the real one: (status, Retry-After)
        self.script: dict[str, list[tuple[int, str]]] = {}
        self.exports: dict[str, dict[str, Any]] = {}
        self.export_polls = 2  # 202 answers before the manifest
        self.export_file_lines = 5  # lines per NDJSON file
        self.export_extra: list[bytes] = []  # raw lines appended to the first export file
        self.kickoff_error: tuple[int, str] | None = None
        self.clock_skew_s = 0.0  # the server's clock minus this machine's (its Date header)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(
        self, resource: dict[str, Any], last_updated: str, version: str = "1", into: str = ""
    ) -> None:
        """Store a resource; ``into`` files it under another type's search (a bad entry)."""
        resource = dict(resource)
        resource["meta"] = {"versionId": version, "lastUpdated": last_updated}
        with self.lock:  # kept in search order: (lastUpdated, id)
            bisect.insort(
                self.store.setdefault(into or resource["resourceType"], []), resource, key=_order
            )

    def paths(self, method: str = "GET") -> list[str]:
        return [p for m, p, _ in self.requests if m == method]

    # ------------------------------------------------------------ search
    def search(self, rtype: str, q: dict[str, str], base: str) -> dict[str, Any]:
        with self.lock:
            items = self.store.get(rtype, [])
            first, end = 0, len(items)
            for lu in filter(None, q.get("_lastUpdated", "").split(" ")):
                when = _t(lu[2:])
                find = {
                    "gt": bisect.bisect_right,
                    "ge": bisect.bisect_left,
                    "lt": bisect.bisect_left,
                }
                at = find[lu[:2]](items, when, key=lambda r: _t(r["meta"]["lastUpdated"]))
                first, end = (first, min(end, at)) if lu[:2] == "lt" else (max(first, at), end)
            count, offset = int(q.get("_count", "50")), int(q.get("_offset", "0"))
            page = items[first + offset : min(end, first + offset + count)]
            total = max(0, end - first)
        entries = [{"resource": r, "search": {"mode": "match"}} for r in page]
        if q.get("_include") == "PractitionerRole:practitioner":
            ids = {r.get("practitioner", {}).get("reference") for r in page}
            for p in self.store.get("Practitioner", []):
                if f"Practitioner/{p['id']}" in ids:
                    entries.append({"resource": p, "search": {"mode": "include"}})
        if q.get("_revinclude") == "PractitionerRole:practitioner":
            ids = {f"Practitioner/{p['id']}" for p in page}
            for r in self.store.get("PractitionerRole", []):
                if r.get("practitioner", {}).get("reference") in ids:
                    entries.append({"resource": r, "search": {"mode": "include"}})
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": [{"relation": "self", "url": f"{base}/{rtype}"}],
            "entry": entries,
        }
        if offset + count < total:
            nq = [(k, v) for k, v in q.items() if k != "_lastUpdated"]
            nq += [("_lastUpdated", lu) for lu in q.get("_lastUpdated", "").split(" ") if lu]
            nq.append(("_offset", str(offset + count)))
            bundle["link"].append(
                {"relation": "next", "url": f"{base}/{rtype}?{urllib.parse.urlencode(nq)}"}
            )
        return bundle

    # ------------------------------------------------------------ bulk export
    def kick_off(self, q: dict[str, str], base: str) -> tuple[int, dict[str, str], bytes]:
        if self.kickoff_error is not None:
            status, text = self.kickoff_error
            return status, {}, _outcome(text)
        since = _t(q["_since"]) if q.get("_since") else None
        items = [
            r
            for r in self.store.get("AuditEvent", [])
            if since is None or _t(r["meta"]["lastUpdated"]) > since
        ]
        items.sort(key=lambda r: (_t(r["meta"]["lastUpdated"]), r["id"]))
        lines = [orjson.dumps(r) for r in items]
        if lines:
            lines[1:1] = list(self.export_extra)  # after the first record
        n = self.export_file_lines
        files = [lines[i : i + n] for i in range(0, len(lines), n)]
        with self.lock:
            eid = f"x{len(self.exports) + 1}"
            self.exports[eid] = {
                "polls": self.export_polls,
                "files": [b"\n".join(f) + b"\n" for f in files],
                "tt": max((r["meta"]["lastUpdated"] for r in items), default=q.get("_since", T0)),
                "request": q,
            }
        return 202, {"Content-Location": f"{base}/export-status/{eid}"}, b""

    def status(self, eid: str, base: str) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            ex = self.exports.get(eid)
            if ex is None:
                return 404, {}, _outcome(f"no export {eid}")
            if ex["polls"] > 0:
                ex["polls"] -= 1
                return 202, {"X-Progress": "exporting", "Retry-After": "0"}, b""
        manifest = {
            "transactionTime": ex["tt"],
            "request": f"{base}/$export",
            "requiresAccessToken": True,
            "output": [
                {"type": "AuditEvent", "url": f"{base}/export-files/{eid}/{i}.ndjson"}
                for i in range(len(ex["files"]))
            ],
            "error": [],
        }
        return 200, {"Content-Type": "application/json"}, orjson.dumps(manifest)


def _outcome(text: str, code: str = "processing") -> bytes:
    return orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}],
        }
    )


def _handler(fake: FakeFhir) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def date_time_string(self, timestamp: float | None = None) -> str:
            """The Date header, from a clock ``fake.clock_skew_s`` off this machine's."""
            return super().date_time_string(time.time() + fake.clock_skew_s)

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            ctype = "application/fhir+json"
            for k, v in (headers or {}).items():
                self.send_header(k, v)
                if k == "Content-Type":
                    ctype = v
            if "Content-Type" not in (headers or {}):
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self, method: str) -> None:
            parts = urllib.parse.urlsplit(self.path)
            pairs = urllib.parse.parse_qsl(parts.query)
            q = {k: v for k, v in pairs if k not in ("_lastUpdated", "_offset")}
            # the bounds of a range (ge/gt and lt), space-separated; one offset
            lus = [v for k, v in pairs if k == "_lastUpdated"]
            if lus:
                q["_lastUpdated"] = " ".join(lus)
            if "_offset" in dict(pairs):
                q["_offset"] = dict(pairs)["_offset"]
            path = parts.path.removeprefix("/fhir")
            fake.requests.append((method, self.path, dict(self.headers.items())))
            host = self.headers.get("Host", "")
            scheme = "https" if fake.url.startswith("https") else "http"
            base = f"{scheme}://{host}/fhir"
            with fake.lock:
                for prefix, answers in fake.script.items():
                    if path.startswith(prefix) and answers:
                        status, retry_after = answers.pop(0)
                        self._send(
                            status, _outcome("busy", "transient"), {"Retry-After": retry_after}
                        )
                        return
            if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                self._send(401, _outcome("missing or wrong bearer token", "login"))
                return
            if method == "DELETE" and path.startswith("/export-status/"):
                with fake.lock:
                    fake.exports.pop(path.rsplit("/", 1)[1], None)
                self._send(202, b"")
            elif path == "/$export":
                if self.headers.get("Prefer") != "respond-async":
                    self._send(400, _outcome("Prefer: respond-async is required"))
                    return
                self._send(*_swap(fake.kick_off(q, base)))
            elif path.startswith("/export-status/"):
                self._send(*_swap(fake.status(path.rsplit("/", 1)[1], base)))
            elif path.startswith("/export-files/"):
                _, _, eid, name = path.split("/")
                ex = fake.exports.get(eid)
                if ex is None:
                    self._send(404, _outcome("expired"))
                    return
                body = ex["files"][int(name.split(".")[0])]
                self._send(200, body, {"Content-Type": "application/fhir+ndjson"})
            elif path.strip("/") in (
                "AuditEvent",
                "Practitioner",
                "PractitionerRole",
                "Encounter",
                "Patient",
            ):
                self._send(200, orjson.dumps(fake.search(path.strip("/"), q, base)))
            else:
                self._send(404, _outcome(f"unknown path {path}"))

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self._route("GET")

        def do_DELETE(self) -> None:  # noqa: N802
            self._route("DELETE")

    return Handler


def _swap(x: tuple[int, dict[str, str], bytes]) -> tuple[int, bytes, dict[str, str]]:
    return x[0], x[2], x[1]


@pytest.fixture()
def fhir() -> Iterator[FakeFhir]:
    server = FakeFhir()
    yield server
    server.close()


# ---------------------------------------------------------------------------- data
def _event(i: int, **kw: Any) -> AccessEvent:
    fields = {
        "event_id": f"ae-{i}",
        "ts": f"2026-03-01T0{8 + i // 60 % 2}:{i % 60:02d}:00+08:00",
        "user_id": f"u{i % 5}",
        "patient_id": f"p{i % 7}",
        "action": "view",
        "resource_type": "Observation",
        "workstation": "ws-1",
    }
    return AccessEvent.from_dict({**fields, **kw})


R5_EVENT: dict[str, Any] = {
    "resourceType": "AuditEvent",
    "id": "r5-1",
    "category": [{"coding": [{"code": "rest"}]}],
    "code": {"coding": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}]},
    "action": "R",
    "occurredDateTime": "2026-03-01T08:30:00+08:00",
    "recorded": "2026-03-01T08:30:01+08:00",
    "outcome": {
        "code": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-outcome", "code": "0"}
    },
    "agent": [
        {"who": {"identifier": {"value": "dr-r5"}}, "requestor": True, "networkString": "10.1.2.3"},
    ],
    "source": {"observer": {"display": "R5 EMR"}},
    "entity": [
        {"what": {"reference": "Patient/p-r5"}, "role": {"coding": [{"code": "1"}]}},
        {"what": {"reference": "DiagnosticReport/dr1"}},
    ],
}


def audit_store(fake: FakeFhir) -> list[str]:
    """Ten entries: eight good (one R5), a malformed AuditEvent and a Patient; several share
    one lastUpdated across a page boundary. Returns their positions in search order."""
    stamps = [T0, T1, T1, T1, T1, T1, T2, T2, T3, T3]
    resources: list[dict[str, Any]] = [to_audit_event(_event(i)) for i in range(7)]
    resources.insert(3, dict(R5_EVENT))
    resources.insert(5, {"resourceType": "AuditEvent", "id": "bad-1", "action": "R"})
    resources.insert(8, {"resourceType": "Patient", "id": "pat-x"})
    for res, stamp in zip(resources, stamps, strict=True):
        fake.add(res, stamp, into="AuditEvent")
    order = sorted(zip(stamps, resources, strict=True), key=lambda x: (_t(x[0]), x[1]["id"]))
    return [f"{r['resourceType']}/{r['id']} _history/1" for _, r in order]


def context_store(fake: FakeFhir) -> None:
    fake.add(
        {
            "resourceType": "Practitioner",
            "id": "pr1",
            "identifier": [{"system": "urn:emr:user", "value": "u-li"}],
            "name": [{"use": "official", "family": "Li", "given": ["Wei", "Ming"]}],
            "address": [{"text": "1 Garden Rd, Shanghai"}],
        },
        T0,
    )
    fake.add(
        {
            "resourceType": "Practitioner",
            "id": "pr2",
            "identifier": [{"system": "urn:emr:user", "value": "u-zh"}],
            "name": [{"family": "Zhang", "given": ["Min"]}],
        },
        T0,
    )
    fake.add({"resourceType": "Practitioner", "id": "pr3", "name": [{"text": "Vendor Bot"}]}, T1)
    fake.add(
        {
            "resourceType": "PractitionerRole",
            "id": "role1",
            "practitioner": {"reference": "Practitioner/pr1"},
            "organization": {"reference": "Organization/CARD"},
            "code": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/practitioner-role",
                            "code": "doctor",
                        }
                    ]
                }
            ],
            "period": {"start": "2024-01-01", "end": "2027-06-30T00:00:00+08:00"},
        },
        T1,
    )
    fake.add(
        {
            "resourceType": "PractitionerRole",
            "id": "role2",
            "active": True,
            "practitioner": {"reference": "Practitioner/pr2"},
            "location": [{"reference": "Location/WARD5"}],
            "code": [{"coding": [{"system": "http://snomed.info/sct", "code": "224535009"}]}],
        },
        T1,
    )
    fake.add(
        {
            "resourceType": "PractitionerRole",
            "id": "role3",
            "practitioner": {"reference": "Practitioner/gone"},
            "code": [{"coding": [{"code": "nurse"}]}],
        },
        T2,
    )
    fake.add(
        {
            "resourceType": "Encounter",
            "id": "enc1",
            "status": "in-progress",
            "subject": {"reference": "Patient/p1"},
            "serviceProvider": {"reference": "Organization/CARD"},
            "period": {"start": "2026-03-01T08:00:00+08:00"},
            "participant": [
                {"individual": {"reference": "Practitioner/pr2"}},
                {
                    "type": [{"coding": [{"code": "ATND"}]}],
                    "individual": {
                        "reference": "Practitioner/pr1",
                        "identifier": {"value": "u-li"},
                    },
                },
            ],
        },
        T0,
    )
    fake.add(  # R5: actualPeriod, participant.actor, location
        {
            "resourceType": "Encounter",
            "id": "enc2",
            "status": "completed",
            "subject": {"reference": "Patient/p2"},
            "location": [{"location": {"reference": "Location/WARD5"}}],
            "actualPeriod": {
                "start": "2026-02-27T10:00:00+08:00",
                "end": "2026-02-28T09:30:00+08:00",
            },
            "participant": [{"actor": {"reference": "Practitioner/pr2"}}],
        },
        T1,
    )
    fake.add({"resourceType": "Encounter", "id": "enc3", "status": "in-progress"}, T2)


EXPECTED_STAFF = {
    "u-li": {
        "user_id": "u-li",
        "family_name": "Li",
        "given_name": "Wei Ming",
        "role": "physician",
        "department_id": "CARD",
        "valid_from": "2024-01-01",
        "valid_until": "2027-06-30",
        "address": "1 Garden Rd, Shanghai",
    },
    "u-zh": {
        "user_id": "u-zh",
        "family_name": "Zhang",
        "given_name": "Min",
        "role": "nurse",
        "department_id": "WARD5",
        "valid_from": "",
        "valid_until": "",
        "address": "",
    },
    "pr3": {
        "user_id": "pr3",
        "family_name": "Vendor Bot",
        "given_name": "",
        "role": "",
        "department_id": "",
        "valid_from": "",
        "valid_until": "",
        "address": "",
    },
}
EXPECTED_ENCOUNTERS = {
    "enc1": {
        "encounter_id": "enc1",
        "patient_id": "p1",
        "department_id": "CARD",
        "start": "2026-03-01T08:00:00+08:00",
        "end": "",
        "attending_user_id": "u-li",
    },
    "enc2": {
        "encounter_id": "enc2",
        "patient_id": "p2",
        "department_id": "WARD5",
        "start": "2026-02-27T10:00:00+08:00",
        "end": "2026-02-28T09:30:00+08:00",
        "attending_user_id": "pr2",
    },
}


def drain(connector: Any, checkpoint: Any = None, limit: int | None = None) -> list[RawRecord]:
    """Every record of a ``once`` connector (None yields are waits, skipped); at most ``limit``."""
    stop = threading.Event()
    out: list[RawRecord] = []
    gen = connector.records(checkpoint, stop)
    try:
        for raw in gen:
            if raw is not None:
                out.append(raw)
                if limit is not None and len(out) >= limit:
                    break
    finally:
        gen.close()
        connector.close()
    return out


def rest(fake: FakeFhir, **cfg: Any) -> FhirRestConnector:
    c = build({"type": "fhir-rest", "base_url": fake.url, "once": True, **cfg}, ledger=NullLedger())
    assert isinstance(c, FhirRestConnector)
    return c


# ---------------------------------------------------------------------------- conformance
class TestFhirRestConformance(ConnectorConformance):
    connector_type = "fhir-rest"
    expected = (10, 8, 2)

    @pytest.fixture(autouse=True)
    def _server(self, fhir: FakeFhir) -> None:
        self.fake = fhir
        audit_store(fhir)

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"base_url": self.fake.url, "page_size": 3, "once": True, "max_retries": 1}


class TestFhirBulkExportConformance(ConnectorConformance):
    connector_type = "fhir-bulk-export"
    expected = (11, 8, 3)  # 10 resources + 1 malformed line; a blank line is no record

    @pytest.fixture(autouse=True)
    def _server(self, fhir: FakeFhir) -> None:
        self.fake = fhir
        audit_store(fhir)
        fhir.export_extra = [b"", b"{oops not json"]

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        # A resumed export re-reads its status URL, which a finished (deleted) export lacks;
        # the suite resumes from checkpoints of an export it already finished.
        return {
            "base_url": self.fake.url,
            "once": True,
            "delete_when_done": False,
            "status_poll_s": 0.05,
        }


class TestFhirContextConformance(ConnectorConformance):
    connector_type = "fhir-context"
    expected = (9, 7, 2)

    @pytest.fixture(autouse=True)
    def _server(self, fhir: FakeFhir) -> None:
        self.fake = fhir
        context_store(fhir)

    def source_config(self, tmp_path: Path) -> dict[str, Any]:
        return {
            "base_url": self.fake.url,
            "page_size": 2,
            "once": True,
            "user_id_system": "urn:emr:user",
        }


# ---------------------------------------------------------------------------- fhir-rest
def test_rest_pages_through_next_links_and_writes_a_receipt_per_page(fhir: FakeFhir) -> None:
    positions = audit_store(fhir)
    c = rest(fhir, page_size=3)
    records = drain(c)
    assert [r.position for r in records] == positions
    searches = [p for p in fhir.paths() if p.startswith("/fhir/AuditEvent")]
    assert len(searches) == 4  # 10 entries, 3 a page
    assert "_sort=_lastUpdated" in searches[0] and "_count=3" in searches[0]
    # no since: everything up to the settle bound (a few seconds ago)
    assert "_lastUpdated=ge" not in searches[0] and "_lastUpdated=gt" not in searches[0]
    assert "_lastUpdated=lt" in searches[0]
    receipts = c.ledger.receipts  # type: ignore[attr-defined]
    assert [r["records"] for r in receipts] == [3, 3, 3, 1]
    assert all(r["peer"] == fhir.url and r["bytes"] > 0 for r in receipts)
    # the payload is the resource itself
    assert orjson.loads(records[0].payload)["id"] == "ae-0"


def test_rest_since_is_exclusive(fhir: FakeFhir) -> None:
    audit_store(fhir)
    records = drain(rest(fhir, since=T1))
    assert [orjson.loads(r.payload)["meta"]["lastUpdated"] for r in records] == [T2] * 2 + [T3] * 2
    assert "_lastUpdated=gt2026-03-01T08%3A00%3A01.000%2B00%3A00" in fhir.paths()[0]


def test_rest_resume_with_records_sharing_one_instant(fhir: FakeFhir) -> None:
    """Five records share T1 across a page boundary; a restart in the middle of them and
    records arriving later at that same instant are neither lost nor repeated."""
    positions = audit_store(fhir)
    first = drain(rest(fhir, page_size=2), limit=4)  # ae-0, then three at T1
    cp = orjson.loads(orjson.dumps(first[-1].checkpoint))
    assert cp["since"] == T1 and len(cp["seen"]) == 3
    late = to_audit_event(_event(50))
    fhir.add(late, T1)  # committed at the instant already being read
    fhir.add(to_audit_event(_event(51)), T3)
    n = len(fhir.requests)
    rest_ = drain(rest(fhir, page_size=2), cp)
    assert "_lastUpdated=ge" in fhir.requests[n][1]
    got = [r.position for r in first] + [r.position for r in rest_]
    assert len(got) == len(set(got)), "a record was repeated"
    assert set(got) == {*positions, "AuditEvent/ae-50 _history/1", "AuditEvent/ae-51 _history/1"}
    # and resuming after the very last record yields nothing
    assert drain(rest(fhir), rest_[-1].checkpoint) == []


def _ago(seconds: float) -> str:
    """An instant ``seconds`` before now, as a FHIR server would stamp it."""
    return datetime.fromtimestamp(time.time() - seconds, UTC).isoformat(timespec="milliseconds")


def _poll_twice(fake: FakeFhir, first: Any, between: Any, **cfg: Any) -> list[str]:
    """Ids a polling fhir-rest reads in a first poll right after ``first()`` and in the
    polls after ``between()`` ran (while the poller waited)."""
    c = build({"type": "fhir-rest", "base_url": fake.url, "poll_interval_s": 0.1, **cfg})
    first()
    stop = threading.Event()
    got: list[str] = []
    called = False
    deadline = time.monotonic() + 20
    gen = c.records(None, stop)
    for raw in gen:
        searches = sum(p.startswith("/fhir/AuditEvent") for p in fake.paths())
        if raw is not None:
            got.append(orjson.loads(raw.payload)["id"])
        elif not called and searches == 1:
            between()
            called = True
        elif searches >= 3:
            stop.set()  # the poll after the one that followed between() is done too
        if time.monotonic() > deadline:
            stop.set()
    c.close()
    return got


def test_rest_reads_a_transaction_that_commits_late_with_an_older_timestamp(
    fhir: FakeFhir,
) -> None:
    """A server stamps a record when its transaction starts. ae-2, stamped 2 s ago, commits
    after ae-3 (stamped 1 s ago) was already visible: a poller that read ae-3 has moved its
    mark past ae-2 and never asks for it again. Waiting ``settle_s`` reads both, in order."""

    def visible() -> None:
        fhir.store.clear()
        fhir.add(to_audit_event(_event(1)), _ago(60))
        fhir.add(to_audit_event(_event(3)), _ago(1))

    def late_commit() -> None:
        fhir.add(to_audit_event(_event(2)), _ago(2))
        # then both are older than the wait (less the second a Date header may be early)
        time.sleep(2.5)

    assert _poll_twice(fhir, visible, late_commit, settle_s=3.0) == ["ae-1", "ae-2", "ae-3"]
    assert "_lastUpdated=lt" in fhir.paths()[0]
    fhir.requests.clear()
    # without the wait the mark passes ae-2 before it commits: the loss settle_s prevents
    assert _poll_twice(fhir, visible, late_commit, settle_s=0) == ["ae-1", "ae-3"]


def test_rest_settle_wait_follows_the_servers_clock(fhir: FakeFhir) -> None:
    """The server's clock runs 120 s behind: a record it stamped 2 s ago (by its clock) is
    122 s old by ours. Once a response's Date header told the connector, it waits for it."""
    fhir.clock_skew_s = -120.0

    def old_record() -> None:
        fhir.add(to_audit_event(_event(1)), _ago(200))

    def add_recent() -> None:
        fhir.add(to_audit_event(_event(2)), _ago(122))  # 2 s old on the server's clock

    assert _poll_twice(fhir, old_record, add_recent, settle_s=30.0) == ["ae-1"]
    # the same store, from a server whose clock agrees with ours: ae-2 is old enough
    fhir.clock_skew_s = 0.0
    fhir.requests.clear()
    assert _poll_twice(fhir, lambda: None, lambda: None, settle_s=30.0) == ["ae-1", "ae-2"]


def test_rest_new_version_of_a_resource_is_a_new_record(fhir: FakeFhir) -> None:
    fhir.add(to_audit_event(_event(1)), T0)
    first = drain(rest(fhir))
    fhir.add(to_audit_event(_event(1)), T2, version="2")
    again = drain(rest(fhir), first[-1].checkpoint)
    assert [r.position for r in again] == ["AuditEvent/ae-1 _history/2"]


def test_rest_r5_audit_event(fhir: FakeFhir) -> None:
    fhir.add(dict(R5_EVENT), T0)
    c = rest(fhir)
    [raw] = drain(c)
    [e] = c.normalize(raw)
    assert isinstance(e, AccessEvent)
    assert (e.event_id, e.user_id, e.patient_id, e.action, e.resource_type, e.workstation) == (
        "r5-1",
        "dr-r5",
        "p-r5",
        "view",
        "DiagnosticReport",
        "10.1.2.3",
    )
    assert (e.outcome, e.source, e.ts) == ("success", "R5 EMR", "2026-03-01T08:30:01+08:00")


def test_rest_normalize_refuses_non_audit_and_operation_outcome(fhir: FakeFhir) -> None:
    c = rest(fhir)
    oo = RawRecord(payload=_outcome("too many results"), position="x")
    with pytest.raises(EventError, match="OperationOutcome.*too many results"):
        c.normalize(oo)
    with pytest.raises(EventError, match="not an AuditEvent"):
        c.normalize(RawRecord(payload=b'{"resourceType":"Patient","id":"1"}', position="y"))
    with pytest.raises(EventError, match="invalid JSON"):
        c.normalize(RawRecord(payload=b"\xff{", position="z"))


def test_rest_retries_429_and_503_honouring_retry_after(fhir: FakeFhir) -> None:
    positions = audit_store(fhir)
    fhir.script["/AuditEvent"] = [(429, "1"), (503, "1")]
    c = rest(fhir, page_size=5, backoff_s=30)  # the backoff would take 30 s: Retry-After wins
    stop = threading.Event()
    t0 = time.monotonic()
    items = list(c.records(None, stop))
    elapsed = time.monotonic() - t0
    assert [r.position for r in items if r is not None] == positions
    assert 1.9 <= elapsed < 10, elapsed
    assert items.count(None) >= 2, "a wait must yield None at least once a second"
    assert [p.split("?")[0] for p in fhir.paths()][:3] == ["/fhir/AuditEvent"] * 3


def test_rest_gives_up_after_max_retries_with_the_outcome_text(fhir: FakeFhir) -> None:
    fhir.script["/AuditEvent"] = [(503, "0")] * 3
    with pytest.raises(FhirHttpError, match=r"HTTP 503.*transient: busy") as info:
        drain(rest(fhir, max_retries=2))
    assert info.value.status == 503


def test_rest_bearer_token_from_env_and_clear_401(
    fhir: FakeFhir, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fhir.token = "s3cret"
    fhir.add(to_audit_event(_event(1)), T0)
    with pytest.raises(FhirHttpError, match=r"HTTP 401.*wrong bearer token.*token_file"):
        drain(rest(fhir))
    monkeypatch.setenv("FHIR_TOKEN", "s3cret")
    assert len(drain(rest(fhir, token_env="FHIR_TOKEN"))) == 1
    (tmp_path / "tok").write_text("s3cret\n")
    assert len(drain(rest(fhir, token_file=str(tmp_path / "tok")))) == 1


def test_rest_keeps_polling_and_yields_none_while_idle(fhir: FakeFhir) -> None:
    fhir.add(to_audit_event(_event(1)), T0)
    c = build({"type": "fhir-rest", "base_url": fhir.url, "poll_interval_s": 0.2})
    stop = threading.Event()
    seen: list[RawRecord | None] = []
    gen = c.records(None, stop)
    deadline = time.monotonic() + 10
    added = False
    for raw in gen:
        seen.append(raw)
        got = [x for x in seen if x is not None]
        if raw is None and len(got) == 1 and not added:
            fhir.add(to_audit_event(_event(2)), T1)  # arrives while the poller waits
            added = True
        if len(got) == 2 or time.monotonic() > deadline:
            stop.set()
    assert [orjson.loads(r.payload)["id"] for r in seen if r is not None] == ["ae-1", "ae-2"]
    assert None in seen


def test_rest_refuses_a_next_link_to_another_host(fhir: FakeFhir) -> None:
    for i in range(3):
        fhir.add(to_audit_event(_event(i)), T0)
    orig = fhir.search

    def evil(rtype: str, q: dict[str, str], base: str) -> dict[str, Any]:
        b = orig(rtype, q, base)
        for link in b["link"]:
            if link["relation"] == "next":
                link["url"] = "http://evil.example/fhir/AuditEvent?page=2"
        return b

    fhir.search = evil  # type: ignore[method-assign]
    with pytest.raises(FhirError, match="leaves"):
        drain(rest(fhir, page_size=2))


def test_config_is_validated() -> None:
    from connectors.base import ConnectorConfigError

    with pytest.raises(ConnectorConfigError, match="base_url"):
        build({"type": "fhir-rest", "base_url": "ftp://x"})
    with pytest.raises(ConnectorConfigError, match="since"):
        build({"type": "fhir-rest", "base_url": "http://x/fhir", "since": "yesterday"})
    with pytest.raises(ConnectorConfigError, match="exactly one of base_url and paths"):
        build({"type": "fhir-context"})
    with pytest.raises(ConnectorConfigError, match="resources"):
        build({"type": "fhir-context", "base_url": "http://x", "resources": ["Observation"]})


# ---------------------------------------------------------------------------- mutual TLS
@pytest.fixture()
def mtls(tmp_path: Path) -> Iterator[tuple[FakeFhir, dict[str, str]]]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("emrwatch-connector@hospital.example")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.crt"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    fake = FakeFhir(tls=ctx)
    fake.add(to_audit_event(_event(1)), T0)
    fake.add(to_audit_event(_event(2)), T1)
    yield (
        fake,
        {
            "ca": str(tmp_path / "ca.pem"),
            "pem": str(tmp_path / "client.pem"),
            "crt": str(tmp_path / "client.crt"),
            "key": str(tmp_path / "client.key"),
        },
    )
    fake.close()


def test_mutual_tls_with_a_client_certificate(mtls: tuple[FakeFhir, dict[str, str]]) -> None:
    fake, files = mtls
    assert fake.url.startswith("https://")
    c = rest(fake, ca_file=files["ca"], cert_file=files["crt"], key_file=files["key"])
    assert [orjson.loads(r.payload)["id"] for r in drain(c)] == ["ae-1", "ae-2"]
    both = rest(fake, ca_file=files["ca"], cert_file=files["pem"])  # key and cert in one file
    assert len(drain(both)) == 2


def test_mutual_tls_without_a_client_certificate_is_refused_clearly(
    mtls: tuple[FakeFhir, dict[str, str]],
) -> None:
    fake, files = mtls
    t0 = time.monotonic()
    with pytest.raises(FhirError, match=r"TLS connection to 127\.0\.0\.1:\d+ refused.*client cert"):
        drain(rest(fake, ca_file=files["ca"]))
    assert time.monotonic() - t0 < 5, "a refused handshake is not retried"
    assert fake.paths() == []  # no request got through


def test_tls_untrusted_server_certificate_is_refused_clearly(
    mtls: tuple[FakeFhir, dict[str, str]],
) -> None:
    fake, files = mtls
    with pytest.raises(FhirError, match="not trusted: set ca_file"):
        drain(rest(fake, cert_file=files["pem"]))


# ---------------------------------------------------------------------------- bulk export
def bulk(fake: FakeFhir, **cfg: Any) -> FhirBulkExportConnector:
    c = build(
        {
            "type": "fhir-bulk-export",
            "base_url": fake.url,
            "once": True,
            "status_poll_s": 0.05,
            **cfg,
        },
        ledger=NullLedger(),
    )
    assert isinstance(c, FhirBulkExportConnector)
    return c


def test_bulk_export_kick_off_status_manifest_files_and_delete(fhir: FakeFhir) -> None:
    audit_store(fhir)
    fhir.token = "tok"
    c = bulk(fhir, headers={"Authorization": "Bearer tok"})
    records = drain(c)
    assert len(records) == 10
    assert records[0].position == f"{fhir.url}/export-files/x1/0.ndjson line 1"
    assert records[-1].position == f"{fhir.url}/export-files/x1/1.ndjson line 5"
    method, path, headers = fhir.requests[0]
    assert path.startswith("/fhir/$export?_type=AuditEvent")
    assert headers["Prefer"] == "respond-async" and headers["Accept"] == "application/fhir+json"
    status_polls = [p for p in fhir.paths() if p.startswith("/fhir/export-status/")]
    assert len(status_polls) == 3  # two 202s with X-Progress, then the manifest
    assert fhir.paths("DELETE") == ["/fhir/export-status/x1"]
    assert records[-1].checkpoint == {"since": T3, "export": None}
    units = [r["unit"] for r in c.ledger.receipts]  # type: ignore[attr-defined]
    assert units[1:] == [f"{fhir.url}/export-files/x1/{i}.ndjson" for i in (0, 1)]
    # the next export asks only for what is newer
    fhir.add(to_audit_event(_event(60)), "2026-03-02T00:00:00+00:00")
    more = drain(bulk(fhir, headers={"Authorization": "Bearer tok"}), records[-1].checkpoint)
    assert [orjson.loads(r.payload)["id"] for r in more] == ["ae-60"]
    assert "_since=2026-03-01T08%3A00%3A03.000%2B00%3A00" in fhir.paths()[-5]


def test_bulk_export_resumes_mid_file(fhir: FakeFhir) -> None:
    audit_store(fhir)
    fhir.export_file_lines = 4
    first = drain(bulk(fhir, delete_when_done=False), limit=6)  # 4 from file 0, 2 from file 1
    cp = orjson.loads(orjson.dumps(first[-1].checkpoint))
    assert cp["export"]["file_index"] == 1 and cp["export"]["line"] == 2
    kickoffs = sum(p.startswith("/fhir/$export") for p in fhir.paths())
    rest_ = drain(bulk(fhir), cp)
    assert sum(p.startswith("/fhir/$export") for p in fhir.paths()) == kickoffs  # same export
    assert [r.position.rsplit("/", 1)[1] for r in rest_] == [
        "1.ndjson line 3",
        "1.ndjson line 4",
        "2.ndjson line 1",
        "2.ndjson line 2",
    ]
    ids = [orjson.loads(r.payload)["id"] for r in first + rest_]
    assert len(ids) == len(set(ids)) == 10


def test_bulk_export_expired_status_falls_back_to_a_new_export(fhir: FakeFhir) -> None:
    audit_store(fhir)
    first = drain(bulk(fhir), limit=3)
    fhir.exports.clear()  # the server forgot the export
    again = drain(bulk(fhir), first[-1].checkpoint)
    assert len(again) == 10  # at-least-once: the whole export again, from the old _since


def test_bulk_export_error_response_is_a_clear_exception(fhir: FakeFhir) -> None:
    fhir.kickoff_error = (400, "_type=AuditEvent is not supported by this server")
    with pytest.raises(FhirHttpError, match=r"HTTP 400.*_type=AuditEvent is not supported"):
        drain(bulk(fhir))


def test_bulk_export_retries_a_throttled_status_poll(fhir: FakeFhir) -> None:
    audit_store(fhir)
    fhir.script["/export-status/"] = [(429, "1")]
    assert len(drain(bulk(fhir))) == 10


# ---------------------------------------------------------------------------- fhir-context
def test_context_rows_from_rest(fhir: FakeFhir) -> None:
    context_store(fhir)
    c = build(
        {
            "type": "fhir-context",
            "base_url": fhir.url,
            "once": True,
            "user_id_system": "urn:emr:user",
            "page_size": 2,
        }
    )
    records = drain(c)
    outs, errs = normalize_all(c, records)
    staff = {o.row["user_id"]: dict(o.row) for o in outs if o.kind == "staff"}
    enc = {o.row["encounter_id"]: dict(o.row) for o in outs if o.kind == "encounters"}
    assert staff == EXPECTED_STAFF
    assert enc == EXPECTED_ENCOUNTERS
    assert sorted(reason.split(":")[0] for _, reason in errs) == [
        "Encounter/enc3 has no subject (Patient reference)",
        "PractitionerRole/role3",
    ]
    assert any("Practitioner/gone was not included" in r for _, r in errs)
    searches = fhir.paths()
    assert any("_include=PractitionerRole%3Apractitioner" in p for p in searches)
    assert any("_revinclude=PractitionerRole%3Apractitioner" in p for p in searches)
    # the rows load into the real context model
    from emrwatch.context import Context

    ctx = Context()
    for o in outs:
        ctx.upsert_row(o.kind, dict(o.row))
    assert ctx.staff["u-li"].role == "physician" and ctx.staff["u-li"].family_key
    assert ctx.encounters["enc2"].end > ctx.encounters["enc2"].start


def test_context_practitioner_with_several_roles_takes_the_latest(fhir: FakeFhir) -> None:
    fhir.add({"resourceType": "Practitioner", "id": "p", "name": [{"family": "Wu"}]}, T0)
    for rid, code, stamp in (("a", "nurse", T2), ("b", "doctor", T1)):
        fhir.add(
            {
                "resourceType": "PractitionerRole",
                "id": rid,
                "code": [{"text": code}],
                "practitioner": {"reference": "Practitioner/p"},
            },
            stamp,
        )
    c = build(
        {
            "type": "fhir-context",
            "base_url": fhir.url,
            "once": True,
            "resources": ["PractitionerRole", "Practitioner"],
        }
    )
    outs, _ = normalize_all(c, drain(c))
    assert [o.row["role"] for o in outs] == ["physician", "nurse", "nurse"]


def test_context_inactive_role_and_patients_and_files(tmp_path: Path) -> None:
    lines = [
        {
            "resourceType": "Practitioner",
            "id": "p9",
            "active": False,
            "meta": {"lastUpdated": "2026-02-01T00:00:00Z"},
            "name": [{"family": "Ma"}],
        },
        {
            "resourceType": "PractitionerRole",
            "id": "r9",
            "practitioner": {"reference": "Practitioner/p9"},
            "code": [{"text": "Pharmacist"}],
            "extension": [{"url": "urn:x:clearance", "valueInteger": 3}],
        },
        {
            "resourceType": "PractitionerRole",
            "id": "r10",
            "practitioner": {"reference": "#c"},
            "contained": [{"resourceType": "Practitioner", "id": "c", "name": [{"family": "Qi"}]}],
        },
        {
            "resourceType": "Patient",
            "id": "pt1",
            "name": [{"family": "Sun", "given": ["Yu"]}],
            "address": [{"line": ["3 River St"], "city": "Hangzhou"}],
            "meta": {"security": [{"code": "V"}]},
        },
        {
            "resourceType": "Encounter",
            "id": "e5",
            "status": "cancelled",
            "subject": {"reference": "Patient/pt1"},
            "period": {"start": "2026-03-01T09:00:00Z"},
        },
        {
            "resourceType": "Encounter",
            "id": "e6",
            "status": "planned",
            "subject": {"reference": "Patient/pt1"},
        },
        {"resourceType": "Observation", "id": "o1"},
    ]
    path = tmp_path / "ctx.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n\nnot json\n")
    c = build(
        {
            "type": "fhir-context",
            "paths": [str(path)],
            "extensions": {"urn:x:clearance": "clearance"},
            "resources": ["PractitionerRole", "Practitioner", "Encounter", "Patient"],
        }
    )
    records = collect(c)
    assert [r.position.rsplit(" ", 1)[1] for r in records] == ["1", "2", "3", "4", "5", "6", "9"]
    outs, errs = normalize_all(c, records)
    rows = [(o.kind, dict(o.row)) for o in outs if isinstance(o, ContextUpdate)]
    ma = [r for k, r in rows if k == "staff" and r["user_id"] == "p9"]
    assert ma[0]["valid_until"] == "2026-02-01" and ma[1]["role"] == "pharmacist"
    assert ma[1]["clearance"] == "3"
    assert (
        "staff",
        {
            "user_id": "c",
            "family_name": "Qi",
            "given_name": "",
            "role": "",
            "department_id": "",
            "valid_from": "",
            "valid_until": "",
            "address": "",
        },
    ) in rows
    assert (
        "patients",
        {
            "patient_id": "pt1",
            "family_name": "Sun",
            "given_name": "Yu",
            "address": "3 River St, Hangzhou",
            "sensitivity": "4",
        },
    ) in rows
    # cancelled: the row is deleted (a tombstone); planned without a start: nothing
    encounters = [o for o in outs if isinstance(o, ContextUpdate) and o.kind == "encounters"]
    assert [(dict(o.row), o.delete) for o in encounters] == [({"encounter_id": "e5"}, True)]
    assert [reason[:12] for _, reason in errs] == ["invalid JSON"]
    # resume in the middle of the file
    tail = collect(
        build(
            {
                "type": "fhir-context",
                "paths": [str(path)],
                "resources": ["PractitionerRole", "Practitioner", "Encounter", "Patient"],
            }
        ),
        records[3].checkpoint,
    )
    assert [r.position for r in tail] == [r.position for r in records[4:]]


# ---------------------------------------------------------------------------- fuzzing
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = [
    "id",
    "meta",
    "action",
    "recorded",
    "outcome",
    "agent",
    "entity",
    "subtype",
    "type",
    "source",
    "purposeOfUse",
    "category",
    "code",
    "occurredDateTime",
    "subject",
    "period",
    "actualPeriod",
    "participant",
    "practitioner",
    "code",
    "name",
    "identifier",
    "active",
    "serviceProvider",
    "location",
    "organization",
    "address",
    "contained",
    "extension",
]


@st.composite
def _resources(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["audit", "ctx", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return orjson.dumps(draw(_json))
    if kind == "audit":
        base = to_audit_event(_event(draw(st.integers(0, 100))))
    else:
        base = {
            "resourceType": draw(
                st.sampled_from(
                    ["Practitioner", "PractitionerRole", "Encounter", "Patient", "OperationOutcome"]
                )
            )
        }
    for key in draw(st.lists(st.sampled_from(_FIELDS), max_size=4)):
        base[key] = draw(_json)
    if draw(st.booleans()):
        base.pop(draw(st.sampled_from(sorted(base))), None)
    return orjson.dumps(base, option=orjson.OPT_NON_STR_KEYS)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=_resources(), meta=_json)
def test_fuzz_normalize_gives_outputs_or_event_error(payload: bytes, meta: Any) -> None:
    connectors = [
        FhirRestConnector.from_dict({"base_url": "http://127.0.0.1:9/fhir"}),
        FhirBulkExportConnector.from_dict({"base_url": "http://127.0.0.1:9/fhir"}),
        FhirContextConnector.from_dict(
            {"base_url": "http://127.0.0.1:9/fhir", "extensions": {"": "vip"}}
        ),
    ]
    metas = [{}, {"practitioner": meta, "roles": meta}]
    if isinstance(meta, dict):
        metas.append({"practitioner": meta, "roles": [meta, meta]})
    for c in connectors:
        for m in metas:
            raw = RawRecord(payload=payload, position="fuzz", meta=m)
            try:
                outs = c.normalize(raw)
            except EventError as exc:
                assert str(exc)
                continue
            for o in outs:
                if isinstance(o, AccessEvent):
                    assert o.event_id and o.user_id
                else:
                    assert isinstance(o, ContextUpdate)
                    assert all(isinstance(v, str) for v in o.row.values()), o.row


# ---------------------------------------------------------------------------- volume
def test_rest_reads_a_few_thousand_records_end_to_end(fhir: FakeFhir) -> None:
    n = 3000
    for i in range(n):
        fhir.add(to_audit_event(_event(i)), f"2026-03-01T08:{i // 60 % 60:02d}:{i % 60:02d}.000Z")
    c = rest(fhir, page_size=500)
    t0 = time.perf_counter()
    records = drain(c)
    dt = time.perf_counter() - t0
    outs, errs = normalize_all(c, records)
    assert (len(records), len(outs), errs) == (n, n, [])
    print(f"\nfhir-rest poll: {n / dt:,.0f} records/s over {n} records")


def test_module_json_is_stdlib_compatible() -> None:
    """Checkpoints survive the stdlib json too (the store may be read by other tools)."""
    cp = {"since": T1, "seen": ["AuditEvent/a _history/1"]}
    assert json.loads(json.dumps(cp)) == cp
