"""Finding connectors: the ``emrwatch.connectors`` entry-point group.

A connector package declares, in its ``pyproject.toml``::

    [project.entry-points."emrwatch.connectors"]
    epic-clarity = "my_hospital.clarity:ClarityConnector"

and after ``pip install`` the type ``epic-clarity`` can be used in ``connectors:`` of a run
config. The built-in connectors are declared the same way in emrwatch's own
``pyproject.toml``; :data:`BUILTIN` repeats them so a source checkout that was not
reinstalled still finds them.

>>> sorted(connector_types())[:3]
['atna-syslog', 'context-csv', 'fhir-bulk-export']
>>> build({"type": "nope"})
Traceback (most recent call last):
...
connectors.base.ConnectorConfigError: connectors: unknown type 'nope'; known: atna-syslog, context-csv, fhir-bulk-export, fhir-context, fhir-file, fhir-rest, file, hl7-mllp, sql-audit
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from connectors.base import Connector, ConnectorConfigError, Ledger

GROUP = "emrwatch.connectors"

#: type → "module:Class" of the connectors shipped with emrwatch
BUILTIN: dict[str, str] = {
    "file": "connectors.files:FileConnector",
    "fhir-file": "connectors.files:FhirFileConnector",
    "context-csv": "connectors.files:ContextCsvConnector",
    "fhir-rest": "connectors.fhir_rest:FhirRestConnector",
    "fhir-bulk-export": "connectors.fhir_rest:FhirBulkExportConnector",
    "fhir-context": "connectors.fhir_rest:FhirContextConnector",
    "atna-syslog": "connectors.atna:AtnaSyslogConnector",
    "hl7-mllp": "connectors.hl7:Hl7MllpConnector",
    "sql-audit": "connectors.sql:SqlAuditConnector",
}


def _targets() -> dict[str, str]:
    out = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        out[ep.name] = ep.value
    return out


def connector_types() -> list[str]:
    """Every connector type this installation knows."""
    return sorted(_targets())


def connector_class(type_name: str) -> type[Connector]:
    """The class registered for ``type_name``; a clear error when unknown or broken."""
    targets = _targets()
    target = targets.get(type_name)
    if target is None:
        raise ConnectorConfigError(
            f"connectors: unknown type {type_name!r}; known: {', '.join(sorted(targets))}"
        )
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConnectorConfigError(
            f"connectors: type {type_name!r} ({target}) cannot be loaded: {exc}"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, Connector)):
        raise ConnectorConfigError(f"connectors: {target} is not a Connector subclass")
    return obj


def build(
    spec: Mapping[str, Any], index: int | None = None, ledger: Ledger | None = None
) -> Connector:
    """A connector from one entry of a config's ``connectors:`` list.

    ``type`` picks the class, ``name`` (default: the type) names the source in headers,
    checkpoints and the ledger; every other key goes to the connector's ``Config``."""
    where = "connectors" if index is None else f"connectors[{index}]"
    if not isinstance(spec, Mapping):
        raise ConnectorConfigError(f"{where}: must be a mapping with a 'type'")
    spec = dict(spec)
    type_name = spec.pop("type", None)
    if not type_name:
        raise ConnectorConfigError(f"{where}.type: required; known: {', '.join(connector_types())}")
    name = str(spec.pop("name", "") or type_name)
    cls = connector_class(str(type_name))
    return cls.from_dict(spec, name=name, ledger=ledger, section=f"{where} ({name})")
