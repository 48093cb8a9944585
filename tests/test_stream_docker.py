"""docker/: no Docker engine runs here, so check what can be checked without one."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.stream_config import load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_runs_kraft_kafka_and_scalable_workers() -> None:
    services = _compose()["services"]
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"])  # the Apache image, pinned
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"]  # KRaft: no ZooKeeper anywhere
    assert not any(
        "zookeeper" in name or "zookeeper" in str(s.get("image", ""))
        for name, s in services.items()
    )
    worker = services["worker"]
    assert worker["command"][:2] == ["run", "--config"]
    assert services["connector"]["command"][:3] == ["connectors", "run", "--config"]
    assert "replicas" in worker["deploy"]
    assert services["connector"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert worker["image"] == services["connector"]["image"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    # every file the services mount is in docker/
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./") and "EMRWATCH" not in src:
                assert (DOCKER / src).exists(), src


def test_dockerfile_installs_like_the_makefile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base and re.fullmatch(r"python:3\.11[\w.-]*", base.group(1))
    assert re.search(r"^RUN make setup$", text, re.M)  # the Makefile's install steps, not a copy
    assert re.search(r"^setup:", (ROOT / "Makefile").read_text(), re.M)
    for copied in re.findall(r"^COPY\s+(\S+)", text, re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name
    assert 'ENTRYPOINT ["emrwatch"]' in text


def test_worker_configs_load(tmp_path: Path) -> None:
    worker = load_settings(DOCKER / "stream.yaml")
    doc = yaml.safe_load((DOCKER / "connector.yaml").read_text())
    connector = settings_from_dict(doc)
    assert {c.type for c in connector.build_connectors()} == {"context-csv", "file"}
    assert connector.topics == worker.topics  # same layout: one group shares the partitions
    assert connector.worker.group_id == worker.worker.group_id
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    ports = {c["port"] for job in prom["scrape_configs"] for c in job.get("dns_sd_configs") or []}
    assert ports == {worker.worker.metrics_port}
    # the alert service's metrics are on its feed's port
    (alerts,) = [j for j in prom["scrape_configs"] if j["job_name"] == "emrwatch-alerts"]
    alerts_feed = yaml.safe_load((DOCKER / "alerts.yaml").read_text())["feed"]
    assert alerts["static_configs"][0]["targets"] == [f"alerts:{alerts_feed['port']}"]
    rules = yaml.safe_load((DOCKER / "prometheus-rules.yml").read_text())["groups"][0]["rules"]
    assert {"EmrwatchHistoryStale", "EmrwatchSinkFailing"} <= {r["alert"] for r in rules}


def test_alerts_service_config_loads(tmp_path: Path) -> None:
    from pipeline.alert_service import _load

    doc = yaml.safe_load((DOCKER / "alerts.yaml").read_text())
    doc["context"]["load_dir"] = str(tmp_path)  # /data exists only inside the container
    doc["alerting"]["store_url"] = f"sqlite:///{tmp_path / 'a.sqlite3'}"
    # the history lives beside the store on the service's volume
    assert Path(doc["feed"]["history_dir"]).parent == Path("/var/lib/emrwatch")
    doc["feed"]["history_dir"] = str(tmp_path / "history")
    cfg = tmp_path / "alerts.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    settings, alerting, feed, _ctx = _load(str(cfg))
    worker = load_settings(DOCKER / "stream.yaml")
    assert settings.topics == worker.topics
    assert feed is not None and feed.port == 8080 and feed.history_refresh_s == 300
    services = _compose()["services"]
    assert services["alerts"]["command"] == ["alerts", "--config", "/etc/emrwatch/alerts.yaml"]
