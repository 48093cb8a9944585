"""Serve the feed from a background thread (uvicorn), for ``emrwatch demo`` / ``run``."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from pipeline.alerting.store import AlertStore
from pipeline.web.app import create_app
from pipeline.web.settings import FeedSettings

log = logging.getLogger(__name__)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class FeedServer:
    """A running feed. Calling it stops it (it is the ``stop_fn`` of :func:`serve_feed`)."""

    def __init__(
        self,
        store: AlertStore,
        settings: FeedSettings,
        host: str,
        port: int,
        metrics_registry: CollectorRegistry | None = None,
        detection: Any = None,
        settings_path: str | Path | None = None,
    ) -> None:
        self.app = create_app(
            store,
            settings,
            metrics_registry=metrics_registry,
            detection=detection,
            settings_path=settings_path,
        )
        # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then,
        # and without it every keep-alive response waits ~40 ms for a delayed ACK
        self._sock = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(128)
        self._sock.setblocking(False)
        bound_host, bound_port = self._sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "https" if settings.tls else "http"
        self.url = f"{scheme}://{shown}:{bound_port}"
        if not settings.tls and not _loopback(bound_host):
            log.warning(
                "the alert feed serves patient data over plain HTTP on %s: set feed.tls_cert_file "
                "and tls_key_file, or put it behind an HTTPS proxy (and secure_cookies: true)",
                self.url,
            )
        tls: dict[str, Any] = {}
        if settings.tls:
            tls = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
        config = uvicorn.Config(
            self.app,
            **tls,
            log_config=None,  # the embedding program owns logging; uvicorn prints nothing
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="emrwatch-feed",
            daemon=True,
        )

    def start(self, timeout_s: float = 15.0) -> FeedServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise RuntimeError("the feed server did not start (see the log)")
            time.sleep(0.02)
        return self

    def notify(self) -> None:
        """Make the feed look for new alerts now (after writing to the store here)."""
        self.app.state.feed.notify()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.app.state.feed.close_streams_threadsafe()  # open event streams end first
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()

    def __call__(self) -> None:
        self.stop()


def serve_feed(
    store: AlertStore,
    settings: FeedSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    metrics_registry: CollectorRegistry | None = None,
    detection: Any = None,
    settings_path: str | Path | None = None,
) -> tuple[str, FeedServer]:
    """Start the feed on ``host:port`` (0: a free port) in a background thread.

    Returns ``(url, stop_fn)``; ``stop_fn()`` stops the server, ``stop_fn.notify()`` asks
    it to look for changes at once and ``stop_fn.app`` is the ASGI app. With
    ``metrics_registry``, ``/metrics`` serves that Prometheus registry (plus the feed's own
    metrics) on the same port. ``detection`` (a :class:`detectors.config.DetectionConfig`)
    is what the access report page judges with. With ``settings_path`` (the config file
    ``settings`` came from), changes to its users apply while the feed runs. Prints nothing.
    """
    server = FeedServer(
        store, settings or FeedSettings(), host, port, metrics_registry, detection, settings_path
    ).start()
    return server.url, server
