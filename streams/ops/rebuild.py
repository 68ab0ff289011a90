"""``ledger rebuild``: the worker's state, re-derived from the log alone.

For when the accounts changelog (or the disk, and with it the changelog) is lost.
With the worker group stopped, it folds ``ledger.events`` into every account's state,
turns every event and every rejection back into the outcome record of the command
(or transfer leg) that caused it (kept for the idempotency window from the time the
event or rejection was written), rebuilds the hold-expiry index (of the holds clients
place: a transaction's reservation has no expiry), takes each
partition's checkpoint from the worker group's committed input offsets, and writes
all of it to the changelog, checkpoint last. A worker started afterwards restores
it through Faust's ordinary recovery and resumes at the group's committed offsets.

Transactions (``streams.transactions``): each coordinator's record of each
transaction, from its ``TransactionStarted`` and how it ended (pending if it has not),
the deadline index of the pending ones, each source's record of each transfer (from
its ``TransferDebited``; rejected if it was refunded), the link between a transaction
or transfer and the reversal that is not rejected, and at each participant the record
that it handled the PREPARE (from its ``TransactionReserved``: a copy still on
``ledger.transfers`` is ignored). Every record is kept, as the worker keeps it (an id
is one transaction or transfer for ever). The votes are
not in the log: a participant counts as having voted once its reservation is (that is
what its yes said), except, for a pending transaction, a participant whose yes vote is
still on ``ledger.transfers`` past the coordinator's committed offset: the coordinator
counts it when it reads it there, and commits on the last one. (Were every participant
of a pending transaction counted, no vote would be left to commit it, and its deadline
could not name one that did not answer.) A pending transaction every participant
reserved for with no vote unread lost one with the state (a reservation written, its
vote not): it counts none, and is rejected at its deadline. A participant that refused
leaves nothing in the log; its no vote either is still to be read, or it rejected the
transaction, which the log says.

An input decided but not yet committed when the state was lost is decided again:
its outcome record (rebuilt from the event or rejection it produced) answers it with
the original records, so nothing is applied twice. Rebuilt outcome records carry no
content digest (the log does not keep the commands), so for those ids a retry with
other content is answered with the original outcome instead of
``idempotency_key_reused``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.codec import CODEC, DecodeError
from schemas.models import (
    AccountState,
    CommandOutcome,
    LedgerEvent,
    TransactionCommitted,
    TransactionMessage,
    TransactionRecord,
    TransactionRejected,
    TransactionReserved,
    TransactionStarted,
    TransferCredited,
    TransferDebited,
    TransferLeg,
    TransferReversed,
    encode,
)
from streams.core import deadline_key, expiry_key, transaction_key
from streams.domain import evolve
from streams.ops.topics import ensure_topics
from streams.partitions import partition_for
from streams.readmodels.eventlog import read_all
from streams.readmodels.projection import GroupActive, _members
from streams.settings import Settings
from streams.transactions import participants, transfer_record
from streams.worker.processor import (
    account_key,
    leg_outcome_key,
    outcome_key,
    outcome_log_key,
    pack_records,
    retention_records,
)
from streams.worker.state import CHECKPOINT_KEY, Checkpoint, wrap

log = logging.getLogger("ledger.rebuild")

# An outcome record rebuilt from the log: the command's content is not known.
UNKNOWN_DIGEST = b""
LOG_BYTES = 1 << 20  # the outcome records in one changelog record, about


@dataclass
class OutcomeLog:
    """Outcome records packed into one changelog record (streams.worker.processor)."""

    key: bytes
    expires_at: int = 0  # the last of its outcomes'
    size: int = 0
    records: list[tuple[bytes, bytes | None]] = field(default_factory=list)

    def add(self, okey: bytes, value: bytes, expires_at: int) -> None:
        self.records.append((okey, value))
        self.size += len(okey) + len(value)
        self.expires_at = max(self.expires_at, expires_at)


Vote = tuple[str, str, str]  # (coordinator, transaction id, participant)


def rejection_outcome_key(d: dict[str, Any]) -> bytes | None:
    """Where the worker keeps the outcome a rejection (``d``, decoded) belongs to; None:
    it keeps none (``idempotency_key_reused``, ``wrong_partition``, ``invalid_command``
    are no command's outcome). A refused credit names its source in its detail, as the
    worker writes it: its destination is asked to pay back no transfer it refused."""
    if d["reason"] in ("idempotency_key_reused", "wrong_partition", "invalid_command"):
        return None
    account, command_id = d["account_id"], d["command_id"]
    if d["command_type"] == "TransferRefund":
        return leg_outcome_key(account, command_id, account)
    if d["command_type"] == "TransferCredit":
        head = f"transfer {command_id.removesuffix(':credit')} refunded to "
        source = d["detail"][len(head):] if d["detail"].startswith(head) else ""
        return leg_outcome_key(account, command_id, source) if source else None
    return outcome_key(account, command_id)


def outcome_key_of(event: LedgerEvent) -> bytes | None:
    """Where the worker keeps the outcome ``event`` belongs to; None: it keeps none (a
    transaction's vote counted, COMMIT or ABORT: its record answers for those)."""
    paid = event.payload
    if isinstance(paid, TransferCredited):
        return leg_outcome_key(event.account_id, event.causation_id, paid.from_account_id)
    if isinstance(paid, TransferReversed):  # a refund, at its source
        return leg_outcome_key(event.account_id, event.causation_id, event.account_id)
    if isinstance(paid, TransactionReserved):  # a PREPARE, at a participant
        return leg_outcome_key(event.account_id, event.causation_id,
                               paid.coordinator_account_id)
    if event.causation_id != event.command_id:
        return None
    return outcome_key(event.account_id, event.command_id)


def account_records(state: AccountState) -> dict[bytes, bytes]:
    """The account's store record, and its holds' in the hold-expiry index."""
    out = {account_key(state.account_id): encode(state)}
    for hold_id, hold in state.holds.items():
        if "\0" not in hold_id:  # a transaction's reservation (reservation_id): no expiry
            out[expiry_key(hold.expires_at, state.account_id, hold_id)] = b""
    return out


@dataclass
class Transactions:
    """The coordinators' records of the transactions the log tells of. No Kafka here."""

    # (coordinator, id) -> its TransactionStarted (the last: in a log from before records
    # were kept for ever, a rejected transaction's id could be used again)
    started: dict[tuple[str, str], LedgerEvent] = field(default_factory=dict)
    ended: dict[tuple[str, str], str] = field(default_factory=dict)  # committed, rejected
    reserved: dict[Vote, int] = field(default_factory=dict)  # -> the reservation's time
    # (source, transfer id) -> its TransferDebited (a refund ends it "rejected")
    transfers: dict[tuple[str, str], LedgerEvent] = field(default_factory=dict)

    def add(self, event: LedgerEvent) -> None:
        p = event.payload
        if isinstance(p, TransactionStarted | TransferDebited):  # an id forgotten, used again
            key = (event.account_id, p.transaction_id if isinstance(p, TransactionStarted)
                   else p.transfer_id)
            self.ended.pop(key, None)
            self.started.pop(key, None)
            self.transfers.pop(key, None)
            if isinstance(p, TransferDebited):
                self.transfers[key] = event
            else:
                self.started[key] = event
        elif isinstance(p, TransferReversed):  # refunded
            self.ended[(event.account_id, p.transfer_id)] = "rejected"
        elif isinstance(p, TransactionCommitted | TransactionRejected):
            self.ended[(event.account_id, p.transaction_id)] = \
                "committed" if isinstance(p, TransactionCommitted) else "rejected"
        elif isinstance(p, TransactionReserved):
            self.reserved[(p.coordinator_account_id, p.transaction_id, event.account_id)] = \
                event.occurred_at

    def pending(self) -> list[tuple[str, str]]:
        return [key for key in self.started if key not in self.ended]

    def records(self, unread: Set[Vote] = frozenset(),
                ) -> dict[tuple[str, str], TransactionRecord]:
        """``unread``: the yes votes still on ledger.transfers past the coordinators'
        committed offsets (``unread_votes``)."""
        out: dict[tuple[str, str], TransactionRecord] = {}
        for key, e in self.transfers.items():
            d = e.payload
            assert isinstance(d, TransferDebited)
            out[key] = transfer_record(TransferLeg.trusted(
                kind="CREDIT", transfer_id=key[1], from_account_id=key[0],
                to_account_id=d.to_account_id, amount_minor=d.amount_minor, currency=e.currency,
                issued_at=e.occurred_at, actor=e.actor, correlation_id=e.correlation_id,
                reason=None, expires_at=0, metadata=e.metadata, signature=b""),
                self.ended.get(key, "committed"))
        for key, e in self.started.items():
            p = e.payload
            assert isinstance(p, TransactionStarted)
            state = self.ended.get(key, "pending")
            parties = participants(p.postings)
            # a reservation of this transaction, not of an earlier one of the same id
            voted = [a for a in parties if self.reserved.get((*key, a), -1) >= e.occurred_at]
            if state == "pending":
                voted = [a for a in voted if (*key, a) not in unread]
                if len(voted) == len(parties):
                    # every yes was read, yet it did not commit: a vote was lost with the
                    # state (its reservation written, not its message). Counting all would
                    # leave it pending for ever; counting none, it ends at its deadline.
                    voted = []
            out[key] = TransactionRecord.trusted(
                transaction_id=key[1], coordinator_account_id=key[0], postings=p.postings,
                participants=parties, voted=voted, state=state, deadline=p.deadline,
                issued_at=e.occurred_at, actor=e.actor, correlation_id=e.correlation_id,
                reverses=p.reverses, reversed_by=None, metadata=e.metadata, transfer=False)
        for r in list(out.values()):  # a rejected reversal frees the original again
            original = (r.coordinator_account_id, r.reverses or "")
            if original in out and r.state != "rejected" and out[original].state != "rejected":
                out[original] = out[original].replace(reversed_by=r.transaction_id)
        return out

    def store(self, partitions: int, unread: Set[Vote] = frozenset(),
              ) -> dict[int, dict[bytes, bytes]]:
        """Per partition, the records' store keys (``t``, and ``y`` for the pending)."""
        values: dict[int, dict[bytes, bytes]] = {}
        for key, r in self.records(unread).items():
            p = partition_for(key[0], partitions)
            values.setdefault(p, {})[transaction_key(*key)] = encode(r)
            if r.state == "pending":
                values[p][deadline_key(r.deadline, *key)] = b""
        return values


def unread_votes(s: Settings, checkpoints: dict[int, Checkpoint], partitions: set[int],
                 timeout_s: float = 60.0) -> set[Vote]:
    """The yes votes on ``ledger.transfers`` past the group's committed offsets of
    ``partitions`` (the coordinators read them when they resume). Signatures are not
    checked: a vote left out of ``voted`` and never counted only lets the transaction
    end at its deadline."""
    consumer = Consumer({**s.kafka_config(), "group.id": f"ledger-rebuild-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    votes: set[Vote] = set()
    try:
        ends: dict[int, int] = {}
        starts = []
        for p in sorted(partitions):
            tp = TopicPartition(s.transfers_topic, p)
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            first = max(low, checkpoints[p].transfers + 1)
            if first < high:
                ends[p] = high
                starts.append(TopicPartition(s.transfers_topic, p, first))
        consumer.assign(starts)
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{s.transfers_topic}: nothing read for {timeout_s}s")
            for m in consumer.consume(1000, timeout=0.5):
                at, offset = m.partition(), m.offset()
                if m.error() is not None or at is None or offset is None or at not in ends:
                    continue
                deadline = time.monotonic() + timeout_s
                if offset >= ends[at] - 1:
                    del ends[at]
                vote = yes_vote(m.value() or b"")
                if vote is not None:
                    votes.add(vote)
    finally:
        consumer.close()
    return votes


def yes_vote(raw: bytes) -> Vote | None:
    """The vote a ``ledger.transfers`` record is, if it is a yes."""
    try:
        name, d = CODEC.decode(raw)
    except DecodeError:
        return None
    if name != TransactionMessage.avro_name or d["kind"] != "VOTE" or not d["accepted"]:
        return None
    return d["coordinator_account_id"], d["transaction_id"], d["account_id"]


@dataclass
class RebuildResult:
    accounts: int
    outcomes: int
    records: int
    checkpoints: dict[int, Checkpoint]
    seconds: float


def committed_inputs(s: Settings) -> dict[int, Checkpoint]:
    """Per partition, the last input offsets the worker group committed."""
    consumer = Consumer({**s.kafka_config(), "group.id": s.app_id,
                         "enable.auto.commit": False})
    try:
        tps = [TopicPartition(t, p) for t in (s.commands_topic, s.transfers_topic)
               for p in range(s.partitions)]
        committed = consumer.committed(tps, timeout=30)
    finally:
        consumer.close()
    out = {p: Checkpoint() for p in range(s.partitions)}
    for tp in committed:
        last = tp.offset - 1 if tp.offset is not None and tp.offset >= 0 else -1
        ck = out[tp.partition]
        out[tp.partition] = (Checkpoint(last, ck.transfers) if tp.topic == s.commands_topic
                             else Checkpoint(ck.commands, last))
    return out


def rebuild(s: Settings, progress: Callable[[str], None] | None = None) -> RebuildResult:
    start = time.monotonic()
    admin = AdminClient(s.kafka_config())
    members = _members(admin, s.app_id)
    if members:
        raise GroupActive(f"worker group {s.app_id!r} has {len(members)} live member(s): "
                          f"{'; '.join(members)}. Stop every worker first (nothing was "
                          "changed).")
    ensure_topics(s)  # a lost changelog topic is created again, compacted
    say = progress or (lambda _msg: None)

    states: dict[str, AccountState | None] = {}
    outcomes: dict[bytes, CommandOutcome] = {}
    transactions = Transactions()
    say(f"folding {s.events_topic}")
    for m in read_all(s, s.events_topic):
        raw = m.value() or b""
        event = LedgerEvent.from_avro(CODEC.decode(raw, expect=LedgerEvent.avro_name)[1])
        state = states.get(event.account_id)
        if state is not None and event.version <= state.version:
            continue  # a byte-identical duplicate of an event already folded
        states[event.account_id] = evolve(state, event)
        transactions.add(event)
        okey = outcome_key_of(event)
        if okey is not None:
            outcomes[okey] = CommandOutcome(
                digest=UNKNOWN_DIGEST, records=[raw], rejected=False,
                expires_at=m.timestamp()[1] + s.idempotency_window_ms)
    say(f"reading {s.rejections_topic}")
    for m in read_all(s, s.rejections_topic):
        raw = m.value() or b""
        okey = rejection_outcome_key(CODEC.decode(raw)[1])
        if okey is not None:
            outcomes.setdefault(okey, CommandOutcome(
                digest=UNKNOWN_DIGEST, records=[raw], rejected=True,
                expires_at=m.timestamp()[1] + s.idempotency_window_ms))

    checkpoints = committed_inputs(s)
    per_partition: dict[int, dict[bytes, bytes]] = {p: {} for p in range(s.partitions)}
    for account, state in states.items():
        if state is None:
            continue
        per_partition[partition_for(account, s.partitions)].update(account_records(state))
    retain: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(s.partitions)}
    pending = {partition_for(c, s.partitions) for c, _ in transactions.pending()}
    if pending:
        say(f"reading the votes on {s.transfers_topic} not yet counted")
    kept = transactions.store(
        s.partitions, unread_votes(s, checkpoints, pending) if pending else set())
    for p, values in kept.items():
        per_partition[p].update(values)
    # The outcome records go to the changelog packed, as the worker writes them: in
    # records of about LOG_BYTES at most, each forgotten when its last outcome is.
    logs: dict[int, list[OutcomeLog]] = {p: [] for p in range(s.partitions)}
    for okey, outcome in sorted(outcomes.items(), key=lambda kv: kv[1].expires_at):
        account = okey[1:].split(b"\0", 1)[0].decode()
        p = partition_for(account, s.partitions)
        ck = checkpoints[p]
        value = wrap((ck.commands, ck.transfers), None, encode(outcome))
        chunks = logs[p]
        if not chunks or chunks[-1].size > LOG_BYTES:
            chunks.append(OutcomeLog(outcome_log_key((ck.commands, ck.transfers))
                                     + len(chunks).to_bytes(4, "big")))
        chunks[-1].add(okey, value, outcome.expires_at)
        retain[p].append((outcome.expires_at, okey))
    for p, pairs in retain.items():
        pairs += [(log.expires_at, log.key) for log in logs[p]]
        per_partition[p].update(retention_records(pairs))

    producer = Producer(s.producer_config())
    records = 0
    for p, values in per_partition.items():
        ck = checkpoints[p]
        tag = (ck.commands, ck.transfers)
        for key, value in values.items():
            producer.produce(s.changelog_topic, wrap(tag, None, value), key, partition=p)
            records += 1
            if records % 10_000 == 0:
                producer.poll(0)
        for chunk in logs[p]:
            producer.produce(s.changelog_topic, wrap(tag, None, pack_records(chunk.records)),
                             chunk.key, partition=p)
            records += 1
        producer.produce(s.changelog_topic, ck.encode(), CHECKPOINT_KEY, partition=p)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} changelog records not acknowledged; run rebuild again")
    result = RebuildResult(accounts=len(states), outcomes=len(outcomes), records=records,
                           checkpoints=checkpoints, seconds=time.monotonic() - start)
    log.info("rebuilt", extra={"accounts": result.accounts, "outcomes": result.outcomes,
                               "records": records})
    return result
