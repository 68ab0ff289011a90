"""The worker's hot path: decide a batch, then make it durable in a crash-safe order.

For each batch (records of several partitions taken from Faust at once):

1. decide every partition's inputs from its committed state (legs first, then
   commands, each in offset order) -> outputs and state changes;
2. write each partition's checkpoint with ``pending`` = the batch's last offsets
   to the changelog, and wait for the acks;
3. produce the outputs (events, rejections, legs, dead letters), wait for the acks;
4. produce the state changes and the advanced checkpoint to the changelog, wait
   for the acks, then write them and Faust's persisted offset to RocksDB in one
   WriteBatch per partition;
5. return, so Faust acks the inputs and commits.

A crash anywhere leaves either nothing of the batch, or a ``pending`` checkpoint:
the next owner of the partition reads exactly those inputs again, decides them
from the same state in the same order and sends byte-identical outputs, which
consumers drop as duplicates by ``(account_id, version)``.
All outputs go through one librdkafka producer, with one flush per step.

Steps are decided and committed in turn, but the worker decides the next step while
this one's flushes are out (see ``decide``): a partition whose step is being
committed is read through that step's changes, as if it were done. Commits stay one
at a time, in order, so the changelog and the outputs hold the steps in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from rocksdict import WriteBatch

from schemas.codec import CODEC
from schemas.models import CommandBase, encode_batch
from streams import core
from streams.core import Stats
from streams.partitions import partition_for
from streams.settings import Settings
from streams.worker.processor import (
    DLQ,
    EVENTS,
    OUTCOME_PREFIX,
    REJECTIONS,
    TRANSFERS,
    BatchProcessor,
    LegSigner,
    outcome_log_key,
    pack_records,
)
from streams.worker.state import CHECKPOINT_KEY, FAUST_OFFSET_KEY, Checkpoint, PartitionView, wrap

log = logging.getLogger("ledger.engine")


# Where a crash test can stop the worker (LEDGER_CRASH_AT). On the commit path: after
# the intent is acked; with half of the outputs acked; after all outputs; with half of
# the state's changelog records acked; after the state's changelog, before RocksDB;
# after RocksDB, before the inputs are acked; and while deciding a step with the step
# before it being committed. The same points prefixed ``resolve/``: while finishing a
# batch a crashed worker left pending. During recovery: after a batch of changelog
# records is applied to the store (``recovering``). During a rebalance handover: when
# partitions are revoked, before the step being committed is finished (``handover``)
# and after (``handover-done``).
# Accounts kept across steps, per partition (core.keep_resident): about 200 bytes each
RESIDENT_MAX_KEYS = 20_000
COMMIT_POINTS = ("intent", "outputs-half", "outputs", "state-half", "state", "stored")
CRASH_POINTS = (*COMMIT_POINTS, "deciding-next", *(f"resolve/{p}" for p in COMMIT_POINTS),
                "recovering", "handover", "handover-done")


class CrashPoint:
    """Kills the worker (SIGKILL: no cleanup, no flush) at a named point, once armed."""

    def __init__(self, spec: str | None) -> None:
        self.point, self.left = "", 0
        self.prefix = ""  # "resolve/" while a pending batch is being finished
        if spec:
            point, n = spec.rsplit(":", 1)
            if point not in CRASH_POINTS:
                raise ValueError(f"LEDGER_CRASH_AT: {point!r} is not one of {CRASH_POINTS}")
            self.point, self.left = point, int(n)

    def armed(self, point: str) -> bool:
        return self.prefix + point == self.point

    def reached(self, point: str) -> None:
        if not self.armed(point):
            return
        self.left -= 1
        if self.left == 0:
            log.critical("crash test: killing the worker at %s", self.point)
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class DeliveryFailed(RuntimeError):
    """The broker did not take a batch's records: the worker must stop, not carry on."""


# A record to produce: topic, partition, key, value, headers.
_Out = tuple[str, int, "bytes | None", "bytes | None",
             "list[tuple[str, str | bytes | None]] | None"]


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    offset: int
    timestamp: int  # epoch ms: the broker's append time on the input topics


@dataclass
class PartitionInput:
    commands: list[Record] = field(default_factory=list)
    legs: list[Record] = field(default_factory=list)


@dataclass
class _Work:
    partition: int
    view: PartitionView
    processor: BatchProcessor
    tag: tuple[int, int]
    changes: dict[bytes, bytes | None] = field(default_factory=dict)


@dataclass
class Step:
    """A decided step: its partitions' outputs and changes, to commit in turn."""

    work: list[_Work]
    report: BatchReport
    committed: asyncio.Future[None]
    intent_sent: bool = False  # its intent went out with the state of the step before


@dataclass
class BatchReport:
    partitions: int = 0
    stats: Stats = field(default_factory=Stats)
    decide_ms: float = 0.0
    flush_ms: float = 0.0
    resolved_pending: int = 0
    gaps_filled: int = 0


class Engine:
    def __init__(self, settings: Settings, db_for: Callable[[int], Any]) -> None:
        self.s = settings
        self.db_for = db_for
        self.signer = LegSigner(settings.leg_secret.get_secret_value().encode(), settings.app_id)
        if settings.schema_registry_url:
            CODEC.use_registry(settings.schema_registry_url)
        self._errors: list[str] = []
        self.producer = Producer(settings.producer_config(**{
            # Every step ends in a flush, which sends at once whatever linger says
            # (librdkafka >= 1.8), so lingering adds no latency; with 0, librdkafka's
            # threads contend with the hot path for the queues while it produces.
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            # A record that fails while a later one of its partition can still succeed
            # is fatal (see _send). The guarantee leaves out records that time out:
            # they cannot, as a flush gives up (and the worker stops) well before.
            "enable.gapless.guarantee": True,
            "message.timeout.ms": int(settings.flush_timeout_s * 1000) * 5,
            "error_cb": self._on_error,
        }))
        # What the hot path is doing, for the stall watchdog's last words.
        self.phase = "idle"
        self._changelog_offsets: dict[int, int] = {}
        # per partition: the work of a decided step not yet written to RocksDB
        self._staged: dict[int, _Work] = {}
        # the steps decided and not yet committed, in order
        self._uncommitted: list[Step] = []
        # per partition: accounts as the steps decided so far left them (see
        # core.keep_resident); forgotten whenever partitions move (``forget_resident``)
        self._resident: dict[int, dict[bytes, bytes | None]] = {}
        self._resident_era = 0
        self._deciding = asyncio.Lock()
        self.crash = CrashPoint(settings.crash_at)
        self._topics = {EVENTS: settings.events_topic, REJECTIONS: settings.rejections_topic,
                        TRANSFERS: settings.transfers_topic, DLQ: settings.dlq_topic}

    # ------------------------------------------------------------ producing

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}[{msg.partition()}]: {err.str()}")
        elif msg.topic() == self.s.changelog_topic:
            p, off = msg.partition() or 0, msg.offset() or 0
            if off > self._changelog_offsets.get(p, -1):
                self._changelog_offsets[p] = off

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():  # e.g. a gap the idempotent producer could not close
            self._errors.append(f"producer: {err.str()}")

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int,
                 headers: list[tuple[str, str | bytes | None]] | None = None,
                 report: bool = True) -> None:
        on_delivery = self._on_delivery if report else None
        while True:
            try:
                self.producer.produce(topic, value, key, partition=partition,
                                      on_delivery=on_delivery, headers=headers)
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:  # the producer failed for good (see _send)
                raise DeliveryFailed(f"{topic}[{partition}]: {exc}") from exc

    def _send(self, records: Sequence[_Out]) -> None:
        """Produce records; only the last one of each topic partition reports its delivery.

        The producer is idempotent with the gapless guarantee: records of a partition are
        written in order, and a record that fails where a later one could still succeed
        is a fatal error, which fails every record after it. So the last record's
        delivery answers for the ones before it, and the flush pays for one Python
        callback per partition, not one per record (they ran in the flush's thread,
        taking the interpreter from the step being decided meanwhile).
        """
        last = {(r[0], r[1]): i for i, r in enumerate(records)}
        reported = set(last.values())
        for i, (topic, partition, key, value, headers) in enumerate(records):
            self._produce(topic, key, value, partition, headers, i in reported)

    async def _flush(self, step: str) -> float:
        self.phase = f"flush {step}"
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            left = await loop.run_in_executor(None, self.producer.flush,
                                              self.s.flush_timeout_s)
        except Exception as exc:  # a fatal error (see _send) raises from the flush
            raise DeliveryFailed(f"{step}: {exc!r}; {self._errors[:5]}") from exc
        if left or self._errors:
            errors, self._errors = self._errors[:5], []
            raise DeliveryFailed(f"{step}: {left} record(s) not delivered; {errors}")
        return (time.perf_counter() - start) * 1000

    # ------------------------------------------------------------ batches

    async def process(self, inputs: dict[int, PartitionInput]) -> BatchReport:
        """Decide and commit one step."""
        return await self.commit(await self.decide(inputs))

    def _view(self, p: int) -> PartitionView:
        """Partition ``p`` as the next step must see it: through the changes of a step
        still being committed (decided, not yet in RocksDB), as if that step were done."""
        staged = self._staged.get(p)
        resident = self._resident.setdefault(p, {})
        if staged is None:
            return PartitionView(self.db_for(p), resident=resident)
        return PartitionView(self.db_for(p), staged.view.checkpoint.advanced(*staged.tag),
                             staged.changes, resident)

    def forget_resident(self) -> None:
        """Forget the accounts kept across steps: partitions are moving, and one that
        comes back may have been changed by another worker meanwhile."""
        self._resident.clear()
        self._resident_era += 1

    async def decide(self, inputs: dict[int, PartitionInput]) -> Step:
        """Decide a step's inputs; a step being committed meanwhile is read through.

        A partition left half-done by a crashed worker is finished first, once the
        step being committed is done (its commit and this one's share the producer).
        """
        async with self._deciding:  # one at a time: each reads the one before's changes
            return await self._decide_step(inputs)

    async def _decide_step(self, inputs: dict[int, PartitionInput]) -> Step:
        report = BatchReport()
        self.phase = "decide"
        t0 = time.perf_counter()
        era = self._resident_era
        work: list[_Work] = []
        for p in sorted(inputs):
            # Between partitions the step being committed goes on (its next produce and
            # flush), and Faust's stream fills the next step: deciding a whole step at
            # once held both back for its length.
            await asyncio.sleep(0)
            view = self._view(p)
            if view.checkpoint.pending is not None:
                await self.settled()
                await self._resolve_pending(p, view, report)
                view = self._view(p)
            ck = view.checkpoint
            inp = PartitionInput(
                commands=await self._contiguous(self.s.commands_topic, p, ck.commands,
                                                inputs[p].commands, report),
                legs=await self._contiguous(self.s.transfers_topic, p, ck.transfers,
                                            inputs[p].legs, report))
            w = self._decide(p, view, inp)
            if w is not None:
                w.changes = w.processor.finish(w.tag)
                if era == self._resident_era:  # no rebalance began while deciding
                    core.keep_resident(self._resident.setdefault(p, {}), view.reads.known,
                                       w.changes, RESIDENT_MAX_KEYS)
                work.append(w)
                if self._uncommitted:
                    self.crash.reached("deciding-next")
        for w in work:  # the next step reads these partitions through this one's changes
            self._staged[w.partition] = w
            _merge(report.stats, w.processor.stats)
        report.decide_ms = (time.perf_counter() - t0) * 1000
        report.partitions = len(work)
        self.phase = "idle"
        step = Step(work, report, asyncio.get_running_loop().create_future())
        self._uncommitted.append(step)
        return step

    async def commit(self, step: Step) -> BatchReport:
        """Make a decided step durable (the order in the module's docstring). Steps are
        committed in the order they were decided."""
        assert self._uncommitted and self._uncommitted[0] is step, "out of order"
        try:
            if step.work:
                step.report.flush_ms = await self._commit(step.work, step)
        finally:
            for w in step.work:
                if self._staged.get(w.partition) is w:
                    del self._staged[w.partition]
            self._uncommitted.pop(0)
            step.committed.set_result(None)
            self.phase = "idle"
        return step.report

    async def settled(self) -> None:
        """Wait until every step decided so far is committed."""
        for step in list(self._uncommitted):
            await asyncio.shield(step.committed)

    async def _contiguous(self, topic: str, p: int, after: int, records: list[Record],
                          report: BatchReport) -> list[Record]:
        """The records of ``topic[p]`` after offset ``after``, in order, none left out.

        A checkpoint must never pass an offset that was not decided. Faust does not
        promise that: after a rebalance it can hand over a partition's records with a
        hole (its fetch loop marks offsets it jumped over as done, and drops them when
        they arrive late). A hole is filled by reading that range of the log directly.
        """
        rs = sorted({r.offset: r for r in records if r.offset > after}.values(),
                    key=lambda r: r.offset)
        if not rs or rs[-1].offset - after == len(rs):
            return rs
        log.warning("input gap: reading the log directly",
                    extra={"topic": topic, "partition": p, "after": after,
                           "first_given": rs[0].offset, "last_given": rs[-1].offset,
                           "given": len(rs)})
        self.phase = f"fill a gap in {topic}[{p}]"
        report.gaps_filled += 1
        return await self._read(topic, p, after + 1, rs[-1].offset)

    def _decide(self, p: int, view: PartitionView, inp: PartitionInput) -> _Work | None:
        """Decide one partition's inputs, each list contiguous and after the checkpoint."""
        ck = view.checkpoint
        legs, cmds = inp.legs, inp.commands
        if not legs and not cmds:
            return None
        bp = BatchProcessor(view.reads.get, lambda start: view.db.keys(from_key=start), p,
                            self.s.partitions, self.signer, window_ms=self.s.idempotency_window_ms,
                            max_record_bytes=self.s.max_record_bytes,
                            max_skew_ms=self.s.max_skew_s * 1000,
                            transaction_timeout_ms=self.s.transaction_timeout_s * 1000)
        for r in legs:
            bp.leg_record(r.key, r.value, self.s.transfers_topic, r.offset, r.timestamp)
        for r in cmds:
            bp.command_record(r.key, r.value, self.s.commands_topic, r.offset, r.timestamp)
        tag = (cmds[-1].offset if cmds else ck.commands, legs[-1].offset if legs else ck.transfers)
        return _Work(p, view, bp, tag)

    async def _commit(self, work: list[_Work], step: Step | None = None) -> float:
        changelog = self.s.changelog_topic
        flush_ms = 0.0
        if step is None or not step.intent_sent:
            self._send([(changelog, w.partition, CHECKPOINT_KEY, _intent(w).encode(), None)
                        for w in work])
            flush_ms = await self._flush("checkpoint intent")
            self.crash.reached("intent")
        outputs: list[_Out] = []
        for w in work:
            for out in w.processor.outputs:
                partition = w.partition
                if out.kind in (TRANSFERS, REJECTIONS) and out.key:
                    partition = partition_for(out.key.decode(), self.s.partitions)
                outputs.append((self._topics[out.kind], partition, out.key, out.value,
                                out.headers))
        if self.crash.armed("outputs-half"):
            half, outputs = outputs[:len(outputs) // 2], outputs[len(outputs) // 2:]
            self._send(half)
            await self._flush("outputs")
            self.crash.reached("outputs-half")
        self._send(outputs)
        flush_ms += await self._flush("outputs")
        self.crash.reached("outputs")
        self._changelog_offsets.clear()
        state, staged = self._state_records(work)
        if self.crash.armed("state-half"):
            half, state = state[:len(state) // 2], state[len(state) // 2:]
            self._send(half)
            await self._flush("state")
            self.crash.reached("state-half")
        # The next step, if it is decided already, sends its intent with this state: it
        # saves that step a flush. Where both steps have a partition, RocksDB gets the
        # intent as its checkpoint, as the changelog has it last (Faust's persisted
        # offset then lies past it, and a restart must still find it pending).
        following = self._uncommitted[1] if step is not None and \
            len(self._uncommitted) > 1 else None
        intents: dict[int, Checkpoint] = {}
        if following is not None:
            for w in following.work:
                intents[w.partition] = _intent(w)
                state.append((changelog, w.partition, CHECKPOINT_KEY,
                              intents[w.partition].encode(), None))
        self._send(state)
        flush_ms += await self._flush("state")
        if following is not None:
            following.intent_sent = True
        self.crash.reached("state")
        for w, records, done in staged:
            wb = WriteBatch(raw_mode=True)
            for key, value in records.items():
                if value is None:
                    wb.delete(key)
                else:
                    wb.put(key, value)
            wb.put(CHECKPOINT_KEY, intents.get(w.partition, done).encode())
            wb.put(FAUST_OFFSET_KEY, str(self._changelog_offsets[w.partition]).encode())
            w.view.db.write(wb)
        self.crash.reached("stored")
        return flush_ms

    def _state_records(self, work: list[_Work]) -> tuple[
            list[_Out], list[tuple[_Work, dict[bytes, bytes | None], Checkpoint]]]:
        """A step's changelog records, and per partition its store records and advanced
        checkpoint. RocksDB gets every store record; the changelog gets the step's
        outcome records packed in one record (``processor.outcome_log_key``)."""
        changelog = self.s.changelog_topic
        state: list[_Out] = []
        staged = []
        for w in work:
            records = w.view.changes_to_records(w.changes, w.tag)
            done = w.view.checkpoint.advanced(*w.tag)
            outcomes: list[tuple[bytes, bytes | None]] = []
            for key, value in records.items():
                if key[:1] == OUTCOME_PREFIX:
                    outcomes.append((key, value))
                else:
                    state.append((changelog, w.partition, key, value, None))
            if outcomes:
                state.append((changelog, w.partition, outcome_log_key(w.tag),
                              wrap(w.tag, None, pack_records(outcomes)), None))
            state.append((changelog, w.partition, CHECKPOINT_KEY, done.encode(), None))
            staged.append((w, records, done))
        return state, staged

    async def _resolve_pending(self, p: int, view: PartitionView, report: BatchReport) -> None:
        """Finish a batch a crashed worker left half-done: same inputs, same order."""
        ck = view.checkpoint
        assert ck.pending is not None
        last_cmd, last_leg = ck.pending
        log.warning("partition %d: resuming an unfinished batch (commands %d..%d, legs %d..%d)",
                    p, ck.commands + 1, last_cmd, ck.transfers + 1, last_leg)
        self.phase = f"resolve pending batch of partition {p}"
        self._resident.pop(p, None)
        inp = PartitionInput(
            commands=await self._read(self.s.commands_topic, p, ck.commands + 1, last_cmd),
            legs=await self._read(self.s.transfers_topic, p, ck.transfers + 1, last_leg),
        )
        committed = PartitionView(view.db, replace(ck, pending=None))
        w = self._decide(p, committed, inp)
        if w is None:  # nothing was in the range after all
            raise DeliveryFailed(f"partition {p}: pending batch {ck.pending} has no inputs")
        w.tag = ck.pending
        w.changes = w.processor.finish(w.tag)
        self.crash.prefix = "resolve/"
        try:
            await self._commit([w])
        finally:
            self.crash.prefix = ""
        report.resolved_pending += 1

    async def _read(self, topic: str, partition: int, first: int, last: int) -> list[Record]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._fetch, topic, partition, first, last)

    def _fetch(self, topic: str, partition: int, first: int, last: int) -> list[Record]:
        """Read offsets first..last of one partition directly (no group, no commits)."""
        if last < first:
            return []
        consumer = Consumer({**self.s.kafka_config(), "group.id": f"ledger-resolve-{uuid.uuid4()}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        try:
            consumer.assign([TopicPartition(topic, partition, first)])
            out: list[Record] = []
            deadline = time.monotonic() + self.s.flush_timeout_s
            while time.monotonic() < deadline:
                for m in consumer.consume(1000, timeout=0.5):
                    offset = m.offset()
                    if m.error() is not None or offset is None:
                        continue
                    if first <= offset <= last:
                        out.append(Record(m.key(), m.value(), offset, m.timestamp()[1]))
                    if offset >= last:
                        return out
            raise DeliveryFailed(f"{topic}[{partition}]: could not read {first}..{last}")
        finally:
            consumer.close()

    def submit_commands(self, partition: int, commands: Sequence[CommandBase]) -> None:
        """Put commands the ledger issues itself (hold expiries) on the command log."""
        self._produce(self.s.commands_topic, None, encode_batch(commands), partition)
        self.producer.poll(0)

    def close(self) -> None:
        self.producer.flush(self.s.flush_timeout_s)


def _intent(w: _Work) -> Checkpoint:
    """The checkpoint that says a step's outputs for ``w`` may be partly out."""
    return replace(w.view.checkpoint, pending=w.tag)


def _merge(into: Stats, s: Stats) -> None:
    for name in ("commands", "events", "rejections", "legs", "dead_letters", "replays"):
        setattr(into, name, getattr(into, name) + getattr(s, name))
    into.issued_at.extend(s.issued_at)
    for d_into, d in ((into.reasons, s.reasons), (into.types, s.types)):
        for k, v in d.items():
            d_into[k] = d_into.get(k, 0) + v
