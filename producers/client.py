"""The Python client: ``submit(command)`` returns a future of the command's outcome.

    from producers.client import LedgerClient
    with LedgerClient(settings) as client:
        outcome = client.submit(Deposit(...)).result(timeout=10)
        outcome.accepted, outcome.events, outcome.rejection

Concurrent submits are coalesced per partition into one ``ledger.commands`` record
(a short linger, bounded count and bytes; a lone submit is a batch of one), as the
worker decides a record of N commands in one step. Commands are checked with the
ledger's static rules first, so an invalid one is refused before it is sent. The
outcome (the event, or the rejection with its reason) is matched by account,
``command_id`` and type on ``ledger.events`` / ``ledger.rejections`` (ids are scoped
per account: the same id on two accounts is two commands); a retry must reuse the
same command, and gets the first outcome again. The client reads only the
partitions of the accounts it submitted to (and of transfers' destinations).

At most ``max_in_flight`` commands are queued or waiting for their outcome at once:
past that ``submit`` waits for room, up to ``block_s``, then raises ``QueueFull``.

With ``wait_outcomes=False`` (bulk loading) the future resolves once the broker has
acknowledged the command's record, to an ``Outcome`` with no events that says where
the record is (``partition``, ``offset`` on ``ledger.commands``), or fails with
``DeliveryError``: nothing is reported as sent that was not.
"""

from __future__ import annotations

import logging
import queue
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
from confluent_kafka.admin import AdminClient

from schemas.codec import CODEC, DecodeError
from schemas.models import (
    CommandBase,
    LedgerEvent,
    Rejection,
    Reverse,
    Transaction,
    Transfer,
    encode_batch,
)
from streams.domain import Refused, check_command
from streams.ops.acl import check_login
from streams.ops.topics import end_offsets_when_ready
from streams.partitions import partition_for
from streams.settings import Settings

log = logging.getLogger("ledger.client")

# The event each command type makes (record names as Avro reads them).
_EVENT_OF = {
    "OpenAccount": "ledger.AccountOpened", "Deposit": "ledger.Deposited",
    "Withdraw": "ledger.Withdrawn", "Transfer": "ledger.TransferDebited",
    "PlaceHold": "ledger.HoldPlaced", "CaptureHold": "ledger.HoldCaptured",
    "ReleaseHold": "ledger.HoldReleased", "ExpireHold": "ledger.HoldReleased",
    "CloseAccount": "ledger.AccountClosed", "Transaction": "ledger.TransactionStarted",
    "Reverse": "ledger.TransactionStarted", "ExpireTransaction": "ledger.TransactionRejected",
    "SetAccountMetadata": "ledger.AccountMetadataSet",
}
# How a transaction ends, at its coordinator.
_SETTLED = ("ledger.TransactionCommitted", "ledger.TransactionRejected")


class CommandRefused(ValueError):
    """The command breaks a rule that needs no state; it was not sent."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeliveryError(RuntimeError):
    """The broker did not take the command (not sent, or not acknowledged)."""


class QueueFull(DeliveryError):
    """``max_in_flight`` commands are queued or awaiting outcomes: this one was not sent."""


class _Waiting:
    """Futures of one account's command id (a retry submitted meanwhile waits too)."""

    __slots__ = ("command_type", "futures", "to_account_id")

    def __init__(self, command_type: str, future: Future[Outcome],
                 to_account_id: str | None = None) -> None:
        self.command_type = command_type
        self.futures = [future]
        self.to_account_id = to_account_id  # a transfer's destination, for its settlement


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


Key = tuple[str, str]  # (account_id, command_id)


class LedgerClient:
    def __init__(self, settings: Settings, *, linger_ms: float = 2.0,
                 max_batch_commands: int = 1000, max_batch_bytes: int = 512 * 1024,
                 max_in_flight: int = 100_000, wait_outcomes: bool = True) -> None:
        self.s = settings
        check_login(settings)  # a wrong password raises AuthenticationFailed here, not a hang
        if settings.schema_registry_url:
            CODEC.use_registry(settings.schema_registry_url)
        self.linger_s = linger_ms / 1000
        self.max_batch_commands = max_batch_commands
        self.max_batch_bytes = max_batch_bytes
        self.max_in_flight = max_in_flight
        self.producer = Producer(settings.producer_config(**{"linger.ms": 1}))
        self._lock = threading.Lock()
        # Commands in flight: counted under the lock, not with a semaphore and a done
        # callback per future (over a bulk load those were most of ``submit``'s time)
        self._in_flight = 0
        self._room = threading.Condition(self._lock)
        self._queued: dict[int, list[CommandBase]] = defaultdict(list)
        self._in_hand = 0  # commands taken off the queue, not yet handed to librdkafka
        self._wake = threading.Event()
        self._waiting: dict[Key, _Waiting] = {}
        self._settling: dict[Key, _Waiting] = {}  # transfers by source: their final outcome
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._send_loop, name="ledger-send",
                                          daemon=True)]
        self._consumer: Consumer | None = None
        self._admin: AdminClient | None = None  # asks the outcome partitions' ends
        self._reading: set[tuple[str, int]] = set()  # outcome partitions assigned so far
        self._assigning: queue.Queue[list[TopicPartition]] = queue.Queue()
        if wait_outcomes:
            self._consumer = Consumer({
                **settings.kafka_config(), "group.id": "ledger-client-unused",
                "enable.auto.commit": False, "fetch.min.bytes": 1,
                # A fetch returns as soon as an outcome lands, but a partition assigned
                # meanwhile joins the next fetch only: at 500 ms the first command to
                # each new partition waited that long (the client reads only the
                # partitions of accounts it submitted to); 100 ms, an empty fetch every
                # 100 ms when idle, as the worker's consumer does.
                "fetch.wait.max.ms": 100})
            self._admin = AdminClient(settings.kafka_config())
            self._threads.append(threading.Thread(target=self._outcome_loop,
                                                  name="ledger-outcomes", daemon=True))
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ submitting

    def submit(self, command: CommandBase, *, block_s: float = 30.0) -> Future[Outcome]:
        """Queue a command; the future resolves to its Outcome (or a DeliveryError).

        For a Transfer the future also has ``.settlement``: a future of the transfer's
        final outcome, the destination's TransferCredited or the source's
        TransferReversed (or the rejection, if the source refused it). For a Transaction
        or a Reverse, ``.settlement`` resolves when it ends: to the coordinator's
        TransactionCommitted, or to its TransactionRejected with ``rejection`` set (the
        reason; the event's ``posting_index`` names the posting), or to the command's
        own rejection.

        With ``max_in_flight`` commands unresolved, waits up to ``block_s`` for one to
        resolve, then raises ``QueueFull`` (the command is not sent).
        """
        try:
            check_command(command)
        except Refused as r:
            raise CommandRefused(r.reason.value, r.detail) from None
        if self._closed.is_set():
            raise RuntimeError("client is closed")
        fut: Future[Outcome] = Future()
        key = (command.account_id, command.command_id)
        p = partition_for(command.account_id, self.s.partitions)
        with self._lock:
            if self._in_flight >= self.max_in_flight and not self._room.wait_for(
                    lambda: self._in_flight < self.max_in_flight, max(block_s, 0.0)):
                raise QueueFull(f"{self.max_in_flight} commands already queued or awaiting "
                                f"their outcome; waited {block_s}s for room")
            if self._closed.is_set():
                raise RuntimeError("client is closed")
            self._in_flight += 1
            waiting = self._waiting.get(key)
            if waiting is None:
                self._waiting[key] = _Waiting(command.type, fut)
            else:
                waiting.futures.append(fut)
            if self._consumer is not None and isinstance(command, Transfer | Transaction
                                                          | Reverse):
                settlement: Future[Outcome] = Future()
                fut.settlement = settlement  # type: ignore[attr-defined]
                settling = self._settling.get(key)
                if settling is None:
                    self._settling[key] = _Waiting(
                        command.type, settlement,
                        command.to_account_id if isinstance(command, Transfer) else None)
                else:
                    settling.futures.append(settlement)
            self._queued[p].append(command)
        # The send thread clears this before it takes the queue: if it is set, the
        # command appended above goes out with the next take.
        if not self._wake.is_set():
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
                try:
                    self._read_outcomes_of(p, commands)
                except DeliveryError as exc:
                    self._fail([(c.account_id, c.command_id) for c in commands], exc)
                    continue
                for start in range(0, len(commands), self.max_batch_commands):
                    self._produce(p, commands[start:start + self.max_batch_commands])
            with self._lock:
                self._in_hand = 0
            self.producer.poll(0)
            if self._closed.is_set() and not self._queued:
                break

    def _read_outcomes_of(self, partition: int, commands: list[CommandBase]) -> None:
        """Start reading the partitions where these commands' outcomes will land, from
        their current ends, before the commands are sent (so none is missed)."""
        if self._consumer is None:
            return
        wanted = {(self.s.events_topic, partition), (self.s.rejections_topic, partition)}
        for c in commands:
            if isinstance(c, Transfer):  # its settlement: the destination's credit
                wanted.add((self.s.events_topic,
                            partition_for(c.to_account_id, self.s.partitions)))
        new = wanted - self._reading
        if not new:
            return
        # Their ends now, before the commands are sent: reading from there misses none.
        # The consumer is the outcome thread's (a call from another thread waits for its
        # poll, and can wait for ever behind the next one): it assigns them there, while
        # the commands go out.
        assert self._admin is not None
        # asked on the admin client's own connection: the consumer's would wait behind
        # its fetch in flight (up to fetch.wait.max.ms) for each
        try:
            ends = end_offsets_when_ready(self._admin, sorted(new), time.monotonic() + 30)
        except TimeoutError as exc:
            raise DeliveryError(f"cannot read outcomes: {exc}") from exc
        self._assigning.put([TopicPartition(t, p, high if high >= 0 else OFFSET_END)
                             for (t, p), high in sorted(ends.items())])
        self._reading |= new

    def _assign(self, tps: list[TopicPartition]) -> None:
        """On the outcome thread: start reading these partitions at these offsets."""
        assert self._consumer is not None
        try:
            self._consumer.incremental_assign(tps)
        except KafkaException as exc:  # a consumer that cannot read leaves no outcome
            log.error("cannot read outcomes: %s", exc)
            self._fail([*self._waiting, *self._settling],
                       DeliveryError(f"cannot read outcomes: {exc}"))

    def _produce(self, partition: int, commands: list[CommandBase]) -> None:
        """One record of ``commands`` (halved until each record is within
        ``max_batch_bytes``: commands are ~100 bytes, so that is rare)."""
        value = encode_batch(commands)
        if len(value) > self.max_batch_bytes and len(commands) > 1:
            half = len(commands) // 2
            self._produce(partition, commands[:half])
            self._produce(partition, commands[half:])
            return
        keys = [(c.account_id, c.command_id) for c in commands]

        def delivered(err: KafkaError | None, msg: Message) -> None:
            offset = msg.offset()
            if err is not None:
                self._fail(keys, DeliveryError(f"command record not delivered: {err.str()}"))
            elif offset is None or offset < 0:
                # The idempotent producer reports a batch it did not see acked as
                # delivered, without an offset, once a later batch of its partition is
                # acked ("implicit ack"): not proof that it is on the log. Sending the
                # same commands again is safe (their ids make them one command each).
                self._fail(keys, DeliveryError(
                    f"command record acknowledged without an offset ({offset}): not known "
                    "to be on the log; submit the same commands again"))
            elif self._consumer is None:  # nothing else will resolve these
                for key, f in self._take(self._waiting, keys):
                    f.set_result(Outcome(key[1], partition=msg.partition(),
                                         offset=msg.offset()))

        while True:
            try:
                self.producer.produce(self.s.commands_topic, value, None,
                                      partition=partition, on_delivery=delivered)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _take(self, table: dict[Key, _Waiting],
              keys: list[Key]) -> list[tuple[Key, Future[Outcome]]]:
        """The futures still waiting for these commands, no longer waiting."""
        with self._lock:
            taken = [(k, table.pop(k, None)) for k in keys]
            if table is self._waiting:
                left = sum(len(w.futures) for _, w in taken if w is not None)
                if left:
                    self._in_flight -= left
                    if self._in_flight + left >= self.max_in_flight:  # submits may wait
                        self._room.notify_all()
        return [(k, f) for k, w in taken if w is not None for f in w.futures if not f.done()]

    def _fail(self, keys: list[Key], exc: Exception) -> None:
        for table in (self._waiting, self._settling):
            for _, f in self._take(table, keys):
                f.set_exception(exc)

    # ------------------------------------------------------------ outcomes

    def _outcome_loop(self) -> None:
        assert self._consumer is not None
        while not self._closed.is_set():
            while not self._assigning.empty():
                self._assign(self._assigning.get())
            # consume(n, timeout) waits for n records or the whole timeout: take the
            # first record as soon as it lands, then whatever else is already here.
            first = self._consumer.poll(0.02)  # a command waits for its assignment
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
                    self._on_event(datum)
                elif name == Rejection.avro_name:
                    self._on_rejection(datum)

    def _on_event(self, datum: dict[str, Any]) -> None:
        account, cid, (kind, body) = datum["account_id"], datum["command_id"], datum["payload"]
        key = (account, cid)
        waiting = self._waiting.get(key)
        # the command's own event: caused by it (a leg's event has the leg's id there)
        if waiting is not None and datum["causation_id"] == cid \
                and _EVENT_OF.get(waiting.command_type) == kind:
            self._resolve(self._waiting, key, Outcome(cid, events=[LedgerEvent.from_avro(datum)]))
        if kind in _SETTLED:
            key = (account, body["transaction_id"])
            settling = self._settling.get(key)
            if settling is not None:
                event = LedgerEvent.from_avro(datum)
                self._resolve(self._settling, key, Outcome(key[1], events=[event], rejection=(
                    None if kind == _SETTLED[0] else Rejection.trusted(
                        command_id=key[1], account_id=account,
                        command_type=settling.command_type,
                        reason=body["reason"], detail=body["detail"],
                        occurred_at=event.occurred_at, correlation_id=event.correlation_id,
                        actor=event.actor))))
            return
        if kind == "ledger.TransferCredited":  # at the destination: key of the source
            key, to = (body["from_account_id"], body["transfer_id"]), account
        elif kind == "ledger.TransferReversed":
            key, to = (account, body["transfer_id"]), body["to_account_id"]
        else:
            return
        settling = self._settling.get(key)
        if settling is not None and settling.to_account_id == to and key[1] == cid:
            self._resolve(self._settling, key, Outcome(cid, events=[LedgerEvent.from_avro(datum)]))

    def _on_rejection(self, datum: dict[str, Any]) -> None:
        key = (datum["account_id"], datum["command_id"])
        waiting = self._waiting.get(key)
        if waiting is not None and waiting.command_type == datum["command_type"]:
            outcome = Outcome(key[1], rejection=Rejection.from_avro(datum))
            self._resolve(self._waiting, key, outcome)
            self._resolve(self._settling, key, outcome)
        elif datum["command_type"] == "TransferRefund" and datum["command_id"].endswith(
                ":refund"):  # a refund the source could not take: the transfer ends there
            key = (datum["account_id"], datum["command_id"][:-len(":refund")])
            if key in self._settling:
                self._resolve(self._settling, key,
                              Outcome(key[1], rejection=Rejection.from_avro(datum)))

    def _resolve(self, table: dict[Key, _Waiting], key: Key, outcome: Outcome) -> None:
        for _, fut in self._take(table, [key]):
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
        self._admin = None  # destroys it
        self._fail([*self._waiting, *self._settling],
                   RuntimeError("client closed before the outcome"))

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
