"""``ledger rebuild``'s transaction records (streams.ops.rebuild), without Kafka: the
in-memory ledger of test_transactions loses every partition's store, gets it back from
its events as rebuild makes it, and goes on."""

from __future__ import annotations

from collections import deque

from schemas.codec import CODEC
from schemas.models import (
    CommandOutcome,
    ExpireTransaction,
    LedgerEvent,
    Rejection,
    Reverse,
    TransactionMessage,
    TransactionRecord,
    TransferLeg,
    Withdraw,
    encode,
)
from streams.domain import evolve, reservation_id
from streams.ops.rebuild import (
    UNKNOWN_DIGEST,
    Transactions,
    Vote,
    account_records,
    outcome_key_of,
    rejection_outcome_key,
    yes_vote,
)
from streams.partitions import partition_for
from streams.worker.processor import retention_records
from tests.unit.conftest import PARTITIONS, Store, command, deposit, place_hold, transfer
from tests.unit.test_transactions import (
    PAYEE,
    PAYER,
    WINDOW,
    Ledger,
    ending,
    funded,
    posting,
    txn,
)


def unread(ledger: Ledger) -> set[Vote]:
    """The yes votes still queued: past the committed offsets, when the state is lost."""
    return {v for queue in ledger.legs.values() for raw in queue
            if (v := yes_vote(raw)) is not None}


def rebuild(ledger: Ledger, votes: set[Vote]) -> Transactions:
    """Replace every partition's store with the one rebuild makes of the events (the
    outcome records unpacked and indexed, as a worker's store holds them)."""
    now = max(part.clock for part in ledger.parts)
    transactions = Transactions()
    stores = [Store() for _ in range(PARTITIONS)]
    states = {}
    retain: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(PARTITIONS)}
    for raw in ledger.events:
        e = LedgerEvent.from_avro(CODEC.decode(raw)[1])
        states[e.account_id] = evolve(states.get(e.account_id), e)
        transactions.add(e)
        okey = outcome_key_of(e)
        if okey is not None:
            p = partition_for(e.account_id, PARTITIONS)
            stores[p][okey] = encode(CommandOutcome(digest=UNKNOWN_DIGEST, records=[raw],
                                                    rejected=False, expires_at=now + WINDOW))
            retain[p].append((now + WINDOW, okey))
    for d in ledger.rejections:
        okey = rejection_outcome_key(d)
        if okey is not None:
            p = partition_for(d["account_id"], PARTITIONS)
            stores[p].setdefault(okey, encode(CommandOutcome(
                digest=UNKNOWN_DIGEST, records=[CODEC.encode(Rejection.avro_name, d)],
                rejected=True, expires_at=now + WINDOW)))
            retain[p].append((now + WINDOW, okey))
    for account, state in states.items():
        stores[partition_for(account, PARTITIONS)].update(account_records(state))
    values = transactions.store(PARTITIONS, votes)
    for p, store in enumerate(stores):
        store.update(values.get(p, {}))
        store.update(retention_records(retain[p]))
        ledger.parts[p].store = store
    return transactions


def records(ledger: Ledger) -> dict[bytes, bytes]:
    return {k: v for part in ledger.parts for k, v in part.store.items()}


def outcome(raw: bytes) -> list[bytes]:
    return CommandOutcome.from_avro(CODEC.decode(raw)[1]).records


def test_rebuilt_records_are_the_ones_the_worker_kept_and_the_ledger_goes_on():
    ledger = Ledger()
    funded(ledger, payer=1_000, merchant=0, fees=0, poor=10)
    ledger.submit(txn("payer", posting("payer", "merchant", 600), posting("payer", "fees", 30),
                      tid="paid"),
                  txn("payer", posting("poor", "merchant", 50), posting("payer", "fees", 5),
                      tid="refused"),
                  place_hold(100, account_id="payer"),
                  transfer(100, "merchant", "payer", command_id="tr-1"),
                  transfer(5, "ghost", "payer", command_id="tr-2"))  # refunded
    ledger.run()
    ledger.submit(command(Withdraw, "merchant", command_id="spent", amount_minor=600,
                          currency="USD"),
                  command(Reverse, "payer", command_id="r1", transaction_id="paid"))
    ledger.run()  # r1 is refused: the merchant spent it
    ledger.submit(deposit(600, "merchant"),
                  command(Reverse, "payer", command_id="r2", transaction_id="paid"),
                  command(Reverse, "payer", command_id="r-tr", transaction_id="tr-1"))
    ledger.run()
    ledger.submit(deposit(1, "merchant"))
    ledger.run()
    ledger.submit(txn("merchant", posting("merchant", "fees", 1), tid="open"))
    m = partition_for("merchant", PARTITIONS)
    ledger.step(m)  # started
    ledger.step(m)  # the merchant reserved; its vote is not read yet, nor the fees' PREPARE
    assert [ending(ledger, "payer", t).type for t in ("paid", "refused", "r1", "r2")] == [
        "TransactionCommitted", "TransactionRejected", "TransactionRejected",
        "TransactionCommitted"]
    live = records(ledger)
    votes = unread(ledger)
    assert votes == {("merchant", "open", "merchant")}

    transactions = rebuild(ledger, votes)
    again = records(ledger)
    for key, r in transactions.records(votes).items():
        kept = ledger.record(*key)
        assert kept is not None
        if r.state == "rejected":  # its votes counted up to the first no: not in the log
            r, kept = r.replace(voted=[]), kept.replace(voted=[])
        assert r == kept, key
    assert ledger.record("payer", "paid").reversed_by == "r2"
    assert ledger.record("payer", "tr-1").reversed_by == "r-tr"
    assert (ledger.record("payer", "tr-2").transfer, ledger.record("payer", "tr-2").state) == (
        True, "rejected")
    assert ledger.record("merchant", "open").state == "pending"
    for prefix in (b"t", b"y", b"x"):  # the reservation is in no hold-expiry index
        assert {k for k in again if k[:1] == prefix} == {k for k in live if k[:1] == prefix}
    assert any(k[:1] == b"y" for k in again)
    outcomes = {k for k in again if k[:1] == b"i"}
    # not in the log: a PREPARE answered no, an ABORT that found nothing reserved
    assert {k for k in live if k[:1] == b"i" and b":abort\0" not in k} - outcomes == {
        b"ipoor\0refused:prepare\0payer", b"imerchant\0r1:prepare\0payer"}
    for k in outcomes:  # the same records, a PREPARE's among them
        assert outcome(again[k]) == outcome(live[k]), k
    assert b"imerchant\0open:prepare\0merchant" in outcomes

    # copies of every message and leg sent so far change nothing; the pending one commits
    events = len(ledger.events)
    for raw in list(ledger.sent):
        name, d = CODEC.decode(raw)
        to = TransactionMessage.from_avro(d).to if name == TransactionMessage.avro_name \
            else TransferLeg.from_avro(d).account_id
        ledger.legs.setdefault(partition_for(to, PARTITIONS), deque()).append(raw)
    ledger.run()
    assert ending(ledger, "merchant", "open").type == "TransactionCommitted"
    # committed; reserved and posted at fees; posted. A leg's copy is answered with the
    # event its first delivery made, byte for byte (verify counts it a duplicate)
    assert len(set(ledger.events[events:]) - set(ledger.events[:events])) == 4
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.transactions_in_flight == 0
    assert report.states["payer"].holds.keys() == {"h1"}

    ledger.submit(command(Reverse, "payer", command_id="r3", transaction_id="paid"))
    ledger.run()
    assert ledger.rejections[-1]["reason"] == "already_reversed"
    started = next(raw for raw in ledger.events
                   if (e := LedgerEvent.from_avro(CODEC.decode(raw)[1])).type ==
                   "TransactionStarted" and e.command_id == "paid")
    events, refused = len(ledger.events), len(ledger.rejections)
    ledger.submit(txn("payer", posting("payer", "fees", 1), tid="paid"))
    ledger.run()  # within the window: its first outcome (content unknown after a rebuild)
    assert ledger.events[events:] == [started] and len(ledger.rejections) == refused
    ledger.tick(WINDOW + 1)
    ledger.submit(txn("payer", posting("payer", "fees", 1), tid="paid"))
    ledger.run()  # the outcome is forgotten, not the transaction, rejected or not
    assert ledger.rejections[-1]["reason"] == "idempotency_key_reused"
    assert ledger.record("payer", "refused").state == "rejected"
    assert ledger.record("payer", "paid") is not None
    assert ledger.report().ok


def last_vote_unread(ledger: Ledger) -> None:
    """Both reserved; the coordinator read the payer's vote, not the payee's."""
    funded(ledger, **{PAYER: 1_000, PAYEE: 0})
    ledger.submit(txn(PAYER, posting(PAYER, PAYEE, 400)))
    ledger.step(0)  # started: PREPAREs out
    ledger.step(0)  # the payer reserved
    ledger.step(0)  # its vote counted
    ledger.step(1)  # the payee reserved; its vote is queued for partition 0
    record = ledger.record(PAYER, "t1")
    assert record is not None and (record.state, record.voted) == ("pending", [PAYER])


def test_a_transaction_waiting_for_its_last_vote_commits_after_a_rebuild():
    ledger = Ledger()
    last_vote_unread(ledger)
    before = ledger.record(PAYER, "t1")
    rebuild(ledger, unread(ledger))
    assert ledger.record(PAYER, "t1") == before
    ledger.run()
    assert ending(ledger, PAYER).type == "TransactionCommitted"
    assert ledger.balance(PAYER) == (600, 600) and ledger.balance(PAYEE) == (400, 400)
    assert ledger.report().ok


def test_a_vote_lost_with_the_state_ends_the_transaction_at_its_deadline():
    ledger = Ledger()
    last_vote_unread(ledger)
    ledger.legs[0].clear()  # the payee's vote, written with its reservation, is lost
    rebuild(ledger, unread(ledger))
    record = ledger.record(PAYER, "t1")
    assert isinstance(record, TransactionRecord)
    # every participant reserved: counting them all, it would wait for ever
    assert (record.state, record.voted) == ("pending", [])
    ledger.run()
    assert ledger.record(PAYER, "t1").state == "pending"
    ledger.tick(60_000)
    ledger.submit(command(ExpireTransaction, PAYER, command_id="x", transaction_id="t1",
                          issued_at=record.deadline, actor="ledger"))
    ledger.run()
    assert ending(ledger, PAYER).payload.reason == "transaction_timed_out"
    assert ledger.balance(PAYER) == (1_000, 1_000) and ledger.balance(PAYEE) == (0, 0)
    for account in (PAYER, PAYEE):
        assert reservation_id(PAYER, "t1") not in ledger.report().states[account].holds
    report = ledger.report()
    assert report.ok, report.breaches
    assert report.transactions_in_flight == 0
