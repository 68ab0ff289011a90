"""docker-compose.yml cannot run here (no Docker engine); check what the README promises."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_has_broker_and_worker_wired_together():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) >= {"kafka", "worker"}

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert "9092:9092" in kafka["ports"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "EXTERNAL://localhost:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck" in kafka

    worker = services["worker"]
    assert worker["build"] == "."
    assert worker["command"] == ["ledger", "worker"]
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert worker["restart"] == "unless-stopped"
    assert "6066:6066" in worker["ports"]
    wenv = worker["environment"]
    # the worker reaches the broker on the listener advertised inside the network
    assert wenv["LEDGER_BOOTSTRAP_SERVERS"] == "kafka:19092"
    assert "INTERNAL://kafka:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert wenv["LEDGER_WEB_HOST"] == "0.0.0.0"
    assert wenv["LEDGER_WEB_PORT"] == "6066"


def test_dockerfile_runs_the_worker_and_readme_shows_compose():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["ledger", "worker"]' in dockerfile
    assert "EXPOSE 6066" in dockerfile
    for package in ("schemas", "streams", "producers"):
        assert f"COPY {package} " in dockerfile
    assert "docker compose up" in (ROOT / "README.md").read_text()
