"""Behaviour features: pure functions of one chart visit and the user's own state.

The unit a learned model judges is a *visit*: the accesses of one user to one patient's
chart until the user has not touched that chart for ``VISIT_GAP_S`` (users interleave
charts, so several visits of one user may be open at once). A
privacy officer thinks in visits ("why did she open this chart and read the notes?"), and
scoring once a visit instead of once an access keeps the models cheap.

Everything here is per user and depends only on the order of that user's events, so a
partitioned replay or stream (keyed by user) computes exactly what a single process does.
What is learned across users (peer baselines, care communities) comes in as
:class:`Priors`, trained offline and loaded from the model registry.

Features are numbers in [0, 1] (what HalfSpaceTrees expects), and every feature has a
plain-words description used when an alert explains a model's score.

>>> from models.features import Priors, UserBehaviour, Visit, visit_features
>>> st = UserBehaviour()
>>> v = Visit("p1", 0.0, "ws-1", "CARD", "c1")
>>> v.add("DocumentReference.view", explained=True, write=False, exfil=False, denied=False,
...       off_shift=False, ev=("e1", 0.0, "p1", "view", "DocumentReference", "ws-1", 1))
>>> f = visit_features(v, st, Priors.empty(), "LAB/technician", "lab")
>>> f["new_patient"], f["unexplained"]
(1.0, 0.0)
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from emrwatch.context import Context

VISIT_GAP_S = 10 * 60.0
#: more open visits than this: the oldest one closes
MAX_OPEN_VISITS = 8
HOUR = 3600.0
#: how many pseudo-accesses the peer baseline is worth against the user's own history
PRIOR_STRENGTH = 40.0
#: probabilities are floored here: a kind of access nobody in the peer group made
FLOOR = 1e-4
RARITY_SCALE = -math.log(FLOOR)
#: a kind of access this rare for the user (and their peers) is "rarely opened"
RARE = 0.01
#: a kind of access at least this common among the peers is part of their routine: a
#: flagged visit still teaches it to a user whose own history finds it rare
ROUTINE = 0.005
#: a user's first visits: workstation novelty means nothing yet
WARMUP_VISITS = 20
MAX_PATIENTS = 4096
MAX_WORKSTATIONS = 32
NO_COMMUNITY = "-"

#: feature → what it means, in the words an alert uses when the feature drove a score.
FEATURES: dict[str, str] = {
    "unusual_reads": "read record types that users of the same role and department rarely open",
    "unusual_share": "most of the visit went to such rarely opened records",
    "no_work_done": "only read the chart and wrote nothing, where the user usually documents",
    "outside_community": "the patient belongs to a care community the user rarely works in",
    "unexplained": "no care relationship explained the accesses",
    "new_patient": "a patient the user had never opened before",
    "off_shift": "outside the user's shift",
    "exfiltration": "exported, printed or copied",
    "denied": "access was refused",
    "new_workstation": "from a workstation the user had not used before",
    "patients_per_hour": "more patients within the hour than the user and their peers usually open",
    "communities_per_hour": "patients of more care communities within the hour than usual",
}
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURES)


def peer_key(department: str, role: str) -> str:
    """The peer group of a user: same department and role."""
    return f"{department}/{role}"


@dataclass
class PeerBaseline:
    """What users of one peer group usually do (learned offline, across users)."""

    kinds: dict[str, float] = field(default_factory=dict)  # "Resource.action" → share
    communities: dict[str, float] = field(default_factory=dict)  # community → share of visits
    write_visit_share: float = 0.5
    visits_per_hour: float = 6.0
    users: int = 0

    def to_obj(self) -> dict[str, Any]:
        return {
            "kinds": self.kinds,
            "communities": self.communities,
            "write_visit_share": self.write_visit_share,
            "visits_per_hour": self.visits_per_hour,
            "users": self.users,
        }

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> PeerBaseline:
        return cls(
            dict(o.get("kinds", {})),
            dict(o.get("communities", {})),
            float(o.get("write_visit_share", 0.5)),
            float(o.get("visits_per_hour", 6.0)),
            int(o.get("users", 0)),
        )


@dataclass
class Priors:
    """Offline knowledge the features need: peer baselines and care communities.

    ``groups`` is keyed by :func:`peer_key`; ``roles`` by role alone (fallback for a
    department the training history did not have); ``everyone`` is the last resort.
    ``department_community`` maps a care department to its community (see
    :mod:`models.community`); ``user_community`` maps users of the training history to the
    community they were found in."""

    groups: dict[str, PeerBaseline] = field(default_factory=dict)
    roles: dict[str, PeerBaseline] = field(default_factory=dict)
    everyone: PeerBaseline = field(default_factory=PeerBaseline)
    department_community: dict[str, str] = field(default_factory=dict)
    community_profiles: dict[str, dict[str, float]] = field(default_factory=dict)
    user_community: dict[str, str] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Priors:
        return cls()

    def baseline(self, group: str, role: str) -> PeerBaseline:
        b = self.groups.get(group)
        if b is None:
            b = self.roles.get(role, self.everyone)
        return b

    def community_prior(self, user_id: str, group: str, role: str) -> dict[str, float]:
        """Where the user's community works: the user's own community if the training
        history knew the user, else the peer group's."""
        c = self.user_community.get(user_id)
        if c is not None and c in self.community_profiles:
            return self.community_profiles[c]
        return self.baseline(group, role).communities

    def community_of_department(self, department: str) -> str:
        return self.department_community.get(department, department or NO_COMMUNITY)


def patient_department(ctx: Context, patient_id: str, t: float) -> str:
    """The department caring for the patient at ``t``: that of the encounter active then (or
    starting within a day), else of the latest one begun before ``t``; ``-`` if none."""
    best = None
    for enc in ctx.encounters_of(patient_id):
        if enc.start - 86400.0 > t:
            break
        best = enc
        if t <= enc.end:
            break
    return best.department_id if best is not None else NO_COMMUNITY


class Visit:
    """Accumulates one chart visit; closed when the user moves on."""

    __slots__ = (
        "patient_id",
        "t0",
        "last_t",
        "workstation",
        "department",
        "community",
        "n",
        "unexplained",
        "writes",
        "exfil",
        "denied",
        "off_shift",
        "kinds",
        "evidence",
    )

    def __init__(
        self, patient_id: str, t0: float, workstation: str, department: str, community: str
    ) -> None:
        self.patient_id = patient_id
        self.t0 = t0
        self.last_t = t0
        self.workstation = workstation
        self.department = department
        self.community = community
        self.n = 0
        self.unexplained = 0
        self.writes = 0
        self.exfil = 0
        self.denied = 0
        self.off_shift = 0
        self.kinds: dict[str, int] = {}
        self.evidence: list[tuple[Any, ...]] = []

    def add(
        self,
        kind: str,
        explained: bool,
        write: bool,
        exfil: bool,
        denied: bool,
        off_shift: bool,
        ev: tuple[Any, ...],
    ) -> None:
        self.n += 1
        if ev[1] > self.last_t:  # a late access does not move the visit's end back
            self.last_t = ev[1]
        if not explained:
            self.unexplained += 1
        if write:
            self.writes += 1
        if exfil:
            self.exfil += 1
        if denied:
            self.denied += 1
        if off_shift:
            self.off_shift += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.evidence.append(ev)

    def to_obj(self) -> list[Any]:
        return [
            self.patient_id,
            self.t0,
            self.last_t,
            self.workstation,
            self.department,
            self.community,
            self.n,
            self.unexplained,
            self.writes,
            self.exfil,
            self.denied,
            self.off_shift,
            self.kinds,
            [list(x) for x in self.evidence],
        ]

    @classmethod
    def from_obj(cls, o: list[Any]) -> Visit:
        v = cls(o[0], o[1], o[3], o[4], o[5])
        v.last_t = o[2]
        v.n, v.unexplained, v.writes, v.exfil, v.denied, v.off_shift = o[6:12]
        v.kinds = dict(o[12])
        v.evidence = [tuple(x) for x in o[13]]
        return v


def _visit_order(v: Visit) -> tuple[float, str]:
    return (v.last_t, v.patient_id)


class UserBehaviour:
    """One user's own history, as the features need it. Bounded in size."""

    __slots__ = (
        "open",
        "oldest",
        "kinds",
        "kinds_total",
        "communities",
        "communities_total",
        "write_rate",
        "workstations",
        "patients",
        "recent",
        "recent_comms",
        "hour",
        "hour_count",
        "hourly",
        "visits",
    )

    def __init__(self) -> None:
        self.open: dict[str, Visit] = {}  # patient → open visit
        self.oldest = math.inf  # earliest last access among open visits
        self.kinds: dict[str, int] = {}
        self.kinds_total = 0
        self.communities: dict[str, int] = {}
        self.communities_total = 0
        self.write_rate = -1.0  # EWMA share of visits with a write; -1: none seen yet
        self.workstations: dict[str, float] = {}
        self.patients: dict[str, float] = {}
        self.recent: deque[tuple[float, str]] = deque()  # (visit start, community), last hour
        self.recent_comms: dict[str, int] = {}  # community → visits of it in ``recent``
        self.hour = -1  # index of the current clock hour
        self.hour_count = 0  # visits in it
        self.hourly = -1.0  # EWMA visits per active hour; -1: none yet
        self.visits = 0

    # ----------------------------------------------------------------- visits
    def expired(self, t: float) -> list[Visit]:
        """Remove and return the open visits that ``t`` closes (idle for ``VISIT_GAP_S``, or
        the oldest ones when too many are open), oldest first."""
        opened = self.open
        if t - self.oldest <= VISIT_GAP_S and len(opened) <= MAX_OPEN_VISITS:
            return []
        done = self.idle(t - VISIT_GAP_S)
        if len(opened) > MAX_OPEN_VISITS:
            # the rest are all newer than the idle ones: ``done`` stays oldest first
            extra = sorted(opened.values(), key=_visit_order)[: len(opened) - MAX_OPEN_VISITS]
            for v in extra:
                del opened[v.patient_id]
            self.oldest = min((v.last_t for v in opened.values()), default=math.inf)
            done += extra
        return done

    def idle(self, horizon: float) -> list[Visit]:
        """Remove and return the open visits whose last access is before ``horizon`` (idle
        since), oldest first. Unlike :meth:`expired`, never closes a visit for being one too
        many: that is decided at the user's own accesses only."""
        opened = self.open
        if self.oldest >= horizon:
            return []
        done = sorted((v for v in opened.values() if v.last_t < horizon), key=_visit_order)
        for v in done:
            del opened[v.patient_id]
        self.oldest = min((v.last_t for v in opened.values()), default=math.inf)
        return done

    def close_all(self) -> list[Visit]:
        done = sorted(self.open.values(), key=lambda v: (v.last_t, v.patient_id))
        self.open = {}
        self.oldest = math.inf
        return done

    # ----------------------------------------------------------------- learning
    def learn(
        self, v: Visit, learn_profile: bool, peer_kinds: dict[str, float] | None = None
    ) -> None:
        """Add a closed visit to the user's history. ``learn_profile`` False keeps what a
        model flagged out of the profiles (it still counts for volume and novelty), with one
        exception: a kind of access the user's peers make routinely (share ``peer_kinds`` ≥
        :data:`ROUTINE`) that the user's own history still finds rare is learned anyway.
        Otherwise the user is locked in: the first time they happen to make such an access
        their history says "rare", the visit is flagged and kept out, so the next one is
        rare again, for ever. Kinds the user already makes often are not added (a flagged
        burst of them would make everything else look rare), nor kinds rare for the peers
        (the reads misuse is made of)."""
        self.visits += 1
        kinds = self.kinds
        if learn_profile:
            for k, n in v.kinds.items():
                kinds[k] = kinds.get(k, 0) + n
            self.kinds_total += v.n
            c = v.community
            self.communities[c] = self.communities.get(c, 0) + 1
            self.communities_total += 1
            w = 1.0 if v.writes else 0.0
            self.write_rate = w if self.write_rate < 0 else 0.95 * self.write_rate + 0.05 * w
        elif peer_kinds:
            denom = self.kinds_total + PRIOR_STRENGTH
            for k, n in v.kinds.items():
                q = peer_kinds.get(k, 0.0)
                if q >= ROUTINE and kinds.get(k, 0) + PRIOR_STRENGTH * q < RARE * denom:
                    kinds[k] = kinds.get(k, 0) + n
                    self.kinds_total += n
        ws = self.workstations
        if v.workstation:
            ws[v.workstation] = v.last_t
            if len(ws) > MAX_WORKSTATIONS:
                del ws[min(ws, key=ws.__getitem__)]
        pts = self.patients
        pts[v.patient_id] = v.last_t
        if len(pts) > MAX_PATIENTS:
            for p in sorted(pts, key=pts.__getitem__)[: MAX_PATIENTS // 4]:
                del pts[p]

    def roll(self, t: float, community: str) -> None:
        """A visit starts at ``t``: keep the last hour of visits and the hourly rate."""
        rec = self.recent
        if rec and t < rec[-1][0]:
            self._roll_late(t, community)
            return
        rec.append((t, community))
        comms = self.recent_comms
        comms[community] = comms.get(community, 0) + 1
        horizon = t - HOUR
        while rec and rec[0][0] < horizon:
            c = rec.popleft()[1]
            n = comms[c] - 1
            if n:
                comms[c] = n
            else:
                del comms[c]
        h = int(t // HOUR)
        if h != self.hour:
            if self.hour >= 0 and self.hour_count:
                hn = float(self.hour_count)
                self.hourly = hn if self.hourly < 0 else 0.9 * self.hourly + 0.1 * hn
            self.hour = h
            self.hour_count = 0
        self.hour_count += 1

    def _roll_late(self, t: float, community: str) -> None:
        """A visit that starts behind the newest one (its access arrived late): it counts
        in the last hour if it falls in it, in its place in time, and in the hourly rate if
        its hour is the current one; an earlier hour's rate is already settled."""
        rec = self.recent
        if t >= rec[-1][0] - HOUR:
            rec.insert(bisect_right(rec, t, key=itemgetter(0)), (t, community))
            comms = self.recent_comms
            comms[community] = comms.get(community, 0) + 1
        if int(t // HOUR) == self.hour:
            self.hour_count += 1

    # ----------------------------------------------------------------- persistence
    def to_obj(self) -> dict[str, Any]:
        return {
            "open": [v.to_obj() for v in self.open.values()],
            "kinds": self.kinds,
            "kinds_total": self.kinds_total,
            "communities": self.communities,
            "communities_total": self.communities_total,
            "write_rate": self.write_rate,
            "workstations": self.workstations,
            "patients": self.patients,
            "recent": [list(x) for x in self.recent],
            "hour": [self.hour, self.hour_count, self.hourly],
            "visits": self.visits,
        }

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> UserBehaviour:
        st = cls()
        for vo in o["open"]:
            v = Visit.from_obj(vo)
            st.open[v.patient_id] = v
        st.oldest = min((v.last_t for v in st.open.values()), default=math.inf)
        st.kinds = dict(o["kinds"])
        st.kinds_total = o["kinds_total"]
        st.communities = dict(o["communities"])
        st.communities_total = o["communities_total"]
        st.write_rate = o["write_rate"]
        st.workstations = dict(o["workstations"])
        st.patients = dict(o["patients"])
        st.recent = deque((t, c) for t, c in o["recent"])
        for _, c in st.recent:
            st.recent_comms[c] = st.recent_comms.get(c, 0) + 1
        st.hour, st.hour_count, st.hourly = o["hour"]
        st.visits = o["visits"]
        return st


def _blend(own: dict[str, int], own_total: int, prior: dict[str, float], key: str) -> float:
    """P(key) from the user's own counts with the peer baseline as a Dirichlet prior."""
    p = prior.get(key, 0.0)
    if p < FLOOR:
        p = FLOOR
    return (own.get(key, 0) + PRIOR_STRENGTH * p) / (own_total + PRIOR_STRENGTH)


def visit_features(
    v: Visit,
    st: UserBehaviour,
    priors: Priors,
    group: str,
    role: str,
    user_id: str = "",
) -> dict[str, float]:
    """The features of a closed visit, judged against the user's history *before* it."""
    return features_against(
        v, st, priors.baseline(group, role), priors.community_prior(user_id, group, role)
    )


def features_against(
    v: Visit, st: UserBehaviour, base: PeerBaseline, comm_prior: dict[str, float]
) -> dict[str, float]:
    """:func:`visit_features` with the user's peer baseline and community prior looked up
    already (they depend on the user alone, so the runtime keeps them per user)."""
    n = v.n or 1
    rare = 0.0
    rare_n = 0
    own, prior = st.kinds, base.kinds
    denom = st.kinds_total + PRIOR_STRENGTH
    log = math.log
    for k, c in v.kinds.items():
        q = prior.get(k, 0.0)
        p = (own.get(k, 0) + PRIOR_STRENGTH * (q if q > FLOOR else FLOOR)) / denom
        r = -log(p)
        if r > rare:
            rare = r
        if p < RARE:
            rare_n += c
    outside = -log(_blend(st.communities, st.communities_total, comm_prior, v.community))
    usual_writes = st.write_rate if st.write_rate >= 0 else base.write_visit_share
    usual_rate = max(1.0, st.hourly if st.hourly > 0 else 0.0, base.visits_per_hour)
    last_hour = len(st.recent)
    comms = len(st.recent_comms)  # distinct communities of the last hour's visits
    return {
        "unusual_reads": min(1.0, rare / RARITY_SCALE),
        "unusual_share": rare_n / n,
        "no_work_done": 0.0 if v.writes else usual_writes,
        "outside_community": min(1.0, outside / RARITY_SCALE),
        "unexplained": v.unexplained / n,
        "new_patient": 0.0 if v.patient_id in st.patients else 1.0,
        "off_shift": v.off_shift / n,
        "exfiltration": v.exfil / n,
        "denied": v.denied / n,
        "new_workstation": (
            1.0
            if st.visits >= WARMUP_VISITS and v.workstation and v.workstation not in st.workstations
            else 0.0
        ),
        "patients_per_hour": last_hour / (last_hour + usual_rate),
        "communities_per_hour": min(1.0, (comms - 1) / 5.0) if comms else 0.0,
    }
