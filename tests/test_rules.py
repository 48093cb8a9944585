"""Every shipped rule: it compiles, and its own positive examples fire and negatives do not."""

from __future__ import annotations

import pytest

from detectors.rulecheck import fires
from detectors.rules import FACT_FIELDS, RuleError, benign_facts, load_rules, rule_from_doc

RULES = load_rules()


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_positive_examples_fire(rule):
    for ex in rule.examples["positive"]:
        assert fires(rule, ex), f"{rule.id}: positive example did not fire: {ex}"


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_negative_examples_do_not_fire(rule):
    for ex in rule.examples["negative"]:
        assert not fires(rule, ex), f"{rule.id}: negative example fired: {ex}"


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_benign_access_fires_nothing(rule):
    if rule.aggregate is None:
        assert not rule.predicate(benign_facts())


def test_every_field_scenario_has_a_rule():
    scenarios = {r.scenario for r in RULES}
    expected = {
        "sealed_record",
        "no_care_relationship",
        "off_hours_bulk",
        "vip_snooping",
        "coworker_snooping",
        "family_snooping",
        "self_access",
        "account_validity",
        "grant_out_of_scope",
        "sensitivity_above_clearance",
        "bulk_export",
        "credential_sharing",
        "denied_probing",
        "break_the_glass_abuse",
        "role_resource_mismatch",
        "volume_anomaly",
    }
    assert expected <= scenarios, expected - scenarios


def test_benign_facts_cover_every_field():
    assert set(benign_facts()) == set(FACT_FIELDS)


def _doc(**kw):
    doc = {
        "id": "t",
        "title": "t",
        "level": "low",
        "reason": "r",
        "detection": {"selection": {"vip": True}, "condition": "selection"},
        "examples": {"positive": [{"vip": True}], "negative": [{"vip": False}]},
    }
    doc.update(kw)
    return doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"detection": {"selection": {"nonsense": True}, "condition": "selection"}},
            "unknown field",
        ),
        (
            {"detection": {"selection": {"vip|near": True}, "condition": "selection"}},
            "unknown modifier",
        ),
        (
            {"detection": {"selection": {"vip": True}, "condition": "selection and other"}},
            "unknown selection",
        ),
        (
            {"detection": {"selection": {"vip": True}, "condition": "selection and"}},
            "bad condition",
        ),
        ({"level": "urgent"}, "level"),
        ({"examples": {"positive": [{"vip": True}]}}, "examples"),
        ({"aggregate": {"count": "distinct patient_id", "timespan": "soon", "gte": 3}}, "timespan"),
        ({"aggregate": {"count": "distinct patient_id", "timespan": "1h"}}, "gte"),
        ({"aggregate": {"count": "median", "timespan": "1h", "gte": 2}}, "aggregate count"),
        (
            {"aggregate": {"count": "distinct patient_id", "timespan": "day", "gte": 2, "of": "x"}},
            "'of' must be all or unexplained",
        ),
        (
            {
                "aggregate": {
                    "count": "distinct patient_id",
                    "timespan": "1h",
                    "gte": 2,
                    "of": "unexplained",
                }
            },
            "'of' needs timespan 'day'",
        ),
    ],
)
def test_bad_rule_documents_are_rejected_with_a_reason(change, message):
    with pytest.raises(RuleError, match=message):
        rule_from_doc(_doc(**change))


def test_condition_operators():
    rule = rule_from_doc(
        _doc(
            detection={
                "a": {"vip": True},
                "b": [{"role": "clerk"}, {"clearance|lt": 2}],
                "condition": "a and not (b)",
            }
        )
    )
    assert rule.predicate({**benign_facts(), "vip": True, "role": "nurse", "clearance": 3})
    assert not rule.predicate({**benign_facts(), "vip": True, "role": "clerk", "clearance": 3})
    assert not rule.predicate({**benign_facts(), "vip": True, "role": "nurse", "clearance": 1})
    assert not rule.predicate({**benign_facts(), "vip": False})


def test_overrides_change_a_threshold_without_editing_the_rule():
    rules = {r.id: r for r in load_rules(overrides={"bulk-export": {"aggregate": {"gte": 40}}})}
    assert rules["bulk-export"].aggregate.gte == 40
    assert rules["bulk-export"].aggregate.timespan_s == 3600
