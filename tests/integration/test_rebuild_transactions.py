"""Rebuild after transactions and transfers: their records come back from the events, so
a reversed transaction stays reversed, a transaction id stays used, a transfer made
before is reversible and a refunded one is not."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from schemas.models import (
    Deposit,
    OpenAccount,
    PlaceHold,
    Posting,
    Reverse,
    Transaction,
    TransactionMessage,
    Transfer,
    encode,
)
from streams.core import transaction_key
from streams.ops.rebuild import committed_inputs, rebuild, unread_votes
from streams.ops.verify import Report, verify
from streams.partitions import partition_for
from streams.readmodels.eventlog import read_all
from tests.integration.test_rebuild import delete_changelog

pytestmark = pytest.mark.kafka

WINDOW_S = 30  # the idempotency window: short, to see a transaction id outlive it


def settled(s, timeout_s: float = 60.0) -> Report:
    """The ledger once every transaction has ended at every participant."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = verify(s)
        if report.transactions_in_flight == 0 and not any(
                "\0" in hold for state in report.states.values() for hold in state.holds):
            return report
        assert time.monotonic() < deadline, "transactions still in flight"
        time.sleep(0.5)


def test_rebuild_keeps_transactions_committed_rejected_and_reversed(ledger_settings,
                                                                   start_worker, client):
    s = ledger_settings.model_copy(update={"idempotency_window_s": WINDOW_S})
    worker = start_worker("before", idempotency_window_s=WINDOW_S)
    t0 = int(time.time() * 1000)
    seq = iter(range(t0, t0 + 10**6))

    def run(*commands):
        futures = [client.submit(c) for c in commands]
        return [f.result(timeout=60) for f in futures], futures

    payer, merchant, fees, poor = "tx-payer", "tx-merchant", "tx-fees", "tx-poor"
    accounts = [payer, merchant, fees, poor]
    run(*[OpenAccount(command_id=f"o-{a}", account_id=a, actor="t", issued_at=next(seq),
                      currency="USD") for a in accounts])
    run(Deposit(command_id="d1", account_id=payer, actor="t", issued_at=next(seq),
                amount_minor=10_000, currency="USD"),
        Deposit(command_id="d2", account_id=poor, actor="t", issued_at=next(seq),
                amount_minor=100, currency="USD"),
        PlaceHold(command_id="h", account_id=payer, actor="t", issued_at=next(seq),
                  hold_id="h1", amount_minor=1_000, currency="USD",
                  expires_at=t0 + 3_600_000))

    def posting(src: str, dst: str, amount: int) -> Posting:
        return Posting(from_account_id=src, to_account_id=dst, amount_minor=amount,
                       currency="USD")

    paid = Transaction(command_id="paid", account_id=payer, actor="t", issued_at=next(seq),
                       postings=[posting(payer, merchant, 6_000), posting(payer, fees, 300)])
    refused = Transaction(command_id="refused", account_id=payer, actor="t",
                          issued_at=next(seq),
                          postings=[posting(poor, merchant, 500), posting(payer, fees, 5)])
    outcomes, futures = run(paid, refused)
    assert all(o.accepted for o in outcomes)
    ends = [f.settlement.result(timeout=60) for f in futures]
    assert [e.reason for e in ends] == [None, "insufficient_funds"]
    started_by = time.time()  # "paid" started (its outcome was read) by then
    outcomes, futures = run(Reverse(command_id="back", account_id=payer, actor="t",
                                    issued_at=next(seq), transaction_id="paid"))
    assert outcomes[0].accepted and futures[0].settlement.result(timeout=60).accepted
    outcomes, futures = run(*[Transfer(command_id=t, account_id=payer, actor="t",
                                       issued_at=next(seq), to_account_id=to, amount_minor=50,
                                       currency="USD")
                              for t, to in (("tip", merchant), ("lost", "tx-nobody"))])
    assert [f.settlement.result(timeout=60).events[0].type for f in futures] == [
        "TransferCredited", "TransferReversed"]
    before = settled(s)
    assert before.ok, before.breaches
    assert (before.transactions_committed, before.transactions_rejected,
            before.reversals) == (2, 1, 1)
    assert before.states[payer].balance_minor == 9_950
    assert before.states[merchant].balance_minor == 50

    assert worker.stop() == 0
    delete_changelog(s)

    rebuild(s)
    stored = {m.key() for m in read_all(s, s.changelog_topic)}
    assert {k for k in stored if k[:1] == b"t"} == {
        transaction_key(payer, t) for t in ("paid", "refused", "back", "tip", "lost")}
    assert not [k for k in stored if k[:1] == b"y"]  # none pending

    after = start_worker("after", idempotency_window_s=WINDOW_S)  # and an empty disk
    # (a) the same balances and holds
    for a in accounts:
        status, doc = after.get(f"/accounts/{a}")
        assert status == 200
        state = before.states[a]
        assert (doc["balance_minor"], doc["available_minor"], doc["version"]) == (
            state.balance_minor, state.available_minor, state.version), a
        assert doc["holds"] == {k: {"amount_minor": h.amount_minor, "expires_at": h.expires_at}
                                for k, h in state.holds.items()}, a
    assert before.states[payer].holds.keys() == {"h1"}
    # (b) a reversed transaction is not reversed again
    again, = run(Reverse(command_id="back-2", account_id=payer, actor="t",
                         issued_at=next(seq), transaction_id="paid"))[0]
    assert again.reason == "already_reversed"
    # (b') a transfer made before is reversed; one refunded is not paid back
    outcomes, futures = run(*[Reverse(command_id=f"back-{t}", account_id=payer, actor="t",
                                      issued_at=next(seq), transaction_id=t)
                              for t in ("tip", "lost")])
    assert outcomes[0].accepted and futures[0].settlement.result(timeout=60).accepted
    assert outcomes[1].reason == "transfer_refunded"
    # (c) a transaction id is used for ever: once its outcome is forgotten, a
    # transaction with it is refused (within the window the outcome answers it)
    time.sleep(max(0.0, started_by + WINDOW_S + 2 - time.time()))
    reused, = run(Transaction(command_id="paid", account_id=payer, actor="t",
                              issued_at=next(seq), postings=[posting(payer, fees, 1)]))[0]
    assert reused.reason == "idempotency_key_reused"
    # (d) and the ledger is right
    final = settled(s)
    assert final.ok, final.breaches
    assert final.reversals == 2
    back = {payer: 50, merchant: -50}  # the tip reversed
    assert {a: (x.balance_minor, x.available_minor) for a, x in final.states.items()} == \
        {a: (x.balance_minor + back.get(a, 0), x.available_minor + back.get(a, 0))
         for a, x in before.states.items()}


def test_the_votes_not_yet_read_are_those_past_the_committed_offset(ledger_settings):
    s = ledger_settings
    coordinator = "tx-coordinator"
    p = partition_for(coordinator, s.partitions)

    def message(kind: str, account: str, accepted: bool) -> bytes:
        return encode(TransactionMessage(
            kind=kind, transaction_id="t1", coordinator_account_id=coordinator,
            account_id=account, postings=[], accepted=accepted))

    producer = Producer(s.producer_config())
    for value in (message("VOTE", "read", True), message("VOTE", "yes", True),
                  message("VOTE", "no", False), message("ABORT", "yes", False), b"junk"):
        producer.produce(s.transfers_topic, value, coordinator.encode(), partition=p)
    assert producer.flush(30) == 0
    group = Consumer({**s.kafka_config(), "group.id": s.app_id, "enable.auto.commit": False})
    deadline = time.monotonic() + 60
    try:  # the worker group read the first (its coordinator may take a moment to be known)
        while True:
            try:
                group.commit(offsets=[TopicPartition(s.transfers_topic, p, 1)],
                             asynchronous=False)
                break
            except KafkaException:
                assert time.monotonic() < deadline, "could not commit the group's offset"
                time.sleep(0.5)
    finally:
        group.close()
    checkpoints = committed_inputs(s)
    assert checkpoints[p].transfers == 0
    assert unread_votes(s, checkpoints, {p}) == {(coordinator, "t1", "yes")}
    assert unread_votes(s, checkpoints, set()) == set()
