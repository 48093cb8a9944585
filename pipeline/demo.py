"""``emrwatch demo``: the whole streaming pipeline on this machine.

An embedded broker, stream worker(s) in their own processes, and a simulated hospital
(``pipeline.simulate``) replayed onto the access topic at ``--rate`` events/s. The terminal
shows throughput, consumer lag and the latest alerts with their reasons; every URL served
is printed. Ctrl-C or ``--duration`` stops everything cleanly (workers snapshot on SIGTERM).

Lag is computed from the group's committed offsets against the offsets the feed's producer
got back from the broker (never ``end_offsets``, which the embedded broker under-reports).
Patient ids are masked in everything shown or logged.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from emrwatch.timeutil import DEFAULT_TIMEZONE, recorded_timezone
from pipeline.stream_config import KafkaSettings, StreamSettings
from pipeline.topics import TopicLayout, ensure_topics

ALERT_LINES = 8
DEMO_HISTORY_REFRESH_S = 5.0  # how often the access report's history catches up


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.add_argument("--rate", type=float, default=300.0, help="simulated events per second")
    parser.add_argument("--days", type=int, default=2, help="simulated days to replay")
    parser.add_argument("--scale", type=float, default=0.5, help="simulated hospital size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=1, help="stream workers in the group")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--data", default=None, help="a simulated hospital directory to replay")
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="demo /metrics port (0: any free)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker and broker logs")


def mask_id(value: str) -> str:
    """Keep the first three and last two characters: enough to tell records apart.

    >>> mask_id("P1004444")
    'P10•••44'
    """
    if len(value) <= 5:
        return "•" * len(value)
    return f"{value[:3]}•••{value[-2:]}"


def _patient_ids(data: Path) -> set[str]:
    path = data / "patients.csv"
    if not path.exists():
        return set()
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return {row["patient_id"] for row in csv.DictReader(fh) if row.get("patient_id")}


def mask_text(text: str, patients: set[str]) -> str:
    out = []
    for token in text.split(" "):
        core = token.strip(".,;:()[]")
        out.append(token.replace(core, mask_id(core)) if core in patients else token)
    return " ".join(out)


class DemoState:
    """What the screen shows; written by the feed and alert threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.total = 0
        self.produced_end: dict[int, int] = {}
        self.alerts: dict[str, dict[str, Any]] = {}
        self.alert_versions = 0
        self.latest: deque[tuple[str, str]] = deque(maxlen=ALERT_LINES)
        self.feed_done = False
        self.feed_error = ""


def _feed(
    producer: Any,
    layout: TopicLayout,
    items: list[Any],
    rate: float,
    state: DemoState,
    stop: threading.Event,
) -> None:
    """Produce at ``rate`` events/s, recording the offsets the broker acknowledged."""
    from pipeline.topics import H_SOURCE

    tick = 0.05
    per_tick = max(1, round(rate * tick))
    nxt = time.perf_counter()
    headers = [(H_SOURCE, b"demo")]  # the workers count events by source

    def acked(md: Any) -> None:
        with state.lock:
            if md.offset + 1 > state.produced_end.get(md.partition, 0):
                state.produced_end[md.partition] = md.offset + 1

    try:
        for i in range(0, len(items), per_tick):
            if stop.is_set():
                return
            for e in items[i : i + per_tick]:
                fut = producer.send(
                    layout.access,
                    key=e.user_id.encode(),
                    value=orjson.dumps(e.to_dict()),
                    headers=headers,
                )
                fut.add_callback(acked)
            state.sent = min(len(items), i + per_tick)
            nxt += tick
            delay = nxt - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        producer.flush()
    except Exception as exc:  # noqa: BLE001 - shown on screen; the demo keeps running
        state.feed_error = repr(exc)
    finally:
        state.feed_done = True


def _tail_alerts(
    bootstrap: str,
    layout: TopicLayout,
    state: DemoState,
    patients: set[str],
    stop: threading.Event,
    feed: Any = None,
) -> None:
    """Follow the alert topic: the screen's alert list, and (when present) the alert store
    behind the web feed, which upserts each version like any sink."""
    from pipeline.stream_ingest import TopicReader

    reader = TopicReader(bootstrap, layout.alerts)
    try:
        while not stop.is_set():
            records = reader.poll(timeout_ms=200)
            if feed is not None and records:
                try:
                    feed.handle([orjson.loads(r.value) for r in records])
                except Exception as exc:  # noqa: BLE001 - the terminal view goes on
                    state.feed_error = f"alert store: {exc!r}"
            for rec in records:
                a = orjson.loads(rec.value)
                with state.lock:
                    state.alert_versions += 1
                    new = a["alert_id"] not in state.alerts
                    state.alerts[a["alert_id"]] = a
                    if new or a.get("status") == "retracted":
                        pats = ", ".join(mask_id(p) for p in a.get("patient_ids", [])[:3])
                        more = len(a.get("patient_ids", [])) - 3
                        pats += f" +{more}" if more > 0 else ""
                        status = " RETRACTED" if a.get("status") == "retracted" else ""
                        state.latest.appendleft(
                            (
                                f"[{a['severity']:<8}]{status} {a['last_seen'][:16].replace('T', ' ')} "
                                f"{a['user_id']}  {'+'.join(a['detector'])}  "
                                f"(patients {pats}; {len(a['event_ids'])} events)",
                                mask_text(a["reason"], patients),
                            )
                        )
    finally:
        reader.close()


class _Feed:
    """The alert store and its web feed (``pipeline.alerting`` / ``pipeline.web``)."""

    def __init__(
        self, router: Any, server: Any, url: str, passwords: dict[str, str], keeper: Any
    ) -> None:
        self.router, self.server, self.url = router, server, url
        self.keeper = keeper  # keeps the access report's history current
        self.logins = ", ".join(f"{u} / {pw}" for u, pw in passwords.items())

    def handle(self, alerts: list[dict[str, Any]]) -> None:
        self.router.handle(alerts)
        self.server.notify()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.keeper.stop(timeout=5)
        with contextlib.suppress(Exception):
            self.server.stop()
        with contextlib.suppress(Exception):
            self.router.close()


def _start_feed(
    tmp: Path, data: Path, args: argparse.Namespace, settings: StreamSettings
) -> _Feed | None:
    """Serve the alert feed page from a store the demo fills from the alert topic, with the
    access report over a history export of the topics kept current as production's
    ``feed.history_refresh_s`` keeps it (so it covers what the stream has received)."""
    try:
        from emrwatch.context import Context
        from pipeline.alerting import AlertRouter
        from pipeline.alerting.config import AlertingConfig
        from pipeline.web.server import serve_feed
        from pipeline.web.settings import FeedSettings
    except ImportError as exc:  # the feed is optional for the streaming demo
        print(f"(alert feed not available: {exc})")
        return None
    from pipeline.history import HistoryKeeper

    history = tmp / "history"
    keeper = HistoryKeeper(
        settings.kafka.bootstrap_servers,
        settings.topics,
        history,
        DEMO_HISTORY_REFRESH_S,
        timezone=settings.timezone,
        log=lambda _text: None,  # the screen shows keeper.last_error
    ).start()
    feed_settings, passwords = FeedSettings.for_demo(
        history_dir=str(history), timezone=settings.timezone
    )
    router = AlertRouter(
        AlertingConfig(store_url=f"sqlite:///{tmp / 'alerts.sqlite3'}"), context=Context.load(data)
    )
    url, server = serve_feed(router.store, feed_settings)
    if not args.no_browser and (os.environ.get("DISPLAY") or sys.platform == "darwin"):
        import webbrowser

        with contextlib.suppress(Exception):
            webbrowser.open(url)
    return _Feed(router, server, url, passwords, keeper)


def _committed(admin: Any, group: str, topic: str) -> dict[int, int]:
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    except Exception:  # noqa: BLE001 - the group may not have committed yet
        return {}
    return {
        tp.partition: om.offset
        for tp, om in offsets.items()
        if tp.topic == topic and om.offset >= 0
    }


def run_demo(args: argparse.Namespace) -> int:
    from kafka import KafkaAdminClient
    from prometheus_client import CollectorRegistry, Counter, Gauge

    from connectors.readers import read_events
    from emrwatch.events import AccessEvent
    from pipeline.broker import EmbeddedBroker, free_port
    from pipeline.stream_context import publish_context
    from pipeline.stream_replay import spawn_worker, stop_process
    from pipeline.streaming import make_producer

    tmp = Path(tempfile.mkdtemp(prefix="emrwatch-demo-"))
    if args.data:
        data = Path(args.data)
    else:
        from pipeline.simulate import simulate

        data = tmp / "hospital"
        print(f"simulating {args.days} day(s) of a hospital at scale {args.scale} …", flush=True)
        simulate(data, days=args.days, seed=args.seed, scale=args.scale)
    items = [
        e
        for _n, e, _raw in read_events(data / "events.ndjson", "auto")
        if isinstance(e, AccessEvent)
    ]
    patients = _patient_ids(data)
    try:  # a hospital directory of another zone (simulate --timezone) is judged in its own
        zone_name = recorded_timezone(data) or DEFAULT_TIMEZONE
    except ValueError as exc:
        raise SystemExit(f"emrwatch demo: {exc}") from None

    stop = threading.Event()
    if args.duration:
        threading.Timer(args.duration, stop.set).start()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())

    with EmbeddedBroker(log_dir=tmp / "broker") as broker:
        group = "emrwatch-demo"
        settings = StreamSettings(
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap),
            topics=TopicLayout(prefix="emrwatch", partitions=args.partitions),
            timezone=zone_name,
        )
        settings = replace(settings, worker=replace(settings.worker, group_id=group))
        ensure_topics(broker.bootstrap, settings.topics, groups=[group])
        producer = make_producer(settings.kafka)
        publish_context(producer, settings.topics, data)

        registry = CollectorRegistry()
        m_sent = Counter(
            "emrwatch_demo_events_sent", "Events the simulated feed produced", registry=registry
        )
        m_lag = Gauge(
            "emrwatch_demo_consumer_lag", "Produced minus committed offsets", registry=registry
        )
        m_alerts = Gauge(
            "emrwatch_demo_alerts", "Distinct alerts on the alert topic", registry=registry
        )
        from prometheus_client import start_http_server

        demo_port = args.metrics_port or free_port()
        start_http_server(demo_port, addr="127.0.0.1", registry=registry)

        alert_feed = _start_feed(tmp, data, args, settings)
        worker_ports = [free_port() for _ in range(args.workers)]
        procs = [
            spawn_worker(
                settings,
                log_path=tmp / f"worker-{i}.log",
                extra=("--metrics-port", str(port), "--log-level", "INFO"),
            )
            for i, port in enumerate(worker_ports)
        ]
        urls = (
            ([f"alert feed        {alert_feed.url}   ({alert_feed.logins})"] if alert_feed else [])
            + [f"demo metrics      http://127.0.0.1:{demo_port}/metrics"]
            + [
                f"worker {i} metrics  http://127.0.0.1:{port}/metrics"
                for i, port in enumerate(worker_ports)
            ]
        )
        print()
        print(f"kafka (embedded)  {broker.bootstrap}")
        for u in urls:
            print(u)
        print(f"logs              {tmp}")
        print(flush=True)

        state = DemoState()
        state.total = len(items)
        feed = threading.Thread(
            target=_feed,
            args=(producer, settings.topics, items, args.rate, state, stop),
            daemon=True,
        )
        tail = threading.Thread(
            target=_tail_alerts,
            args=(broker.bootstrap, settings.topics, state, patients, stop, alert_feed),
            daemon=True,
        )
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, client_id="emrwatch-demo")
        tty = sys.stdout.isatty()
        started = time.monotonic()
        feed.start()
        tail.start()
        last_sent, last_done, last_t = 0, 0, time.monotonic()
        printed: set[str] = set()
        try:
            while not stop.is_set():
                stop.wait(1.0)
                now = time.monotonic()
                committed = _committed(admin, group, settings.topics.access)
                with state.lock:
                    produced = dict(state.produced_end)
                    lines = list(state.latest)
                    n_alerts = sum(
                        1 for a in state.alerts.values() if a.get("status") != "retracted"
                    )
                    versions = state.alert_versions
                done = sum(committed.values())
                lag = sum(max(0, produced.get(p, 0) - committed.get(p, 0)) for p in produced)
                dt = max(1e-6, now - last_t)
                in_rate, out_rate = (state.sent - last_sent) / dt, max(0, done - last_done) / dt
                last_sent, last_done, last_t = state.sent, done, now
                m_sent.inc(max(0, state.sent - int(m_sent._value.get())))
                m_lag.set(lag)
                m_alerts.set(n_alerts)
                dead = [i for i, p in enumerate(procs) if p.poll() is not None]
                screen = [
                    f"emrwatch demo   {now - started:6.0f}s   broker {broker.bootstrap}   "
                    f"{args.workers} worker(s), {args.partitions} partitions   Ctrl-C stops",
                    f"feed       {state.sent:>9,} / {state.total:,} events   {in_rate:8,.0f} events/s "
                    f"(offered {args.rate:,.0f}){'   feed finished' if state.feed_done else ''}",
                    f"processed  {done:>9,} events (committed)   {out_rate:8,.0f} events/s   "
                    f"consumer lag {lag:,}",
                    f"alerts     {n_alerts:>9,} open cases   {versions:,} versions on the alert topic",
                    *urls,
                    "",
                    "latest alerts:",
                ]
                width = shutil.get_terminal_size((160, 40)).columns
                for head, reason in lines:
                    screen.append(f"  {head}"[:width])
                    screen.append(f"      {reason}"[:width])
                if state.feed_error:
                    screen.append(f"feed error: {state.feed_error}")
                if alert_feed is not None and alert_feed.keeper.last_error:
                    screen.append(f"history export: {alert_feed.keeper.last_error}")
                if dead:
                    screen.append(f"worker(s) {dead} exited; see {tmp}")
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(screen) + "\n")
                    sys.stdout.flush()
                else:
                    # a log, not a screen: new alerts as they come, a status line every 5 s
                    for head, reason in reversed(lines):
                        if head not in printed:
                            printed.add(head)
                            print(f"alert  {head}\n       {reason}", flush=True)
                    if int(now - started) % 5 == 0:
                        print(" | ".join(x.strip() for x in screen[1:4]), flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            signal.signal(signal.SIGTERM, previous)
            print("\nstopping: feed, workers (snapshot), broker …", flush=True)
            feed.join(timeout=5)
            for p in procs:
                stop_process(p, timeout=20)
            tail.join(timeout=5)
            if alert_feed is not None:
                alert_feed.close()
            with contextlib.suppress(Exception):
                admin.close()
            producer.close()
        with state.lock:
            n_alerts = sum(1 for a in state.alerts.values() if a.get("status") != "retracted")
        failed = any(p.returncode not in (0, -signal.SIGTERM) for p in procs)
        if args.keep_logs or failed:
            if not args.data:
                shutil.rmtree(data, ignore_errors=True)  # the simulated hospital; logs stay
            print(f"sent {state.sent:,} events; {n_alerts} alert(s). Logs in {tmp}")
        else:
            print(f"sent {state.sent:,} events; {n_alerts} alert(s).")
    if not (args.keep_logs or failed):
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("EMRWATCH_DEMO_RUN", uuid.uuid4().hex[:8])
    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="emrwatch demo")
    add_demo_arguments(p)
    return cmd_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
