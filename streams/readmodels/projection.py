"""The balances read model: a plain consumer group folding ``ledger.events`` into RocksDB.

Not Faust: replay must fold hundreds of thousands of events a second, so the hot
loop reads the few fields it needs straight from the Avro bytes (``_FAST``) and
falls back to ``CODEC.decode`` for anything unusual (an older schema version, a
long id, an odd currency code).

Store keys (bytes, one RocksDB in ``settings.data_dir / "balances"``):

- ``b"b" + account_id`` -> the account now: ``_BALANCE`` (balance, available,
  version, updated_at, closed) followed by the currency code;
- ``b"h" + account_id + b"\\0" + occurred_at (8 bytes BE) + version (8 bytes BE)``
  -> the account after that event: version, currency, balance, available and
  occurred_at, Avro-encoded as in the event (the fold copies that slice of the
  event's bytes; ``_read_fields`` reads it). Ids have no control characters, so
  the NUL ends the id, and ``occurred_at`` never decreases per account: the keys
  of one account sort in time order and ``as_of`` is one backward seek.

Each ``(account, version)`` is applied once: a version at or below the stored one
is a duplicate or a replay and is skipped, the next version is applied, and a
version beyond the next is a gap (counted in ``gaps``, logged, not applied). A
batch is written in one WriteBatch before its offsets are committed
(synchronously), so a crash re-reads at most the last batch, which the version
check then skips.

Replay: ``reset_offsets`` moves the group (refusing while it has members) and
``replay`` rebuilds the store and compares it with ``streams.ops.verify`` (the fold of
the whole log).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from rocksdict import Options, Rdict, WriteBatch

from schemas.codec import (
    CODEC,
    CONFLUENT_HEADER_LEN,
    CONFLUENT_MAGIC,
    HEADER_LEN,
    MAGIC,
    DecodeError,
    read_long,
    write_long,
)
from schemas.models import AccountState, LedgerEvent
from streams.settings import Settings

log = logging.getLogger("ledger.projection")

Progress = Callable[[int, int], None]

# ---------------------------------------------------------------- encoding

_EVENT_FINGERPRINT = CODEC.current[LedgerEvent.avro_name].fingerprint
_EVENT_HEADER = MAGIC + _EVENT_FINGERPRINT
# After event_id and account_id: version (a varint), a 3-character currency
# (length 3 is the zigzag byte 0x06), balance_after and available_after (two
# varints) and occurred_at as a 6-byte varint (epoch ms from 1970-07 to 2039-09).
_FAST = re.compile(
    rb"[\x80-\xff]{0,9}+[\x00-\x7f]\x06...(?:[\x80-\xff]{0,9}+[\x00-\x7f]){2}"
    rb"[\x80-\xff]{5}[\x00-\x7f]",
    re.DOTALL,
)
_PAYLOADS = [t if isinstance(t, str) else t["name"] for t in next(
    f["type"] for f in CODEC.current[LedgerEvent.avro_name].parsed["fields"]
    if f["name"] == "payload")]
_ACCOUNT_CLOSED_INDEX = _PAYLOADS.index("ledger.AccountClosed")  # its branch of the union
_ACCOUNT_CLOSED_TAIL = _ACCOUNT_CLOSED_INDEX << 1  # its zigzag byte: an empty record ends there
_HISTORY_SUFFIX = struct.Struct(">QQ")  # occurred_at, version
# The whole history key of a short account id in one pack (ids below 64 bytes).
_HISTORY_KEYS = [struct.Struct(f">c{n}sxQQ") for n in range(64)]
_BALANCE = struct.Struct(">qqqq?")  # balance, available, version, updated_at, closed
_U64_MAX = (1 << 64) - 1
_VERSION_CACHE_MAX = 1_000_000
_COMMIT_RETRY_CODES = frozenset({
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError.STALE_MEMBER_EPOCH, KafkaError.FENCED_MEMBER_EPOCH,
})
_GROUP_ACTIVE_CODES = frozenset({
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.NON_EMPTY_GROUP, KafkaError.STALE_MEMBER_EPOCH,
})


def _skip_string(buf: bytes, i: int) -> int:
    n, i = read_long(buf, i)
    return i + n


def _payload_index(raw: bytes, i: int) -> int:
    """The payload's union branch of a current-schema event; ``i`` is just after occurred_at."""
    i = _skip_string(raw, i)  # command_id
    i = _skip_string(raw, i)  # causation_id
    branch, i = read_long(raw, i)  # correlation_id: null | string
    if branch == 1:
        i = _skip_string(raw, i)
    i = _skip_string(raw, i)  # actor
    index, _ = read_long(raw, i)
    return index


def _fields(version: int, currency: str, balance: int, available: int, occurred_at: int) -> bytes:
    """A history value: these fields as Avro encodes them in an event (current schema)."""
    cur = currency.encode()
    return b"".join((write_long(version), write_long(len(cur)), cur, write_long(balance),
                     write_long(available), write_long(occurred_at)))


def _read_fields(raw: bytes) -> tuple[int, str, int, int, int]:
    """version, currency, balance, available, occurred_at from ``_fields`` bytes."""
    version, i = read_long(raw, 0)
    n, i = read_long(raw, i)
    currency = raw[i:i + n].decode()
    balance, i = read_long(raw, i + n)
    available, i = read_long(raw, i)
    occurred_at, _ = read_long(raw, i)
    return version, currency, balance, available, occurred_at


# (account_id, version, history value, occurred_at, closes the account)
_Parsed = tuple[bytes, int, bytes, int, bool]


def _parse_slow(raw: bytes) -> _Parsed | None:
    """Any event the fast path does not take (or None if it is not an event)."""
    try:
        _, d = CODEC.decode(raw, expect=LedgerEvent.avro_name)
    except DecodeError as exc:
        log.warning("skipping a record that is not an event: %s", exc)
        return None
    version, occurred_at = int(d["version"]), int(d["occurred_at"])
    fields = _fields(version, str(d["currency"]), int(d["balance_after_minor"]),
                     int(d.get("available_after_minor", 0)), occurred_at)
    return (str(d["account_id"]).encode(), version, fields, occurred_at,
            d["payload"][0].rsplit(".", 1)[-1] == "AccountClosed")


def _framed_current_event(header: bytes) -> bool:
    """Whether a Confluent header (00 + schema id) names the current LedgerEvent schema.

    Only known once the codec has fetched the id from the registry (its first record
    goes through ``CODEC.decode``); until then, and if the codec cannot say, the
    record takes the slow path.
    """
    by_id = getattr(CODEC, "_by_id", None)
    if not isinstance(by_id, dict):
        return False
    writer = by_id.get(int.from_bytes(header[1:CONFLUENT_HEADER_LEN], "big"))
    return getattr(writer, "fingerprint", None) == _EVENT_FINGERPRINT


def _unpack_balance(account_id: str, raw: bytes) -> dict[str, Any]:
    balance, available, version, updated_at, closed = _BALANCE.unpack_from(raw)
    return {"account_id": account_id, "balance_minor": balance, "available_minor": available,
            "version": version, "currency": raw[_BALANCE.size:].decode(),
            "status": "closed" if closed else "open", "updated_at": updated_at}


def checksum_of(rows: Iterable[tuple[str, int, int, int]]) -> str:
    """sha256 hex over sorted (account_id, balance_minor, available_minor, version) rows."""
    h = hashlib.sha256()
    for account, balance, available, version in sorted(rows):
        h.update(f"{account}\0{balance}\0{available}\0{version}\n".encode())
    return h.hexdigest()


def state_checksum(states: Mapping[str, AccountState]) -> str:
    """``checksum_of`` the live state (``verify(settings).states``)."""
    return checksum_of((a, s.balance_minor, s.available_minor, s.version)
                       for a, s in states.items())


def _client_id(role: str) -> str:
    return f"ledger-{role}-{socket.gethostname()}-{os.getpid()}"


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    if meta.error is not None:
        raise RuntimeError(f"topic {topic}: {meta.error}")
    return sorted(meta.partitions)


def _watermarks(consumer: Consumer, topic: str) -> dict[int, tuple[int, int]]:
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in _partitions(consumer, topic)}


# ---------------------------------------------------------------- the projection


class Projection:
    """The balances read model of one consumer group, kept in RocksDB at ``path``."""

    def __init__(self, settings: Settings, group_id: str | None = None,
                 path: Path | None = None) -> None:
        self.settings = settings
        self.topic = settings.events_topic
        self.group_id = group_id or f"{settings.app_id}-balances"
        self.path = path if path is not None else settings.data_dir / "balances"
        self.applied = 0  # events applied by this instance
        self.duplicates = 0  # events skipped: version already applied
        self.gaps = 0  # events skipped: a version missing before them
        self.bad_records = 0  # records that are not events
        self.slow_records = 0  # records read with CODEC.decode, not the fast path
        self._versions: dict[bytes, int] = {}  # account -> version applied (a cache)
        self._closed_accounts: set[bytes] = set()  # the closed ones among them
        self._gap_logged: set[bytes] = set()
        self._positions: dict[int, int] = {}  # partition -> next offset applied and committed
        # Confluent headers (00 + registry id) of the current LedgerEvent schema
        self._fast_framed: set[bytes] = set()
        if settings.schema_registry_url and CODEC.registry_url != settings.schema_registry_url:
            CODEC.use_registry(settings.schema_registry_url)  # as the worker writes
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(self.path), Options(raw_mode=True))
        try:
            self._consumer = Consumer({
                **settings.kafka_config(),
                "group.id": self.group_id,
                "client.id": _client_id("projection"),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "session.timeout.ms": int(settings.session_timeout_s * 1000),
            })
            self._consumer.subscribe([self.topic])
        except BaseException:
            self._db.close()
            raise
        self._closed = False

    # ------------------------------------------------------------ consuming

    def assignment(self) -> list[int]:
        """Partitions of the events topic this member holds now (empty before it joins)."""
        return sorted(tp.partition for tp in self._consumer.assignment())

    def poll_batch(self, max_records: int = 10_000, timeout_s: float = 0.5) -> int:
        """Consume up to ``max_records``, apply them in one write, commit; events applied."""
        msgs = self._consumer.consume(max_records, timeout=timeout_s)
        if not msgs:
            return 0
        wb = WriteBatch(raw_mode=True)
        applied = self._fold(msgs, wb)
        self._db.write(wb)
        self._commit()
        return applied

    def _fold(self, msgs: list[Message], wb: WriteBatch) -> int:
        if len(self._versions) > _VERSION_CACHE_MAX:
            self._versions.clear()
            self._closed_accounts.clear()
        versions = self._versions
        closed_accounts = self._closed_accounts
        db_get = self._db.get
        last: dict[bytes, bytes] = {}  # account -> history value of its last event applied
        header = _EVENT_HEADER
        fast_framed = self._fast_framed
        match = _FAST.match
        suffix = _HISTORY_SUFFIX.pack
        history_keys = _HISTORY_KEYS
        history_key: struct.Struct | None
        put = wb.put
        applied = duplicates = 0
        for m in msgs:
            if m.error() is not None:
                self._message_error(m)
                continue
            raw = m.value() or b""  # a tombstone is no event: the slow path says so
            ok = False
            if raw.startswith(header):
                base = HEADER_LEN
            elif raw[:CONFLUENT_HEADER_LEN] in fast_framed:
                base = CONFLUENT_HEADER_LEN
            else:
                base = 0
            if base:
                try:
                    n = raw[base]  # event_id length: one byte below 64 characters
                    if n < 0x80:
                        i = base + 1 + (n >> 1)
                        n = raw[i]  # account_id length
                        if n < 0x80:
                            i += 1
                            j = i + (n >> 1)
                            mt = match(raw, j)
                            if mt is not None:
                                e = mt.end()
                                account = raw[i:j]
                                history_key = history_keys[n >> 1]
                                fields = raw[j:e]
                                v = raw[j]
                                version = ((v >> 1) ^ -(v & 1) if v < 0x80
                                           else read_long(raw, j)[0])
                                b0, b1, b2, b3, b4, b5 = raw[e - 6:e]
                                o = ((b0 & 0x7F) | (b1 & 0x7F) << 7 | (b2 & 0x7F) << 14
                                     | (b3 & 0x7F) << 21 | (b4 & 0x7F) << 28 | b5 << 35)
                                occurred = (o >> 1) ^ -(o & 1)
                                # an AccountClosed ends its (empty) record, then
                                # the event's metadata: none (no CloseAccount has any)
                                closes = (raw[-2] == _ACCOUNT_CLOSED_TAIL and raw[-1] == 0
                                          and _payload_index(raw, e) == _ACCOUNT_CLOSED_INDEX)
                                ok = True
                except IndexError:
                    ok = False
            if not ok:
                self.slow_records += 1
                parsed = _parse_slow(raw)
                if parsed is None:
                    self.bad_records += 1
                    continue
                if (raw[:1] == CONFLUENT_MAGIC
                        and _framed_current_event(raw[:CONFLUENT_HEADER_LEN])):
                    fast_framed.add(raw[:CONFLUENT_HEADER_LEN])
                account, version, fields, occurred, closes = parsed
                history_key = None
            stored = versions.get(account)
            if stored is None:
                rec = db_get(b"b" + account)
                if rec is None:
                    stored = 0
                else:
                    stored, closed = _BALANCE.unpack_from(rec)[2::2]
                    if closed:
                        closed_accounts.add(account)
                versions[account] = stored
            if version <= stored:
                duplicates += 1
                continue
            if version != stored + 1:
                self._gap(account, stored, version, m)
                continue
            versions[account] = version
            if closes:
                closed_accounts.add(account)
            elif version == 1:  # AccountOpened
                closed_accounts.discard(account)
            if history_key is not None:
                put(history_key.pack(b"h", account, occurred, version), fields)
            else:
                put(b"h" + account + b"\0" + suffix(occurred, version), fields)
            last[account] = fields
            applied += 1
        for account, fields in last.items():
            version, currency, balance, available, occurred = _read_fields(fields)
            put(b"b" + account, _BALANCE.pack(balance, available, version, occurred,
                                              account in closed_accounts) + currency.encode())
        self.applied += applied
        self.duplicates += duplicates
        return applied

    def _gap(self, account: bytes, stored: int, version: int, m: Message) -> None:
        self.gaps += 1
        if account not in self._gap_logged and len(self._gap_logged) < 10_000:
            self._gap_logged.add(account)
            log.warning("gap: account %r is at version %d, got version %d (%s[%s]@%s); "
                        "not applied, nor will later versions be",
                        account.decode(errors="replace"), stored, version,
                        m.topic(), m.partition(), m.offset())

    def _message_error(self, m: Message) -> None:
        err = m.error()
        assert err is not None
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer error on %s: %s", self.topic, err.str())

    def _commit(self) -> None:
        assigned = self._consumer.assignment()
        if not assigned:
            return
        moved = [tp for tp in self._consumer.position(assigned)
                 if tp.offset >= 0 and self._positions.get(tp.partition) != tp.offset]
        if not moved:
            return
        try:
            result = self._consumer.commit(offsets=moved, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() in _COMMIT_RETRY_CODES:
                # The batch is applied; whoever reads these partitions next reads it
                # again and the version check skips it.
                log.warning("offset commit lost to a rebalance: %s", exc.args[0].str())
                return
            raise
        for tp in result:
            if tp.error is not None:
                log.warning("offset commit of %s[%d] failed: %s", tp.topic, tp.partition,
                            tp.error.str())
            else:
                self._positions[tp.partition] = tp.offset

    def run_until_caught_up(self, timeout_s: float, progress: Progress | None = None,
                            batch_records: int = 50_000) -> int:
        """Consume until every partition reaches its end as of the call; events applied.

        Raises TimeoutError if that takes longer than ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        marks = _watermarks(self._consumer, self.topic)
        high = {p: h for p, (_, h) in marks.items()}
        pos = self._committed_positions(marks, list(marks))
        start = dict(pos)
        total = sum(max(0, high[p] - start[p]) for p in marks)

        def left() -> int:
            return sum(max(0, high[p] - pos[p]) for p in marks)

        def done() -> int:
            return total - left()

        applied = 0
        last_tick = time.monotonic()
        while (remaining := left()) > 0:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{self.group_id}: {done()}/{total} records of {self.topic} "
                                   f"in {timeout_s}s")
            applied += self.poll_batch(max_records=max(1, min(batch_records, remaining)),
                                       timeout_s=min(0.5, max(0.01, deadline - now)))
            for p, off in self._positions.items():
                if p in pos and off > pos[p]:
                    pos[p] = off
            if time.monotonic() - last_tick >= 1.0:
                last_tick = time.monotonic()
                # partitions another member holds, or with nothing left to deliver
                behind = [p for p in marks if pos[p] < high[p]]
                for p, off in self._committed_positions(marks, behind).items():
                    pos[p] = max(pos[p], off)
                if progress is not None:
                    progress(done(), total)
        if progress is not None:
            progress(total, total)
        return applied

    def _committed_positions(self, marks: Mapping[int, tuple[int, int]],
                             parts: list[int]) -> dict[int, int]:
        """Where the group resumes: its committed offset, or the log start without one."""
        if not parts:
            return {}
        tps = self._consumer.committed([TopicPartition(self.topic, p) for p in parts],
                                       timeout=10)
        return {tp.partition: max(tp.offset, marks[tp.partition][0]) for tp in tps}

    # ------------------------------------------------------------ reading

    def balances(self) -> dict[str, dict[str, Any]]:
        """Every account now: balance_minor, available_minor, version, currency, status,
        updated_at."""
        out: dict[str, dict[str, Any]] = {}
        for key, value in self._scan(b"b"):
            account = key[1:].decode()
            out[account] = _unpack_balance(account, value)
        return out

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():
            key: bytes = it.key()
            if not key.startswith(prefix):
                return
            yield key, it.value()
            it.next()

    def balance(self, account_id: str) -> dict[str, Any] | None:
        raw = self._db.get(b"b" + account_id.encode())
        return None if raw is None else _unpack_balance(account_id, raw)

    def checksum(self) -> str:
        """sha256 hex over sorted (account_id, balance_minor, available_minor, version)."""
        rows = []
        for key, value in self._scan(b"b"):
            balance, available, version, _, _ = _BALANCE.unpack_from(value)
            rows.append((key[1:].decode(), balance, available, version))
        return checksum_of(rows)

    def as_of(self, account_id: str, at_ms: int) -> dict[str, Any] | None:
        """The account as of ``at_ms``: after its last event with occurred_at <= at_ms.

        One backward seek in the history index; None if the account had no event by then.
        """
        if at_ms < 0:
            return None
        prefix = b"h" + account_id.encode() + b"\0"
        it = self._db.iter()
        it.seek_for_prev(prefix + _HISTORY_SUFFIX.pack(min(at_ms, _U64_MAX), _U64_MAX))
        if not it.valid():
            return None
        key: bytes = it.key()
        if len(key) != len(prefix) + _HISTORY_SUFFIX.size or not key.startswith(prefix):
            return None
        occurred, version = _HISTORY_SUFFIX.unpack_from(key, len(prefix))
        _, currency, balance, available, _ = _read_fields(it.value())
        return {"account_id": account_id, "currency": currency, "balance_minor": balance,
                "available_minor": available, "version": version, "occurred_at": occurred}

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Leave the group (its offsets stay committed) and close the store."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()
        finally:
            self._db.close()

    def __enter__(self) -> Projection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- replay


class GroupActive(RuntimeError):
    """The consumer group has live members: its offsets must not be moved under them."""


def _members(admin: AdminClient, group_id: str) -> list[str]:
    fut = admin.describe_consumer_groups([group_id], request_timeout=15)[group_id]
    try:
        desc = fut.result(timeout=30)
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError.GROUP_ID_NOT_FOUND:
            return []
        raise
    return [f"client_id={m.client_id} host={m.host.lstrip('/')} member_id={m.member_id}"
            for m in desc.members]


def _refusal(group_id: str, members: list[str]) -> GroupActive:
    return GroupActive(
        f"consumer group {group_id!r} has {len(members)} active member(s): "
        f"{'; '.join(members)}. Stop them before resetting its offsets (nothing was changed).")


def _targets(settings: Settings, to: str, at_ms: int | None,
             offsets: Mapping[int, int] | None) -> dict[int, int]:
    topic = settings.events_topic
    consumer = Consumer({**settings.kafka_config(), "group.id": f"ledger-offsets-{uuid.uuid4()}",
                         "client.id": _client_id("offsets"), "enable.auto.commit": False})
    try:
        marks = _watermarks(consumer, topic)
        if offsets is not None:
            for p, off in offsets.items():
                if p not in marks:
                    raise ValueError(f"{topic} has no partition {p}")
                low, high = marks[p]
                if not low <= off <= high:
                    raise ValueError(f"offset {off} outside {topic}[{p}]: {low}..{high}")
            return dict(offsets)
        if at_ms is not None:
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, at_ms) for p in sorted(marks)], timeout=10)
            out: dict[int, int] = {}
            for tp in found:
                if tp.error is not None:
                    raise KafkaException(tp.error)
                # -1: no record at or after at_ms, so start at the end
                out[tp.partition] = tp.offset if tp.offset >= 0 else marks[tp.partition][1]
            return out
        return {p: (low if to == "earliest" else high) for p, (low, high) in marks.items()}
    finally:
        consumer.close()


def reset_offsets(settings: Settings, group_id: str, *, to: str = "earliest",
                  at_ms: int | None = None,
                  offsets: Mapping[int, int] | None = None) -> dict[int, int]:
    """Move ``group_id``'s committed offsets on the events topic; the new offsets.

    The target is ``offsets`` (only the partitions given), else the first record
    whose Kafka timestamp (produce time, not ``occurred_at``) is at or after
    ``at_ms`` on each partition, else ``to``: "earliest" or "latest". Raises
    GroupActive, changing nothing, while the group has members.
    """
    if to not in ("earliest", "latest"):
        raise ValueError(f"to must be 'earliest' or 'latest', not {to!r}")
    if at_ms is not None and offsets is not None:
        raise ValueError("give at_ms or offsets, not both")
    admin = AdminClient(settings.kafka_config())
    members = _members(admin, group_id)
    if members:
        raise _refusal(group_id, members)
    targets = _targets(settings, to, at_ms, offsets)
    if not targets:
        return {}
    request = ConsumerGroupTopicPartitions(group_id, [
        TopicPartition(settings.events_topic, p, off) for p, off in sorted(targets.items())])
    fut = admin.alter_consumer_group_offsets([request], request_timeout=15)[group_id]
    try:
        result = fut.result(timeout=30)
    except KafkaException as exc:
        if exc.args[0].code() in _GROUP_ACTIVE_CODES:  # a member joined since the check
            raise _refusal(group_id, _members(admin, group_id) or ["(joined meanwhile)"]) \
                from exc
        raise
    for tp in result.topic_partitions or []:
        if tp.error is not None:
            raise KafkaException(tp.error)
    log.info("reset %s on %s to %s", group_id, settings.events_topic, targets)
    return targets


@dataclass
class ReplayResult:
    events_applied: int
    accounts: int
    checksum: str
    live_checksum: str
    differences: list[str]
    seconds: float  # the fold: run_until_caught_up
    events_per_s: float
    gaps: int = 0
    reset_to: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.differences


def differences(projected: Mapping[str, Mapping[str, Any]],
                live: Mapping[str, AccountState]) -> list[str]:
    """What the projection has that the fold of the log does not (and the reverse)."""
    out: list[str] = []
    for account in sorted(set(projected) | set(live)):
        p, s = projected.get(account), live.get(account)
        if s is None:
            out.append(f"{account}: in the projection (v{p and p['version']}), not in the log")
            continue
        if p is None:
            out.append(f"{account}: in the log (v{s.version}), not in the projection")
            continue
        want = {"balance_minor": s.balance_minor, "available_minor": s.available_minor,
                "version": s.version, "currency": s.currency, "status": s.status}
        for name, value in want.items():
            if p[name] != value:
                out.append(f"{account}: {name} {p[name]!r} in the projection, "
                           f"{value!r} in the log")
    return out


def replay(settings: Settings, group_id: str | None = None, path: Path | None = None, *,
           fresh: bool, to: str = "earliest", at_ms: int | None = None,
           offsets: Mapping[int, int] | None = None, progress: Progress | None = None,
           timeout_s: float = 600.0) -> ReplayResult:
    """Reset the group, rebuild the store (from nothing if ``fresh``), compare with the log.

    Raises GroupActive, changing nothing, while the group has members.
    """
    from streams.ops.verify import verify  # verify imports the domain; keep this module light

    group_id = group_id or f"{settings.app_id}-balances"
    path = path if path is not None else settings.data_dir / "balances"
    reset_to = reset_offsets(settings, group_id, to=to, at_ms=at_ms, offsets=offsets)
    if fresh and path.exists():
        shutil.rmtree(path)
    with Projection(settings, group_id, path) as projection:
        started = time.monotonic()
        applied = projection.run_until_caught_up(timeout_s, progress)
        seconds = time.monotonic() - started
        projected = projection.balances()
        checksum = projection.checksum()
        gaps = projection.gaps
    live = verify(settings).states
    return ReplayResult(
        events_applied=applied, accounts=len(projected), checksum=checksum,
        live_checksum=state_checksum(live), differences=differences(projected, live),
        seconds=seconds, events_per_s=applied / seconds if seconds > 0 else 0.0,
        gaps=gaps, reset_to=reset_to)
