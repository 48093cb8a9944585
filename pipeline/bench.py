"""``emrwatch bench``: throughput and latency of the streaming path, measured in one run.

1. A simulated hospital (``pipeline.simulate``) is parsed once; in-process replay of it gives
   ``replay_events_per_s``.
2. The same canonical events are produced once to an access topic on the embedded broker.
   Worker subprocesses then read that topic from the start, alternating a Faust pass-through
   agent (decodes nothing, acks) and the full stream worker (decode, context, all detectors,
   alerts, snapshots), each in its own consumer group, ``--rounds`` times. A worker's rate is
   events over the span from its first batch to its last partition's end marker (start-up and
   group join excluded). The medians give ``stream_events_per_s`` and
   ``passthrough_events_per_s``; ``ratio`` is the median of the per-round ratios (each round
   runs both back to back, alternating which goes first), because the machines are noisy.
3. Latency: a fresh topic, a live stream worker, and the events offered at ``--rate``
   (default 2,000/s). For every alert version, latency is the time it was read from the alert
   topic minus the producer timestamp of the access record that changed it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.stream_config import KafkaSettings, StreamSettings
from pipeline.topics import TopicLayout, ensure_topics


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--days", type=int, default=3, help="simulated days (~30k events/day at scale 1)"
    )
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--rounds", type=int, default=4, help="pass-through/stream pairs")
    parser.add_argument(
        "--rate", type=float, default=2000.0, help="offered rate for the latency run"
    )
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--data", default=None, help="use this simulated hospital instead")


def _log(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


def _worker_rate(acks: dict[int, dict[str, Any]]) -> tuple[int, float]:
    events = sum(int(a["events"]) for a in acks.values())
    span = max(a["acked_at"] for a in acks.values()) - min(
        a["first_batch_at"] for a in acks.values()
    )
    return events, events / span if span > 0 else 0.0


def _throughput_round(
    settings: StreamSettings, group: str, mode: str, run_id: str, parts: list[int], logdir: Path
) -> tuple[int, float]:
    from pipeline.stream_ingest import TopicReader, wait_for_acks
    from pipeline.stream_replay import spawn_worker, stop_process

    s = replace(settings, worker=replace(settings.worker, group_id=group))
    proc = spawn_worker(s, mode=mode, log_path=logdir / f"{group}.log")
    reader = TopicReader(s.kafka.bootstrap_servers, s.topics.control)
    try:

        def check() -> None:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"bench worker {group} exited:\n"
                    + (logdir / f"{group}.log").read_text(errors="replace")[-2000:]
                )

        acks = wait_for_acks(reader, run_id, parts, timeout=900, progress=check, group=group)
    finally:
        reader.close()
        stop_process(proc)
    return _worker_rate(acks)


def _latency_run(
    settings: StreamSettings,
    items: list[Any],
    context_dir: Path,
    rate: float,
    seconds: float,
    logdir: Path,
) -> dict[str, Any]:
    from kafka import KafkaConsumer, TopicPartition

    from pipeline.stream_context import publish_context
    from pipeline.stream_ingest import TopicReader, produce_items, send_eof, wait_for_acks
    from pipeline.stream_replay import spawn_worker, stop_process
    from pipeline.streaming import make_producer

    kafka = settings.kafka
    layout = settings.topics
    ensure_topics(kafka.bootstrap_servers, layout)
    producer = make_producer(kafka)
    publish_context(producer, layout, context_dir)
    group = f"bench-latency-{uuid.uuid4().hex[:6]}"
    s = replace(settings, worker=replace(settings.worker, group_id=group))
    proc = spawn_worker(s, log_path=logdir / "latency-worker.log")
    latencies: list[float] = []
    stop = threading.Event()
    consumer = KafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
    )
    tps = [TopicPartition(layout.alerts, p) for p in range(layout.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)

    def read_alerts() -> None:
        while not stop.is_set():
            for recs in consumer.poll(timeout_ms=50).values():
                now_ms = time.time() * 1000
                for r in recs:
                    src = dict(r.headers).get("emrwatch-src-ts")
                    if src:
                        latencies.append(max(0.0, (now_ms - int(src)) / 1000))

    reader_thread = threading.Thread(target=read_alerts, daemon=True)
    reader_thread.start()
    try:
        # a first marker proves the worker is live before the clock starts
        probe_run = uuid.uuid4().hex[:8]
        parts = send_eof(producer, layout, probe_run)
        control = TopicReader(kafka.bootstrap_servers, layout.control)
        wait_for_acks(control, probe_run, parts, timeout=120, group=group)
        n = max(1, int(rate * seconds))
        offered = items[:n]
        stats = produce_items(producer, layout, offered, "bench", rate=rate)
        run = uuid.uuid4().hex[:8]
        send_eof(producer, layout, run)
        wait_for_acks(control, run, parts, timeout=300, group=group)
        time.sleep(0.3)  # the last alert versions reach the reader
        control.close()
    finally:
        stop.set()
        reader_thread.join(timeout=5)
        consumer.close()
        stop_process(proc)
        producer.close()
    return {
        "offered_rate": rate,
        "achieved_offered_rate": stats.events / stats.seconds if stats.seconds else 0.0,
        "latency_events": stats.events,
        "alert_versions": len(latencies),
        "latency_p50_s": _percentile(latencies, 0.50),
        "latency_p99_s": _percentile(latencies, 0.99),
        "latency_max_s": max(latencies) if latencies else float("nan"),
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="emrwatch-bench-"))
    try:
        return _run_bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from connectors.readers import read_events
    from emrwatch.events import AccessEvent
    from pipeline.broker import EmbeddedBroker
    from pipeline.replay import replay_file
    from pipeline.stream_context import publish_context
    from pipeline.stream_ingest import produce_items, send_eof
    from pipeline.streaming import make_producer

    if args.data:
        data = Path(args.data)
    else:
        from pipeline.simulate import simulate

        data = tmp / "hospital"
        _log(args, f"simulating {args.days} day(s) at scale {args.scale} …")
        simulate(data, days=args.days, seed=args.seed, scale=args.scale)
    events_path = data / "events.ndjson"
    items = [
        (n, e, b"") for n, e, _raw in read_events(events_path, "auto") if isinstance(e, AccessEvent)
    ]
    _log(args, f"{len(items)} events; in-process replay …")
    rep = replay_file(data, events_path)
    result: dict[str, Any] = {
        "events": len(items),
        "replay_events_per_s": rep.events_per_s,
        "replay_alerts": len(rep.alerts),
    }
    logdir = tmp / "logs"
    logdir.mkdir()
    with EmbeddedBroker(log_dir=tmp / "broker") as broker:
        settings = StreamSettings(
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap),
            topics=TopicLayout(prefix="bench", partitions=args.partitions),
        )
        ensure_topics(broker.bootstrap, settings.topics)
        producer = make_producer(settings.kafka)
        publish_context(producer, settings.topics, data)
        t0 = time.perf_counter()
        produce_items(producer, settings.topics, items, str(events_path))
        run_id = uuid.uuid4().hex[:8]
        parts = send_eof(producer, settings.topics, run_id)
        result["produce_events_per_s"] = len(items) / (time.perf_counter() - t0)
        producer.close()
        rates: dict[str, list[float]] = {"passthrough": [], "detect": []}
        for r in range(args.rounds):
            # alternate which goes first, so a drift in the machine's load cancels out
            order = ("passthrough", "detect") if r % 2 == 0 else ("detect", "passthrough")
            for mode in order:
                group = f"bench-{mode}-{r}-{uuid.uuid4().hex[:4]}"
                n, rate = _throughput_round(settings, group, mode, run_id, parts, logdir)
                if n != len(items):
                    raise RuntimeError(f"{mode} worker processed {n} of {len(items)} events")
                rates[mode].append(rate)
                _log(args, f"round {r + 1}: {mode:<11} {rate:9,.0f} events/s")
        stream = statistics.median(rates["detect"])
        passthrough = statistics.median(rates["passthrough"])
        pair_ratios = [
            d / p for d, p in zip(rates["detect"], rates["passthrough"], strict=True) if p
        ]
        result.update(
            stream_events_per_s=stream,
            passthrough_events_per_s=passthrough,
            # each round measures both back to back; the median of those ratios resists the
            # machine's load changing between rounds better than a ratio of medians
            ratio=statistics.median(pair_ratios) if pair_ratios else 0.0,
            ratio_of_medians=stream / passthrough if passthrough else 0.0,
            round_ratios=pair_ratios,
            stream_rounds=rates["detect"],
            passthrough_rounds=rates["passthrough"],
        )
        _log(
            args, f"latency at {args.rate:,.0f} events/s offered for {args.latency_seconds:.0f}s …"
        )
        lat_settings = replace(settings, topics=replace(settings.topics, prefix="bench-latency"))
        result.update(
            _latency_run(lat_settings, items, data, args.rate, args.latency_seconds, logdir)
        )
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    res = run_bench(args)
    if args.json:
        print(json.dumps(res))
        return 0
    print()
    print(f"events                     {res['events']:>12,}")
    print(f"in-process replay          {res['replay_events_per_s']:>12,.0f} events/s")
    print(f"Faust pass-through         {res['passthrough_events_per_s']:>12,.0f} events/s (median)")
    print(f"stream worker, all rules   {res['stream_events_per_s']:>12,.0f} events/s (median)")
    print(
        f"ratio stream/pass-through  {res['ratio']:>12.2f}   (target ≥ 0.80; median of "
        f"{', '.join(f'{r:.2f}' for r in res['round_ratios'])})"
    )
    print(
        f"event→alert latency p50    {res['latency_p50_s']:>12.3f} s   at {res['offered_rate']:,.0f} events/s offered"
    )
    print(
        f"event→alert latency p99    {res['latency_p99_s']:>12.3f} s   (target < 1 s; {res['alert_versions']} alert versions)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="emrwatch bench")
    add_bench_arguments(p)
    return cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
