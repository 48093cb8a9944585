"""Detection quality on the held-out simulator seed, which nobody tunes on.

Thresholds are those of the detection-core issue: mean user recall ≥ 0.95 with no scenario
below 0.8, event recall ≥ 0.95, ≤ 2 false alerts per 10,000 benign events, ≥ 95% of benign
accesses explained. The replay is also checked to be identical with 1 and 2 workers.
"""

from __future__ import annotations

import pytest

from pipeline.evaluate import HELD_OUT_SEED, TUNING_SEEDS, evaluate
from pipeline.replay import replay_file
from pipeline.simulate import SCENARIOS, simulate


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    simulate(out, days=7, seed=HELD_OUT_SEED, scale=1.0)
    return out


@pytest.fixture(scope="module")
def report(held_out):
    return evaluate(held_out, workers=2)


def test_held_out_seed_is_not_a_tuning_seed():
    assert HELD_OUT_SEED not in TUNING_SEEDS


def test_every_scenario_is_in_the_held_out_data(report):
    assert set(report["scenarios"]) == set(SCENARIOS)


def test_user_recall(report):
    assert report["mean_user_recall"] >= 0.95
    low = {s: r["user_recall"] for s, r in report["scenarios"].items() if r["user_recall"] < 0.8}
    assert not low, f"scenarios below 0.8 user recall: {low}"


def test_event_recall(report):
    assert report["event_recall"] >= 0.95
    # and no scenario's case leaves out much of its burst (the lowest, explained_browsing,
    # is 0.948 with model_follow_level and was 0.908 without)
    low = {k: v["event_recall"] for k, v in report["scenarios"].items() if v["event_recall"] < 0.93}
    assert not low, f"scenarios below 0.93 event recall: {low}"


def test_false_alerts_per_10k_benign(report):
    assert report["benign_events"] > 100_000
    assert report["false_alerts_per_10k_benign"] <= 2.0


def test_benign_accesses_explained(report):
    assert report["benign_explained"] >= 0.95


def test_parallel_replay_equals_single_process(held_out):
    one = replay_file(held_out, held_out / "events.ndjson", workers=1)
    two = replay_file(held_out, held_out / "events.ndjson", workers=2)
    assert one.events == two.events > 0
    assert [a.to_dict() for a in one.alerts] == [a.to_dict() for a in two.alerts]
    assert one.stats.explained == two.stats.explained
