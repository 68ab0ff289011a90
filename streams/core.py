"""The worker's per-command core on plain typed data, compiled with mypyc when built.

``streams.worker.processor`` hands each ``ledger.commands`` record here first: the command
batch is read straight from its Avro bytes into ``Cmd`` objects, the rules run on
plain fields, and events, rejections and stored values are written straight to Avro
bytes (the same bytes as ``schemas.codec``; the tests compare them). A command this
core does not take (a type not on it yet, a field pydantic would refuse, an id seen
before) goes to the processor's general path, which shares the batch's state.

The rules here are the ledger's rules: ``streams.domain`` calls these same checks, so
they are written once. Nothing here imports pydantic, Faust or Kafka, and the file
runs unchanged without a C compiler; ``COMPILED`` says which one is running.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from typing import Final

from schemas.money import (
    CURRENCY_SCALE,
    MAX_AMOUNT_MINOR,
    MAX_BALANCE_MINOR,
    MAX_MINOR,
    format_amount,
)
from schemas.text import MAX_ID_LENGTH, REFUSED

COMPILED: Final = not __file__.endswith(".py")

# Reason codes (streams.domain.Reason has the same values, in rule order).
INVALID_AMOUNT: Final = "invalid_amount"
UNSUPPORTED_CURRENCY: Final = "unsupported_currency"
INVALID_OVERDRAFT_LIMIT: Final = "invalid_overdraft_limit"
ACCOUNT_NOT_FOUND: Final = "account_not_found"
ACCOUNT_ALREADY_EXISTS: Final = "account_already_exists"
ACCOUNT_CLOSED: Final = "account_closed"
VERSION_CONFLICT: Final = "version_conflict"
CURRENCY_MISMATCH: Final = "currency_mismatch"
INSUFFICIENT_FUNDS: Final = "insufficient_funds"
BALANCE_OUT_OF_RANGE: Final = "balance_out_of_range"
INVALID_EXPIRY: Final = "invalid_expiry"
TRANSFER_TO_SELF: Final = "transfer_to_self"
HOLD_NOT_FOUND: Final = "hold_not_found"
HOLD_ALREADY_EXISTS: Final = "hold_already_exists"
HOLD_EXPIRED: Final = "hold_expired"
HOLD_NOT_EXPIRED: Final = "hold_not_expired"
CAPTURE_EXCEEDS_HOLD: Final = "capture_exceeds_hold"
BALANCE_NOT_ZERO: Final = "balance_not_zero"
HOLDS_OPEN: Final = "holds_open"
ISSUED_IN_FUTURE: Final = "issued_in_future"
IDEMPOTENCY_KEY_REUSED: Final = "idempotency_key_reused"
INVALID_COMMAND: Final = "invalid_command"

OK: Final = ("", "")  # no rule broken

# Command types, in the order of the CommandBatch union.
OPEN_ACCOUNT: Final = 0
DEPOSIT: Final = 1
WITHDRAW: Final = 2
TRANSFER: Final = 3
PLACE_HOLD: Final = 4
CAPTURE_HOLD: Final = 5
RELEASE_HOLD: Final = 6
EXPIRE_HOLD: Final = 7
CLOSE_ACCOUNT: Final = 8
TRANSACTION: Final = 9  # these three are read here, and decided by the processor
REVERSE: Final = 10
EXPIRE_TRANSACTION: Final = 11
SET_ACCOUNT_METADATA: Final = 12
COMMAND_NAMES: Final = ("OpenAccount", "Deposit", "Withdraw", "Transfer", "PlaceHold",
                        "CaptureHold", "ReleaseHold", "ExpireHold", "CloseAccount",
                        "Transaction", "Reverse", "ExpireTransaction", "SetAccountMetadata")
# The command types that carry metadata (last, in each).
WITH_METADATA: Final = (OPEN_ACCOUNT, DEPOSIT, WITHDRAW, TRANSFER, PLACE_HOLD, CAPTURE_HOLD,
                        TRANSACTION, REVERSE, SET_ACCOUNT_METADATA)

# ---------------------------------------------------------------- rules


def static_rules(amount: int | None, currency: str | None, overdraft_limit: int | None,
                 expires_at: int | None = None, issued_at: int = 0,
                 to_self: bool = False) -> tuple[str, str]:
    """Rules that need no state, in order: the amount, the currency, the limit, a
    hold's expiry, a transfer's destination."""
    if amount is not None and not 0 < amount <= MAX_AMOUNT_MINOR:
        return INVALID_AMOUNT, "".join(["amount_minor must be between 1 and ",
                                        str(MAX_AMOUNT_MINOR), ", got ", str(amount)])
    if currency is not None and currency not in CURRENCY_SCALE:
        return UNSUPPORTED_CURRENCY, "unsupported currency " + repr(currency)
    if overdraft_limit is not None and not 0 <= overdraft_limit <= MAX_AMOUNT_MINOR:
        return INVALID_OVERDRAFT_LIMIT, "".join(["overdraft_limit_minor must be between 0 and ",
                                                 str(MAX_AMOUNT_MINOR)])
    if expires_at is not None and expires_at <= issued_at:
        return INVALID_EXPIRY, "expires_at must be after issued_at"
    if to_self:
        return TRANSFER_TO_SELF, "cannot transfer to the same account"
    return OK


def opening_rules(exists: bool, account_id: str, expected_version: int | None) -> tuple[str, str]:
    """Opening an account: it must not exist; a version given must be 0."""
    if exists:
        return ACCOUNT_ALREADY_EXISTS, "account " + repr(account_id) + " exists"
    if expected_version is not None and expected_version != 0:
        return VERSION_CONFLICT, "a new account is at version 0"
    return OK


def open_account_rules(exists: bool, account_id: str, status: str, version: int,
                       expected_version: int | None, account_currency: str,
                       currency: str | None) -> tuple[str, str]:
    """Any command but opening: the account exists, is open, at the version given, in
    the command's currency."""
    if not exists:
        return ACCOUNT_NOT_FOUND, "account " + repr(account_id) + " does not exist"
    if status != "open":
        return ACCOUNT_CLOSED, "account " + repr(account_id) + " is closed"
    if expected_version is not None and expected_version != version:
        return VERSION_CONFLICT, "".join(["expected version ", str(expected_version),
                                          ", account is at ", str(version)])
    if currency is not None and currency != account_currency:
        return CURRENCY_MISMATCH, "".join(["account is in ", account_currency, ", not ",
                                           currency])
    return OK


def funds_rule(available: int, overdraft_limit: int, amount: int,
               currency: str) -> tuple[str, str]:
    """Taking ``amount`` may not bring the available balance below the overdraft limit."""
    if available - amount < -overdraft_limit:
        return INSUFFICIENT_FUNDS, "".join([
            "available ", format_amount(available, currency), " minus ",
            format_amount(amount, currency), " would be below the overdraft limit of ",
            format_amount(overdraft_limit, currency)])
    return OK


def fits_rule(total: int, amount: int, currency: str) -> tuple[str, str]:
    """A balance (or the held total) stays at most MAX_BALANCE_MINOR."""
    if total + amount > MAX_BALANCE_MINOR:
        return BALANCE_OUT_OF_RANGE, "would exceed " + format_amount(MAX_BALANCE_MINOR,
                                                                     currency)
    return OK


def place_hold_rules(exists: bool, hold_id: str, expires_at: int, at: int, held: int,
                     amount: int, available: int, overdraft_limit: int,
                     currency: str) -> tuple[str, str]:
    """Placing a hold at instant ``at``: a future expiry, a new hold id, within the
    funds and within range (the order of ``streams.domain.Reason``)."""
    if expires_at <= at:
        return INVALID_EXPIRY, "expires_at is not after " + str(at)
    if exists:
        return HOLD_ALREADY_EXISTS, "hold " + repr(hold_id) + " is already open"
    broken = funds_rule(available, overdraft_limit, amount, currency)
    if broken[0]:
        return broken
    return fits_rule(held, amount, currency)


def hold_rules(kind: int, hold_id: str, hold: tuple[int, int] | None, at: int,
               amount: int | None, currency: str) -> tuple[str, str]:
    """Capturing, releasing or expiring a hold (``hold``: its amount and expiry, None if
    it is not open) at instant ``at``; ``amount``: what a capture takes (None: all)."""
    if hold is None:
        return HOLD_NOT_FOUND, "no open hold " + repr(hold_id)
    held, expires_at = hold
    if kind == CAPTURE_HOLD:
        if at >= expires_at:
            return HOLD_EXPIRED, "".join(["hold ", repr(hold_id), " expired at ",
                                          str(expires_at)])
        captured = held if amount is None else amount
        if captured > held:
            return CAPTURE_EXCEEDS_HOLD, "".join([
                "capture of ", format_amount(captured, currency), " exceeds the hold of ",
                format_amount(held, currency)])
    elif kind == EXPIRE_HOLD and at < expires_at:
        return HOLD_NOT_EXPIRED, "".join(["hold ", repr(hold_id), " expires at ",
                                          str(expires_at)])
    return OK


def close_rules(balance: int, holds: int, currency: str) -> tuple[str, str]:
    """Closing: a zero balance and no open hold."""
    if balance != 0:
        return BALANCE_NOT_ZERO, "".join(["balance is ", format_amount(balance, currency),
                                          ", not 0"])
    if holds:
        return HOLDS_OPEN, str(holds) + " hold(s) still open"
    return OK


# A transaction's posting: from, to, amount, currency, the version it expects of its source.
Posting = tuple[str, str, int, str, int | None]


def net_of(account_id: str, postings: list[Posting]) -> int:
    """What the postings change the account's balance by (negative: it pays out)."""
    net = 0
    for src, dst, amount, _, _ in postings:
        if dst == account_id:
            net += amount
        if src == account_id:
            net -= amount
    return net


def transaction_refusal(exists: bool, account_id: str, status: str, version: int,
                        currency: str, available: int, overdraft_limit: int, held: int,
                        balance: int, postings: list[Posting]) -> tuple[str, str, int]:
    """The first rule a transaction's postings break at a participant: (reason, detail,
    the posting's index), or ("", "", -1). In posting order: each posting naming it needs
    the account to exist, be open, be in the posting's currency and (as its source) be at
    the version it expects; then what they do to it net: paying out, the funds must be
    there; taking in, the balance must stay in range."""
    out = inward = 0
    first_out = first_in = -1
    for i, (src, dst, amount, cur, expected) in enumerate(postings):
        if src != account_id and dst != account_id:
            continue
        reason, detail = open_account_rules(exists, account_id, status, version,
                                            expected if src == account_id else None,
                                            currency, cur)
        if reason:
            return reason, detail, i
        if src == account_id:
            out += amount
            if first_out < 0:
                first_out = i
        if dst == account_id:
            inward += amount
            if first_in < 0:
                first_in = i
    net = inward - out
    if net < 0:
        reason, detail = funds_rule(available, overdraft_limit, -net, currency)
        if not reason:
            reason, detail = fits_rule(held, -net, currency)
        return (reason, detail, first_out) if reason else ("", "", -1)
    reason, detail = fits_rule(balance, net, currency)
    return (reason, detail, first_in) if reason else ("", "", -1)


def future_rule(issued_at: int, now: int, max_skew_ms: int) -> tuple[str, str]:
    """A command may not say it was issued later than the ledger's clock (the broker's
    append times) plus ``max_skew_ms``: its time would become its events' times."""
    ahead = issued_at - now
    if ahead > max_skew_ms:
        return ISSUED_IN_FUTURE, "".join(["issued_at is ", str(ahead), " ms ahead of the "
                                          "ledger's clock; at most ", str(max_skew_ms)])
    return OK


def valid_id(value: str) -> bool:
    """What the models' ``Id`` takes: 1-200 characters, none of schemas.text's refused."""
    return 0 < len(value) <= MAX_ID_LENGTH and plain_text(value)


def plain_text(value: str) -> bool:
    """``schemas.text.plain``, compiled: ASCII is checked without the set."""
    for ch in value:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or (o >= 0x80 and o in REFUSED):
            return False
    return True


# ---------------------------------------------------------------- ids and digests

_EVENT_ID_HASH: Final = hashlib.blake2b(digest_size=16, key=b"ledger-event-id-v1")
_VARIANT: Final = "89ab"


def event_id(causation_id: str, account_id: str, version: int) -> str:
    """Deterministic: the same command (or leg) deciding the same version of the same
    account, the same id. The version keeps ids unique when a command_id comes back
    as a new command after the idempotency window. A version-4 UUID of a keyed hash."""
    h = _EVENT_ID_HASH.copy()
    h.update("/".join([causation_id, account_id, str(version)]).encode())
    x = h.hexdigest()
    # byte 6's high nibble is the version (4); byte 8's top two bits the variant (10)
    return "-".join([x[:8], x[8:12], "4" + x[13:16], _VARIANT[int(x[16], 16) & 3] + x[17:20],
                     x[20:]])


_CONTENT_HASH: Final = hashlib.blake2b(digest_size=16)


def content_digest(content: str) -> bytes:
    """The digest of a command's content (``repr`` of its type and content fields)."""
    h = _CONTENT_HASH.copy()
    h.update(content.encode())
    return h.digest()


# ---------------------------------------------------------------- partitions


def _mul32(a: int, b: int) -> int:
    """``a * b`` modulo 2**32 for 32-bit ``a`` and ``b``, from 16-bit halves: mypyc
    multiplies machine words only while both factors are under 2**30."""
    al, ah, bl, bh = a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16
    return (al * bl + ((ah * bl + al * bh) & 0xFFFF) * 0x10000) & 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (``org.apache.kafka.common.utils.Utils.murmur2``), unsigned."""
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    end = length - length % 4
    for i in range(0, end, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = _mul32(k, m)
        k ^= k >> 24
        k = _mul32(k, m)
        h = _mul32(h, m) ^ k
    extra = length - end
    if extra >= 3:
        h ^= data[end + 2] << 16
    if extra >= 2:
        h ^= data[end + 1] << 8
    if extra >= 1:
        h = _mul32(h ^ data[end], m)
    h ^= h >> 13
    h = _mul32(h, m)
    return h ^ h >> 15


def partition_for(account_id: str, partitions: int) -> int:
    """Kafka's default partition of a key (murmur2): the same as the Java client's."""
    return (murmur2(account_id.encode()) & 0x7FFFFFFF) % partitions


# ---------------------------------------------------------------- Avro


# Records are written as lists of parts joined once: under mypyc, appending to a list
# is native, and one join allocates once where a bytearray grows and copies.
_BYTE: Final = [bytes((i,)) for i in range(256)]


def write_long(out: list[bytes], n: int) -> None:
    """An Avro long: zigzag, then a little-endian base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    if z < 0 or z >> 64:
        raise OverflowError("does not fit an Avro long: " + str(n))
    if z < 0x80:
        out.append(_BYTE[z])
        return
    varint = size = 0
    while z > 0x7F:
        varint |= ((z & 0x7F) | 0x80) << size
        z >>= 7
        size += 8
    out.append((varint | z << size).to_bytes(size // 8 + 1, "little"))


def write_str(out: list[bytes], s: str) -> None:
    b = s.encode()
    write_long(out, len(b))
    out.append(b)


def write_bytes(out: list[bytes], b: bytes) -> None:
    write_long(out, len(b))
    out.append(b)


def write_map(out: list[bytes], m: dict[str, str]) -> None:
    """An Avro map of strings, in one block."""
    if m:
        write_long(out, len(m))
        for key, value in m.items():
            write_str(out, key)
            write_str(out, value)
    out.append(_BYTE[0])


def write_postings(out: list[bytes], postings: list[Posting]) -> None:
    """An Avro array of ``ledger.Posting``, in one block."""
    if postings:
        write_long(out, len(postings))
        for src, dst, amount, currency, expected in postings:
            write_str(out, src)
            write_str(out, dst)
            write_long(out, amount)
            write_str(out, currency)
            if expected is None:
                out.append(_BYTE[0])
            else:
                out.append(_BYTE[2])
                write_long(out, expected)
    out.append(_BYTE[0])


def write_opt_str(out: list[bytes], s: str | None) -> None:
    if s is None:
        out.append(_BYTE[0])
    else:
        out.append(_BYTE[2])
        write_str(out, s)


class Reader:
    """Avro values read in order from ``buf`` (IndexError or ValueError on bad bytes)."""

    def __init__(self, buf: bytes, i: int) -> None:
        self.buf = buf
        self.i = i

    def long(self) -> int:
        buf = self.buf
        i = self.i
        b = buf[i]
        n = b & 0x7F
        shift = 7
        i += 1
        while b & 0x80:
            if shift > 63:
                raise ValueError("varint too long")
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
        self.i = i
        return (n >> 1) ^ -(n & 1)

    def string(self) -> str:
        return self.blob().decode()

    def block(self) -> int:
        """The item count of an array's or map's next block (0: the end)."""
        count = self.long()
        if count < 0:  # a negative count is followed by the block's size in bytes
            count = -count
            self.long()
        return count

    def present(self) -> bool:
        """The branch of a ``["null", T]`` union: False for null."""
        branch = self.long()
        if branch != 0 and branch != 1:
            raise ValueError("bad union branch")
        return branch == 1

    def boolean(self) -> bool:
        b = self.buf[self.i]
        if b > 1:
            raise ValueError("bad boolean")
        self.i += 1
        return b == 1

    def blob(self) -> bytes:
        """Avro bytes (a string's too)."""
        n = self.long()
        i = self.i
        if n < 0 or i + n > len(self.buf):
            raise ValueError("bad length")
        self.i = i + n
        return self.buf[i:i + n]

    def string_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        n = self.block()
        while n:
            for _ in range(n):
                key = self.string()
                out[key] = self.string()
            n = self.block()
        return out

    def opt_long(self) -> int | None:
        return self.long() if self.present() else None

    def opt_str(self) -> str | None:
        return self.string() if self.present() else None

    def done(self) -> bool:
        return self.i == len(self.buf)


class Cmd:
    """One command as read from a CommandBatch: the fields of every type (those a type
    does not have stay None)."""

    def __init__(self, kind: int, command_id: str, account_id: str, actor: str,
                 issued_at: int, expected_version: int | None,
                 correlation_id: str | None) -> None:
        self.kind = kind
        self.command_id = command_id
        self.account_id = account_id
        self.actor = actor
        self.issued_at = issued_at
        self.expected_version = expected_version
        self.correlation_id = correlation_id
        self.currency: str | None = None
        self.amount_minor: int | None = None
        self.overdraft_limit_minor: int | None = None
        self.to_account_id: str | None = None
        self.hold_id: str | None = None
        self.expires_at: int | None = None
        self.transaction_id: str | None = None
        # a Transaction's: (from, to, amount, currency, expected version of the source)
        self.postings: list[tuple[str, str, int, str, int | None]] | None = None
        self.metadata: dict[str, str] = {}

    @property
    def name(self) -> str:
        return COMMAND_NAMES[self.kind]

    def body(self) -> dict[str, object]:
        """The Avro datum of the command (as ``schemas.codec`` reads it), for the
        processor's general path."""
        d: dict[str, object] = {
            "command_id": self.command_id, "account_id": self.account_id, "actor": self.actor,
            "issued_at": self.issued_at, "expected_version": self.expected_version,
            "correlation_id": self.correlation_id}
        k = self.kind
        if k == OPEN_ACCOUNT:
            d["currency"] = self.currency
            d["overdraft_limit_minor"] = self.overdraft_limit_minor
        elif k in (DEPOSIT, WITHDRAW):
            d["amount_minor"] = self.amount_minor
            d["currency"] = self.currency
        elif k == TRANSFER:
            d["to_account_id"] = self.to_account_id
            d["amount_minor"] = self.amount_minor
            d["currency"] = self.currency
        elif k == PLACE_HOLD:
            d["hold_id"] = self.hold_id
            d["amount_minor"] = self.amount_minor
            d["currency"] = self.currency
            d["expires_at"] = self.expires_at
        elif k == CAPTURE_HOLD:
            d["hold_id"] = self.hold_id
            d["amount_minor"] = self.amount_minor
        elif k in (RELEASE_HOLD, EXPIRE_HOLD):
            d["hold_id"] = self.hold_id
        elif k == TRANSACTION:
            assert self.postings is not None
            d["postings"] = [{"from_account_id": p[0], "to_account_id": p[1],
                              "amount_minor": p[2], "currency": p[3],
                              "expected_version": p[4]} for p in self.postings]
        elif k in (REVERSE, EXPIRE_TRANSACTION):
            d["transaction_id"] = self.transaction_id
        if k in WITH_METADATA:
            d["metadata"] = self.metadata
        return d


def read_commands(buf: bytes, start: int) -> list[Cmd]:
    """The commands of a CommandBatch body (current schema) that starts at ``start``."""
    r = Reader(buf, start)
    out: list[Cmd] = []
    while True:
        count = r.block()
        if count == 0:
            break
        for _ in range(count):
            kind = r.long()
            if not 0 <= kind <= SET_ACCOUNT_METADATA:
                raise ValueError("bad command type")
            c = Cmd(kind, r.string(), r.string(), r.string(), r.long(), r.opt_long(), r.opt_str())
            if kind == OPEN_ACCOUNT:
                c.currency = r.string()
                c.overdraft_limit_minor = r.long()
            elif kind in (DEPOSIT, WITHDRAW):
                c.amount_minor = r.long()
                c.currency = r.string()
            elif kind == TRANSFER:
                c.to_account_id = r.string()
                c.amount_minor = r.long()
                c.currency = r.string()
            elif kind == PLACE_HOLD:
                c.hold_id = r.string()
                c.amount_minor = r.long()
                c.currency = r.string()
                c.expires_at = r.long()
            elif kind == CAPTURE_HOLD:
                c.hold_id = r.string()
                c.amount_minor = r.opt_long()
            elif kind in (RELEASE_HOLD, EXPIRE_HOLD):
                c.hold_id = r.string()
            elif kind == TRANSACTION:
                c.postings = []
                n = r.block()
                while n:
                    for _ in range(n):
                        c.postings.append((r.string(), r.string(), r.long(), r.string(),
                                           r.opt_long()))
                    n = r.block()
            elif kind in (REVERSE, EXPIRE_TRANSACTION):
                c.transaction_id = r.string()
            if kind in WITH_METADATA:
                c.metadata = r.string_map()
            out.append(c)
    if not r.done():
        raise ValueError("bytes after the batch")
    return out


# ---------------------------------------------------------------- account state


class Account:
    """An account's state (``ledger.state.AccountState``) as plain mutable fields."""

    def __init__(self, account_id: str, currency: str, status: str, overdraft_limit_minor: int,
                 balance_minor: int, held_minor: int, version: int, updated_at: int,
                 holds: dict[str, tuple[int, int]],
                 metadata: dict[str, str] | None = None) -> None:
        self.account_id = account_id
        self.currency = currency
        self.status = status
        self.overdraft_limit_minor = overdraft_limit_minor
        self.balance_minor = balance_minor
        self.held_minor = held_minor
        self.version = version
        self.updated_at = updated_at
        self.holds = holds  # hold id -> (amount_minor, expires_at)
        self.metadata: dict[str, str] = {} if metadata is None else metadata

    @property
    def available_minor(self) -> int:
        return self.balance_minor - self.held_minor

    def encode(self, header: bytes) -> bytes:
        out = [header]
        write_str(out, self.account_id)
        write_str(out, self.currency)
        write_str(out, self.status)
        write_long(out, self.overdraft_limit_minor)
        write_long(out, self.balance_minor)
        write_long(out, self.held_minor)
        write_long(out, self.version)
        write_long(out, self.updated_at)
        if self.holds:
            write_long(out, len(self.holds))
            for hold_id, (amount, expires_at) in self.holds.items():
                write_str(out, hold_id)
                write_long(out, amount)
                write_long(out, expires_at)
        out.append(_BYTE[0])
        write_map(out, self.metadata)
        return b"".join(out)


def read_outcome(buf: bytes, start: int) -> tuple[bytes, list[bytes], bool, int]:
    """A stored outcome (``ledger.state.CommandOutcome``): its digest, records, whether
    it was a rejection, and when it is forgotten."""
    r = Reader(buf, start)
    digest = r.blob()
    records: list[bytes] = []
    count = r.block()
    while count:
        for _ in range(count):
            records.append(r.blob())
        count = r.block()
    return digest, records, r.boolean(), r.long()


def read_account(buf: bytes, start: int) -> Account:
    r = Reader(buf, start)
    a = Account(r.string(), r.string(), r.string(), r.long(), r.long(), r.long(), r.long(),
                r.long(), {})
    while True:
        count = r.block()
        if count == 0:
            break
        for _ in range(count):
            hold_id = r.string()
            amount = r.long()
            a.holds[hold_id] = (amount, r.long())
    a.metadata = r.string_map()
    if not r.done():
        raise ValueError("bytes after the account")
    return a


# ---------------------------------------------------------------- outputs


class Output:
    """One record to produce: ``kind`` names the topic (events, rejections, ...)."""

    def __init__(self, kind: str, key: bytes | None, value: bytes,
                 headers: list[tuple[str, str | bytes | None]] | None = None) -> None:
        self.kind = kind
        self.key = key
        self.value = value
        self.headers = headers


class Stats:
    """What a batch did, for metrics and logs."""

    def __init__(self) -> None:
        self.commands = 0
        self.events = 0
        self.rejections = 0
        self.legs = 0
        self.dead_letters = 0
        self.replays = 0
        self.reasons: dict[str, int] = {}
        self.types: dict[str, int] = {}
        self.issued_at: list[int] = []


class Headers:
    """The single-object headers of the current schemas (magic + fingerprint)."""

    def __init__(self, event: bytes, rejection: bytes, outcome: bytes, account: bytes,
                 batch: bytes, leg: bytes, message: bytes, record: bytes) -> None:
        self.event = event
        self.rejection = rejection
        self.outcome = outcome
        self.account = account
        self.batch = batch
        self.leg = leg
        self.message = message
        self.record = record


def encode_rejection(h: Headers, command_id: str, account_id: str, command_type: str,
                     reason: str, detail: str, occurred_at: int, correlation_id: str | None,
                     actor: str) -> bytes:
    out = [h.rejection]
    write_str(out, command_id)
    write_str(out, account_id)
    write_str(out, command_type)
    write_str(out, reason)
    write_str(out, detail)
    write_long(out, occurred_at)
    write_opt_str(out, correlation_id)
    write_str(out, actor)
    return b"".join(out)


def encode_outcome(h: Headers, digest: bytes, record: bytes | None, rejected: bool,
                   expires_at: int) -> bytes:
    """A stored outcome of one record (None: of none)."""
    out = [h.outcome]
    write_bytes(out, digest)
    if record is not None:
        out.append(_BYTE[2])  # an array of one record
        write_bytes(out, record)
    out.append(_BYTE[0])
    out.append(_BYTE[1 if rejected else 0])
    write_long(out, expires_at)
    return b"".join(out)


# ---------------------------------------------------------------- deciding


class Core:
    """Decides one partition's commands of the types it takes, within a batch.

    It shares the batch's state with the processor: ``accounts`` (account id ->
    Account, None if it does not exist), ``writes`` (store key -> value, None
    deletes), ``retained`` ((expires_at, outcome key) of each outcome stored),
    ``outputs`` and ``stats``. ``read(key)`` is the committed store;
    ``decode_other(raw)`` reads an account stored in another schema version."""

    def __init__(self, headers: Headers, partition: int,
                 partitions: int,
                 decode_other: Callable[[bytes], Account],
                 read: Callable[[bytes], bytes | None],
                 accounts: dict[str, Account | None], dirty: set[str],
                 writes: dict[bytes, bytes | None], retained: list[tuple[int, bytes]],
                 outputs: list[Output], stats: Stats, window_ms: int,
                 leg_secret: bytes, max_skew_ms: int, transaction_timeout_ms: int = 60_000,
                 ) -> None:
        self.h = headers
        self.max_skew_ms = max_skew_ms
        self.leg_secret = leg_secret
        self.partition = partition
        self.n_partitions = partitions
        self.decode_other = decode_other
        self.read = read
        self.accounts = accounts
        self.dirty = dirty
        self.writes = writes
        self.retained = retained
        self.outputs = outputs
        self.stats = stats
        self.window_ms = window_ms
        self.transaction_timeout_ms = transaction_timeout_ms
        self.deadline = 0  # a transaction's, when the command being decided is one
        self.partitions: dict[str, int] = {}  # account id -> its partition, as met

    def load(self, account_id: str) -> Account | None:
        """An account not yet in ``accounts``, read from the store into it."""
        raw = self.read(b"a" + account_id.encode())
        n = len(self.h.account)
        state: Account | None = None
        if raw is not None:
            state = read_account(raw, n) if raw[:n] == self.h.account else self.decode_other(raw)
        self.accounts[account_id] = state
        return state

    def command(self, c: Cmd, now: int) -> bool:
        """Decide ``c`` if this core takes it (True); False leaves it to the processor."""
        k = c.kind
        if (k > CLOSE_ACCOUNT and k != TRANSACTION) or c.metadata:  # the processor's
            return False
        if k == TRANSACTION:
            postings = c.postings
            if not postings or len(postings) > 100:
                return False
            for posting in postings:
                if not (valid_id(posting[0]) and valid_id(posting[1])):
                    return False
        if not (valid_id(c.command_id) and valid_id(c.account_id) and valid_id(c.actor)):
            return False
        if c.hold_id is not None and not valid_id(c.hold_id):
            return False
        if c.to_account_id is not None and not valid_id(c.to_account_id):
            return False
        corr = c.correlation_id
        if corr is not None and (len(corr) > MAX_ID_LENGTH or not plain_text(corr)):
            return False
        account_id = c.account_id
        p = self.partitions.get(account_id, -1)
        if p < 0:
            p = self.partitions[account_id] = partition_for(account_id, self.n_partitions)
        if p != self.partition:
            return False
        okey = b"i" + account_id.encode() + b"\0" + c.command_id.encode()
        prior = self._outcome(okey)
        if prior is not None:
            if prior[:len(self.h.outcome)] != self.h.outcome:
                return False  # stored in another schema version
            if 0 < read_outcome(prior, len(self.h.outcome))[3] < now:
                prior = None  # forgotten: decided as a new command
        if prior is None and k in (TRANSFER, TRANSACTION) and \
                self._outcome(transaction_key(account_id, c.command_id)) is not None:
            return False  # the id of a transaction or transfer kept here: the processor's
        name = COMMAND_NAMES[k]
        stats = self.stats
        stats.types[name] = stats.types.get(name, 0) + 1
        stats.issued_at.append(c.issued_at)
        if prior is not None:  # seen before: a retry, or the id reused
            digest, records, rejected, _ = read_outcome(prior, len(self.h.outcome))
            self._seen(c, name, digest, records, rejected)
            return True
        state = self.accounts[account_id] if account_id in self.accounts else self.load(account_id)
        self.deadline = now + self.transaction_timeout_ms
        reason, detail = future_rule(c.issued_at, now, self.max_skew_ms)
        if not reason:
            reason, detail = self._rules(c, state)
        expires_at = now + self.window_ms
        key = account_id.encode()
        if reason:
            value = encode_rejection(self.h, c.command_id, account_id, name, reason, detail,
                                     c.issued_at, corr, c.actor)
            stats.rejections += 1
            stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
            self.outputs.append(Output("rejections", key, value))
        else:
            value = self._event(c, state)
            stats.events += 1
            self.outputs.append(Output("events", key, value))
            if k == TRANSFER:
                assert state is not None
                self._credit_leg(c, state.updated_at, expires_at)
                self._transfer_record(c.command_id, account_id, c.to_account_id,
                                      c.amount_minor, c.currency, state.updated_at, c.actor,
                                      corr, "committed")
            elif k == TRANSACTION:
                assert state is not None and c.postings is not None
                self._prepare_all(c, state, now, expires_at)
        self.writes[okey] = encode_outcome(self.h, content_digest(_content(c)), value,
                                           bool(reason), expires_at)
        self.retained.append((expires_at, okey))
        return True

    def _seen(self, c: Cmd, name: str, digest: bytes, records: list[bytes],
              rejected: bool) -> None:
        """A command whose id this account has seen (its stored outcome: ``digest``,
        ``records``): the same command gets its first outcome again; another command
        under that id is refused."""
        key = c.account_id.encode()
        stats = self.stats
        if not digest or digest == content_digest(_content(c)):  # empty: from a rebuild
            stats.replays += 1
            kind = "rejections" if rejected else "events"
            for record in records:
                self.outputs.append(Output(kind, key, record))
            return
        stats.rejections += 1
        stats.reasons[IDEMPOTENCY_KEY_REUSED] = stats.reasons.get(IDEMPOTENCY_KEY_REUSED, 0) + 1
        self.outputs.append(Output("rejections", key, encode_rejection(
            self.h, c.command_id, c.account_id, name, IDEMPOTENCY_KEY_REUSED,
            "".join(["command_id ", repr(c.command_id), " was used for another command"]),
            c.issued_at, c.correlation_id, c.actor)))

    def _rules(self, c: Cmd, state: Account | None) -> tuple[str, str]:
        """The first rule ``c`` breaks, in the order of ``streams.domain.Reason``."""
        k = c.kind
        if k == TRANSACTION:
            assert c.postings is not None
            for i, (src, dst, moved, cur, _) in enumerate(c.postings):
                reason, detail = static_rules(moved, cur, None, None, 0, src == dst)
                if reason:
                    return reason, "".join(["posting ", str(i), ": ", detail])
            if state is None:
                return open_account_rules(False, c.account_id, "", 0, c.expected_version, "",
                                          None)
            return open_account_rules(True, c.account_id, state.status, state.version,
                                      c.expected_version, state.currency, None)
        broken = static_rules(c.amount_minor, c.currency, c.overdraft_limit_minor,
                              c.expires_at, c.issued_at, c.to_account_id == c.account_id)
        if broken[0]:
            return broken
        if k == OPEN_ACCOUNT:
            return opening_rules(state is not None, c.account_id, c.expected_version)
        if state is None:
            return open_account_rules(False, c.account_id, "", 0, c.expected_version, "",
                                      c.currency)
        broken = open_account_rules(True, c.account_id, state.status, state.version,
                                    c.expected_version, state.currency, c.currency)
        if broken[0]:
            return broken
        at = max(c.issued_at, state.updated_at)
        amount = c.amount_minor
        if k == DEPOSIT:
            assert amount is not None
            return fits_rule(state.balance_minor, amount, state.currency)
        if k in (WITHDRAW, TRANSFER):
            assert amount is not None
            return funds_rule(state.available_minor, state.overdraft_limit_minor, amount,
                              state.currency)
        if k == PLACE_HOLD:
            assert amount is not None and c.hold_id is not None and c.expires_at is not None
            return place_hold_rules(c.hold_id in state.holds, c.hold_id, c.expires_at, at,
                                    state.held_minor, amount, state.available_minor,
                                    state.overdraft_limit_minor, state.currency)
        if k == CLOSE_ACCOUNT:
            return close_rules(state.balance_minor, len(state.holds), state.currency)
        assert c.hold_id is not None
        return hold_rules(k, c.hold_id, state.holds.get(c.hold_id), at, amount, state.currency)

    def _event(self, c: Cmd, state: Account | None) -> bytes:
        """Apply an accepted command to its account; its event's bytes."""
        account_id = c.account_id
        k = c.kind
        payload: list[bytes] = []
        if k == TRANSACTION:  # TransactionStarted: the coordinator's balance stays
            assert state is not None and c.postings is not None
            state.version += 1
            if c.issued_at > state.updated_at:
                state.updated_at = c.issued_at
            self.dirty.add(account_id)
            out = self._envelope(state, c.command_id, c.command_id, c.correlation_id, c.actor)
            out.append(_BYTE[20])
            write_str(out, c.command_id)
            write_postings(out, c.postings)
            write_long(out, self.deadline)
            out.append(_BYTE[0])  # reverses nothing
            out.append(_BYTE[0])  # no metadata
            return b"".join(out)
        if state is None:  # an opening
            assert c.currency is not None and c.overdraft_limit_minor is not None
            state = Account(account_id, c.currency, "open", c.overdraft_limit_minor, 0, 0, 1,
                            c.issued_at, {})
            self.accounts[account_id] = state
            payload.append(_BYTE[0])
            write_long(payload, c.overdraft_limit_minor)
        else:
            state.version += 1
            if c.issued_at > state.updated_at:
                state.updated_at = c.issued_at
            amount = c.amount_minor
            hold_id = c.hold_id
            if k in (DEPOSIT, WITHDRAW):
                assert amount is not None
                state.balance_minor += amount if k == DEPOSIT else -amount
                payload.append(_BYTE[2 if k == DEPOSIT else 4])
                write_long(payload, amount)
            elif k == TRANSFER:
                assert amount is not None and c.to_account_id is not None
                state.balance_minor -= amount
                payload.append(_BYTE[6])
                write_str(payload, c.command_id)
                write_str(payload, c.to_account_id)
                write_long(payload, amount)
            elif k == PLACE_HOLD:
                assert amount is not None and hold_id is not None and c.expires_at is not None
                state.held_minor += amount
                state.holds[hold_id] = (amount, c.expires_at)
                self.writes[expiry_key(c.expires_at, account_id, hold_id)] = b""
                payload.append(_BYTE[12])
                write_str(payload, hold_id)
                write_long(payload, amount)
                write_long(payload, c.expires_at)
            elif k == CLOSE_ACCOUNT:
                state.status = "closed"
                payload.append(_BYTE[18])
            else:  # a capture, a release or an expiry: the hold ends
                assert hold_id is not None
                held, hold_expires_at = state.holds.pop(hold_id)
                state.held_minor -= held
                self.writes[expiry_key(hold_expires_at, account_id, hold_id)] = None
                write_str(payload, hold_id)
                if k == CAPTURE_HOLD:
                    captured = held if amount is None else amount
                    state.balance_minor -= captured
                    payload.insert(0, _BYTE[14])
                    write_long(payload, captured)
                    write_long(payload, held - captured)
                else:
                    payload.insert(0, _BYTE[16])
                    write_long(payload, held)
                    write_str(payload, "released" if k == RELEASE_HOLD else "expired")
        self.dirty.add(account_id)
        out = self._envelope(state, c.command_id, c.command_id, c.correlation_id, c.actor)
        out.extend(payload)
        out.append(_BYTE[0])  # no metadata
        return b"".join(out)

    def leg(self, buf: bytes, start: int, now: int) -> bool:
        """Apply a transfer's leg (``ledger.TransferLeg`` bytes from ``start``) at the
        account that receives it, if this core takes it (True): a signed leg of the
        current schema, not expired, seen for the first time, to an account here. A
        CREDIT is credited, or refused with a REFUND leg back to its source; a REFUND is
        credited back. The rest (a leg seen before, a refund for an account that does not
        exist or cannot take it, a bad signature or encoding) is left to the processor."""
        r = Reader(buf, start)
        kind = r.long()
        if kind != 0 and kind != 1:
            return False
        transfer_id = r.string()
        from_account_id = r.string()
        to_account_id = r.string()
        amount = r.long()
        currency = r.string()
        issued_at = r.long()
        actor = r.string()
        correlation_id = r.opt_str()
        reason = r.opt_str()
        expires_at = r.long()
        if r.string_map():  # the processor carries it into the events
            return False
        unsigned_end = r.i
        signature = buf[unsigned_end:]
        if len(signature) != 33 or signature[0] != 64 or expires_at <= now:  # 32 bytes
            return False
        # Signed over the leg's bytes with an empty signature: the signer's encoding. A
        # leg encoded otherwise (valid Avro, but not the signer's bytes) goes to the
        # processor, which verifies what it says.
        mac = hmac.new(self.leg_secret, buf[start:unsigned_end] + b"\0", hashlib.sha256)
        if not hmac.compare_digest(mac.digest(), signature[1:]):
            return False
        refund = kind == 1
        account_id = from_account_id if refund else to_account_id
        if partition_for(account_id, self.n_partitions) != self.partition:
            return False
        leg_id = transfer_id + (":refund" if refund else ":credit")
        okey2 = b"".join([b"i", account_id.encode(), b"\0", leg_id.encode()])
        okey = b"".join([okey2, b"\0", from_account_id.encode()])
        if self._outcome(okey) is not None or (refund and self._outcome(okey2) is not None):
            return False  # seen before (a refund's key once had two parts)
        state = self.accounts[account_id] if account_id in self.accounts else \
            self.load(account_id)
        outcome_expires_at = now + self.window_ms
        refused = ""
        if refund:
            if state is None or state.balance_minor + amount > MAX_MINOR:
                return False  # a dead letter, or a rejection for an operator
            value = self._leg_event(state, account_id, transfer_id, leg_id, issued_at,
                                    actor, correlation_id, amount, _BYTE[10],
                                    to_account_id, reason if reason else "refused")
            if self._outcome(transaction_key(account_id, transfer_id)) is not None:
                # its record, kept (its id stays used): no longer to be reversed
                self._transfer_record(transfer_id, account_id, to_account_id, amount, currency,
                                      issued_at, actor, correlation_id, "rejected")
        else:
            refused = ACCOUNT_NOT_FOUND if state is None else \
                ACCOUNT_CLOSED if state.status != "open" else \
                CURRENCY_MISMATCH if state.currency != currency else \
                BALANCE_OUT_OF_RANGE if state.balance_minor + amount > MAX_BALANCE_MINOR else ""
            if refused:
                value = encode_rejection(
                    self.h, leg_id, to_account_id, "TransferCredit", refused,
                    "".join(["transfer ", transfer_id, " refunded to ", from_account_id]),
                    issued_at, correlation_id, actor)
                stats = self.stats
                stats.rejections += 1
                stats.reasons[refused] = stats.reasons.get(refused, 0) + 1
                self.outputs.append(Output("rejections", account_id.encode(), value))
                self._send_leg(True, transfer_id, from_account_id, to_account_id, amount,
                               currency, issued_at, actor, correlation_id, refused,
                               outcome_expires_at)
            else:
                assert state is not None
                value = self._leg_event(state, account_id, transfer_id, leg_id, issued_at,
                                        actor, correlation_id, amount, _BYTE[8],
                                        from_account_id, None)
        if not refused:
            self.stats.events += 1
            self.outputs.append(Output("events", account_id.encode(), value))
        self.writes[okey] = encode_outcome(self.h, signature[1:17], value, bool(refused),
                                           outcome_expires_at)
        self.retained.append((outcome_expires_at, okey))
        return True

    def message(self, buf: bytes, start: int, now: int) -> bool:
        """A transaction's PREPARE, COMMIT or ABORT (``ledger.TransactionMessage`` bytes
        from ``start``) at the participant here, if this core takes it (True): signed over
        its bytes, not expired, without metadata; a PREPARE seen for the first time, a
        COMMIT or ABORT of a reservation that is there. The rest (a VOTE, at the
        coordinator; copies; an ABORT before its PREPARE) is left to the processor."""
        r = Reader(buf, start)
        kind = r.long()  # PREPARE, VOTE, COMMIT, ABORT
        if not 0 <= kind <= 3:
            return False
        tid = r.string()
        coordinator = r.string()
        account_id = r.string()
        postings = read_postings(r)
        accepted = r.boolean()
        reason = r.opt_str()
        detail = r.opt_str()
        index = r.long()
        issued_at = r.long()
        actor = r.string()
        correlation_id = r.opt_str()
        expires_at = r.long()
        if r.present() or r.string_map() or expires_at <= now:
            return False  # a reversal's steps, metadata: the processor's
        end = r.i  # the signature: 32 bytes (its length, 0x40), the last field
        if len(buf) != end + 33 or buf[end] != 64:
            return False
        mac = hmac.new(self.leg_secret, b"transaction\0" + buf[:end], hashlib.sha256)
        if not hmac.compare_digest(mac.digest(), buf[end + 1:]):
            return False
        if issued_at < now:  # a step happens when its partition takes it
            issued_at = now
        if partition_for(coordinator if kind == 1 else account_id,
                         self.n_partitions) != self.partition:
            return False
        if kind == 1:
            return self._vote(tid, coordinator, account_id, accepted, reason, detail, index,
                              issued_at, now)
        state = self.accounts[account_id] if account_id in self.accounts else \
            self.load(account_id)
        rid = "".join(["transaction\0", coordinator, "\0", tid])
        outcome_expires_at = now + self.window_ms
        if kind != 0:  # COMMIT, ABORT
            if state is None or rid not in state.holds:
                return False
            held, _ = state.holds.pop(rid)
            state.held_minor -= held
            payload: list[bytes] = []
            if kind == 2:
                mine = [p for p in postings if account_id in (p[0], p[1])]
                net = net_of(account_id, mine)
                state.balance_minor += net
                payload.append(_BYTE[24])  # TransactionPosted
                write_str(payload, tid)
                write_str(payload, coordinator)
                write_long(payload, net)
                write_postings(payload, mine)
            else:
                payload.append(_BYTE[26])  # TransactionReleased
                write_str(payload, tid)
                write_str(payload, coordinator)
                write_long(payload, held)
                write_str(payload, reason if reason else "rejected")
            self._step_event(state, tid, tid + (":commit" if kind == 2 else ":abort"),
                             issued_at, actor, correlation_id, payload)
            return True
        okey = "".join(["i", account_id, "\0", tid, ":prepare\0", coordinator]).encode()
        aborted = "".join(["i", account_id, "\0", tid, ":abort\0", coordinator]).encode()
        if self._outcome(okey) is not None or self._outcome(aborted) is not None:
            return False
        if state is None:
            refused, why, where = transaction_refusal(False, account_id, "", 0, "", 0, 0, 0,
                                                         0, postings)
        else:
            refused, why, where = transaction_refusal(
                True, account_id, state.status, state.version, state.currency,
                state.balance_minor - state.held_minor, state.overdraft_limit_minor,
                state.held_minor, state.balance_minor, postings)
        record: bytes | None = None
        vote_at = issued_at
        if not refused:
            assert state is not None
            net = net_of(account_id, postings)
            reserve = -net if net < 0 else 0
            state.held_minor += reserve
            state.holds[rid] = (reserve, 0)
            payload = [_BYTE[22]]  # TransactionReserved
            write_str(payload, tid)
            write_str(payload, coordinator)
            write_long(payload, reserve)
            record = self._step_event(state, tid, tid + ":prepare", issued_at, actor,
                                      correlation_id, payload)
            vote_at = state.updated_at
        self._send_step(1, tid, coordinator, account_id, postings, not refused,
                        refused if refused else None, why if refused else None,
                        where if refused else -1, vote_at, actor, correlation_id,
                        outcome_expires_at)
        self.writes[okey] = encode_outcome(self.h, buf[end + 1:end + 17], record, False,
                                           outcome_expires_at)
        self.retained.append((outcome_expires_at, okey))
        return True

    def _prepare_all(self, c: Cmd, state: Account, now: int, expires_at: int) -> None:
        """After a TransactionStarted: the coordinator's record, its deadline, and a
        PREPARE to every participant."""
        assert c.postings is not None
        tid, coordinator = c.command_id, c.account_id
        parties = participants(c.postings)
        deadline = self.deadline
        self.writes[transaction_key(coordinator, tid)] = encode_record(
            self.h, tid, coordinator, c.postings, parties, [], "pending", deadline,
            state.updated_at, c.actor, c.correlation_id)
        self.writes[deadline_key(deadline, coordinator, tid)] = b""
        for account_id in parties:
            self._send_step(0, tid, coordinator, account_id, c.postings, False, None, None, -1,
                            state.updated_at, c.actor, c.correlation_id, expires_at)

    def _vote(self, tid: str, coordinator: str, account_id: str, accepted: bool,
              reason: str | None, detail: str | None, index: int, issued_at: int,
              now: int) -> bool:
        """A participant's VOTE at the coordinator, if this core takes it: its record here,
        pending, of the current schema, without links or metadata."""
        tkey = transaction_key(coordinator, tid)
        raw = self._outcome(tkey)
        n = len(self.h.record)
        if raw is None or raw[:n] != self.h.record:
            return False
        r = Reader(raw, n)
        r.string()
        r.string()
        postings = read_postings(r)
        parties = read_strings(r)
        voted = read_strings(r)
        status = r.string()
        deadline = r.long()
        started_at = r.long()
        actor = r.string()
        correlation_id = r.opt_str()
        if r.present() or r.present() or r.string_map() or r.boolean() or not r.done():
            return False  # a reversal, a reversed one, metadata, a transfer: the processor's
        if status != "pending" or account_id not in parties:
            return False
        state = self.accounts[coordinator] if coordinator in self.accounts else \
            self.load(coordinator)
        if state is None:
            return False
        if accepted:
            if account_id not in voted:
                voted.append(account_id)
            if len(voted) < len(parties):
                self.writes[tkey] = encode_record(self.h, tid, coordinator, postings, parties,
                                                  voted, "pending", deadline, started_at,
                                                  actor, correlation_id)
                self.writes[deadline_key(deadline, coordinator, tid)] = b""
                return True
        payload: list[bytes] = []
        if accepted:
            payload.append(_BYTE[28])  # TransactionCommitted
            write_str(payload, tid)
        else:
            reason = reason if reason else INVALID_COMMAND
            payload.append(_BYTE[30])  # TransactionRejected
            write_str(payload, tid)
            write_str(payload, reason)
            write_str(payload, detail if detail else "")
            write_long(payload, index)
        self._step_event(state, tid, "".join([tid, ":vote:", account_id]), issued_at, actor,
                         correlation_id, payload)
        self.writes[tkey] = encode_record(self.h, tid, coordinator, postings, parties, voted,
                                          "committed" if accepted else "rejected", deadline,
                                          started_at, actor, correlation_id)
        self.writes[deadline_key(deadline, coordinator, tid)] = None  # the record is kept
        expires_at = now + self.window_ms
        for party in parties:
            self._send_step(2 if accepted else 3, tid, coordinator, party, postings, False,
                            None if accepted else reason, None, -1, state.updated_at, actor,
                            correlation_id, expires_at)
        return True

    def _send_step(self, kind: int, tid: str, coordinator: str, account_id: str,
                   postings: list[Posting], accepted: bool, reason: str | None,
                   detail: str | None, index: int, issued_at: int, actor: str,
                   correlation_id: str | None, expires_at: int) -> None:
        """A transaction's message (PREPARE, VOTE, COMMIT, ABORT), signed over its bytes, to
        the partition of the account that handles it (the coordinator, for a VOTE)."""
        out = [self.h.message, _BYTE[2 * kind]]
        write_str(out, tid)
        write_str(out, coordinator)
        write_str(out, account_id)
        write_postings(out, postings)
        out.append(_BYTE[1 if accepted else 0])
        write_opt_str(out, reason)
        write_opt_str(out, detail)
        write_long(out, index)
        write_long(out, issued_at)
        write_str(out, actor)
        write_opt_str(out, correlation_id)
        write_long(out, expires_at)
        out.append(b"\0\0")  # reverses nothing, no metadata
        unsigned = b"".join(out)
        signature = hmac.new(self.leg_secret, b"transaction\0" + unsigned, hashlib.sha256)
        self.stats.legs += 1
        self.outputs.append(Output("transfers", (coordinator if kind == 1 else account_id)
                                   .encode(), unsigned + b"\x40" + signature.digest()))

    def _step_event(self, state: Account, tid: str, causation_id: str, issued_at: int,
                    actor: str, correlation_id: str | None, payload: list[bytes]) -> bytes:
        """A transaction's event at a participant (``payload``: its union branch and
        fields), for ``state`` changed by it already but for its version and time."""
        state.version += 1
        if issued_at > state.updated_at:
            state.updated_at = issued_at
        self.dirty.add(state.account_id)
        out = self._envelope(state, tid, causation_id, correlation_id, actor)
        out.extend(payload)
        out.append(_BYTE[0])  # no metadata
        value = b"".join(out)
        self.stats.events += 1
        self.outputs.append(Output("events", state.account_id.encode(), value))
        return value

    def _outcome(self, okey: bytes) -> bytes | None:
        """The stored outcome of an id: this batch's, or the store's."""
        return self.writes[okey] if okey in self.writes else self.read(okey)

    def _leg_event(self, state: Account, account_id: str, transfer_id: str, leg_id: str,
                   issued_at: int, actor: str, correlation_id: str | None, amount: int,
                   branch: bytes, other_account_id: str, reason: str | None) -> bytes:
        """Credit ``amount`` to ``state``: a TransferCredited (``branch``, from
        ``other_account_id``) or a TransferReversed (to it, for ``reason``) event."""
        state.version += 1
        if issued_at > state.updated_at:
            state.updated_at = issued_at
        state.balance_minor += amount
        self.dirty.add(account_id)
        out = self._envelope(state, transfer_id, leg_id, correlation_id, actor)
        out.append(branch)
        write_str(out, transfer_id)
        write_str(out, other_account_id)
        write_long(out, amount)
        if reason is not None:
            write_str(out, reason)
        out.append(_BYTE[0])  # no metadata
        return b"".join(out)

    def _envelope(self, state: Account, command_id: str, causation_id: str,
                  correlation_id: str | None, actor: str) -> list[bytes]:
        """The parts of an event up to its payload, for ``state`` after it."""
        out = [self.h.event]
        write_str(out, event_id(causation_id, state.account_id, state.version))
        write_str(out, state.account_id)
        write_long(out, state.version)
        write_str(out, state.currency)
        write_long(out, state.balance_minor)
        write_long(out, state.balance_minor - state.held_minor)
        write_long(out, state.updated_at)
        write_str(out, command_id)
        write_str(out, causation_id)
        write_opt_str(out, correlation_id)
        write_str(out, actor)
        return out

    def _transfer_record(self, transfer_id: str, source: str, destination: str | None,
                         amount: int | None, currency: str | None, issued_at: int, actor: str,
                         correlation_id: str | None, status: str) -> None:
        """A transfer's record at its source (``streams.transactions.transfer_record``):
        committed once debited, rejected once refunded."""
        assert destination is not None and amount is not None and currency is not None
        self.writes[transaction_key(source, transfer_id)] = encode_record(
            self.h, transfer_id, source, [(source, destination, amount, currency, None)],
            [source, destination], [], status, 0, issued_at, actor, correlation_id, True)

    def _credit_leg(self, c: Cmd, occurred_at: int, expires_at: int) -> None:
        """The credit leg of an accepted transfer, to the destination's partition."""
        assert c.to_account_id is not None and c.amount_minor is not None
        assert c.currency is not None
        self._send_leg(False, c.command_id, c.account_id, c.to_account_id, c.amount_minor,
                       c.currency, occurred_at, c.actor, c.correlation_id, None, expires_at)

    def _send_leg(self, refund: bool, transfer_id: str, from_account_id: str,
                  to_account_id: str, amount: int, currency: str, issued_at: int, actor: str,
                  correlation_id: str | None, reason: str | None, expires_at: int) -> None:
        """A leg, signed (``leg_secret``: the processor's LegSigner key, over its bytes
        with an empty signature), to the partition of the account that receives it."""
        body = [_BYTE[2 if refund else 0]]  # REFUND, CREDIT
        write_str(body, transfer_id)
        write_str(body, from_account_id)
        write_str(body, to_account_id)
        write_long(body, amount)
        write_str(body, currency)
        write_long(body, issued_at)
        write_str(body, actor)
        write_opt_str(body, correlation_id)
        write_opt_str(body, reason)
        write_long(body, expires_at)
        body.append(_BYTE[0])  # no metadata
        unsigned = b"".join(body)
        signature = hmac.new(self.leg_secret, unsigned + b"\0", hashlib.sha256).digest()
        out = [self.h.leg, unsigned]
        write_bytes(out, signature)
        self.stats.legs += 1
        account_id = from_account_id if refund else to_account_id
        self.outputs.append(Output("transfers", account_id.encode(), b"".join(out)))


# The head of every stored value (``streams.worker.state``): tag_commands,
# tag_transfers, len(prev) (-1: none).
VALUE_HEAD: Final = struct.Struct(">qqi")
_HEAD_SIZE: Final = 20  # VALUE_HEAD.size, as a constant for the compiled reads


def unwrap(raw: bytes | None, commands: int, transfers: int) -> bytes | None:
    """The committed value of a stored record (see ``streams.worker.state``), as of a
    checkpoint at these input offsets."""
    if raw is None:
        return None
    head: tuple[int, int, int] = VALUE_HEAD.unpack_from(raw)
    prev_len = head[2]
    if head[0] <= commands and head[1] <= transfers:
        return raw[_HEAD_SIZE + max(prev_len, 0):]
    return None if prev_len < 0 else raw[_HEAD_SIZE:_HEAD_SIZE + prev_len]


class Reads:
    """Committed reads of one partition's store for one step, each key read once:
    through ``overlay`` (the changes of a step decided before and not yet written to
    the store), then ``resident`` (the accounts as the steps before left them, kept
    across steps: see ``keep_resident``), then the store (``db_get``), as of the
    checkpoint's offsets."""

    def __init__(self, db_get: Callable[[bytes], bytes | None], commands: int,
                 transfers: int, overlay: dict[bytes, bytes | None],
                 resident: dict[bytes, bytes | None]) -> None:
        self.db_get = db_get
        self.commands = commands
        self.transfers = transfers
        self.overlay = overlay
        self.resident = resident
        self.known: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        known = self.known
        if key in known:
            return known[key]
        overlay = self.overlay
        resident = self.resident
        if key in overlay:
            value = overlay[key]
        elif key in resident:
            value = resident[key]
        else:
            value = unwrap(self.db_get(key), self.commands, self.transfers)
        known[key] = value
        return value


def keep_resident(resident: dict[bytes, bytes | None], known: dict[bytes, bytes | None],
                  changes: dict[bytes, bytes | None], max_keys: int) -> None:
    """Keep a decided step's account values (``a<id>``: those it read, then those it
    wrote) for the steps after it, so that an account a step touches is read from
    RocksDB once, not once a step. The most recently written are kept: past
    ``max_keys`` the oldest go."""
    for key, value in known.items():
        if key[:1] == b"a" and key not in resident:
            resident[key] = value
    for key, value in changes.items():
        if key[:1] == b"a":
            resident.pop(key, None)
            resident[key] = value
    excess = len(resident) - max_keys
    if excess > 0:
        for key in list(resident)[:excess]:
            del resident[key]


def wrap_changes(changes: dict[bytes, bytes | None], known: dict[bytes, bytes | None],
                 previous: Callable[[bytes], bytes | None], tag_commands: int,
                 tag_transfers: int) -> dict[bytes, bytes | None]:
    """Store records (key -> value carrying its undo information, None deletes) for a
    step's changes: ``tag_commands (8) | tag_transfers (8) | len(prev) (4, -1 = none) |
    prev | new`` (see ``streams.worker.state``). ``known``: values read already; ``previous``
    reads the others."""
    tag = tag_commands.to_bytes(8, "big", signed=True) + \
        tag_transfers.to_bytes(8, "big", signed=True)
    none = tag + b"\xff\xff\xff\xff"
    out: dict[bytes, bytes | None] = {}
    for key, new in changes.items():
        if new is None:
            out[key] = None
            continue
        prev = known[key] if key in known else previous(key)
        if prev is None:
            out[key] = none + new
        else:
            out[key] = b"".join([tag, len(prev).to_bytes(4, "big"), prev, new])
    return out


def participants(postings: list[Posting]) -> list[str]:
    """The accounts the postings name, each once, in the order they first appear."""
    seen: dict[str, None] = {}
    for p in postings:
        if p[0] not in seen:
            seen[p[0]] = None
        if p[1] not in seen:
            seen[p[1]] = None
    return list(seen)


def transaction_key(coordinator_account_id: str, transaction_id: str) -> bytes:
    """A transaction's record at its coordinator: ``t<account>\\0<transaction id>``."""
    return "".join(["t", coordinator_account_id, "\0", transaction_id]).encode()


def deadline_key(deadline: int, coordinator_account_id: str, transaction_id: str) -> bytes:
    """Pending transactions by deadline: ``y<deadline:8><account>\\0<transaction id>``."""
    return b"".join([b"y", deadline.to_bytes(8, "big", signed=True),
                     coordinator_account_id.encode(), b"\0", transaction_id.encode()])


def encode_record(h: Headers, tid: str, coordinator: str, postings: list[Posting],
                  parties: list[str], voted: list[str], status: str, deadline: int,
                  issued_at: int, actor: str, correlation_id: str | None,
                  transfer: bool = False) -> bytes:
    """A ``ledger.state.TransactionRecord`` that reverses nothing, is reversed by nothing
    and has no metadata (``transfer``: a transfer's, at its source)."""
    out = [h.record]
    write_str(out, tid)
    write_str(out, coordinator)
    write_postings(out, postings)
    for names in (parties, voted):
        if names:
            write_long(out, len(names))
            for name in names:
                write_str(out, name)
        out.append(_BYTE[0])
    write_str(out, status)
    write_long(out, deadline)
    write_long(out, issued_at)
    write_str(out, actor)
    write_opt_str(out, correlation_id)
    out.append(b"\0\0\0")  # reverses, reversed_by: null; metadata: empty
    out.append(_BYTE[1 if transfer else 0])
    return b"".join(out)


def read_postings(r: Reader) -> list[Posting]:
    out: list[Posting] = []
    n = r.block()
    while n:
        for _ in range(n):
            out.append((r.string(), r.string(), r.long(), r.string(), r.opt_long()))
        n = r.block()
    return out


def read_strings(r: Reader) -> list[str]:
    out: list[str] = []
    n = r.block()
    while n:
        for _ in range(n):
            out.append(r.string())
        n = r.block()
    return out


def expiry_key(expires_at: int, account_id: str, hold_id: str) -> bytes:
    """The hold expiry index: ``x<expires_at:8><account>\\0<hold_id>``."""
    return b"".join([b"x", expires_at.to_bytes(8, "big", signed=True), account_id.encode(),
                     b"\0", hold_id.encode()])


def _content(c: Cmd) -> str:
    """What a command asks for, as ``streams.worker.processor.command_digest`` hashes it: its
    type and its fields but ``issued_at`` and ``correlation_id``, in the model's order."""
    k = c.kind
    base = (c.command_id, c.account_id, c.actor, c.expected_version)
    if k == OPEN_ACCOUNT:
        fields: tuple[object, ...] = (*base, c.currency, c.overdraft_limit_minor)
    elif k in (DEPOSIT, WITHDRAW):
        fields = (*base, c.amount_minor, c.currency)
    elif k == TRANSFER:
        fields = (*base, c.to_account_id, c.amount_minor, c.currency)
    elif k == PLACE_HOLD:
        fields = (*base, c.hold_id, c.amount_minor, c.currency, c.expires_at)
    elif k == CAPTURE_HOLD:
        fields = (*base, c.hold_id, c.amount_minor)
    elif k in (RELEASE_HOLD, EXPIRE_HOLD):
        fields = (*base, c.hold_id)
    elif k == TRANSACTION:
        fields = (*base, c.postings)
    else:
        fields = base
    return repr((COMMAND_NAMES[k], fields))
