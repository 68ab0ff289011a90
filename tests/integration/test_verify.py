"""verify passes on a healthy ledger and fails once a forged event is in the topic."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from confluent_kafka import Producer

from schemas.models import Deposit, LedgerEvent, OpenAccount, TransferCredited, encode
from streams import exits
from streams.dev.procs import settings_env
from streams.ops.verify import verify
from streams.partitions import partition_for

pytestmark = pytest.mark.kafka


def run_cli(s, *args):
    env = {**os.environ, **settings_env(s)}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_verify_passes_then_fails_on_a_forged_credit(ledger_settings, start_worker, client):
    s = ledger_settings
    start_worker()
    now = int(time.time() * 1000)
    for c in (OpenAccount(command_id="o", account_id="eve", actor="t", issued_at=now,
                          currency="USD"),
              Deposit(command_id="d", account_id="eve", actor="t", issued_at=now + 1,
                      amount_minor=500, currency="USD")):
        assert client.submit(c).result(timeout=60).accepted
    assert verify(s).ok
    ok = run_cli(s, "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok: every invariant holds" in ok.stdout

    # money from nowhere: a credit that no debit on any account paid for, written
    # straight to the events topic with a version that fits
    forged = LedgerEvent(
        event_id="forged", account_id="eve", version=3, currency="USD",
        balance_after_minor=1_000_500, available_after_minor=1_000_500,
        occurred_at=now + 2, command_id="free-money", causation_id="free-money:credit",
        correlation_id=None, actor="mallory",
        payload=TransferCredited(transfer_id="free-money", from_account_id="nobody",
                                 amount_minor=1_000_000))
    producer = Producer(s.producer_config())
    producer.produce(s.events_topic, encode(forged), b"eve",
                     partition=partition_for("eve", s.partitions))
    assert producer.flush(30) == 0

    report = verify(s)
    assert not report.ok
    assert any("free-money" in b and "never debited" in b for b in report.breaches)
    bad = run_cli(s, "--json", "verify")
    assert bad.returncode == exits.REFUSED
    assert '"ok": false' in bad.stdout
