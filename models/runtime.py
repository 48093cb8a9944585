"""The models as the engine runs them: per-user state, visits, scores, attributions.

:class:`ModelScorer` is the engine's one handle on the learned models. Per access it does a
few dict updates (the user's open visits). When a visit closes it computes the visit's
features and scores them twice:

- against the user's *peers*: a histogram outlier score (:mod:`models.population`) fitted
  offline per role and department kind, separately for explained and unexplained visits;
- against the user's *own* history: the user's HalfSpaceTrees (:mod:`models.online`),
  learned online behind a quantile gate.

Both are calibrated to a *level*: −log10 of the share of ordinary visits that score as
high (level 3: one ordinary visit in a thousand). The visit's level is the higher of the two,
and its attribution names the features that drove it.

Everything kept here is per user (:class:`UserModels`, JSON inside the engine's snapshot).
What is learned across users comes from the registry as a :class:`ModelBundle`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emrwatch.context import Context
from emrwatch.events import AccessEvent
from models.batch import CaseScorer
from models.community import priors_from_obj
from models.features import (
    FEATURE_NAMES,
    MAX_OPEN_VISITS,
    VISIT_GAP_S,
    Priors,
    UserBehaviour,
    Visit,
    features_against,
    patient_department,
    peer_key,
)
from models.online import HSTState, QuantileGate, SharedHalfSpaceTrees
from models.population import HistogramSurprise, TailCalibration
from models.registry import DEFAULT_REGISTRY, ModelRegistry, RegistryError

#: the registry entries an engine runs (each optional but ``visits``)
MODEL_NAMES = ("visits", "cases")
_NONE: list[Any] = []  # observe() closed no visit (never appended to)
_NO_TERMS: dict[str, float] = {}
#: peer fade: an explained visit the peers find at least this unusual counts toward the
#: user's routine; from the next local day on it takes ``log10(1 + k)`` off the peer level
FADE_LEVEL = 3.0
#: own-model evidence is one-sided: a visit the user's trees find at least this unusual is
#: scored again with every feature below the user's usual value raised to it, and keeps the
#: lower level. A visit that departs from the user's routine only by being *more* ordinary
#: (a known patient after a burst of new ones, an explained access after unexplained ones:
#: the trees learned the user's state during a misuse burst) is no evidence against them.
ONE_SIDED_LEVEL = 1.5


@dataclass
class BehaviourParams:
    """Settings of the per-user behaviour model (stored with the model in the registry)."""

    n_trees: int = 6
    height: int = 6
    window_size: int = 32
    seed: int = 42
    gate_q: float = 0.95
    #: cascade: the user's trees score a visit only when the population model finds it at
    #: least this unusual, or it is unexplained (the trees cost more than everything else)
    cascade_level: float = 0.75
    #: the trees learn every ``learn_every``-th ordinary visit (a window spans that many
    #: times ``window_size`` visits)
    learn_every: int = 4

    def to_obj(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> BehaviourParams:
        return cls(**{k: v for k, v in o.items() if k in cls.__dataclass_fields__})


@dataclass
class ModelBundle:
    """The promoted models, as loaded from the registry."""

    priors: Priors = field(default_factory=Priors.empty)
    behaviour: BehaviourParams = field(default_factory=BehaviourParams)
    surprise: HistogramSurprise | None = None
    calibration: dict[str, TailCalibration] = field(default_factory=dict)
    hst_calibration: TailCalibration | None = None
    case_model: CaseScorer | None = None
    versions: dict[str, str] = field(default_factory=dict)
    #: the detection settings the visit models were trained with (their metadata's
    #: ``detection``): features such as ``off_shift`` mean what these made them mean
    detection: dict[str, Any] = field(default_factory=dict)


def visits_artifact(bundle: ModelBundle) -> dict[str, Any]:
    """The JSON artifact of the visit models (everything but the case model)."""
    return {
        "priors": _priors_obj(bundle.priors),
        "behaviour": bundle.behaviour.to_obj(),
        "surprise": bundle.surprise.to_obj() if bundle.surprise else None,
        "calibration": {k: c.to_obj() for k, c in sorted(bundle.calibration.items())},
        "hst_calibration": bundle.hst_calibration.to_obj() if bundle.hst_calibration else None,
    }


def _priors_obj(p: Priors) -> dict[str, Any]:
    from models.community import priors_to_obj

    return priors_to_obj(p)


def bundle_from_artifact(o: dict[str, Any]) -> ModelBundle:
    return ModelBundle(
        priors=priors_from_obj(o["priors"]),
        behaviour=BehaviourParams.from_obj(o.get("behaviour", {})),
        surprise=HistogramSurprise.from_obj(o["surprise"]) if o.get("surprise") else None,
        calibration={k: TailCalibration.from_obj(c) for k, c in o.get("calibration", {}).items()},
        hst_calibration=(
            TailCalibration.from_obj(o["hst_calibration"]) if o.get("hst_calibration") else None
        ),
    )


_LOADED: dict[tuple[str, tuple[tuple[str, str], ...]], ModelBundle] = {}


def load_bundle(registry: ModelRegistry) -> ModelBundle | None:
    """The promoted bundle of ``registry`` (cached per promoted set), or None if it promotes
    no ``visits`` model."""
    promoted = registry.promoted()
    if "visits" not in promoted:
        return None
    key = (str(registry.root), tuple(sorted((k, v) for k, v in promoted.items())))
    hit = _LOADED.get(key)
    if hit is not None:
        return hit
    v = promoted["visits"]
    bundle = bundle_from_artifact(registry.load_json("visits", v, "visits.json"))
    bundle.versions = {"visits": v}
    bundle.detection = dict(registry.metadata("visits", v).get("detection") or {})
    c = promoted.get("cases")
    if c is not None:
        meta = registry.metadata("cases", c)
        bundle.case_model = CaseScorer(
            meta["kind"], registry.load_skops("cases", c, "model.skops"), meta["features"]
        )
        bundle.versions["cases"] = c
    _LOADED[key] = bundle
    return bundle


def registry_for(path: str) -> ModelRegistry | None:
    """``""``: the registry shipped with the package; ``"none"``: no models."""
    if path.lower() in ("none", "off", "-"):
        return None
    return ModelRegistry(Path(path) if path else DEFAULT_REGISTRY)


class UserModels:
    """One user's model state."""

    __slots__ = (
        "behaviour",
        "hst",
        "gate",
        "scored",
        "group",
        "key",
        "means",
        "fade_k",
        "fade_day",
        "fade_today",
        "prep",
    )

    def __init__(self, hst: HSTState) -> None:
        self.behaviour = UserBehaviour()
        self.hst = hst
        self.gate = 0.0  # running quantile of the user's HST scores
        self.scored = 0
        self.group = ""  # peer group (department/role)
        self.key = ""  # role@department kind: which population histograms apply
        self.means: dict[str, float] = {}  # running mean of each feature (for attribution)
        #: peer fade: explained visits at peer level >= FADE_LEVEL on earlier local days
        #: (``fade_k``) and on the local day ``fade_day`` (``fade_today``)
        self.fade_k = 0
        self.fade_day = -1
        self.fade_today = 0
        #: cache, not state: what the scorer looks up for this user (see ``_prepare``)
        self.prep: _Prep | None = None

    def to_obj(self) -> dict[str, Any]:
        return {
            "behaviour": self.behaviour.to_obj(),
            "hst": self.hst.to_obj(),
            "gate": self.gate,
            "scored": self.scored,
            "group": self.group,
            "key": self.key,
            "means": self.means,
            "fade": [self.fade_k, self.fade_day, self.fade_today],
        }

    @classmethod
    def from_obj(cls, o: dict[str, Any], size: int) -> UserModels:
        um = cls(HSTState.from_obj(o["hst"], size))
        um.behaviour = UserBehaviour.from_obj(o["behaviour"])
        um.gate = o["gate"]
        um.scored = o["scored"]
        um.group = o["group"]
        um.key = o["key"]
        um.means = dict(o["means"])
        fade = o.get("fade")
        if fade:
            um.fade_k, um.fade_day, um.fade_today = int(fade[0]), int(fade[1]), int(fade[2])
        return um

    def fade(self, day: int) -> float:
        """What the peer level of an explained visit on local ``day`` loses to the user's
        routine: ``log10(1 + k)``, k the unusual explained visits of earlier days."""
        if day > self.fade_day:
            self.fade_k += self.fade_today
            self.fade_today = 0
            self.fade_day = day
        k = self.fade_k
        return math.log10(1 + k) if k else 0.0


def _at_least(x: dict[str, float], usual: dict[str, float]) -> dict[str, float]:
    """``x`` with every feature below the user's usual value raised to it: what is left of
    the visit's deviation in the suspicious direction alone (every feature is higher = more
    suspicious)."""
    return {k: m if (m := usual.get(k)) is not None and m > v else v for k, v in x.items()}


class _Prep:
    """What scoring a user's visits looks up that depends on the user and the installed
    models alone: the peer baseline, the community prior, the population keys and their
    calibrations."""

    __slots__ = ("bundle", "base", "comm_prior", "table_e", "table_u", "cal_e", "cal_u")

    def __init__(self, scorer: ModelScorer, um: UserModels, user_id: str) -> None:
        role = um.key.partition("@")[0]
        priors = scorer.priors
        self.bundle = scorer.bundle
        self.base = priors.baseline(um.group, role)
        self.comm_prior = priors.community_prior(user_id, um.group, role)
        cal = scorer.calibration
        pe, pu = f"{um.key}|e", f"{um.key}|u"
        self.cal_e = cal.get(pe) or scorer.global_cal
        self.cal_u = cal.get(pu) or scorer.global_cal
        sur = scorer.surprise
        self.table_e = sur.table(pe) if sur is not None else None
        self.table_u = sur.table(pu) if sur is not None else None


@dataclass(slots=True)
class VisitScore:
    """A closed visit, its features and its scores (all higher = more suspicious)."""

    user_id: str
    visit: Visit
    features: dict[str, float]
    explained: bool
    peer_level: float  # population histogram score, calibrated
    own_level: float  # the user's HalfSpaceTrees score, calibrated (0 while it warms up)
    hst: float  # raw HalfSpaceTrees score
    level: float  # max of the two
    attribution: dict[str, float]  # feature → share of the level it explains
    #: when ``level`` lies beyond what its calibration's scores can tell (extrapolated), the
    #: number of ordinary visits that calibration has; else 0
    extrapolated_from: int = 0


class ModelScorer:
    """Per-access bookkeeping and per-visit scoring for one engine."""

    def __init__(
        self,
        ctx: Context,
        bundle: ModelBundle | None = None,
        registry: ModelRegistry | None = None,
        recorder: Callable[[VisitScore], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.registry = registry
        self.recorder = recorder
        self._stamp = registry.stamp() if registry is not None else (0, 0)
        self._checked = time.monotonic()
        self._reset_trees = False
        self._install(bundle or ModelBundle())
        self.reloads = 0

    @classmethod
    def from_registry(
        cls, ctx: Context, path: str, recorder: Callable[[VisitScore], None] | None = None
    ) -> ModelScorer | None:
        reg = registry_for(path)
        if reg is None:
            return None
        bundle = load_bundle(reg)
        if bundle is None:
            return None
        return cls(ctx, bundle, reg, recorder)

    def _install(self, bundle: ModelBundle) -> None:
        b = bundle.behaviour
        self.bundle = bundle
        self.trees = SharedHalfSpaceTrees(FEATURE_NAMES, b.n_trees, b.height, b.window_size, b.seed)
        self.gate = QuantileGate(b.gate_q)
        self.priors = bundle.priors
        self.surprise = bundle.surprise
        self.calibration = bundle.calibration
        self.global_cal = bundle.calibration.get("*")
        self.hst_cal = bundle.hst_calibration
        self.case_model = bundle.case_model
        self.versions = dict(bundle.versions)
        self._comm_cache: dict[str, str] = {}

    # ----------------------------------------------------------------- hot reload
    def maybe_reload(self, min_interval_s: float = 1.0) -> bool:
        """Pick up a newly promoted set. Cheap: one stat() of PROMOTED.json at most every
        ``min_interval_s`` seconds. Per-user state survives when the trees keep their layout."""
        if self.registry is None:
            return False
        now = time.monotonic()
        if now - self._checked < min_interval_s:
            return False
        self._checked = now
        stamp = self.registry.stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            bundle = load_bundle(self.registry)
        except (RegistryError, OSError, ValueError, KeyError):
            return False  # a half-written or broken promotion: keep running the old set
        if bundle is None or bundle.versions == self.versions:
            return False
        old = (self.trees.size, self.trees.seed, self.trees.features)
        self._install(bundle)
        self._reset_trees = (self.trees.size, self.trees.seed, self.trees.features) != old
        self.reloads += 1
        return True

    # ----------------------------------------------------------------- users
    def new_user(self) -> UserModels:
        return UserModels(self.trees.new_state())

    def restore_user(self, o: dict[str, Any]) -> UserModels:
        um = UserModels.from_obj(o, self.trees.size)
        if len(um.hst.l_mass) != self.trees.size:
            um.hst = self.trees.new_state()
        return um

    # ----------------------------------------------------------------- per access
    def observe(
        self, e: AccessEvent, f: dict[str, Any], um: UserModels, ev: tuple[Any, ...]
    ) -> list[VisitScore]:
        """Add one access to the user's open visit; score the visits it closes."""
        bh = um.behaviour
        t = e.t
        if t - bh.oldest > VISIT_GAP_S or len(bh.open) > MAX_OPEN_VISITS:
            out = [self.score_visit(e.user_id, um, v) for v in bh.expired(t)]
        else:
            out = _NONE
        if not um.key:
            um.group = peer_key(f["user_department"], f["role"])
            um.key = f"{f['role']}@{f['user_department_kind'] or 'clinical'}"
        v = bh.open.get(e.patient_id)
        if v is None:
            dept = patient_department(self.ctx, e.patient_id, t)
            comm = self._comm_cache.get(dept)
            if comm is None:
                comm = self._comm_cache[dept] = self.priors.community_of_department(dept)
            v = bh.open[e.patient_id] = Visit(e.patient_id, t, e.workstation, dept, comm)
            bh.roll(t, comm)
            if t < bh.oldest:
                bh.oldest = t
        # Visit.add, inlined: it runs for every access
        v.n += 1
        if ev[1] > v.last_t:  # a late access does not move the visit's end back
            v.last_t = ev[1]
        if not f["explained"]:
            v.unexplained += 1
        if f["write"]:
            v.writes += 1
        if f["exfiltration"]:
            v.exfil += 1
        if f["denied"]:
            v.denied += 1
        if f["off_shift"]:
            v.off_shift += 1
        kinds = v.kinds
        kind = f"{e.resource_type}.{e.action}"
        kinds[kind] = kinds.get(kind, 0) + 1
        v.evidence.append(ev)
        return out

    def expire(self, user_id: str, um: UserModels, horizon: float) -> list[VisitScore]:
        """Score the user's visits idle since before ``horizon`` (oldest first). Each closes
        at its own time, ``last_t + VISIT_GAP_S``, whatever triggers it: the user's next
        access or the engine's event-time watermark."""
        return [self.score_visit(user_id, um, v) for v in um.behaviour.idle(horizon)]

    def close_all(self, user_id: str, um: UserModels) -> list[VisitScore]:
        return [self.score_visit(user_id, um, v) for v in um.behaviour.close_all()]

    # ----------------------------------------------------------------- per visit
    def score_visit(self, user_id: str, um: UserModels, v: Visit) -> VisitScore:
        if self._reset_trees and len(um.hst.l_mass) != self.trees.size:
            um.hst = self.trees.new_state()
        prep = um.prep
        if prep is None or prep.bundle is not self.bundle:
            prep = um.prep = _Prep(self, um, user_id)
        x = features_against(v, um.behaviour, prep.base, prep.comm_prior)
        explained = v.unexplained * 2 < v.n
        peer = raw_peer = 0.0
        terms = _NO_TERMS
        table = prep.table_e if explained else prep.table_u
        peer_cal = prep.cal_e if explained else prep.cal_u
        if table is not None:
            raw, terms = self.surprise.score_table(table, x)  # type: ignore[union-attr]
            peer = raw_peer = peer_cal.level(raw) if peer_cal is not None else 0.0
        if explained and peer > 0.0:
            # peer fade: the peers never get used to the user's own routine (what they find
            # unusual may be this user's everyday work, and it stays out of learning), so
            # each earlier-day visit as unusual takes a little off; today's visits do not
            # (a first-day burst keeps its full level)
            fade = um.fade(self.ctx.clock.local_day(v.t0))
            if peer >= FADE_LEVEL:
                um.fade_today += 1
            if fade:
                peer = max(0.0, peer - fade)
        trees, st = self.trees, um.hst
        p = self.bundle.behaviour
        hst = own = 0.0
        scored = not st.first_window and (peer >= p.cascade_level or not explained)
        if scored:
            hst = trees.score_one(st, x)
            if self.hst_cal is not None:
                own = self.hst_cal.level(hst)
                if own >= ONE_SIDED_LEVEL:
                    own = min(own, self.hst_cal.level(trees.score_one(st, _at_least(x, um.means))))
            um.scored += 1
            um.gate = self.gate.update(um.gate, hst, um.scored)
        # learn: the gate keeps what the user's model flags out of it and out of the profiles
        # (on the unfaded peer level: the fade changes what is evidence, not what is learned)
        learn = raw_peer < 2.0 and (not scored or hst < um.gate or um.scored < 20)
        um.behaviour.learn(v, learn_profile=learn, peer_kinds=prep.base.kinds)
        n = um.behaviour.visits
        if learn and (n % p.learn_every == 0 or st.first_window):
            trees.learn_one(st, x)
        level = max(peer, own)
        attribution = self._attribute(um, x, terms, hst, own > peer) if level >= 1.5 else {}
        if n % 4 == 0 or level >= 2.0:
            means = um.means
            for k, val in x.items():
                m = means.get(k)
                means[k] = val if m is None else m + 0.05 * (val - m)
        beyond = 0
        if level > 0.0:
            cal = peer_cal if peer >= own else self.hst_cal
            if cal is not None and level > cal.data_level + 1e-9:
                beyond = cal.n
        vs = VisitScore(user_id, v, x, explained, peer, own, hst, level, attribution, beyond)
        if self.recorder is not None:
            self.recorder(vs)
        return vs

    def _attribute(
        self, um: UserModels, x: dict[str, float], terms: dict[str, float], hst: float, own: bool
    ) -> dict[str, float]:
        """Each feature's share of the score. For the population model the terms are
        additive; for the user's own model, the drop in score when the feature is set back
        to the user's usual value."""
        parts: dict[str, float] = {k: c for k, c in terms.items() if c > 0}
        if own:
            means = um.means
            drops: dict[str, float] = {}
            for k in FEATURE_NAMES:
                if k in means and x[k] != means[k]:
                    y = dict(x)
                    y[k] = means[k]
                    drop = hst - self.trees.score_one(um.hst, y)
                    if drop > 0:
                        drops[k] = drop
            if drops:
                parts = drops
        total = sum(parts.values())
        if total <= 0:
            return {}
        return {k: round(c / total, 3) for k, c in sorted(parts.items(), key=lambda kv: -kv[1])}
