"""Read ``ledger.events`` as a consumer group: each ``(account_id, version)`` handed once.

For consumers of the ledger's events (fraud checks, analytics)::

    from producers.reader import EventReader
    with EventReader(settings, "fraud-checks", start="committed") as reader:
        reader.run(handle, stop=stop)  # handle(event: LedgerEvent) -> None

Records of any schema version, in either framing, are decoded into ``LedgerEvent``.
The worker may write an event twice (a byte-identical copy, after a crash); the
reader drops the copy. Offsets are committed only after ``handle`` has returned.
See ``EventReader`` for the exact guarantee.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from schemas.codec import CODEC, DecodeError
from schemas.models import LedgerEvent
from streams.settings import Settings

log = logging.getLogger("ledger.reader")

Start = Literal["committed", "earliest", "latest"] | int
Handler = Callable[[LedgerEvent], None]

# A commit refused because the group is rebalancing: the events are handled, and the
# partitions' next owner reads them again.
_COMMIT_LOST_CODES = frozenset({
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError.STALE_MEMBER_EPOCH, KafkaError.FENCED_MEMBER_EPOCH,
})


class EventReader:
    """A consumer of the events topic in group ``group_id``; call ``run(handle)``.

    ``start`` says where the partitions this reader is first assigned begin:
    ``"committed"`` (the group's committed offsets; the log start where there are
    none), ``"earliest"``, ``"latest"`` (the end offsets as of the constructor, so
    events written after it returns are read), or an epoch-millisecond timestamp
    (the first record whose Kafka timestamp, the time it was written, is at or after
    it; the end offset where there is none). A partition assigned again after a
    rebalance resumes from the group's committed offset. Members that join a running
    group should use ``"committed"``.

    The guarantee:

    - One reader hands each ``(account_id, version)`` at most once, and an
      account's events in version order. It remembers the highest version it
      handed per account (for ``max_accounts`` accounts, least recently handed
      forgotten first; copies follow their original closely) and drops any record
      at or below it. A version beyond the next one is handed, and logged as a gap.
    - Offsets are committed synchronously, only past records whose events ``handle``
      has returned from (or that were dropped): after each batch of at most
      ``batch_max_events`` records, and when ``run`` returns or raises. Nothing is
      committed past an event whose ``handle`` raised; it is handed again, to this
      reader's next ``run`` or to the group's next reader.
    - Across restarts with the same group, no event is lost (records that are not
      events are skipped, logged and counted in ``bad_records``). After ``run``
      returned or raised, the next reader starts on each partition right after the
      last record handled or dropped, and hands again only those events already
      handed that have a record (a copy) at or after that position: its memory
      starts empty. After a crash (kill -9) it also hands again the events handled
      since the last commit: at most ``batch_max_events``. The same holds when a
      commit is lost to a rebalance (logged), or when ``handle`` takes longer on one
      batch than ``max.poll.interval.ms`` (5 min) and the member is dropped.

    So the caller's handler is at-least-once across crashes; make it idempotent on
    ``(account_id, version)`` where a repeat after a crash matters.
    """

    def __init__(self, settings: Settings, group_id: str, *, start: Start = "committed",
                 batch_max_events: int = 500, poll_timeout_s: float = 0.5,
                 max_accounts: int = 1_000_000) -> None:
        if not (start in ("committed", "earliest", "latest")
                or (isinstance(start, int) and not isinstance(start, bool) and start >= 0)):
            raise ValueError(f"start must be 'committed', 'earliest', 'latest' or a "
                             f"timestamp in ms, not {start!r}")
        if not 1 <= batch_max_events <= 100_000:
            raise ValueError(f"batch_max_events must be 1..100000, not {batch_max_events}")
        if not 0 < poll_timeout_s <= 60:
            raise ValueError(f"poll_timeout_s must be in (0, 60], not {poll_timeout_s}")
        if max_accounts < 1:
            raise ValueError(f"max_accounts must be at least 1, not {max_accounts}")
        self.topic = settings.events_topic
        self.group_id = group_id
        self.batch_max_events = batch_max_events
        self.poll_timeout_s = poll_timeout_s
        self.max_accounts = max_accounts
        self.handed = 0  # events handed to a handler (that returned)
        self.duplicates = 0  # records dropped: version at or below one already handed
        self.gaps = 0  # events handed with versions missing before them
        self.bad_records = 0  # records that are not events, skipped
        self._versions: dict[str, int] = {}  # account -> highest version handed, LRU order
        self._started: set[int] = set()  # partitions this reader has been assigned
        self._assigned = False  # holds partitions now
        self._closed = False
        if settings.schema_registry_url and CODEC.registry_url != settings.schema_registry_url:
            CODEC.use_registry(settings.schema_registry_url)
        self._consumer = Consumer({
            **settings.kafka_config(),
            "group.id": group_id,
            "client.id": f"ledger-reader-{socket.gethostname()}-{os.getpid()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "session.timeout.ms": int(settings.session_timeout_s * 1000),
        })
        try:
            self._start_at = self._start_offsets(start)
            self._consumer.subscribe([self.topic], on_assign=self._on_assign,
                                     on_revoke=self._on_revoke)
        except BaseException:
            self._consumer.close()
            raise
        log.info("event reader started", extra={"group_id": group_id, "topic": self.topic,
                                                 "start": start})

    # ------------------------------------------------------------ where to start

    def _start_offsets(self, start: Start) -> dict[int, int] | None:
        """Partition -> first offset, resolved now (None: the committed offsets)."""
        if start == "committed":
            return None
        meta = self._consumer.list_topics(self.topic, timeout=10).topics[self.topic]
        if meta.error is not None:
            raise KafkaException(meta.error)
        parts = sorted(meta.partitions)
        if start == "earliest":
            return {p: OFFSET_BEGINNING for p in parts}
        ends = {p: int(self._consumer.get_watermark_offsets(
            TopicPartition(self.topic, p), timeout=10)[1]) for p in parts}
        if start == "latest":
            return ends
        assert isinstance(start, int)
        found = self._consumer.offsets_for_times(
            [TopicPartition(self.topic, p, start) for p in parts], timeout=10)
        out: dict[int, int] = {}
        for tp in found:
            if tp.error is not None:
                raise KafkaException(tp.error)
            out[tp.partition] = tp.offset if tp.offset >= 0 else ends[tp.partition]
        return out

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._start_at is not None:
            for tp in partitions:
                if tp.partition not in self._started and tp.partition in self._start_at:
                    tp.offset = self._start_at[tp.partition]
        self._started.update(tp.partition for tp in partitions)
        self._assigned = bool(partitions)
        log.info("partitions assigned", extra={
            "group_id": self.group_id, "topic": self.topic,
            "partitions": sorted(tp.partition for tp in partitions)})
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Nothing is in hand here: revocation happens inside consume(), and every
        # batch is committed before the next consume().
        self._assigned = False
        log.info("partitions revoked", extra={
            "group_id": self.group_id, "topic": self.topic,
            "partitions": sorted(tp.partition for tp in partitions)})

    # ------------------------------------------------------------ reading

    def run(self, handle: Handler, *, max_idle_s: float | None = None,
            stop: threading.Event | None = None) -> int:
        """Call ``handle(event)`` for each new event; return how many were handled.

        Returns when ``stop`` is set (checked before each event, and after each poll
        of at most ``poll_timeout_s``) or when the reader has held partitions for
        ``max_idle_s`` with no record arriving. Time spent joining the group does not
        count as idle (after a crash, the join waits out the dead member's session),
        so a reader that gets no partitions returns only on ``stop``. With neither,
        it runs until ``handle`` raises. What was handled is committed before it
        returns or re-raises.
        """
        handled_before = self.handed
        idle_since = time.monotonic()
        while not (stop is not None and stop.is_set()):
            msgs = self._consumer.consume(self.batch_max_events, timeout=self.poll_timeout_s)
            if not msgs:
                if not self._assigned:
                    idle_since = time.monotonic()
                elif max_idle_s is not None and time.monotonic() - idle_since >= max_idle_s:
                    break
                continue
            idle_since = time.monotonic()
            done: dict[int, int] = {}  # partition -> offset after the last record handled
            try:
                for m in msgs:
                    if stop is not None and stop.is_set():
                        break
                    if m.error() is not None:
                        self._message_error(m)
                        continue
                    p, off = m.partition(), m.offset()
                    assert p is not None and off is not None  # set on every record
                    event = self._new_event(m)
                    if event is not None:
                        handle(event)
                        self._remember(event)
                    done[p] = off + 1
            finally:
                self._commit(done)
                self._rewind(msgs, done)
        return self.handed - handled_before

    def _new_event(self, m: Message) -> LedgerEvent | None:
        """The record's event, or None if it is not an event or already handed."""
        try:
            _, datum = CODEC.decode(m.value() or b"", expect=LedgerEvent.avro_name)
        except DecodeError as exc:
            self.bad_records += 1
            log.warning("skipping a record that is not an event", extra={
                "topic": m.topic(), "partition": m.partition(), "offset": m.offset(),
                "error": str(exc), "error_code": exc.code})
            return None
        event = LedgerEvent.from_avro(datum)
        last = self._versions.get(event.account_id)
        if last is not None and event.version <= last:
            self.duplicates += 1
            log.debug("dropping an event already handed", extra={
                "account_id": event.account_id, "version": event.version,
                "partition": m.partition(), "offset": m.offset()})
            return None
        if last is not None and event.version != last + 1:
            self.gaps += 1
            log.warning("versions missing before this event", extra={
                "account_id": event.account_id, "version": event.version,
                "last_version": last, "partition": m.partition(), "offset": m.offset()})
        return event

    def _remember(self, event: LedgerEvent) -> None:
        self.handed += 1
        versions = self._versions
        versions.pop(event.account_id, None)  # re-insert: most recently handed last
        versions[event.account_id] = event.version
        if len(versions) > self.max_accounts:
            del versions[next(iter(versions))]

    def _message_error(self, m: Message) -> None:
        err = m.error()
        assert err is not None
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer error", extra={"topic": self.topic, "error": err.str()})

    def _commit(self, done: dict[int, int]) -> None:
        if not done:
            return
        offsets = [TopicPartition(self.topic, p, off) for p, off in sorted(done.items())]
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() not in _COMMIT_LOST_CODES:
                raise
            log.warning("offset commit lost to a rebalance; the next owner reads these "
                        "events again", extra={"group_id": self.group_id,
                                               "offsets": done, "error": exc.args[0].str()})
            return
        for tp in result or []:
            if tp.error is not None:
                log.warning("offset commit failed", extra={
                    "group_id": self.group_id, "partition": tp.partition,
                    "offset": tp.offset, "error": tp.error.str()})

    def _rewind(self, msgs: list[Message], done: dict[int, int]) -> None:
        """Seek back to the first record not handled (left by ``stop`` or a raise)."""
        first: dict[int, int] = {}
        for m in msgs:
            p, off = m.partition(), m.offset()
            if m.error() is None and p is not None and off is not None and p not in first \
                    and off >= done.get(p, -1):
                first[p] = off
        for p, off in first.items():
            try:
                self._consumer.seek(TopicPartition(self.topic, p, off))
            except KafkaException as exc:  # no longer assigned: the group's offset holds
                log.info("cannot seek back", extra={"partition": p, "offset": off,
                                                    "error": exc.args[0].str()})

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Leave the group; offsets of handled events are already committed."""
        if self._closed:
            return
        self._closed = True
        self._consumer.close()
        log.info("event reader closed", extra={
            "group_id": self.group_id, "handed": self.handed, "duplicates": self.duplicates,
            "gaps": self.gaps, "bad_records": self.bad_records})

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
