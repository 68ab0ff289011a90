"""Each account's events, indexed beside the worker that owns its partition.

The worker's HTTP API pages through an account's events and answers "the account
as of an instant" from here. It is derived and local. A child process of the worker
(``Indexer``) runs a plain confluent-kafka consumer, *assigned* (no group, no
commits) the partitions of ``ledger.events`` whose numbers match the worker's command
partitions, and copies each event record into a RocksDB at ``<data_dir>/history``. The
worker (``History``) reads that RocksDB as a secondary instance, catching up with the
child's writes before each read. It never touches the accounts table or its
changelog, and the hot path knows nothing of it: in its own process the index takes
no share of the worker's interpreter lock.

Store keys (bytes):

- ``<account_id> \\0 <version: 8 bytes BE>`` -> the event record as it was on the
  topic (ids have no control characters, so the NUL ends the id and an account's
  keys sort by version); a duplicate of an event on the topic is the same key
  with the same bytes, so it is kept once;
- ``\\0next\\0 <partition: 4 bytes BE>`` -> the next offset to read, written in the
  same WriteBatch as the events before it: a restart resumes there.

``occurred_at`` never decreases along an account's versions, so ``as_of`` is a
binary search over versions.

    history = History(settings); history.start()   # starts the indexing process
    history.follow({0, 3, 7})          # the partitions this worker owns, on each change
    history.events("alice", 1, 100)    # -> up to 100 LedgerEvents from version 1
    history.as_of("alice", at_ms)      # -> LedgerEvent | None
    history.since("alice", at_ms, 100)  # -> up to 100 from its first event at or after at_ms
    history.matching("alice", 1, 100, [("order", "o-1")], 10_000)
        # -> (up to 100 with metadata order=o-1 among 10,000 from version 1, where to go on)
    history.stop()
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import struct
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from rocksdict import AccessType, Options, Rdict, WriteBatch

from schemas.codec import CODEC, HEADER_LEN, MAGIC, DecodeError, read_long
from schemas.models import LedgerEvent
from streams import logs
from streams.exits import die_with_parent
from streams.settings import Settings
from streams.worker.store import within_budget

log = logging.getLogger("ledger.history")

_VERSION = struct.Struct(">Q")
_OFFSET = struct.Struct(">q")
_NEXT_PREFIX = b"\0next\0"
_EVENT_HEADER = MAGIC + CODEC.current[LedgerEvent.avro_name].fingerprint
_BATCH_RECORDS = 2000  # records taken from the consumer per WriteBatch
_MAX_VERSION = (1 << 63) - 1

Flags = Any  # a shared multiprocessing.RawArray of bytes ("b"), one per partition


class Stop(Protocol):
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


def event_key(account_id: str, version: int) -> bytes:
    return account_id.encode() + b"\0" + _VERSION.pack(version)


def _next_key(partition: int) -> bytes:
    return _NEXT_PREFIX + struct.pack(">I", partition)


def _key_of(raw: bytes) -> bytes | None:
    """The store key of an event record, or None if it is not one."""
    if raw.startswith(_EVENT_HEADER):
        # Every version of LedgerEvent starts with event_id, account_id, version.
        try:
            n, i = read_long(raw, HEADER_LEN)
            n, i = read_long(raw, i + n)
            account = raw[i:i + n]
            version, _ = read_long(raw, i + n)
        except IndexError:
            return None
        return account + b"\0" + _VERSION.pack(version) if 0 <= version <= _MAX_VERSION \
            else None
    try:  # an older schema version, or the registry's framing
        _, d = CODEC.decode(raw, expect=LedgerEvent.avro_name)
    except DecodeError:
        return None
    return event_key(str(d["account_id"]), int(d["version"]))


def _decode(raw: bytes) -> LedgerEvent:
    return LedgerEvent.from_avro(CODEC.decode(raw, expect=LedgerEvent.avro_name)[1])


class Indexer:
    """The indexing side, in its own process (see ``History.start``): follows the
    partitions ``wanted`` marks and marks in ``caught`` each one read to its end."""

    def __init__(self, settings: Settings, path: Path, wanted: Flags, caught: Flags) -> None:
        self.s = settings
        self._wanted, self._caught = wanted, caught
        self._db = Rdict(str(path), within_budget(Options(raw_mode=True)))

    def close(self) -> None:
        self._db.close()

    def run(self, stop: Stop) -> None:
        # A failure here costs the history endpoints (503 until it is back), never the
        # worker: log it and start over from the stored offsets.
        while not stop.is_set():
            try:
                self._follow(stop)
            except Exception:
                log.exception("history indexing failed; restarting in 5 s")
                self._caught[:] = bytes(len(self._caught))
                stop.wait(5)

    def _next_offset(self, partition: int) -> int:
        raw = self._db.get(_next_key(partition))
        return OFFSET_BEGINNING if raw is None else int(_OFFSET.unpack(raw)[0])

    def _follow(self, stop: Stop) -> None:
        consumer = Consumer({
            **self.s.kafka_config(),
            "group.id": f"{self.s.app_id}-history-unused",  # assigned, never joins
            "client.id": f"ledger-history-{socket.gethostname()}-{os.getpid()}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        })
        topic = self.s.events_topic
        assigned: frozenset[int] = frozenset()
        try:
            while not stop.is_set():
                wanted = frozenset(p for p, w in enumerate(self._wanted) if w)
                if wanted != assigned:
                    gone, new = assigned - wanted, wanted - assigned
                    if gone:
                        consumer.incremental_unassign([TopicPartition(topic, p) for p in gone])
                    if new:
                        consumer.incremental_assign(
                            [TopicPartition(topic, p, self._next_offset(p)) for p in new])
                    assigned = wanted
                    log.info("history follows", extra={"topic": topic,
                                                        "partitions": sorted(assigned)})
                if not assigned:
                    stop.wait(0.2)
                    continue
                self._index(consumer.consume(_BATCH_RECORDS, timeout=0.2), assigned)
        finally:
            consumer.close()

    def _index(self, messages: list[Message], assigned: frozenset[int]) -> None:
        batch = WriteBatch(raw_mode=True)
        next_offsets: dict[int, int] = {}
        for m in messages:
            p = m.partition()
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if p in assigned and self._wanted[p]:
                        self._caught[p] = 1
                elif err.fatal():
                    raise KafkaException(err)
                else:
                    log.warning("history consumer error", extra={"error": err.str()})
                continue
            if p not in assigned:
                continue
            raw: bytes = m.value() or b""
            key = _key_of(raw)
            if key is not None:
                batch.put(key, raw)
            next_offsets[p] = (m.offset() or 0) + 1
        for p, offset in next_offsets.items():
            batch.put(_next_key(p), _OFFSET.pack(offset))
        if next_offsets:
            self._db.write(batch)


def _index_forever(settings: Settings, path: Path, wanted: Flags, caught: Flags,
                   stop: Stop, level: int, parent: int) -> None:
    """The indexing process: until ``stop`` is set or the worker (``parent``) is gone."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the worker's to handle
    logs.setup(logging.getLevelName(level))
    indexer = Indexer(settings, path, wanted, caught)
    try:
        indexer.run(stop)
    finally:
        indexer.close()


class History:
    """The events of the partitions this worker follows, by account and version."""

    RESTART_AFTER_S = 5.0  # the least time between two starts of the indexing process

    def __init__(self, settings: Settings, path: Path | None = None) -> None:
        self.s = settings
        self.path = path if path is not None else settings.data_dir / "history"
        self.path.mkdir(parents=True, exist_ok=True)
        self._ctx = multiprocessing.get_context("spawn")
        # Shared with the indexing process: per partition, 1 if followed; 1 if read to
        # its end since it was last followed (the worker only ever clears these).
        self.wanted: Flags = self._ctx.RawArray("b", settings.partitions)
        self.caught: Flags = self._ctx.RawArray("b", settings.partitions)
        self._stop = self._ctx.Event()
        self._proc: BaseProcess | None = None
        self._started_at = 0.0
        self._db: Rdict | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the indexing process (again, if it has died)."""
        self.caught[:] = bytes(len(self.caught))
        self._started_at = time.monotonic()
        self._proc = self._ctx.Process(
            target=_index_forever, name="ledger-history", daemon=True,
            args=(self.s, self.path, self.wanted, self.caught, self._stop,
                  logging.getLogger().getEffectiveLevel(), os.getpid()))
        self._proc.start()

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if self._db is not None:
            self._db.close()

    def follow(self, partitions: set[int]) -> None:
        """Read these partitions of the events topic (and no others) from now on."""
        proc = self._proc
        if proc is not None and not proc.is_alive() and not self._stop.is_set() \
                and time.monotonic() - self._started_at >= self.RESTART_AFTER_S:
            log.error("the history index process exited; starting it again",
                      extra={"exitcode": proc.exitcode})
            self.start()
        for p in range(len(self.wanted)):
            want = int(p in partitions)
            if want != self.wanted[p]:
                self.caught[p] = 0
                self.wanted[p] = want

    def caught_up(self, partition: int) -> bool:
        """Whether the index holds the partition's events up to its end, as of some moment
        since it was last followed here."""
        proc = self._proc
        return 0 <= partition < len(self.wanted) and proc is not None and proc.is_alive() \
            and bool(self.wanted[partition] and self.caught[partition])

    # ------------------------------------------------------------ reading

    def _reader(self) -> Rdict | None:
        """The index as the indexing process has written it so far (None: not yet made)."""
        if self._db is None:
            if not (self.path / "CURRENT").exists():
                return None
            options = within_budget(Options(raw_mode=True))
            options.set_max_open_files(-1)  # what a secondary instance needs
            self._db = Rdict(str(self.path), options, access_type=AccessType.secondary(
                str(self.path.with_name(self.path.name + "-reader"))))
        self._db.try_catch_up_with_primary()
        return self._db

    def events(self, account_id: str, from_version: int, limit: int) -> list[LedgerEvent]:
        """Up to ``limit`` events of the account from ``from_version`` on, in version order."""
        db = self._reader()
        if db is None:
            return []
        prefix = account_id.encode() + b"\0"
        out: list[LedgerEvent] = []
        it = db.iter()
        it.seek(prefix + _VERSION.pack(from_version))
        while it.valid() and len(out) < limit:
            key: bytes = it.key()
            if len(key) != len(prefix) + _VERSION.size or not key.startswith(prefix):
                break
            out.append(_decode(it.value()))
            it.next()
        return out

    def since(self, account_id: str, at_ms: int, limit: int) -> list[LedgerEvent]:
        """Up to ``limit`` events of the account from its first with ``occurred_at >= at_ms``."""
        before = self.as_of(account_id, at_ms - 1)
        return self.events(account_id, (before.version if before else 0) + 1, limit)

    def matching(self, account_id: str, from_version: int, limit: int,
                 meta: list[tuple[str, str]], scan: int) -> tuple[list[LedgerEvent], int | None]:
        """Up to ``limit`` events whose metadata holds every ``(key, value)`` of ``meta``,
        among the account's next ``scan`` events from ``from_version``; and the version the
        next look goes on from (None: no event of the account is left to look at)."""
        db = self._reader()
        if db is None:
            return [], None
        prefix = account_id.encode() + b"\0"
        # A record without the text of each key and value cannot match: not decoded.
        needles = [t.encode() for pair in meta for t in pair]
        out: list[LedgerEvent] = []
        it = db.iter()
        it.seek(prefix + _VERSION.pack(from_version))
        while it.valid():
            key: bytes = it.key()
            if len(key) != len(prefix) + _VERSION.size or not key.startswith(prefix):
                break
            if len(out) >= limit or scan <= 0:
                return out, int(_VERSION.unpack_from(key, len(prefix))[0])
            scan -= 1
            raw: bytes = it.value()
            if all(n in raw for n in needles):
                e = _decode(raw)
                if all(e.metadata.get(k) == v for k, v in meta):
                    out.append(e)
            it.next()
        return out, None

    def exists(self, account_id: str) -> bool:
        return bool(self.events(account_id, 0, 1))

    def as_of(self, account_id: str, at_ms: int) -> LedgerEvent | None:
        """The account's last event with ``occurred_at <= at_ms`` (None: none by then)."""
        db = self._reader()
        if db is None:
            return None
        prefix = account_id.encode() + b"\0"
        it = db.iter()

        def first_from(version: int) -> LedgerEvent | None:
            it.seek(prefix + _VERSION.pack(version))
            if not it.valid():
                return None
            key: bytes = it.key()
            if len(key) != len(prefix) + _VERSION.size or not key.startswith(prefix):
                return None
            return _decode(it.value())

        it.seek_for_prev(prefix + b"\xff" * _VERSION.size)
        if not it.valid() or not it.key().startswith(prefix):
            return None
        # Largest version whose event happened by at_ms: occurred_at never decreases
        # along versions, and a missing version is read as the next one stored.
        lo, hi = 0, _VERSION.unpack_from(it.key(), len(prefix))[0]
        best: LedgerEvent | None = None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ev = first_from(mid)
            if ev is not None and ev.occurred_at <= at_ms:
                lo, best = ev.version, ev
            else:
                hi = mid - 1
        return best
