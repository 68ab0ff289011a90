"""docker-compose.yml cannot run here (no Docker engine); check what the README promises."""

from __future__ import annotations

import re
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
    assert "127.0.0.1:6066:6066" in worker["ports"]  # development mode: loopback only
    assert worker["environment"]["LEDGER_DEV_MODE"] == "true"
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
    assert "setup.py" in dockerfile  # what compiles the worker's core
    assert "pip install --no-cache-dir '.[worker]'" in dockerfile  # Faust, RocksDB, ...
    assert "docker compose up" in (ROOT / "README.md").read_text()


def test_secure_compose_makes_users_and_acls_and_logs_each_service_in():
    doc = yaml.safe_load((ROOT / "docker-compose.secure.yml").read_text())
    services = doc["services"]
    assert set(services) == {"kafka", "setup", "worker"}
    raw = (ROOT / "docker-compose.secure.yml").read_text()
    # every password comes from the environment, none is written in the file
    values = re.findall(r'(?:password|user_admin)="?([^"\],;]*)', raw)
    assert len(values) >= 7 and all(v.startswith("$$") for v in values), values

    kafka = services["kafka"]
    assert kafka["image"] == yaml.safe_load((ROOT / "docker-compose.yml").read_text())[
        "services"]["kafka"]["image"]
    script = kafka["command"][0]
    props = dict(line.split("=", 1) for line in script.splitlines()
                 if "=" in line and line[:1].islower() and "." in line.split("=", 1)[0])
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:admin"
    # no listener without SASL: every client must log in
    assert set(props["listener.security.protocol.map"].split(",")) == {
        "INTERNAL:SASL_PLAINTEXT", "EXTERNAL:SASL_PLAINTEXT", "CONTROLLER:SASL_PLAINTEXT"}
    for user in ("admin", "worker", "client"):
        assert f"--add-scram=\"SCRAM-SHA-512=[name={user},password=$${user.upper()}_PASSWORD]\"" \
            in script
        assert kafka["environment"][f"{user.upper()}_PASSWORD"].startswith(
            f"${{LEDGER_KAFKA_{user.upper()}_PASSWORD:?")
    assert "--command-config /tmp/admin.properties" in kafka["healthcheck"]["test"][1]

    setup, worker = services["setup"], services["worker"]
    assert setup["command"] == ["ledger topics && ledger acl"]
    assert setup["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert setup["environment"]["LEDGER_SASL_USERNAME"] == "admin"
    assert worker["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    for svc, user in ((setup, "admin"), (worker, "worker")):
        env = svc["environment"]
        assert env["LEDGER_BOOTSTRAP_SERVERS"] == "kafka:19092"
        assert env["LEDGER_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        assert env["LEDGER_SASL_USERNAME"] == user
        assert env["LEDGER_SASL_PASSWORD"].startswith(f"${{LEDGER_KAFKA_{user.upper()}_PASSWORD")
    assert worker["command"] == ["ledger", "worker"]
