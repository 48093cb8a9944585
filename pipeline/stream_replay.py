"""``emrwatch replay --stream``: a file through the real streaming path.

file → connector (parse, key by user) → Kafka → Faust worker(s) → alert topic → collected
alerts, collapsed by ``alert_id`` (last version). Kafka is the embedded broker unless the
config file has a ``kafka`` section (see :mod:`pipeline.stream_config`).

The end of input is a control record in every access partition; a worker that reaches it
flushes its engine, snapshots and acknowledges on the control topic. When every partition
has acknowledged, every alert is already on the alert topic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from pipeline.stream_config import KafkaSettings, StreamSettings, load_settings
from pipeline.topics import TopicLayout, ensure_topics

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StreamReplayResult:
    alerts: list[dict[str, Any]]
    events: int = 0
    bad: int = 0
    deadlettered_by_workers: int = 0
    alert_records: int = 0  # versions on the topic, before collapsing
    acks: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def _has_kafka_section(config_path: str | None) -> bool:
    if not config_path:
        return False
    import yaml

    try:
        doc = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and "kafka" in doc


@contextlib.contextmanager
def kafka_for(
    config_path: str | None, partitions: int = 4
) -> Iterator[tuple[StreamSettings, bool]]:
    """Settings for a run: the configured cluster, or a fresh embedded broker."""
    if _has_kafka_section(config_path):
        assert config_path is not None
        settings = load_settings(config_path)
        yield settings, False
        return
    from pipeline.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield (
            StreamSettings(
                kafka=KafkaSettings(bootstrap_servers=broker.bootstrap),
                topics=TopicLayout(partitions=partitions),
            ),
            True,
        )


def spawn_worker(
    settings: StreamSettings,
    *,
    config_path: str | None = None,
    detection_config: str | None = None,
    mode: str = "detect",
    log_path: Path | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """One worker subprocess (``python -m pipeline.streaming``) for these settings."""
    cmd = [sys.executable, "-m", "pipeline.streaming"]
    if config_path and _has_kafka_section(config_path):
        cmd += ["--config", config_path]
    cmd += [
        "--bootstrap",
        settings.kafka.bootstrap_servers,
        "--prefix",
        settings.topics.prefix,
        "--partitions",
        str(settings.topics.partitions),
        "--group",
        settings.worker.group_id,
        "--timezone",
        settings.timezone,
        "--mode",
        mode,
        "--session-timeout",
        str(settings.kafka.session_timeout_s),
        "--heartbeat-interval",
        str(settings.kafka.heartbeat_interval_s),
        *extra,
    ]
    if detection_config:
        cmd += ["--detection-config", detection_config]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    out: IO[bytes] | int = subprocess.DEVNULL
    if log_path is not None:
        out = log_path.open("ab")
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _delete_run_topics(settings: StreamSettings) -> None:
    """A configured cluster keeps nothing of a replay: its own topics go when it is done."""
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=settings.kafka.bootstrap_servers, **settings.kafka.kafka_python()
        )
        try:
            admin.delete_topics(
                list(settings.topics.specs([settings.worker.group_id])), raise_errors=False
            )
        finally:
            admin.close()
    except Exception as exc:  # noqa: BLE001 - best effort; the run's result stands
        log.warning("could not delete the replay's topics: %r", exc)


def run_stream_replay(
    context_dir: str | Path,
    events_path: str | Path,
    fmt: str = "auto",
    timezone: str | None = None,
    config_path: str | None = None,
    *,
    partitions: int = 4,
    workers: int = 1,
    timeout: float = 900.0,
    errors: IO[str] | None = None,
) -> StreamReplayResult:
    from pipeline.stream_context import publish_context
    from pipeline.stream_ingest import (
        TopicReader,
        collapse_alert_records,
        produce_file,
        send_eof,
        wait_for_acks,
    )
    from pipeline.streaming import check_reachable, make_producer

    t0 = time.perf_counter()
    run_id = uuid.uuid4().hex[:12]
    with kafka_for(config_path, partitions) as (base, embedded):
        # a configured cluster may hold other runs: use this run's own topics and group
        prefix = base.topics.prefix if embedded else f"{base.topics.prefix}-replay-{run_id}"
        settings = replace(
            base,
            topics=replace(base.topics, prefix=prefix),
            worker=replace(base.worker, group_id=f"emrwatch-replay-{run_id}"),
            timezone=timezone or base.timezone,
        )
        kafka = settings.kafka
        check_reachable(kafka)
        ensure_topics(kafka.bootstrap_servers, settings.topics, kafka.kafka_python())
        producer = make_producer(kafka)
        procs: list[subprocess.Popen[bytes]] = []
        logdir = Path(tempfile.mkdtemp(prefix="emrwatch-replay-"))
        try:
            publish_context(producer, settings.topics, context_dir)
            # workers start (join the group, load context) while the file is being produced
            det = config_path if config_path else None
            for i in range(workers):
                procs.append(
                    spawn_worker(
                        settings,
                        config_path=config_path,
                        detection_config=det,
                        log_path=logdir / f"worker-{i}.log",
                    )
                )
            control = TopicReader(
                kafka.bootstrap_servers, settings.topics.control, kafka.kafka_python()
            )
            alerts_reader = TopicReader(
                kafka.bootstrap_servers, settings.topics.alerts, kafka.kafka_python()
            )

            def on_bad(line_no: int, reason: str) -> None:
                if errors is not None:
                    errors.write(f"{events_path}:{line_no}: skipped: {reason}\n")

            if str(events_path) == "-":  # stdin: the plain producer reads it
                stats = produce_file(producer, settings.topics, events_path, fmt, on_bad=on_bad)
            else:  # the production connector path: file connector, runner, librdkafka
                stats = _produce_with_connector(settings, events_path, fmt, on_bad)
            from pipeline.replay import input_end_time

            parts = send_eof(
                producer, settings.topics, run_id, watermark=input_end_time(events_path, fmt)
            )

            def check_workers() -> None:
                for i, p in enumerate(procs):
                    if p.poll() is not None:
                        tail = (logdir / f"worker-{i}.log").read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"stream worker exited with {p.returncode}:\n{tail}")

            acks = wait_for_acks(control, run_id, parts, timeout=timeout, progress=check_workers)
            records = alerts_reader.read_to_end()
            control.close()
            alerts_reader.close()
        finally:
            for p in procs:
                stop_process(p)
            producer.close()
            if not embedded:
                _delete_run_topics(settings)
    shutil.rmtree(logdir, ignore_errors=True)  # kept only when the run failed
    collapsed = collapse_alert_records(records)
    alerts = sorted(collapsed.values(), key=lambda a: (a.get("first_seen", ""), a["alert_id"]))
    return StreamReplayResult(
        alerts=alerts,
        events=stats.events,
        bad=stats.bad,
        deadlettered_by_workers=sum(int(a.get("deadletters", 0)) for a in acks.values()),
        alert_records=len(records),
        acks=acks,
        seconds=time.perf_counter() - t0,
    )


def _produce_with_connector(settings: Any, events_path: str | Path, fmt: str, on_bad: Any) -> Any:
    """Send the file through a ``file`` connector and the connector runner (no checkpoints:
    a replay starts over), exactly as ``emrwatch connectors run`` would; returns counts."""
    import re

    from connectors.files import FileConnector
    from connectors.producer import make_connector_producer
    from connectors.runner import ConnectorRunner
    from pipeline.stream_ingest import IngestStats

    line = re.compile(r" line (\d+)")
    connector = FileConnector.from_dict(
        {"path": str(events_path), "format": fmt}, name=Path(events_path).name
    )
    producer = make_connector_producer(settings.kafka)

    def dead(raw: Any, reason: str) -> None:
        m = line.search(raw.position)
        on_bad(int(m.group(1)) if m else 0, reason)

    runner = ConnectorRunner(connector, producer, settings.topics, on_dead=dead)
    st = runner.run()
    producer.flush()
    return IngestStats(events=st.events, bad=st.dead, seconds=st.seconds)


def replay_stream(
    context_dir: str | Path,
    events_path: str | Path,
    fmt: str = "auto",
    timezone: str | None = None,
    config_path: str | None = None,
) -> list[dict[str, Any]]:
    """The alerts (CONTRACTS §4 dicts) that the streaming path raises for this input."""
    res = run_stream_replay(context_dir, events_path, fmt, timezone, config_path, errors=sys.stderr)
    if res.bad:
        print(f"{events_path}: {res.bad} malformed line(s) skipped", file=sys.stderr)
    return res.alerts
