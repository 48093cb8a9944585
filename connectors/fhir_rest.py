"""FHIR servers as sources: REST search, Bulk Data ``$export``, and reference data.

Three connectors share one small HTTP client (``urllib.request``: no runtime dependency):

``fhir-rest`` (:class:`FhirRestConnector`)
    Polls ``GET {base_url}/AuditEvent?_lastUpdated=gt{since}&_sort=_lastUpdated&_count=N``,
    follows ``Bundle.link[relation=next]`` and yields one record per entry (the resource's
    JSON). Its position is ``AuditEvent/<id> _history/<versionId or lastUpdated>``. The
    checkpoint is a high-water mark: ``{"since": <meta.lastUpdated of the last record>,
    "seen": [positions already read at exactly that instant]}``. A resumed poll asks for
    ``ge{since}`` and drops what ``seen`` lists (and anything older than ``since``), so
    records that share one timestamp are neither lost nor repeated. A poll reads only
    records at least ``settle_s`` old by the server's clock (``_lastUpdated=lt{now -
    settle_s}``, with ``now`` from the server's ``Date`` header): a server stamps a record
    when its transaction starts, so one committing late may carry an older timestamp than
    records already visible, and a poller that read those would move its mark past it.
    Known limit: a transaction that commits more than ``settle_s`` after its timestamp.

``fhir-bulk-export`` (:class:`FhirBulkExportConnector`)
    Bulk Data ``$export``: kick-off (``Prefer: respond-async``), status polling (202 with
    ``X-Progress``/``Retry-After`` until 200), the manifest's ``AuditEvent`` NDJSON files,
    one record per line (position ``<file url without its query> line N``). The checkpoint
    holds the next export's ``_since`` (the manifest's ``transactionTime``) and, while an
    export is being read, its status URL, the index of the file being read (earlier files
    are finished) and the line within it, so a restart re-reads the manifest from the
    status URL and resumes mid-file. If that status URL has expired (404/410) a new export
    from the previous ``_since`` is started: delivery is then at-least-once.

``fhir-context`` (:class:`FhirContextConnector`, produces ``context``)
    Practitioner, PractitionerRole, Encounter (and optionally Patient) from REST searches
    (``_lastUpdated`` incremental, paged as above) or from NDJSON files (``paths``).

    *Staff rows need two resources.* A context row replaces the whole row downstream, so a
    row built from one resource only would blank the other's fields (a PractitionerRole
    alone has no names: the same-surname checks would silently stop working). So every
    staff row is built from a PractitionerRole *and* its Practitioner:

    * PractitionerRole searches use ``_include=PractitionerRole:practitioner``; the
      included (or ``contained``) Practitioner travels in ``RawRecord.meta["practitioner"]``.
      A role whose practitioner is not there is an :class:`EventError`, not a partial row.
    * Practitioner searches use ``_revinclude=PractitionerRole:practitioner``; the roles
      travel in ``meta["roles"]``. A practitioner with several roles gets the row of its
      most recently updated role (staff.csv has one role and department per user; the
      role search agrees, since the role updated last is also read last). Without any
      role, the row has names but an empty role (treated conservatively downstream).
    * NDJSON files are indexed first (Practitioners and PractitionerRoles by id), then the
      same two record shapes are built.

    Columns FHIR does not carry (clearance, shifts, supervisor, vip, ...) can be filled
    from extensions (``extensions``: extension URL → column); otherwise they are empty.

    Mapping: staff ``user_id`` = the practitioner's identifier (with ``user_id_system``
    if set, else the first) or its id; role = ``PractitionerRole.code`` through
    ``role_map`` (unmapped: the code itself); department = the ``organization`` or
    ``location`` reference id (``department_from``); ``valid_from``/``valid_until`` =
    ``period`` dates; an inactive role or practitioner ends at its period end or, without
    one, at its ``meta.lastUpdated`` date. Encounter → encounters row with ``period`` (R4)
    or ``actualPeriod`` (R5), ``serviceProvider`` or location as department, and the
    ATND participant (else the first practitioner) as attending; a cancelled or
    entered-in-error encounter deletes its row (a tombstone: it explains no access from
    then on); a planned one without a start gives no row. Patient → patients row (names,
    address; sensitivity from ``meta.security`` confidentiality V → 4, R → 3).

>>> encounter_row({"resourceType": "Encounter", "id": "e1", "status": "in-progress",
...     "subject": {"reference": "Patient/p1"}, "serviceProvider": {"reference": "Organization/ICU"},
...     "period": {"start": "2026-03-01T08:00:00+08:00"},
...     "participant": [{"type": [{"coding": [{"code": "ATND"}]}],
...                      "individual": {"reference": "Practitioner/dr7"}}]})
{'encounter_id': 'e1', 'patient_id': 'p1', 'department_id': 'ICU', 'start': '2026-03-01T08:00:00+08:00', 'end': '', 'attending_user_id': 'dr7'}
"""

from __future__ import annotations

import copy
import email.utils
import functools
import gzip
import hashlib
import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Any, Literal

import orjson

from connectors.base import Connector, ConnectorConfigError, ContextUpdate, Output, RawRecord
from connectors.fhir import parse_fhir_line
from emrwatch.context import KNOWN_ROLES
from emrwatch.events import EventError, parse_ts

__all__ = [
    "FhirBulkExportConnector",
    "FhirContextConnector",
    "FhirError",
    "FhirHttpError",
    "FhirRestConnector",
    "encounter_row",
    "patient_row",
    "staff_row",
]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
#: statuses worth another try: throttling and the server or a gateway being unwell
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

#: a step of ``records()``: ``yield None`` while waiting, return the value at the end
Wait = Generator[None, None, Any]


class FhirError(RuntimeError):
    """The FHIR server cannot be used (refused TLS, unreachable, not FHIR); the message says why."""


class FhirHttpError(FhirError):
    """The server answered with an error status; ``status`` and the OperationOutcome text."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Stopped(Exception):
    """``stop`` was set while waiting: the generator ends quietly."""


# ---------------------------------------------------------------------------- configuration
def _f(default: Any, help_: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(
            default_factory=functools.partial(copy.copy, default), metadata={"help": help_}
        )
    return field(default=default, metadata={"help": help_})


@dataclass
class HttpConfig:
    """What every FHIR connector needs to talk to its server."""

    headers: dict[str, str] = _f({}, "extra request headers (e.g. an API key header)")
    token_file: str = _f("", "file holding a bearer token (re-read for every request)")
    token_env: str = _f("", "environment variable holding a bearer token")
    ca_file: str = _f("", "PEM bundle of CAs to trust for the server (default: system CAs)")
    cert_file: str = _f("", "client certificate (PEM) for mutual TLS")
    key_file: str = _f("", "private key of cert_file (PEM; default: inside cert_file)")
    verify: bool = _f(True, "verify the server's TLS certificate and host name")
    trust_env: bool = _f(True, "honour http(s)_proxy / no_proxy from the environment")
    timeout_s: float = _f(30.0, "socket timeout per request, seconds")
    max_retries: int = _f(5, "tries after a 429/5xx or connection failure before giving up")
    backoff_s: float = _f(1.0, "first retry delay (doubles each try) when there is no Retry-After")
    max_backoff_s: float = _f(120.0, "cap on any retry delay, Retry-After included")

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("timeout_s: must be > 0")
        if self.max_retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("max_retries, backoff_s and max_backoff_s must be >= 0")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file: needs cert_file")
        for name in ("token_file", "ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a file")


def _check_base_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url: {url!r} is not an http(s) URL")


#: how old (by the server's clock) a record must be before a ``_lastUpdated`` poll reads it
SETTLE_S = 5.0
SETTLE_HELP = (
    "read only records whose meta.lastUpdated is at least this many seconds old by the "
    "server's clock (its Date header), so that a transaction committing late, with an "
    "earlier timestamp than records already read, is still read; 0: no wait"
)


@dataclass
class FhirRestConfig(HttpConfig):
    base_url: str = _f("", "FHIR base URL, e.g. https://emr.example/fhir (required)")
    since: str = _f("", "first run: only records with meta.lastUpdated after this instant")
    page_size: int = _f(500, "_count: entries per page")
    poll_interval_s: float = _f(10.0, "seconds between polls once caught up")
    params: dict[str, str] = _f({}, "extra search parameters, e.g. {'type': '110110'}")
    once: bool = _f(False, "stop after catching up instead of polling again")
    settle_s: float = _f(SETTLE_S, SETTLE_HELP)

    def validate(self) -> None:
        _check_base_url(self.base_url)
        if self.page_size < 1:
            raise ValueError("page_size: must be >= 1")
        if self.poll_interval_s < 0:
            raise ValueError("poll_interval_s: must be >= 0")
        if self.settle_s < 0:
            raise ValueError("settle_s: must be >= 0")
        if self.since:
            _check_instant(self.since, "since")
        super().validate()


@dataclass
class FhirBulkExportConfig(HttpConfig):
    base_url: str = _f("", "FHIR base URL (required)")
    export_path: str = _f("$export", "kick-off path: $export, Group/<id>/$export, ...")
    since: str = _f("", "first export's _since (empty: everything)")
    type_filter: str = _f("", "_typeFilter, e.g. AuditEvent?date=ge2026-01-01")
    poll_interval_s: float = _f(3600.0, "seconds between exports once caught up")
    status_poll_s: float = _f(2.0, "status poll delay when the server sends no Retry-After")
    export_timeout_s: float = _f(6 * 3600.0, "give up on an export still running after this")
    delete_when_done: bool = _f(True, "DELETE the status URL once every file is read")
    once: bool = _f(False, "stop after one complete export")

    def validate(self) -> None:
        _check_base_url(self.base_url)
        if self.since:
            _check_instant(self.since, "since")
        if self.status_poll_s <= 0 or self.export_timeout_s <= 0 or self.poll_interval_s < 0:
            raise ValueError("status_poll_s and export_timeout_s must be > 0")
        super().validate()


CONTEXT_RESOURCES = ("PractitionerRole", "Practitioner", "Encounter", "Patient")


@dataclass
class FhirContextConfig(HttpConfig):
    base_url: str = _f("", "FHIR base URL for REST searches (this or paths)")
    paths: list[str] = _f([], "NDJSON files of FHIR resources, read once (this or base_url)")
    resources: list[str] = _f(
        ["PractitionerRole", "Practitioner", "Encounter"],
        "resource types to read, in order: PractitionerRole, Practitioner, Encounter, Patient",
    )
    since: str = _f("", "first run: only resources with meta.lastUpdated after this instant")
    page_size: int = _f(500, "_count: entries per page")
    poll_interval_s: float = _f(300.0, "seconds between polls once caught up")
    once: bool = _f(False, "stop after catching up instead of polling again")
    settle_s: float = _f(SETTLE_S, SETTLE_HELP)
    user_id_system: str = _f("", "Practitioner.identifier system holding the user id")
    role_map: dict[str, str] = _f(
        {}, "PractitionerRole.code ('code' or 'system|code') → role; added to the defaults"
    )
    department_from: Literal["organization", "location"] = _f(
        "organization", "which PractitionerRole reference names the department (else the other)"
    )
    encounter_department_from: Literal["serviceProvider", "location"] = _f(
        "serviceProvider", "which Encounter reference names the department (else the other)"
    )
    extensions: dict[str, str] = _f({}, "extension URL → context column (e.g. shift_start)")

    def validate(self) -> None:
        if bool(self.base_url) == bool(self.paths):
            raise ValueError("set exactly one of base_url and paths")
        if self.base_url:
            _check_base_url(self.base_url)
        for p in self.paths:
            if not Path(p).is_file():
                raise ValueError(f"paths: {p} is not a file")
        bad = [r for r in self.resources if r not in CONTEXT_RESOURCES]
        if bad or not self.resources:
            raise ValueError(f"resources: {bad or '[]'} not in {list(CONTEXT_RESOURCES)}")
        if self.page_size < 1:
            raise ValueError("page_size: must be >= 1")
        if self.settle_s < 0:
            raise ValueError("settle_s: must be >= 0")
        if self.since:
            _check_instant(self.since, "since")
        super().validate()


# ---------------------------------------------------------------------------- HTTP
@dataclass
class _Response:
    status: int
    url: str
    headers: Any
    body: bytes = b""
    stream: HTTPResponse | None = None

    def json(self, what: str) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise FhirError(f"{what} {self.url}: the response is not JSON ({exc})") from None


class _Http:
    """GET/DELETE with auth, TLS, retries; the waits ``yield None`` (see Connector.records)."""

    def __init__(self, cfg: HttpConfig, base_url: str, who: str) -> None:
        self.cfg = cfg
        self.who = who
        self.base = base_url.rstrip("/")
        handlers: list[Any] = []
        if not cfg.trust_env:
            handlers.append(urllib.request.ProxyHandler({}))
        if self.base.startswith("https:") or cfg.ca_file or cfg.cert_file:
            handlers.append(urllib.request.HTTPSHandler(context=self._tls()))
        self.opener = urllib.request.build_opener(*handlers)
        #: the server's clock minus ours, from the last response's Date header (None: none yet)
        self.clock_offset: float | None = None

    def server_now(self) -> float:
        """The server's time now (POSIX seconds), as far as its Date headers tell; this
        machine's clock until a response had one. A Date header is truncated to the second,
        so the estimate is up to a second early, which only makes a settle wait longer."""
        return time.time() + (self.clock_offset or 0.0)

    def _clock(self, headers: Any) -> None:
        value = headers.get("Date") if headers is not None else None
        if not value:
            return
        try:
            date = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return
        if date.tzinfo is not None:
            self.clock_offset = date.timestamp() - time.time()

    def _tls(self) -> ssl.SSLContext:
        cfg = self.cfg
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
        if not cfg.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            try:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
            except (ssl.SSLError, OSError) as exc:
                raise FhirError(f"{self.who}: cannot load client certificate: {exc}") from None
        return ctx

    def _token(self) -> str:
        if self.cfg.token_file:
            return Path(self.cfg.token_file).read_text().strip()
        if self.cfg.token_env:
            token = os.environ.get(self.cfg.token_env, "").strip()
            if not token:
                raise FhirError(f"{self.who}: environment variable {self.cfg.token_env} is empty")
            return token
        return ""

    def url(
        self, path: str, params: Mapping[str, str] | list[tuple[str, str]] | None = None
    ) -> str:
        q = urllib.parse.urlencode(params or {}, quote_via=urllib.parse.quote, safe="")
        return f"{self.base}/{path.lstrip('/')}" + (f"?{q}" if q else "")

    def request(
        self,
        url: str,
        stop: threading.Event,
        *,
        method: str = "GET",
        accept: str = FHIR_JSON,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
        stream: bool = False,
    ) -> Wait:
        """The response of a 2xx; retries 429/5xx (honouring Retry-After) and connection
        failures; anything else is a :class:`FhirHttpError` / :class:`FhirError`."""
        attempt = 0
        while True:
            req = urllib.request.Request(url, method=method)
            req.add_header("Accept", accept)
            req.add_header("Accept-Encoding", "gzip")
            for k, v in {**self.cfg.headers, **(headers or {})}.items():
                req.add_header(k, v)
            token = self._token() if auth else ""
            if token:  # unredirected: a redirect to another host must not carry it
                req.add_unredirected_header("Authorization", f"Bearer {token}")
            delay: float | None = None
            try:
                resp = self.opener.open(req, timeout=self.cfg.timeout_s)
                self._clock(resp.headers)
                if stream:
                    return _Response(resp.status, resp.geturl(), resp.headers, stream=resp)
                with resp:
                    body = _decoded(resp.read(), resp.headers)
                return _Response(resp.status, resp.geturl(), resp.headers, body=body)
            except urllib.error.HTTPError as exc:
                try:
                    body = _decoded(exc.read(), exc.headers)
                except (OSError, HTTPException, EOFError, zlib.error):
                    body = b""
                finally:
                    exc.close()
                message = f"{self.who}: {method} {_safe(url)} → HTTP {exc.code}: " + (
                    _outcome_text(body) or exc.reason or "error"
                )
                if exc.code not in RETRY_STATUSES or attempt >= self.cfg.max_retries:
                    if exc.code in (401, 403):
                        message += " (check token_file/token_env or the client certificate)"
                    raise FhirHttpError(message, exc.code) from None
                delay = _retry_after(exc.headers.get("Retry-After"))
                log.warning("%s; retrying", message)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise FhirError(
                    _tls_message(self.who, url, exc, bool(self.cfg.cert_file))
                ) from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (ssl.SSLError, ssl.CertificateError)):
                    raise FhirError(
                        _tls_message(self.who, url, exc.reason, bool(self.cfg.cert_file))
                    ) from None
                if attempt >= self.cfg.max_retries:
                    raise FhirError(
                        f"{self.who}: {method} {_safe(url)} failed: {exc.reason}"
                    ) from None
                log.warning("%s: %s %s failed (%s); retrying", self.who, method, _safe(url), exc)
            except (ConnectionError, TimeoutError, HTTPException, OSError) as exc:
                if attempt >= self.cfg.max_retries:
                    if url.startswith("https:") and isinstance(exc, ConnectionResetError):
                        # TLS 1.3 servers may reset instead of alerting on a missing cert
                        message = _tls_message(self.who, url, exc, bool(self.cfg.cert_file))
                    else:
                        message = f"{self.who}: {method} {_safe(url)} failed: {exc!r}"
                    raise FhirError(message) from None
                log.warning("%s: %s %s failed (%s); retrying", self.who, method, _safe(url), exc)
            if delay is None:
                delay = self.cfg.backoff_s * (2**attempt)
            attempt += 1
            yield from _wait(min(delay, self.cfg.max_backoff_s), stop)

    def same_origin(self, url: str) -> bool:
        a, b = urllib.parse.urlsplit(self.base), urllib.parse.urlsplit(url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _decoded(body: bytes, headers: Any) -> bytes:
    if (headers.get("Content-Encoding") or "").lower() == "gzip":
        return gzip.decompress(body)
    return body


def _wait(seconds: float, stop: threading.Event) -> Wait:
    """Sleep ``seconds`` in slices of at most half a second, yielding None between slices
    (a wait shorter than one slice yields nothing); :class:`_Stopped` when ``stop`` is set."""
    end = time.monotonic() + seconds
    while True:
        if stop.is_set():
            raise _Stopped
        remaining = end - time.monotonic()
        if remaining <= 0:
            return
        if stop.wait(min(remaining, 0.5)):
            raise _Stopped
        if end - time.monotonic() > 0:
            yield None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (a number or an HTTP date); None when absent or unreadable.

    >>> _retry_after("3"), _retry_after(None), _retry_after("soon")
    (3.0, None, None)
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _tls_message(who: str, url: str, exc: BaseException, has_cert: bool) -> str:
    text = getattr(exc, "reason", None) or str(exc)
    low = f"{exc} {text}".lower()
    if "certificate verify failed" in low:
        hint = " (the server's certificate is not trusted: set ca_file, or fix its host name)"
    elif not has_cert:
        hint = " (the server may require a client certificate: set cert_file and key_file)"
    else:
        hint = " (the server may not accept this client certificate or its CA)"
    host = urllib.parse.urlsplit(url).netloc
    return f"{who}: TLS connection to {host} refused: {text}{hint}"


def _safe(url: str) -> str:
    """A URL for messages, cut at 160 characters."""
    return url if len(url) <= 160 else url[:157] + "..."


def _outcome_text(body: bytes) -> str:
    """The issues of an OperationOutcome body, one line; '' when the body is not one."""
    try:
        obj = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", "replace").strip()
        return text
    if type(obj) is not dict or obj.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    issues = obj.get("issue")
    for issue in issues if type(issues) is list else []:
        if type(issue) is not dict:
            continue
        details: dict[str, Any] = issue["details"] if type(issue.get("details")) is dict else {}
        text = issue.get("diagnostics") or details.get("text") or ""
        parts.append(f"{issue.get('severity', 'error')} {issue.get('code', '')}: {text}".strip())
    return "OperationOutcome: " + "; ".join(parts) if parts else "OperationOutcome"


# ---------------------------------------------------------------------------- search paging
def _check_instant(value: str, where: str) -> None:
    if _instant(value) is None:
        raise ValueError(f"{where}: {value!r} is not an ISO 8601 instant")


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _instant(value: Any) -> datetime | None:
    """An instant for comparisons; a zone-less value is taken as UTC, nanoseconds dropped."""
    if type(value) is not str or not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        try:
            dt = datetime.fromisoformat(_FRACTION.sub(r"\1", value))
        except ValueError:
            return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


@dataclass
class _Mark:
    """The high-water mark of one search: last meta.lastUpdated and what was read at it."""

    since: str = ""
    seen: list[str] = field(default_factory=list)
    inclusive: bool = False  # ge (resumed from a record) or gt (the configured start)
    #: this poll reads records updated before this instant only (see ``settle_s``)
    until: datetime | None = None
    _parsed: tuple[str, datetime | None] = ("", None)  # since, parsed once

    @classmethod
    def load(cls, cp: Any, default_since: str) -> _Mark:
        if isinstance(cp, dict) and cp.get("since") is not None:
            return cls(str(cp["since"]), [str(s) for s in cp.get("seen") or []], True)
        return cls(default_since, [], False)

    def dump(self) -> dict[str, Any]:
        return {"since": self.since, "seen": self.seen}  # never mutated in place: shareable

    def settle(self, http: _Http, settle_s: float) -> None:
        """Start a poll: with ``settle_s``, records updated in the last ``settle_s`` seconds
        by the server's clock wait for a later poll. Transactions still open now may commit
        records stamped earlier than those; the mark must not pass them before they can."""
        if settle_s > 0:
            self.until = datetime.fromtimestamp(http.server_now() - settle_s, UTC)

    def admit(self, last_updated: Any, key: str) -> bool:
        """Whether a record is new and settled; if so, move the mark over it."""
        t = _instant(last_updated)
        if t is not None and self.until is not None and t >= self.until:
            return False  # not settled (a server that ignored the upper bound): next poll
        if self._parsed[0] != self.since:
            self._parsed = (self.since, _instant(self.since))
        m = self._parsed[1]
        if (
            m is not None
            and t is not None
            and (t < m or (t == m and (not self.inclusive or key in self.seen)))
        ):
            return False
        if t is not None and (m is None or t > m):
            self.since, self.seen = str(last_updated), [key]
        elif key not in self.seen:
            self.seen = [*self.seen, key]  # a new list: earlier checkpoints keep theirs
        self.inclusive = True
        return True


def _search_url(http: _Http, rtype: str, mark: _Mark, count: int, extra: Mapping[str, str]) -> str:
    params: list[tuple[str, str]] = []
    if mark.since:
        params.append(("_lastUpdated", ("ge" if mark.inclusive else "gt") + mark.since))
    if mark.until is not None:
        params.append(("_lastUpdated", "lt" + mark.until.isoformat(timespec="milliseconds")))
    params += [("_sort", "_lastUpdated"), ("_count", str(count)), *extra.items()]
    return http.url(rtype, params)


def _pages(
    conn: Connector, http: _Http, first_url: str, stop: threading.Event
) -> Generator[None | tuple[str, dict[str, Any]], None, None]:
    """The Bundles of one search, following ``next`` links; None while waiting."""
    url: str | None = first_url
    while url:
        resp = yield from http.request(url, stop)
        bundle = resp.json("search page")
        if type(bundle) is not dict or bundle.get("resourceType") != "Bundle":
            kind = bundle.get("resourceType") if type(bundle) is dict else type(bundle).__name__
            raise FhirError(f"{conn.name}: {_safe(url)} did not return a Bundle but {kind}")
        entries = bundle.get("entry") or []
        conn.ledger.receipt(
            conn.name,
            url,
            peer=http.base,
            records=len(entries) if type(entries) is list else 0,
            size=len(resp.body),
        )
        yield url, bundle
        url = None
        for link in bundle.get("link") or []:
            if type(link) is dict and link.get("relation") == "next" and link.get("url"):
                url = urllib.parse.urljoin(resp.url, str(link["url"]))
                if not http.same_origin(url):
                    raise FhirError(
                        f"{conn.name}: next link {_safe(url)} leaves {http.base}; refusing to "
                        "send credentials there"
                    )


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry")
    return [e for e in entries if type(e) is dict] if type(entries) is list else []


def _position(resource: Any, fallback: bytes) -> str:
    """``Type/id _history/<versionId or lastUpdated>``; a digest for a resource without id."""
    if type(resource) is dict and resource.get("id") and resource.get("resourceType"):
        meta: dict[str, Any] = resource["meta"] if type(resource.get("meta")) is dict else {}
        version = meta.get("versionId") or meta.get("lastUpdated") or "-"
        return f"{resource['resourceType']}/{resource['id']} _history/{version}"
    return "entry sha256:" + hashlib.sha256(fallback).hexdigest()[:24]


def _last_updated(resource: Any) -> Any:
    if type(resource) is dict and type(resource.get("meta")) is dict:
        return resource["meta"].get("lastUpdated")
    return None


# ---------------------------------------------------------------------------- fhir-rest
class _FhirConnector(Connector):
    """What the FHIR connectors share: an HTTP client for ``base_url`` (None without one),
    and a stop inside a retry wait ends :meth:`records` quietly."""

    def __init__(self, config: Any, name: str = "", ledger: Any = None) -> None:
        super().__init__(config, name=name, ledger=ledger)
        base_url = getattr(config, "base_url", "")
        self._http = _Http(config, base_url, self.name) if base_url else None

    @property
    def http(self) -> _Http:
        """The client for ``base_url`` (a connector reading files has none)."""
        if self._http is None:
            raise ConnectorConfigError(f"{self.name}: no base_url is configured")
        return self._http

    def records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        try:
            yield from self._records(checkpoint, stop)
        except _Stopped:
            return

    def _records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        raise NotImplementedError


class FhirRestConnector(_FhirConnector):
    """AuditEvents from a FHIR server's REST search, polled by ``_lastUpdated``."""

    type = "fhir-rest"
    summary = "FHIR AuditEvent REST search, polled incrementally by _lastUpdated"
    Config = FhirRestConfig
    produces = frozenset({"access"})
    resource_type = "AuditEvent"

    def _records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        cfg = self.config
        mark = _Mark.load(checkpoint, cfg.since)
        while not stop.is_set():
            mark.settle(self.http, cfg.settle_s)
            url = _search_url(self.http, self.resource_type, mark, cfg.page_size, cfg.params)
            for page in _pages(self, self.http, url, stop):
                if page is None:
                    yield None
                    continue
                for entry in _entries(page[1]):
                    resource = entry.get("resource")
                    payload = orjson.dumps(resource)
                    key = _position(resource, payload)
                    if not mark.admit(_last_updated(resource), key):
                        continue
                    yield RawRecord(
                        payload=payload,
                        position=key,
                        checkpoint=mark.dump(),
                        peer=self.http.base,
                    )
                    if stop.is_set():
                        return
            if cfg.once:
                return
            yield None
            yield from _wait(cfg.poll_interval_s, stop)

    def normalize(self, raw: RawRecord) -> list[Output]:
        return [_audit_event(raw.payload)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.http.base}


def _audit_event(payload: bytes) -> Output:
    try:
        return parse_fhir_line(payload)
    except EventError:
        if b"OperationOutcome" in payload:
            text = _outcome_text(payload)
            if text:
                raise EventError(f"the server sent an {text}") from None
        raise


# ---------------------------------------------------------------------------- fhir-bulk-export
class FhirBulkExportConnector(_FhirConnector):
    """AuditEvents through FHIR Bulk Data ``$export`` (kick-off, status, NDJSON files)."""

    type = "fhir-bulk-export"
    summary = "FHIR Bulk Data $export of AuditEvents (NDJSON), resumable mid-file"
    Config = FhirBulkExportConfig
    produces = frozenset({"access"})

    def _records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        cfg = self.config
        cp = checkpoint if isinstance(checkpoint, dict) else {}
        since: str = cp.get("since", cfg.since)
        current: dict[str, Any] | None = cp.get("export")
        while not stop.is_set():
            manifest = None
            if current:
                try:
                    manifest = yield from self._await(current["status_url"], stop)
                except FhirHttpError as exc:
                    if exc.status not in (404, 410):
                        raise
                    log.warning(
                        "%s: the export being read has expired (%s); starting a new one from "
                        "_since=%s, so some records may be delivered twice",
                        self.name,
                        exc,
                        since,
                    )
                    current = None
            if manifest is None:
                status_url = yield from self._kick_off(since, stop)
                manifest = yield from self._await(status_url, stop)
                current = {"status_url": status_url, "file_index": 0, "file": "", "line": 0}
            assert current is not None  # a manifest comes from current's export or a new one
            yield from self._read_export(since, current, manifest, stop)
            since = str(manifest.get("transactionTime") or since)
            if cfg.delete_when_done:
                # The runner commits on an idle None before asking for more, so once we are
                # resumed the last record's checkpoint ("export finished") is durable and
                # nothing can need this export's status URL again.
                yield None
                try:
                    yield from self.http.request(current["status_url"], stop, method="DELETE")
                except FhirError as exc:
                    log.info("%s: could not delete the finished export: %s", self.name, exc)
            current = None
            if cfg.once:
                return
            yield None
            yield from _wait(cfg.poll_interval_s, stop)

    def _kick_off(self, since: str, stop: threading.Event) -> Wait:
        params = {"_type": "AuditEvent"}
        if since:
            params["_since"] = since
        if self.config.type_filter:
            params["_typeFilter"] = self.config.type_filter
        url = self.http.url(self.config.export_path, params)
        resp = yield from self.http.request(url, stop, headers={"Prefer": "respond-async"})
        location = resp.headers.get("Content-Location")
        if resp.status != 202 or not location:
            raise FhirError(
                f"{self.name}: $export kick-off {_safe(url)} answered HTTP {resp.status} "
                f"{'without' if not location else 'with'} Content-Location; expected 202 "
                "Accepted and a status URL (does the server support Bulk Data export?)"
            )
        self.ledger.receipt(self.name, url, peer=self.http.base, status="accepted")
        return urllib.parse.urljoin(resp.url, location)

    def _await(self, status_url: str, stop: threading.Event) -> Wait:
        """Poll the status URL until the manifest is ready (200)."""
        deadline = time.monotonic() + self.config.export_timeout_s
        while True:
            resp = yield from self.http.request(status_url, stop, accept="application/json")
            if resp.status == 200:
                manifest = resp.json("export manifest")
                if type(manifest) is not dict or type(manifest.get("output")) is not list:
                    raise FhirError(f"{self.name}: {_safe(status_url)}: not an export manifest")
                return manifest
            if time.monotonic() > deadline:
                raise FhirError(
                    f"{self.name}: export {_safe(status_url)} still running after "
                    f"{self.config.export_timeout_s:.0f} s (X-Progress: "
                    f"{resp.headers.get('X-Progress', '-')})"
                )
            log.debug("%s: export in progress: %s", self.name, resp.headers.get("X-Progress"))
            delay = _retry_after(resp.headers.get("Retry-After"))
            delay = self.config.status_poll_s if delay is None else delay
            yield from _wait(min(max(delay, 0.05), self.config.max_backoff_s), stop)

    def _read_export(
        self, since: str, current: dict[str, Any], manifest: dict[str, Any], stop: threading.Event
    ) -> Iterator[RawRecord | None]:
        outputs = [
            str(o["url"])
            for o in manifest["output"]
            if type(o) is dict and o.get("url") and o.get("type", "AuditEvent") == "AuditEvent"
        ]
        for err in manifest.get("error") or []:
            if type(err) is dict and err.get("url"):
                self.ledger.receipt(
                    self.name,
                    str(err["url"]),
                    peer=self.http.base,
                    status="rejected",
                    reason="the export reported errors (OperationOutcome NDJSON)",
                )
        tt = str(manifest.get("transactionTime") or since)
        auth = manifest.get("requiresAccessToken", True) is not False
        start, skip = int(current.get("file_index", 0)), int(current.get("line", 0))
        if current.get("file") and current["file"] in outputs:
            start = outputs.index(current["file"])  # the index may move; the URL may not
        names = [u.split("?", 1)[0] for u in outputs]
        if len(set(names)) != len(names):
            names = list(outputs)
        base = {"status_url": current["status_url"], "transaction_time": tt}
        for index in range(start, len(outputs)):
            url, name = outputs[index], names[index]
            last_file = index == len(outputs) - 1
            pending: tuple[int, bytes] | None = None
            n = size = 0
            for item in self._lines(url, skip if index == start else 0, auth, stop):
                if item is None:
                    yield None
                    continue
                if pending is not None:
                    yield self._record(since, base, index, url, name, pending, None)
                    if stop.is_set():
                        return
                pending = item
                n += 1
                size += len(item[1])
            if pending is not None:
                done = tt if last_file else None  # the export's very last line: it is finished
                yield self._record(since, base, index, url, name, pending, done)
            self.ledger.receipt(self.name, url, peer=self.http.base, records=n, size=size)
            if stop.is_set():
                return

    def _record(
        self,
        since: str,
        base: dict[str, Any],
        index: int,
        url: str,
        name: str,
        item: tuple[int, bytes],
        done: str | None,
    ) -> RawRecord:
        lineno, line = item
        if done is not None:
            cp: dict[str, Any] = {"since": done, "export": None}
        else:
            cp = {
                "since": since,
                "export": {**base, "file_index": index, "file": url, "line": lineno},
            }
        return RawRecord(
            payload=line, position=f"{name} line {lineno}", checkpoint=cp, peer=self.http.base
        )

    def _lines(
        self, url: str, skip: int, auth: bool, stop: threading.Event
    ) -> Generator[None | tuple[int, bytes], None, None]:
        """(1-based line number, line) of the non-blank lines after line ``skip``; a broken
        download is fetched again and continues after the last line given."""
        attempt = 0
        while True:
            resp = yield from self.http.request(
                url, stop, accept="application/fhir+ndjson", auth=auth, stream=True
            )
            stream = resp.stream
            assert stream is not None
            try:
                fh: Any = stream
                if (resp.headers.get("Content-Encoding") or "").lower() == "gzip":
                    fh = gzip.GzipFile(fileobj=stream)
                lineno = 0
                for line in fh:
                    lineno += 1
                    if lineno <= skip:
                        continue
                    line = line.rstrip(b"\r\n")
                    skip = lineno
                    if line.strip():
                        yield lineno, line
                return
            except (OSError, HTTPException, EOFError, zlib.error) as exc:
                if attempt >= self.config.max_retries:
                    raise FhirError(
                        f"{self.name}: download of {_safe(url)} broke off after line {skip}: {exc}"
                    ) from None
                log.warning("%s: download of %s broke off (%s); resuming", self.name, url, exc)
                attempt += 1
                yield from _wait(min(self.config.backoff_s * 2**attempt, 30.0), stop)
            finally:
                stream.close()

    def normalize(self, raw: RawRecord) -> list[Output]:
        return [_audit_event(raw.payload)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.http.base}


# ---------------------------------------------------------------------------- fhir-context
#: PractitionerRole codes → CONTRACTS roles (HL7 practitioner-role and common SNOMED CT codes)
DEFAULT_ROLE_MAP: dict[str, str] = {
    "doctor": "physician",
    "nurse": "nurse",
    "pharmacist": "pharmacist",
    "researcher": "researcher",
    "teacher": "physician",
    "ict": "technician",
    "309343006": "physician",  # Physician
    "158965000": "physician",  # Medical practitioner
    "224535009": "nurse",  # Registered nurse
    "106292003": "nurse",  # Professional nurse
    "46255001": "pharmacist",  # Pharmacist
    "159033005": "technician",  # Dietitian (general) - allied health
    "309390008": "trainee",  # Hospital resident
    "224540004": "trainee",  # Student nurse
    "159561009": "technician",  # Radiographer
    "159282002": "technician",  # Laboratory technician
    "4162009": "clerk",  # Medical secretary
    "224608005": "clerk",  # Administrative health care staff
}
_CONFIDENTIALITY = {"V": "4", "R": "3"}


def _d(value: Any) -> dict[str, Any]:
    return value if type(value) is dict else {}


def _l(value: Any) -> list[Any]:
    if type(value) is list:
        return value
    return [] if value is None else [value]


def _str(value: Any) -> str:
    if type(value) is str:
        return value.strip()
    if type(value) is int and type(value) is not bool:
        return str(value)
    return ""


def _ref_id(ref: Any) -> str:
    """The id of a Reference (``Type/id``, absolute, versioned) or its identifier value."""
    ref = _d(ref)
    text = _str(ref.get("reference"))
    if text and not text.startswith("#"):
        text = text.split("/_history/", 1)[0]
        return text.rstrip("/").rpartition("/")[2]
    return _str(_d(ref.get("identifier")).get("value"))


def _user_ref(ref: Any) -> str:
    """A user id from a Reference, as the AuditEvent mapping does: identifier first."""
    ref = _d(ref)
    return _str(_d(ref.get("identifier")).get("value")) or _ref_id(ref)


def _ref_type(ref: Any) -> str:
    text = _str(_d(ref).get("reference")).split("/_history/", 1)[0]
    parts = text.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else _str(_d(ref).get("type"))


def _name(resource: dict[str, Any]) -> tuple[str, str]:
    names = [n for n in _l(resource.get("name")) if type(n) is dict]
    if not names:
        return "", ""
    for use in ("official", "usual"):
        chosen = next((n for n in names if n.get("use") == use), None)
        if chosen is not None:
            break
    else:
        chosen = names[0]
    family = _str(chosen.get("family"))
    given = " ".join(g for g in (_str(x) for x in _l(chosen.get("given"))) if g)
    if not family and not given:
        family = _str(chosen.get("text"))
    return family, given


def _address(resource: dict[str, Any]) -> str:
    for addr in _l(resource.get("address")):
        if type(addr) is not dict:
            continue
        text = _str(addr.get("text"))
        if not text:
            parts = [_str(x) for x in _l(addr.get("line"))]
            parts += [_str(addr.get(k)) for k in ("city", "district", "state", "postalCode")]
            text = ", ".join(p for p in parts if p)
        if text:
            return text
    return ""


def _date(value: Any) -> str:
    text = _str(value)
    return text[:10] if re.match(r"\d{4}-\d{2}-\d{2}", text) else ""


def _checked_ts(value: Any, where: str) -> str:
    text = _str(value)
    if text:
        try:
            parse_ts(text)
        except (EventError, OverflowError, ValueError, OSError) as exc:
            raise EventError(f"{where}: {exc}") from None
    return text


def _apply_extensions(
    row: dict[str, str], resources: list[dict[str, Any]], ext: Mapping[str, str]
) -> None:
    if not ext:
        return
    for res in resources:
        for e in _l(res.get("extension")):
            e = _d(e)
            column = ext.get(_str(e.get("url")))
            if not column:
                continue
            for k, v in e.items():
                if k.startswith("value") and v is not None:
                    if type(v) is bool:
                        row[column] = "1" if v else "0"
                    elif type(v) in (str, int, float):
                        row[column] = str(v)
                    break


def _role(role: dict[str, Any], role_map: Mapping[str, str]) -> str:
    first = ""
    for concept in _l(role.get("code")):
        concept = _d(concept)
        for coding in _l(concept.get("coding")):
            coding = _d(coding)
            code, system = _str(coding.get("code")), _str(coding.get("system"))
            if not code:
                continue
            for key in (f"{system}|{code}", code, code.lower()):
                if key in role_map:
                    return role_map[key]
            first = first or code
        text = _str(concept.get("text"))
        if text and text.lower() in role_map:
            return role_map[text.lower()]
        first = first or text
    return first.lower()


def staff_row(
    role: dict[str, Any] | None,
    practitioner: dict[str, Any],
    *,
    user_id_system: str = "",
    role_map: Mapping[str, str] | None = None,
    department_from: str = "organization",
    extensions: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A staff row from a PractitionerRole (or None) and its Practitioner.

    >>> staff_row({"resourceType": "PractitionerRole", "id": "r1",
    ...     "code": [{"coding": [{"code": "doctor"}]}],
    ...     "organization": {"reference": "Organization/CARD"},
    ...     "period": {"start": "2024-01-01", "end": "2026-12-31T00:00:00Z"}},
    ...     {"resourceType": "Practitioner", "id": "p1",
    ...      "identifier": [{"system": "urn:emr", "value": "u17"}],
    ...      "name": [{"family": "Li", "given": ["Wei"]}]})["role"]
    'physician'
    """
    rmap = {**DEFAULT_ROLE_MAP, **{r: r for r in sorted(KNOWN_ROLES)}, **(role_map or {})}
    user_id = ""
    idents = [i for i in _l(practitioner.get("identifier")) if type(i) is dict]
    if user_id_system:
        user_id = next(
            (_str(i.get("value")) for i in idents if i.get("system") == user_id_system), ""
        )
    else:
        user_id = next((_str(i.get("value")) for i in idents if _str(i.get("value"))), "")
    user_id = user_id or _str(practitioner.get("id"))
    if not user_id:
        raise EventError("Practitioner has neither an identifier value nor an id")
    family, given = _name(practitioner)
    row = {
        "user_id": user_id,
        "family_name": family,
        "given_name": given,
        "role": "",
        "department_id": "",
        "valid_from": "",
        "valid_until": "",
        "address": _address(practitioner),
    }
    resources = [practitioner]
    inactive = practitioner.get("active") is False
    if role is not None:
        resources.append(role)
        refs = (
            ("organization", "location")
            if department_from == "organization"
            else ("location", "organization")
        )
        dept = ""
        for key in refs:
            for ref in _l(role.get(key)):
                dept = dept or _ref_id(ref)
        period = _d(role.get("period"))
        row.update(
            role=_role(role, rmap),
            department_id=dept,
            valid_from=_date(period.get("start")),
            valid_until=_date(period.get("end")),
        )
        inactive = inactive or role.get("active") is False
    if inactive and not row["valid_until"]:
        ended = [_date(_last_updated(r)) for r in resources if r.get("active") is False]
        row["valid_until"] = next((d for d in ended if d), "")
        if not row["valid_until"]:
            raise EventError("inactive practitioner/role without a period end or meta.lastUpdated")
    _apply_extensions(row, resources, extensions or {})
    return row


#: Encounter statuses that mean it never took place: the connector deletes the row
_VOID_ENCOUNTER = frozenset({"cancelled", "entered-in-error"})


def encounter_row(
    enc: dict[str, Any], department_from: str = "serviceProvider"
) -> dict[str, str] | None:
    """An encounters row from an R4 or R5 Encounter; None for a planned one with no start."""
    enc_id = _str(enc.get("id"))
    if not enc_id:
        raise EventError("Encounter has no id")
    patient = _ref_id(enc.get("subject")) or _ref_id(enc.get("patient"))
    if not patient:
        raise EventError(f"Encounter/{enc_id} has no subject (Patient reference)")
    period = _d(enc.get("actualPeriod")) or _d(enc.get("period"))
    start = _checked_ts(period.get("start"), f"Encounter/{enc_id} period.start")
    end = _checked_ts(period.get("end"), f"Encounter/{enc_id} period.end")
    status = _str(enc.get("status"))
    if not start:
        if status == "planned" or status == "cancelled" or status == "entered-in-error":
            return None
        raise EventError(f"Encounter/{enc_id} has no period start")
    if status in ("cancelled", "entered-in-error"):
        end = start
    locations = [_ref_id(_d(loc).get("location")) for loc in _l(enc.get("location"))]
    provider = _ref_id(enc.get("serviceProvider"))
    location = next((x for x in locations if x), "")
    by_provider = department_from == "serviceProvider"
    dept = (provider or location) if by_provider else (location or provider)
    attending = first = ""
    for part in _l(enc.get("participant")):
        part = _d(part)
        who = part.get("individual") or part.get("actor")
        uid = _user_ref(who)
        if not uid or _ref_type(who) in ("Patient", "RelatedPerson", "Device", "Group"):
            continue
        codes = {
            _str(_d(c).get("code")) for t in _l(part.get("type")) for c in _l(_d(t).get("coding"))
        }
        if "ATND" in codes:
            attending = uid
            break
        first = first or uid
    return {
        "encounter_id": enc_id,
        "patient_id": patient,
        "department_id": dept,
        "start": start,
        "end": end,
        "attending_user_id": attending or first,
    }


def patient_row(patient: dict[str, Any]) -> dict[str, str]:
    """A patients row: id, names, address, sensitivity from the confidentiality label."""
    pid = _str(patient.get("id"))
    if not pid:
        raise EventError("Patient has no id")
    family, given = _name(patient)
    sensitivity = ""
    for label in _l(_d(patient.get("meta")).get("security")):
        level = _CONFIDENTIALITY.get(_str(_d(label).get("code")))
        if level and level > sensitivity:
            sensitivity = level
    return {
        "patient_id": pid,
        "family_name": family,
        "given_name": given,
        "address": _address(patient),
        "sensitivity": sensitivity,
    }


def _practitioner_key(role: dict[str, Any]) -> str:
    return "Practitioner/" + _ref_id(role.get("practitioner"))


class FhirContextConnector(_FhirConnector):
    """Staff, encounters and patients from FHIR resources (REST search or NDJSON files)."""

    type = "fhir-context"
    summary = "FHIR Practitioner/PractitionerRole/Encounter/Patient → staff/encounters/patients"
    Config = FhirContextConfig
    produces = frozenset({"context"})

    def _records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        if self._http is not None:
            yield from self._rest(checkpoint, stop)
        else:
            yield from self._files(checkpoint, stop)

    # ------------------------------------------------------------ REST
    def _rest(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        cfg, http = self.config, self.http
        saved = _d(_d(checkpoint).get("marks"))
        marks = {r: _Mark.load(saved.get(r), cfg.since) for r in cfg.resources}
        extra = {
            "PractitionerRole": {"_include": "PractitionerRole:practitioner"},
            "Practitioner": {"_revinclude": "PractitionerRole:practitioner"},
        }
        while not stop.is_set():
            for rtype in cfg.resources:
                mark = marks[rtype]
                mark.settle(http, cfg.settle_s)
                url = _search_url(http, rtype, mark, cfg.page_size, extra.get(rtype, {}))
                for page in _pages(self, http, url, stop):
                    if page is None:
                        yield None
                        continue
                    entries = _entries(page[1])
                    matches, included = [], {}
                    for entry in entries:
                        res = entry.get("resource")
                        mode = _d(entry.get("search")).get("mode")
                        if mode == "include" or (
                            mode is None and type(res) is dict and res.get("resourceType") != rtype
                        ):
                            if type(res) is dict:
                                included[f"{res.get('resourceType')}/{res.get('id')}"] = res
                        else:
                            matches.append(res)
                    roles_of = _roles_of(included)
                    for res in matches:
                        payload = orjson.dumps(res)
                        key = _position(res, payload)
                        if not mark.admit(_last_updated(res), key):
                            continue
                        cp = {"marks": {r: m.dump() for r, m in marks.items()}}
                        yield RawRecord(
                            payload=payload,
                            position=key,
                            checkpoint=cp,
                            peer=http.base,
                            meta=_related(rtype, res, included, roles_of),
                        )
                        if stop.is_set():
                            return
            if cfg.once:
                return
            yield None
            yield from _wait(cfg.poll_interval_s, stop)

    # ------------------------------------------------------------ files
    def _files(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        cp = _d(checkpoint)
        start_file, start_line = int(cp.get("file", 0)), int(cp.get("line", 0))
        index: dict[str, dict[str, Any]] = {}
        for path in self.config.paths:  # practitioners and roles, to join staff rows
            with open(path, "rb") as fh:
                for line in fh:
                    if b"Practitioner" not in line:
                        continue
                    try:
                        res = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if type(res) is dict and res.get("resourceType") in (
                        "Practitioner",
                        "PractitionerRole",
                    ):
                        index[f"{res['resourceType']}/{res.get('id')}"] = res
        roles_of = _roles_of(index)
        wanted = set(self.config.resources)
        for i, path in enumerate(self.config.paths):
            if i < start_file:
                continue
            n = size = 0
            with open(path, "rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    if i == start_file and lineno <= start_line:
                        continue
                    line = line.rstrip(b"\r\n")
                    if not line.strip():
                        continue
                    try:
                        res = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        res = None
                    rtype = _d(res).get("resourceType")
                    if rtype is not None and rtype not in wanted:
                        continue
                    n += 1
                    size += len(line)
                    yield RawRecord(
                        payload=line,
                        position=f"{path} line {lineno}",
                        checkpoint={"file": i, "line": lineno},
                        peer=path,
                        meta=_related(str(rtype), res, index, roles_of),
                    )
                    if stop.is_set():
                        return
            self.ledger.receipt(self.name, path, peer=path, records=n, size=size)

    # ------------------------------------------------------------ normalize
    def normalize(self, raw: RawRecord) -> list[Output]:
        try:
            res = orjson.loads(raw.payload)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"invalid JSON: {exc}") from None
        if type(res) is not dict:
            raise EventError("expected a FHIR resource (a JSON object)")
        rtype = res.get("resourceType")
        cfg = self.config
        try:
            if rtype == "PractitionerRole":
                prac = raw.meta.get("practitioner")
                if type(prac) is not dict:
                    ref = _str(_d(res.get("practitioner")).get("reference")) or "(none)"
                    raise EventError(
                        f"PractitionerRole/{_str(res.get('id'))}: practitioner {ref} was not "
                        "included; a staff row needs both (search with "
                        "_include=PractitionerRole:practitioner)"
                    )
                return [ContextUpdate("staff", self._staff(res, prac))]
            if rtype == "Practitioner":
                roles = [r for r in _l(raw.meta.get("roles")) if type(r) is dict]
                role = max(roles, key=_role_order) if roles else None
                return [ContextUpdate("staff", self._staff(role, res))]
            if rtype == "Encounter":
                if _str(res.get("status")) in _VOID_ENCOUNTER:
                    enc_id = _str(res.get("id"))
                    if not enc_id:
                        raise EventError("Encounter has no id")
                    return [ContextUpdate("encounters", {"encounter_id": enc_id}, delete=True)]
                row = encounter_row(res, cfg.encounter_department_from)
                if row is None:
                    return []
                _apply_extensions(row, [res], cfg.extensions)
                return [ContextUpdate("encounters", row)]
            if rtype == "Patient":
                row = patient_row(res)
                _apply_extensions(row, [res], cfg.extensions)
                return [ContextUpdate("patients", row)]
        except EventError:
            raise
        except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
            raise EventError(f"malformed {rtype} ({type(exc).__name__}: {exc})") from None
        if rtype == "OperationOutcome":
            raise EventError(f"the server sent an {_outcome_text(raw.payload)}")
        raise EventError(f"not a context resource: resourceType is {str(rtype)[:60]!r}")

    def _staff(self, role: dict[str, Any] | None, prac: dict[str, Any]) -> dict[str, str]:
        cfg = self.config
        return staff_row(
            role,
            prac,
            user_id_system=cfg.user_id_system,
            role_map=cfg.role_map,
            department_from=cfg.department_from,
            extensions=cfg.extensions,
        )

    def describe(self) -> dict[str, Any]:
        where = self.http.base if self.http is not None else list(self.config.paths)
        return {**super().describe(), "source": where}


def _role_order(role: dict[str, Any]) -> tuple[bool, str, str]:
    """Active roles first, then the most recently updated (the role search's last word)."""
    return (role.get("active") is not False, _str(_last_updated(role)), _str(role.get("id")))


def _roles_of(pool: Mapping[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """PractitionerRoles in ``pool`` by their ``Practitioner/<id>``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, res in pool.items():
        if key.startswith("PractitionerRole/"):
            out.setdefault(_practitioner_key(res), []).append(res)
    return out


def _related(
    rtype: str,
    res: Any,
    pool: Mapping[str, dict[str, Any]],
    roles_of: Mapping[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """What normalize needs beside the resource: a role's practitioner, a practitioner's roles."""
    if type(res) is not dict:
        return {}
    if rtype == "PractitionerRole":
        ref = _str(_d(res.get("practitioner")).get("reference"))
        if ref.startswith("#"):
            for c in _l(res.get("contained")):
                if type(c) is dict and c.get("id") == ref[1:]:
                    return {"practitioner": c}
            return {}
        prac = pool.get(_practitioner_key(res))
        return {"practitioner": prac} if prac is not None else {}
    if rtype == "Practitioner":
        return {"roles": list(roles_of.get(f"Practitioner/{res.get('id')}", ()))}
    return {}
