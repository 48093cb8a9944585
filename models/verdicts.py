"""Analysts' verdicts as training labels: the feedback loop from triage back to the models.

A hospital has no ``labels.csv``: what it has is the alert store, where analysts close
cases as ``closed_confirmed`` (misuse) or ``closed_benign``. :class:`Verdicts` reads
those decisions and answers the two questions training asks:

- *is this access misuse?* (:meth:`Verdicts.labels`): the evidence of confirmed alerts;
  the population models are fitted on every other visit;
- *is this case misuse?* (:meth:`Verdicts.case_verdict`): 1 if it shares an access with a
  confirmed alert, otherwise ``None`` (unknown, left out) if it shares one with an alert
  nobody has decided yet, otherwise 0: closed benign, or never alerted at all.

The case an analyst judged and the case the training replay rebuilds need not be the same
(other model versions group differently), so they are matched by shared access events,
never by alert id. ``python -m models.verdicts --store URL --out labels.csv`` writes the
confirmed accesses in the ``labels.csv`` format (``event_id,scenario,user_id``, scenario
= the alert's first detector), so ``emrwatch evaluate`` and the notebooks can score the
detectors on a hospital's own history.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: the ``scenario`` of an access an analyst confirmed, when its alert names no detector
CONFIRMED = "confirmed"


@dataclass
class Verdicts:
    """Decided alerts, flattened to their access events."""

    confirmed: dict[str, tuple[str, str]] = field(default_factory=dict)  # event → (scn, user)
    benign: set[str] = field(default_factory=set)
    undecided: set[str] = field(default_factory=set)
    alerts: dict[str, int] = field(default_factory=lambda: {"confirmed": 0, "benign": 0})
    source: str = ""
    since: datetime | None = None

    @classmethod
    def from_labels(
        cls,
        labels: Iterable[Any],
        undecided: Iterable[str] = (),
        source: str = "",
        since: datetime | None = None,
    ) -> Verdicts:
        """From :class:`pipeline.alerting.Label` rows (oldest decision first) and the
        evidence of the alerts nobody has decided. Verdicts decided before ``since`` are not
        counted: their accesses are neither misuse nor benign (not "never alerted"). An access in a confirmed alert is misuse
        even if another alert holding it was closed benign (a wider case can be benign as a
        whole and still hold the one access someone else confirmed)."""
        v = cls(source=source, since=since)
        earlier: set[str] = set()
        for lb in labels:
            if since is not None and lb.decided_at < since:
                earlier.update(lb.event_ids)  # decided under an older policy: not counted
                continue
            v.alerts[lb.verdict] = v.alerts.get(lb.verdict, 0) + 1
            if lb.verdict == "confirmed":
                scn = lb.detectors[0] if lb.detectors else CONFIRMED
                for e in lb.event_ids:
                    v.confirmed.setdefault(e, (scn, lb.user_id))
            else:
                v.benign.update(lb.event_ids)
        v.benign -= v.confirmed.keys()
        v.undecided = (set(undecided) | earlier) - v.confirmed.keys()
        return v

    @classmethod
    def from_store(cls, url: str, since: datetime | None = None) -> Verdicts:
        """The verdicts in the alert store at ``url`` (those decided before ``since`` only
        mark their accesses as not counted);
        ``ValueError`` if there is no alert store there."""
        from sqlalchemy import inspect
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import SQLAlchemyError

        from pipeline.alerting.store import AlertStore

        try:
            u = make_url(url)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises several kinds here
            raise ValueError(f"{url!r} is not a database URL ({exc})") from None
        db = u.database or ""
        if (
            u.drivername.startswith("sqlite")
            and db not in ("", ":memory:")
            and not Path(db).is_file()
        ):
            raise ValueError(f"no alert store at {db} (the file does not exist)")
        with AlertStore(url, migrate=False) as store:
            try:
                if not inspect(store.engine).has_table("alerts"):
                    raise ValueError(f"{_redact(url)} holds no alert store (no alerts table)")
            except SQLAlchemyError as exc:
                raise ValueError(f"cannot read the alert store {_redact(url)}: {exc}") from None
            return cls.from_labels(
                store.labels(),
                store.undecided_event_ids(),
                source=_redact(url),
                since=since,
            )

    def labels(self) -> dict[str, tuple[str, str]]:
        """event id → (scenario, user id) of every confirmed access."""
        return self.confirmed

    def case_verdict(self, event_ids: Iterable[str]) -> int | None:
        """1 misuse, 0 benign, ``None`` unknown (see the module's docstring)."""
        ids = set(event_ids)
        if not ids.isdisjoint(self.confirmed):
            return 1
        if not ids.isdisjoint(self.undecided):
            return None
        return 0

    def describe(self) -> dict[str, Any]:
        """For the registry's metadata: where the labels came from and how many."""
        return {
            "source": f"analyst verdicts in the alert store {self.source}".strip(),
            "decided_since": self.since.isoformat() if self.since else None,
            "confirmed_alerts": self.alerts.get("confirmed", 0),
            "benign_alerts": self.alerts.get("benign", 0),
            "confirmed_events": len(self.confirmed),
            "benign_events": len(self.benign),
            "undecided_events": len(self.undecided),
        }

    def write_labels_csv(self, path: Path | str) -> int:
        """The confirmed accesses as ``labels.csv``; returns how many rows."""
        rows = [["event_id", "scenario", "user_id"]]
        rows += [[e, scn, user] for e, (scn, user) in sorted(self.confirmed.items())]
        if str(path) == "-":
            csv.writer(sys.stdout).writerows(rows)
        else:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows(rows)
        return len(self.confirmed)


def _redact(url: str) -> str:
    """The store's URL without a password, for metadata that is committed."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is reported as given
        return url.split("@")[-1]


def parse_since(text: str | None) -> datetime | None:
    """``YYYY-MM-DD`` or an ISO timestamp (UTC unless it says otherwise)."""
    if not text:
        return None
    d = datetime.fromisoformat(text)
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def load_or_exit(
    parser: argparse.ArgumentParser, url: str, since: str | None, since_flag: str
) -> Verdicts:
    """:meth:`Verdicts.from_store` for a command line: a bad date or a missing store ends
    the command with a usage error naming the option."""
    try:
        when = parse_since(since)
    except ValueError:
        parser.error(f"{since_flag} {since!r}: not a date (YYYY-MM-DD) or ISO timestamp")
    try:
        return Verdicts.from_store(url, when)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models.verdicts",
        description="write the analysts' confirmed accesses from the alert store as labels.csv",
    )
    p.add_argument("--store", required=True, help="the alert store's URL (sqlite:///… or …)")
    p.add_argument("--since", help="only verdicts decided at or after this (YYYY-MM-DD)")
    p.add_argument("--out", default="-", help="labels.csv to write (default: standard output)")
    a = p.parse_args(argv)
    v = load_or_exit(p, a.store, a.since, "--since")
    n = v.write_labels_csv(a.out)
    d = v.describe()
    print(
        f"{n} confirmed access(es) from {d['confirmed_alerts']} confirmed alert(s); "
        f"{d['benign_alerts']} alert(s) closed benign, {d['undecided_events']} access(es) "
        "in alerts not yet decided",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
