"""``emrwatch alerts --config FILE``: the alert topic → store, Slack, e-mail and the web feed.

The stream workers write alert versions to ``<prefix>.alerts``; this service is the sink
side of production. It consumes that topic in its own consumer group, upserts each batch
through :class:`pipeline.alerting.AlertRouter` (idempotent by alert id and version, so a
redelivery after a crash changes nothing and notifies nobody twice), commits the offsets
only after the store has them, runs the notification outbox, and serves the alert feed when
the config has a ``feed:`` section. It reads the same YAML file as ``emrwatch run``
(``kafka``, ``topics``, ``context.load_dir`` for supervisors and department heads) plus
the ``alerting:`` and ``feed:`` sections. With ``feed.history_refresh_s``, it also keeps
``feed.history_dir`` current (:class:`pipeline.history.HistoryKeeper`), so access reports
in the feed cover the accesses of minutes ago.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

SINK_SECTIONS = ("alerting", "feed")


def add_alerts_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="the YAML file of emrwatch run, with alerting: and feed:"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (0: run until signalled)",
    )


def _load(path: str) -> tuple[Any, Any, Any, Any]:
    from emrwatch.context import Context
    from pipeline.alerting.config import AlertingConfig
    from pipeline.stream_config import StreamConfigError, settings_from_dict
    from pipeline.web.settings import FeedSettings

    p = Path(path)
    if not p.is_file():
        raise StreamConfigError(f"config file {p} does not exist")
    doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict):
        raise StreamConfigError(f"{p}: top level must be a mapping")
    settings = settings_from_dict(
        {k: v for k, v in doc.items() if k not in SINK_SECTIONS}, source=str(p)
    )
    alerting = AlertingConfig.from_dict(doc.get("alerting") or {})
    feed = FeedSettings.from_dict(doc["feed"]) if doc.get("feed") else None
    ctx = (
        Context.load(settings.context_load_dir, settings.timezone)
        if settings.context_load_dir
        else Context(settings.timezone)
    )
    return settings, alerting, feed, ctx


def run_alert_service(
    config: str, stop: threading.Event, ready: Any = None, serve_metrics: bool = True
) -> int:
    """Run the sinks until ``stop``. The metrics (sinks, kept history, feed) are served at
    the feed's ``/metrics``; without a feed, on ``worker.metrics_port`` unless
    ``serve_metrics`` is false (inside a worker, whose own metrics have that port)."""
    from kafka import KafkaConsumer

    from pipeline.alerting import AlertRouter
    from pipeline.alerting.metrics import HistoryCollector, sink_registry

    settings, alerting, feed_settings, ctx = _load(config)
    router = AlertRouter(alerting, context=ctx)
    router.start()
    detection = settings.detection_config()  # for the feed's reports and the monthly mail
    registry = sink_registry(router)  # the sinks', the kept history's and the feed's metrics
    watch = None
    if alerting.audit_verify_every_h:
        from pipeline.alerting.chain import ChainWatch

        watch = ChainWatch(router.store, alerting.audit_verify_every_h * 3600).start()
        registry.register(watch)
    server = None
    if feed_settings is not None:
        from pipeline.web.server import serve_feed

        url, server = serve_feed(
            router.store,
            feed_settings,
            host=feed_settings.host,
            port=feed_settings.port,
            metrics_registry=registry,
            detection=detection,
            settings_path=config,  # users added, removed or changed there apply at once
        )
        print(f"alert feed  {url}   (metrics {url}/metrics)", flush=True)
    elif serve_metrics and settings.worker.metrics_port >= 0:
        from pipeline.stream_metrics import serve_registry

        port = serve_registry(registry, settings.worker.metrics_port, settings.worker.metrics_host)
        print(
            f"alert sink metrics  http://{settings.worker.metrics_host}:{port}/metrics", flush=True
        )
    k = settings.kafka
    consumer = KafkaConsumer(
        settings.topics.alerts,
        bootstrap_servers=k.bootstrap_servers,
        group_id=f"{settings.worker.group_id}-alerts",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(k.session_timeout_s * 1000),
        heartbeat_interval_ms=int(k.heartbeat_interval_s * 1000),
        client_id="emrwatch-alerts",
        **k.kafka_python(),
    )
    keeper = None
    if feed_settings is not None and feed_settings.history_refresh_s:
        from pipeline.assessment import mail_assessment
        from pipeline.history import HistoryKeeper

        def assessed(_manifest: dict[str, Any]) -> None:  # the month's, once it is over
            mail_assessment(
                router,
                feed_settings.history_dir,
                feed_settings.hospital or feed_settings.title,
                detection,
            )

        keeper = HistoryKeeper(
            settings.kafka.bootstrap_servers,
            settings.topics,
            feed_settings.history_dir,
            feed_settings.history_refresh_s,
            settings.kafka.kafka_python(),
            settings.timezone,
            keep_days=feed_settings.history_keep_days or None,
            on_update=assessed,
        ).start()
        registry.register(HistoryCollector(keeper))
    if ready is not None:
        ready(router)
    try:
        while not stop.is_set():
            batch = consumer.poll(timeout_ms=500)
            alerts = []
            for records in batch.values():
                for rec in records:
                    try:
                        alerts.append(orjson.loads(rec.value))
                    except orjson.JSONDecodeError:
                        print(
                            f"alerts: skipped a malformed record at {rec.topic}:{rec.partition}:{rec.offset}",
                            file=sys.stderr,
                        )
            if alerts:
                router.handle(alerts)
                if server is not None:
                    server.notify()
            if batch:
                consumer.commit()  # only after the store has them: at least once, upserts
    finally:
        consumer.close()
        if keeper is not None:
            keeper.stop()
        if watch is not None:
            watch.stop()
        if server is not None:
            server.stop()
        router.close()
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from pipeline.alerting.config import AlertingConfigError
    from pipeline.stream_config import StreamConfigError

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.duration:
        threading.Timer(args.duration, stop.set).start()
    try:
        return run_alert_service(args.config, stop)
    except (StreamConfigError, AlertingConfigError, ValueError) as exc:
        print(f"emrwatch alerts: {exc}", file=sys.stderr)
        return 2
    finally:
        stop.set()
        time.sleep(0)
