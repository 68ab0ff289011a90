"""Transactions through BatchProcessors of several partitions, messages routed between them
as the transfers topic would carry them (each partition's inputs in order)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import CODEC
from schemas.models import (
    ExpireTransaction,
    LedgerEvent,
    Posting,
    Reverse,
    Transaction,
    TransactionMessage,
    TransactionRecord,
    Withdraw,
    encode_batch,
)
from streams import transactions
from streams.core import transaction_key
from streams.domain import reservation_id
from streams.ops import verify
from streams.partitions import partition_for
from streams.worker.processor import EVENTS, REJECTIONS, TRANSFERS
from tests.unit.conftest import (
    PARTITIONS,
    Partition,
    accounts_on,
    close_account,
    command,
    deposit,
    open_account,
    transfer,
)

WINDOW = 86_400_000


@dataclass
class Ledger:
    """Every partition of a ledger, run in memory: commands and messages go to the
    partition of their account, and each step takes a partition's queued inputs."""

    parts: list[Partition] = field(default_factory=lambda: [
        Partition(partition=p, window_ms=WINDOW) for p in range(PARTITIONS)])
    commands: dict[int, deque[bytes]] = field(default_factory=dict)
    legs: dict[int, deque[bytes]] = field(default_factory=dict)
    events: list[bytes] = field(default_factory=list)
    rejections: list[dict] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)  # every message, for copies

    def submit(self, *cmds) -> None:
        for c in cmds:
            p = partition_for(c.account_id, PARTITIONS)
            self.commands.setdefault(p, deque()).append(encode_batch([c]))

    def step(self, p: int, rng: random.Random | None = None) -> None:
        part = self.parts[p]
        take = len(self.legs.get(p, ())) if rng is None else rng.randint(0, 3)
        legs = [self.legs[p].popleft() for _ in range(min(take, len(self.legs.get(p, ()))))]
        take = len(self.commands.get(p, ())) if rng is None else rng.randint(0, 3)
        cmds = [self.commands[p].popleft()
                for _ in range(min(take, len(self.commands.get(p, ()))))]
        bp = part.batch(cmds, legs)
        for o in bp.outputs:
            if o.kind == EVENTS:
                self.events.append(o.value)
            elif o.kind == REJECTIONS:
                self.rejections.append(CODEC.decode(o.value)[1])
            elif o.kind == TRANSFERS:
                assert o.key is not None
                self.sent.append(o.value)
                self.legs.setdefault(partition_for(o.key.decode(), PARTITIONS),
                                     deque()).append(o.value)

    def busy(self) -> bool:
        return any(self.commands.values()) or any(self.legs.values())

    def run(self, rng: random.Random | None = None) -> None:
        for _ in range(10_000):
            if not self.busy():
                return
            for p in range(PARTITIONS) if rng is None else [rng.randrange(PARTITIONS)]:
                self.step(p, rng)
        raise AssertionError("the ledger did not settle")

    def tick(self, ms: int) -> None:
        for part in self.parts:
            part.clock += ms

    def report(self) -> verify.Report:
        return verify.check(self.events)

    def of(self, account: str) -> list[LedgerEvent]:
        out = []
        for raw in self.events:
            e = LedgerEvent.from_avro(CODEC.decode(raw)[1])
            if e.account_id == account:
                out.append(e)
        return out

    def balance(self, account: str) -> tuple[int, int]:
        s = self.report().states[account]
        return s.balance_minor, s.available_minor

    def record(self, coordinator: str, tid: str) -> TransactionRecord | None:
        p = partition_for(coordinator, PARTITIONS)
        raw = self.parts[p].store.get(transaction_key(coordinator, tid))
        if raw is None:
            return None
        return TransactionRecord.from_avro(CODEC.decode(raw)[1])


def posting(src: str, dst: str, amount: int, currency: str = "USD", **kw) -> Posting:
    return Posting(from_account_id=src, to_account_id=dst, amount_minor=amount,
                   currency=currency, **kw)


def txn(coordinator: str, *postings: Posting, tid: str = "t1", **kw) -> Transaction:
    return command(Transaction, coordinator, command_id=tid, postings=list(postings), **kw)


def funded(ledger: Ledger, **balances: int) -> None:
    for account, amount in balances.items():
        ledger.submit(open_account(account))
        if amount:
            ledger.submit(deposit(amount, account))
    ledger.run()


def kinds(ledger: Ledger, account: str) -> list[str]:
    return [e.type for e in ledger.of(account)]


def ending(ledger: Ledger, coordinator: str, tid: str = "t1") -> LedgerEvent:
    ends = [e for e in ledger.of(coordinator) if e.type in ("TransactionCommitted",
                                                            "TransactionRejected")
            and e.payload.transaction_id == tid]
    assert len(ends) == 1, ends
    return ends[0]


def test_a_fee_split_commits_every_posting_and_conserves_money():
    ledger = Ledger()
    funded(ledger, payer=10_000, merchant=0, fees=0)
    ledger.submit(txn("payer", posting("payer", "merchant", 9_700),
                      posting("payer", "fees", 300)))
    ledger.run()
    assert ending(ledger, "payer").type == "TransactionCommitted"
    assert ledger.balance("payer") == (0, 0)
    assert ledger.balance("merchant") == (9_700, 9_700)
    assert ledger.balance("fees") == (300, 300)
    assert kinds(ledger, "merchant")[-2:] == ["TransactionReserved", "TransactionPosted"]
    assert kinds(ledger, "payer")[-4:] == ["TransactionStarted", "TransactionReserved",
                                           "TransactionCommitted", "TransactionPosted"]
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.transactions_committed == 1
    assert ledger.record("payer", "t1").state == "committed"


def test_a_refusal_anywhere_applies_no_posting_and_names_its_posting():
    ledger = Ledger()
    funded(ledger, payer=1_000, merchant=0, poor=50)
    ledger.submit(txn("payer", posting("payer", "merchant", 500),
                      posting("poor", "merchant", 60)))
    ledger.run()
    end = ending(ledger, "payer")
    assert end.type == "TransactionRejected"
    assert (end.payload.reason, end.payload.posting_index) == ("insufficient_funds", 1)
    assert ledger.balance("payer") == (1_000, 1_000)  # reserved, then released
    assert ledger.balance("merchant") == (0, 0)
    assert ledger.balance("poor") == (50, 50)
    assert "TransactionPosted" not in {*kinds(ledger, "payer"), *kinds(ledger, "merchant"),
                                       *kinds(ledger, "poor")}
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.transactions_rejected == 1


def test_each_kind_of_refusal_is_reported_with_its_posting():
    ledger = Ledger()
    funded(ledger, a=1_000, b=0, euro=0, gone=0)
    ledger.submit(command(type(open_account("euro")), "euro2", currency="EUR"))
    ledger.submit(close_account("gone"))
    ledger.run()
    cases = {
        "missing": (posting("a", "nobody", 1), "account_not_found"),
        "closed": (posting("a", "gone", 1), "account_closed"),
        "currency": (posting("a", "euro2", 1), "currency_mismatch"),
        "version": (posting("a", "b", 1, expected_version=99), "version_conflict"),
    }
    for tid, (bad, reason) in cases.items():
        ledger.submit(txn("a", posting("a", "b", 10), bad, tid=tid))
        ledger.run()
        end = ending(ledger, "a", tid)
        assert (end.type, end.payload.reason, end.payload.posting_index) == (
            "TransactionRejected", reason, 1), tid
    assert ledger.balance("a") == (1_000, 1_000) and ledger.balance("b") == (0, 0)
    assert ledger.report().ok


def test_balances_change_only_at_commit_and_the_reservation_shows_meanwhile():
    ledger = Ledger()
    funded(ledger, payer=1_000, payee=0)
    ledger.submit(txn("payer", posting("payer", "payee", 400)))
    p = partition_for("payer", PARTITIONS)
    ledger.step(p)  # started: PREPAREs out
    ledger.step(p)  # the payer reserves (its PREPARE comes to its own partition)
    assert ledger.balance("payer") == (1_000, 600)
    assert ledger.balance("payee") == (0, 0)
    ledger.run()
    assert ledger.balance("payer") == (600, 600) and ledger.balance("payee") == (400, 400)


PAYER, = accounts_on(0, 1, prefix="payer")
ACCOUNTS = [f"acct-{i}" for i in range(8)]
PAYEE, = accounts_on(1, 1, prefix="payee")


def test_a_transaction_nobody_answers_is_rejected_at_its_deadline():
    ledger = Ledger()
    funded(ledger, **{PAYER: 1_000, PAYEE: 0})
    ledger.submit(txn(PAYER, posting(PAYER, PAYEE, 400)))
    ledger.step(0)
    ledger.step(0)  # the payer reserved; the payee's partition is stuck
    prepare = ledger.legs.pop(1)
    record = ledger.record(PAYER, "t1")
    assert record is not None
    ledger.submit(command(ExpireTransaction, PAYER, command_id="x1", transaction_id="t1",
                          issued_at=record.deadline, actor="ledger"))
    ledger.step(0)
    assert ledger.rejections[-1]["reason"] == "transaction_not_expired"
    ledger.tick(60_000)
    ledger.submit(command(ExpireTransaction, PAYER, command_id="x2", transaction_id="t1",
                          issued_at=record.deadline, actor="ledger"))
    ledger.step(0)
    end = ending(ledger, PAYER)
    assert (end.type, end.payload.reason, end.payload.posting_index) == (
        "TransactionRejected", "transaction_timed_out", 0)
    assert PAYEE in end.payload.detail
    # the payee's PREPARE arrives at last, before the ABORT: it reserves, votes yes, and
    # is told to release by the ABORT, and again by the answer to its vote
    ledger.legs[1].extendleft(prepare)
    ledger.run()
    assert kinds(ledger, PAYEE)[-2:] == ["TransactionReserved", "TransactionReleased"]
    assert ledger.balance(PAYER) == (1_000, 1_000) and ledger.balance(PAYEE) == (0, 0)
    report = ledger.report()
    assert report.ok, report.breaches
    assert (report.transactions_rejected, report.transactions_in_flight) == (1, 0)


def test_each_step_is_timed_by_the_partition_that_takes_it():
    ledger = Ledger()
    funded(ledger, **{PAYER: 1_000, PAYEE: 0})
    ledger.submit(txn(PAYER, posting(PAYER, PAYEE, 400)))
    t0 = ledger.parts[0].clock
    for p in (0, 0, 1, 0, 0, 1):  # started; payer reserved; payee reserved; committed;
        ledger.step(p)            # posted at the payer; at the payee
        ledger.tick(1_000)
    times = [(e.account_id, e.type, e.occurred_at - t0) for e in ledger.of(PAYER)[-4:]
             + ledger.of(PAYEE)[-2:]]
    assert times == [
        (PAYER, "TransactionStarted", 0), (PAYER, "TransactionReserved", 1_000),
        (PAYER, "TransactionCommitted", 3_000), (PAYER, "TransactionPosted", 4_000),
        (PAYEE, "TransactionReserved", 2_000), (PAYEE, "TransactionPosted", 5_000)]
    assert ledger.report().ok


def test_an_abort_before_its_prepare_leaves_nothing_reserved():
    ledger = Ledger()
    poor, = accounts_on(0, 1, prefix="poor")
    funded(ledger, **{PAYER: 1_000, PAYEE: 0, poor: 0})
    ledger.submit(txn(PAYER, posting(poor, PAYEE, 5), posting(PAYER, PAYEE, 5)))
    ledger.step(0)
    prepare = ledger.legs.pop(1)  # the payee's PREPARE is held back
    for _ in range(3):
        ledger.step(0)  # the poor account votes no: rejected, ABORT to the payee
    assert ending(ledger, PAYER).payload.reason == "insufficient_funds"
    ledger.legs[1].extend(prepare)  # the ABORT first, then the PREPARE
    ledger.run()
    assert kinds(ledger, PAYEE) == ["AccountOpened"]
    assert ledger.balance(PAYER) == (1_000, 1_000)
    assert ledger.report().ok


def test_copies_of_every_message_change_nothing():
    ledger = Ledger()
    funded(ledger, payer=1_000, merchant=0, fees=0)
    ledger.submit(txn("payer", posting("payer", "merchant", 970), posting("payer", "fees", 30)))
    ledger.run()
    before = len(ledger.events)
    for raw in list(ledger.sent):  # every PREPARE, VOTE and COMMIT again
        m = TransactionMessage.from_avro(CODEC.decode(raw)[1])
        ledger.legs.setdefault(partition_for(m.to, PARTITIONS), deque()).append(raw)
    ledger.run()
    assert len(ledger.events) == before
    assert ledger.balance("merchant") == (970, 970) and ledger.balance("payer") == (0, 0)


def test_a_reversal_posts_the_opposite_once():
    ledger = Ledger()
    funded(ledger, payer=1_000, merchant=0, fees=0)
    ledger.submit(txn("payer", posting("payer", "merchant", 970), posting("payer", "fees", 30)))
    ledger.run()
    ledger.submit(command(Reverse, "payer", command_id="r1", transaction_id="t1"))
    ledger.run()
    assert ending(ledger, "payer", "r1").type == "TransactionCommitted"
    assert ledger.balance("payer") == (1_000, 1_000) and ledger.balance("fees") == (0, 0)
    assert ledger.record("payer", "t1").reversed_by == "r1"
    assert ledger.record("payer", "r1").reverses == "t1"
    ledger.submit(command(Reverse, "payer", command_id="r2", transaction_id="t1"))
    ledger.submit(command(Reverse, "payer", command_id="r3", transaction_id="nope"))
    ledger.run()
    assert [r["reason"] for r in ledger.rejections[-2:]] == ["already_reversed",
                                                            "transaction_not_found"]
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.reversals == 1


def test_a_refused_reversal_frees_the_original_for_another():
    ledger = Ledger()
    funded(ledger, payer=1_000, merchant=0)
    ledger.submit(txn("payer", posting("payer", "merchant", 600)))
    ledger.run()
    ledger.submit(command(Withdraw, "merchant", command_id="spent", amount_minor=600,
                          currency="USD"))
    ledger.submit(command(Reverse, "payer", command_id="r1", transaction_id="t1"))
    ledger.run()
    end = ending(ledger, "payer", "r1")
    assert (end.type, end.payload.reason, end.payload.posting_index) == (
        "TransactionRejected", "insufficient_funds", 0)
    assert ledger.record("payer", "t1").reversed_by is None
    ledger.submit(deposit(600, "merchant"))
    ledger.submit(command(Reverse, "payer", command_id="r2", transaction_id="t1"))
    ledger.run()
    assert ending(ledger, "payer", "r2").type == "TransactionCommitted"
    assert ledger.record("payer", "t1").reversed_by == "r2"
    assert ledger.balance("payer") == (1_000, 1_000)
    assert ledger.report().ok


def test_an_id_is_one_transaction_for_ever():
    ledger = Ledger()
    funded(ledger, payer=1_000, payee=0)
    ledger.submit(txn("payer", posting("payer", "payee", 1)),
                  txn("payer", posting("payer", "payee", 5_000), tid="t2"))  # rejected
    ledger.run()
    ledger.tick(WINDOW + 1)  # the commands' outcomes are forgotten; the transactions not
    ledger.submit(deposit(1, "payer"))
    ledger.run()
    ledger.submit(txn("payer", posting("payer", "payee", 2)),
                  txn("payer", posting("payer", "payee", 2), tid="t2"))
    ledger.run()
    assert [r["reason"] for r in ledger.rejections[-2:]] == ["idempotency_key_reused"] * 2
    assert ledger.balance("payee") == (1, 1)
    assert ledger.report().ok  # each id started once


def test_a_transfer_is_reversed_once_linked_both_ways():
    ledger = Ledger()
    funded(ledger, payer=1_000, merchant=0)
    ledger.submit(transfer(300, "merchant", "payer", command_id="pay-1"))
    ledger.run()
    ledger.submit(command(Reverse, "payer", command_id="refund-1", transaction_id="pay-1"))
    ledger.run()
    end = ending(ledger, "payer", "refund-1")
    assert end.type == "TransactionCommitted"
    assert ledger.balance("payer") == (1_000, 1_000) and ledger.balance("merchant") == (0, 0)
    started = next(e for e in ledger.of("payer") if e.type == "TransactionStarted")
    assert started.payload.reverses == "pay-1"
    assert [(p.from_account_id, p.to_account_id, p.amount_minor)
            for p in started.payload.postings] == [("merchant", "payer", 300)]
    original = ledger.record("payer", "pay-1")
    assert (original.transfer, original.state, original.reversed_by) == (
        True, "committed", "refund-1")
    ledger.submit(command(Reverse, "payer", command_id="refund-2", transaction_id="pay-1"),
                  command(Reverse, "merchant", command_id="refund-3", transaction_id="pay-1"))
    ledger.run()
    assert {(r["command_id"], r["reason"]) for r in ledger.rejections[-2:]} == {
        ("refund-2", "already_reversed"), ("refund-3", "transaction_not_found")}
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.reversals == 1


def test_a_transfer_reversal_is_refused_when_the_destination_cannot_pay_it_back():
    ledger = Ledger()
    funded(ledger, payer=1_000, merchant=0, other=0)
    ledger.submit(transfer(300, "merchant", "payer", command_id="pay-1"))
    ledger.run()
    ledger.submit(transfer(200, "other", "merchant", command_id="spent"))
    ledger.run()
    ledger.submit(command(Reverse, "payer", command_id="refund-1", transaction_id="pay-1"))
    ledger.run()
    end = ending(ledger, "payer", "refund-1")
    assert (end.type, end.payload.reason) == ("TransactionRejected", "insufficient_funds")
    assert ledger.record("payer", "pay-1").reversed_by is None  # free to reverse again
    ledger.submit(transfer(200, "merchant", "other", command_id="back"),
                  close_account("other", command_id="closing"))
    ledger.run()
    ledger.submit(command(Reverse, "payer", command_id="refund-2", transaction_id="pay-1"),
                  command(Reverse, "merchant", command_id="undo", transaction_id="spent"))
    ledger.run()
    assert ending(ledger, "payer", "refund-2").type == "TransactionCommitted"
    end = ending(ledger, "merchant", "undo")  # its destination closed since
    assert (end.type, end.payload.reason) == ("TransactionRejected", "account_closed")
    assert ledger.balance("payer") == (1_000, 1_000)
    report = ledger.report()
    assert report.ok, report.breaches


def reversed_before_its_refund(ledger: Ledger) -> None:
    """A transfer to an account that does not exist yet, refused; the account opens and
    is funded; the source decides the reversal before the refund gets back to it."""
    funded(ledger, payer=1_000)
    payer, late = partition_for("payer", PARTITIONS), partition_for("late", PARTITIONS)
    ledger.submit(transfer(300, "late", "payer", command_id="early"))
    ledger.step(payer)
    ledger.step(late)  # refused: a refund on its way back
    refund = ledger.legs.pop(payer)
    ledger.submit(open_account("late"), deposit(300, "late"),
                  command(Reverse, "payer", command_id="r-early", transaction_id="early"))
    ledger.step(late)
    ledger.step(payer)
    ledger.legs.setdefault(payer, deque()).extend(refund)
    ledger.run()


def test_a_refunded_transfer_is_not_paid_back_twice():
    ledger = Ledger()
    reversed_before_its_refund(ledger)
    # the destination, which could pay, refuses: it refused the credit
    end = ending(ledger, "payer", "r-early")
    assert (end.type, end.payload.reason) == ("TransactionRejected", "transfer_refunded")
    # once the refund is back, the source refuses it itself
    ledger.submit(command(Reverse, "payer", command_id="r-late", transaction_id="early"))
    ledger.run()
    assert (ledger.rejections[-1]["command_id"], ledger.rejections[-1]["reason"]) == (
        "r-late", "transfer_refunded")
    assert ledger.record("payer", "early").state == "rejected"
    assert ledger.balance("payer") == (1_000, 1_000) and ledger.balance("late") == (300, 300)
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.reversals == 0


def test_verify_finds_a_refunded_transfer_paid_back(monkeypatch):
    prepare = transactions.prepare  # a destination that forgets it refused the credit
    monkeypatch.setattr(transactions, "prepare", lambda state, m, refunded=False:
                        prepare(state, m))
    ledger = Ledger()
    reversed_before_its_refund(ledger)
    assert ending(ledger, "payer", "r-early").type == "TransactionCommitted"
    assert ledger.balance("payer") == (1_300, 1_300)
    report = ledger.report()
    assert any("reverses transfer early of payer, which was not credited" in b
               for b in report.breaches), report.breaches


def test_a_transfer_id_is_its_for_ever_refunded_or_not():
    ledger = Ledger()
    funded(ledger, payer=1_000, payee=0)
    ledger.submit(transfer(1, "payee", "payer", command_id="pay-1"),
                  transfer(1, "ghost", "payer", command_id="pay-2"))
    ledger.run()
    ledger.tick(WINDOW + 1)  # the commands' outcomes are forgotten; their records are not
    ledger.submit(deposit(1, "payer"))
    ledger.run()
    ledger.submit(transfer(2, "payee", "payer", command_id="pay-1"),
                  txn("payer", posting("payer", "payee", 2), tid="pay-1"),
                  transfer(2, "payee", "payer", command_id="pay-2"))
    ledger.run()
    assert [r["reason"] for r in ledger.rejections[-3:]] == ["idempotency_key_reused"] * 3
    assert ledger.record("payer", "pay-2").state == "rejected"
    assert ledger.balance("payee") == (1, 1)
    report = ledger.report()
    assert report.ok, report.breaches


@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from(ACCOUNTS[:4]),
                          st.sampled_from([*ACCOUNTS[:4], "ghost", "shut"]),
                          st.integers(1, 400), st.booleans(), st.booleans()),
                min_size=1, max_size=12),
       st.integers(0, 2**32))
def test_random_transfers_and_their_reversals_conserve_money(moves, seed):
    rng = random.Random(seed)
    ledger = Ledger()
    funded(ledger, **{a: 500 for a in ACCOUNTS[:4]}, shut=0)
    ledger.submit(close_account("shut", command_id="closing"))
    ledger.run()
    for i, (source, destination, amount, reverse, twice) in enumerate(moves):
        if source == destination:
            continue
        ledger.submit(transfer(amount, destination, source, command_id=f"p{i}"))
        for j in range(reverse + (reverse and twice)):
            ledger.submit(command(Reverse, source, command_id=f"r{i}.{j}",
                                  transaction_id=f"p{i}"))
    ledger.run(rng)
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.transactions_in_flight == report.transfers_in_flight == 0
    assert sum(s.balance_minor for s in report.states.values()) == 500 * 4
    for s in report.states.values():
        assert s.held_minor == 0 and not s.holds


def test_a_reservation_blocks_closing_and_is_no_hold_a_client_can_name():
    ledger = Ledger()
    funded(ledger, payer=100, payee=0)
    ledger.submit(txn("payer", posting("payer", "payee", 100)))
    for _ in range(3):
        ledger.step(partition_for("payer", PARTITIONS))
    assert reservation_id("payer", "t1") in ledger.report().states["payer"].holds
    assert "\0" in reservation_id("payer", "t1")



@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(st.lists(st.tuples(st.sampled_from([*ACCOUNTS, "ghost"]),
                                             st.sampled_from(ACCOUNTS),
                                             st.integers(1, 400)), min_size=1, max_size=5),
                          st.sampled_from(ACCOUNTS), st.booleans()),
                min_size=1, max_size=12),
       st.integers(0, 2**32))
def test_random_transactions_commit_or_reject_as_a_whole(txns, seed):
    rng = random.Random(seed)
    ledger = Ledger()
    funded(ledger, **{a: 500 for a in ACCOUNTS})
    for i, (moves, coordinator, reverse) in enumerate(txns):
        postings = [posting(s, d, amt) for s, d, amt in moves if s != d]
        if not postings:
            continue
        ledger.submit(txn(coordinator, *postings, tid=f"t{i}"))
        if reverse:
            ledger.submit(command(Reverse, coordinator, command_id=f"r{i}",
                                  transaction_id=f"t{i}"))
    ledger.run(rng)
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.transactions_in_flight == 0
    assert sum(s.balance_minor for s in report.states.values()) == 500 * len(ACCOUNTS)
    for s in report.states.values():
        assert s.held_minor == 0 and not s.holds


def test_only_a_committed_transaction_is_reversed_and_only_a_pending_one_expires():
    ledger = Ledger()
    funded(ledger, **{PAYER: 100, PAYEE: 0})
    ledger.submit(txn(PAYER, posting(PAYER, PAYEE, 500), tid="refused"))
    ledger.run()
    ledger.submit(txn(PAYER, posting(PAYER, PAYEE, 5), tid="pending"))
    ledger.step(0)
    ledger.submit(command(Reverse, PAYER, command_id="r1", transaction_id="refused"),
                  command(Reverse, PAYER, command_id="r2", transaction_id="pending"))
    ledger.step(0)
    assert [(r["command_id"], r["reason"]) for r in ledger.rejections[-2:]] == [
        ("r1", "transaction_not_committed"), ("r2", "transaction_not_committed")]
    ledger.run()
    ledger.tick(120_000)
    ledger.submit(command(ExpireTransaction, PAYER, command_id="x", transaction_id="pending",
                          actor="ledger"))
    ledger.run()
    assert ledger.rejections[-1]["reason"] == "transaction_not_pending"
    assert ledger.balance(PAYEE) == (5, 5)
