"""Suppressions: analyst-approved exceptions born from benign verdicts, with a preview.

A suppression has the fields of :class:`detectors.config.Exception_` (rule, user, role,
department, patient, workstation, until) and becomes one for the detection engine
(:meth:`SuppressionsMixin.exceptions`). Before one is saved, :meth:`preview_suppression`
shows which stored alerts it would have hidden wholly, and which only in part.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select, true, update

from detectors.config import Exception_
from pipeline.alerting import schema as t
from pipeline.alerting.records import (
    _SUMMARY_COLS,
    AlertSummary,
    InvalidTransition,
    StoredAlert,
    StoreParts,
    Suppression,
    SuppressionPreview,
    SuppressionSpec,
    UnknownAlert,
    _aware,
    _aware_opt,
    _new_id,
    _summary,
)


class SuppressionsMixin(StoreParts):
    """The suppression part of :class:`~pipeline.alerting.store.AlertStore`."""

    # provided by AlertStore
    def get(self, alert_id: str) -> StoredAlert | None:
        raise NotImplementedError

    @staticmethod
    def _audit(
        conn: Connection, at: datetime, actor: str, action: str, alert_id: str | None, detail: str
    ) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ suppressions
    def suppression_from_alert(
        self,
        alert_id: str,
        scope: Sequence[str] = ("user_id",),
        until: str = "",
        description: str = "",
    ) -> list[SuppressionSpec]:
        """Specs that would silence alerts like this one: one per rule it fired, narrowed
        by the alert's ``scope`` fields (user_id, role, department, patient_id)."""
        stored = self.get(alert_id)
        if stored is None:
            raise UnknownAlert(f"no alert {alert_id!r} in the store")
        al = stored.alert
        pats = list(dict.fromkeys(al.get("patient_ids") or []))
        base = {
            "user_id": al.get("user_id", "") if "user_id" in scope else "",
            "role": al.get("role", "") if "role" in scope else "",
            "department": al.get("department_id", "") if "department" in scope else "",
        }
        patient_scopes = pats if "patient_id" in scope and pats else [""]
        desc = description or f"from benign verdict on {alert_id}"
        return [
            SuppressionSpec(rule=rule, patient_id=p, until=until, description=desc, **base)
            for rule in (al.get("detector") or ["*"])
            for p in patient_scopes
        ]

    def add_suppression(
        self, spec: SuppressionSpec, actor: str, source_alert_id: str | None = None
    ) -> Suppression:
        """Create a suppression; when it cites an alert, that alert's verdict must be benign."""
        if not actor:
            raise InvalidTransition("a suppression needs the actor's identity")
        with self.write() as conn:
            if source_alert_id is not None:
                a = t.alerts
                v = conn.execute(select(a.c.verdict).where(a.c.alert_id == source_alert_id)).first()
                if v is None:
                    raise UnknownAlert(f"no alert {source_alert_id!r} in the store")
                if v.verdict != "benign":
                    raise InvalidTransition(
                        f"alert {source_alert_id} has verdict {v.verdict!r}: only a benign "
                        "verdict can create a suppression"
                    )
            sid = self._insert_suppression(conn, spec, actor, source_alert_id, self.now())
        out = [s for s in self.suppressions(active_only=False) if s.id == sid]
        return out[0]

    def _insert_suppression(
        self,
        conn: Connection,
        spec: SuppressionSpec,
        actor: str,
        source_alert_id: str | None,
        now: datetime,
    ) -> int:
        vals = {f.name: getattr(spec, f.name) for f in fields(SuppressionSpec)}
        res = conn.execute(
            insert(t.suppressions).values(
                **vals,
                source_alert_id=source_alert_id,
                created_by=actor,
                created_at=now,
                active=True,
            )
        )
        sid = _new_id(res)
        self._audit(
            conn,
            now,
            actor,
            "suppression.create",
            source_alert_id,
            json.dumps({"id": sid, **vals}, sort_keys=True),
        )
        return sid

    def revoke_suppression(self, suppression_id: int, actor: str) -> None:
        s = t.suppressions
        with self.write() as conn:
            now = self.now()
            n = conn.execute(
                update(s)
                .where(s.c.id == suppression_id, s.c.active.is_(True))
                .values(active=False, revoked_by=actor, revoked_at=now)
            ).rowcount
            if not n:
                raise KeyError(f"no active suppression {suppression_id}")
            self._audit(
                conn, now, actor, "suppression.revoke", None, json.dumps({"id": suppression_id})
            )

    def suppressions(self, active_only: bool = True) -> list[Suppression]:
        s = t.suppressions
        q = select(s).order_by(s.c.id)
        if active_only:
            q = q.where(s.c.active.is_(True))
        with self.read() as conn:
            rows = conn.execute(q).all()
        names = {f.name for f in fields(Suppression)}
        out = []
        for r in rows:
            d = {k: v for k, v in r._mapping.items() if k in names}
            d["created_at"] = _aware(d["created_at"])
            d["revoked_at"] = _aware_opt(d["revoked_at"])
            out.append(Suppression(**d))
        return out

    def exceptions(self, on: str = "") -> list[Exception_]:
        """Active suppressions as detection-config exceptions (lapsed ones left out)."""
        return [
            s.to_exception() for s in self.suppressions() if not (on and s.until and s.until < on)
        ]

    def preview_suppression(self, *specs: SuppressionSpec, limit: int = 20) -> SuppressionPreview:
        """Which stored alerts these suppressions would have hidden, wholly or in part.

        A finding is covered when the alert's rule, user, role and department match and its
        evidence falls on or before ``until``. An alert is *hidden* when every rule it fired
        is covered for all of its patients, *reduced* when only some are. Alerts do not
        record workstations, so a workstation-scoped suppression can only reduce.
        """
        if not specs:
            raise ValueError("preview_suppression needs at least one suppression spec")
        a = t.alerts
        caveats = []
        if any(s.workstation for s in specs):
            caveats.append(
                "alerts do not record workstations: workstation-scoped suppressions are "
                "counted as reducing the alerts they match, never as hiding them"
            )
        need_patients = any(s.patient_id for s in specs)
        cols = [*_SUMMARY_COLS]
        if need_patients:
            cols.append(a.c.payload)
        ors: list[Any] = []
        everything = False
        for s in specs:
            c = []
            if s.user_id:
                c.append(a.c.user_id == s.user_id)
            if s.role:
                c.append(a.c.role == s.role)
            if s.department:
                c.append(a.c.department_id == s.department)
            if s.rule not in ("", "*"):
                d = t.alert_detectors
                c.append(a.c.alert_id.in_(select(d.c.alert_id).where(d.c.detector == s.rule)))
            if c:
                ors.append(and_(*c))
            else:
                everything = True
        where = true() if everything else or_(*ors)
        q = select(*cols).where(where).order_by(a.c.last_seen.desc(), a.c.alert_id.desc())
        hidden: list[AlertSummary] = []
        reduced: list[AlertSummary] = []
        n_hidden = n_reduced = 0
        with self.read() as conn:
            for r in conn.execute(q.execution_options(yield_per=2000)):
                full, part = _coverage(r, specs, need_patients)
                if full:
                    n_hidden += 1
                    if len(hidden) < limit:
                        hidden.append(_summary(r))
                elif part:
                    n_reduced += 1
                    if len(reduced) < limit:
                        reduced.append(_summary(r))
        return SuppressionPreview(n_hidden, n_reduced, hidden, reduced, caveats)


def _coverage(r: Any, specs: Sequence[SuppressionSpec], with_patients: bool) -> tuple[bool, bool]:
    """(every rule of the alert fully covered, some rule at least partly covered)."""
    rules = [d for d in r.detectors.split(",") if d] or ["*"]
    patients = set((r.payload or {}).get("patient_ids") or []) if with_patients else set()
    first_day = (r.first_seen_text or r.last_seen_text)[:10]
    last_day = r.last_seen_text[:10]
    full_rules: set[str] = set()
    part = False
    for s in specs:
        if (s.user_id and s.user_id != r.user_id) or (s.role and s.role != r.role):
            continue
        if s.department and s.department != r.department_id:
            continue
        if s.until and first_day > s.until:
            continue
        for rule in rules:
            if s.rule not in ("", "*", rule):
                continue
            whole = not s.workstation and not (s.until and last_day > s.until)
            if s.patient_id:
                if s.patient_id not in patients:
                    continue
                whole = whole and patients <= {s.patient_id}
            part = True
            if whole:
                full_rules.add(rule)
    return set(rules) <= full_rules, part
