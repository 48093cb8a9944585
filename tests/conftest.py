"""Shared fixtures: the embedded broker, stream worker subprocesses, a synthetic hospital.

The broker is session-scoped (one Tansu for the whole run); each streaming test takes its own
topic prefix and consumer group, so tests never see each other's records.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TZ = timezone(timedelta(hours=8))


# ---------------------------------------------------------------------------- broker
@pytest.fixture(scope="session")
def broker() -> Iterator[Any]:
    """One embedded Tansu broker for the test session."""
    from pipeline.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


@pytest.fixture()
def layout(broker: Any) -> Any:
    """A fresh topic layout (unique prefix) with its topics created."""
    from pipeline.topics import TopicLayout, ensure_topics

    lay = TopicLayout(prefix=f"t{uuid.uuid4().hex[:8]}", partitions=4, sources=("jsonl",))
    ensure_topics(broker.bootstrap, lay)
    return lay


@pytest.fixture()
def producer(broker: Any) -> Iterator[Any]:
    from pipeline.stream_config import KafkaSettings
    from pipeline.streaming import make_producer

    p = make_producer(KafkaSettings(bootstrap_servers=broker.bootstrap))
    yield p
    p.close()


# ---------------------------------------------------------------------------- browser
@pytest.fixture()
def browser() -> Iterator[Any]:
    """Real headless Chromium (tests/browser.py)."""
    from tests.browser import launch

    yield from launch()


# ---------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway database on the local PostgreSQL for one test module (dropped after)."""
    from pipeline.alerting.testing import postgres_unavailable, scratch_postgres

    why = postgres_unavailable()
    if why:
        pytest.skip(why)
    with scratch_postgres() as url:
        yield url


# ---------------------------------------------------------------------------- workers
class WorkerProc:
    """One ``python -m pipeline.streaming`` subprocess; killed at teardown whatever happens."""

    def __init__(
        self, bootstrap: str, layout: Any, group: str, log_path: Path, *extra: str
    ) -> None:
        self.log_path = log_path
        self.cmd = [
            sys.executable,
            "-m",
            "pipeline.streaming",
            "--bootstrap",
            bootstrap,
            "--prefix",
            layout.prefix,
            "--partitions",
            str(layout.partitions),
            "--group",
            group,
            "--log-level",
            "INFO",
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self._fh = log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._fh.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if not self.alive():
                raise AssertionError(
                    f"worker exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
                )
            time.sleep(0.2)
        raise AssertionError(f"worker log never showed {needle!r}:\n{self.log()[-3000:]}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture()
def spawn_worker(broker: Any, tmp_path: Path, request: Any) -> Iterator[Any]:
    """``spawn_worker(layout, group, *args)`` → :class:`WorkerProc`; all killed at teardown,
    and their log tails printed when the test failed."""
    procs: list[WorkerProc] = []

    def spawn(layout: Any, group: str, *extra: str) -> WorkerProc:
        w = WorkerProc(
            broker.bootstrap, layout, group, tmp_path / f"worker-{len(procs)}.log", *extra
        )
        procs.append(w)
        return w

    yield spawn
    for w in procs:
        w.stop(timeout=10)
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for i, w in enumerate(procs):
            lines = [
                ln
                for ln in w.log().splitlines()
                if "emrwatch" in ln or "ERROR" in ln or "Traceback" in ln or "partition" in ln
            ]
            print(f"--- worker {i} (exit {w.proc.returncode}) ---")
            print("\n".join(lines[-40:]))


# ---------------------------------------------------------------------------- data
def synthetic_hospital(
    directory: Path,
    n_events: int,
    seed: int = 7,
    n_staff: int = 120,
    n_patients: int = 600,
    start: str = "2026-03-02T07:00:00+08:00",
    step_s: float = 2.0,
) -> list[dict[str, Any]]:
    """Context CSVs in ``directory`` and ``n_events`` canonical event dicts.

    Mostly care-explained accesses, with some accesses outside care and some to a sealed
    record, so the real engine raises a handful of alerts while staying fast.
    """
    from emrwatch.context import write_context_csv

    rnd = random.Random(seed)
    depts = ["CARD", "ORTH", "NEUR", "ONC", "ED", "RAD"]
    directory.mkdir(parents=True, exist_ok=True)
    write_context_csv(
        directory / "departments.csv",
        "departments",
        [
            {
                "department_id": d,
                "name": d,
                "kind": "service" if d == "RAD" else "clinical",
                "head_user_id": f"h-{d}",
            }
            for d in depts
        ],
    )
    staff = []
    for i in range(n_staff):
        d = depts[i % len(depts)]
        staff.append(
            {
                "user_id": f"u{i:04d}",
                "family_name": f"F{i}",
                "given_name": "G",
                "role": "physician" if i % 3 == 0 else "nurse",
                "department_id": d,
                "clearance": 3,
                "shift_start": "00:00",
                "shift_end": "00:00",
                "valid_from": "",
                "valid_until": "",
                "supervisor_id": "",
                "address": f"{i} Road",
            }
        )
    write_context_csv(directory / "staff.csv", "staff", staff)
    patients = [
        {
            "patient_id": f"p{i:05d}",
            "family_name": f"PF{i}",
            "given_name": "X",
            "address": f"{i} Street",
            "sensitivity": 1,
        }
        for i in range(n_patients)
    ]
    write_context_csv(directory / "patients.csv", "patients", patients)
    enc = [
        {
            "encounter_id": f"e{i:05d}",
            "patient_id": f"p{i:05d}",
            "department_id": depts[i % len(depts)],
            "start": "2026-03-01T00:00:00+08:00",
            "end": "",
            "attending_user_id": "",
        }
        for i in range(n_patients)
    ]
    write_context_csv(directory / "encounters.csv", "encounters", enc)
    write_context_csv(
        directory / "sealed.csv",
        "sealed",
        [
            {
                "patient_id": "p00000",
                "sealed_at": "2026-03-01T00:00:00+08:00",
                "reason": "dispute",
                "authorized_user_ids": "u0000",
            },
        ],
    )
    write_context_csv(directory / "grants.csv", "grants", [])
    by_dept: dict[str, list[int]] = {}
    for i in range(n_patients):
        by_dept.setdefault(depts[i % len(depts)], []).append(i)
    t0 = datetime.fromisoformat(start).timestamp()
    events = []
    for n in range(n_events):
        u = rnd.randrange(n_staff)
        d = depts[u % len(depts)]
        r = rnd.random()
        if r < 0.003:
            p = 0  # sealed record
        elif r < 0.01:
            p = rnd.randrange(n_patients)  # maybe outside care
        else:
            p = rnd.choice(by_dept[d])
        ts = datetime.fromtimestamp(t0 + n * step_s, TZ).isoformat()
        events.append(
            {
                "event_id": f"ev{seed}-{n:07d}",
                "ts": ts,
                "user_id": f"u{u:04d}",
                "patient_id": f"p{p:05d}",
                "action": "view",
                "resource_type": "Observation",
                "workstation": f"ws-{u % 50}",
                "outcome": "success",
                "emergency": False,
                "purpose": "",
                "source": "emr",
            }
        )
    return events


# ---------------------------------------------------------------------------- stand-ins
class NullEngine:
    """A do-nothing engine with the Engine interface: isolates pipeline overhead in tests."""

    def __init__(self, context: Any, config: Any = None, rules: Any = None) -> None:
        self.n = 0

    def ingest(self, e: Any) -> None:
        self.n += 1

    def drain(self) -> list[Any]:
        return []

    def advance(self, t: float) -> list[Any]:
        return []

    def flush(self) -> list[Any]:
        return []

    def snapshot(self) -> bytes:
        return str(self.n).encode()

    def restore_state(self, data: bytes) -> None:
        self.n = int(data or b"0")


# ---------------------------------------------------------------------------- harness
class StreamHarness:
    """Drives one topic layout on the session broker: context, events, end markers, reads."""

    def __init__(self, bootstrap: str, layout: Any, producer: Any) -> None:
        self.bootstrap = bootstrap
        self.layout = layout
        self.producer = producer

    def publish_context(self, directory: Path, sync: bool = False) -> dict[str, int]:
        from pipeline.stream_context import publish_context

        return publish_context(self.producer, self.layout, directory, sync=sync)

    def produce(self, events: list[dict[str, Any]], rate: float | None = None) -> Any:
        from emrwatch.events import AccessEvent
        from pipeline.stream_ingest import produce_items

        items = [(i + 1, AccessEvent.from_dict(d), b"") for i, d in enumerate(events)]
        return produce_items(self.producer, self.layout, items, "test", rate=rate)

    def produce_raw(self, key: bytes, value: bytes) -> None:
        self.producer.send(self.layout.access, key=key, value=value)
        self.producer.flush()

    def eof(self) -> tuple[str, list[int]]:
        from pipeline.stream_ingest import send_eof

        run = uuid.uuid4().hex[:10]
        return run, send_eof(self.producer, self.layout, run)

    def reader(self, topic: str) -> Any:
        from pipeline.stream_ingest import TopicReader

        return TopicReader(self.bootstrap, topic)

    def wait_acks(
        self, run: str, parts: list[int], timeout: float = 120.0, workers: tuple[Any, ...] = ()
    ) -> dict[int, dict[str, Any]]:
        from pipeline.stream_ingest import wait_for_acks

        def check() -> None:
            if workers and not any(w.alive() for w in workers):
                raise AssertionError("every worker exited:\n" + workers[-1].log()[-3000:])

        r = self.reader(self.layout.control)
        try:
            return wait_for_acks(r, run, parts, timeout=timeout, progress=check)
        finally:
            r.close()

    def alerts(self) -> tuple[dict[str, dict[str, Any]], int]:
        """(collapsed alerts by id, number of alert records on the topic)."""
        from pipeline.stream_ingest import collapse_alert_records

        r = self.reader(self.layout.alerts)
        try:
            recs = r.read_to_end()
        finally:
            r.close()
        return collapse_alert_records(recs), len(recs)

    def deadletters(self) -> list[tuple[bytes, dict[str, str]]]:
        r = self.reader(self.layout.deadletter)
        try:
            recs = r.read_to_end()
        finally:
            r.close()
        return [(rec.value, {k: v.decode() for k, v in rec.headers}) for rec in recs]


@pytest.fixture()
def harness(broker: Any, layout: Any, producer: Any) -> StreamHarness:
    return StreamHarness(broker.bootstrap, layout, producer)


def replay_reference(context_dir: Path, events: list[dict[str, Any]]) -> dict[str, Any]:
    """In-process replay of the same events: alert id → Alert."""
    from emrwatch.context import Context
    from emrwatch.events import AccessEvent
    from pipeline.replay import replay_events

    ctx = Context.load(context_dir)
    return {a.alert_id: a for a in replay_events(ctx, [AccessEvent.from_dict(d) for d in events])}
