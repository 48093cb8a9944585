"""``emrwatch evaluate``'s scoring on a hand-made replay: every number is worked out here."""

from __future__ import annotations

from detectors.alerts import Alert
from detectors.engine import EngineStats
from pipeline.evaluate import format_report, score
from pipeline.replay import ReplayResult


def _alert(aid: str, user: str, rules: list[str], events: list[str], when: str) -> Alert:
    return Alert(
        alert_id=aid,
        detector=rules,
        severity="medium",
        score=0.5,
        user_id=user,
        patient_ids=["p"],
        event_ids=events,
        first_seen=when,
        last_seen=when,
        reason="r",
        department_id="ORTH",
        role="nurse",
    )


def test_scores_and_where_the_false_alerts_come_from() -> None:
    labels = {"m1": ("no_care_relationship", "u1"), "m2": ("no_care_relationship", "u1")}
    alerts = [
        _alert("a1", "u1", ["unexplained-surge", "no-care-relationship"], ["m1", "b1"], "2026-03-05T10:00:00+08:00"),
        _alert("a2", "u2", ["no-care-relationship"], ["b2", "b3"], "2026-03-04T09:00:00+08:00"),
        _alert("a3", "u3", ["learned-behaviour"], ["b4"], "2026-03-02T07:58:00+08:00"),
    ]  # fmt: skip
    res = ReplayResult(
        alerts=alerts,
        stats=EngineStats(events=10_002, unexplained_ids={"b2", "b3", "m1"}),
        events=10_002,
    )
    r = score(res, labels)
    assert (r["alerts"], r["true_alerts"], r["false_alerts"]) == (3, 1, 2)
    assert r["false_alerts_per_10k_benign"] == 2.0  # 2 false of 10,000 benign events
    assert r["benign_explained"] == 0.9998  # b2, b3 unexplained
    assert r["event_recall"] == 0.5 and r["scenarios"]["no_care_relationship"]["user_recall"] == 1
    assert r["by_rule"] == {
        "learned-behaviour": {"alerts": 1, "false": 1},
        "no-care-relationship": {"alerts": 2, "false": 1},
        "unexplained-surge": {"alerts": 1, "false": 0},
    }
    # the false ones, oldest first, with who and what raised them
    assert [(f["alert_id"], f["user_id"], f["detector"]) for f in r["false_alert_list"]] == [
        ("a3", "u3", ["learned-behaviour"]),
        ("a2", "u2", ["no-care-relationship"]),
    ]
    text = format_report({"data": "d", **r})
    assert "no-care-relationship                   2      1" in text
    assert "2026-03-02T07:58  u3 (nurse, ORTH)  learned-behaviour  medium, 1 events  a3" in text
    assert "input clocks" not in text  # nothing to say of clocks in order


def test_the_report_says_what_the_inputs_clocks_did() -> None:
    stats = EngineStats(
        events=100, clock_ahead=3, far_behind=7, clock_behind_from={"ws": 5}, withdrawn=2
    )
    r = score(ReplayResult(alerts=[], stats=stats, events=100), {})
    assert (r["clock_ahead"], r["far_behind"], r["clock_behind"]) == (3, 7, 5)
    assert r["withdrawn"] == 2
    text = format_report({"data": "d", **r})
    assert "input clocks               3 access(es) judged at the file's time" in text
    assert "5 judged later (a clock steadily behind; correlations withdrawn from 2 case(s))" in text
    assert "7 more than 6 h behind a newer one of the same user" in text
    assert "input delays" not in text  # the allowance never widened


def test_the_report_says_how_long_the_engine_waited_for_late_accesses() -> None:
    stats = EngineStats(events=100, late_allowance=3600.0, latest_lag=3590.0, too_late=4)
    r = score(ReplayResult(alerts=[], stats=stats, events=100), {})
    assert (r["late_allowance_s"], r["too_late"]) == (3600.0, 4)
    text = format_report({"data": "d", **r})
    assert "input delays               waited up to 60 min for late accesses; 4 came later" in text
