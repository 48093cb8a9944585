"""``emrwatch rules simulate``: what a rule or configuration change would have raised on
history, before it is deployed.

The same history is replayed twice through the same engine, once with the rules and
configuration in force (*current*) and once with the change (*candidate*), and the two sets
of alerts are compared. A change often moves the event that opens a case, and with it the
case's stable id, so alerts are matched by substance, not by id: a candidate alert matches
the current alerts on the same user that share an evidence event with it. Then

- **added**: a candidate alert that matches no current alert (new work for reviewers);
- **gone**: a current alert that no candidate alert matches (what the change would hide);
- **changed**: matched, but with another severity, other rules, other evidence, or cut into
  cases differently (alerts are compared in groups that share evidence);
- per rule: findings and alerts under each, the reviewer load per day, and with
  ``labels`` (``event_id,scenario,user_id``, as ``emrwatch simulate`` writes) the quality of
  both (:func:`pipeline.evaluate.score`): recall per scenario and false alerts per 10k.

A candidate rule file (``--rule``) replaces the rule of the same id in the current set or
joins it, and its own examples are run first: a rule whose examples fail is reported, and
:func:`simulate_change` refuses it (:class:`CandidateError`) rather than measure a rule
that does not do what its author wrote down.

>>> [([a.alert_id for a in cur], [b.alert_id for b in cand]) for cur, cand in _groups(
...     [_a("a1", "u1", ["e1", "e2"]), _a("a2", "u2", ["e9"])],
...     [_a("b1", "u1", ["e2"]), _a("b2", "u1", ["e1", "e3"]), _a("b3", "u3", ["e9"])])]
[(['a1'], ['b1', 'b2']), (['a2'], []), ([], ['b3'])]
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from detectors.alerts import Alert
from detectors.config import DetectionConfig
from detectors.rulecheck import fires
from detectors.rules import RuleError, default_rules_dir, load_rules, rule_from_doc
from pipeline.evaluate import score
from pipeline.replay import ReplayResult, replay_file

SEVERITIES = ("critical", "high", "medium", "low")
#: alerts listed one by one in the text report, per kind (the JSON report lists them all)
LIST_LIMIT = 20


class CandidateError(ValueError):
    """The candidate cannot be measured (a rule file that does not load, failing examples)."""


# ---------------------------------------------------------------------- the candidate
def check_rule_file(path: str | Path) -> list[str]:
    """A candidate rule file's problems: it does not load, or its own examples fail."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            return [f"{path.name}: not a rule document"]
        rule = rule_from_doc(doc, source=path.name)
    except (OSError, yaml.YAMLError, RuleError) as exc:
        return [f"{path.name}: {exc}"]
    problems = []
    for sign, examples in (
        ("positive", rule.examples["positive"]),
        ("negative", rule.examples["negative"]),
    ):
        for i, ex in enumerate(examples, 1):
            if fires(rule, ex) != (sign == "positive"):
                verb = "does not fire" if sign == "positive" else "fires"
                problems.append(f"{path.name}: {rule.id}: {sign} example {i} {verb}")
    return problems


def with_rule_files(
    cfg: DetectionConfig, files: Sequence[str | Path], into: Path
) -> DetectionConfig:
    """``cfg`` with its rules directory copied to ``into`` and each rule file in ``files``
    put in: it replaces the file holding the rule of the same id, or joins the set."""
    problems = [p for f in files for p in check_rule_file(f)]
    if problems:
        raise CandidateError("; ".join(problems))
    source = Path(cfg.rules_dir) if cfg.rules_dir else default_rules_dir()
    into.mkdir(parents=True, exist_ok=True)
    ids: dict[str, Path] = {}
    for path in sorted(source.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        target = into / path.name
        shutil.copyfile(path, target)
        if isinstance(doc, dict):
            ids[str(doc.get("id", ""))] = target
    for f in files:
        f = Path(f)
        rid = str(yaml.safe_load(f.read_text(encoding="utf-8")).get("id", ""))
        old = ids.pop(rid, None)
        if old is not None:
            old.unlink()
        shutil.copyfile(f, into / f"zz-candidate-{f.name}")
    load_rules(into, cfg.disabled_rules, cfg.rule_overrides)  # one id each, all valid
    return replace(cfg, rules_dir=str(into))


# ---------------------------------------------------------------------- comparing
def _a(alert_id: str, user_id: str, event_ids: list[str]) -> Alert:
    """A bare alert (doctests)."""
    return Alert(alert_id, [], "low", 0.0, user_id, [], event_ids, "", "", "")


def _groups(
    current: Sequence[Alert], candidate: Sequence[Alert]
) -> list[tuple[list[Alert], list[Alert]]]:
    """The alerts of both runs in groups that share evidence: connected through common
    (user, event) pairs. A group with no candidate alert is hidden by the change, one with
    no current alert is new; the others compare as a whole, since a change may split or
    merge cases as well as alter them."""
    parent = list(range(len(current) + len(candidate)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, a in enumerate([*current, *candidate]):
        for eid in a.event_ids:
            j = first.setdefault((a.user_id, eid), i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, tuple[list[Alert], list[Alert]]] = {}
    for i, a in enumerate(current):
        groups.setdefault(find(i), ([], []))[0].append(a)
    for k, b in enumerate(candidate):
        groups.setdefault(find(len(current) + k), ([], []))[1].append(b)
    return list(groups.values())


def _rules_of(a: Alert) -> list[str]:
    return sorted(set(a.detector))


def _brief(a: Alert, labels: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """One alert in the report; with labels, ``misuse``: the scenarios of its labelled
    evidence (empty: a false alert)."""
    out: dict[str, Any] = {
        "alert_id": a.alert_id,
        "user_id": a.user_id,
        "severity": a.severity,
        "first_seen": a.first_seen,
        "events": len(a.event_ids),
        "rules": _rules_of(a),
        "reason": a.reason,
    }
    if labels is not None:
        out["misuse"] = sorted({labels[e][0] for e in a.event_ids if e in labels})
    return out


def _side(res: ReplayResult, labels: dict[str, tuple[str, str]] | None) -> dict[str, Any]:
    alerts = res.alerts
    per_rule: Counter[str] = Counter()
    for a in alerts:
        per_rule.update(_rules_of(a))
    days = _days(alerts)
    side: dict[str, Any] = {
        "alerts": len(alerts),
        "by_severity": {s: sum(a.severity == s for a in alerts) for s in SEVERITIES},
        "alerts_per_day": round(len(alerts) / days, 2) if days else float(len(alerts)),
        "findings_by_rule": dict(sorted(res.stats.findings.items())),
        "alerts_by_rule": dict(sorted(per_rule.items())),
        "explained_share": round(res.stats.explained_share, 4),
    }
    if labels is not None:
        q = score(res, labels)
        side["quality"] = {
            k: q[k]
            for k in (
                "false_alerts",
                "false_alerts_per_10k_benign",
                "mean_user_recall",
                "min_user_recall",
                "event_recall",
                "benign_explained",
            )
        }
        side["quality"]["user_recall"] = {s: v["user_recall"] for s, v in q["scenarios"].items()}
    return side


def _days(alerts: Sequence[Alert]) -> float:
    """The days the alerts span (first to last first_seen), at least one."""
    if not alerts:
        return 0.0
    times = [datetime.fromisoformat(a.first_seen).timestamp() for a in alerts]
    return max(1.0, (max(times) - min(times)) / 86400)


def _signature(alerts: Sequence[Alert]) -> list[tuple[str, list[str], list[str]]]:
    return sorted((a.severity, _rules_of(a), sorted(a.event_ids)) for a in alerts)


def _worst(alerts: Sequence[Alert]) -> str:
    return min((a.severity for a in alerts), key=SEVERITIES.index)


def compare(
    current: ReplayResult,
    candidate: ReplayResult,
    labels: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The difference between two replays of the same history (see the module doc)."""
    added: list[dict[str, Any]] = []
    gone: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    unchanged = 0
    for cur, cand in _groups(current.alerts, candidate.alerts):
        if not cand:
            gone.extend(_brief(a, labels) for a in cur)
            continue
        if not cur:
            added.extend(_brief(b, labels) for b in cand)
            continue
        if _signature(cur) == _signature(cand):
            unchanged += 1
            continue
        first = min(cur, key=lambda a: (a.first_seen, a.alert_id))
        diff: dict[str, Any] = {
            "user_id": first.user_id,
            "first_seen": first.first_seen,
            "alert_id": first.alert_id,
            "current": [_brief(a, labels) for a in cur],
            "candidate": [_brief(b, labels) for b in cand],
        }
        if len(cur) != len(cand):
            diff["alerts"] = [len(cur), len(cand)]
        if _worst(cur) != _worst(cand):
            diff["severity"] = [_worst(cur), _worst(cand)]
        ra = {r for a in cur for r in _rules_of(a)}
        rb = {r for b in cand for r in _rules_of(b)}
        if ra != rb:
            diff["rules_added"] = sorted(rb - ra)
            diff["rules_removed"] = sorted(ra - rb)
        ea = {e for a in cur for e in a.event_ids}
        eb = {e for b in cand for e in b.event_ids}
        if ea != eb:
            diff["events"] = [len(ea), len(eb)]
            diff["events_added"] = len(eb - ea)
            diff["events_removed"] = len(ea - eb)
        if not {"alerts", "severity", "rules_added", "events"} & diff.keys():
            diff["regrouped"] = True  # the same evidence, rules and worst severity, cut differently
        changed.append(diff)
    key = lambda x: (x["first_seen"], x["alert_id"])  # noqa: E731
    return {
        "events": current.events,
        "current": _side(current, labels),
        "candidate": _side(candidate, labels),
        "added": sorted(added, key=key),
        "gone": sorted(gone, key=key),
        "changed": sorted(changed, key=key),
        "unchanged": unchanged,
    }


def simulate_change(
    context_dir: str | Path,
    events_path: str | Path,
    current: DetectionConfig,
    candidate: DetectionConfig | None = None,
    rule_files: Sequence[str | Path] = (),
    labels_path: str | Path | None = None,
    fmt: str = "auto",
    timezone: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Replay the history under ``current`` and under the candidate (``candidate``, default
    ``current``, with ``rule_files`` put in) and compare; see the module doc."""
    from pipeline.evaluate import load_labels

    labels = load_labels(Path(labels_path)) if labels_path else None
    with tempfile.TemporaryDirectory(prefix="emrwatch-whatif-") as tmp:
        cand = candidate or current
        if rule_files:
            cand = with_rule_files(cand, rule_files, Path(tmp) / "rules")
        runs = [
            replay_file(
                context_dir,
                events_path,
                fmt,
                timezone,
                cfg,
                workers=workers,
                collect_unexplained=labels is not None,
            )
            for cfg in (current, cand)
        ]
    report = compare(runs[0], runs[1], labels)
    report["rules"] = {
        "current": [
            r.id
            for r in load_rules(
                current.rules_dir or None, current.disabled_rules, current.rule_overrides
            )
        ],
        "candidate_files": [str(f) for f in rule_files],
    }
    return report


# ---------------------------------------------------------------------- the text report
def _delta(a: float, b: float, fmt: str = "{:g}") -> str:
    d = b - a
    return "" if d == 0 else ("+" if d > 0 else "−") + fmt.format(abs(d))


def format_change(r: dict[str, Any], limit: int = LIST_LIMIT) -> str:
    cur, cand = r["current"], r["candidate"]
    lines = [
        f"events replayed: {r['events']:,}",
        f"{'':34} {'current':>9} {'candidate':>9} {'change':>8}",
    ]

    def row(label: str, a: float, b: float, fmt: str = "{:g}") -> None:
        lines.append(f"{label:34} {fmt.format(a):>9} {fmt.format(b):>9} {_delta(a, b, fmt):>8}")

    row("alerts", cur["alerts"], cand["alerts"])
    for s in SEVERITIES:
        row(f"  {s}", cur["by_severity"][s], cand["by_severity"][s])
    row("alerts per day", cur["alerts_per_day"], cand["alerts_per_day"], "{:.1f}")
    if "quality" in cur:
        qa, qb = cur["quality"], cand["quality"]
        row("false alerts", qa["false_alerts"], qb["false_alerts"])
        row(
            "false alerts / 10k benign",
            qa["false_alerts_per_10k_benign"],
            qb["false_alerts_per_10k_benign"],
            "{:.2f}",
        )
        row("user recall, mean", qa["mean_user_recall"], qb["mean_user_recall"], "{:.3f}")
        row("user recall, lowest scenario", qa["min_user_recall"], qb["min_user_recall"], "{:.3f}")
        row("event recall", qa["event_recall"], qb["event_recall"], "{:.3f}")
        for scn in sorted(qa["user_recall"].keys() | qb["user_recall"].keys()):
            a, b = qa["user_recall"].get(scn, 0.0), qb["user_recall"].get(scn, 0.0)
            if a != b:
                row(f"  user recall {scn}", a, b, "{:.3f}")
    lines += ["", f"{'rule':34} {'findings':>19} {'alerts':>19}"]
    for rid in sorted(
        cur["findings_by_rule"].keys()
        | cand["findings_by_rule"].keys()
        | cur["alerts_by_rule"].keys()
        | cand["alerts_by_rule"].keys()
    ):
        fa, fb = cur["findings_by_rule"].get(rid, 0), cand["findings_by_rule"].get(rid, 0)
        aa, ab = cur["alerts_by_rule"].get(rid, 0), cand["alerts_by_rule"].get(rid, 0)
        mark = "" if (fa, aa) == (fb, ab) else "  *"
        lines.append(f"{rid:34} {fa:>9,} → {fb:<7,} {aa:>9,} → {ab:<7,}{mark}")

    def listing(title: str, items: list[dict[str, Any]]) -> None:
        lines.extend(["", f"{title} ({len(items)})"])
        for x in items[:limit]:
            truth = ""
            if "misuse" in x:
                truth = f"[{','.join(x['misuse']) or 'false alert'}] "
            lines.append(
                f"  {x['first_seen'][:16]}  {x['user_id']:10} {x['severity']:8} "
                f"{x['events']:4} ev  {truth}{','.join(x['rules'])}: {x['reason'][:90]}"
            )
        if len(items) > limit:
            lines.append(f"  … {len(items) - limit} more in the JSON report")

    listing("alerts the change adds", r["added"])
    listing("alerts the change would hide", r["gone"])
    lines.extend(
        [
            "",
            f"alerts the change alters: {len(r['changed'])} group(s) of alerts sharing evidence "
            f"({r['unchanged']} unchanged)",
        ]
    )
    for x in r["changed"][:limit]:
        parts = []
        if "alerts" in x:
            parts.append(f"{x['alerts'][0]} alerts → {x['alerts'][1]}")
        if "severity" in x:
            parts.append(f"severity {x['severity'][0]} → {x['severity'][1]}")
        if x.get("rules_added"):
            parts.append("+" + ",".join(x["rules_added"]))
        if x.get("rules_removed"):
            parts.append("−" + ",".join(x["rules_removed"]))
        if "events" in x:
            parts.append(f"evidence {x['events'][0]} → {x['events'][1]} events")
        if x.get("regrouped"):
            parts.append("the same evidence, cut into cases differently")
        lines.append(f"  {x['first_seen'][:16]}  {x['user_id']:10} " + "; ".join(parts))
    if len(r["changed"]) > limit:
        lines.append(f"  … {len(r['changed']) - limit} more in the JSON report")
    return "\n".join(lines)
