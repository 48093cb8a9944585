"""scikit-learn batch models behind one adapter, with one score direction.

Case models score a *case* (one user's findings over hours or days) from a handful of
numbers the engine computes (:data:`CASE_FEATURES`). They run once per batch over the cases
the batch changed, never per access. Two kinds:

- ``verdicts``: a classifier (logistic regression) trained on analysts' verdicts of past
  cases — in the simulator, the labels. Its score is P(misuse).
- ``isolation``: an IsolationForest over the same numbers, for a hospital with no verdicts
  yet. scikit-learn's ``score_samples`` is *lower* for more abnormal cases; this module is
  the one place where the sign is flipped, so that everywhere else higher means more
  suspicious.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: case feature → plain words
CASE_FEATURES: dict[str, str] = {
    "rule_risk": "risk accumulated by rules",
    "patients": "distinct patients in the case",
    "events": "accesses in the case",
    "rules": "distinct rules that fired",
    "max_rule_level": "highest rule level (0 low … 3 critical)",
    "correlation": "a counting rule (correlation) fired",
    "no_care": "accesses with no care relationship",
    "max_level": "most unusual visit (−log10 share of ordinary visits)",
    "mean_level": "mean unusualness of the case's visits",
    "learned_patients": "patients with learned-behaviour evidence",
    "span_hours": "hours between first and last evidence",
}
CASE_FEATURE_NAMES: tuple[str, ...] = tuple(CASE_FEATURES)


class CaseScorer:
    """Wraps a fitted scikit-learn model; ``score`` returns values in [0, 1], higher = more
    suspicious, for a batch of case feature rows."""

    def __init__(self, kind: str, model: Any, features: Sequence[str] = CASE_FEATURE_NAMES):
        if kind not in ("verdicts", "isolation"):
            raise ValueError(f"unknown case model kind {kind!r}")
        self.kind = kind
        self.model = model
        self.features = tuple(features)

    def score(self, rows: Sequence[dict[str, float]]) -> list[float]:
        if not rows:
            return []
        import numpy as np

        x = np.array([[r.get(f, 0.0) for f in self.features] for r in rows], dtype=float)
        if self.kind == "verdicts":
            return [float(p) for p in self.model.predict_proba(x)[:, 1]]
        # the one sign flip: decision_function < 0 means an outlier to scikit-learn
        d = self.model.decision_function(x)
        return [1.0 / (1.0 + math.exp(max(-50.0, min(50.0, 12.0 * float(v))))) for v in d]


#: inverse regularisation of the verdict classifier (leave-one-seed-out on the tuning seeds:
#: fewest misuse cases lost, no false alert added)
VERDICTS_C = 0.5


def fit_verdicts(
    rows: Sequence[dict[str, float]],
    verdicts: Sequence[int],
    random_state: int = 0,
    c: float = VERDICTS_C,
):
    """Logistic regression on standardised case features; balanced classes."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.array([[r.get(f, 0.0) for f in CASE_FEATURE_NAMES] for r in rows], dtype=float)
    y = np.array(verdicts, dtype=int)
    model = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "clf",
                LogisticRegression(
                    C=c, class_weight="balanced", max_iter=2000, random_state=random_state
                ),
            ),
        ]
    )
    model.fit(x, y)
    return model


def fit_isolation(rows: Sequence[dict[str, float]], random_state: int = 0):
    import numpy as np
    from sklearn.ensemble import IsolationForest

    x = np.array([[r.get(f, 0.0) for f in CASE_FEATURE_NAMES] for r in rows], dtype=float)
    return IsolationForest(n_estimators=50, max_samples=128, random_state=random_state).fit(x)
