"""Settings of the streaming pipeline: Kafka connection, topics, worker tuning.

``emrwatch run --config FILE`` reads a YAML (or JSON) file with these sections; unknown keys
are an error, so a typo never silently leaves a default in place::

    kafka:
      bootstrap_servers: kafka-1:9092,kafka-2:9092
      security_protocol: SASL_SSL        # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
      sasl_mechanism: SCRAM-SHA-512      # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
      sasl_username: emrwatch
      sasl_password_env: EMRWATCH_KAFKA_PASSWORD   # the secret stays out of the file
      ssl_cafile: /etc/emrwatch/ca.pem
      session_timeout_s: 10
      heartbeat_interval_s: 3
    topics:
      prefix: emrwatch
      partitions: 12                     # the ceiling on workers in the group
      replication_factor: 3
    worker:
      group_id: emrwatch
      metrics_port: 9464
    context:
      timezone: Asia/Shanghai
      load_dir: /etc/emrwatch/context    # optional: publish these CSVs at start-up
    detection: /etc/emrwatch/detection.yaml   # or an inline mapping
    connectors:                          # see `emrwatch connectors list` for every type
      - {type: file, name: emr-audit, path: /var/log/emr/audit.ndjson, format: fhir, mode: tail}
    ingest:
      state_dir: /var/lib/emrwatch/connectors   # checkpoints and the receipt ledger
    sinks: []                            # consumers of the alert topic, run separately

The embedded broker needs short sessions (joins take session_timeout / 2 there); real Kafka
rejects sessions under 6 s, so production should use 10 s or more.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.topics import TopicLayout


class StreamConfigError(ValueError):
    """A streaming configuration that cannot be used; the message says which key and why."""


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    sasl_password_env: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 2.0
    request_timeout_s: float = 30.0
    #: kafka-python's idempotent producer; works on Tansu and on real Kafka.
    idempotent_producer: bool = True

    def validate(self) -> None:
        if not self.bootstrap_servers.strip():
            raise StreamConfigError("kafka.bootstrap_servers: required")
        for hp in self.bootstrap_servers.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not port.isdigit():
                raise StreamConfigError(f"kafka.bootstrap_servers: {hp.strip()!r} is not host:port")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise StreamConfigError(
                f"kafka.security_protocol: {self.security_protocol!r} is not one of {SECURITY_PROTOCOLS}"
            )
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise StreamConfigError(
                    f"kafka.sasl_mechanism: {self.sasl_mechanism!r} is not one of {SASL_MECHANISMS}"
                )
            if not self.sasl_username:
                raise StreamConfigError("kafka.sasl_username: required with SASL")
            if not self.password:
                src = f"${self.sasl_password_env}" if self.sasl_password_env else "sasl_password"
                raise StreamConfigError(f"kafka: SASL password is empty ({src})")
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise StreamConfigError(f"kafka.{key}: {path} does not exist")
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise StreamConfigError(
                "kafka.heartbeat_interval_s should be at most a third of session_timeout_s"
            )

    @property
    def password(self) -> str:
        if self.sasl_password_env:
            return os.environ.get(self.sasl_password_env, "")
        return self.sasl_password

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.uses_ssl:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_cafile or None)
        ctx.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
        return ctx

    def kafka_python(self) -> dict[str, Any]:
        """Connection settings for kafka-python clients (producer, consumer, admin)."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            out.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.password,
            )
        if self.uses_ssl:
            out["ssl_context"] = self.ssl_context()
        return out

    def faust_credentials(self) -> Any:
        """``broker_credentials`` for the Faust app (None for PLAINTEXT)."""
        import faust

        if self.security_protocol.startswith("SASL"):
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.password,
                mechanism=self.sasl_mechanism,
                ssl_context=self.ssl_context(),
            )
        if self.uses_ssl:
            return faust.SSLCredentials(self.ssl_context())
        return None


@dataclass(frozen=True)
class WorkerSettings:
    """One Faust worker's tuning. Defaults are measured on the embedded broker (STACK_NOTES)."""

    group_id: str = "emrwatch"
    batch_size: int = 1000
    batch_within_s: float = 0.05
    #: seconds between engine snapshots (each flushes alerts first)
    snapshot_interval_s: float = 10.0
    #: seconds between event-time housekeeping calls (Engine.advance)
    advance_interval_s: float = 10.0
    commit_interval_s: float = 1.0
    #: longest a fetch may wait for data (latency floor on brokers that hold empty fetches)
    fetch_max_wait_s: float = 0.1
    metrics_port: int = -1  # -1: no metrics endpoint, 0: any free port
    metrics_host: str = "127.0.0.1"
    #: "detect" runs the engine; "passthrough" only decodes and acks (the bench baseline)
    mode: str = "detect"
    #: "module:callable" building an engine from (context, config); tests use a stand-in
    engine_factory: str = "detectors.engine:Engine"
    log_level: str = "WARNING"
    #: Faust's data directory (empty: a temporary one; the memory store writes nothing there)
    data_dir: str = ""
    #: run the engines in a child process so detection uses a second core (see stream_host)
    engine_process: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise StreamConfigError("worker.batch_size must be at least 1")
        if self.batch_within_s <= 0:
            raise StreamConfigError("worker.batch_within_s must be positive")
        if self.mode not in ("detect", "passthrough"):
            raise StreamConfigError(f"worker.mode: {self.mode!r} is not detect or passthrough")
        if ":" not in self.engine_factory:
            raise StreamConfigError("worker.engine_factory must be 'module:callable'")


@dataclass(frozen=True)
class IngestSettings:
    """How connectors run: where their checkpoints and ledger live, how they batch."""

    state_dir: str = ".emrwatch/connectors"
    batch_size: int = 2000
    linger_s: float = 0.5

    def validate(self) -> None:
        if self.batch_size < 1:
            raise StreamConfigError("ingest.batch_size must be at least 1")
        if self.linger_s < 0:
            raise StreamConfigError("ingest.linger_s must not be negative")


@dataclass(frozen=True)
class StreamSettings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicLayout = field(default_factory=TopicLayout)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    timezone: str = "Asia/Shanghai"
    context_load_dir: str = ""
    detection: Any = None  # path, mapping or None (defaults)
    connectors: tuple[dict[str, Any], ...] = ()
    sinks: tuple[dict[str, Any], ...] = ()
    create_topics: bool = True
    ingest: IngestSettings = field(default_factory=IngestSettings)

    def validate(self) -> StreamSettings:
        self.kafka.validate()
        self.worker.validate()
        if self.topics.partitions < 1:
            raise StreamConfigError("topics.partitions must be at least 1")
        if self.context_load_dir and not Path(self.context_load_dir).is_dir():
            raise StreamConfigError(f"context.load_dir: {self.context_load_dir} is not a directory")
        self.ingest.validate()
        self.build_connectors()  # every connector's config is checked now, not at first use
        return self

    def build_connectors(self, ledger: Any = None) -> list[Any]:
        """The configured connectors (``connectors.registry``); names must be unique."""
        from connectors.base import ConnectorConfigError
        from connectors.registry import build

        out = []
        names: set[str] = set()
        for i, spec in enumerate(self.connectors):
            try:
                c = build(spec, i, ledger=ledger)
            except ConnectorConfigError as exc:
                raise StreamConfigError(str(exc)) from None
            if c.name in names:
                raise StreamConfigError(
                    f"connectors[{i}].name: {c.name!r} is used twice; give each source a name"
                )
            names.add(c.name)
            out.append(c)
        return out

    def with_bootstrap(self, bootstrap: str) -> StreamSettings:
        return replace(self, kafka=replace(self.kafka, bootstrap_servers=bootstrap))

    def detection_config(self) -> Any:
        from detectors.config import DetectionConfig

        if self.detection is None:
            return DetectionConfig(timezone=self.timezone)
        if isinstance(self.detection, dict):
            return DetectionConfig.from_dict(self.detection, source="config: detection")
        return DetectionConfig.load(self.detection)


def _build(cls: type, data: Any, section: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise StreamConfigError(f"{section}: must be a mapping")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise StreamConfigError(f"{section}: unknown key(s) {unknown}; known: {sorted(names)}")
    kw = dict(data)
    if cls is TopicLayout and "sources" in kw:
        kw["sources"] = tuple(kw["sources"])
    try:
        return cls(**kw)
    except TypeError as exc:
        raise StreamConfigError(f"{section}: {exc}") from None


def settings_from_dict(doc: dict[str, Any], source: str = "config") -> StreamSettings:
    # alerting: and feed: belong to `emrwatch alerts` (pipeline.alert_service); a worker ignores them
    known = {
        "kafka",
        "topics",
        "worker",
        "context",
        "detection",
        "connectors",
        "ingest",
        "sinks",
        "alerting",
        "feed",
    }
    unknown = sorted(set(doc) - known)
    if unknown:
        raise StreamConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(known)}")
    ctx = doc.get("context") or {}
    if not isinstance(ctx, dict) or set(ctx) - {"timezone", "load_dir"}:
        raise StreamConfigError(f"{source}: context: only 'timezone' and 'load_dir' are known")
    topics = dict(doc.get("topics") or {})
    create = bool(topics.pop("create", True))
    detection = doc.get("detection")
    if isinstance(detection, str) and source not in ("config",):
        base = Path(source).parent
        if not Path(detection).is_absolute():
            detection = str(base / detection)
    return StreamSettings(
        kafka=_build(KafkaSettings, doc.get("kafka"), "kafka"),
        topics=_build(TopicLayout, topics, "topics"),
        worker=_build(WorkerSettings, doc.get("worker"), "worker"),
        timezone=str(ctx.get("timezone") or "Asia/Shanghai"),
        context_load_dir=str(ctx.get("load_dir") or ""),
        detection=detection,
        connectors=tuple(doc.get("connectors") or ()),
        sinks=tuple(doc.get("sinks") or ()),
        create_topics=create,
        ingest=_build(IngestSettings, doc.get("ingest"), "ingest"),
    ).validate()


def load_settings(path: str | Path) -> StreamSettings:
    """Read and validate a config file; raise :class:`StreamConfigError` with a clear message."""
    p = Path(path)
    if not p.is_file():
        raise StreamConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            import json

            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is a config error
        raise StreamConfigError(f"{p}: cannot parse: {exc}") from None
    if not isinstance(doc, dict):
        raise StreamConfigError(f"{p}: top level must be a mapping")
    return settings_from_dict(doc, source=str(p))
