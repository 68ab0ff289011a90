"""Command records in every codec a client may use are decided (none stalls the fetcher)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from schemas.models import Deposit, OpenAccount, encode_batch
from streams.ops.verify import verify
from streams.partitions import partition_for

pytestmark = pytest.mark.kafka


def test_gzip_snappy_lz4_zstd_records_are_all_decided(ledger_settings, start_worker, client):
    s = ledger_settings
    worker = start_worker()
    now = int(time.time() * 1000)
    codecs = ["gzip", "snappy", "lz4", "zstd"]
    for codec in codecs:
        account = f"acct-{codec}"
        producer = Producer(s.producer_config(**{"compression.type": codec}))
        commands = [OpenAccount(command_id=f"o-{codec}", account_id=account, actor="t",
                                issued_at=now, currency="USD")]
        commands += [Deposit(command_id=f"d-{codec}-{i}", account_id=account, actor="t",
                             issued_at=now, amount_minor=100, currency="USD")
                     for i in range(50)]
        producer.produce(s.commands_topic, encode_batch(commands),
                         partition=partition_for(account, s.partitions))
        assert producer.flush(30) == 0
    # the worker is still consuming: a command sent after all four codecs is decided
    probe = client.submit(Deposit(command_id="probe", account_id="acct-zstd", actor="t",
                                  issued_at=now, amount_minor=1, currency="USD"))
    assert probe.result(timeout=60).accepted
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        balances = {c: worker.get(f"/accounts/acct-{c}")[1].get("balance_minor") for c in codecs}
        if balances == {"gzip": 5_000, "snappy": 5_000, "lz4": 5_000, "zstd": 5_001}:
            break
        time.sleep(0.3)
    assert balances == {"gzip": 5_000, "snappy": 5_000, "lz4": 5_000, "zstd": 5_001}
    assert verify(s).ok
