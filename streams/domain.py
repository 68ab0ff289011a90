"""The ledger's rules: pure ``decide`` and ``evolve``, no Kafka, no clock, no I/O.

``decide(state, command) -> Decision`` says what a command does to one account: one
event, or one rejection with a reason from ``Reason`` (an ordered list: the first
rule a command breaks is the one reported). ``decide_leg`` does the same for the
halves of a transfer that travel between partitions. ``evolve(state, event)`` is
the only code that changes a balance; the worker, replay, rebuild, verify and the
tests all fold events through it.

Time comes from the command (``issued_at``), never from a clock; an event's
``occurred_at`` is ``max(issued_at, the account's last occurred_at)`` so that each
account's history is ordered in time as it is in versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from schemas.models import (
    AccountClosed,
    AccountMetadataSet,
    AccountOpened,
    AccountState,
    CaptureHold,
    CloseAccount,
    CommandBase,
    Deposit,
    Deposited,
    ExpireHold,
    Hold,
    HoldCaptured,
    HoldPlaced,
    HoldReleased,
    LedgerEvent,
    OpenAccount,
    Payload,
    PlaceHold,
    Rejection,
    ReleaseHold,
    SetAccountMetadata,
    Transaction,
    TransactionMessage,
    TransactionPosted,
    TransactionReleased,
    TransactionReserved,
    Transfer,
    TransferCredited,
    TransferDebited,
    TransferLeg,
    TransferReversed,
    Withdraw,
    Withdrawn,
)
from schemas.money import MAX_BALANCE_MINOR, MAX_MINOR
from streams import core
from streams.core import event_id


class Reason(StrEnum):
    """Why a command was refused, in the order the rules are checked."""

    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    INVALID_COMMAND = "invalid_command"
    WRONG_PARTITION = "wrong_partition"
    ISSUED_IN_FUTURE = "issued_in_future"
    INVALID_AMOUNT = "invalid_amount"
    UNSUPPORTED_CURRENCY = "unsupported_currency"
    INVALID_OVERDRAFT_LIMIT = "invalid_overdraft_limit"
    INVALID_EXPIRY = "invalid_expiry"
    TRANSFER_TO_SELF = "transfer_to_self"
    ACCOUNT_NOT_FOUND = "account_not_found"
    ACCOUNT_ALREADY_EXISTS = "account_already_exists"
    ACCOUNT_CLOSED = "account_closed"
    VERSION_CONFLICT = "version_conflict"
    CURRENCY_MISMATCH = "currency_mismatch"
    HOLD_NOT_FOUND = "hold_not_found"
    HOLD_ALREADY_EXISTS = "hold_already_exists"
    HOLD_EXPIRED = "hold_expired"
    HOLD_NOT_EXPIRED = "hold_not_expired"
    CAPTURE_EXCEEDS_HOLD = "capture_exceeds_hold"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    BALANCE_OUT_OF_RANGE = "balance_out_of_range"
    BALANCE_NOT_ZERO = "balance_not_zero"
    HOLDS_OPEN = "holds_open"
    TRANSACTION_NOT_FOUND = "transaction_not_found"
    TRANSACTION_NOT_COMMITTED = "transaction_not_committed"
    ALREADY_REVERSED = "already_reversed"
    TRANSFER_REFUNDED = "transfer_refunded"
    TRANSACTION_NOT_PENDING = "transaction_not_pending"
    TRANSACTION_NOT_EXPIRED = "transaction_not_expired"
    TRANSACTION_TIMED_OUT = "transaction_timed_out"


class Refused(Exception):
    """Raised inside the rules and turned into a Rejection; never escapes ``decide``."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decision:
    """What one input produced: events for its account, or one rejection; plus legs."""

    events: tuple[LedgerEvent, ...] = ()
    rejection: Rejection | None = None
    legs: tuple[TransferLeg, ...] = field(default=())
    state_after: AccountState | None = None
    messages: tuple[TransactionMessage, ...] = ()  # a transaction's steps (streams.transactions)


# ---------------------------------------------------------------- static checks


def _check(broken: tuple[str, str]) -> None:
    """Raise the rule ``streams.core`` found broken, if any."""
    reason, detail = broken
    if reason:
        raise Refused(Reason(reason), detail)


def check_command(command: CommandBase) -> None:
    """Rules that need no state. The client runs these before it sends anything."""
    if isinstance(command, Transaction):
        for i, p in enumerate(command.postings):
            reason, detail = core.static_rules(p.amount_minor, p.currency, None, None, 0,
                                               p.from_account_id == p.to_account_id)
            if reason:
                raise Refused(Reason(reason), f"posting {i}: {detail}")
        return
    _check(core.static_rules(
        getattr(command, "amount_minor", None), getattr(command, "currency", None),
        command.overdraft_limit_minor if isinstance(command, OpenAccount) else None,
        command.expires_at if isinstance(command, PlaceHold) else None, command.issued_at,
        isinstance(command, Transfer) and command.to_account_id == command.account_id))


# ---------------------------------------------------------------- decide


def decide(state: AccountState | None, command: CommandBase) -> Decision:
    """Validate ``command`` against ``state``: one event, or one rejection."""
    try:
        check_command(command)
        payload = _rules(state, command)
    except Refused as r:
        return Decision(rejection=reject(command, r.reason, r.detail))
    metadata = getattr(command, "metadata", None)
    event, after = _event(state, command.account_id, command.command_id, command.command_id,
                          command.issued_at, command.actor, command.correlation_id, payload,
                          currency=getattr(command, "currency", None),
                          metadata=None if isinstance(command, SetAccountMetadata) else metadata)
    legs: tuple[TransferLeg, ...] = ()
    if isinstance(command, Transfer):
        legs = (TransferLeg.trusted(
            kind="CREDIT", transfer_id=command.command_id, from_account_id=command.account_id,
            to_account_id=command.to_account_id, amount_minor=command.amount_minor,
            currency=command.currency, issued_at=event.occurred_at, actor=command.actor,
            correlation_id=command.correlation_id, reason=None, expires_at=0,
            metadata=command.metadata, signature=b"",
        ),)
    return Decision(events=(event,), legs=legs, state_after=after)


def reject(command: CommandBase, reason: Reason, detail: str) -> Rejection:
    return Rejection.trusted(
        command_id=command.command_id, account_id=command.account_id, command_type=command.type,
        reason=reason.value, detail=detail, occurred_at=command.issued_at,
        correlation_id=command.correlation_id, actor=command.actor,
    )


def _open(state: AccountState | None, command: CommandBase) -> AccountState:
    currency = getattr(command, "currency", None)
    if state is None:
        _check(core.open_account_rules(False, command.account_id, "", 0,
                                       command.expected_version, "", currency))
    assert state is not None
    _check(core.open_account_rules(True, command.account_id, state.status, state.version,
                                   command.expected_version, state.currency, currency))
    return state


def _funds(state: AccountState, amount: int) -> None:
    _check(core.funds_rule(state.available_minor, state.overdraft_limit_minor, amount,
                           state.currency))


def _fits(total: int, amount: int, currency: str) -> None:
    _check(core.fits_rule(total, amount, currency))


def _hold(state: AccountState, c: CaptureHold | ReleaseHold | ExpireHold, kind: int,
          at: int) -> Hold:
    hold = state.holds.get(c.hold_id)
    _check(core.hold_rules(kind, c.hold_id,
                           None if hold is None else (hold.amount_minor, hold.expires_at), at,
                           c.amount_minor if isinstance(c, CaptureHold) else None,
                           state.currency))
    assert hold is not None
    return hold


def _rules(state: AccountState | None, c: CommandBase) -> Payload:
    if isinstance(c, OpenAccount):
        _check(core.opening_rules(state is not None, c.account_id, c.expected_version))
        return AccountOpened.trusted(overdraft_limit_minor=c.overdraft_limit_minor)
    s = _open(state, c)
    # Time rules use the instant the event will carry, not the sender's clock alone.
    at = max(c.issued_at, s.updated_at)
    if isinstance(c, Deposit):
        _fits(s.balance_minor, c.amount_minor, s.currency)
        return Deposited.trusted(amount_minor=c.amount_minor)
    if isinstance(c, Withdraw):
        _funds(s, c.amount_minor)
        return Withdrawn.trusted(amount_minor=c.amount_minor)
    if isinstance(c, Transfer):
        _funds(s, c.amount_minor)
        return TransferDebited.trusted(transfer_id=c.command_id, to_account_id=c.to_account_id,
                               amount_minor=c.amount_minor)
    if isinstance(c, PlaceHold):
        _check(core.place_hold_rules(c.hold_id in s.holds, c.hold_id, c.expires_at, at,
                                     s.held_minor, c.amount_minor, s.available_minor,
                                     s.overdraft_limit_minor, s.currency))
        return HoldPlaced.trusted(hold_id=c.hold_id, amount_minor=c.amount_minor,
                                  expires_at=c.expires_at)
    if isinstance(c, CaptureHold):
        hold = _hold(s, c, core.CAPTURE_HOLD, at)
        captured = hold.amount_minor if c.amount_minor is None else c.amount_minor
        return HoldCaptured.trusted(hold_id=c.hold_id, captured_minor=captured,
                                    released_minor=hold.amount_minor - captured)
    if isinstance(c, ReleaseHold):
        hold = _hold(s, c, core.RELEASE_HOLD, at)
        return HoldReleased.trusted(hold_id=c.hold_id, amount_minor=hold.amount_minor,
                                    reason="released")
    if isinstance(c, ExpireHold):
        hold = _hold(s, c, core.EXPIRE_HOLD, at)
        return HoldReleased.trusted(hold_id=c.hold_id, amount_minor=hold.amount_minor,
                                    reason="expired")
    if isinstance(c, CloseAccount):
        _check(core.close_rules(s.balance_minor, len(s.holds), s.currency))
        return AccountClosed.trusted()
    if isinstance(c, SetAccountMetadata):
        return AccountMetadataSet.trusted(metadata=c.metadata)
    raise Refused(Reason.INVALID_COMMAND, f"unknown command type {type(c).__name__}")


def decide_leg(state: AccountState | None, leg: TransferLeg) -> Decision:
    """Apply a transfer leg at the account that receives it.

    A CREDIT that the destination cannot take (missing, closed, other currency)
    becomes a rejection plus a REFUND leg back to the source; a REFUND always
    applies, so money never vanishes between the two sides.
    """
    if leg.kind == "REFUND":
        if state is None:  # cannot happen for a genuine leg: the source debited
            raise ValueError(f"refund for unknown account {leg.from_account_id!r}")
        if state.balance_minor + leg.amount_minor > MAX_MINOR:
            # Only reachable with hundreds of maximal transfers in flight at once.
            # The refund stays on record as a rejection for an operator to settle.
            return Decision(rejection=Rejection.trusted(
                command_id=leg.leg_id, account_id=leg.from_account_id,
                command_type="TransferRefund", reason=Reason.BALANCE_OUT_OF_RANGE.value,
                detail=f"refund of transfer {leg.transfer_id} would overflow the balance",
                occurred_at=leg.issued_at, correlation_id=leg.correlation_id, actor=leg.actor))
        payload: Payload = TransferReversed.trusted(
            transfer_id=leg.transfer_id, to_account_id=leg.to_account_id,
            amount_minor=leg.amount_minor, reason=leg.reason or "refused",
        )
        return _leg_outcome(state, leg, payload)
    reason: Reason | None = None
    if state is None:
        reason = Reason.ACCOUNT_NOT_FOUND
    elif state.status != "open":
        reason = Reason.ACCOUNT_CLOSED
    elif state.currency != leg.currency:
        reason = Reason.CURRENCY_MISMATCH
    elif state.balance_minor + leg.amount_minor > MAX_BALANCE_MINOR:
        reason = Reason.BALANCE_OUT_OF_RANGE
    if reason is not None:
        refund = leg.replace(kind="REFUND", reason=reason.value, expires_at=0,
                              signature=b"")
        rejection = Rejection.trusted(
            command_id=leg.leg_id, account_id=leg.to_account_id, command_type="TransferCredit",
            reason=reason.value, detail=f"transfer {leg.transfer_id} refunded to "
            f"{leg.from_account_id}", occurred_at=leg.issued_at,
            correlation_id=leg.correlation_id, actor=leg.actor,
        )
        return Decision(rejection=rejection, legs=(refund,))
    assert state is not None
    payload = TransferCredited.trusted(transfer_id=leg.transfer_id,
                                       from_account_id=leg.from_account_id,
                                       amount_minor=leg.amount_minor)
    return _leg_outcome(state, leg, payload)


def _leg_outcome(state: AccountState, leg: TransferLeg, payload: Payload) -> Decision:
    event, after = _event(state, leg.account_id, leg.transfer_id, leg.leg_id, leg.issued_at,
                          leg.actor, leg.correlation_id, payload, currency=leg.currency,
                          metadata=leg.metadata)
    return Decision(events=(event,), state_after=after)


def _event(state: AccountState | None, account_id: str, command_id: str, causation_id: str,
           issued_at: int, actor: str, correlation_id: str | None, payload: Payload,
           currency: str | None, metadata: dict[str, str] | None = None,
           ) -> tuple[LedgerEvent, AccountState]:
    """Build the event and its envelope, and the state after it (from ``evolve``);
    ``metadata``: the causing command's (none: empty)."""
    metadata = metadata or {}
    if state is not None:
        currency = state.currency
    assert currency is not None
    occurred_at = issued_at if state is None else max(issued_at, state.updated_at)
    version = 1 if state is None else state.version + 1
    after = _after(state, payload, account_id, currency, version, occurred_at, metadata)
    event = LedgerEvent.trusted(
        event_id=event_id(causation_id, account_id, version), account_id=account_id,
        version=version, currency=currency, balance_after_minor=after.balance_minor,
        available_after_minor=after.available_minor, occurred_at=occurred_at,
        command_id=command_id, causation_id=causation_id, correlation_id=correlation_id,
        actor=actor, payload=payload, metadata=metadata,
    )
    return event, after


# ---------------------------------------------------------------- evolve


def evolve(state: AccountState | None, event: LedgerEvent) -> AccountState:
    """The account after ``event``. The one place a balance changes."""
    return _after(state, event.payload, event.account_id, event.currency, event.version,
                  event.occurred_at, event.metadata)


def _after(state: AccountState | None, p: Payload, account_id: str, currency: str,
           version: int, occurred_at: int, metadata: dict[str, str]) -> AccountState:
    """``metadata``: the event's (an opening's is the account's)."""
    if isinstance(p, AccountOpened):
        return AccountState.trusted(
            account_id=account_id, currency=currency, status="open",
            overdraft_limit_minor=p.overdraft_limit_minor, balance_minor=0, held_minor=0,
            version=version, updated_at=occurred_at, holds={}, metadata=metadata,
        )
    if state is None:
        raise ValueError(f"{type(p).__name__} for account {account_id!r} before it opened")
    balance, held, holds, status = state.balance_minor, state.held_minor, state.holds, state.status
    if isinstance(p, Deposited | TransferCredited | TransferReversed):
        balance += p.amount_minor
    elif isinstance(p, Withdrawn | TransferDebited):
        balance -= p.amount_minor
    elif isinstance(p, HoldPlaced):
        held += p.amount_minor
        holds = {**holds, p.hold_id: Hold(amount_minor=p.amount_minor, expires_at=p.expires_at)}
    elif isinstance(p, HoldCaptured | HoldReleased):
        hold = holds[p.hold_id]
        held -= hold.amount_minor
        holds = {k: v for k, v in holds.items() if k != p.hold_id}
        if isinstance(p, HoldCaptured):
            balance -= p.captured_minor
    elif isinstance(p, AccountClosed):
        status = "closed"
    elif isinstance(p, TransactionReserved):
        held += p.amount_minor
        holds = {**holds, reservation_id(p.coordinator_account_id, p.transaction_id):
                 Hold(amount_minor=p.amount_minor, expires_at=0)}
    elif isinstance(p, TransactionPosted | TransactionReleased):
        rid = reservation_id(p.coordinator_account_id, p.transaction_id)
        held -= holds[rid].amount_minor
        holds = {k: v for k, v in holds.items() if k != rid}
        if isinstance(p, TransactionPosted):
            balance += p.amount_minor
    meta = p.metadata if isinstance(p, AccountMetadataSet) else state.metadata
    return state.replace(balance_minor=balance, held_minor=held, holds=holds, status=status,
                         version=version, updated_at=occurred_at, metadata=meta)


def reservation_id(coordinator_account_id: str, transaction_id: str) -> str:
    """A transaction's reservation among an account's holds: NUL (which no hold id has)
    keeps it apart from the holds clients place."""
    return f"transaction\0{coordinator_account_id}\0{transaction_id}"


def fold(events: list[LedgerEvent]) -> AccountState | None:
    state: AccountState | None = None
    for e in events:
        state = evolve(state, e)
    return state
