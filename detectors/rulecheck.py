"""Run a rule's shipped examples: the rule's own positive and negative test cases.

An example of a per-event rule is a partial facts map laid over :func:`benign_facts`.
An example of a windowed correlation is a list of such maps, each with ``t`` (seconds) and
optionally ``patient_id``/``workstation``. An example of a daily-volume rule is
``{history: [daily counts...], day: [{explained: bool, count: n}, ...]}`` (with
``of: unexplained`` the history counts each day's unexplained patients).
The same windows the engine uses (:class:`detectors.engine.Window`, ``DayCounter``) are used here.
"""

from __future__ import annotations

from typing import Any

from detectors.engine import DayCounter, Window
from detectors.rules import Rule, benign_facts


def _facts(overrides: dict[str, Any]) -> dict[str, Any]:
    f = benign_facts()
    f.update({k: v for k, v in overrides.items() if k not in ("t", "patient_id")})
    return f


def fires(rule: Rule, example: Any) -> bool:
    """Does ``rule`` raise a finding on ``example``?"""
    agg = rule.aggregate
    if agg is None:
        return bool(rule.predicate(_facts(example)))
    if agg.count == "day_distinct":
        dc = DayCounter.for_aggregate(agg)
        dc.history.extend(example.get("history", []))
        for i, group in enumerate(example.get("day", [])):
            for j in range(int(group.get("count", 1))):
                f = _facts({k: v for k, v in group.items() if k != "count"})
                if not rule.predicate(f):
                    continue
                dc.patients.add(f"p{i}-{j}")
                if not f["explained"]:
                    dc.unexplained_patients.add(f"p{i}-{j}")
        return dc.holds(agg)
    w = Window()
    for i, item in enumerate(example):
        f = _facts(item)
        if not rule.predicate(f):
            continue
        if agg.count == "events":
            key = f"e{i}"
        else:
            key = str(item.get(agg.field, f.get(agg.field, f"{agg.field}-{i}")))
        w.push(
            float(item.get("t", i)),
            key,
            f["explained"],
            (f"e{i}", 0.0, "", "", "", "", 0),
            agg.timespan_s,
        )
        if w.count(agg.count) >= agg.gte:
            return True
    return False
