"""The Python client: ``submit(command)`` returns a future of the command's outcome.

    from producers.client import LedgerClient
    with LedgerClient(settings) as client:
        outcome = client.submit(Deposit(...)).result(timeout=10)
        outcome.accepted, outcome.events, outcome.rejection

Concurrent submits are coalesced per partition into one ``ledger.commands`` record
(a short linger, bounded count and bytes; a lone submit is a batch of one), as the
worker decides a record of N commands in one step. Commands are checked with the
ledger's static rules first, so an invalid one is refused before it is sent. The
outcome (the event, or the rejection with its reason) is matched by ``command_id``
on ``ledger.events`` / ``ledger.rejections``; a retry must reuse the same command,
and gets the first outcome again.

With ``wait_outcomes=False`` (bulk loading) the future resolves once the broker has
acknowledged the command's record, to an ``Outcome`` with no events that says where
the record is (``partition``, ``offset`` on ``ledger.commands``), or fails with
``DeliveryError``: nothing is reported as sent that was not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from schemas.codec import CODEC, DecodeError
from schemas.models import CommandBase, LedgerEvent, Rejection, Transfer, encode_batch
from streams.acl import check_login
from streams.domain import Refused, check_command
from streams.processor import partition_for
from streams.settings import Settings

log = logging.getLogger("ledger.client")

# Event types that end a transfer (record names as Avro reads them).
_SETTLED = frozenset({"ledger.TransferCredited", "ledger.TransferReversed"})


class CommandRefused(ValueError):
    """The command breaks a rule that needs no state; it was not sent."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeliveryError(RuntimeError):
    """The broker did not take the command (not sent, or not acknowledged)."""


@dataclass
class Outcome:
    command_id: str
    events: list[LedgerEvent] = field(default_factory=list)
    rejection: Rejection | None = None
    # where the command's record is on ledger.commands (set with wait_outcomes=False)
    partition: int | None = None
    offset: int | None = None

    @property
    def accepted(self) -> bool:
        return self.rejection is None

    @property
    def reason(self) -> str | None:
        return None if self.rejection is None else self.rejection.reason


def _high_watermark(consumer: Consumer, tp: TopicPartition, deadline: float) -> int:
    """The partition's end offset; retries while a new topic's leader is being elected."""
    while True:
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10)[1])
        except KafkaException as exc:
            # NOT_LEADER and friends are not flagged retriable, yet pass in a moment.
            if time.monotonic() > deadline:
                raise DeliveryError(f"cannot read the end of {tp.topic}[{tp.partition}]: "
                                    f"{exc.args[0].str()}") from exc
            time.sleep(0.1)


class LedgerClient:
    def __init__(self, settings: Settings, *, linger_ms: float = 2.0,
                 max_batch_commands: int = 1000, max_batch_bytes: int = 512 * 1024,
                 wait_outcomes: bool = True) -> None:
        self.s = settings
        check_login(settings)  # a wrong password raises AuthenticationFailed here, not a hang
        if settings.schema_registry_url:
            CODEC.use_registry(settings.schema_registry_url)
        self.linger_s = linger_ms / 1000
        self.max_batch_commands = max_batch_commands
        self.max_batch_bytes = max_batch_bytes
        self.producer = Producer(settings.producer_config(**{"linger.ms": 1}))
        self._lock = threading.Lock()
        self._queued: dict[int, list[CommandBase]] = defaultdict(list)
        self._in_hand = 0  # commands taken off the queue, not yet handed to librdkafka
        self._wake = threading.Event()
        self._waiting: dict[str, Future[Outcome]] = {}
        self._settling: dict[str, Future[Outcome]] = {}
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._send_loop, name="ledger-send",
                                          daemon=True)]
        self._consumer: Consumer | None = None
        if wait_outcomes:
            self._consumer = self._outcome_consumer()
            self._threads.append(threading.Thread(target=self._outcome_loop,
                                                  name="ledger-outcomes", daemon=True))
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ submitting

    def submit(self, command: CommandBase) -> Future[Outcome]:
        """Queue a command; the future resolves to its Outcome (or a DeliveryError).

        For a Transfer the future also has ``.settlement``: a future of the transfer's
        final outcome, the destination's TransferCredited or the source's
        TransferReversed (or the rejection, if the source refused it).
        """
        try:
            check_command(command)
        except Refused as r:
            raise CommandRefused(r.reason.value, r.detail) from None
        fut: Future[Outcome] = Future()
        p = partition_for(command.account_id, self.s.partitions)
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("client is closed")
            self._waiting[command.command_id] = fut
            if self._consumer is not None and isinstance(command, Transfer):
                settlement: Future[Outcome] = Future()
                fut.settlement = settlement  # type: ignore[attr-defined]
                self._settling[command.command_id] = settlement
            self._queued[p].append(command)
        self._wake.set()
        return fut

    def _send_loop(self) -> None:
        while not self._closed.is_set() or self._queued:
            self._wake.wait(0.1)
            self._wake.clear()
            time.sleep(self.linger_s)  # let concurrent submits join the batch
            with self._lock:
                queued, self._queued = self._queued, defaultdict(list)
                self._in_hand = sum(map(len, queued.values()))
            for p, commands in queued.items():
                for chunk in self._chunks(commands):
                    self._produce(p, chunk)
            with self._lock:
                self._in_hand = 0
            self.producer.poll(0)
            if self._closed.is_set() and not self._queued:
                break

    def _chunks(self, commands: list[CommandBase]) -> list[list[CommandBase]]:
        out: list[list[CommandBase]] = [[]]
        size = 0
        for c in commands:
            approx = 100 + sum(len(v) for v in c.__dict__.values() if isinstance(v, str))
            if out[-1] and (len(out[-1]) >= self.max_batch_commands
                            or size + approx > self.max_batch_bytes):
                out.append([])
                size = 0
            out[-1].append(c)
            size += approx
        return out

    def _produce(self, partition: int, commands: list[CommandBase]) -> None:
        ids = [c.command_id for c in commands]

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self._fail(ids, DeliveryError(f"command record not delivered: {err.str()}"))
            elif self._consumer is None:  # nothing else will resolve these
                for cid, f in self._take(ids):
                    f.set_result(Outcome(cid, partition=msg.partition(), offset=msg.offset()))

        while True:
            try:
                self.producer.produce(self.s.commands_topic, encode_batch(commands), None,
                                      partition=partition, on_delivery=delivered)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _take(self, ids: list[str]) -> list[tuple[str, Future[Outcome]]]:
        """The futures still waiting for these commands, no longer waiting."""
        with self._lock:
            futs = [(i, self._waiting.pop(i, None)) for i in ids]
        return [(i, f) for i, f in futs if f is not None and not f.done()]

    def _fail(self, ids: list[str], exc: Exception) -> None:
        for _, f in self._take(ids):
            f.set_exception(exc)

    # ------------------------------------------------------------ outcomes

    def _outcome_consumer(self) -> Consumer:
        # A fetch returns as soon as an outcome lands (fetch.min.bytes=1), so a long
        # fetch.wait.max.ms costs no latency; a short one (10 ms) kept the broker
        # answering empty fetches for 24 partitions all the time: 0.4 of a core here.
        consumer = Consumer({**self.s.kafka_config(), "group.id": "ledger-client-unused",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 500,
                             "fetch.min.bytes": 1})
        # Start at the current end of every partition, resolved now: an outcome
        # produced between this call and the first fetch must not be missed.
        deadline = time.monotonic() + 30
        tps = []
        for topic in (self.s.events_topic, self.s.rejections_topic):
            for p in range(self.s.partitions):
                high = _high_watermark(consumer, TopicPartition(topic, p), deadline)
                tps.append(TopicPartition(topic, p, high if high >= 0 else OFFSET_END))
        consumer.assign(tps)
        return consumer

    def _outcome_loop(self) -> None:
        assert self._consumer is not None
        while not self._closed.is_set():
            # consume(n, timeout) waits for n records or the whole timeout: take the
            # first record as soon as it lands, then whatever else is already here.
            first = self._consumer.poll(0.1)
            if first is None:
                continue
            for m in [first, *self._consumer.consume(1000, timeout=0)]:
                if m.error() is not None or not (self._waiting or self._settling):
                    continue
                try:
                    name, datum = CODEC.decode(m.value() or b"")
                except DecodeError:
                    continue
                if name == LedgerEvent.avro_name:
                    cid = datum["command_id"]
                    final = datum["payload"][0] in _SETTLED and cid in self._settling
                    if cid in self._waiting or final:
                        outcome = Outcome(cid, events=[LedgerEvent.from_avro(datum)])
                        self._resolve(self._settling if final else self._waiting, cid, outcome)
                elif name == Rejection.avro_name:
                    cid = datum["command_id"]
                    if cid in self._waiting:
                        outcome = Outcome(cid, rejection=Rejection.from_avro(datum))
                        self._resolve(self._waiting, cid, outcome)
                        self._resolve(self._settling, cid, outcome)

    def _resolve(self, futures: dict[str, Future[Outcome]], command_id: str,
                 outcome: Outcome) -> None:
        with self._lock:
            fut = futures.pop(command_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    # ------------------------------------------------------------ lifecycle

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued command is acknowledged by the broker."""
        deadline = time.monotonic() + timeout_s
        while (self._queued or self._in_hand) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.005)
        left = self.producer.flush(max(0.0, deadline - time.monotonic()))
        if left:
            raise DeliveryError(f"{left} command record(s) not acknowledged in {timeout_s}s")

    def close(self) -> None:
        self._wake.set()
        self._closed.set()
        self._threads[0].join(10)
        self.producer.flush(10)
        del self.producer  # destroys the librdkafka instance: no reconnect noise after close
        for t in self._threads[1:]:
            t.join(5)
        if self._consumer is not None:
            self._consumer.close()
        closed = RuntimeError("client closed before the outcome")
        self._fail(list(self._waiting), closed)
        for f in self._settling.values():
            if not f.done():
                f.set_exception(closed)

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
