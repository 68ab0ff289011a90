"""Transfers across partitions on the real broker: money never vanishes or doubles."""

from __future__ import annotations

import random
import time

import pytest

from producers.client import CommandRefused, LedgerClient
from schemas.models import CloseAccount, Deposit, OpenAccount, Transfer, Withdraw
from streams.ops.verify import verify
from streams.partitions import partition_for

pytestmark = pytest.mark.kafka


def now_ms() -> int:
    return int(time.time() * 1000)


def test_five_thousand_random_transfers_conserve_money(ledger_settings, start_worker, client):
    worker = start_worker()
    rng = random.Random(42)
    usd = [f"u{i:03d}" for i in range(180)]
    eur = [f"e{i:02d}" for i in range(15)]
    closed = [f"c{i}" for i in range(5)]
    missing = [f"ghost{i}" for i in range(5)]
    t = iter(range(now_ms(), now_ms() + 10**9))
    setup = []
    for a in usd:
        setup.append(OpenAccount(command_id=f"open-{a}", account_id=a, actor="t",
                                 issued_at=next(t), currency="USD",
                                 overdraft_limit_minor=rng.choice([0, 0, 0, 5_000])))
        setup.append(Deposit(command_id=f"seed-{a}", account_id=a, actor="t",
                             issued_at=next(t), amount_minor=rng.randint(1_000, 100_000),
                             currency="USD"))
    for a in eur:
        setup.append(OpenAccount(command_id=f"open-{a}", account_id=a, actor="t",
                                 issued_at=next(t), currency="EUR"))
    for a in closed:
        setup.append(OpenAccount(command_id=f"open-{a}", account_id=a, actor="t",
                                 issued_at=next(t), currency="USD"))
        setup.append(CloseAccount(command_id=f"close-{a}", account_id=a, actor="t",
                                  issued_at=next(t)))
    for f in [client.submit(c) for c in setup]:
        assert f.result(timeout=120).accepted

    work = []
    kinds: dict[str, str] = {}
    for i in range(5_000):
        src = rng.choice(usd)
        roll = rng.random()
        if roll < 0.06:
            dst, kind = rng.choice(missing), "missing"
        elif roll < 0.12:
            dst, kind = rng.choice(closed), "closed"
        elif roll < 0.18:
            dst, kind = rng.choice(eur), "currency"
        else:
            dst, kind = rng.choice(usd), "ok"
        if dst == src:
            continue
        amount = rng.randint(1, 12_000)  # sometimes more than the source has: over the limit
        work.append(Transfer(command_id=f"tr-{i}", account_id=src, actor="t",
                             issued_at=next(t), to_account_id=dst, amount_minor=amount,
                             currency="USD"))
        kinds[f"tr-{i}"] = kind
        if rng.random() < 0.3:
            a = rng.choice(usd)
            cls = Deposit if rng.random() < 0.5 else Withdraw
            work.append(cls(command_id=f"dw-{i}", account_id=a, actor="t", issued_at=next(t),
                            amount_minor=rng.randint(1, 20_000), currency="USD"))
    with pytest.raises(CommandRefused, match="transfer_to_self"):
        client.submit(Transfer(command_id="self", account_id="u000", actor="t",
                               issued_at=next(t), to_account_id="u000", amount_minor=1,
                               currency="USD"))

    futures = {c.command_id: client.submit(c) for c in work}
    outcomes = {cid: f.result(timeout=180) for cid, f in futures.items()}
    transfers = [cid for cid in kinds]
    accepted = [cid for cid in transfers if outcomes[cid].accepted]
    refused = [cid for cid in transfers if not outcomes[cid].accepted]
    assert {outcomes[cid].reason for cid in refused} == {"insufficient_funds"}
    assert len(refused) > 100 and len(accepted) > 2_000

    settled = {cid: futures[cid].settlement.result(timeout=180) for cid in accepted}
    for cid, final in settled.items():
        (event,) = final.events
        if kinds[cid] == "ok":
            assert event.type == "TransferCredited", cid
        else:
            assert event.type == "TransferReversed", cid
            reason = {"missing": "account_not_found", "closed": "account_closed",
                      "currency": "currency_mismatch"}[kinds[cid]]
            assert event.payload.reason == reason

    report = verify(ledger_settings)
    assert report.ok, report.breaches[:10]
    assert report.transfers_in_flight == 0
    assert report.transfers_credited == sum(kinds[c] == "ok" for c in accepted)
    assert report.transfers_reversed == sum(kinds[c] != "ok" for c in accepted)
    assert report.transfers_credited + report.transfers_reversed == len(accepted)
    assert report.balances_minor["USD"] == (report.money_in_minor["USD"]
                                            - report.money_out_minor.get("USD", 0))
    assert report.balances_minor.get("EUR", 0) == 0
    # the worker's live state is the fold of the events
    for a in rng.sample(usd, 20):
        _, doc = worker.get(f"/accounts/{a}")
        assert doc["balance_minor"] == report.states[a].balance_minor
        assert doc["version"] == report.states[a].version


def test_two_transfers_racing_for_the_same_funds(ledger_settings, start_worker, client):
    start_worker()
    src, a, b = "racer", "dest-a", "dest-b"
    assert len({partition_for(x, ledger_settings.partitions) for x in (src, a, b)}) > 1
    for acct in (src, a, b):
        assert client.submit(OpenAccount(command_id=f"open-{acct}", account_id=acct,
                                         actor="t", issued_at=now_ms(), currency="USD")
                             ).result(timeout=60).accepted
    assert client.submit(Deposit(command_id="fund", account_id=src, actor="t",
                                 issued_at=now_ms(), amount_minor=10_000, currency="USD")
                         ).result(timeout=60).accepted
    with LedgerClient(ledger_settings) as other:
        f1 = client.submit(Transfer(command_id="race-1", account_id=src, actor="one",
                                    issued_at=now_ms(), to_account_id=a, amount_minor=8_000,
                                    currency="USD"))
        f2 = other.submit(Transfer(command_id="race-2", account_id=src, actor="two",
                                   issued_at=now_ms(), to_account_id=b, amount_minor=8_000,
                                   currency="USD"))
        results = [f1.result(timeout=60), f2.result(timeout=60)]
        winners = [r for r in results if r.accepted]
        assert len(winners) == 1
        assert [r.reason for r in results if not r.accepted] == ["insufficient_funds"]
        winner_future = f1 if results[0].accepted else f2
        assert winner_future.settlement.result(timeout=60).events[0].type == "TransferCredited"
    report = verify(ledger_settings)
    assert report.ok, report.breaches
    assert report.states[src].balance_minor == 2_000
    assert report.states[a].balance_minor + report.states[b].balance_minor == 8_000
