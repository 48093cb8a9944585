"""``emrwatch demo`` and ``emrwatch bench``, run briefly end to end as a user would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from tests.conftest import REPO, synthetic_hospital


@pytest.fixture(scope="module")
def small_hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hospital")
    events = synthetic_hospital(d, 6000, seed=31)
    (d / "events.ndjson").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return d


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def test_demo_serves_metrics_shows_alerts_and_stops_on_its_own(small_hospital: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.demo",
            "--data",
            str(small_hospital),
            "--rate",
            "1500",
            "--duration",
            "14",
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    history: list[str] = []  # what the access report page says its history holds
    scraped = ""
    feed_health = 0
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("alert feed"):
                feed_url = line.split()[2]
                feed_health = urllib.request.urlopen(f"{feed_url}/healthz", timeout=5).status
                m = re.search(r"supervisor / ([^,)\s]+)", line)
                assert m, line
                watcher = threading.Thread(
                    target=_watch_history, args=(feed_url, m.group(1), history), daemon=True
                )
                watcher.start()
            if "worker 0 metrics" in line and not scraped:
                url = line.split()[-1]
                for _ in range(40):  # the worker's engines serve it once context is loaded
                    try:
                        scraped = urllib.request.urlopen(url, timeout=2).read().decode()
                        break
                    except OSError:
                        time.sleep(0.5)
            assert time.monotonic() < deadline
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert "http://127.0.0.1:" in out and "/metrics" in out
    assert "emrwatch_events_processed_total" in scraped
    assert feed_health == 200  # the alert feed page is served too
    summary = lines[-1]
    assert summary.startswith("sent ") and "alert(s)" in summary
    sent = int(summary.split()[1].replace(",", ""))
    assert sent > 1000
    assert "p00000" not in out  # patient ids are masked
    # the access report's history is exported from the topics as the stream receives them
    assert history, "the access report page never showed its history"
    held = int(history[-1].split()[0].replace(",", ""))
    assert 0 < held <= sent, history[-1]


def _watch_history(url: str, password: str, seen: list[str]) -> None:
    """Log in as the demo's supervisor and read the access report page until its history
    holds accesses (or the demo ends)."""
    from pipeline.web.testing import FeedClient

    deadline = time.monotonic() + 14
    try:
        with FeedClient(url, "supervisor", password) as sam:
            while time.monotonic() < deadline:
                page = sam.get("/access-report").text
                m = re.search(r'id="history-freshness">([^<]+)<', page)
                if m and not m.group(1).startswith("0 "):
                    seen.append(m.group(1))
                    return
                time.sleep(0.5)
    except Exception:  # noqa: BLE001 - the demo may end first; the test then fails above
        return


def test_bench_reports_every_number_as_json(small_hospital: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.bench",
            "--json",
            "--data",
            str(small_hospital),
            "--rounds",
            "1",
            "--latency-seconds",
            "3",
            "--rate",
            "1000",
            "--replay-runs",
            "1",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    for key in (
        "stream_events_per_s",
        "passthrough_events_per_s",
        "ratio",
        "latency_p50_s",
        "latency_p99_s",
        "replay_events_per_s",
    ):
        assert isinstance(doc[key], float) and doc[key] > 0, key
    assert doc["events"] == 6000
    # the yardstick (plain rule script) read the same events, and replay is stated against it
    assert doc["yardstick"]["events"] == 6000 and doc["yardstick"]["bad"] == 0
    for w in (1, 2):
        r = doc[f"replay_{w}w"]
        assert r["events"] == 6000
        assert r["x_yardstick"] == r["events_per_s"] / doc["yardstick"]["events_per_s"]
    assert doc["latency_p50_s"] <= doc["latency_p99_s"] < 5
