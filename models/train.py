"""Offline training: replay labelled history, fit the models, register and promote them.

``python -m models.train --data DIR [DIR ...] --registry models/registry``

Three replays of the same history through the real engine (so features are computed by
exactly the code that runs live):

1. no models → visit table → care communities and peer baselines (:mod:`models.community`);
2. with those priors → visit features → population histograms and their calibration
   (:mod:`models.population`), fitted on *unlabelled* visits only (history the analysts did
   not mark as misuse), and the calibration of the users' own HalfSpaceTrees scores;
3. with the visit models → every case the engine builds, with its verdict (does it hold a
   labelled access?) → the verdict classifier and an IsolationForest over case features
   (:mod:`models.batch`).

Labels of :data:`UNSEEN_SCENARIOS` are withheld from the verdict classifier: analysts have
never seen that kind of misuse, so the classifier must not have either.

The labels come from each directory's ``labels.csv`` (simulated or hand-labelled history)
or, with ``--verdicts URL``, from the analysts' verdicts in the alert store
(:mod:`models.verdicts`): the feedback loop of a hospital that has no labels but triages
its alerts. Accesses in alerts nobody has decided yet count as neither misuse nor benign.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from detectors.config import DetectionConfig, TimezoneError
from detectors.engine import Engine
from emrwatch.context import Context
from models.batch import CASE_FEATURE_NAMES, VERDICTS_C, fit_isolation, fit_verdicts
from models.community import learn_communities, learn_priors
from models.features import FEATURE_NAMES, FEATURES
from models.population import HistogramSurprise, TailCalibration
from models.registry import ModelRegistry, data_hash, skops_bytes
from models.runtime import (
    BehaviourParams,
    ModelBundle,
    ModelScorer,
    VisitScore,
    visits_artifact,
)
from models.verdicts import Verdicts, load_or_exit

#: misuse no rule names and no analyst has labelled: kept out of the verdict classifier
UNSEEN_SCENARIOS = frozenset({"explained_browsing"})
#: what the population histograms look at. A single refused access or print is everyday
#: noise in a visit (rules judge bursts of them), so they stay with the per-user model.
SURPRISE_FEATURES = tuple(f for f in FEATURE_NAMES if f not in ("denied", "exfiltration"))


def _labels(data: Path) -> dict[str, tuple[str, str]]:
    with (data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return {r["event_id"]: (r["scenario"], r["user_id"]) for r in csv.DictReader(fh)}


def _events(data: Path, eng: Engine) -> Iterable[Any]:
    """``data``'s accesses in file order, as replay gives them to ``eng``: an access stamped
    far ahead of the file around it is judged at the file's time (pipeline.file_clock)."""
    from connectors.readers import read_events
    from pipeline.evaluate import find_events_file
    from pipeline.file_clock import file_clock

    items = read_events(find_events_file(data), "auto")
    events = (item for _, item, _ in items if not isinstance(item, Exception))
    return file_clock(events, eng.cfg.replay_clock_ahead_s, eng)


def _labels_of(data: Path, verdicts: Verdicts | None) -> dict[str, tuple[str, str]]:
    return verdicts.labels() if verdicts is not None else _labels(data)


def replay_visits(
    data: Path,
    bundle: ModelBundle,
    config: DetectionConfig | None = None,
    verdicts: Verdicts | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Replay ``data`` with ``bundle``; returns (visit rows, access-kind counts). A visit's
    ``label`` is the scenario of a labelled access in it; ``undecided`` says it holds an
    access of an alert no analyst has decided (only with ``verdicts``)."""
    labels = _labels_of(data, verdicts)
    undecided = verdicts.undecided if verdicts is not None else set()
    ctx = Context.load(data, (config or DetectionConfig()).timezone)
    rows: list[dict[str, Any]] = []
    users: dict[str, Any] = {}

    def record(vs: VisitScore) -> None:
        v = vs.visit
        label = next((labels[ev[0]][0] for ev in v.evidence if ev[0] in labels), "")
        um = users[vs.user_id]
        rows.append(
            {
                "user_id": vs.user_id,
                "group": um.group,
                "role": um.key.partition("@")[0],
                "key": um.key,
                "t0": v.t0,
                "patient_id": v.patient_id,
                "department": v.department,
                "n": v.n,
                "wrote": int(v.writes > 0),
                "explained": vs.explained,
                "label": label,
                "undecided": bool(undecided) and any(ev[0] in undecided for ev in v.evidence),
                "peer_level": vs.peer_level,
                "own_level": vs.own_level,
                "hst": vs.hst,
                "warm": not um.hst.first_window,
                "level": vs.level,
                **vs.features,
            }
        )

    scorer = ModelScorer(ctx, bundle, recorder=record)
    cfg = replace(config or DetectionConfig(), model_registry="none")
    eng = Engine(ctx, cfg, models=scorer)
    kinds: dict[tuple[str, str, str], int] = {}
    for e in _events(data, eng):
        eng.ingest(e)
        um = eng.users[e.user_id].models
        if um is not None:
            users[e.user_id] = um
            k = (um.group, um.key.partition("@")[0], f"{e.resource_type}.{e.action}")
            kinds[k] = kinds.get(k, 0) + 1
    eng.drain()
    eng.flush()
    accesses = [{"group": g, "role": r, "kind": k, "n": n} for (g, r, k), n in kinds.items()]
    return rows, accesses


class _Unscored:
    """A case model that is never asked: with it the engine records the levels of every visit
    of a case's patients (``Case.seen_levels``, which ``max_level`` and ``mean_level`` are
    made of) exactly as it does live, while fusion, off in training, scores nothing."""

    kind = "verdicts"
    features = CASE_FEATURE_NAMES

    def score(self, rows: Any) -> list[float]:  # pragma: no cover - fusion is off
        raise AssertionError("the training replay runs without fusion")


def replay_cases(
    data: Path,
    bundle: ModelBundle,
    config: DetectionConfig | None = None,
    verdicts: Verdicts | None = None,
) -> list[dict[str, Any]]:
    """Every case the engine builds on ``data`` (last version), with features, verdict and
    ``reviewed``: whether the case model would have scored it live at some point (the risk
    it scales straddled the threshold, see ``Case.undecided``). With ``verdicts`` the
    verdict is the analysts' (:meth:`Verdicts.case_verdict`; ``None``: not decided yet)."""
    labels = _labels_of(data, verdicts)
    ctx = Context.load(data, (config or DetectionConfig()).timezone)
    cfg = replace(config or DetectionConfig(), model_registry="none", model_fusion=False)
    live = replace(cfg, model_fusion=True)
    eng = Engine(ctx, cfg, models=ModelScorer(ctx, replace(bundle, case_model=_Unscored())))  # type: ignore[arg-type]
    final: dict[str, tuple[dict[str, float], set[str]]] = {}
    reviewed: set[str] = set()

    def capture() -> None:
        for _, case in eng._dirty.values():
            ids = {k for b in case.evidence.values() for k in b}
            final[case.alert_id] = (case.features(eng.rule_by_id, cfg), ids)
            if case.undecided(eng.rule_by_id, live):
                reviewed.add(case.alert_id)

    for i, e in enumerate(_events(data, eng), 1):
        eng.ingest(e)
        if i % 500 == 0:
            capture()
            eng.drain()
    capture()
    eng.drain()
    models = eng.models
    assert models is not None
    for u in sorted(eng.users):
        st = eng.users[u]
        if st.models is not None:
            case = st.case
            for vs in models.close_all(u, st.models):
                case = eng._learned(st, u, vs, case, vs.visit.last_t)
    capture()
    out = []
    for aid, (feats, ids) in final.items():
        scn = {labels[i][0] for i in ids if i in labels}
        out.append(
            {
                "alert_id": aid,
                **feats,
                "scenarios": sorted(scn),
                "verdict": verdicts.case_verdict(ids) if verdicts else int(bool(scn)),
                "reviewed": aid in reviewed,
            }
        )
    return out


class TrainingError(ValueError):
    """The history cannot train a model (say, no confirmed misuse in it)."""


def _fit_population(
    visits: list[dict[str, Any]], term_cap: float = 8.0
) -> tuple[HistogramSurprise, dict[str, TailCalibration], TailCalibration]:
    ordinary = [r for r in visits if not r["label"] and not r["undecided"]]
    keys = [f"{r['key']}|{'e' if r['explained'] else 'u'}" for r in ordinary]
    rows = [{f: r[f] for f in SURPRISE_FEATURES} for r in ordinary]
    hbos = HistogramSurprise.fit(rows, keys, SURPRISE_FEATURES, min_rows=300, term_cap=term_cap)
    by_key: dict[str, list[float]] = {}
    for k, x in zip(keys, rows, strict=True):
        raw, _ = hbos.score(k, x)
        by_key.setdefault(k, []).append(raw)
        by_key.setdefault("*", []).append(raw)
    cal = {k: TailCalibration.fit(v) for k, v in by_key.items() if len(v) >= 300 or k == "*"}
    # the trees score only the visits the cascade passes them (hst > 0): calibrate on those
    hst = TailCalibration.fit([r["hst"] for r in ordinary if r["warm"] and r["hst"] > 0] or [0.0])
    return hbos, cal, hst


def train(
    data_dirs: list[Path],
    registry: ModelRegistry,
    promote: bool = True,
    config: DetectionConfig | None = None,
    log: Callable[[str], None] = print,
    behaviour: BehaviourParams | None = None,
    verdicts: Verdicts | None = None,
) -> dict[str, str]:
    """Fit everything on ``data_dirs``; register (and promote) ``visits`` and ``cases``.
    Labels: each directory's ``labels.csv``, or the analysts' ``verdicts``."""
    import pandas as pd

    params = behaviour or BehaviourParams()
    meta_common = _provenance(data_dirs, verdicts, config)
    # 1. priors
    visits: list[dict[str, Any]] = []
    accesses: list[dict[str, Any]] = []
    for d in data_dirs:
        v, a = replay_visits(d, ModelBundle(behaviour=params), config, verdicts)
        for r in v:
            r["user_id"] = f"{d.name}:{r['user_id']}"
        visits += v
        accesses += a
        log(f"pass 1 {d}: {len(v)} visits")
    vdf = pd.DataFrame(visits)
    communities = learn_communities(vdf)
    priors = learn_priors(vdf, pd.DataFrame(accesses), communities)
    # the training users are not the users the models will see: keep their communities out
    priors.user_community = {}
    bundle = ModelBundle(priors=priors, behaviour=params)
    # 2. population models
    visits = []
    for d in data_dirs:
        v, _ = replay_visits(d, bundle, config, verdicts)
        visits += v
        log(f"pass 2 {d}: {len(v)} visits")
    hbos, cal, hst_cal = _fit_population(visits)
    bundle = replace(bundle, surprise=hbos, calibration=cal, hst_calibration=hst_cal)
    ordinary = [r for r in visits if not r["label"] and not r["undecided"]]
    visit_metrics = {
        "visits": len(visits),
        "ordinary_visits": len(ordinary),
        "misuse_visits": sum(1 for r in visits if r["label"]),
        "undecided_visits": sum(1 for r in visits if r["undecided"] and not r["label"]),
        "communities": len(set(communities["department_community"].values())),
    }
    artifact = orjson.dumps(visits_artifact(bundle), option=orjson.OPT_SORT_KEYS)
    v_version = registry.register(
        "visits",
        {"visits.json": artifact},
        {
            **meta_common,
            "kind": "visit models: peer baselines, care communities, population histograms, "
            "HalfSpaceTrees settings and calibrations",
            "features": {k: FEATURES[k] for k in FEATURE_NAMES},
            "behaviour": params.to_obj(),
            "metrics": visit_metrics,
        },
    )
    log(f"registered visits {v_version}")
    # 3. case models
    out = train_cases(
        data_dirs, registry, bundle, v_version, False, config, log, meta_common, verdicts
    )
    if promote:
        registry.promote("visits", v_version)
        registry.promote("cases", out["cases"])
    return {"visits": v_version, **out}


def _provenance(
    data_dirs: list[Path], verdicts: Verdicts | None = None, config: DetectionConfig | None = None
) -> dict[str, Any]:
    hashes = []
    windows = []
    seeds: list[Any] = []
    for d in data_dirs:
        ev_file = next(p for p in sorted(d.iterdir()) if p.name.startswith("events."))
        hashes.append(ev_file.read_bytes())
        man = d / "manifest.json"
        if man.exists():
            m = orjson.loads(man.read_bytes())
            windows.append({"data": d.name, **m.get("summary", {}).get("period", {})})
            seed = m.get("parameters", {}).get("seed")
            if seed is not None:
                seeds.append(seed)
    out: dict[str, Any] = {
        "training_data": windows,
        "data_hash": data_hash(*hashes),
        # the settings that shape the features: a run with others gets a warning
        "detection": {"shift_grace_s": (config or DetectionConfig()).shift_grace_s},
        "labels": verdicts.describe()
        if verdicts is not None
        else {"source": "labels.csv of each training directory"},
    }
    if seeds:
        out["training_seeds"] = seeds
    return out


def train_cases(
    data_dirs: list[Path],
    registry: ModelRegistry,
    bundle: ModelBundle,
    visits_version: str,
    promote: bool = True,
    config: DetectionConfig | None = None,
    log: Callable[[str], None] = print,
    meta_common: dict[str, Any] | None = None,
    verdicts: Verdicts | None = None,
) -> dict[str, str]:
    """Fit the case models on the cases the engine builds on ``data_dirs`` with the visit
    models of ``bundle``; register (and promote) them.

    The verdict classifier is fitted on the cases it will judge: those whose fate it can
    change live (``reviewed``). Fitted on every case, it learns mostly from thousands of
    single-access cases no threshold ever looks at, and what it says about the few with
    several patients in a care gap (the cases it does judge) is an extrapolation; those
    cases, benign or not, got P(misuse) ≈ 0.8 and fusion raised benign ones over the
    threshold.

    With analysts' ``verdicts``, a case that shares an access with an alert nobody has
    decided is left out of the classifier (the unsupervised IsolationForest still sees it)."""
    meta = {
        **(meta_common or _provenance(data_dirs, verdicts, config)),
        "visits_version": visits_version,
    }
    cases: list[dict[str, Any]] = []
    for d in data_dirs:
        c = replay_cases(d, bundle, config, verdicts)
        cases += c
        log(f"pass 3 {d}: {len(c)} cases, {sum(x['reviewed'] for x in c)} reviewed")
    usable = [
        c
        for c in cases
        if c["verdict"] is not None
        and not (set(c["scenarios"]) and set(c["scenarios"]) <= UNSEEN_SCENARIOS)
    ]
    seen = [c for c in usable if c["reviewed"]]
    chosen = (
        "reviewed: cases whose risk the case model scales (rule risk, "
        "and a lone learned visit's in a mixed case) straddled the threshold"
    )
    if len({c["verdict"] for c in seen}) < 2:  # a small history: too few cases to judge by
        log(f"only {len(seen)} reviewed case(s), not both verdicts: fitting on every case")
        seen, chosen = usable, "all (too few reviewed cases with both verdicts)"
    rows = [{f: c[f] for f in CASE_FEATURE_NAMES} for c in seen]
    y = [c["verdict"] for c in seen]
    if len(set(y)) < 2:
        kind = "misuse" if not any(y) else "benign"
        raise TrainingError(
            f"no {kind} case among the {len(y)} labelled case(s) of this history: a verdict "
            "classifier needs both (decided cases only count with --verdicts)"
        )
    clf = fit_verdicts(rows, y, random_state=0)
    iso = fit_isolation([{f: c[f] for f in CASE_FEATURE_NAMES} for c in cases], random_state=0)
    case_metrics = _case_metrics(rows, y)
    c_version = registry.register(
        "cases",
        {"model.skops": skops_bytes(clf)},
        {
            **meta,
            "kind": "verdicts",
            "estimator": f"StandardScaler + LogisticRegression(C={VERDICTS_C}, "
            "class_weight=balanced)",
            "features": list(CASE_FEATURE_NAMES),
            "training_cases": chosen,
            "withheld_scenarios": sorted(UNSEEN_SCENARIOS),
            "metrics": {
                **case_metrics,
                "all_cases": len(cases),
                "cases": len(seen),
                "misuse_cases": int(sum(y)),
                "undecided_cases": sum(1 for c in cases if c["verdict"] is None),
            },
        },
    )
    i_version = registry.register(
        "cases",
        {"model.skops": skops_bytes(iso)},
        {
            **meta,
            "kind": "isolation",
            "estimator": "IsolationForest(n_estimators=50, max_samples=128)",
            "features": list(CASE_FEATURE_NAMES),
            "metrics": {"cases": len(cases)},
        },
    )
    log(f"registered cases {c_version} (verdicts), {i_version} (isolation)")
    if promote:
        registry.promote("cases", c_version)
    return {"cases": c_version, "cases_isolation": i_version}


def _case_metrics(rows: list[dict[str, float]], y: list[int]) -> dict[str, float]:
    """5-fold cross-validated ROC AUC and average precision of the verdict classifier."""
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    if len(set(y)) < 2 or min(sum(y), len(y) - sum(y)) < 5:
        return {}
    x = np.array([[r[f] for f in CASE_FEATURE_NAMES] for r in rows])
    yy = np.array(y)
    pred = np.zeros(len(yy))
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=0).split(x, yy):
        m = fit_verdicts([rows[i] for i in tr], [y[i] for i in tr])
        pred[te] = m.predict_proba(x[te])[:, 1]
    return {
        "cv_roc_auc": round(float(roc_auc_score(yy, pred)), 4),
        "cv_average_precision": round(float(average_precision_score(yy, pred)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="history: events and context CSVs, with labels.csv unless --verdicts is given",
    )
    p.add_argument(
        "--verdicts",
        metavar="STORE_URL",
        help="label the history with the analysts' verdicts in this alert store "
        "(sqlite:///… or postgresql://…) instead of labels.csv",
    )
    p.add_argument(
        "--verdicts-since",
        metavar="DATE",
        help="only verdicts decided at or after this (YYYY-MM-DD or ISO timestamp)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="detection configuration (YAML): the margins and timezone the engine replays with",
    )
    p.add_argument(
        "--timezone",
        default=None,
        help="hospital timezone for shifts and local days (default: the config's, else the "
        "one the directories' manifest.json records, else Asia/Shanghai)",
    )
    p.add_argument("--registry", default=None, help="default: the registry shipped in models/")
    p.add_argument("--no-promote", action="store_true")
    p.add_argument(
        "--cases-only",
        action="store_true",
        help="refit only the case models, on top of the promoted visit models",
    )
    a = p.parse_args(argv)
    from models.registry import DEFAULT_REGISTRY

    reg = ModelRegistry(a.registry or DEFAULT_REGISTRY)
    dirs = [Path(d) for d in a.data]
    verdicts = None
    if a.verdicts:
        verdicts = load_or_exit(p, a.verdicts, a.verdicts_since, "--verdicts-since")
        d = verdicts.describe()
        print(
            f"labels: {d['confirmed_alerts']} confirmed and {d['benign_alerts']} benign "
            f"alert(s); {d['undecided_events']} access(es) in undecided alerts left out",
            file=sys.stderr,
        )
    elif a.verdicts_since:
        p.error("--verdicts-since needs --verdicts")
    else:
        missing = [str(d) for d in dirs if not (d / "labels.csv").is_file()]
        if missing:
            p.error(f"no labels.csv in {', '.join(missing)}: give one, or --verdicts STORE_URL")
    config = _config(p, a.config, a.timezone, dirs)
    try:
        out = _run(a, p, reg, dirs, verdicts, config)
    except TrainingError as exc:
        print(f"python -m models.train: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


def _config(
    p: argparse.ArgumentParser, path: str | None, timezone: str | None, dirs: list[Path]
) -> DetectionConfig:
    """The config to replay the history with. Shift and local-day features are only right in
    the hospital's own timezone: ``--timezone``, else the config file's, else the one the
    directories record (they must agree), else the default."""
    try:
        cfg, recorded = DetectionConfig.load_for(path, timezone, dirs)
    except TimezoneError as exc:
        p.error(f"{exc}; give --timezone")
    except (OSError, ValueError) as exc:
        p.error(f"--config: {exc}")
    if recorded is not None:
        _log(f"timezone {recorded}, as the directories' manifest.json records")
    return cfg


def _log(msg: str) -> None:
    """Progress goes to standard error: standard output is the JSON of the versions."""
    print(msg, file=sys.stderr)


def _run(
    a: argparse.Namespace,
    p: argparse.ArgumentParser,
    reg: ModelRegistry,
    dirs: list[Path],
    verdicts: Verdicts | None,
    config: DetectionConfig | None = None,
) -> dict[str, str]:
    from models.runtime import load_bundle

    if a.cases_only:
        bundle = load_bundle(reg)
        if bundle is None:
            p.error("--cases-only: the registry promotes no visits model")
        out = train_cases(
            dirs,
            reg,
            bundle,
            bundle.versions["visits"],
            not a.no_promote,
            config,
            log=_log,
            verdicts=verdicts,
        )
    else:
        out = train(dirs, reg, promote=not a.no_promote, config=config, log=_log, verdicts=verdicts)
    return out


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
