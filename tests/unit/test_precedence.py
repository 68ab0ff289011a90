"""The order of the rules is the order of ``Reason``, over every pair of reasons.

For each command type there is a command that passes every rule, and for each reason a
change (a fault) that breaks that rule alone. Any two faults that can be made together
break both rules, and the reason reported must be the one ``Reason`` lists first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from schemas.models import CommandBase
from schemas.money import MAX_BALANCE_MINOR
from streams.domain import Reason, decide
from tests.unit.conftest import (
    T0,
    Book,
    capture_hold,
    close_account,
    deposit,
    expire_hold,
    open_account,
    place_hold,
    release_hold,
    transfer,
    withdraw,
)
from tests.unit.test_domain import TRANSACTION_REASONS

HOLD_EXPIRES = T0 + 10_000
SELF = ""  # a transfer's destination: the account it is from, whichever that is


@dataclass(frozen=True)
class Spec:
    """A command and what is given before it (everything a fault may change)."""

    kind: str
    account: str = "A"
    amount: int = 5
    currency: str = "USD"
    overdraft: int = 0
    expected_version: int | None = None
    hold: str = "h1"
    to: str = "B"
    issued_at: int = T0 + 1_000
    expires_at: int = T0 + 50_000
    a_balance_near_max: bool = False
    e_funded: bool = False
    e_hold: bool = False


BASE = {
    "open": Spec("open", account="N"),
    "deposit": Spec("deposit"),
    "withdraw": Spec("withdraw"),
    "transfer": Spec("transfer"),
    "place_hold": Spec("place_hold", hold="h2"),
    "capture_hold": Spec("capture_hold"),
    "release_hold": Spec("release_hold"),
    "expire_hold": Spec("expire_hold", issued_at=HOLD_EXPIRES + 1),
    "close": Spec("close", account="E"),
}
WITH_AMOUNT = {"deposit", "withdraw", "transfer", "place_hold", "capture_hold"}
WITH_CURRENCY = {"deposit", "withdraw", "transfer", "place_hold"}
ON_A_HOLD = {"capture_hold", "release_hold", "expire_hold"}

# reason -> the command types it applies to, and the change that breaks that rule alone
FAULTS: dict[Reason, tuple[set[str], dict[str, object]]] = {
    Reason.INVALID_AMOUNT: (WITH_AMOUNT, {"amount": 0}),
    Reason.UNSUPPORTED_CURRENCY: (WITH_CURRENCY | {"open"}, {"currency": "XYZ"}),
    Reason.INVALID_OVERDRAFT_LIMIT: ({"open"}, {"overdraft": -1}),
    Reason.INVALID_EXPIRY: ({"place_hold"}, {"expires_at": T0 + 1_000}),
    Reason.TRANSFER_TO_SELF: ({"transfer"}, {"to": SELF}),
    Reason.ACCOUNT_NOT_FOUND: (set(BASE) - {"open", "close"}, {"account": "nobody"}),
    Reason.ACCOUNT_ALREADY_EXISTS: ({"open"}, {"account": "A"}),
    Reason.ACCOUNT_CLOSED: (set(BASE) - {"open", "close"}, {"account": "Z"}),
    Reason.VERSION_CONFLICT: (set(BASE), {"expected_version": 99}),
    Reason.CURRENCY_MISMATCH: (WITH_CURRENCY, {"currency": "EUR"}),
    Reason.HOLD_NOT_FOUND: (ON_A_HOLD, {"hold": "nope"}),
    Reason.HOLD_ALREADY_EXISTS: ({"place_hold"}, {"hold": "h1"}),
    Reason.HOLD_EXPIRED: ({"capture_hold"}, {"issued_at": HOLD_EXPIRES + 1}),
    Reason.HOLD_NOT_EXPIRED: ({"expire_hold"}, {"issued_at": T0 + 1_000}),
    Reason.CAPTURE_EXCEEDS_HOLD: ({"capture_hold"}, {"amount": 11}),
    Reason.INSUFFICIENT_FUNDS: ({"withdraw", "transfer", "place_hold"}, {"amount": 1_000}),
    Reason.BALANCE_OUT_OF_RANGE: ({"deposit"}, {"a_balance_near_max": True}),
    Reason.BALANCE_NOT_ZERO: ({"close"}, {"e_funded": True}),
    Reason.HOLDS_OPEN: ({"close"}, {"e_hold": True}),
}


def given(spec: Spec) -> Book:
    """A (USD, 100, a hold h1 of 10), B (USD), E (USD, empty, overdraft 10), Z (closed)."""
    book = Book()
    book.do_all([open_account("A", "USD", issued_at=T0), deposit(100, "A", issued_at=T0),
                 place_hold(10, "h1", "A", expires_at=HOLD_EXPIRES, issued_at=T0),
                 open_account("B", "USD", issued_at=T0),
                 open_account("E", "USD", 10, issued_at=T0),
                 open_account("Z", "USD", issued_at=T0), close_account("Z", issued_at=T0)])
    if spec.e_funded:
        book.do_all([deposit(5, "E", issued_at=T0)])
    if spec.e_hold:
        book.do_all([place_hold(5, "e1", "E", expires_at=HOLD_EXPIRES, issued_at=T0)])
    if spec.a_balance_near_max:
        a = book.state("A")
        assert a is not None
        book.states["A"] = a.model_copy(update={"balance_minor": MAX_BALANCE_MINOR - 1})
    return book


MAKE: dict[str, Callable[[Spec, dict[str, object]], CommandBase]] = {
    "open": lambda s, kw: open_account(s.account, s.currency, s.overdraft, **kw),
    "deposit": lambda s, kw: deposit(s.amount, s.account, s.currency, **kw),
    "withdraw": lambda s, kw: withdraw(s.amount, s.account, s.currency, **kw),
    "transfer": lambda s, kw: transfer(s.amount, s.to or s.account, s.account, s.currency,
                                       **kw),
    "place_hold": lambda s, kw: place_hold(s.amount, s.hold, s.account, s.currency,
                                           expires_at=s.expires_at, **kw),
    "capture_hold": lambda s, kw: capture_hold(s.hold, s.amount, s.account, **kw),
    "release_hold": lambda s, kw: release_hold(s.hold, s.account, **kw),
    "expire_hold": lambda s, kw: expire_hold(s.hold, s.account, **kw),
    "close": lambda s, kw: close_account(s.account, **kw),
}


def outcome_of(spec: Spec) -> str | None:
    book = given(spec)
    command = MAKE[spec.kind](spec, {"issued_at": spec.issued_at,
                                     "expected_version": spec.expected_version})
    decision = decide(book.state(command.account_id), command)
    return None if decision.rejection is None else decision.rejection.reason


def pairs() -> list[tuple[str, Reason, Reason]]:
    out = []
    for kind in BASE:
        mine = [r for r, (kinds, _) in FAULTS.items() if kind in kinds]
        for a, b in itertools.combinations(mine, 2):
            changes_a, changes_b = FAULTS[a][1], FAULTS[b][1]
            if set(changes_a) & set(changes_b):
                continue  # two values for one field: they cannot be made together
            out.append((kind, a, b))
    return out


@pytest.mark.parametrize("kind", list(BASE))
def test_each_command_type_has_a_command_that_passes(kind):
    assert outcome_of(BASE[kind]) is None


@pytest.mark.parametrize(("reason", "kind"), [(r, k) for r, (kinds, _) in FAULTS.items()
                                              for k in sorted(kinds)])
def test_each_fault_breaks_its_rule_alone(reason, kind):
    assert outcome_of(replace(BASE[kind], **FAULTS[reason][1])) == reason.value


def test_every_reason_the_rules_give_has_a_fault():
    state_free = {Reason.IDEMPOTENCY_KEY_REUSED, Reason.INVALID_COMMAND,
                  Reason.WRONG_PARTITION, Reason.ISSUED_IN_FUTURE}  # the processor's
    assert set(FAULTS) == set(Reason) - state_free - TRANSACTION_REASONS


@pytest.mark.parametrize(("kind", "a", "b"), pairs(),
                         ids=[f"{k}:{a.value}+{b.value}" for k, a, b in pairs()])
def test_of_two_broken_rules_the_one_reason_lists_first_is_reported(kind, a, b):
    order = list(Reason)
    spec = replace(BASE[kind], **FAULTS[a][1], **FAULTS[b][1])

    assert outcome_of(spec) == min(a, b, key=order.index).value
