"""Pydantic models that mirror the ``.avsc`` files field for field.

The Avro schemas are the source of truth; these classes give them types in Python.
``tests/unit/test_models.py`` proves each model survives encode -> decode unchanged.
Timestamps are epoch milliseconds (UTC) as integers; money is integer minor units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from schemas.codec import CODEC
from schemas.text import MAX_ID_LENGTH, plain


def _plain(value: str) -> str:
    if not plain(value):
        raise ValueError("must not hold control, format or line separator characters")
    return value


def _long(value: int) -> int:
    if not -(2**63) <= value < 2**63:
        raise PydanticCustomError("int64_range", "must fit in a signed 64-bit integer")
    return value


def _unicode(value: str) -> str:
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for it
            raise PydanticCustomError("string_unicode", "not valid Unicode text") from None
    return value


# An identifier: no control or invisible characters (schemas/text.py; NUL separates
# the parts of store keys).
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH), AfterValidator(_plain)]
# Metadata: a bounded map of text to text, on accounts and money-moving commands
# (carried into their events); what a client finds them by (``?meta.KEY=VALUE``).
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 256
MetaKey = Annotated[str, Field(min_length=1, max_length=MAX_METADATA_KEY),
                    AfterValidator(_plain)]
MetaValue = Annotated[str, Field(max_length=MAX_METADATA_VALUE), AfterValidator(_plain)]
Metadata = Annotated[dict[MetaKey, MetaValue], Field(max_length=MAX_METADATA_ENTRIES)]

# A command's number: an Avro long. Its text: UTF-8, as Avro writes it.
Long = Annotated[int, AfterValidator(_long)]
Text = Annotated[str, AfterValidator(_unicode)]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def trusted(cls, **values: Any) -> Self:
        """An instance of values that are already valid (decoded by the Avro schema, or
        made by the rules from a validated command): no validation.

        What ``model_construct`` does for a complete set of fields, at a third of its
        cost; the hot path builds several models per command.
        """
        obj = cls.__new__(cls)
        object.__setattr__(obj, "__dict__", values)
        object.__setattr__(obj, "__pydantic_fields_set__", set(values))
        object.__setattr__(obj, "__pydantic_extra__", None)
        object.__setattr__(obj, "__pydantic_private__", None)
        return obj

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (trusted, as for ``trusted``): ``model_copy(update=...)``
        at a quarter of its cost."""
        return self.trusted(**{**self.__dict__, **changes})


# ---------------------------------------------------------------- commands


class CommandBase(Model):
    command_id: Id
    account_id: Id
    actor: Id
    issued_at: Long
    expected_version: Long | None = None
    correlation_id: Annotated[str, Field(max_length=MAX_ID_LENGTH),
                              AfterValidator(_plain)] | None = None

    @property
    def type(self) -> str:
        return type(self).__name__


class OpenAccount(CommandBase):
    currency: Text
    overdraft_limit_minor: Long = 0
    metadata: Metadata = Field(default_factory=dict)


class Deposit(CommandBase):
    amount_minor: Long
    currency: Text
    metadata: Metadata = Field(default_factory=dict)


class Withdraw(CommandBase):
    amount_minor: Long
    currency: Text
    metadata: Metadata = Field(default_factory=dict)


class Transfer(CommandBase):
    """Move money to ``to_account_id``; the transfer id is the ``command_id``."""

    to_account_id: Id
    amount_minor: Long
    currency: Text
    metadata: Metadata = Field(default_factory=dict)


class PlaceHold(CommandBase):
    hold_id: Id
    amount_minor: Long
    currency: Text
    expires_at: Long
    metadata: Metadata = Field(default_factory=dict)


class CaptureHold(CommandBase):
    hold_id: Id
    amount_minor: Long | None = None
    metadata: Metadata = Field(default_factory=dict)


class ReleaseHold(CommandBase):
    hold_id: Id


class ExpireHold(CommandBase):
    hold_id: Id


class CloseAccount(CommandBase):
    pass


class Posting(Model):
    """One movement of a transaction; ``expected_version``: of the source account."""

    from_account_id: Id
    to_account_id: Id
    amount_minor: Long
    currency: Text
    expected_version: Long | None = None

    def to_avro(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Postings in one transaction, at most: every participant is sent them all.
MAX_POSTINGS = 100


class Transaction(CommandBase):
    """Postings that all apply or none does; the transaction id is the ``command_id``,
    scoped to ``account_id``, the coordinator."""

    postings: Annotated[list[Posting], Field(min_length=1, max_length=MAX_POSTINGS)]
    metadata: Metadata = Field(default_factory=dict)


class Reverse(CommandBase):
    """Post the opposite of ``transaction_id``: a committed transaction of this account, or
    a transfer from it."""

    transaction_id: Id
    metadata: Metadata = Field(default_factory=dict)


class ExpireTransaction(CommandBase):
    """End ``transaction_id`` if a participant has not answered by its deadline."""

    transaction_id: Id


class SetAccountMetadata(CommandBase):
    """Replace the account's metadata."""

    metadata: Metadata


Command = (
    OpenAccount | Deposit | Withdraw | Transfer | PlaceHold | CaptureHold | ReleaseHold
    | ExpireHold | CloseAccount | Transaction | Reverse | ExpireTransaction | SetAccountMetadata
)
COMMAND_TYPES: dict[str, type[CommandBase]] = {
    c.__name__: c
    for c in (OpenAccount, Deposit, Withdraw, Transfer, PlaceHold, CaptureHold, ReleaseHold,
              ExpireHold, CloseAccount, Transaction, Reverse, ExpireTransaction,
              SetAccountMetadata)
}

# ---------------------------------------------------------------- events


class AccountOpened(Model):
    overdraft_limit_minor: int


class Deposited(Model):
    amount_minor: int


class Withdrawn(Model):
    amount_minor: int


class TransferDebited(Model):
    transfer_id: str
    to_account_id: str
    amount_minor: int


class TransferCredited(Model):
    transfer_id: str
    from_account_id: str
    amount_minor: int


class TransferReversed(Model):
    transfer_id: str
    to_account_id: str
    amount_minor: int
    reason: str


class HoldPlaced(Model):
    hold_id: str
    amount_minor: int
    expires_at: int


class HoldCaptured(Model):
    hold_id: str
    captured_minor: int
    released_minor: int


class HoldReleased(Model):
    hold_id: str
    amount_minor: int
    reason: Literal["released", "expired"]


class AccountClosed(Model):
    pass


class TransactionStarted(Model):
    transaction_id: str
    postings: list[Posting]
    deadline: int
    reverses: str | None = None


class TransactionReserved(Model):
    transaction_id: str
    coordinator_account_id: str
    amount_minor: int


class TransactionPosted(Model):
    transaction_id: str
    coordinator_account_id: str
    amount_minor: int
    postings: list[Posting]


class TransactionReleased(Model):
    transaction_id: str
    coordinator_account_id: str
    amount_minor: int
    reason: str


class TransactionCommitted(Model):
    transaction_id: str


class TransactionRejected(Model):
    transaction_id: str
    reason: str
    detail: str
    posting_index: int


class AccountMetadataSet(Model):
    metadata: dict[str, str]


Payload = (
    AccountOpened | Deposited | Withdrawn | TransferDebited | TransferCredited
    | TransferReversed | HoldPlaced | HoldCaptured | HoldReleased | AccountClosed
    | TransactionStarted | TransactionReserved | TransactionPosted | TransactionReleased
    | TransactionCommitted | TransactionRejected | AccountMetadataSet
)
PAYLOAD_TYPES: dict[str, type[Model]] = {
    c.__name__: c
    for c in (AccountOpened, Deposited, Withdrawn, TransferDebited, TransferCredited,
              TransferReversed, HoldPlaced, HoldCaptured, HoldReleased, AccountClosed,
              TransactionStarted, TransactionReserved, TransactionPosted, TransactionReleased,
              TransactionCommitted, TransactionRejected, AccountMetadataSet)
}

_WITH_POSTINGS = (TransactionStarted, TransactionPosted)


class LedgerEvent(Model):
    avro_name: ClassVar[str] = "ledger.LedgerEvent"

    event_id: str
    account_id: str
    version: int
    currency: str
    balance_after_minor: int
    available_after_minor: int
    occurred_at: int
    command_id: str
    causation_id: str
    correlation_id: str | None
    actor: str
    payload: Payload
    metadata: dict[str, str] = Field(default_factory=dict)

    @property
    def type(self) -> str:
        return type(self.payload).__name__

    def to_avro(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        body = self.payload.__dict__
        if isinstance(self.payload, _WITH_POSTINGS):
            body = dict(body, postings=[p.to_avro() for p in body["postings"]])
        d["payload"] = ("ledger." + self.type, body)
        return d

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> LedgerEvent:
        name, body = d["payload"]
        kind = PAYLOAD_TYPES[name.rsplit(".", 1)[-1]]
        if kind in _WITH_POSTINGS:
            body = dict(body, postings=postings_from_avro(body["postings"]))
        return cls.trusted(**dict(d, payload=kind.trusted(**body)))


class Rejection(Model):
    avro_name: ClassVar[str] = "ledger.Rejection"

    command_id: str
    account_id: str
    command_type: str
    reason: str
    detail: str
    occurred_at: int
    correlation_id: str | None
    actor: str

    def to_avro(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> Rejection:
        return cls.trusted(**d)


class TransferLeg(Model):
    """Half of a transfer travelling between partitions (``ledger.transfers``)."""

    avro_name: ClassVar[str] = "ledger.TransferLeg"

    kind: Literal["CREDIT", "REFUND"]
    transfer_id: str
    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    issued_at: int
    actor: str
    correlation_id: str | None = None
    reason: str | None = None
    expires_at: int = 0  # 0: a leg of the first version (see LegSigner)
    metadata: dict[str, str] = Field(default_factory=dict)
    signature: bytes = b""

    @property
    def account_id(self) -> str:
        """The account whose partition handles this leg."""
        return self.to_account_id if self.kind == "CREDIT" else self.from_account_id

    @property
    def leg_id(self) -> str:
        """Idempotency key of the leg at the account that receives it."""
        return f"{self.transfer_id}:{self.kind.lower()}"

    def to_avro(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> TransferLeg:
        return cls.trusted(**d)


class TransactionMessage(Model):
    """One step of a transaction between its coordinator and a participant
    (``ledger.transfers``): PREPARE and COMMIT/ABORT to the participant, VOTE back."""

    avro_name: ClassVar[str] = "ledger.TransactionMessage"

    kind: Literal["PREPARE", "VOTE", "COMMIT", "ABORT"]
    transaction_id: str
    coordinator_account_id: str
    account_id: str  # the participant
    postings: list[Posting]
    accepted: bool = False
    reason: str | None = None
    detail: str | None = None
    posting_index: int = -1
    issued_at: int = 0
    actor: str = ""
    correlation_id: str | None = None
    expires_at: int = 0
    reverses: str | None = None  # what the transaction reverses: a transfer is checked
    metadata: dict[str, str] = Field(default_factory=dict)
    signature: bytes = b""

    @property
    def to(self) -> str:
        """The account whose partition handles this message."""
        return self.coordinator_account_id if self.kind == "VOTE" else self.account_id

    def to_avro(self) -> dict[str, Any]:
        return dict(self.__dict__, postings=[p.to_avro() for p in self.postings])

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> TransactionMessage:
        return cls.trusted(**dict(d, postings=postings_from_avro(d["postings"])))


def postings_from_avro(items: list[dict[str, Any]]) -> list[Posting]:
    return [Posting.trusted(**p) for p in items]


# ---------------------------------------------------------------- state


class Hold(Model):
    amount_minor: int
    expires_at: int


class AccountState(Model):
    avro_name: ClassVar[str] = "ledger.state.AccountState"

    account_id: str
    currency: str
    status: Literal["open", "closed"]
    overdraft_limit_minor: int
    balance_minor: int
    held_minor: int
    version: int
    updated_at: int
    holds: dict[str, Hold] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)

    @property
    def available_minor(self) -> int:
        return self.balance_minor - self.held_minor

    def to_avro(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["holds"] = {k: h.__dict__ for k, h in self.holds.items()}
        return d

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> AccountState:
        holds = {k: Hold.trusted(**h) for k, h in d["holds"].items()}
        return cls.trusted(**dict(d, holds=holds))


class CommandOutcome(Model):
    """What a command_id produced: the encoded records, kept for retries."""

    avro_name: ClassVar[str] = "ledger.state.CommandOutcome"

    digest: bytes
    records: list[bytes]
    rejected: bool
    expires_at: int = 0  # partition clock (ms) after which the id is forgotten; 0: never

    def to_avro(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> CommandOutcome:
        return cls.trusted(**d)


class TransactionRecord(Model):
    """A transaction at its coordinator: who reserved, how it ended, what reversed it; or
    a transfer at its source (``transfer``), kept so that it can be reversed."""

    avro_name: ClassVar[str] = "ledger.state.TransactionRecord"

    transaction_id: str
    coordinator_account_id: str
    postings: list[Posting]
    participants: list[str]
    voted: list[str]
    state: Literal["pending", "committed", "rejected"]
    deadline: int
    issued_at: int
    actor: str
    correlation_id: str | None = None
    reverses: str | None = None
    reversed_by: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    transfer: bool = False  # a transfer's, at its source: committed = debited, rejected = refunded

    def to_avro(self) -> dict[str, Any]:
        return dict(self.__dict__, postings=[p.to_avro() for p in self.postings])

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> TransactionRecord:
        return cls.trusted(**dict(d, postings=postings_from_avro(d["postings"])))


# ---------------------------------------------------------------- wire helpers


def command_to_avro(c: CommandBase) -> tuple[str, dict[str, Any]]:
    if isinstance(c, Transaction):
        return ("ledger.Transaction", dict(c.__dict__, postings=[p.to_avro() for p in c.postings]))
    return ("ledger." + c.type, c.__dict__)


def command_from_avro(item: tuple[str, dict[str, Any]]) -> CommandBase:
    name, body = item
    return COMMAND_TYPES[name.rsplit(".", 1)[-1]].model_validate(body)


def encode_batch(commands: Sequence[CommandBase]) -> bytes:
    return CODEC.encode("ledger.CommandBatch", {"commands": [command_to_avro(c) for c in commands]})


def encode(obj: LedgerEvent | Rejection | TransferLeg | AccountState | CommandOutcome
           | TransactionMessage | TransactionRecord) -> bytes:
    return CODEC.encode(obj.avro_name, obj.to_avro())
