"""Care communities and peer baselines, learned offline from access history.

The collaborative signal (CADS, Chen & Malin 2012; Menon 2014): users who access the same
patients form communities, and an access outside one's community is suspicious. Patients
come and go, so communities are learned over *care departments*: two departments belong to
one community when the same users work on both departments' patients (transfers, consults
and shared staff tie ICU to internal medicine, the ED to the wards it admits to). A patient
belongs to the community of the department caring for them; a user's community profile is
where the user, or the user's peer group, works.

Everything here is trained offline across users and shipped through the model registry as
JSON, so the stream and the partitioned replay only read it.

>>> import pandas as pd
>>> visits = pd.DataFrame({
...     "user_id": ["a", "a", "b", "b", "c", "c"],
...     "department": ["CARD", "ICU", "ICU", "CARD", "OB", "OB"],
... })
>>> sorted(set(learn_communities(visits, threshold=0.5)["department_community"].values()))
['c0', 'c1']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.features import NO_COMMUNITY, PeerBaseline, Priors, peer_key

if TYPE_CHECKING:  # pandas is for training; the engine only reads the JSON
    import pandas as pd

#: a user works "in" a community when at least this share of their visits go there
HOME_SHARE = 0.5


def learn_communities(
    visits: pd.DataFrame, threshold: float = 0.75, min_visits: int = 20
) -> dict[str, Any]:
    """Cluster care departments by the users they share.

    ``visits`` needs ``user_id`` and ``department`` (the department caring for the patient
    at the visit; ``-`` or empty when none). Departments are compared by the cosine of their
    user-visit vectors and merged by average-linkage agglomerative clustering (deterministic,
    no random state) while their distance is below ``threshold``.

    Returns ``department_community`` (department → community id) and ``user_community``
    (users with at least ``min_visits`` visits, ``HOME_SHARE`` of them in one community)."""
    import numpy as np
    from sklearn.cluster import AgglomerativeClustering

    v = visits[visits["department"].fillna("").astype(str).str.len() > 0]
    v = v[v["department"] != NO_COMMUNITY]
    if v.empty:
        return {"department_community": {}, "user_community": {}, "threshold": threshold}
    counts = v.groupby(["department", "user_id"]).size().unstack(fill_value=0)
    depts = list(counts.index)
    if len(depts) == 1:
        labels = np.zeros(1, dtype=int)
    else:
        m = counts.to_numpy(dtype=float)
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        m = m / np.where(norms == 0, 1.0, norms)
        dist = np.clip(1.0 - m @ m.T, 0.0, 2.0)
        labels = AgglomerativeClustering(
            n_clusters=None,
            metric="precomputed",
            linkage="average",
            distance_threshold=threshold,
        ).fit_predict(dist)
    # name communities by their first department in sorted order, so ids are stable
    first: dict[int, str] = {}
    for d, lab in sorted(zip(depts, labels, strict=True)):
        first.setdefault(int(lab), d)
    order = {lab: i for i, lab in enumerate(sorted(first, key=lambda k: first[k]))}
    dept_comm = {d: f"c{order[int(lab)]}" for d, lab in zip(depts, labels, strict=True)}
    v = v.assign(community=v["department"].map(dept_comm))
    per_user = v.groupby(["user_id", "community"]).size().unstack(fill_value=0)
    user_comm: dict[str, str] = {}
    for uid, row in per_user.iterrows():
        total = row.sum()
        if total >= min_visits and row.max() / total >= HOME_SHARE:
            user_comm[str(uid)] = str(row.idxmax())
    return {"department_community": dept_comm, "user_community": user_comm, "threshold": threshold}


def _shares(counter: pd.Series) -> dict[str, float]:
    total = float(counter.sum())
    return {str(k): round(float(n) / total, 6) for k, n in counter.items() if n} if total else {}


def learn_priors(
    visits: pd.DataFrame,
    accesses: pd.DataFrame,
    communities: dict[str, Any],
    min_users: int = 1,
) -> Priors:
    """Peer baselines and community profiles from a visit table and an access-kind table.

    ``visits``: ``user_id``, ``group`` (:func:`models.features.peer_key`), ``role``,
    ``department``, ``t0``, ``wrote`` (0/1). ``accesses``: ``group``, ``role``, ``kind``,
    ``n`` (count of accesses of that kind by that group)."""
    dept_comm: dict[str, str] = communities["department_community"]
    v = visits.assign(
        community=visits["department"].map(lambda d: dept_comm.get(d, d or NO_COMMUNITY))
    )
    v = v.assign(hour=(v["t0"] // 3600).astype("int64"))

    def baseline(vv: pd.DataFrame, aa: pd.DataFrame) -> PeerBaseline:
        per_hour = vv.groupby(["user_id", "hour"]).size()
        return PeerBaseline(
            kinds=_shares(aa.groupby("kind")["n"].sum()),
            communities=_shares(vv.groupby("community").size()),
            write_visit_share=round(float(vv["wrote"].mean()), 6) if len(vv) else 0.5,
            visits_per_hour=round(float(per_hour.median()), 3) if len(per_hour) else 6.0,
            users=int(vv["user_id"].nunique()),
        )

    groups: dict[str, PeerBaseline] = {}
    for g, vv in v.groupby("group"):
        if vv["user_id"].nunique() >= min_users:
            groups[str(g)] = baseline(vv, accesses[accesses["group"] == g])
    roles = {str(r): baseline(vv, accesses[accesses["role"] == r]) for r, vv in v.groupby("role")}
    profiles: dict[str, dict[str, float]] = {}
    members = communities["user_community"]
    home = v["user_id"].map(members)
    for c, vv in v[home.notna()].groupby(home[home.notna()]):
        profiles[str(c)] = _shares(vv.groupby("community").size())
    return Priors(
        groups=groups,
        roles=roles,
        everyone=baseline(v, accesses),
        department_community=dict(dept_comm),
        community_profiles=profiles,
        user_community=dict(members),
    )


def priors_to_obj(p: Priors) -> dict[str, Any]:
    return {
        "groups": {k: b.to_obj() for k, b in sorted(p.groups.items())},
        "roles": {k: b.to_obj() for k, b in sorted(p.roles.items())},
        "everyone": p.everyone.to_obj(),
        "department_community": dict(sorted(p.department_community.items())),
        "community_profiles": {k: v for k, v in sorted(p.community_profiles.items())},
        "user_community": dict(sorted(p.user_community.items())),
    }


def priors_from_obj(o: dict[str, Any]) -> Priors:
    return Priors(
        groups={k: PeerBaseline.from_obj(b) for k, b in o.get("groups", {}).items()},
        roles={k: PeerBaseline.from_obj(b) for k, b in o.get("roles", {}).items()},
        everyone=PeerBaseline.from_obj(o.get("everyone", {})),
        department_community=dict(o.get("department_community", {})),
        community_profiles={k: dict(v) for k, v in o.get("community_profiles", {}).items()},
        user_community=dict(o.get("user_community", {})),
    )


__all__ = [
    "learn_communities",
    "learn_priors",
    "peer_key",
    "priors_from_obj",
    "priors_to_obj",
]
