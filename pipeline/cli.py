"""The ``emrwatch`` command (CONTRACTS §1)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from emrwatch.timeutil import DEFAULT_TIMEZONE
from pipeline.replay import default_workers


def _config(  # type: ignore[no-untyped-def]
    path: str | None,
    timezone: str | None,
    data: str | None = None,
    fallback: str | None = None,
):
    """The detection config at ``path``, its timezone from ``--timezone``, the file, the data
    directory ``data``'s manifest or ``fallback`` (:meth:`DetectionConfig.load_for`)."""
    from detectors.config import DetectionConfig, TimezoneError

    try:
        cfg, recorded = DetectionConfig.load_for(
            path, timezone, [data] if data is not None else (), fallback
        )
    except TimezoneError as exc:
        raise SystemExit(f"emrwatch: {exc}; give --timezone") from None
    if recorded is not None:
        print(
            f"emrwatch: timezone {recorded}, as {Path(data or '.') / 'manifest.json'} records "
            "(--timezone overrides)",
            file=sys.stderr,
        )
    return cfg


def _busiest(counts: dict[str, int], label: Callable[[str, int], str]) -> str:
    """The five sources with the most accesses in ``counts``, most first, each as
    ``label(source, count)``, and "…" when there are more."""
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(label(w, n) for w, n in top[:5]) + (", …" if len(top) > 5 else "")


def cmd_replay(args: argparse.Namespace) -> int:
    from detectors.engine import FAR_BEHIND_S
    from pipeline.replay import preview_exceptions, replay_file, write_alerts

    cfg = _config(args.config, args.timezone, args.context)
    if args.stream:
        from pipeline.streaming import replay_stream

        alerts = replay_stream(args.context, args.events, args.format, cfg.timezone, args.config)
        with open(args.alerts, "wb") as fh:
            import orjson

            for a in alerts:
                fh.write(orjson.dumps(a) + b"\n")
        print(f"stream replay: {len(alerts)} alerts → {args.alerts}", file=sys.stderr)
        return 0
    res = replay_file(
        args.context,
        args.events,
        args.format,
        cfg.timezone,
        cfg,
        errors=sys.stderr,
        workers=args.workers,
    )
    n = write_alerts(res.alerts, args.alerts)
    print(
        f"replay: {res.events} events ({res.bad} bad lines skipped) in {res.seconds:.2f}s "
        f"= {res.events_per_s:,.0f} ev/s with {res.workers} worker(s), peak {res.peak_rss_mb:,.0f} MiB; "
        f"{res.stats.explained_share:.1%} explained; {n} alerts → {args.alerts}",
        file=sys.stderr,
    )
    st = res.stats
    if st.clock_ahead:
        where = _busiest(st.clock_ahead_from, lambda w, n: f"{w} ({n:,})")
        print(
            f"replay: warning: {st.clock_ahead:,} access(es) stamped more than "
            f"{cfg.replay_clock_ahead_s / 3600:g} h ahead of the lines around them (a wrong "
            "clock at their source?) were judged at the file's time there; from "
            f"{where}; among them: {', '.join(st.clock_ahead_ids)} (README: Input)",
            file=sys.stderr,
        )
    if st.clock_behind:
        where = _busiest(
            st.clock_behind_from,
            lambda w, n: f"{w} ({n:,}, {st.clock_behind_by.get(w, 0) / 3600:.1f} h)",
        )
        print(
            f"replay: warning: {st.clock_behind:,} access(es) from a source whose clock "
            "runs steadily behind the file's (a timezone or clock wrong there?) were judged "
            f"that much later: {where}; a source that really lags by that much, to the minute: "
            "replay_clock_ahead_s: 0 takes stamps as they are (README: Input)"
            + (
                f"; correlations its earlier accesses, taken as stamped, had made were "
                f"withdrawn from {st.withdrawn} case(s)"
                if st.withdrawn
                else ""
            ),
            file=sys.stderr,
        )
    if st.far_behind:
        print(
            f"replay: warning: {st.far_behind} access(es) came more than "
            f"{FAR_BEHIND_S / 3600:.0f} h behind a newer one of the same user: a source far "
            "behind the others, or a wrong clock stamping accesses ahead; the user's windows "
            "and visits around them may be split (README: Input)",
            file=sys.stderr,
        )
    if st.late_allowance:
        print(
            f"replay: accesses arrived up to {st.latest_lag / 60:,.0f} min behind the newest "
            "(a source delivering late or in batches): the learned models waited up to "
            f"{st.late_allowance / 60:,.0f} min before scoring an idle visit "
            f"(model_visit_lateness_s {cfg.model_visit_lateness_s:g} … "
            f"late_allowance_max_s {cfg.late_allowance_max_s:g}); "
            f"{st.too_late:,} access(es) came later than the wait then in force (README: Input)",
            file=sys.stderr,
        )
    if args.preview_exceptions:
        report = preview_exceptions(
            args.context, args.events, args.format, cfg.timezone, cfg, workers=args.workers
        )
        Path(args.preview_exceptions).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(
            f"exceptions would hide {len(report['hidden_alerts'])} alert(s) and shrink "
            f"{len(report['reduced_alerts'])}; details → {args.preview_exceptions}",
            file=sys.stderr,
        )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from pipeline.simulate import simulate

    summary = simulate(
        Path(args.out), days=args.days, seed=args.seed, scale=args.scale, timezone=args.timezone
    )
    print(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate, format_report

    cfg = _config(args.config, args.timezone, args.data)
    report = evaluate(args.data, cfg, cfg.timezone, workers=args.workers)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    """List the rules in force, or run every rule's own examples (exit 1 if one fails)."""
    from detectors.rulecheck import fires
    from detectors.rules import RuleError, load_rules

    if args.action == "simulate":
        return cmd_rules_simulate(args)
    cfg = _config(args.config, None)
    try:
        rules = load_rules(
            args.rules_dir or cfg.rules_dir or None, cfg.disabled_rules, cfg.rule_overrides
        )
    except RuleError as exc:
        print(f"emrwatch rules: {exc}", file=sys.stderr)
        return 1
    if args.action == "list":
        for r in rules:
            kind = "correlation" if r.aggregate else "per event"
            when = " immediate" if r.immediate else ""
            print(f"{r.id:30} {r.level:8}{when:10} {kind:11} {r.title}")
        return 0
    failures = 0
    for r in rules:
        for sign, examples in (
            ("positive", r.examples["positive"]),
            ("negative", r.examples["negative"]),
        ):
            for i, ex in enumerate(examples, 1):
                if fires(r, ex) != (sign == "positive"):
                    failures += 1
                    print(
                        f"FAIL {r.id} ({r.source}): {sign} example {i} "
                        f"{'did not fire' if sign == 'positive' else 'fired'}"
                    )
    n = sum(len(r.examples["positive"]) + len(r.examples["negative"]) for r in rules)
    print(f"{len(rules)} rules, {n} examples, {failures} failed")
    return 1 if failures else 0


def cmd_rules_simulate(args: argparse.Namespace) -> int:
    """``emrwatch rules simulate``: the report of :mod:`pipeline.whatif`."""
    from detectors.rules import RuleError
    from pipeline.whatif import CandidateError, format_change, simulate_change

    if not args.context or not args.events:
        print("emrwatch rules simulate: --context and --events are required", file=sys.stderr)
        return 2
    if not args.rule and not args.candidate_config:
        print(
            "emrwatch rules simulate: nothing to simulate: give --rule FILE.yaml and/or "
            "--candidate-config FILE",
            file=sys.stderr,
        )
        return 2
    current = _config(args.config, args.timezone, args.context)
    if args.rules_dir:
        current.rules_dir = args.rules_dir
    # the candidate judges the same hospital unless it names another zone
    candidate = (
        _config(args.candidate_config, args.timezone, fallback=current.timezone)
        if args.candidate_config
        else None
    )
    try:
        report = simulate_change(
            args.context,
            args.events,
            current,
            candidate,
            rule_files=args.rule,
            labels_path=args.labels,
            fmt=args.format,
            timezone=current.timezone,
            workers=args.workers,
        )
    except (CandidateError, RuleError) as exc:
        print(f"emrwatch rules simulate: the candidate is refused: {exc}", file=sys.stderr)
        return 1
    print(format_change(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emrwatch", description="Privacy monitoring for EMR access logs."
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("replay", help="run an access log through the detectors offline")
    r.add_argument("--context", required=True, help="directory with the context CSVs")
    r.add_argument(
        "--events", required=True, help="events file (FHIR NDJSON, JSONL or CSV; - for stdin)"
    )
    r.add_argument("--format", default="auto", choices=["auto", "fhir", "jsonl", "csv"])
    r.add_argument("--alerts", required=True, help="output JSONL ('-' for stdout)")
    r.add_argument(
        "--timezone", default=None, help=f"hospital timezone (default {DEFAULT_TIMEZONE})"
    )
    r.add_argument("--config", default=None, help="YAML configuration")
    r.add_argument(
        "--stream", action="store_true", help="send the input through Kafka and the Faust workers"
    )
    r.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="parallel processes, partitioned by user like the stream (default: cores, max 4)",
    )
    r.add_argument(
        "--preview-exceptions",
        metavar="REPORT.json",
        default=None,
        help="also write what the configured exceptions hide",
    )
    r.set_defaults(func=cmd_replay)

    s = sub.add_parser("simulate", help="write a simulated hospital with labelled misuse")
    s.add_argument("--out", required=True)
    s.add_argument("--days", type=int, default=7)
    s.add_argument(
        "--seed",
        type=int,
        default=1,
        help="random seed; 20261126 is the held-out evaluation seed: do not tune on it",
    )
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--timezone", default=DEFAULT_TIMEZONE)
    s.set_defaults(func=cmd_simulate)

    ev = sub.add_parser("evaluate", help="replay DIR's events and score against DIR/labels.csv")
    ev.add_argument("--data", required=True)
    ev.add_argument("--config", default=None)
    ev.add_argument("--timezone", default=None)
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--workers", type=int, default=default_workers())
    ev.set_defaults(func=cmd_evaluate)

    ru = sub.add_parser(
        "rules",
        help="list the rules in force, run their examples, or simulate a change on history",
        description="list: the rules in force. test: every rule's own examples. simulate: "
        "replay history under the rules and configuration in force and under a candidate "
        "change (--rule files and/or --candidate-config) and compare the alerts: added, "
        "hidden, altered, per rule, per day, and with --labels the quality of both.",
    )
    ru.add_argument("action", choices=["list", "test", "simulate"])
    ru.add_argument("--rules-dir", default=None, help="a directory of rule YAML files")
    ru.add_argument("--config", default=None, help="the configuration in force (YAML)")
    sim = ru.add_argument_group("simulate")
    sim.add_argument("--context", default=None, help="directory with the context CSVs")
    sim.add_argument("--events", default=None, help="the history: FHIR NDJSON, JSONL or CSV")
    sim.add_argument("--format", default="auto", choices=["auto", "fhir", "jsonl", "csv"])
    sim.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="FILE.yaml",
        help="a candidate rule: replaces the rule with its id, or joins the set (repeatable)",
    )
    sim.add_argument("--candidate-config", default=None, help="the candidate configuration (YAML)")
    sim.add_argument("--labels", default=None, help="labels.csv (event_id,scenario,user_id)")
    sim.add_argument("--json", default=None, metavar="REPORT.json", help="the full report")
    sim.add_argument("--timezone", default=None)
    sim.add_argument("--workers", type=int, default=default_workers())
    ru.set_defaults(func=cmd_rules)

    _add_streaming_commands(sub, sys.argv[1:] if argv is None else argv)
    return p


def _add_streaming_commands(sub: argparse._SubParsersAction, argv: list[str]) -> None:  # type: ignore[type-arg]
    """Commands whose modules pull in Faust, Kafka or the web stack: imported only when
    one of them is the command being run, so ``replay`` starts fast."""
    import importlib

    for name, module, helptext in (
        ("demo", "pipeline.demo", "the whole pipeline on this machine with an embedded broker"),
        ("run", "pipeline.streaming", "production worker on a real Kafka cluster"),
        ("bench", "pipeline.bench", "throughput and latency benchmark"),
        ("users", "pipeline.web.users", "hash passwords for the alert feed's users"),
        (
            "alerts",
            "pipeline.alert_service",
            "production sinks: alert topic → store, Slack, e-mail, feed",
        ),
        (
            "report",
            "pipeline.alerting.report",
            "the periodic privacy report from the alert store (text, JSON, HTML)",
        ),
        (
            "history",
            "pipeline.history",
            "export the access and context topics as a directory replay and training read",
        ),
        (
            "connectors",
            "pipeline.connect",
            "list, check and run connectors; read the receipt ledger",
        ),
        (
            "access-report",
            "pipeline.access_report",
            "who opened a patient's chart (or what a user opened), when, and why",
        ),
        (
            "access-review",
            "pipeline.access_review",
            "accounts and grants to re-check: open-ended, ending, dormant, misused, over-cleared",
        ),
        (
            "assessment",
            "pipeline.assessment",
            "a hospital's periodic security assessment of EMR access (for the regulator)",
        ),
        (
            "assessment-compare",
            "pipeline.assessment",
            "the regulator's table of many hospitals' assessments",
        ),
        (
            "audit-verify",
            "pipeline.alerting.chain",
            "check the alert store's audit log and triage history for changed, removed or "
            "inserted entries (a hash chain), against anchors published earlier",
        ),
        (
            "audit-export",
            "pipeline.alerting.chain",
            "write an excerpt of the audit log that anyone can check without the database "
            "(emrwatch audit-verify --excerpt, with a published anchor)",
        ),
        (
            "audit-head",
            "pipeline.alerting.chain",
            "print the audit log's head (ID:HASH): an anchor to keep outside the database",
        ),
        (
            "assessment-keygen",
            "pipeline.assessment",
            "a key pair to sign assessments: the private key stays, the public one goes to "
            "the regulator",
        ),
    ):
        sp = sub.add_parser(name, help=helptext)
        if name in argv[:1]:
            mod = importlib.import_module(module)
            attr = name.replace("-", "_")
            getattr(mod, f"add_{attr}_arguments")(sp)
            sp.set_defaults(func=getattr(mod, f"cmd_{attr}"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
