"""The yardstick for replay speed: a plain single-pass Python rule script.

Issue #2 sets replay's goal against this kind of script ("a plain single-pass Python rule
script already does about 70,000/s here"; the goal is 100,000/s). Machines differ from run
to run, so ``emrwatch bench`` measures this script on the same input in the same run and
reports replay as a multiple of it: the goal is 100/70 ≈ 1.43× the script.

The script is what someone would write in an afternoon: the standard library's ``json``,
``datetime.fromisoformat``, the context CSVs in dicts, and a naive event-by-event rule set
(sealed record, VIP, self-access, no encounter in the user's department, off-hours,
export/print, denied). It has no explanations, cases or models and raises an alert per
event, which is why it is fast and why it flags thousands of accesses per 10,000. It is a
yardstick, not a detector: nothing else imports it.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

EXPORTS = frozenset({"export", "print", "copy"})  # canonical actions; FHIR: action "E"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def run(data: Path) -> dict[str, Any]:
    """Read ``data``'s context, then events.ndjson in one pass; events/s and alert count.
    The time is the pass over the events only, as replay's is (context loading excluded)."""
    staff = {r["user_id"]: r for r in _rows(data / "staff.csv")}
    patients = {r["patient_id"]: r for r in _rows(data / "patients.csv")}
    sealed = {r["patient_id"] for r in _rows(data / "sealed.csv")}
    depts_of: dict[str, set[str]] = defaultdict(set)
    for r in _rows(data / "encounters.csv"):
        depts_of[r["patient_id"]].add(r["department_id"])
    alerts = events = bad = 0
    t0 = time.perf_counter()
    with open(data / "events.ndjson", "rb") as fh:
        for line in fh:
            try:
                ev = json.loads(line)
                if "resourceType" in ev:  # FHIR AuditEvent
                    who = ev["agent"][0]["who"]
                    ident = who.get("identifier", {}).get("value")
                    user = ident or who["reference"].rpartition("/")[2]
                    patient = ""
                    for ent in ev.get("entity", []):
                        ref = ent.get("what", {}).get("reference", "")
                        if ref.startswith("Patient/"):
                            patient = ref[8:]
                    hour = datetime.fromisoformat(ev["recorded"]).hour
                    export = ev.get("action", "R") == "E"
                    denied = ev.get("outcome", "0") != "0"
                else:  # canonical JSONL
                    user, patient = ev["user_id"], ev["patient_id"]
                    hour = datetime.fromisoformat(ev["ts"]).hour
                    export = ev["action"] in EXPORTS
                    denied = ev.get("outcome", "success") != "success"
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                bad += 1
                continue
            events += 1
            s = staff.get(user)
            p = patients.get(patient)
            hits = 0
            if patient in sealed:
                hits += 1
            if p is not None and p["vip"] == "1":
                hits += 1
            if p is not None and p["employee_user_id"] == user:
                hits += 1
            if s is not None and s["department_id"] not in depts_of.get(patient, ()):
                hits += 1
            if hour < 6 or hour >= 22:
                hits += 1
            if export:
                hits += 1
            if denied:
                hits += 1
            if hits:
                alerts += 1
    seconds = time.perf_counter() - t0
    return {
        "events": events,
        "bad": bad,
        "alerts": alerts,
        "seconds": seconds,
        "events_per_s": events / seconds if seconds else 0.0,
    }


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]))))
