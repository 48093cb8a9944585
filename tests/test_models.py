"""Learned models: river conformance, per-user state, registry, engine integration.

Small simulated hospitals keep this fast; the held-out quality of the models is checked in
``tests/test_models_quality.py``.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from connectors.readers import read_events
from detectors.cases import LEARNED_RULE_ID
from detectors.config import DetectionConfig
from detectors.engine import Engine
from detectors.lateness import LEARN_S
from emrwatch.context import Context
from models.batch import CASE_FEATURE_NAMES, CaseScorer, fit_isolation
from models.features import (
    FEATURE_NAMES,
    FEATURES,
    VISIT_GAP_S,
    Priors,
    UserBehaviour,
    Visit,
    visit_features,
)
from models.online import HSTState, QuantileGate, SharedHalfSpaceTrees
from models.population import TAIL_CEILING, TailCalibration
from models.registry import DEFAULT_REGISTRY, ModelRegistry, RegistryError
from models.runtime import ModelScorer, VisitScore, load_bundle
from pipeline.replay import collapse, partition_of, run_engine
from pipeline.simulate import simulate


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models-hospital")
    simulate(out, days=3, seed=11, scale=0.3)
    return out


@pytest.fixture(scope="module")
def events(hospital: Path) -> list:
    return [x for _, x, _ in read_events(hospital / "events.ndjson", "auto")]


@pytest.fixture(scope="module")
def ctx(hospital: Path) -> Context:
    return Context.load(hospital)


# ------------------------------------------------------------------ river conformance
def test_shared_trees_score_exactly_like_river() -> None:
    from river.anomaly import HalfSpaceTrees

    feats = ("a", "b", "c")
    rng = random.Random(5)
    xs = [{f: rng.random() ** (1 + i) for i, f in enumerate(feats)} for _ in range(600)]
    river = HalfSpaceTrees(n_trees=4, height=5, window_size=20, seed=7)
    ours = SharedHalfSpaceTrees(feats, n_trees=4, height=5, window_size=20, seed=7)
    st = ours.new_state()
    for x in xs:
        assert ours.score_one(st, x) == pytest.approx(river.score_one(x), abs=1e-12)
        river.learn_one(x)
        ours.learn_one(st, x)


def test_tree_height_is_bounded() -> None:
    with pytest.raises(ValueError):
        SharedHalfSpaceTrees(("a",), height=9)


def test_tree_state_round_trips_through_json() -> None:
    trees = SharedHalfSpaceTrees(("a", "b"), n_trees=3, height=4, window_size=5, seed=1)
    st = trees.new_state()
    for i in range(13):
        trees.learn_one(st, {"a": i / 13, "b": 1 - i / 13})
    back = HSTState.from_obj(orjson.loads(orjson.dumps(st.to_obj())), trees.size)
    x = {"a": 0.3, "b": 0.9}
    assert trees.score_one(back, x) == trees.score_one(st, x)
    assert list(back.l_mass) == list(st.l_mass) and back.counter == st.counter


def test_quantile_gate_tracks_a_quantile() -> None:
    g = QuantileGate(0.9)
    est = 0.0
    rng = random.Random(3)
    for n in range(1, 3001):
        est = g.update(est, rng.random(), n)
    assert 0.83 < est < 0.96


def test_tail_calibration_extrapolates_beyond_a_small_calibration_set() -> None:
    """Exponential scores: a calibration of 2,000 knows levels up to log10 2000 ≈ 3.3 from
    data; beyond it, the tail's slope carries on to the ceiling, close to the true level."""
    rng = random.Random(5)
    cal = TailCalibration.fit([rng.expovariate(1.0) for _ in range(2000)])
    top = (len(cal.points) - 1) / 8
    assert top == pytest.approx(3.25)
    assert cal.level(cal.points[-1]) == pytest.approx(top)  # continuous at the last point
    # for Exp(1), the true level of score s is s / ln 10
    for s in (9.0, 10.0):
        assert cal.level(s) == pytest.approx(s / math.log(10), abs=0.6)
    assert cal.level(8.5) < cal.level(9.5) < cal.level(10.5)  # still ranks beyond the data
    assert cal.level(1e6) == TAIL_CEILING
    assert cal.level(-1.0) == 0.0
    # the level of a calibration point itself is unchanged by the extrapolation
    assert cal.level(cal.points[8]) == pytest.approx(1.0)
    # too few scores for a tail (under 100): the top level is kept
    short = TailCalibration.fit([rng.expovariate(1.0) for _ in range(50)])
    assert short.level(1e3) == (len(short.points) - 1) / 8


# ------------------------------------------------------------------ features
def test_features_are_in_unit_range_and_do_not_touch_state() -> None:
    st = UserBehaviour()
    v = Visit("p1", 100.0, "ws", "CARD", "c0")
    ev = ("e1", 100.0, "p1", "view", "DocumentReference", "ws", 1)
    v.add("DocumentReference.view", False, False, True, True, True, ev)
    before = orjson.dumps(st.to_obj())
    x = visit_features(v, st, Priors.empty(), "LAB/technician", "technician", "u1")
    assert orjson.dumps(st.to_obj()) == before
    assert set(x) == set(FEATURE_NAMES) == set(FEATURES)
    assert all(0.0 <= val <= 1.0 for val in x.values())
    assert x["unexplained"] == 1.0 and x["denied"] == 1.0 and x["new_patient"] == 1.0


def test_one_score_direction_for_the_isolation_forest() -> None:
    rng = random.Random(0)
    rows = [{f: rng.gauss(1.0, 0.1) for f in CASE_FEATURE_NAMES} for _ in range(300)]
    scorer = CaseScorer("isolation", fit_isolation(rows))
    normal, odd = scorer.score([rows[0], {f: 9.0 for f in CASE_FEATURE_NAMES}])
    assert odd > normal  # higher means more suspicious, here as everywhere


# ------------------------------------------------------------------ registry
def test_registry_versions_promotes_and_checks_hashes(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    v1 = reg.register("visits", {"visits.json": b"{}"}, {"features": ["x"], "metrics": {}})
    v2 = reg.register("visits", {"visits.json": b'{"a": 1}'}, {"features": ["x"]})
    assert (v1, v2) == ("v0001", "v0002")
    reg.promote("visits", v2)
    assert reg.promoted() == {"visits": "v0002"}
    meta = reg.metadata("visits", v2)
    assert meta["files"]["visits.json"] and meta["features"] == ["x"]
    (tmp_path / "visits" / v2 / "visits.json").write_bytes(b'{"a": 2}')
    with pytest.raises(RegistryError, match="hash"):
        reg.load_json("visits", v2, "visits.json")
    with pytest.raises(RegistryError):
        reg.metadata("visits", "../../etc")


def test_shipped_registry_has_metadata_and_loads_safely() -> None:
    reg = ModelRegistry(DEFAULT_REGISTRY)
    promoted = reg.promoted()
    assert set(promoted) == {"visits", "cases"}
    for name, version in promoted.items():
        meta = reg.metadata(name, version)
        for key in ("features", "training_data", "metrics", "data_hash", "files"):
            assert meta[key], (name, key)
        assert all(not f.endswith((".pkl", ".pickle", ".joblib")) for f in meta["files"])
    bundle = load_bundle(reg)
    assert bundle is not None and bundle.case_model is not None
    assert bundle.case_model.kind == "verdicts"
    assert bundle.versions == promoted
    assert bundle.behaviour.height <= 8
    # trained before shift_grace_s existed: no record, so no warning for any grace
    assert bundle.detection == {}


def test_a_shift_grace_other_than_the_models_was_trained_with_is_warned_once(
    ctx: Context, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    import detectors.engine

    root = tmp_path / "registry"
    shutil.copytree(DEFAULT_REGISTRY, root)
    visits = ModelRegistry(root).promoted()["visits"]
    meta_path = root / "visits" / visits / "metadata.json"
    meta = orjson.loads(meta_path.read_bytes())
    meta["detection"] = {"shift_grace_s": 1800.0}  # what models.train records
    meta_path.write_bytes(orjson.dumps(meta))
    detectors.engine._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="detectors.engine"):
        Engine(ctx, DetectionConfig(model_registry=str(root)))
        assert caplog.records == []
        Engine(ctx, DetectionConfig(model_registry=str(root), shift_grace_s=0))
        Engine(ctx, DetectionConfig(model_registry=str(root), shift_grace_s=0))
    (record,) = caplog.records
    assert "trained with 1800 s" in record.getMessage()
    assert "shift_grace_s is 0 s" in record.getMessage()


# ------------------------------------------------------------------ engine integration
def _run(
    ctx: Context, events: list, cfg: DetectionConfig | None = None, end_t: float | None = None
) -> list[dict]:
    eng = Engine(ctx, cfg)
    return [a.to_dict() for a in collapse(run_engine(eng, events, end_t).values())]


def test_every_alert_records_the_model_versions(ctx: Context, events: list) -> None:
    alerts = _run(ctx, events)
    assert alerts
    promoted = ModelRegistry(DEFAULT_REGISTRY).promoted()
    assert all(a["model_versions"] == promoted for a in alerts)
    assert all(
        a["model_versions"] == {} for a in _run(ctx, events, DetectionConfig(model_registry="none"))
    )


def test_learned_findings_say_why_in_plain_words(ctx: Context, events: list) -> None:
    cfg = DetectionConfig(model_min_level=1.5, model_weight=1.0)
    learned = [a for a in _run(ctx, events, cfg) if LEARNED_RULE_ID in a["detector"]]
    assert learned
    for a in learned:
        f = next(f for f in a["findings"] if f["rule"] == LEARNED_RULE_ID)
        assert "rare for this user and for" in f["reason"]
        assert "ordinary visits" in f["reason"]
        assert any(words in f["reason"] for words in FEATURES.values())


#: learned evidence at a low bar: many visits become evidence, so how they close matters
_EAGER = DetectionConfig(model_min_level=1.5, model_weight=1.0)


@pytest.mark.parametrize("cfg", [None, _EAGER], ids=["default", "eager"])
@pytest.mark.parametrize("parts", [2, 0], ids=["2-partitions", "engine-per-user"])
def test_partitioned_engines_equal_one_engine(
    ctx: Context, events: list, cfg: DetectionConfig | None, parts: int
) -> None:
    """Each partition's watermark closes idle visits at different moments (with an engine
    per user, only the user's own next access does): the alerts are the same."""
    one = _run(ctx, events, cfg)
    if parts:
        groups = [[e for e in events if partition_of(e.user_id, parts) == p] for p in range(parts)]
    else:
        by_user: dict[str, list] = {}
        for e in events:
            by_user.setdefault(e.user_id, []).append(e)
        groups = list(by_user.values())
    split: list[dict] = []
    for mine in groups:  # each partition's watermark ends where the input ends
        split += _run(ctx, mine, cfg, end_t=events[-1].t)
    key = lambda a: (a["first_seen"], a["alert_id"])  # noqa: E731
    assert sorted(split, key=key) == sorted(one, key=key)
    if cfg is _EAGER:
        assert any(LEARNED_RULE_ID in a["detector"] for a in one)


def _hourly_batches(events: list) -> list:
    """``events`` as a log written one workstation's hour at a time."""
    return [
        e
        for _, _, e in sorted(
            ((int(e.t // 3600), e.workstation), i, e) for i, e in enumerate(events)
        )
    ]


def test_a_log_in_hourly_batches_keeps_its_visits_whole(ctx: Context, events: list) -> None:
    """Each workstation's hour written at once: the event time runs up to an hour ahead of a
    user's next accesses. With the lateness fixed at 10 min the models cut hundreds of
    visits in two; widened to the delays it measures (detectors.lateness), the visits are
    the log in order's, but for those of the first hour and a user switching workstations."""
    from collections import Counter

    bundle = load_bundle(ModelRegistry(DEFAULT_REGISTRY))
    batched = _hourly_batches(events)
    assert batched != events

    def visits(evs: list, cfg: DetectionConfig) -> tuple[Counter, float]:
        got: Counter = Counter()

        def rec(vs: VisitScore) -> None:
            got[(vs.user_id, vs.visit.patient_id, vs.visit.t0, vs.visit.n)] += 1

        eng = Engine(ctx, cfg, models=ModelScorer(ctx, bundle, recorder=rec))
        for e in evs:
            eng.ingest(e)
        eng.sweep_to(events[-1].t)
        eng.drain()
        eng.flush()
        return got, eng.stats().late_allowance

    cfg = DetectionConfig()
    fixed = replace(cfg, late_allowance_max_s=cfg.model_visit_lateness_s)
    ordered, wait = visits(events, cfg)
    adaptive, widened = visits(batched, cfg)
    cut, fixed_wait = visits(batched, fixed)
    assert wait == 0.0 and fixed_wait == 0.0  # in order, or fixed: never widened
    assert widened == 3600.0
    total = sum(ordered.values())
    differ, differ_fixed = sum((ordered - adaptive).values()), sum((ordered - cut).values())
    assert differ < 0.01 * total
    assert differ_fixed > 0.02 * total and differ * 4 < differ_fixed


def test_a_visit_is_scored_when_the_watermark_passes_it(ctx: Context, events: list) -> None:
    """A user who reads a chart and leaves is scored once the partition's event time is the
    visit gap plus the lateness past their last access, not at their next access."""
    from models.runtime import ModelBundle

    sur = _FixedSurprise()
    sur.level = 5.0  # every visit is as unusual as can be: each one is learned evidence
    bundle = ModelBundle(surprise=sur, calibration={"*": _Identity()})  # type: ignore[arg-type]
    cfg = replace(_EAGER, model_explained_only=False)
    by_user: dict[str, list] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    # a user's last access before a pause of 2 h or more, with others busy meanwhile, after
    # the first hour (while the late allowance learns the input's delays it waits its cap)
    learned = events[0].t + LEARN_S
    pauses = [
        (a, b)
        for evs in by_user.values()
        for a, b in zip(evs, evs[1:], strict=False)
        if b.t - a.t > 7200 and a.patient_id and a.t > learned
    ]
    assert pauses
    last, nxt = min(pauses, key=lambda ab: ab[0].t)
    uid = last.user_id
    due = last.t + VISIT_GAP_S + cfg.model_visit_lateness_s
    eng = Engine(ctx, cfg, models=ModelScorer(ctx, bundle))
    seen: set[str] = set()
    reasons: list[str] = []
    checked = False
    for e in events:
        if e.t > due + 600:
            break
        if e.t > due - 60 and not checked:
            # just before the visit is due: still open, not learned evidence anywhere yet
            assert last.patient_id in eng.users[uid].models.behaviour.open
            assert last.event_id not in seen
            checked = True
        eng.ingest(e)
        for a in eng.drain():
            d = a.to_dict()
            seen.update(ev["event_id"] for ev in d["evidence"] if LEARNED_RULE_ID in ev["rules"])
            reasons += [f["reason"] for f in d["findings"] if f["rule"] == LEARNED_RULE_ID]
    assert checked and nxt.t > due + 600  # the user did not come back in between
    assert last.patient_id not in eng.users[uid].models.behaviour.open  # the visit closed
    assert last.event_id in seen  # and it is learned evidence in an alert already
    # level 5 lies beyond what the calibration's 10,000 visits can tell: the reason says so
    assert reasons
    assert all(
        "rarer than any of the 10,000 ordinary visits the models were calibrated on; "
        "extrapolated, about 1 in 100,000" in r
        for r in reasons
    )


@pytest.mark.parametrize("batched", [False, True], ids=["in-order", "hourly-batches"])
def test_snapshot_restore_keeps_model_state(ctx: Context, events: list, batched: bool) -> None:
    """Crash half-way, restore from the JSON snapshot, go on: same alerts as no crash. In
    hourly batches that takes the partition's clock and late allowance with it (a restored
    engine waiting 10 min again would cut visits) and the windows' older accesses."""
    cfg = DetectionConfig(model_min_level=1.5, model_weight=1.0)
    if batched:
        events = _hourly_batches(events)
    half = len(events) // 2
    whole = Engine(ctx, cfg)
    want = run_engine(whole, events)
    first = Engine(ctx, cfg)
    got = {}
    for i, e in enumerate(events[:half], 1):  # no flush: the worker dies mid-stream
        first.ingest(e)
        if i % 1000 == 0:
            got.update({a.alert_id: a for a in first.drain()})
    got.update({a.alert_id: a for a in first.drain()})
    snap = first.snapshot()
    doc = orjson.loads(snap)  # JSON, not pickle
    assert any(u.get("models") for u in doc["users"].values())
    assert (doc["clock"]["late"]["allowance"] == 3600.0) is batched
    second = Engine.restore(ctx, cfg, snap)
    assert second.late_allowance == first.late_allowance and second.watermark == first.watermark
    got.update(run_engine(second, events[half:]))
    assert [a.to_dict() for a in collapse(got.values())] == [
        a.to_dict() for a in collapse(want.values())
    ]


def test_hot_reload_of_a_newly_promoted_model(ctx: Context, events: list, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    shutil.copytree(DEFAULT_REGISTRY, root)
    reg = ModelRegistry(root)
    cfg = DetectionConfig(model_registry=str(root), model_reload_s=0.0)
    eng = Engine(ctx, cfg)
    third = len(events) // 3
    run_engine(eng, events[:third])
    assert eng.models is not None and eng.models.versions == reg.promoted()
    # a data scientist registers and promotes a new visit model (here: the same artifact)
    old = reg.promoted()["visits"]
    new = reg.register(
        "visits",
        {"visits.json": reg.read("visits", old, "visits.json")},
        {**reg.metadata("visits", old), "created": "2026-11-27T00:00:00+00:00"},
    )
    reg.promote("visits", new)
    alerts = run_engine(eng, events[third:])
    assert eng.models.reloads == 1
    assert eng.models.versions["visits"] == new
    changed = [a for a in alerts.values() if a.model_versions]
    assert changed and all(a.model_versions["visits"] == new for a in changed)


def test_a_broken_promotion_keeps_the_running_models(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    shutil.copytree(DEFAULT_REGISTRY, root)
    scorer = ModelScorer.from_registry(ctx, str(root))
    assert scorer is not None
    before = dict(scorer.versions)
    (root / "PROMOTED.json").write_bytes(b'{"visits": "v9999"}')
    assert not scorer.maybe_reload(0.0)
    assert scorer.versions == before


def test_models_can_be_switched_off(ctx: Context, events: list) -> None:
    eng = Engine(ctx, replace(DetectionConfig(), model_registry="none"))
    assert eng.models is None
    run_engine(eng, events[:500])
    assert all(st.models is None for st in eng.users.values())


# ------------------------------------------------------------------ peer fade
class _FixedSurprise:
    """A population model that finds every visit as unusual as it is told to."""

    def __init__(self) -> None:
        self.level = 0.0

    def table(self, key: str) -> str:
        return key

    def score_table(self, table: str, x: dict[str, float]) -> tuple[float, dict[str, float]]:
        return self.level, {}


class _Identity:
    """A calibration whose own scores tell levels up to 4 (10,000 ordinary visits)."""

    n = 10_000
    data_level = 4.0

    def level(self, raw: float) -> float:
        return raw


def _fade_scorer() -> tuple[ModelScorer, _FixedSurprise]:
    from models.runtime import ModelBundle

    sur = _FixedSurprise()
    bundle = ModelBundle(surprise=sur, calibration={"*": _Identity()})  # type: ignore[arg-type]
    return ModelScorer(Context(), bundle), sur


def _visit(pid: str, t: float, explained: bool = True) -> Visit:
    v = Visit(pid, t, "WS1", "", "")
    v.n = 1
    v.unexplained = 0 if explained else 1
    return v


def test_peer_fade_spares_a_first_day_burst_and_survives_a_snapshot() -> None:
    """The peers' level of a user's everyday unusual visits fades from the next local day
    on (by log10(1 + k)); the same day's visits keep their level; the count is user state."""
    scorer, sur = _fade_scorer()
    um = scorer.new_user()
    sur.level = 3.5
    day0 = 20_000 * 86400.0 + 12 * 3600  # noon, local day 20000 (UTC here)
    burst = [scorer.score_visit("U1", um, _visit(f"P{i}", day0 + 60 * i)) for i in range(10)]
    assert [vs.peer_level for vs in burst] == [3.5] * 10  # a first-day burst is untouched
    # an unexplained visit neither fades nor counts
    un = scorer.score_visit("U1", um, _visit("PX", day0 + 86400, explained=False))
    assert un.peer_level == 3.5
    # snapshot/restore between days: the count goes with the user
    back = scorer.restore_user(orjson.loads(orjson.dumps(um.to_obj())))
    nxt = scorer.score_visit("U1", back, _visit("PY", day0 + 86400 + 60))
    assert nxt.peer_level == pytest.approx(3.5 - math.log10(11))
    fresh = scorer.new_user()
    assert scorer.score_visit("U2", fresh, _visit("PY", day0 + 86400)).peer_level == 3.5
    # a snapshot from before the fade restores as no fade
    old = um.to_obj()
    del old["fade"]
    assert scorer.restore_user(old).fade_k == 0


def test_a_late_visit_takes_its_place_in_the_users_last_hour() -> None:
    from models.features import HOUR, UserBehaviour

    def fed(starts: list[float]) -> UserBehaviour:
        b = UserBehaviour()
        for t in starts:
            b.roll(t, f"c{int(t) % 3}")
        return b

    h = 10 * HOUR  # visits at 08:00, then 10:05 … 10:50
    in_order = [h - 2 * HOUR, h + 300, h + 900, h + 1800, h + 2400, h + 3000]
    late = fed([h - 2 * HOUR, h + 300, h + 1800, h + 3000, h + 900, h + 2400])
    ordered = fed(in_order)
    assert list(late.recent) == list(ordered.recent)
    assert late.recent_comms == ordered.recent_comms
    assert (late.hour, late.hour_count, late.hourly) == (
        ordered.hour,
        ordered.hour_count,
        ordered.hourly,
    )
    # a visit of an hour already settled (09:55) counts in the last hour's visits, not in the
    # hourly rate; one older than the last hour (09:30) counts nowhere
    late.roll(h - 300, "c9")
    assert late.recent[0] == (h - 300, "c9") and late.recent_comms["c9"] == 1
    assert (late.hour, late.hour_count, late.hourly) == (
        ordered.hour,
        ordered.hour_count,
        ordered.hourly,
    )
    before = (list(late.recent), dict(late.recent_comms))
    late.roll(h - 1800, "c8")
    assert (list(late.recent), dict(late.recent_comms)) == before
