"""Analysts' verdicts train the case model (models.verdicts): triage in the alert store →
labels → ``python -m models.train --verdicts STORE_URL`` → a registered, promotable model.

The analyst here is simulated from the simulator's labels: an alert holding a labelled
access is confirmed, any other is closed benign, and every fifth alert is left open."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from detectors.config import DetectionConfig
from models.registry import DEFAULT_REGISTRY, ModelRegistry
from models.runtime import load_bundle
from models.train import replay_cases, train_cases
from models.verdicts import Verdicts, parse_since
from pipeline.alerting.store import AlertStore
from pipeline.evaluate import evaluate, load_labels
from pipeline.replay import replay_file
from pipeline.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
#: alerts at a lower threshold than the default, so that analysts also see benign cases
LIVE = DetectionConfig(alert_threshold=0.15)


@dataclass
class Triaged:
    data: Path
    url: str
    confirmed: dict[str, set[str]]  # alert id → evidence
    benign: dict[str, set[str]]
    open: dict[str, set[str]]


def _close(store: AlertStore, alert_id: str, to: str) -> None:
    for step in ("acknowledged", "investigating"):
        store.transition(alert_id, step, actor="ana")
    store.transition(alert_id, to, actor="ana", note="reviewed the accesses with the ward")


def _triage(data: Path, url: str) -> Triaged:
    res = replay_file(data, data / "events.ndjson", config=LIVE)
    labels = load_labels(data / "labels.csv")
    out = Triaged(data, url, {}, {}, {})
    with AlertStore(url) as store:
        store.upsert(res.alerts)
        for i, a in enumerate(res.alerts):
            ids = set(a.event_ids)
            if i % 5 == 4:
                out.open[a.alert_id] = ids
            elif ids & labels.keys():
                _close(store, a.alert_id, "closed_confirmed")
                out.confirmed[a.alert_id] = ids
            else:
                _close(store, a.alert_id, "closed_benign")
                out.benign[a.alert_id] = ids
    return out


@pytest.fixture(scope="module")
def triaged(tmp_path_factory: pytest.TempPathFactory) -> Triaged:
    data = tmp_path_factory.mktemp("feedback") / "history"
    simulate(data, days=2, seed=5, scale=0.3)  # a tuning seed, never the held-out one
    url = f"sqlite:///{data.parent / 'alerts.sqlite3'}"
    return _triage(data, url)


def _union(groups: dict[str, set[str]]) -> set[str]:
    return set().union(*groups.values()) if groups else set()


def test_the_simulated_analysts_decided_both_ways(triaged: Triaged) -> None:
    # the rest of this module means something only if there are all three kinds
    assert len(triaged.confirmed) >= 10
    assert len(triaged.benign) >= 2
    assert len(triaged.open) >= 3


def test_verdicts_are_read_from_the_store(triaged: Triaged) -> None:
    v = Verdicts.from_store(triaged.url)
    confirmed = _union(triaged.confirmed)
    assert set(v.labels()) == confirmed
    assert v.benign == _union(triaged.benign) - confirmed
    assert v.undecided == _union(triaged.open) - confirmed
    d = v.describe()
    assert (d["confirmed_alerts"], d["benign_alerts"]) == (
        len(triaged.confirmed),
        len(triaged.benign),
    )
    assert "alerts.sqlite3" in d["source"]
    # every confirmed access is labelled with its alert's first detector and its user
    with AlertStore(triaged.url) as store:
        aid = next(iter(triaged.confirmed))
        stored = store.get(aid)
        assert stored is not None
        e = next(iter(triaged.confirmed[aid]))
        scn, user = v.labels()[e]
        detector = stored.alert["detector"]
        names = detector if isinstance(detector, list) else str(detector).split(",")
        assert user == stored.alert["user_id"] and scn in [n.strip() for n in names]


def test_a_case_verdict_follows_shared_accesses() -> None:
    from pipeline.alerting import Label

    def label(aid: str, verdict: str, ids: list[str]) -> Label:
        from datetime import UTC, datetime

        return Label(aid, "u1", verdict, "high", ["vip-snoop"], 1, "ana", datetime.now(UTC), ids)

    v = Verdicts.from_labels(
        [label("a1", "confirmed", ["e1", "e2"]), label("a2", "benign", ["e2", "e3", "e4"])],
        undecided=["e4", "e5", "e1"],
    )
    assert v.case_verdict(["e9", "e2"]) == 1  # shares a confirmed access
    assert v.case_verdict(["e3"]) == 0  # closed benign
    assert v.case_verdict(["e3", "e5"]) is None  # and part of an alert not decided yet
    assert v.case_verdict(["e8"]) == 0  # never alerted
    # a wider case closed benign does not clear the access someone else confirmed
    assert v.benign == {"e3", "e4"} and v.undecided == {"e4", "e5"}
    assert v.labels()["e2"] == ("vip-snoop", "u1")


def test_a_reopened_alert_withdraws_its_verdict(tmp_path: Path, triaged: Triaged) -> None:
    db = tmp_path / "copy.sqlite3"
    shutil.copy(triaged.url.removeprefix("sqlite:///"), db)
    url = f"sqlite:///{db}"
    aid, ids = next(iter(triaged.benign.items()))
    with AlertStore(url) as store:
        store.transition(aid, "investigating", actor="carol", note="the ward disputes it")
    v = Verdicts.from_store(url)
    assert ids <= v.undecided and not ids & v.benign - _union(triaged.benign)
    assert v.describe()["benign_alerts"] == len(triaged.benign) - 1


def test_training_on_verdicts_registers_a_case_model(tmp_path: Path, triaged: Triaged) -> None:
    registry_dir = tmp_path / "registry"
    shutil.copytree(DEFAULT_REGISTRY, registry_dir)
    registry = ModelRegistry(registry_dir)
    bundle = load_bundle(registry)
    assert bundle is not None
    verdicts = Verdicts.from_store(triaged.url)
    out = train_cases(
        [triaged.data],
        registry,
        bundle,
        bundle.versions["visits"],
        promote=True,
        verdicts=verdicts,
        log=lambda _m: None,
    )
    assert registry.promoted()["cases"] == out["cases"]
    meta = registry.metadata("cases", out["cases"])
    assert meta["labels"] == json.loads(json.dumps(verdicts.describe()))
    # the cases it learned from are exactly the reviewed ones an analyst's verdict covers
    cases = replay_cases(triaged.data, bundle, verdicts=verdicts)
    undecided = [c for c in cases if c["verdict"] is None]
    assert undecided, "some rebuilt cases share accesses with the open alerts"
    reviewed = [c for c in cases if c["verdict"] is not None and c["reviewed"]]
    if len({c["verdict"] for c in reviewed}) == 2:
        assert meta["metrics"]["cases"] == len(reviewed)
    else:  # too few reviewed cases with both verdicts: every decided case
        assert meta["metrics"]["cases"] == len(cases) - len(undecided)
    assert meta["metrics"]["undecided_cases"] == len(undecided)
    assert meta["metrics"]["misuse_cases"] >= 1
    # and the engine runs with it: same quality as the shipped, label-trained case model
    for reg in (str(DEFAULT_REGISTRY), str(registry_dir)):
        r = evaluate(triaged.data, DetectionConfig(model_registry=reg))
        assert r["mean_user_recall"] >= 0.95, reg


def _py(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_labels_csv_from_the_store_scores_the_detectors(tmp_path: Path, triaged: Triaged) -> None:
    hospital = tmp_path / "hospital"  # a hospital's own history: no simulator labels
    shutil.copytree(triaged.data, hospital)
    (hospital / "labels.csv").unlink()
    p = _py("-m", "models.verdicts", "--store", triaged.url, "--out", str(hospital / "labels.csv"))
    assert p.returncode == 0, p.stderr
    assert f"from {len(triaged.confirmed)} confirmed alert(s)" in p.stderr
    with (hospital / "labels.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["event_id"] for r in rows} == _union(triaged.confirmed)
    r = evaluate(hospital, LIVE)
    # at the threshold the analysts triaged, every confirmed user is alerted again
    assert r["mean_user_recall"] == 1.0
    assert set(r["scenarios"]) == {row["scenario"] for row in rows}


def test_train_command_with_verdicts(tmp_path: Path, triaged: Triaged) -> None:
    registry_dir = tmp_path / "registry"
    shutil.copytree(DEFAULT_REGISTRY, registry_dir)
    hospital = tmp_path / "hospital"
    shutil.copytree(triaged.data, hospital)
    (hospital / "labels.csv").unlink()
    base = ["-m", "models.train", "--data", str(hospital), "--registry", str(registry_dir)]
    p = _py(*base, "--cases-only", "--no-promote")
    assert p.returncode == 2 and "no labels.csv in" in p.stderr and "--verdicts" in p.stderr
    p = _py(*base, "--cases-only", "--verdicts", f"sqlite:///{tmp_path / 'none.sqlite3'}")
    assert p.returncode == 2 and "no alert store at" in p.stderr
    assert not (tmp_path / "none.sqlite3").exists()
    p = _py(*base, "--cases-only", "--verdicts", triaged.url, "--verdicts-since", "2020-13-01")
    assert p.returncode == 2 and "--verdicts-since" in p.stderr
    p = _py(*base, "--cases-only", "--verdicts", triaged.url, "--verdicts-since", "2020-01-01")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert ModelRegistry(registry_dir).promoted()["cases"] == out["cases"]
    meta = ModelRegistry(registry_dir).metadata("cases", out["cases"])
    assert meta["labels"]["confirmed_alerts"] == len(triaged.confirmed)
    assert meta["labels"]["decided_since"].startswith("2020-01-01")
    # decided before the window: nothing is labelled or cleared, and the command says so
    late = Verdicts.from_store(triaged.url, parse_since("2999-01-01"))
    assert not late.labels() and not late.benign
    assert late.undecided == _union(triaged.confirmed) | _union(triaged.benign) | _union(
        triaged.open
    )
    p = _py(*base, "--cases-only", "--no-promote", "--verdicts", triaged.url,
            "--verdicts-since", "2999-01-01")  # fmt: skip
    assert p.returncode == 1 and "labels: 0 confirmed and 0 benign alert(s)" in p.stderr
    assert "no misuse case among" in p.stderr


def test_verdicts_from_postgresql(pg_url: str, tmp_path: Path, triaged: Triaged) -> None:
    pg = _triage(triaged.data, pg_url)
    v = Verdicts.from_store(pg_url)
    assert set(v.labels()) == _union(pg.confirmed)
    assert v.undecided == _union(pg.open) - _union(pg.confirmed)
    assert v.describe()["benign_alerts"] == len(pg.benign)
    assert "postgresql" in v.describe()["source"]


def test_full_training_on_verdicts_keeps_undecided_visits_out_of_the_baselines(
    tmp_path: Path, triaged: Triaged
) -> None:
    from models.train import train

    registry = ModelRegistry(tmp_path / "registry")
    verdicts = Verdicts.from_store(triaged.url)
    out = train([triaged.data], registry, verdicts=verdicts, log=lambda _m: None)
    assert registry.promoted() == {"visits": out["visits"], "cases": out["cases"]}
    meta = registry.metadata("visits", out["visits"])
    assert meta["labels"]["confirmed_alerts"] == len(triaged.confirmed)
    # the settings that shape the features, so a run with other ones can say so
    assert meta["detection"] == {"shift_grace_s": DetectionConfig().shift_grace_s}
    m = meta["metrics"]
    assert m["misuse_visits"] > 0 and m["undecided_visits"] > 0
    assert m["ordinary_visits"] == m["visits"] - m["misuse_visits"] - m["undecided_visits"]
    # the engine runs with what it learned from verdicts alone
    r = evaluate(triaged.data, DetectionConfig(model_registry=str(registry.root)))
    assert r["mean_user_recall"] >= 0.9
