"""Rules as data: a Sigma-like YAML document per rule, compiled to a Python predicate.

A rule reads like this (see ``detectors/rules/*.yaml``)::

    id: vip-snooping
    title: VIP record opened without a care relationship
    level: high
    detection:
      selection: {vip: true, explained: false}
      condition: selection
    reason: "opened the record of a VIP patient {patients_n} time(s) with no care relationship"
    examples:
      positive: [{vip: true, explained: false}]
      negative: [{vip: true, explained: true}]

The detection block matches *facts*: the event's fields enriched with context and the
explanation result (``FACT_FIELDS``). Selections are maps (all keys must match) or lists
of maps (any may match); a key may carry a modifier: ``field|in``, ``|not``, ``|gte``,
``|gt``, ``|lte``, ``|lt``, ``|startswith``, ``|contains``. The condition combines
selection names with ``and``, ``or``, ``not`` and parentheses.

An optional ``aggregate`` block turns the rule into a correlation over an event-time window
per user (``count: events | distinct <field> | switches <field>``, ``timespan``, ``gte``),
or per working day (local; a night shift is one day) against the user's own history
(``timespan: day``, ``baseline_ratio``;
``of: unexplained`` counts only today's patients no reason explains, against the user's
own days of them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LEVELS = ("low", "medium", "high", "critical")

#: every fact a rule may test, with its type; :mod:`detectors.engine` fills all of them.
FACT_FIELDS: dict[str, type] = {
    "action": str,
    "resource_type": str,
    "outcome": str,
    "emergency": bool,
    "purpose": str,
    "workstation": str,
    "source": str,
    "event_category": str,
    "role": str,
    "known_role": bool,
    "user_department": str,
    "user_department_kind": str,
    "user_in_emergency_department": bool,
    "clearance": int,
    "known_user": bool,
    "account_active": bool,
    "known_patient": bool,
    "sensitivity": int,
    "vip": bool,
    "patient_is_employee": bool,
    "explained": bool,
    "self_access": bool,
    "coworker": bool,
    "family": bool,
    "sealed_violation": bool,
    "off_shift": bool,
    "above_clearance": bool,
    "clinical_resource": bool,
    "exfiltration": bool,
    "write": bool,
    "denied": bool,
    "grant_only_role": bool,
    "grant_covered": bool,
    "clerk_role": bool,
}

_MODIFIERS = {
    "eq": "{f} == {v}",
    "in": "{f} in {v}",
    "not": "{f} != {v}",
    "gte": "{f} >= {v}",
    "gt": "{f} > {v}",
    "lte": "{f} <= {v}",
    "lt": "{f} < {v}",
    "startswith": "{f}.startswith({v})",
    "contains": "({v} in {f})",
}
_TIMESPAN = re.compile(r"^(\d+)\s*(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RuleError(ValueError):
    """A rule document that cannot be compiled; the message names the rule and the field."""


@dataclass
class Aggregate:
    count: str  # "events" | "distinct" | "switches" | "day_distinct"
    field: str  # the field counted (patient_id, workstation…); "" for events
    timespan_s: float
    gte: int
    baseline_ratio: float = 0.0  # day_distinct: today ≥ ratio × median of own history
    min_history_days: int = 3
    min_unexplained: int = 1  # day_distinct: at least this many unexplained patients today
    evidence: str = "window"  # "window" (every counted event) | "unexplained"
    #: day_distinct: what today's count and the history count: "all" the selected patients,
    #: or only "unexplained" ones (every day the user worked enters the history, 0 included)
    of: str = "all"


@dataclass
class Rule:
    id: str
    title: str
    level: str
    description: str
    reason: str
    detection: dict[str, Any]
    predicate: Callable[[dict[str, Any]], bool]
    source_code: str = ""  # the predicate's Python expression over ``f``
    immediate: bool = False
    retract_on_documentation: bool = False
    aggregate: Aggregate | None = None
    scenario: str = ""
    status: str = "stable"
    falsepositives: list[str] = field(default_factory=list)
    examples: dict[str, list[Any]] = field(default_factory=dict)
    source: str = ""


def parse_timespan(value: Any, rule_id: str) -> float:
    if isinstance(value, int | float):
        return float(value)
    m = _TIMESPAN.match(str(value).strip())
    if not m:
        raise RuleError(f"{rule_id}: timespan {value!r} is not like 10m, 1h or 1d")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def _compile_map(sel: dict[str, Any], rule_id: str) -> str:
    parts = []
    for key, value in sel.items():
        name, _, mod = str(key).partition("|")
        if name not in FACT_FIELDS:
            raise RuleError(f"{rule_id}: unknown field {name!r}; known: {sorted(FACT_FIELDS)}")
        mod = mod or ("in" if isinstance(value, list) else "eq")
        if mod not in _MODIFIERS:
            raise RuleError(f"{rule_id}: unknown modifier {mod!r} on {name!r}")
        v = tuple(value) if isinstance(value, list) else value
        parts.append("(" + _MODIFIERS[mod].format(f=f"f[{name!r}]", v=repr(v)) + ")")
    return "(" + " and ".join(parts or ["True"]) + ")"


def _compile_selection(sel: Any, rule_id: str) -> str:
    if isinstance(sel, dict):
        return _compile_map(sel, rule_id)
    if isinstance(sel, list) and sel and all(isinstance(s, dict) for s in sel):
        return "(" + " or ".join(_compile_map(s, rule_id) for s in sel) + ")"
    raise RuleError(f"{rule_id}: a selection must be a map or a list of maps")


def compile_detection(
    detection: dict[str, Any], rule_id: str
) -> tuple[str, Callable[[dict[str, Any]], bool]]:
    """Detection block → (python source, predicate over a facts dict)."""
    if not isinstance(detection, dict) or "condition" not in detection:
        raise RuleError(f"{rule_id}: detection needs named selections and a condition")
    sels = {k: _compile_selection(v, rule_id) for k, v in detection.items() if k != "condition"}
    tokens = re.findall(r"\(|\)|[A-Za-z_][A-Za-z0-9_]*", str(detection["condition"]))
    out = []
    for tok in tokens:
        if tok in ("and", "or", "not", "(", ")"):
            out.append(tok)
        elif tok in sels:
            out.append(sels[tok])
        else:
            raise RuleError(f"{rule_id}: condition names unknown selection {tok!r}")
    src = " ".join(out)
    try:
        fn = eval(f"lambda f: {src}", {"__builtins__": {}})  # noqa: S307 - compiled from validated tokens
    except SyntaxError as exc:
        raise RuleError(f"{rule_id}: bad condition {detection['condition']!r}: {exc}") from None
    return src, fn


def _aggregate(doc: dict[str, Any] | None, rule_id: str) -> Aggregate | None:
    if not doc:
        return None
    count = str(doc.get("count", "events")).split()
    kind, fld = count[0], (count[1] if len(count) > 1 else "")
    if kind not in ("events", "distinct", "switches"):
        raise RuleError(
            f"{rule_id}: aggregate count must be events, distinct FIELD or switches FIELD"
        )
    if kind != "events" and fld not in ("patient_id", "workstation", "resource_type", "action"):
        raise RuleError(f"{rule_id}: cannot count {kind} of {fld!r}")
    span = doc.get("timespan", "1h")
    if str(span).strip() == "day":
        if kind != "distinct":
            raise RuleError(f"{rule_id}: timespan 'day' counts distinct values")
        kind, span_s = "day_distinct", 86400.0
    else:
        span_s = parse_timespan(span, rule_id)
    if "gte" not in doc:
        raise RuleError(f"{rule_id}: aggregate needs a threshold 'gte'")
    evidence = doc.get("evidence", "window")
    if evidence not in ("window", "unexplained"):
        raise RuleError(f"{rule_id}: aggregate evidence must be window or unexplained")
    of = str(doc.get("of", "all"))
    if of not in ("all", "unexplained"):
        raise RuleError(f"{rule_id}: aggregate 'of' must be all or unexplained")
    if of != "all" and kind != "day_distinct":
        raise RuleError(f"{rule_id}: aggregate 'of' needs timespan 'day'")
    return Aggregate(
        count=kind,
        field=fld,
        timespan_s=span_s,
        gte=int(doc["gte"]),
        baseline_ratio=float(doc.get("baseline_ratio", 0.0)),
        min_history_days=int(doc.get("min_history_days", 3)),
        min_unexplained=int(doc.get("min_unexplained", 1)),
        evidence=evidence,
        of=of,
    )


def rule_from_doc(doc: dict[str, Any], source: str = "") -> Rule:
    rid = str(doc.get("id") or "").strip()
    if not rid:
        raise RuleError(f"{source}: rule has no id")
    for key in ("title", "level", "detection", "reason"):
        if key not in doc:
            raise RuleError(f"{rid}: missing {key!r}")
    level = str(doc["level"]).lower()
    if level not in LEVELS:
        raise RuleError(f"{rid}: level {level!r} is not one of {LEVELS}")
    src, pred = compile_detection(doc["detection"], rid)
    examples = doc.get("examples") or {}
    if not examples.get("positive") or not examples.get("negative"):
        raise RuleError(f"{rid}: every rule ships positive and negative examples")
    return Rule(
        id=rid,
        title=str(doc["title"]),
        level=level,
        description=str(doc.get("description", "")).strip(),
        reason=str(doc["reason"]),
        detection=doc["detection"],
        predicate=pred,
        source_code=src,
        immediate=bool(doc.get("immediate", False)),
        retract_on_documentation=bool(doc.get("retract_on_documentation", False)),
        aggregate=_aggregate(doc.get("aggregate"), rid),
        scenario=str(doc.get("scenario", "")),
        status=str(doc.get("status", "stable")),
        falsepositives=list(doc.get("falsepositives") or []),
        examples=examples,
        source=source,
    )


def compile_matcher(rules: list[Rule]) -> Callable[[dict[str, Any]], list[int]]:
    """One function that tests every rule and returns the indexes of those that match: a
    single call per event instead of one per rule (the hot path of the engine)."""
    lines = ["def match(f):", "    m = []"]
    for i, r in enumerate(rules):
        lines.append(f"    if {r.source_code or 'False'}: m.append({i})")
    lines.append("    return m")
    ns: dict[str, Any] = {}
    exec("\n".join(lines), {"__builtins__": {}}, ns)  # noqa: S102 - built from validated rule tokens
    return ns["match"]  # type: ignore[no-any-return]


def default_rules_dir() -> Path:
    return Path(__file__).parent / "rules"


def load_rules(
    directory: str | Path | None = None,
    disabled: tuple[str, ...] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[Rule]:
    """Every ``*.yaml`` rule in ``directory`` (default: the shipped rules), in file-name order.

    ``overrides`` maps a rule id to keys replaced in its document (e.g. a threshold), so a
    site can tune without copying the rule."""
    d = Path(directory) if directory else default_rules_dir()
    rules: list[Rule] = []
    seen: set[str] = set()
    for path in sorted(d.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise RuleError(f"{path.name}: not a rule document")
        rid = str(doc.get("id", ""))
        if rid in disabled:
            continue
        for key, value in ((overrides or {}).get(rid) or {}).items():
            if key == "aggregate" and isinstance(value, dict):
                doc["aggregate"] = {**(doc.get("aggregate") or {}), **value}
            else:
                doc[key] = value
        rule = rule_from_doc(doc, source=path.name)
        if rule.id in seen:
            raise RuleError(f"{path.name}: duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        rules.append(rule)
    if not rules:
        raise RuleError(f"no rules found in {d}")
    return rules


def benign_facts() -> dict[str, Any]:
    """A fully explained, ordinary access: the base that rule examples are written against."""
    return {
        "action": "view",
        "resource_type": "Observation",
        "outcome": "success",
        "emergency": False,
        "purpose": "",
        "workstation": "ws-1",
        "source": "emr",
        "event_category": "access",
        "role": "nurse",
        "known_role": True,
        "user_department": "CARD",
        "user_department_kind": "clinical",
        "user_in_emergency_department": False,
        "clearance": 3,
        "known_user": True,
        "account_active": True,
        "known_patient": True,
        "sensitivity": 1,
        "vip": False,
        "patient_is_employee": False,
        "explained": True,
        "self_access": False,
        "coworker": False,
        "family": False,
        "sealed_violation": False,
        "off_shift": False,
        "above_clearance": False,
        "clinical_resource": True,
        "exfiltration": False,
        "write": False,
        "denied": False,
        "grant_only_role": False,
        "grant_covered": False,
        "clerk_role": False,
    }
