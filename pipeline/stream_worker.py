"""Running a stream worker: ``emrwatch run --config FILE`` and ``python -m pipeline.streaming``.

Start-up fails fast (bad config, unreachable broker, a topic with too few partitions), then
the worker publishes configured context and files, starts its engine host
(:mod:`pipeline.stream_host`) and runs the Faust app of :mod:`pipeline.streaming` until
SIGINT/SIGTERM. Several workers with the same group share the access partitions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from detectors.config import ConfigError
from emrwatch.context import Context
from pipeline.stream_config import StreamConfigError, StreamSettings, load_settings
from pipeline.stream_context import ContextFeed, publish_context
from pipeline.stream_host import HostError
from pipeline.stream_metrics import StreamMetrics
from pipeline.stream_processor import AccessProcessor, Output
from pipeline.stream_state import SnapshotStore
from pipeline.streaming import check_reachable, create_app, make_producer
from pipeline.topics import TopicLayoutError, ensure_topics

log = logging.getLogger("emrwatch.stream")


# ---------------------------------------------------------------------------- worker
def build_processor(
    settings: StreamSettings,
    producer: Any,
    metrics: StreamMetrics | None,
    context: Context,
    feed: ContextFeed | None,
) -> AccessProcessor:
    layout = settings.topics
    output = Output(producer, layout)
    snapshots = SnapshotStore(
        layout.snapshots(settings.worker.group_id),
        producer,
        settings.kafka.bootstrap_servers,
        client_config=settings.kafka.kafka_python(),
        writer_id=f"{os.getpid()}-{uuid.uuid4().hex[:6]}",
    )

    last_poll = [0.0]

    def poll_context() -> int:
        # context that arrives without a marker applies within ~50 ms; a marker (published
        # with the change) orders it exactly before the events after it
        now = time.monotonic()
        if feed is None or now - last_poll[0] < 0.05:
            return 0
        last_poll[0] = now
        n = feed.poll()
        if n and metrics is not None:
            metrics.context_updates.inc(n)
        return n

    return AccessProcessor(
        context,
        settings.detection_config(),
        output,
        snapshots=snapshots,
        engine_factory=settings.worker.engine_factory,
        source_topic=layout.access,
        snapshot_interval_s=settings.worker.snapshot_interval_s,
        advance_interval_s=settings.worker.advance_interval_s,
        context_poll=poll_context if feed is not None else None,
        context_sync=feed.wait_for if feed is not None else None,
        metrics=metrics,
        group=settings.worker.group_id,
    )


def run_worker(settings: StreamSettings, ingest: bool = True) -> int:
    """Start one worker and block until it is stopped (SIGINT/SIGTERM). Returns an exit code."""
    import faust

    settings.validate()
    logging.basicConfig(
        level=getattr(logging, settings.worker.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("emrwatch.stream").setLevel(logging.INFO)
    kafka = settings.kafka
    check_reachable(kafka)
    ensure_topics(
        kafka.bootstrap_servers,
        settings.topics,
        kafka.kafka_python(),
        groups=[settings.worker.group_id],
        create=settings.create_topics,
    )
    producer = make_producer(kafka)
    layout = settings.topics
    if settings.context_load_dir:
        counts = publish_context(producer, layout, settings.context_load_dir)
        log.info("published context rows: %s", counts)
    if ingest and settings.connectors:
        _start_connectors(settings)

    host: Any = None
    if settings.worker.mode == "detect":
        from pipeline.stream_host import ChildHost, LocalHost

        host = (
            ChildHost(settings)
            if settings.worker.engine_process
            else LocalHost(settings, StreamMetrics())
        )
        if isinstance(host, LocalHost) and settings.worker.metrics_port >= 0:
            port = host.metrics.serve(settings.worker.metrics_port, settings.worker.metrics_host)
            print(f"metrics: http://{settings.worker.metrics_host}:{port}/metrics", flush=True)
    app = create_app(settings, host)
    if host is None:
        app.emrwatch_state["output"] = Output(producer, layout)

    class Worker(faust.Worker):  # type: ignore[misc]
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            # Faust's progress spinner sets the root logger to DEBUG, which makes every
            # library build debug records on the hot path; keep the level asked for.
            self.spinner = None
            logger.setLevel(level)

    worker = Worker(
        app, loglevel=settings.worker.log_level.upper(), quiet=True, redirect_stdouts=False
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        producer.flush()
        producer.close()
    return 0


def _start_connectors(settings: StreamSettings) -> None:
    """The configured connectors, each in a thread beside the worker (checkpointed in
    ``ingest.state_dir``; see :mod:`connectors.runner`)."""
    from pipeline.connect import ConnectorService

    svc = ConnectorService(settings)  # with its own (librdkafka) producer
    svc.start()


# ---------------------------------------------------------------------------- command line
def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Worker options; each one given overrides the config file (``--config``)."""
    g = parser.add_argument_group("worker")
    g.add_argument("--config", default=None, help="stream config file (YAML/JSON)")
    g.add_argument("--bootstrap", default=None, help="host:port[,host:port]")
    g.add_argument("--prefix", default=None, help="topic name prefix")
    g.add_argument("--partitions", type=int, default=None)
    g.add_argument("--group", default=None, help="consumer group / Faust app id")
    g.add_argument("--mode", choices=("detect", "passthrough"), default=None)
    g.add_argument("--engine-factory", default=None, help="module:callable (tests, experiments)")
    g.add_argument("--timezone", default=None)
    g.add_argument("--detection-config", default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--batch-within", type=float, default=None)
    g.add_argument("--snapshot-interval", type=float, default=None)
    g.add_argument("--metrics-port", type=int, default=None, help="-1: off, 0: any free port")
    g.add_argument("--session-timeout", type=float, default=None)
    g.add_argument("--heartbeat-interval", type=float, default=None)
    g.add_argument("--log-level", default=None)
    g.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engines in a child process beside Faust (default: on)",
    )


def settings_from_args(args: argparse.Namespace) -> StreamSettings:
    """The config file (if any), then the command-line overrides, validated."""
    base = load_settings(args.config) if getattr(args, "config", None) else StreamSettings()

    def pick(name: str, current: Any) -> Any:
        v = getattr(args, name, None)
        return current if v is None else v

    k, t, w = base.kafka, base.topics, base.worker
    bootstrap = pick("bootstrap", None) or (
        k.bootstrap_servers
        if getattr(args, "config", None)
        else os.environ.get("EMRWATCH_BOOTSTRAP", k.bootstrap_servers)
    )
    return replace(
        base,
        kafka=replace(
            k,
            bootstrap_servers=bootstrap,
            session_timeout_s=pick("session_timeout", k.session_timeout_s),
            heartbeat_interval_s=pick("heartbeat_interval", k.heartbeat_interval_s),
        ),
        topics=replace(
            t, prefix=pick("prefix", t.prefix), partitions=pick("partitions", t.partitions)
        ),
        worker=replace(
            w,
            group_id=pick("group", w.group_id),
            batch_size=pick("batch_size", w.batch_size),
            batch_within_s=pick("batch_within", w.batch_within_s),
            snapshot_interval_s=pick("snapshot_interval", w.snapshot_interval_s),
            metrics_port=pick("metrics_port", w.metrics_port),
            mode=pick("mode", w.mode),
            engine_factory=pick("engine_factory", w.engine_factory),
            log_level=pick("log_level", w.log_level),
            engine_process=pick("engine_process", w.engine_process),
        ),
        timezone=pick("timezone", base.timezone),
        detection=pick("detection_config", base.detection),
    ).validate()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``emrwatch run --config FILE``: a production worker (see :mod:`pipeline.stream_config`)."""
    add_worker_arguments(parser)
    parser.add_argument(
        "--sinks",
        action="store_true",
        help="also run the config's alert sinks (alerting:, feed:) in this process, as "
        "`emrwatch alerts --config FILE` does; use it on one worker only",
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Run one worker of the consumer group until SIGINT/SIGTERM; 2 on a bad config or no broker."""
    if not getattr(args, "config", None) and not getattr(args, "bootstrap", None):
        print(
            "emrwatch run: --config FILE is required (or --bootstrap for a quick start)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = settings_from_args(args)
    except (StreamConfigError, ConfigError) as exc:
        print(f"emrwatch run: {exc}", file=sys.stderr)
        return 2
    try:
        settings.detection_config()
    except (ConfigError, OSError, ValueError) as exc:
        print(f"emrwatch run: detection config: {exc}", file=sys.stderr)
        return 2
    sinks_stop = None
    if getattr(args, "sinks", False):
        if not getattr(args, "config", None):
            print(
                "emrwatch run: --sinks needs --config FILE (its alerting: section)", file=sys.stderr
            )
            return 2
        try:
            sinks_stop = _start_sinks(args.config)
        except (StreamConfigError, ValueError, OSError) as exc:
            print(f"emrwatch run: sinks: {exc}", file=sys.stderr)
            return 2
    try:
        return run_worker(settings)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return int(exc.code or 0)
    except TopicLayoutError as exc:
        print(f"emrwatch run: {exc}", file=sys.stderr)
        return 2
    except HostError as exc:
        print(f"emrwatch run: {exc}", file=sys.stderr)
        return 1
    finally:
        if sinks_stop is not None:
            sinks_stop.set()


def _start_sinks(config: str) -> threading.Event:
    """The alert service of :mod:`pipeline.alert_service` in a thread: the alert topic to the
    store, Slack, e-mail and the feed. Its config errors surface before the worker starts."""
    from pipeline.alert_service import _load, run_alert_service

    _load(config)  # fail fast on a bad alerting:/feed: section
    stop = threading.Event()

    def work() -> None:
        try:
            run_alert_service(config, stop, serve_metrics=False)
        except Exception:
            log.exception("the alert sinks stopped")

    threading.Thread(target=work, name="emrwatch-sinks", daemon=True).start()
    return stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.streaming", description="one emrwatch stream worker"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    return cmd_run(args)
