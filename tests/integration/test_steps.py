"""A backlog is decided in bounded steps, not in one batch of everything Faust fetched."""

from __future__ import annotations

import time

import pytest

from producers.client import LedgerClient
from schemas.models import Deposit, OpenAccount
from streams.eventlog import read_all
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.kafka


def test_a_backlog_is_decided_in_steps_of_bounded_size(ledger_settings, start_worker):
    s = ledger_settings
    now = int(time.time() * 1000)
    accounts = [f"step-{i}" for i in range(30)]
    commands = [OpenAccount(command_id=f"o-{a}", account_id=a, actor="t", issued_at=now,
                            currency="USD") for a in accounts]
    commands += [Deposit(command_id=f"d{i}", account_id=accounts[i % 30], actor="t",
                         issued_at=now, amount_minor=i + 1, currency="USD") for i in range(1800)]
    with LedgerClient(s, wait_outcomes=False, max_batch_commands=40) as bulk:
        futures = [bulk.submit(c) for c in commands]
        bulk.flush(60)
    records = {(o.partition, o.offset) for o in (f.result(timeout=0) for f in futures)}
    sizes = [len(m.value()) for m in read_all(s, s.commands_topic)]
    assert len(sizes) == len(records)
    over = sum(n > 1024 for n in sizes)
    assert over > 20  # a backlog of many records of a few KB (up to 40 commands each)

    # a record over the bound is a step of its own; smaller ones may share one
    worker = start_worker(batch_max_bytes=1024)
    deadline = time.monotonic() + 60
    while True:
        metrics = scrape(worker.url)
        if total(metrics, "ledger_commands_total") >= len(commands):
            break
        assert time.monotonic() < deadline, total(metrics, "ledger_commands_total")
        time.sleep(0.5)
    assert total(metrics, "ledger_batch_commands_count") >= over
    assert total(metrics, "ledger_rejections_total") == 0
    for i, a in enumerate(accounts[:5]):
        status, doc = worker.get(f"/accounts/{a}")
        assert status == 200
        assert doc["balance_minor"] == sum(j + 1 for j in range(i, 1800, 30))
        assert doc["version"] == 1 + 60


def test_the_next_batch_fills_while_a_batch_is_written(ledger_settings, start_worker):
    # One command per record, as single submits make. Faust's take_events stops the
    # stream while the agent holds a batch and then gathers for batch_within_ms only,
    # so each batch held what the stream passes in 1 ms: ~2,000 records took hundreds
    # of batches. The worker's own take lets the stream fill the next batch meanwhile.
    s = ledger_settings
    now = int(time.time() * 1000)
    accounts = [f"fill-{i}" for i in range(20)]
    commands = [OpenAccount(command_id=f"o-{a}", account_id=a, actor="t", issued_at=now,
                            currency="USD") for a in accounts]
    commands += [Deposit(command_id=f"d{i}", account_id=accounts[i % 20], actor="t",
                         issued_at=now, amount_minor=i + 1, currency="USD") for i in range(1980)]
    with LedgerClient(s, wait_outcomes=False, max_batch_commands=1) as single:
        for c in commands:
            single.submit(c)
        single.flush(60)
    assert sum(1 for _ in read_all(s, s.commands_topic)) == len(commands)

    worker = start_worker(batch_within_ms=1)
    deadline = time.monotonic() + 90
    while True:
        metrics = scrape(worker.url)
        if total(metrics, "ledger_commands_total") >= len(commands):
            break
        assert time.monotonic() < deadline, total(metrics, "ledger_commands_total")
        time.sleep(0.5)
    batches = total(metrics, "ledger_batch_commands_count")
    assert batches <= len(commands) / 40, batches
    assert total(metrics, "ledger_rejections_total") == 0
    for i, a in enumerate(accounts[:3]):
        status, doc = worker.get(f"/accounts/{a}")
        assert status == 200
        assert doc["balance_minor"] == sum(j + 1 for j in range(i, 1980, 20))
        assert doc["version"] == 1 + 99
