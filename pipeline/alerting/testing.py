"""Loopback stand-ins for the services the sinks talk to, for tests and the demo.

* :class:`FakeSlack`: an HTTP server speaking the part of the Slack Web API the sink uses
  (``POST /api/chat.postMessage``), which can answer 429 with ``Retry-After``, answer 500,
  or go away entirely (the port refuses connections) and come back on the same port.
* :class:`LoopbackSmtp`: a real SMTP server (aiosmtpd) with STARTTLS from a throw-away CA
  (trustme) and AUTH LOGIN/PLAIN, which can be stopped and restarted on the same port.
* :func:`scratch_postgres`: a PostgreSQL database created for a test and dropped after.

aiosmtpd and trustme are test dependencies, imported only when used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PG_ADMIN_URL_ENV = "EMRWATCH_TEST_PG"
PG_ADMIN_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- Slack
class FakeSlack:
    """A Slack Web API stand-in on 127.0.0.1; ``base_url`` is what ``WebClient`` needs."""

    def __init__(self, token: str = "xoxb-test") -> None:
        self.token = token
        self.port = free_port()
        self.messages: list[dict[str, Any]] = []  # accepted chat.postMessage bodies
        self.requests = 0
        self.rate_limit_next = 0  # answer this many requests with 429
        self.retry_after = 1
        self.fail_next = 0  # answer this many requests with 500
        self.fail_all = False  # answer 500 until cleared
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def start(self) -> FakeSlack:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any] | str, **headers: str) -> None:
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type",
                    "text/plain" if isinstance(body, str) else "application/json; charset=utf-8",
                )
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                with fake._lock:
                    fake.requests += 1
                    if fake.rate_limit_next > 0:
                        fake.rate_limit_next -= 1
                        self._reply(
                            429,
                            {"ok": False, "error": "ratelimited"},
                            Retry_After=str(fake.retry_after),
                        )
                        return
                    if fake.fail_all or fake.fail_next > 0:
                        fake.fail_next = max(0, fake.fail_next - 1)
                        self._reply(500, "internal error")
                        return
                if self.path != "/api/chat.postMessage":
                    self._reply(404, {"ok": False, "error": "unknown_method"})
                    return
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._reply(200, {"ok": False, "error": "invalid_auth"})
                    return
                ctype = self.headers.get("Content-Type", "")
                if "json" in ctype:
                    body = json.loads(raw or b"{}")
                else:
                    from urllib.parse import parse_qs

                    body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                    if isinstance(body.get("blocks"), str):
                        body["blocks"] = json.loads(body["blocks"])
                if not body.get("channel"):
                    self._reply(200, {"ok": False, "error": "channel_not_found"})
                    return
                with fake._lock:
                    fake.messages.append(body)
                    ts = f"{1700000000 + len(fake.messages)}.000100"
                self._reply(200, {"ok": True, "channel": body["channel"], "ts": ts})

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go away: the port refuses connections until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------- SMTP
def _drop_login_data_warning(record: logging.LogRecord) -> bool:
    return "login_data is deprecated" not in record.getMessage()


class LoopbackSmtp:
    """aiosmtpd on 127.0.0.1 with STARTTLS required and AUTH required."""

    def __init__(self, user: str = "emrwatch", password: str = "s3cret") -> None:
        import trustme

        self.user, self.password = user, password
        self.port = free_port()
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_ctx)
        self.messages: list[dict[str, Any]] = []  # {mail_from, rcpt_tos, data, message}
        self.auth_ok = 0
        self.auth_failed = 0
        self.reject_next = 0  # answer this many DATA commands with 451
        self._controller: Any = None

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts the throw-away CA (as ``smtp.ca_file`` would)."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def write_ca(self, path: str | os.PathLike[str]) -> str:
        self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    def start(self) -> LoopbackSmtp:
        from email import message_from_bytes, policy

        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        srv = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
                if srv.reject_next > 0:
                    srv.reject_next -= 1
                    return "451 4.3.0 try again later"
                data = envelope.original_content or envelope.content
                srv.messages.append(
                    {
                        "mail_from": envelope.mail_from,
                        "rcpt_tos": list(envelope.rcpt_tos),
                        "data": data,
                        "message": message_from_bytes(data, policy=policy.default),
                        "tls": session.ssl is not None,
                        "auth": session.authenticated,
                    }
                )
                return "250 OK"

        def authenticator(
            server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
        ) -> AuthResult:
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == srv.user
                and auth_data.password.decode() == srv.password
            )
            if ok:
                srv.auth_ok += 1
            else:
                srv.auth_failed += 1
            return AuthResult(success=ok, handled=False)

        # aiosmtpd 1.4 logs a warning about its own legacy attribute on every AUTH
        logging.getLogger("mail.log").addFilter(_drop_login_data_warning)
        self._controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            tls_context=self.server_ctx,
            require_starttls=True,
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=True,
            ready_timeout=10,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> LoopbackSmtp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------- PostgreSQL
def postgres_admin_url() -> str:
    return os.environ.get(PG_ADMIN_URL_ENV, PG_ADMIN_DEFAULT)


def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it can."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        return f"psycopg is not installed: {exc}"
    try:
        with psycopg.connect(postgres_admin_url(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means: skip, with the reason
        return f"PostgreSQL at {postgres_admin_url()} is not reachable: {exc}"
    return None


@contextlib.contextmanager
def scratch_postgres() -> Iterator[str]:
    """A fresh database for one test (or session); dropped afterwards. Yields its URL."""
    import psycopg

    admin = postgres_admin_url()
    name = f"emrwatch_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------------- data
class FakeClock:
    """A settable UTC clock for stores and outboxes under test."""

    def __init__(self, start: str = "2026-03-02T02:00:00+00:00") -> None:
        from datetime import datetime

        self.now = datetime.fromisoformat(start)

    def __call__(self) -> Any:
        return self.now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)


def sample_alert(
    alert_id: str = "ew-000000000000000000000001",
    version: int = 1,
    severity: str = "high",
    user_id: str = "u0001",
    department_id: str = "ORTH",
    role: str = "nurse",
    detector: tuple[str, ...] = ("vip-snooping",),
    patient_ids: tuple[str, ...] = ("p00012",),
    event_ids: tuple[str, ...] | None = None,
    first_seen: str = "2026-03-02T10:00:00+08:00",
    last_seen: str = "2026-03-02T10:05:00+08:00",
    status: str = "open",
    reason: str = "opened a VIP patient's record 2 time(s) 10:00–10:05 with no care relationship",
    **extra: Any,
) -> dict[str, Any]:
    """An alert dict shaped like ``detectors.alerts.Alert.to_dict()``."""
    return {
        "alert_id": alert_id,
        "detector": list(detector),
        "severity": severity,
        "score": 0.8,
        "user_id": user_id,
        "patient_ids": list(patient_ids),
        "event_ids": list(event_ids)
        if event_ids is not None
        else [f"{alert_id}-e1", f"{alert_id}-e2"],
        "first_seen": first_seen,
        "last_seen": last_seen,
        "reason": reason,
        "department_id": department_id,
        "role": role,
        "risk": 1.2,
        "version": version,
        "status": status,
        "findings": [{"rule": d, "level": severity} for d in detector],
        "explanations_checked": ["attending", "care_department"],
        "model_versions": {},
        **extra,
    }


@contextlib.contextmanager
def backend_url(kind: str, directory: str | os.PathLike[str]) -> Iterator[str]:
    """A store URL for tests: ``sqlite`` (a file in ``directory``) or ``postgresql`` (a
    scratch database, skipped with the reason when the server is not reachable)."""
    if kind == "sqlite":
        yield f"sqlite:///{os.fspath(directory)}/alerts-{uuid.uuid4().hex[:6]}.sqlite3"
        return
    if kind != "postgresql":
        raise ValueError(kind)
    why = postgres_unavailable()
    if why:
        import pytest

        pytest.skip(why)
    with scratch_postgres() as url:
        yield url
