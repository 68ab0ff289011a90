"""A backlog is decided in bounded steps, not in one batch of everything Faust fetched."""

from __future__ import annotations

import time

import pytest

from producers.client import LedgerClient
from schemas.models import CommandBase, Deposit, OpenAccount
from streams.readmodels.eventlog import read_all
from tests.integration.test_metrics import scrape, total

pytestmark = pytest.mark.kafka


def deposits(prefix: str, accounts: int, n: int) -> tuple[list[str], list[CommandBase]]:
    """Opens for ``accounts`` accounts, then ``n`` deposits of 1, 2, 3, ... round-robin."""
    now = int(time.time() * 1000)
    names = [f"{prefix}-{i}" for i in range(accounts)]
    commands: list[CommandBase] = [
        OpenAccount(command_id=f"o-{a}", account_id=a, actor="t", issued_at=now,
                    currency="USD") for a in names]
    commands += [Deposit(command_id=f"d{i}", account_id=names[i % accounts], actor="t",
                         issued_at=now, amount_minor=i + 1, currency="USD") for i in range(n)]
    return names, commands


def decided(worker, commands: int) -> dict:
    """The worker's metrics once it has decided ``commands`` commands."""
    deadline = time.monotonic() + 60
    while True:
        metrics = scrape(worker.url)
        if total(metrics, "ledger_commands_total") >= commands:
            return metrics
        assert time.monotonic() < deadline, total(metrics, "ledger_commands_total")
        time.sleep(0.5)


def check_balances(worker, names: list[str], n: int) -> None:
    for i, a in enumerate(names[:5]):
        status, doc = worker.get(f"/accounts/{a}")
        assert status == 200
        assert doc["balance_minor"] == sum(j + 1 for j in range(i, n, len(names)))
        assert doc["version"] == 1 + n // len(names)


def test_a_backlog_is_decided_in_steps_of_bounded_size(ledger_settings, start_worker):
    s = ledger_settings
    names, commands = deposits("step", 30, 1800)
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
    metrics = decided(worker, len(commands))
    assert total(metrics, "ledger_batch_commands_count") >= over
    assert total(metrics, "ledger_rejections_total") == 0
    check_balances(worker, names, 1800)


def test_the_next_batch_fills_while_a_batch_is_written(ledger_settings, start_worker):
    # One command per record, as single submits make. Faust's take_events stops the
    # stream while the agent holds a batch and then gathers for batch_within_ms only,
    # so each batch held what the stream passes in 1 ms: ~2,000 records took hundreds
    # of batches. The worker's own take lets the stream fill the next batch meanwhile.
    s = ledger_settings
    names, commands = deposits("fill", 20, 1980)
    with LedgerClient(s, wait_outcomes=False, max_batch_commands=1) as single:
        for c in commands:
            single.submit(c)
        single.flush(60)
    assert sum(1 for _ in read_all(s, s.commands_topic)) == len(commands)

    worker = start_worker(batch_within_ms=1)
    metrics = decided(worker, len(commands))
    batches = total(metrics, "ledger_batch_commands_count")
    assert batches <= len(commands) / 40, batches
    assert total(metrics, "ledger_rejections_total") == 0
    check_balances(worker, names, 1980)
