"""``emrwatch rules simulate`` (pipeline.whatif): a rule or configuration change measured on
history before it is deployed, against the rules in force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detectors.alerts import Alert
from detectors.config import DetectionConfig
from detectors.engine import EngineStats
from detectors.rules import default_rules_dir
from pipeline.cli import main
from pipeline.evaluate import load_labels
from pipeline.replay import ReplayResult, replay_file
from pipeline.simulate import simulate
from pipeline.whatif import CandidateError, compare, simulate_change

SEALED = "sealed-record-touch"
BULK = "off-hours-bulk"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whatif")
    simulate(out, days=2, seed=5, scale=0.3)  # a tuning seed, not the held-out one
    return out


def _rule_file(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = (default_rules_dir() / name).read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def _run(hospital: Path, cfg: DetectionConfig | None = None, **kw: object) -> dict:
    return simulate_change(
        hospital,
        hospital / "events.ndjson",
        DetectionConfig(),
        cfg,
        labels_path=hospital / "labels.csv",
        **kw,  # type: ignore[arg-type]
    )


def test_the_rules_in_force_as_the_candidate_change_nothing(hospital: Path, tmp_path: Path) -> None:
    same = _rule_file(tmp_path, "03-off-hours-bulk.yaml", "gte: 10", "gte: 10")
    r = _run(hospital, rule_files=[same])
    assert r["current"]["alerts"] > 50
    assert (r["added"], r["gone"], r["changed"]) == ([], [], [])
    assert r["current"] == r["candidate"]
    assert r["unchanged"] > 0


def test_disabling_a_rule_shows_the_alerts_it_alone_raised_and_the_recall_it_costs(
    hospital: Path,
) -> None:
    r = _run(hospital, DetectionConfig(disabled_rules=(SEALED,)))
    labels = load_labels(hospital / "labels.csv")
    current = replay_file(hospital, hospital / "events.ndjson")
    # independently: the current alerts on which the sealed rule is what raised them
    sealed_alerts = [a for a in current.alerts if SEALED in a.detector]
    assert sealed_alerts
    assert r["gone"], "the sealed-record alerts must be reported hidden"
    assert all(SEALED in g["rules"] for g in r["gone"])
    assert {g["alert_id"] for g in r["gone"]} <= {a.alert_id for a in sealed_alerts}
    for c in r["changed"]:
        assert SEALED in c["rules_removed"]
    assert r["candidate"]["findings_by_rule"].get(SEALED, 0) == 0
    assert r["current"]["findings_by_rule"][SEALED] > 0
    # every hidden alert is labelled misuse here (the sealed scenario), and recall drops
    assert all("sealed_record" in g["misuse"] for g in r["gone"])
    q0, q1 = r["current"]["quality"], r["candidate"]["quality"]
    assert q1["user_recall"]["sealed_record"] < q0["user_recall"]["sealed_record"]
    regrouped = sum(len(c["current"]) - len(c["candidate"]) for c in r["changed"])
    assert r["candidate"]["alerts"] == r["current"]["alerts"] - len(r["gone"]) - regrouped
    assert sum(1 for e in labels.values() if e[0] == "sealed_record") > 0


def test_a_loosened_threshold_adds_findings_and_hides_nothing(
    hospital: Path, tmp_path: Path
) -> None:
    looser = _rule_file(tmp_path, "03-off-hours-bulk.yaml", "gte: 10", "gte: 5")
    r = _run(hospital, rule_files=[looser])
    cur, cand = r["current"]["findings_by_rule"], r["candidate"]["findings_by_rule"]
    assert cand[BULK] > cur.get(BULK, 0)
    assert r["gone"] == []
    assert r["added"] or r["changed"]
    for c in r["changed"]:
        assert c.get("rules_removed", []) == []
    assert r["rules"]["candidate_files"] == [str(looser)]


def test_a_new_rule_joins_the_set(hospital: Path, tmp_path: Path) -> None:
    """A copy of the bulk-export rule under a new id joins the set: no current alert goes,
    and the new rule finds exactly what the rule it copies finds, under its own id."""
    path = _rule_file(tmp_path, "11-bulk-export.yaml", "id: bulk-export", "id: bulk-export-copy")
    r = _run(hospital, rule_files=[path])
    assert (
        r["candidate"]["findings_by_rule"]["bulk-export-copy"]
        == (r["current"]["findings_by_rule"]["bulk-export"])
    )
    assert r["gone"] == []


def test_a_candidate_whose_own_examples_fail_is_refused(hospital: Path, tmp_path: Path) -> None:
    # at 4 patients an hour, the rule's third negative example (4 patients in 50 min) fires
    bad = _rule_file(tmp_path, "03-off-hours-bulk.yaml", "gte: 10", "gte: 4")
    with pytest.raises(CandidateError, match="negative example 3 fires"):
        _run(hospital, rule_files=[bad])
    broken = tmp_path / "broken.yaml"
    broken.write_text("id: x\ntitle: no detection\n", encoding="utf-8")
    with pytest.raises(CandidateError, match="broken.yaml"):
        _run(hospital, rule_files=[broken])


def _alert(
    aid: str, user: str, events: list[str], sev: str = "high", rules: tuple = ("r1",)
) -> Alert:
    return Alert(aid, list(rules), sev, 0.5, user, [], events, "2026-03-01T08:00:00+08:00", "", "x")


def test_compare_groups_split_and_merged_cases() -> None:
    """Cases the change splits or merges compare as one group, by their evidence."""

    def res(alerts: list[Alert]) -> ReplayResult:
        return ReplayResult(alerts=alerts, stats=EngineStats(), events=100)

    cur = [
        _alert("a1", "u1", ["e1", "e2", "e3"]),
        _alert("a2", "u2", ["e7"], "low"),
        _alert("a3", "u3", ["e9"]),
    ]
    cand = [
        _alert("b1", "u1", ["e1", "e2"]),  # a1 split in two, same evidence
        _alert("b2", "u1", ["e3"]),
        _alert("b3", "u2", ["e7", "e8"], "critical", ("r1", "r2")),  # a2 grown and raised
        _alert("b4", "u4", ["e10"]),  # new
    ]  # a3 gone
    r = compare(res(cur), res(cand))
    assert [g["alert_id"] for g in r["gone"]] == ["a3"]
    assert [a["alert_id"] for a in r["added"]] == ["b4"]
    by_user = {c["user_id"]: c for c in r["changed"]}
    assert by_user["u1"]["alerts"] == [1, 2] and "events" not in by_user["u1"]
    assert by_user["u2"]["severity"] == ["low", "critical"]
    assert by_user["u2"]["rules_added"] == ["r2"] and by_user["u2"]["events"] == [1, 2]
    assert r["unchanged"] == 0


def test_cli_prints_the_comparison_and_writes_the_report(
    hospital: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cand = tmp_path / "candidate.yaml"
    cand.write_text(f"disabled_rules: [{SEALED}]\n", encoding="utf-8")
    out = tmp_path / "report.json"
    argv = ["rules", "simulate", "--context", str(hospital), "--events"]
    argv += [str(hospital / "events.ndjson"), "--candidate-config", str(cand)]
    argv += ["--labels", str(hospital / "labels.csv"), "--json", str(out), "--workers", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert f"alerts the change would hide ({len(report['gone'])})" in text
    assert "[sealed_record]" in text and "user recall sealed_record" in text
    # nothing to simulate, or a refused candidate: a clear message and a non-zero exit
    assert main(["rules", "simulate", "--context", str(hospital), "--events", "x"]) == 2
    bad = _rule_file(tmp_path, "03-off-hours-bulk.yaml", "gte: 10", "gte: 4")
    argv = ["rules", "simulate", "--context", str(hospital), "--events"]
    assert main([*argv, str(hospital / "events.ndjson"), "--rule", str(bad)]) == 1
    assert "the candidate is refused" in capsys.readouterr().err
