"""The walking skeleton on the real broker: commands in, ordered events out."""

from __future__ import annotations

import random
import time
from collections import defaultdict

import pytest

from schemas.codec import CODEC
from schemas.models import Deposit, LedgerEvent, OpenAccount, Withdraw
from streams.readmodels.eventlog import read_all

pytestmark = pytest.mark.kafka


def now_ms() -> int:
    return int(time.time() * 1000)


def test_thousand_commands_over_fifty_accounts(ledger_settings, start_worker, client):
    worker = start_worker()
    rng = random.Random(7)
    accounts = [f"acct-{i:03d}" for i in range(50)]
    commands = [OpenAccount(command_id=f"open-{a}", account_id=a, actor="test",
                            issued_at=now_ms(), currency="USD") for a in accounts]
    expected = {a: 0 for a in accounts}
    expect_reject: set[str] = set()
    for i in range(1000):
        a = rng.choice(accounts)
        amount = rng.randint(1, 10_000)
        if rng.random() < 0.55:
            commands.append(Deposit(command_id=f"c{i}", account_id=a, actor="test",
                                    issued_at=now_ms(), amount_minor=amount, currency="USD"))
            expected[a] += amount
        else:
            commands.append(Withdraw(command_id=f"c{i}", account_id=a, actor="test",
                                     issued_at=now_ms(), amount_minor=amount, currency="USD"))
            if expected[a] >= amount:
                expected[a] -= amount
            else:
                expect_reject.add(f"c{i}")

    futures = [client.submit(c) for c in commands]
    outcomes = {c.command_id: f.result(timeout=120) for c, f in zip(commands, futures,
                                                                      strict=True)}

    rejected = {cid for cid, o in outcomes.items() if not o.accepted}
    assert rejected == expect_reject
    assert {outcomes[cid].reason for cid in rejected} == {"insufficient_funds"}
    assert len(expect_reject) > 50  # the workload really exercised the rule

    by_account: dict[str, list[LedgerEvent]] = defaultdict(list)
    for m in read_all(ledger_settings, ledger_settings.events_topic):
        _, datum = CODEC.decode(m.value())
        event = LedgerEvent.from_avro(datum)
        assert m.key() == event.account_id.encode()
        by_account[event.account_id].append(event)
    assert set(by_account) == set(accounts)
    for a, events in by_account.items():
        # in order, versions 1..n, no gaps, no duplicates
        assert [e.version for e in events] == list(range(1, len(events) + 1)), a
        assert events[-1].balance_after_minor == expected[a], a
        assert not any(e.command_id in expect_reject for e in events)

    for a in rng.sample(accounts, 10):
        status, doc = worker.get(f"/accounts/{a}")
        assert status == 200
        assert doc["balance_minor"] == expected[a]
        assert doc["version"] == len(by_account[a])
    assert worker.get("/accounts/nobody")[0] == 404
