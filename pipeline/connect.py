"""``emrwatch connectors``: list connector types, check a config, run connectors, read the
ledger of what each source sent.

::

    emrwatch connectors list [--json]              # types, summaries, config keys
    emrwatch connectors check --config FILE        # validate the connectors of a run config
    emrwatch connectors run --config FILE [--only NAME ...] [--metrics-port N]
    emrwatch connectors ledger --state DIR [--source NAME] [--json]
    emrwatch connectors bench [--events N] [--json]   # events/s of the file connectors

``run`` starts every configured connector in its own thread with the runner of
:mod:`connectors.runner` (checkpoints in ``ingest.state_dir``), until the ``once`` sources
are done and SIGINT/SIGTERM stops the rest. ``emrwatch run`` starts the same connectors
beside its worker.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("emrwatch.connectors")


def add_connectors_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="connectors_cmd", required=True)
    ls = sub.add_parser("list", help="connector types with their config keys")
    ls.add_argument("--json", action="store_true", help="JSON Schema of every type's config")
    ck = sub.add_parser("check", help="validate the connectors of a run config")
    ck.add_argument("--config", required=True)
    run = sub.add_parser("run", help="run the configured connectors into Kafka")
    run.add_argument("--config", required=True)
    run.add_argument("--only", action="append", default=[], help="run only this source name")
    run.add_argument("--bootstrap", default=None, help="override kafka.bootstrap_servers")
    run.add_argument("--metrics-port", type=int, default=-1, help="serve /metrics (-1: off)")
    run.add_argument("--log-level", default="INFO")
    b = sub.add_parser("bench", help="events/s of the file connectors (normalize, to broker)")
    b.add_argument("--events", type=int, default=50_000)
    b.add_argument("--bootstrap", default=None, help="a broker to use (default: embedded)")
    b.add_argument("--json", action="store_true")
    led = sub.add_parser("ledger", help="what each source sent: receipts per unit")
    led.add_argument("--state", required=True, help="the ingest.state_dir of the config")
    led.add_argument("--source", default=None)
    led.add_argument("--limit", type=int, default=50)
    led.add_argument("--json", action="store_true")


def cmd_connectors(args: argparse.Namespace) -> int:
    cmds = {"list": _list, "check": _check, "run": _run, "ledger": _ledger, "bench": _bench}
    return cmds[args.connectors_cmd](args)


def _bench(args: argparse.Namespace) -> int:
    from connectors.bench import run

    results = run(args.events, args.bootstrap)
    if args.json:
        sys.stdout.write(orjson.dumps(results).decode() + "\n")
        return 0
    print(f"{'source':28} {'normalize ev/s':>15} {'to broker ev/s':>15}")
    for label, r in results.items():
        print(f"{label:28} {r['normalize_per_s']:>15,} {r['to_broker_per_s']:>15,}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from connectors.base import ConnectorConfigError, config_schema
    from connectors.registry import connector_class, connector_types

    out: dict[str, Any] = {}
    for t in connector_types():
        try:
            cls = connector_class(t)
        except ConnectorConfigError as exc:
            out[t] = {"error": str(exc)}
            continue
        out[t] = {
            "summary": cls.summary,
            "produces": sorted(cls.produces),
            "config": config_schema(cls.Config),
        }
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for t, info in out.items():
        if "error" in info:
            print(f"{t}\n    (cannot load: {info['error']})")
            continue
        print(f"{t}  [{', '.join(info['produces'])}]\n    {info['summary']}")
        req = set(info["config"].get("required", ()))
        for key, s in info["config"]["properties"].items():
            mark = " (required)" if key in req else f" = {s.get('default')!r}"
            print(f"    {key}{mark}: {s.get('description', '')}")
    return 0


def _settings(path: str, bootstrap: str | None = None) -> Any:
    from pipeline.stream_config import load_settings

    s = load_settings(path)
    return s.with_bootstrap(bootstrap) if bootstrap else s


def _check(args: argparse.Namespace) -> int:
    from pipeline.stream_config import StreamConfigError

    try:
        s = _settings(args.config)
    except (StreamConfigError, OSError) as exc:
        print(f"emrwatch connectors: {exc}", file=sys.stderr)
        return 2
    for c in s.build_connectors():
        print(f"ok  {c.name} ({c.type})")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from connectors.state import SqliteLedger

    path = Path(args.state) / "ledger.sqlite"
    if not path.exists():
        print(f"emrwatch connectors: no ledger at {path}", file=sys.stderr)
        return 2
    led = SqliteLedger(path)
    try:
        summary = led.summary()
        rows = led.rows(args.source, args.limit)
    finally:
        led.close()
    if args.json:
        sys.stdout.write(orjson.dumps({"summary": summary, "receipts": rows}).decode() + "\n")
        return 0
    print(f"{'source':24} {'status':12} {'units':>7} {'records':>10} {'bytes':>12}")
    for r in summary:
        print(
            f"{r['source']:24} {r['status']:12} {r['units']:>7} {r['records']:>10} {r['bytes']:>12}"
        )
    return 0


class ConnectorService:
    """Runs a set of connectors, one thread each, until they end or :meth:`stop`."""

    def __init__(
        self,
        settings: Any,
        producer: Any = None,
        only: list[str] | None = None,
        metrics: Any = None,
    ) -> None:
        from connectors.state import CheckpointStore, SqliteLedger, safe_name

        state = Path(settings.ingest.state_dir)
        self.ledger = SqliteLedger(state / "ledger.sqlite")
        self.store = CheckpointStore(state / "checkpoints")
        ledger: Any = self.ledger
        if metrics is not None:
            from connectors.metrics import MeteredLedger

            ledger = MeteredLedger(self.ledger, metrics)
        connectors = settings.build_connectors(ledger=ledger)
        for c in connectors:
            c.use_state_dir(state / "spool" / safe_name(c.name))
        if only:
            unknown = set(only) - {c.name for c in connectors}
            if unknown:
                raise ValueError(f"--only: no connector named {sorted(unknown)}")
            connectors = [c for c in connectors if c.name in only]
        self.settings = settings
        if producer is None:  # librdkafka: ~4x kafka-python, see connectors/producer.py
            from connectors.producer import make_connector_producer

            producer = make_connector_producer(settings.kafka)
        self.producer = producer
        self.connectors = connectors
        self.metrics = metrics
        if metrics is not None:
            metrics.watch(connectors)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}

    def start(self) -> None:
        from connectors.runner import ConnectorRunner

        s = self.settings
        for c in self.connectors:
            on_batch = _batch_counter(self.metrics, c.name) if self.metrics is not None else None
            runner = ConnectorRunner(
                c,
                self.producer,
                s.topics,
                self.store,
                bootstrap=s.kafka.bootstrap_servers,
                client_config=s.kafka.kafka_python(),
                batch_size=s.ingest.batch_size,
                linger_s=s.ingest.linger_s,
                metrics=self.metrics,
                on_batch=on_batch,
            )

            def work(r: Any = runner, name: str = c.name) -> None:
                try:
                    self.results[name] = r.run(self.stop_event)
                    log.info("connector %s finished: %s", name, self.results[name].as_dict())
                except BaseException as exc:
                    self.errors[name] = exc
                    log.exception("connector %s failed", name)

            t = threading.Thread(target=work, name=f"connector-{c.name}", daemon=True)
            t.start()
            self.threads.append(t)
            log.info("connector %s (%s) started: %s", c.name, c.type, c.describe())

    def wait(self) -> None:
        for t in self.threads:
            while t.is_alive():
                t.join(0.5)

    def stop(self) -> None:
        self.stop_event.set()


def _batch_counter(metrics: Any, name: str) -> Callable[[Any], None]:
    """A runner's ``on_batch``: counts connector ``name``'s batches in ``metrics``."""

    def count(_stats: Any) -> None:
        metrics.batch(name)

    return count


def _run(args: argparse.Namespace) -> int:
    from pipeline.stream_config import StreamConfigError
    from pipeline.streaming import check_reachable
    from pipeline.topics import ensure_topics

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        s = _settings(args.config, args.bootstrap)
    except (StreamConfigError, OSError) as exc:
        print(f"emrwatch connectors: {exc}", file=sys.stderr)
        return 2
    if not s.connectors:
        print("emrwatch connectors: the config has no connectors", file=sys.stderr)
        return 2
    check_reachable(s.kafka)  # exits with a clear message when no broker answers
    ensure_topics(
        s.kafka.bootstrap_servers, s.topics, s.kafka.kafka_python(), create=s.create_topics
    )
    metrics = None
    if args.metrics_port >= 0:
        from prometheus_client import start_http_server

        from connectors.metrics import ConnectorMetrics

        metrics = ConnectorMetrics()
        start_http_server(args.metrics_port, registry=metrics.registry)
    try:
        svc = ConnectorService(s, None, args.only, metrics)
    except ValueError as exc:
        print(f"emrwatch connectors: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: svc.stop())
    svc.start()
    print(f"connectors running: {', '.join(c.name for c in svc.connectors)}", flush=True)
    svc.wait()
    svc.producer.flush()
    for name, st in svc.results.items():
        print(f"{name}: {orjson.dumps(st.as_dict()).decode()}", flush=True)
    for name, error in svc.errors.items():
        print(f"emrwatch connectors: {name} failed: {error}", file=sys.stderr)
    return 1 if svc.errors else 0
