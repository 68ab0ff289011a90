"""``ledger rebuild``: the worker's state, re-derived from the log alone.

For when the accounts changelog (or the disk, and with it the changelog) is lost.
With the worker group stopped, it folds ``ledger.events`` into every account's state,
turns every event and every rejection back into the outcome record of the command
(or transfer leg) that caused it (kept for the idempotency window from the time the
event or rejection was written), rebuilds the hold-expiry index, takes each
partition's checkpoint from the worker group's committed input offsets, and writes
all of it to the changelog, checkpoint last. A worker started afterwards restores
it through Faust's ordinary recovery and resumes at the group's committed offsets.

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
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.codec import CODEC
from schemas.models import (
    AccountState,
    CommandOutcome,
    LedgerEvent,
    TransferCredited,
    TransferReversed,
    encode,
)
from streams.core import expiry_key
from streams.domain import evolve
from streams.ops.topics import ensure_topics
from streams.partitions import partition_for
from streams.readmodels.eventlog import read_all
from streams.readmodels.projection import GroupActive, _members
from streams.settings import Settings
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
    say(f"folding {s.events_topic}")
    for m in read_all(s, s.events_topic):
        raw = m.value() or b""
        event = LedgerEvent.from_avro(CODEC.decode(raw, expect=LedgerEvent.avro_name)[1])
        state = states.get(event.account_id)
        if state is not None and event.version <= state.version:
            continue  # a byte-identical duplicate of an event already folded
        states[event.account_id] = evolve(state, event)
        paid = event.payload
        if isinstance(paid, TransferCredited):
            okey = leg_outcome_key(event.account_id, event.causation_id, paid.from_account_id)
        elif isinstance(paid, TransferReversed):  # a refund, at its source
            okey = leg_outcome_key(event.account_id, event.causation_id, event.account_id)
        else:
            okey = outcome_key(event.account_id, event.causation_id)
        outcomes[okey] = CommandOutcome(digest=UNKNOWN_DIGEST, records=[raw], rejected=False,
                                        expires_at=m.timestamp()[1] + s.idempotency_window_ms)
    say(f"reading {s.rejections_topic}")
    for m in read_all(s, s.rejections_topic):
        raw = m.value() or b""
        _, d = CODEC.decode(raw)
        okey = (leg_outcome_key(d["account_id"], d["command_id"], d["account_id"])
                if d["command_type"] == "TransferRefund" else
                outcome_key(d["account_id"], d["command_id"]))
        if d["reason"] not in ("idempotency_key_reused", "wrong_partition", "invalid_command") \
                and d["command_type"] != "TransferCredit":
            # those three are not a command's outcome: they are never stored. A refused
            # credit does not name its source, so its key cannot be made: a copy of
            # that leg is refused again, and the source takes the refund only once.
            outcomes.setdefault(okey, CommandOutcome(
                digest=UNKNOWN_DIGEST, records=[raw], rejected=True,
                expires_at=m.timestamp()[1] + s.idempotency_window_ms))

    checkpoints = committed_inputs(s)
    per_partition: dict[int, dict[bytes, bytes]] = {p: {} for p in range(s.partitions)}
    for account, state in states.items():
        if state is None:
            continue
        values = per_partition[partition_for(account, s.partitions)]
        values[account_key(account)] = encode(state)
        for hold_id, hold in state.holds.items():
            values[expiry_key(hold.expires_at, account, hold_id)] = b""
    retain: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(s.partitions)}
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
