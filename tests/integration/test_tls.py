"""The ledger over TLS on a real broker: SASL_SSL (SCRAM logins, ACLs, the broker's
certificate checked against a CA) and SSL with client certificates (mutual TLS). A
worker (its Faust consumers and confluent-kafka clients alike) and a client run the
pipeline; a client or worker without the CA, or without a certificate where the broker
asks for one, is refused with a clear error."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from producers.client import LedgerClient
from schemas.models import Deposit, OpenAccount
from streams import exits
from streams.dev.kafka_local import LocalBroker, ensure_jars, free_port
from streams.dev.procs import WorkerProcess
from streams.ops.acl import AuthenticationFailed, apply_acls, ledger_acls
from streams.ops.topics import ensure_topics
from streams.settings import Settings

pytestmark = pytest.mark.kafka


def broker_with_tls(users: dict[str, str] | None) -> Iterator[LocalBroker]:
    ensure_jars()
    broker = LocalBroker(users=users, tls=True)
    try:
        broker.start()
        yield broker
    finally:
        broker.__exit__(None, None, None)


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {u: f"{u}-{secrets.token_hex(12)}" for u in ("admin", "worker", "client")}


@pytest.fixture(scope="module")
def sasl_ssl_broker(passwords: dict[str, str]) -> Iterator[LocalBroker]:
    yield from broker_with_tls(passwords)


@pytest.fixture(scope="module")
def mtls_broker() -> Iterator[LocalBroker]:
    yield from broker_with_tls(None)


def run_the_pipeline(worker_settings: Settings, client_settings: Settings,
                     tmp: Path) -> None:
    """A worker and a client: an account opened and funded, its balance read back."""
    w = WorkerProcess(worker_settings, tmp / "worker.log")
    try:
        w.wait_ready()
        account = f"acct-{uuid.uuid4().hex[:6]}"
        t = int(time.time() * 1000)
        with LedgerClient(client_settings) as client:
            for c in (OpenAccount(command_id="open", account_id=account, actor="t",
                                  issued_at=t, currency="USD"),
                      Deposit(command_id="dep", account_id=account, actor="t",
                              issued_at=t + 1, amount_minor=4_200, currency="USD")):
                assert client.submit(c).result(timeout=60).accepted
        status, doc = w.get(f"/accounts/{account}")
        assert (status, doc["balance_minor"], doc["version"]) == (200, 4_200, 2)
    finally:
        w.stop()


def test_the_pipeline_over_sasl_ssl(sasl_ssl_broker: LocalBroker, passwords: dict[str, str],
                                    tmp_path: Path) -> None:
    b = sasl_ssl_broker
    assert b.security_protocol == "SASL_SSL"
    base = Settings(bootstrap_servers=b.bootstrap_servers, partitions=4,
                    ssl_ca_location=b.ca_path,
                    data_dir=tmp_path / "data").isolated(f"tls-{uuid.uuid4().hex[:8]}")

    def as_user(user: str, **updates: object) -> Settings:
        return base.model_copy(update={"security_protocol": "SASL_SSL", "sasl_username": user,
                                       "sasl_password": SecretStr(passwords[user]), **updates})

    admin = as_user("admin")
    ensure_topics(admin)
    apply_acls(admin, ledger_acls(admin))
    run_the_pipeline(as_user("worker", web_port=free_port()), as_user("client"), tmp_path)

    # without the CA, the broker's certificate does not verify: a clear error, at once
    no_ca = as_user("client", ssl_ca_location=None)
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed) as info:
        LedgerClient(no_ca)
    assert time.monotonic() - started < 15
    assert "TLS handshake" in str(info.value) and "certificate verify failed" in str(info.value)

    # a worker without the CA exits with the same error and status as a refused login
    w = WorkerProcess(as_user("worker", ssl_ca_location=None, web_port=free_port(),
                              data_dir=tmp_path / "no-ca"), tmp_path / "no-ca.log")
    try:
        assert w.proc.wait(timeout=60) == exits.NO_PERMISSION
    finally:
        w.stop()
    last = json.loads(w.log_path.read_text().splitlines()[-1])
    assert last["msg"].startswith("worker exiting: authentication failed: the TLS handshake")


def test_the_pipeline_over_mutual_tls(mtls_broker: LocalBroker, tmp_path: Path) -> None:
    b = mtls_broker
    assert b.security_protocol == "SSL"
    s = Settings(bootstrap_servers=b.bootstrap_servers, partitions=4, security_protocol="SSL",
                 ssl_ca_location=b.ca_path, ssl_certificate_location=b.client_cert_path,
                 ssl_key_location=b.client_key_path,
                 data_dir=tmp_path / "data").isolated(f"mtls-{uuid.uuid4().hex[:8]}")
    ensure_topics(s)
    run_the_pipeline(s.model_copy(update={"web_port": free_port()}), s, tmp_path)

    # the broker asks every client for a certificate: one without is refused
    no_certificate = s.model_copy(update={"ssl_certificate_location": None,
                                          "ssl_key_location": None})
    with pytest.raises(AuthenticationFailed) as info:
        LedgerClient(no_certificate)
    assert "TLS handshake" in str(info.value)


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="LEDGER_SSL_KEY_LOCATION"):
        Settings(security_protocol="SSL", ssl_certificate_location=Path("client.pem"))
    with pytest.raises(ValueError, match="LEDGER_SASL_USERNAME"):
        Settings(security_protocol="SASL_SSL")
