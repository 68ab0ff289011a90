"""One partition's batch of input records -> outputs and state changes. No Kafka here.

The worker hands a ``BatchProcessor`` the raw records of one partition in the order
it must decide them, then takes ``outputs`` (events, rejections, legs, dead letters,
each already encoded) and ``finish()`` (the store keys to write). Everything it
reads comes through ``read(key)``, the partition's store as of the batch's start;
its own changes are kept in an overlay, so a batch of N commands and N batches of
one command give byte-identical outputs and the same state (but for the layout of the
retention index, which has a record per batch).

Store keys (bytes):
    ``a<account>``                  AccountState
    ``i<account>\\0<command_id>``    CommandOutcome: a retry gets the same records again
                                    (a leg's: ``i<account>\\0<leg_id>\\0<source>``)
    ``e<expires_at:8><okey>``        retention index: outcome keys that expire then, one
                                    record per batch: the first in its key, the others
                                    in its value, joined by ``\\xff``
    ``x<expires_at:8>``...          hold expiry index: ``<account>\\0<hold_id>``
    ``t<account>\\0<transaction_id>``  TransactionRecord at its coordinator (kept once
                                    committed, for reversals; forgotten a window after
                                    it is rejected)
    ``y<deadline:8>``...            pending transactions' deadlines: ``<account>\\0<id>``
    ``\\0clock``                    the partition clock (8 bytes, epoch ms)

Idempotency is bounded: a command_id is remembered for ``window_ms`` of partition
clock after its decision, then forgotten (a command with it is a new command) and its
outcome record deleted. The partition clock is the largest broker timestamp of the
input records seen so far (the input topics use append time), so it is the same
however the records are cut into batches, and deciding a batch again gives the same
answers. An outcome past its time is ignored when looked up, so when the deletion
runs (a bounded number per batch, at its end) changes nothing but the disk used.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import operator
import struct
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

import fastavro
from pydantic import ValidationError

from schemas.codec import CODEC, HEADER_LEN, DecodeError, WrongSchema
from schemas.models import (
    AccountState,
    CommandBase,
    CommandOutcome,
    ExpireTransaction,
    Hold,
    HoldCaptured,
    HoldPlaced,
    HoldReleased,
    LedgerEvent,
    Rejection,
    Reverse,
    Transaction,
    TransactionMessage,
    TransactionRecord,
    Transfer,
    TransferLeg,
    command_from_avro,
    encode,
)
from streams import core as _core
from streams import transactions
from streams.core import (
    Account,
    Core,
    Headers,
    Output,
    Stats,
    deadline_key,
    expiry_key,
    future_rule,
    read_commands,
    transaction_key,
)
from streams.domain import Decision, Reason, decide, decide_leg, reject
from streams.partitions import partition_for

EVENTS, REJECTIONS, TRANSFERS, DLQ = "events", "rejections", "transfers", "dlq"

log = logging.getLogger("ledger.processor")


# Store key prefixes of a command's outcome, and of a step's outcomes packed for the
# changelog (outcome_log_key).
OUTCOME_PREFIX = b"i"
OUTCOME_LOG_PREFIX = b"o"


def account_key(account_id: str) -> bytes:
    return b"a" + account_id.encode()


def outcome_key(account_id: str, command_id: str) -> bytes:
    return OUTCOME_PREFIX + account_id.encode() + b"\0" + command_id.encode()


CLOCK_KEY = b"\0clock"
_MS = struct.Struct(">q")
# Outcome records deleted at the end of one batch, at most: a backlog of expired ids
# (after a pause) is worked off over the following batches.
FORGET_PER_BATCH = 5000


def retention_key(expires_at: int, okey: bytes) -> bytes:
    return b"e" + _MS.pack(expires_at) + okey


# Joins the outcome keys in a retention record's value: never a byte of UTF-8.
_SEP = b"\xff"


def retained(key: bytes, value: bytes) -> list[bytes]:
    """The outcome keys a retention record lists: the one in its key, then its value's."""
    return [key[9:], *value.split(_SEP)] if value else [key[9:]]


def retention_records(outcomes: Iterable[tuple[int, bytes]]) -> dict[bytes, bytes]:
    """Retention records of ``(expires_at, outcome key)`` pairs, one per instant.

    An outcome key is stored once per instant it expires at (a retry within the window
    is not stored again), so a record's key, named after its first outcome, is unique.
    """
    groups: dict[int, list[bytes]] = {}
    for expires_at, okey in outcomes:
        groups.setdefault(expires_at, []).append(okey)
    return {retention_key(at, okeys[0]): _SEP.join(okeys[1:]) for at, okeys in groups.items()}


def outcome_log_key(tag: tuple[int, int]) -> bytes:
    """The changelog record that carries a step's outcome records (``o`` + the step's
    last input offsets). The changelog holds one such record per step and partition,
    not one record per outcome; RocksDB holds the outcome records themselves, and
    recovery from the changelog unpacks them (``streams.worker.store.unpack_outcome_logs``).
    It is forgotten like an outcome, a window after its step."""
    return OUTCOME_LOG_PREFIX + _MS.pack(tag[0]) + _MS.pack(tag[1])


_LEN = struct.Struct(">i")


def pack_records(records: Iterable[tuple[bytes, bytes | None]]) -> bytes:
    """Store records in one value: ``len(key) | key | len(value) (-1: delete) | value``."""
    out = bytearray()
    for key, value in records:
        out += _LEN.pack(len(key))
        out += key
        if value is None:
            out += _LEN.pack(-1)
        else:
            out += _LEN.pack(len(value))
            out += value
    return bytes(out)


def unpack_records(raw: bytes) -> list[tuple[bytes, bytes | None]]:
    out: list[tuple[bytes, bytes | None]] = []
    i = 0
    while i < len(raw):
        (n,) = _LEN.unpack_from(raw, i)
        key = raw[i + 4:i + 4 + n]
        i += 4 + n
        (n,) = _LEN.unpack_from(raw, i)
        i += 4
        if n < 0:
            out.append((key, None))
        else:
            out.append((key, raw[i:i + n]))
            i += n
    return out


def leg_outcome_key(account_id: str, leg_id: str, from_account_id: str) -> bytes:
    """A leg's outcome key at the account that receives it. It names the transfer's
    source: a destination hears from many sources, whose transfer ids (command ids,
    scoped to each source account) may be the same, and with a third part (ids have no
    NUL) it is never a command's key, though a client may name a command of the source
    ``<transfer id>:refund``, as its refund leg is."""
    return outcome_key(account_id, leg_id) + b"\0" + from_account_id.encode()


def parse_expiry_key(key: bytes) -> tuple[int, str, str]:
    (expires_at,) = _MS.unpack_from(key, 1)
    account, hold = key[9:].split(b"\0", 1)
    return expires_at, account.decode(), hold.decode()


# When and under which trace a retry was sent does not make it another command.
_NOT_CONTENT = frozenset({"issued_at", "correlation_id"})


@cache
def _content(cls: type[CommandBase]) -> Callable[[dict[str, object]], tuple[object, ...]]:
    """The values of a command class's content fields, in the class's field order
    (every command has several, so ``itemgetter`` always returns a tuple)."""
    return operator.itemgetter(*(k for k in cls.model_fields if k not in _NOT_CONTENT))


def command_digest(c: CommandBase) -> bytes:
    """What a command asks for: the same command_id must always ask for the same thing.
    No metadata is no field (the digest of a command from before commands had it)."""
    content = _content(type(c))(c.__dict__)
    if content and content[-1] == {}:  # metadata is every command's last field
        content = content[:-1]
    if isinstance(c, Transaction):  # its postings as plain tuples, as streams.core has them
        content = tuple(transactions.plain(v) if isinstance(v, list) else v for v in content)
    return hashlib.blake2b(repr((c.type, content)).encode(), digest_size=16).digest()


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


class LegSigner:
    """HMAC over a leg's content: only a worker of this ledger that recorded the debit
    can make one.

    The key is derived from the leg secret and the ledger's ``app_id``, so a leg of
    another ledger sharing the secret does not verify here. A leg of the first version
    (no ``expires_at``) was signed with the secret itself over that version's body, a
    leg of the second (no ``metadata``) with the key over that version's body: both
    still verify, so a transfer in flight across an upgrade is credited.
    """

    def __init__(self, secret: bytes, app_id: str = "ledger") -> None:
        self.secret = secret
        self.key = hmac.new(secret, b"ledger transfer leg\0" + app_id.encode(),
                            hashlib.sha256).digest()

    def _mac(self, leg: TransferLeg, second: bool = False) -> bytes:
        """The leg's signature; ``second``: as a leg of the second version signed it."""
        datum = {**leg.to_avro(), "signature": b""}
        if leg.expires_at and not second:
            body = CODEC.body(TransferLeg.avro_name, datum)
            return hmac.new(self.key, body, hashlib.sha256).digest()
        buf = io.BytesIO()
        del datum["metadata"]
        if second:
            fastavro.schemaless_writer(buf, _LEG_VERSIONS[1].parsed, datum)
            return hmac.new(self.key, buf.getvalue(), hashlib.sha256).digest()
        del datum["expires_at"]
        fastavro.schemaless_writer(buf, _LEG_VERSIONS[0].parsed, datum)
        return hmac.new(self.secret, buf.getvalue(), hashlib.sha256).digest()

    def sign(self, leg: TransferLeg) -> TransferLeg:
        return leg.replace(signature=self._mac(leg))

    def verify(self, leg: TransferLeg) -> bool:
        if hmac.compare_digest(leg.signature, self._mac(leg)):
            return True
        return bool(leg.expires_at) and not leg.metadata and \
            hmac.compare_digest(leg.signature, self._mac(leg, second=True))

    # A transaction's message is signed over its bytes as sent, up to its signature (the
    # last field: 32 bytes, so its length is the byte 0x40), header included.
    def _message_mac(self, unsigned: bytes) -> bytes:
        return hmac.new(self.key, b"transaction\0" + unsigned, hashlib.sha256).digest()

    def sign_message(self, m: TransactionMessage) -> bytes:
        """The message's record, signed."""
        unsigned = encode(m.replace(signature=b""))[:-1]  # without the empty signature
        return unsigned + b"\x40" + self._message_mac(unsigned)

    def verify_message(self, raw: bytes) -> bool:
        return len(raw) > 33 and raw[-33] == 0x40 and \
            hmac.compare_digest(raw[-32:], self._message_mac(raw[:-33]))


# TransferLeg as first published (without expires_at), and as second (without metadata):
# legs signed then still verify.
_LEG_VERSIONS = sorted((s for s in CODEC.by_fingerprint.values()
                        if s.name == TransferLeg.avro_name and not s.current),
                       key=lambda s: len(s.parsed["fields"]))


def core_build() -> str:
    """Which ``streams.core`` runs: "compiled" (mypyc) or "interpreted".

    A compiled build older than its source would run the old rules while the source
    says otherwise: that refuses to load.
    """
    if not _core.COMPILED:
        return "interpreted"
    built = Path(_core.__file__ or "")
    if stale(built):
        raise ImportError(f"{built.with_name('core.py')} changed after it was compiled to "
                          f"{built.name}: rebuild it (make, or pip install -e .), or delete "
                          "streams/core*.so to run the source")
    return "compiled"


def stale(built: Path) -> bool:
    """A compiled core in a source checkout, older than its source (an installed copy
    has no pyproject.toml beside its package, and its files' times are the installer's)."""
    source = built.with_name("core.py")
    checkout = (built.parent.parent / "pyproject.toml").exists()
    return checkout and source.exists() and source.stat().st_mtime > built.stat().st_mtime


core_build()


def _headers() -> Headers | None:
    """The current schemas' single-object headers; None while a schema registry is in
    use (its headers come from the registry: the general path writes those)."""
    if CODEC.registry_url is not None:
        return None
    h = CODEC._single_object_headers
    return Headers(h[LedgerEvent.avro_name], h[Rejection.avro_name],
                   h[CommandOutcome.avro_name], h[AccountState.avro_name],
                   h["ledger.CommandBatch"], h[TransferLeg.avro_name],
                   h[TransactionMessage.avro_name], h[TransactionRecord.avro_name])


def to_account(s: AccountState) -> Account:
    return Account(s.account_id, s.currency, s.status, s.overdraft_limit_minor,
                   s.balance_minor, s.held_minor, s.version, s.updated_at,
                   {k: (h.amount_minor, h.expires_at) for k, h in s.holds.items()},
                   s.metadata)


def _decode_account(raw: bytes) -> Account:
    """An account stored in any schema version (or framing) the codec reads."""
    return to_account(AccountState.from_avro(
        CODEC.decode(raw, expect=AccountState.avro_name)[1]))


def to_state(a: Account) -> AccountState:
    return AccountState.trusted(
        account_id=a.account_id, currency=a.currency, status=a.status,
        overdraft_limit_minor=a.overdraft_limit_minor, balance_minor=a.balance_minor,
        held_minor=a.held_minor, version=a.version, updated_at=a.updated_at,
        holds={k: Hold.trusted(amount_minor=amount, expires_at=expires_at)
               for k, (amount, expires_at) in a.holds.items()}, metadata=a.metadata)


class BatchProcessor:
    """``read(key)``: a committed value of the partition's store; ``keys(start)``: its
    keys from ``start`` on, in order; ``window_ms``: how long a command_id is kept."""

    def __init__(self, read: Callable[[bytes], bytes | None],
                 keys: Callable[[bytes], Iterable[bytes]], partition: int, partitions: int,
                 signer: LegSigner, *, window_ms: int, max_record_bytes: int = 1_000_000,
                 max_skew_ms: int = 300_000, transaction_timeout_ms: int = 60_000) -> None:
        self._read = read
        self._keys = keys
        self.window_ms = window_ms
        self._now: int | None = None  # the partition clock, once a record is seen
        self.partition = partition
        self.partitions = partitions
        self.signer = signer
        self.max_record_bytes = max_record_bytes
        self.max_skew_ms = max_skew_ms
        self.transaction_timeout_ms = transaction_timeout_ms
        self.outputs: list[Output] = []
        self.stats = Stats()
        self._accounts: dict[str, Account | None] = {}
        self._dirty: set[str] = set()
        self._writes: dict[bytes, bytes | None] = {}
        self._retained: list[tuple[int, bytes]] = []  # outcomes this batch stored
        self._headers = _headers()
        self._core: Core | None = None
        if self._headers is not None:
            self._core = Core(self._headers, partition, partitions, _decode_account,
                              read, self._accounts, self._dirty, self._writes, self._retained,
                              self.outputs, self.stats, window_ms, signer.key,
                              max_skew_ms, transaction_timeout_ms)

    # ------------------------------------------------------------ reads

    def _account(self, account_id: str) -> Account | None:
        if account_id in self._accounts:
            return self._accounts[account_id]
        if self._core is not None:
            return self._core.load(account_id)
        raw = self._read(account_key(account_id))
        state = None if raw is None else _decode_account(raw)
        self._accounts[account_id] = state
        return state

    def _state(self, account_id: str) -> AccountState | None:
        """The account as the rules' models (the general path)."""
        account = self._account(account_id)
        return None if account is None else to_state(account)

    def _get(self, key: bytes) -> bytes | None:
        if key in self._writes:
            return self._writes[key]
        return self._read(key)

    def _tick(self, timestamp: int) -> None:
        """Advance the partition clock to a record's timestamp (it never goes back)."""
        now = self._now
        if now is None:
            raw = self._read(CLOCK_KEY)
            now = 0 if raw is None else _MS.unpack(raw)[0]
        self._now = max(now, timestamp)

    def _stored(self, okey: bytes) -> CommandOutcome | None:
        raw = self._get(okey)
        if raw is None:
            return None
        return CommandOutcome.from_avro(CODEC.decode(raw, expect=CommandOutcome.avro_name)[1])

    def _prior(self, okey: bytes) -> CommandOutcome | None:
        """The stored outcome of an id, unless it is past its time (then it is forgotten)."""
        prior = self._stored(okey)
        assert self._now is not None
        return None if prior is None or 0 < prior.expires_at < self._now else prior

    # ------------------------------------------------------------ inputs

    def dead_letter(self, key: bytes | None, value: bytes | None, topic: str, offset: int,
                    error: str, code: str) -> None:
        self.stats.dead_letters += 1
        log.warning("dead letter", extra={"source_topic": topic, "source_partition": self.partition,
                                          "source_offset": offset, "error_code": code,
                                          "error": error[:200]})
        self.outputs.append(Output(DLQ, key, value or b"", [
            ("source_topic", topic.encode()), ("source_partition", str(self.partition).encode()),
            ("source_offset", str(offset).encode()), ("error_code", code.encode()),
            ("error", error.encode()[:1000]),
        ]))

    def command_record(self, key: bytes | None, value: bytes | None, topic: str,
                       offset: int, timestamp: int) -> None:
        """Decide every command of one ``ledger.commands`` record, in list order."""
        self._tick(timestamp)
        if value is None or len(value) > self.max_record_bytes:
            size = 0 if value is None else len(value)
            self.dead_letter(key, value, topic, offset, f"record of {size} bytes", "oversize"
                             if size else "empty")
            return
        core, h = self._core, self._headers
        if core is not None and h is not None and value[:HEADER_LEN] == h.batch \
                and not log.isEnabledFor(logging.DEBUG):  # the general path logs each
            try:
                commands = read_commands(value, HEADER_LEN)
            except (IndexError, ValueError, OverflowError):  # the general path says why
                pass
            else:
                assert self._now is not None
                for c in commands:
                    self.stats.commands += 1
                    if not core.command(c, self._now):
                        self._item(("ledger." + c.name, c.body()))
                return
        try:
            _, batch = CODEC.decode(value, expect="ledger.CommandBatch")
        except DecodeError as exc:
            self.dead_letter(key, value, topic, offset, str(exc), exc.code)
            return
        for item in batch["commands"]:
            self.stats.commands += 1
            self._item(item)

    def _item(self, item: tuple[str, dict[str, object]]) -> None:
        """One command of a batch, on the general path: validated by its model."""
        try:
            command = command_from_avro(item)
        except ValidationError as exc:
            self._invalid(item, exc)
            return
        self.stats.types[command.type] = self.stats.types.get(command.type, 0) + 1
        self.stats.issued_at.append(command.issued_at)
        self._command(command)

    def _invalid(self, item: tuple[str, dict[str, object]], exc: ValidationError) -> None:
        name, body = item
        rejection = Rejection.trusted(
            command_id=str(body.get("command_id") or ""),
            account_id=str(body.get("account_id") or ""),
            command_type=name.rsplit(".", 1)[-1], reason=Reason.INVALID_COMMAND.value,
            detail=str(exc.errors(include_url=False, include_input=False))[:500],
            occurred_at=_int(body.get("issued_at")),
            correlation_id=_str_or_none(body.get("correlation_id")),
            actor=str(body.get("actor") or ""),
        )
        self._emit_rejection(rejection)

    def _command(self, c: CommandBase) -> None:
        if partition_for(c.account_id, self.partitions) != self.partition:
            self._emit_rejection(reject(c, Reason.WRONG_PARTITION,
                                        f"account belongs to partition "
                                        f"{partition_for(c.account_id, self.partitions)}"),
                                 )
            return
        okey = outcome_key(c.account_id, c.command_id)
        digest = command_digest(c)
        prior = self._prior(okey)
        if prior is not None:
            if not self._replayed(okey, prior, digest):
                self._emit_rejection(reject(c, Reason.IDEMPOTENCY_KEY_REUSED,
                                            f"command_id {c.command_id!r} was used for another "
                                            "command"))
            return
        assert self._now is not None
        reason, detail = future_rule(c.issued_at, self._now, self.max_skew_ms)
        if reason:
            self._apply(c.account_id, okey, digest,
                        Decision(rejection=reject(c, Reason(reason), detail)))
            return
        if isinstance(c, Transaction | Reverse | Transfer) and \
                self._get(transaction_key(c.account_id, c.command_id)) is not None:
            # its outcome is forgotten, not the transaction or transfer it names
            self._apply(c.account_id, okey, digest, Decision(rejection=reject(
                c, Reason.IDEMPOTENCY_KEY_REUSED,
                f"{c.command_id!r} names a transaction or transfer of this account")))
            return
        if transactions.is_transaction_command(c):
            self._apply(c.account_id, okey, digest, self._transaction(c))
            return
        self._apply(c.account_id, okey, digest, decide(self._state(c.account_id), c))

    # ------------------------------------------------------------ transactions

    def _record(self, key: bytes) -> TransactionRecord | None:
        raw = self._get(key)
        if raw is None:
            return None
        return TransactionRecord.from_avro(
            CODEC.decode(raw, expect=TransactionRecord.avro_name)[1])

    def _keep(self, key: bytes, before: TransactionRecord | None,
              after: TransactionRecord | None) -> None:
        """Store a transaction's record, and keep the deadline index and the link to the
        transaction it reverses in step with it."""
        if after is None or after == before:
            return
        self._writes[key] = encode(after)
        deadline = deadline_key(after.deadline, after.coordinator_account_id,
                                after.transaction_id)
        if after.state == "pending":
            self._writes[deadline] = b""
            return
        self._writes[deadline] = None
        # a rejected one is kept too (its id is used for ever); the original it would have
        # reversed may be reversed again
        if after.state == "rejected" and after.reverses is not None:
            okey = transaction_key(after.coordinator_account_id, after.reverses)
            original = self._record(okey)
            if original is not None and original.reversed_by == after.transaction_id:
                self._writes[okey] = encode(original.replace(reversed_by=None))

    def _transaction(self, c: CommandBase) -> Decision:
        """A Transaction, Reverse or ExpireTransaction at its coordinator."""
        assert self._now is not None
        state = self._state(c.account_id)
        if isinstance(c, Transaction | Reverse):
            key = transaction_key(c.account_id, c.command_id)
            if isinstance(c, Transaction):
                decision, record = transactions.start(state, c, c.postings, self._now,
                                                      self.transaction_timeout_ms)
            else:
                okey = transaction_key(c.account_id, c.transaction_id)
                original = self._record(okey)
                decision, record = transactions.reverse(state, c, original, self._now,
                                                        self.transaction_timeout_ms)
                if record is not None and original is not None:
                    self._writes[okey] = encode(original.replace(reversed_by=c.command_id))
            self._keep(key, None, record)
            return decision
        assert isinstance(c, ExpireTransaction)
        key = transaction_key(c.account_id, c.transaction_id)
        before = self._record(key)
        decision, after = transactions.expire(state, before, c, self._now)
        self._keep(key, before, after)
        return decision

    def _message(self, key: bytes | None, value: bytes | None, topic: str, offset: int,
                 m: TransactionMessage) -> None:
        """One step of a transaction, at the coordinator (VOTE) or a participant."""
        if not self.signer.verify_message(value or b""):
            self.dead_letter(key, value, topic, offset, "message signature does not verify",
                             "forged_leg")
            return
        if partition_for(m.to, self.partitions) != self.partition:
            self.dead_letter(key, value, topic, offset, "message on the wrong partition",
                             "wrong_partition")
            return
        assert self._now is not None
        if m.expires_at <= self._now:
            self.dead_letter(key, value, topic, offset, f"message expired at {m.expires_at}",
                             "expired_leg")
            return
        if m.issued_at < self._now:  # a step happens when this partition takes it
            m = m.replace(issued_at=self._now)
        coordinator, tid, account = m.coordinator_account_id, m.transaction_id, m.account_id
        if m.kind == "VOTE":
            tkey = transaction_key(coordinator, tid)
            before = self._record(tkey)
            decision, after = transactions.vote(self._state(coordinator), before, m)
            self._keep(tkey, before, after)
            self._apply(coordinator, None, b"", decision)
            return
        aborted = leg_outcome_key(account, f"{tid}:abort", coordinator)
        if m.kind == "PREPARE":
            okey = leg_outcome_key(account, f"{tid}:prepare", coordinator)
            if self._prior(okey) is not None:  # a copy of one decided already
                return
            if self._prior(aborted) is not None:  # it was over before it got here
                self._apply(account, okey, m.signature[:16], Decision())
                return
            # reversing a transfer: its credit came here first (see streams.transactions)
            credit = None if m.reverses is None else \
                self._prior(leg_outcome_key(account, f"{m.reverses}:credit", coordinator))
            self._apply(account, okey, m.signature[:16], transactions.prepare(
                self._state(account), m, refunded=credit is not None and credit.rejected))
            return
        finished = transactions.finish(self._state(account), m)
        if finished is not None:
            self._apply(account, None, b"", finished)
        elif m.kind == "ABORT" and self._prior(aborted) is None:  # before its PREPARE
            self._apply(account, aborted, m.signature[:16], Decision())

    def leg_record(self, key: bytes | None, value: bytes | None, topic: str,
                   offset: int, timestamp: int) -> None:
        """Apply one leg from ``ledger.transfers``; forged or misrouted legs are dead letters."""
        self._tick(timestamp)
        core, h = self._core, self._headers
        if core is not None and h is not None and value is not None \
                and not log.isEnabledFor(logging.DEBUG):
            assert self._now is not None
            head = value[:HEADER_LEN]
            try:
                if (head == h.leg and core.leg(value, HEADER_LEN, self._now)) or \
                        (head == h.message and core.message(value, HEADER_LEN, self._now)):
                    return
            except (IndexError, ValueError, OverflowError):
                pass  # the general path says why
        try:
            name, datum = CODEC.decode(value or b"")
            if name == TransactionMessage.avro_name:
                self._message(key, value, topic, offset, TransactionMessage.from_avro(datum))
                return
            if name != TransferLeg.avro_name:
                raise WrongSchema(f"expected a {TransferLeg.avro_name}, got a {name}")
            leg = TransferLeg.from_avro(datum)
        except DecodeError as exc:
            self.dead_letter(key, value, topic, offset, str(exc), exc.code)
            return
        if not self.signer.verify(leg):
            self.dead_letter(key, value, topic, offset, "leg signature does not verify",
                             "forged_leg")
            return
        if partition_for(leg.account_id, self.partitions) != self.partition:
            self.dead_letter(key, value, topic, offset, "leg on the wrong partition",
                             "wrong_partition")
            return
        assert self._now is not None
        # A leg of the first version carries no expiry: it lasts a window from its
        # transfer's issued_at, less the skew a command's issued_at may be ahead of the
        # broker's clock, so it expires before its credit here can be forgotten.
        expires_at = leg.expires_at or leg.issued_at + self.window_ms - self.max_skew_ms
        if expires_at <= self._now:
            # its id may be forgotten here by now: applying it could apply it twice
            self.dead_letter(key, value, topic, offset, f"leg expired at {expires_at}",
                             "expired_leg")
            return
        okey = leg_outcome_key(leg.account_id, leg.leg_id, leg.from_account_id)
        # What the leg says, not its bytes: the signature covers the decoded content, so
        # the same leg in other bytes (a non-minimal varint) verifies too, and must not
        # pass for another leg.
        digest = leg.signature[:16]
        prior = self._prior(okey)
        if prior is None and leg.kind == "REFUND":  # stored when a refund's key had two parts
            prior = self._prior(outcome_key(leg.account_id, leg.leg_id))
        if prior is not None and prior.digest == hashlib.sha256(value or b"").digest()[:16]:
            digest = prior.digest  # stored when a leg's digest was of its bytes
        if prior is not None and self._replayed(okey, prior, digest):
            return
        state = self._state(leg.account_id)
        if leg.kind == "REFUND" and state is None:
            self.dead_letter(key, value, topic, offset, "refund for an unknown account",
                             "forged_leg")
            return
        decision = decide_leg(state, leg)
        if leg.kind == "REFUND" and decision.events:
            # the transfer's record, kept (its id stays used), no longer to be reversed
            tkey = transaction_key(leg.from_account_id, leg.transfer_id)
            if self._get(tkey) is not None:
                self._writes[tkey] = encode(transactions.transfer_record(leg, "rejected"))
        self._apply(leg.account_id, okey, digest, decision)

    # ------------------------------------------------------------ outputs

    def _replayed(self, okey: bytes, prior: CommandOutcome, digest: bytes) -> bool:
        """A command_id seen before (``prior``, its stored outcome): if it asked for the
        same thing, send its first outcome again."""
        # an empty digest: rebuilt from the log (streams.ops.rebuild), content unknown
        if prior.digest != digest and prior.digest:
            return False
        self.stats.replays += 1
        kind = REJECTIONS if prior.rejected else EVENTS
        for record in prior.records:
            self.outputs.append(Output(kind, okey[1:].split(b"\0", 1)[0], record))
        return True

    def _apply(self, account_id: str, okey: bytes | None, digest: bytes,
               outcome: Decision) -> None:
        """Emit a decision's records and keep its state; ``okey``: where its outcome is
        stored for retries (None: not stored)."""
        records: list[bytes]
        if outcome.events and log.isEnabledFor(logging.DEBUG):  # per command: never INFO
            e = outcome.events[0]
            log.debug("accepted", extra={"command_id": e.command_id, "account_id": account_id,
                                         "correlation_id": e.correlation_id,
                                         "events": len(outcome.events),
                                         "legs": len(outcome.legs)})
        if outcome.rejection is not None:
            records = [self._emit_rejection(outcome.rejection)]
        else:
            records = [self._emit_event(event) for event in outcome.events]
            if outcome.events:
                assert outcome.state_after is not None
                self._accounts[account_id] = to_account(outcome.state_after)
                self._dirty.add(account_id)
        assert self._now is not None
        expires_at = self._now + self.window_ms
        for leg in outcome.legs:  # refused, like a command id, once no longer remembered
            if leg.kind == "CREDIT":  # a transfer's record at its source, to reverse it by
                self._writes[transaction_key(leg.from_account_id, leg.transfer_id)] = \
                    encode(transactions.transfer_record(leg, "committed"))
            self.stats.legs += 1
            signed = self.signer.sign(leg.replace(expires_at=expires_at))
            self.outputs.append(Output(TRANSFERS, signed.account_id.encode(), encode(signed)))
        for m in outcome.messages:
            self.stats.legs += 1
            self.outputs.append(Output(TRANSFERS, m.to.encode(),
                                       self.signer.sign_message(m.replace(expires_at=expires_at))))
        if okey is None:
            return
        self._writes[okey] = CODEC.encode(CommandOutcome.avro_name, {
            "digest": digest, "records": records, "rejected": outcome.rejection is not None,
            "expires_at": expires_at})
        self._retained.append((expires_at, okey))

    def _emit_event(self, event: LedgerEvent) -> bytes:
        self.stats.events += 1
        value = encode(event)
        self.outputs.append(Output(EVENTS, event.account_id.encode(), value))
        p = event.payload
        if isinstance(p, HoldPlaced):
            self._writes[expiry_key(p.expires_at, event.account_id, p.hold_id)] = b""
        elif isinstance(p, HoldCaptured | HoldReleased):
            before = self._accounts[event.account_id]
            assert before is not None
            _, expires_at = before.holds[p.hold_id]
            self._writes[expiry_key(expires_at, event.account_id, p.hold_id)] = None
        return value

    def _emit_rejection(self, rejection: Rejection) -> bytes:
        self.stats.rejections += 1
        self.stats.reasons[rejection.reason] = self.stats.reasons.get(rejection.reason, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rejected", extra={"command_id": rejection.command_id,
                                         "account_id": rejection.account_id,
                                         "correlation_id": rejection.correlation_id,
                                         "reason": rejection.reason})
        value = encode(rejection)
        self.outputs.append(Output(REJECTIONS, rejection.account_id.encode(), value))
        return value

    def finish(self, tag: tuple[int, int] | None = None) -> dict[bytes, bytes | None]:
        """The store keys this batch changes (None deletes), accounts encoded once each.

        ``tag``: the step's last input offsets, when its outcome records go to the
        changelog in one record (``outcome_log_key``), which is then indexed for
        forgetting with them."""
        h = self._headers
        for account_id in self._dirty:
            state = self._accounts[account_id]
            assert state is not None
            self._writes[account_key(account_id)] = encode(to_state(state)) if h is None \
                else state.encode(h.account)
        self._dirty.clear()
        if self._now is not None:
            self._forget(self._now)
            self._index(self._now)
            if tag is not None and any(key[:1] == OUTCOME_PREFIX for key in self._writes):
                self._retain([(self._now + self.window_ms, outcome_log_key(tag))])
            if self._writes:  # the clock matters only next to what is stored
                self._writes[CLOCK_KEY] = _MS.pack(self._now)
        return self._writes

    def _forget(self, now: int) -> None:
        """Delete outcome records past their time (up to FORGET_PER_BATCH of them from
        the store, and any this batch wrote itself: a batch can span a window)."""
        for expires_at, okey in self._retained:  # in time order: the clock never goes back
            if expires_at >= now:
                break
            self._forget_outcome(okey, expires_at)
        n = 0
        for key in self._keys(b"e"):
            if key[:1] != b"e" or n >= FORGET_PER_BATCH:
                return
            expires_at = _MS.unpack_from(key, 1)[0]
            if expires_at >= now:
                return
            value = self._read(key)
            if value is None or key in self._writes:  # not committed, or rewritten here
                continue
            okeys = retained(key, value)
            done, rest = okeys[:FORGET_PER_BATCH - n], okeys[FORGET_PER_BATCH - n:]
            n += len(done)
            for okey in done:
                self._forget_outcome(okey, expires_at)
            # the rest first: a crash can leave a prefix of the batch's store records on
            # the changelog, and a tombstone for this record without the rest would
            # leave the rest indexed nowhere
            self._retain((expires_at, okey) for okey in rest)
            self._writes[key] = None

    def _index(self, now: int) -> None:
        """Index the outcomes this batch stored and keeps: one retention record per
        instant they expire at, not one per outcome (a third fewer store writes)."""
        self._retain((expires_at, okey) for expires_at, okey in self._retained
                     if expires_at >= now)

    def _retain(self, outcomes: Iterable[tuple[int, bytes]]) -> None:
        """Add outcomes to the retention index, joining a record of the same key that is
        there already (an outcome key can be stored twice at one instant: a refund leg's,
        ``i<source>\\0<transfer id>:refund``, is also that of a command with that id)."""
        for key, value in retention_records(outcomes).items():
            before = self._get(key)
            if before is not None:  # both list the key's own outcome first
                okeys = dict.fromkeys([*retained(key, before), *retained(key, value)])
                value = _SEP.join(list(okeys)[1:])
            self._writes[key] = value

    def _forget_outcome(self, okey: bytes, expires_at: int) -> None:
        if okey[:1] == OUTCOME_LOG_PREFIX:  # its outcomes are forgotten by now
            self._writes[okey] = None
            return
        if okey[:1] == b"t":  # a rejected transaction, indexed by an older version (which
            # forgot them) unless its id was used again since
            record = self._record(okey)
            if record is not None and record.state == "rejected":
                self._writes[okey] = None
            return
        stored = self._stored(okey)
        # the id may have been decided again since, as a new command: keep that one
        if stored is not None and stored.expires_at == expires_at:
            self._writes[okey] = None
