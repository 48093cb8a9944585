"""Stream settings: config files, validation, fail-fast messages, command-line overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.stream_config import StreamConfigError, load_settings, settings_from_dict
from pipeline.stream_worker import settings_from_args
from pipeline.streaming import add_run_arguments, cmd_run

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return p.parse_args(list(argv))


def test_the_docker_worker_config_is_valid() -> None:
    s = load_settings(DOCKER / "stream.yaml")
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert s.kafka.session_timeout_s >= 6  # real Kafka refuses shorter sessions
    assert s.topics.partitions >= 2 and s.worker.metrics_port > 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"kafka": {"bootstrap_server": "x:1"}}, "unknown key(s) ['bootstrap_server']"),
        ({"kafak": {}}, "unknown section(s) ['kafak']"),
        ({"kafka": {"bootstrap_servers": "no-port"}}, "is not host:port"),
        (
            {"kafka": {"bootstrap_servers": "k:9092", "security_protocol": "TLS"}},
            "security_protocol",
        ),
        (
            {
                "kafka": {
                    "bootstrap_servers": "k:9092",
                    "security_protocol": "SASL_SSL",
                    "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_username": "u",
                    "sasl_password_env": "EMRWATCH_TEST_NO_SUCH_VAR",
                }
            },
            "$EMRWATCH_TEST_NO_SUCH_VAR",
        ),
        (
            {"kafka": {"bootstrap_servers": "k:9092", "ssl_cafile": "/nonexistent/ca.pem"}},
            "does not exist",
        ),
        ({"topics": {"partitions": 0}}, "partitions must be at least 1"),
        ({"worker": {"mode": "fast"}}, "worker.mode"),
        ({"connectors": [{"type": "kafka-connect"}]}, "unknown type 'kafka-connect'"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(doc: dict, message: str) -> None:
    with pytest.raises(StreamConfigError) as err:
        settings_from_dict(doc)
    assert message in str(err.value)


def test_sasl_settings_reach_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMRWATCH_TEST_PW", "s3cret")
    s = settings_from_dict(
        {
            "kafka": {
                "bootstrap_servers": "k1:9093,k2:9093",
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_username": "emrwatch",
                "sasl_password_env": "EMRWATCH_TEST_PW",
            }
        }
    )
    kp = s.kafka.kafka_python()
    assert kp["sasl_plain_password"] == "s3cret" and kp["sasl_mechanism"] == "SCRAM-SHA-256"
    creds = s.kafka.faust_credentials()
    assert creds.username == "emrwatch"


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "kafka: {bootstrap_servers: 'k:9092'}\ntopics: {partitions: 8}\nworker: {group_id: g1}\n"
    )
    s = settings_from_args(_args("--config", str(cfg), "--group", "g2", "--no-engine-process"))
    assert (s.kafka.bootstrap_servers, s.topics.partitions, s.worker.group_id) == (
        "k:9092",
        8,
        "g2",
    )
    assert s.worker.engine_process is False


def test_run_refuses_a_bad_config_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka: {bootstrap_servers: 'k:9092', sesion_timeout_s: 10}\n")
    assert cmd_run(_args("--config", str(cfg))) == 2
    assert "sesion_timeout_s" in capsys.readouterr().err
    assert cmd_run(_args("--config", str(tmp_path / "missing.yaml"))) == 2
    assert cmd_run(_args()) == 2


def test_run_fails_fast_on_an_unreachable_broker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pipeline.stream_worker as worker
    from pipeline.broker import free_port

    real = worker.check_reachable
    monkeypatch.setattr(
        worker, "check_reachable", lambda kafka, timeout=15.0: real(kafka, timeout=2.0)
    )
    port = free_port()
    assert cmd_run(_args("--bootstrap", f"127.0.0.1:{port}")) == 2
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in capsys.readouterr().err
