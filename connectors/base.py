"""The connector plug-in API: how a log source becomes canonical events on Kafka.

A connector has a tiny surface:

* :meth:`Connector.records` yields :class:`RawRecord` objects: the bytes as received, where
  they came from (``position``), and a ``checkpoint`` from which reading resumes right
  after that record. Pull sources (files, FHIR servers, SQL tables) resume from it; push
  sources (syslog, MLLP) leave it ``None`` and may instead pass an ``ack`` callback that the
  runner calls once the record's output is durable on the broker (the MLLP ACK).
* :meth:`Connector.normalize` is a pure function of one raw record: a list of
  :class:`~emrwatch.events.AccessEvent` and :class:`ContextUpdate` objects, or an
  :class:`~emrwatch.events.EventError` that says why the record is unusable (the runner
  sends it to the dead-letter topic with the reason and the position and carries on).
* ``Config`` is a dataclass whose fields are the connector's configuration keys; its field
  metadata (``help``) documents them. :func:`config_from_dict` validates a config mapping
  against it with clear messages, :func:`config_schema` renders it as JSON Schema.

Connectors are found through the ``emrwatch.connectors`` entry-point group
(:mod:`connectors.registry`); :mod:`connectors.runner` drives them; the conformance suite
in :mod:`connectors.testing` checks any connector in a few lines.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class DemoConfig:
...     path: str = field(metadata={"help": "the file"})
...     batch: int = field(default=10, metadata={"help": "lines per read"})
>>> config_from_dict(DemoConfig, {"path": "/x", "batch": "20"}, "connectors[0]")
DemoConfig(path='/x', batch=20)
>>> config_from_dict(DemoConfig, {"pth": "/x"}, "connectors[0]")
Traceback (most recent call last):
...
connectors.base.ConnectorConfigError: connectors[0]: unknown key(s) ['pth']; known: ['batch', 'path']
"""

from __future__ import annotations

import builtins
import dataclasses
import threading
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from emrwatch.events import AccessEvent, EventError

__all__ = [
    "Connector",
    "ConnectorConfigError",
    "ContextUpdate",
    "EventError",
    "Ledger",
    "NullLedger",
    "Output",
    "RawRecord",
    "config_from_dict",
    "config_schema",
]


class ConnectorConfigError(ValueError):
    """A connector's configuration is wrong; the message names the key and what is expected."""


@dataclass(slots=True)
class RawRecord:
    """One record as received, before normalisation. Treat it as read-only (it is not
    frozen only because a frozen dataclass costs a microsecond more per record)."""

    #: the bytes as received (kept verbatim in dead-letter records)
    payload: bytes
    #: where it came from, unique within the source for pull sources:
    #: ``"audit.ndjson line 12"``, ``"GET /AuditEvent?... entry 3"``, ``"syslog 10.0.0.5 #17"``
    position: str
    #: JSON-serialisable; resuming from it starts right after this record (None: push source)
    checkpoint: Any = None
    #: seconds since the epoch when the connector received it
    received_at: float = field(default_factory=time.time)
    #: the peer (network address, TLS subject) or file it came from
    peer: str = ""
    #: what normalize needs besides the payload (a CSV header, the FHIR version, ...)
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: called once the record's output (or dead letter) is acknowledged by the broker
    ack: Callable[[], None] | None = None
    #: called with the reason when the record is dead-lettered (e.g. an HL7 AE/AR ACK)
    reject: Callable[[str], None] | None = None


@dataclass(frozen=True, slots=True)
class ContextUpdate:
    """One row of reference data (CONTRACTS §2) for a compacted context topic.

    ``kind`` is departments, staff, patients, encounters, sealed or grants; ``row`` has that
    file's column names (missing columns mean "not set"). With ``delete`` the record whose
    key columns (``pipeline.topics.CONTEXT_KEY_COLUMNS``) ``row`` gives is gone: the runner
    writes a tombstone (a null value under its key) and the workers forget the record
    (an HL7 A11 cancelled admission, a FHIR Encounter entered in error)."""

    kind: str
    row: Mapping[str, str]
    delete: bool = False


Output = AccessEvent | ContextUpdate


class Ledger:
    """Where connectors record what they received (and what they refused), per source.

    Connectors call :meth:`receipt`; a ledger stores the row in :meth:`store`. This one
    keeps receipts in memory (tests, one-off runs); :class:`connectors.state.SqliteLedger`
    keeps them in a file."""

    def __init__(self) -> None:
        self.receipts: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def receipt(
        self,
        source: str,
        unit: str,
        *,
        peer: str = "",
        records: int = 0,
        size: int = 0,
        status: str = "accepted",
        reason: str = "",
        digest: str = "",
    ) -> None:
        self.store(
            {
                "source": source,
                "unit": unit,
                "peer": peer,
                "received_at": time.time(),
                "records": records,
                "bytes": size,
                "status": status,
                "reason": reason[:2000],
                "digest": digest,
            }
        )

    def store(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.receipts.append(row)


#: the in-memory ledger (the base class itself)
NullLedger = Ledger


class Connector(ABC):
    """Base class of every connector. Subclasses set ``type``, ``Config`` and ``produces``."""

    #: the name in configs and in the ``emrwatch.connectors`` entry-point group
    type: ClassVar[str] = ""
    #: one-line description for ``emrwatch connectors list``
    summary: ClassVar[str] = ""
    #: a dataclass: the configuration keys (with ``metadata={"help": ...}``)
    Config: ClassVar[builtins.type[Any]]
    #: what it produces: "access", "context" or both
    produces: ClassVar[frozenset[str]] = frozenset({"access"})
    #: after ``stop``, the runner keeps reading until :meth:`records` ends, so a push source
    #: without acknowledgements can hand over what it has queued (and must then end)
    drain_on_stop: ClassVar[bool] = False

    def __init__(self, config: Any, name: str = "", ledger: Ledger | None = None) -> None:
        self.config = config
        #: the source name: message header, dead-letter source, checkpoint and ledger key
        self.name = name or self.type
        self.ledger: Ledger = ledger if ledger is not None else NullLedger()

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        name: str = "",
        ledger: Ledger | None = None,
        section: str = "",
    ) -> Connector:
        """Build from a config mapping (without ``type``/``name``), validating it; errors
        name ``section`` (e.g. ``connectors[2]``)."""
        section = section or f"connector {name or cls.type!r}"
        return cls(config_from_dict(cls.Config, data, section), name=name, ledger=ledger)

    @abstractmethod
    def records(self, checkpoint: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        """Raw records after ``checkpoint`` (None: from the start), until the source is
        exhausted or ``stop`` is set. Listeners, pollers and file followers wait for more;
        while they wait they must ``yield None`` at least once a second, so the runner can
        commit what is pending and look at ``stop``."""

    @abstractmethod
    def normalize(self, raw: RawRecord) -> list[Output]:
        """The canonical events / context rows of one raw record. Pure: the same record
        always gives the same output, nothing outside changes. Raises :class:`EventError`
        (only) when the record is unusable; an empty list means "nothing to emit" (a
        heartbeat, an event type the connector deliberately ignores)."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Open sockets / connections before :meth:`records` is first called."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sockets, files and connections."""

    def use_state_dir(self, directory: Path) -> None:  # noqa: B027 - optional hook
        """Where this source may keep durable state of its own (the ATNA listener's spool);
        ``emrwatch connectors run`` passes ``<ingest.state_dir>/spool/<name>``."""

    def committed(self, checkpoint: Any) -> None:  # noqa: B027 - optional hook
        """The runner saved ``checkpoint``: the broker has everything up to it."""

    def describe(self) -> dict[str, Any]:
        """What ``emrwatch connectors status`` shows (listening address, file, ...)."""
        return {"type": self.type, "name": self.name}


# ---------------------------------------------------------------------------- configuration
_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConnectorConfigError as exc:
                errors.append(str(exc))
        raise ConnectorConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConnectorConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "1",
            "on",
            "false",
            "no",
            "0",
            "off",
        ):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConnectorConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConnectorConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConnectorConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConnectorConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConnectorConfigError(f"{where}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise ConnectorConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        if len(args) == 2:
            return {
                _coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}")
                for k, v in value.items()
            }
        return dict(value)
    return value


def config_from_dict(cls: type[Any], data: Mapping[str, Any] | None, section: str) -> Any:
    """Validate ``data`` against the dataclass ``cls``: unknown keys, missing required keys
    and wrongly typed values are :class:`ConnectorConfigError` naming ``section.key``."""
    data = dict(data or {})
    fs = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fs))
    if unknown:
        raise ConnectorConfigError(f"{section}: unknown key(s) {unknown}; known: {sorted(fs)}")
    hints = _hints(cls)
    kw: dict[str, Any] = {}
    for name, f in fs.items():
        if name in data:
            kw[name] = _coerce(data[name], hints.get(name, Any), f"{section}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_ = f.metadata.get("help", "")
            raise ConnectorConfigError(
                f"{section}.{name}: required" + (f" ({help_})" if help_ else "")
            )
    try:
        obj = cls(**kw)
    except (TypeError, ValueError) as exc:
        raise ConnectorConfigError(f"{section}: {exc}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConnectorConfigError:
            raise
        except ValueError as exc:
            raise ConnectorConfigError(f"{section}: {exc}") from None
    return obj


def _schema_of(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(a) for a in args]}
    if hint is type(None):
        return {"type": "null"}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return {"type": "array", "items": _schema_of(args[0]) if args else {}}
    if origin in (dict, Mapping) or hint is dict:
        return {
            "type": "object",
            "additionalProperties": _schema_of(args[1]) if len(args) == 2 else {},
        }
    return {}


def config_schema(cls: type[Any]) -> dict[str, Any]:
    """The JSON Schema of a connector's ``Config`` dataclass (``emrwatch connectors list``)."""
    hints = _hints(cls)
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        s = _schema_of(hints.get(f.name, Any))
        if f.metadata.get("help"):
            s["description"] = f.metadata["help"]
        if f.default is not dataclasses.MISSING:
            s["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            s["default"] = f.default_factory()
        else:
            required.append(f.name)
        props[f.name] = s
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out
