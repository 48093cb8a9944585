"""Online, per-user models: river's HalfSpaceTrees with per-user masses, behind a quantile gate.

Each user gets their own behaviour model, learned online from their own visits only, so a
partitioned stream computes exactly what one process does. Building river's trees costs
milliseconds and hundreds of node objects per model, which thousands of users cannot afford,
and a model's state must go into the engine's JSON snapshot. So the trees' *structure*
(split features and thresholds) is built once by river's own ``make_padded_tree``, exactly as
``river.anomaly.HalfSpaceTrees`` builds it for a seed, and each user keeps only the two mass
arrays the algorithm updates. ``score_one`` and ``learn_one`` follow river's code line by
line; a test checks that the scores equal river's on the same stream.

Score direction, as everywhere in this project: higher is more suspicious.

>>> trees = SharedHalfSpaceTrees(("a", "b"), n_trees=3, height=3, window_size=4, seed=1)
>>> st = trees.new_state()
>>> for x in [0.5, 0.52, 0.49, 0.51, 0.5, 0.48, 0.5, 0.51]:
...     trees.learn_one(st, {"a": x, "b": x})
>>> trees.score_one(st, {"a": 0.5, "b": 0.5}) < trees.score_one(st, {"a": 0.95, "b": 0.05})
True
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from river.anomaly import HalfSpaceTrees


class HSTState:
    """One user's masses (reference window ``r`` and the window being filled ``l``)."""

    __slots__ = ("l_mass", "r_mass", "counter", "first_window")

    def __init__(self, size: int) -> None:
        self.l_mass = array("l", bytes(8 * size))
        self.r_mass = array("l", bytes(8 * size))
        self.counter = 0
        self.first_window = True

    def to_obj(self) -> dict[str, Any]:
        """Sparse: most nodes of a young model have no mass."""

        def sparse(a: array) -> list[list[int]]:
            return [[i, v] for i, v in enumerate(a) if v]

        return {
            "l": sparse(self.l_mass),
            "r": sparse(self.r_mass),
            "counter": self.counter,
            "first_window": self.first_window,
        }

    @classmethod
    def from_obj(cls, o: dict[str, Any], size: int) -> HSTState:
        st = cls(size)
        for i, v in o["l"]:
            st.l_mass[i] = v
        for i, v in o["r"]:
            st.r_mass[i] = v
        st.counter = o["counter"]
        st.first_window = o["first_window"]
        return st


class SharedHalfSpaceTrees:
    """HalfSpaceTrees whose structure is shared and whose masses live in :class:`HSTState`.

    Parameters are river's: ``n_trees``, ``height`` (≤ 8 here: state grows as 2^height),
    ``window_size``, ``seed``. Features are in [0, 1]."""

    def __init__(
        self,
        features: tuple[str, ...],
        n_trees: int = 8,
        height: int = 6,
        window_size: int = 64,
        seed: int = 42,
    ) -> None:
        if not 1 <= height <= 8:
            raise ValueError("height must be 1..8: the state of a user grows as 2**height")
        self.features = tuple(features)
        self.n_trees = n_trees
        self.height = height
        self.window_size = window_size
        self.seed = seed
        # river builds its trees on the first learn_one; let it, then read the structure
        template = HalfSpaceTrees(
            n_trees=n_trees, height=height, window_size=window_size, seed=seed
        )
        template.learn_one(dict.fromkeys(self.features, 0.5))
        feats: list[str] = []
        thresholds: list[float] = []
        children: list[int] = []  # left child index; right = its sibling's index
        rights: list[int] = []
        roots: list[int] = []
        for root in template.trees:
            nodes = list(root.iter_dfs())
            base = len(feats)
            index = {id(n): base + i for i, n in enumerate(nodes)}
            roots.append(base)
            for n in nodes:
                if hasattr(n, "feature"):
                    feats.append(n.feature)
                    thresholds.append(n.threshold)
                    children.append(index[id(n.children[0])])
                    rights.append(index[id(n.children[1])])
                else:
                    feats.append("")
                    thresholds.append(0.0)
                    children.append(-1)
                    rights.append(-1)
        self._feature = feats
        self._threshold = thresholds
        self._left = children
        self._right = rights
        self._roots = roots
        self.size = len(feats)
        self._max_score = n_trees * window_size * (2 ** (height + 1) - 1)
        self._size_limit = 0.1 * window_size
        self._learn_paths, self._path_mass = self._compile()

    def _compile(self) -> tuple[Any, Any]:
        """:meth:`learn_one`'s and :meth:`score_one`'s walks down the trees as straight-line
        code (nested ifs on constant features and thresholds: no per-node list lookups),
        generated from the structure once. Same nodes, same operations, same order: the
        same masses and bit-for-bit the same scores as the loops they replace."""
        feat, thr, left, right, height = (
            self._feature,
            self._threshold,
            self._left,
            self._right,
            self.height,
        )
        learn = ["def learn(x, lm):"]
        score = ["def score(x, rm, limit):", "    s = 0.0"]

        def walk_learn(node: int, depth: int, pad: str) -> None:
            learn.append(f"{pad}lm[{node}] += 1")
            if depth == height:
                return
            learn.append(f"{pad}if x[{feat[node]!r}] < {float(thr[node])!r}:")
            walk_learn(left[node], depth + 1, pad + "    ")
            learn.append(f"{pad}else:")
            walk_learn(right[node], depth + 1, pad + "    ")

        def walk_score(node: int, depth: int, pad: str) -> None:
            power = 1 << depth
            if depth == height:
                score.append(f"{pad}s += rm[{node}] * {power}")
                return
            score.append(f"{pad}r = rm[{node}]")
            score.append(f"{pad}s += r * {power}")
            score.append(f"{pad}if r >= limit:")
            pad2 = pad + "    "
            score.append(f"{pad2}if x[{feat[node]!r}] < {float(thr[node])!r}:")
            walk_score(left[node], depth + 1, pad2 + "    ")
            score.append(f"{pad2}else:")
            walk_score(right[node], depth + 1, pad2 + "    ")

        for root in self._roots:
            walk_learn(root, 0, "    ")
            walk_score(root, 0, "    ")
        score.append("    return s")
        ns: dict[str, Any] = {}
        # built from the trees' own features (repr'd str) and thresholds (repr'd float)
        exec("\n".join(learn + score), {"__builtins__": {}}, ns)  # noqa: S102
        return ns["learn"], ns["score"]

    def new_state(self) -> HSTState:
        return HSTState(self.size)

    def learn_one(self, st: HSTState, x: dict[str, float]) -> None:
        self._learn_paths(x, st.l_mass)  # river's walk: see _learn_loop
        st.counter += 1
        if st.counter == self.window_size:
            st.r_mass, st.l_mass = st.l_mass, array("l", bytes(8 * self.size))
            st.first_window = False
            st.counter = 0

    def score_one(self, st: HSTState, x: dict[str, float]) -> float:
        """0 until the first window is full, then 1 − (mass along the path) / max: in [0, 1],
        higher is more anomalous."""
        if st.first_window:
            return 0.0
        return 1.0 - self._path_mass(x, st.r_mass, self._size_limit) / self._max_score

    def _learn_loop(self, x: dict[str, float], lm: array) -> None:
        """What :meth:`learn_one` runs as generated code (:meth:`_compile`), as river's loop."""
        feat, thr, left, right = self._feature, self._threshold, self._left, self._right
        height = self.height
        for node in self._roots:
            for _ in range(height):
                lm[node] += 1
                node = left[node] if x[feat[node]] < thr[node] else right[node]
            lm[node] += 1

    def _score_loop(self, st: HSTState, x: dict[str, float]) -> float:
        """What :meth:`score_one` runs as generated code (:meth:`_compile`), as river's loop."""
        if st.first_window:
            return 0.0
        feat, thr, left, right = self._feature, self._threshold, self._left, self._right
        rm = st.r_mass
        limit = self._size_limit
        height = self.height
        score = 0.0
        for node in self._roots:
            depth_pow = 1
            for _ in range(height):
                r = rm[node]
                score += r * depth_pow
                if r < limit:
                    break
                node = left[node] if x[feat[node]] < thr[node] else right[node]
                depth_pow <<= 1
            else:
                score += rm[node] * depth_pow
        return 1.0 - score / self._max_score


class QuantileGate:
    """river's ``QuantileFilter`` for per-user state kept in JSON: a running estimate of the
    ``q``-quantile of the user's scores (stochastic approximation). A score at or above it is
    not learned, so the model does not learn from what it flags.

    >>> g = QuantileGate(0.9)
    >>> est = 0.0
    >>> for i in range(2000):
    ...     est = g.update(est, (i * 7919 % 1000) / 1000, i + 1)
    >>> 0.8 < est < 0.97
    True
    """

    def __init__(self, q: float = 0.95, step: float = 0.05) -> None:
        self.q = q
        self.step = step

    def update(self, estimate: float, score: float, n: int) -> float:
        """The new estimate after seeing ``score`` as the ``n``-th score."""
        if n == 1:
            return score
        eta = self.step / math.sqrt(min(n, 400) / 20.0) if n > 20 else self.step
        return estimate + eta * ((1.0 if score > estimate else 0.0) - (1.0 - self.q))

    @staticmethod
    def learns(estimate: float, score: float, n: int, warmup: int) -> bool:
        return n < warmup or score < estimate
