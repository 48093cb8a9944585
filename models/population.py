"""Population models fitted offline: how unusual a visit is for users of the same role.

:class:`HistogramSurprise` is a histogram-based outlier score (HBOS, Goldstein & Dengel 2012):
per role and feature, a histogram of the feature over the training history; a visit's
surprise is the sum over features of −log P(its bin), minus that of the most common bin, so
an ordinary visit scores about 0 and each feature's term is its attribution. It costs one
dict lookup per feature, and it is plain JSON.

:class:`TailCalibration` turns any score into "how rare is a score this high among ordinary
visits": −log10 of the share of training visits scoring at least as high. Scores of
different models become comparable (3 means one ordinary visit in a thousand).

>>> h = HistogramSurprise.fit(
...     [{"a": 0.1}, {"a": 0.12}, {"a": 0.11}, {"a": 0.9}], ["r", "r", "r", "r"], ("a",))
>>> h.score("r", {"a": 0.1})[0] < h.score("r", {"a": 0.9})[0]
True
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

BINS = 10
SMOOTHING = 0.5


def _bin(x: float) -> int:
    b = int(x * BINS)
    return BINS - 1 if b >= BINS else (0 if b < 0 else b)


class HistogramSurprise:
    """Per-role, per-feature histograms; ``score`` returns (surprise, per-feature terms)."""

    def __init__(
        self,
        features: tuple[str, ...],
        tables: dict[str, dict[str, list[float]]],
        term_cap: float = 4.0,
    ):
        self.features = features
        #: role → feature → cost of each bin (−log P(bin) minus the cheapest bin's cost)
        self.tables = tables
        #: no single feature adds more than this: one odd number (a mistyped search, one
        #: print) does not make a visit rare; several together do
        self.term_cap = term_cap

    @classmethod
    def fit(
        cls,
        rows: Sequence[dict[str, float]],
        roles: Sequence[str],
        features: tuple[str, ...],
        min_rows: int = 200,
        term_cap: float = 4.0,
    ) -> HistogramSurprise:
        counts: dict[str, dict[str, list[float]]] = {}
        for x, role in zip(rows, roles, strict=True):
            for key in (role, "*"):
                per = counts.get(key)
                if per is None:
                    per = counts[key] = {f: [0.0] * BINS for f in features}
                for f in features:
                    per[f][_bin(x[f])] += 1.0
        tables: dict[str, dict[str, list[float]]] = {}
        for key, per in counts.items():
            n = sum(per[features[0]])
            if key != "*" and n < min_rows:
                continue
            t: dict[str, list[float]] = {}
            for f, c in per.items():
                total = sum(c) + SMOOTHING * BINS
                cost = [-math.log((v + SMOOTHING) / total) for v in c]
                low = min(cost)
                t[f] = [round(v - low, 4) for v in cost]
            tables[key] = t
        return cls(features, tables, term_cap)

    def score(self, role: str, x: dict[str, float]) -> tuple[float, dict[str, float]]:
        return self.score_table(self.table(role), x)

    def table(self, role: str) -> list[tuple[str, list[float]]]:
        """The histograms that apply to ``role``, in feature order (for :meth:`score_table`)."""
        t = self.tables.get(role) or self.tables["*"]
        return [(f, t[f]) for f in self.features]

    def score_table(
        self, table: list[tuple[str, list[float]]], x: dict[str, float]
    ) -> tuple[float, dict[str, float]]:
        terms: dict[str, float] = {}
        total = 0.0
        cap = self.term_cap
        for f, costs in table:
            b = int(x[f] * BINS)
            c = costs[BINS - 1 if b >= BINS else (0 if b < 0 else b)]
            if c:
                if c > cap:
                    c = cap
                terms[f] = c
                total += c
        return total, terms

    def to_obj(self) -> dict[str, Any]:
        return {"features": list(self.features), "tables": self.tables, "term_cap": self.term_cap}

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> HistogramSurprise:
        return cls(
            tuple(o["features"]),
            {k: dict(v) for k, v in o["tables"].items()},
            float(o.get("term_cap", 4.0)),
        )


#: the highest level a calibration gives, extrapolated or not: "one ordinary visit in 100,000"
TAIL_CEILING = 5.0
#: a calibration extrapolates only when its data reached this level (at least 100 scores): the
#: tail's slope comes from its last decade, which must not be the bulk of the distribution
MIN_EXTRAPOLATED = 2.0


class TailCalibration:
    """Score → −log10 (share of ordinary training visits scoring at least as high)."""

    def __init__(self, points: list[float], n: int) -> None:
        self.points = points  # sorted scores at tail shares 10^-k/… (see fit)
        self.n = n
        self._levels = [i / 8 for i in range(len(points))]

    @classmethod
    def fit(cls, scores: Sequence[float], max_level: float = TAIL_CEILING) -> TailCalibration:
        """Quantiles of ``scores`` at tail shares 10^-0, 10^-1/8, …; no further than the data
        can tell (one score in ``n`` is level log10 n)."""
        s = sorted(scores)
        n = len(s)
        max_level = min(max_level, math.log10(n) if n > 1 else 0.0)
        points: list[float] = []
        level = 0.0
        while level <= max_level + 1e-9:
            share = 10.0**-level
            k = min(n - 1, max(0, math.ceil(n * (1.0 - share))))
            points.append(s[k] if n else 0.0)
            level += 1 / 8
        # never decreasing, and strictly beyond the data at the far end
        for i in range(1, len(points)):
            points[i] = max(points[i], points[i - 1])
        return cls(points, n)

    def level(self, score: float) -> float:
        """Interpolated −log10 tail share; beyond the data, extrapolated (:meth:`_beyond`)."""
        pts = self.points
        i = bisect.bisect_right(pts, score)
        if i == 0:
            return 0.0
        if i >= len(pts):
            return self._beyond(score)
        lo, hi = pts[i - 1], pts[i]
        frac = 0.0 if hi <= lo else (score - lo) / (hi - lo)
        return self._levels[i - 1] + frac / 8

    @property
    def data_level(self) -> float:
        """The highest level the calibration's own scores can tell (log10 n, in steps of 1/8);
        above it, levels are extrapolated."""
        return self._levels[-1]

    def _beyond(self, score: float) -> float:
        """A score beyond the highest calibration point: the tail goes on at the slope of its
        last decade (scores that are sums of log-rarities have a roughly exponential tail),
        up to :data:`TAIL_CEILING`. Without it, a peer group with n calibration visits could
        never say more than log10 n, and a small group (a few hundred radiologists' visits)
        could not tell a visit far beyond anything ordinary from the thousandth most unusual
        one."""
        pts = self.points
        top = self._levels[-1]
        if top < MIN_EXTRAPOLATED:
            return top
        span = pts[-1] - pts[-9]
        if span <= 0.0:
            return top
        return min(TAIL_CEILING, max(top, top + (score - pts[-1]) / span))

    def to_obj(self) -> dict[str, Any]:
        return {"points": [round(p, 6) for p in self.points], "n": self.n}

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> TailCalibration:
        return cls(list(o["points"]), int(o["n"]))
