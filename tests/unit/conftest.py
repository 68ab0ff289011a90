"""Factories for the unit tests: commands with sensible defaults, an in-memory book of
accounts driven through ``decide``/``evolve``, and a dict-backed store for
``BatchProcessor``. No Kafka, no clock, no network.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from schemas.models import (
    AccountState,
    CaptureHold,
    CloseAccount,
    CommandBase,
    Deposit,
    ExpireHold,
    LedgerEvent,
    OpenAccount,
    PlaceHold,
    Rejection,
    ReleaseHold,
    Transfer,
    TransferLeg,
    Withdraw,
    encode,
)
from streams.domain import Decision, decide, decide_leg
from streams.partitions import partition_for
from streams.worker.processor import BatchProcessor, LegSigner, Output, retained

T0 = 1_700_000_000_000  # an epoch-ms instant; every test's clock starts here
ACTOR = "alice"
PARTITIONS = 4
SECRET = b"unit-test-leg-secret"

C = TypeVar("C", bound=CommandBase)
_ids = itertools.count(1)


def new_id(prefix: str = "cmd") -> str:
    return f"{prefix}-{next(_ids)}"


def command(cls: type[C], account_id: str = "A", **fields: Any) -> C:
    """Any command, with defaults for the envelope fields the test does not care about."""
    fields.setdefault("command_id", new_id())
    fields.setdefault("actor", ACTOR)
    fields.setdefault("issued_at", T0)
    return cls(account_id=account_id, **fields)


def open_account(account_id: str = "A", currency: str = "USD", overdraft: int = 0,
                 **kw: Any) -> OpenAccount:
    return command(OpenAccount, account_id, currency=currency, overdraft_limit_minor=overdraft,
                   **kw)


def deposit(amount: int, account_id: str = "A", currency: str = "USD", **kw: Any) -> Deposit:
    return command(Deposit, account_id, amount_minor=amount, currency=currency, **kw)


def withdraw(amount: int, account_id: str = "A", currency: str = "USD", **kw: Any) -> Withdraw:
    return command(Withdraw, account_id, amount_minor=amount, currency=currency, **kw)


def transfer(amount: int, to: str = "B", account_id: str = "A", currency: str = "USD",
             **kw: Any) -> Transfer:
    return command(Transfer, account_id, to_account_id=to, amount_minor=amount,
                   currency=currency, **kw)


def place_hold(amount: int, hold_id: str = "h1", account_id: str = "A", currency: str = "USD",
               expires_at: int = T0 + 60_000, **kw: Any) -> PlaceHold:
    return command(PlaceHold, account_id, hold_id=hold_id, amount_minor=amount,
                   currency=currency, expires_at=expires_at, **kw)


def capture_hold(hold_id: str = "h1", amount: int | None = None, account_id: str = "A",
                 **kw: Any) -> CaptureHold:
    return command(CaptureHold, account_id, hold_id=hold_id, amount_minor=amount, **kw)


def release_hold(hold_id: str = "h1", account_id: str = "A", **kw: Any) -> ReleaseHold:
    return command(ReleaseHold, account_id, hold_id=hold_id, **kw)


def expire_hold(hold_id: str = "h1", account_id: str = "A", **kw: Any) -> ExpireHold:
    kw.setdefault("actor", "ledger")
    return command(ExpireHold, account_id, hold_id=hold_id, **kw)


def close_account(account_id: str = "A", **kw: Any) -> CloseAccount:
    return command(CloseAccount, account_id, **kw)


# ---------------------------------------------------------------- an in-memory ledger


@dataclass
class Book:
    """Accounts driven purely through ``decide``/``decide_leg``; legs queue until delivered."""

    states: dict[str, AccountState | None] = field(default_factory=dict)
    events: dict[str, list[LedgerEvent]] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    in_flight: deque[TransferLeg] = field(default_factory=deque)

    def state(self, account_id: str) -> AccountState | None:
        return self.states.get(account_id)

    def _take(self, outcome: Decision) -> Decision:
        for event in outcome.events:
            self.events.setdefault(event.account_id, []).append(event)
            self.states[event.account_id] = outcome.state_after
        if outcome.rejection is not None:
            self.rejections.append(outcome.rejection)
        self.in_flight.extend(outcome.legs)
        return outcome

    def do(self, cmd: CommandBase) -> Decision:
        return self._take(decide(self.state(cmd.account_id), cmd))

    def do_all(self, commands: Iterable[CommandBase]) -> None:
        for c in commands:
            outcome = self.do(c)
            assert outcome.rejection is None, f"setup command refused: {outcome.rejection}"

    def deliver(self, leg: TransferLeg) -> Decision:
        return self._take(decide_leg(self.state(leg.account_id), leg))

    def deliver_next(self) -> Decision:
        return self.deliver(self.in_flight.popleft())

    def deliver_all(self) -> None:
        while self.in_flight:
            self.deliver_next()


@pytest.fixture
def book() -> Book:
    return Book()


# ---------------------------------------------------------------- processor harness


def accounts_on(partition: int, n: int, partitions: int = PARTITIONS,
                prefix: str = "acct") -> list[str]:
    """The first ``n`` account ids ``<prefix>-<i>`` that Kafka puts on ``partition``."""
    found = (f"{prefix}-{i}" for i in itertools.count())
    return list(itertools.islice((a for a in found if partition_for(a, partitions) == partition),
                                 n))


def account_off(partition: int, partitions: int = PARTITIONS) -> str:
    """An account id that is NOT on ``partition``."""
    return next(a for a in (f"far-{i}" for i in itertools.count())
                if partition_for(a, partitions) != partition)


class Store(dict[bytes, bytes]):
    """One partition's store as a dict: ``read`` is ``get``; ``apply`` writes a batch."""

    def keys_from(self, start: bytes) -> list[bytes]:
        return sorted(k for k in self if k >= start)

    def apply(self, changes: dict[bytes, bytes | None]) -> None:
        for key, value in changes.items():
            if value is None:
                self.pop(key, None)
            else:
                self[key] = value


def triples(outputs: list[Output]) -> list[tuple[str, bytes | None, bytes]]:
    return [(o.kind, o.key, o.value) for o in outputs]


def index_of(store: dict[bytes, bytes]) -> list[tuple[int, bytes]]:
    """(expires_at, outcome key) of every outcome the retention index lists, in order."""
    return sorted((int.from_bytes(k[1:9], "big", signed=True), okey)
                  for k, v in store.items() if k.startswith(b"e") for okey in retained(k, v))


def state_of(store: dict[bytes, bytes]) -> tuple[dict[bytes, bytes], list[tuple[int, bytes]]]:
    """A store's records, but its retention index as what it lists: the index has one
    record per batch and instant, so how the inputs were cut into batches shows there."""
    return {k: v for k, v in store.items() if not k.startswith(b"e")}, index_of(store)


@dataclass
class Partition:
    """A partition's store plus a way to run one batch of records through a processor."""

    partition: int = 0
    partitions: int = PARTITIONS
    store: Store = field(default_factory=Store)
    signer: LegSigner = field(default_factory=lambda: LegSigner(SECRET))
    max_record_bytes: int = 1_000_000
    offset: int = 0
    clock: int = T0  # the broker timestamp the next records get
    window_ms: int = 86_400_000
    last_changes: dict[bytes, bytes | None] = field(default_factory=dict)

    def processor(self) -> BatchProcessor:
        return BatchProcessor(self.store.get, self.store.keys_from, self.partition,
                              self.partitions, self.signer, window_ms=self.window_ms,
                              max_record_bytes=self.max_record_bytes)

    def batch(self, commands: Iterable[bytes | None] = (),
              legs: Iterable[bytes | None] = ()) -> BatchProcessor:
        """Run one batch (legs first, then commands, as the engine does); apply its changes."""
        bp = self.processor()
        for value in legs:
            bp.leg_record(None, value, "ledger.transfers", self._next(), self.clock)
        for value in commands:
            bp.command_record(None, value, "ledger.commands", self._next(), self.clock)
        self.last_changes = dict(bp.finish())
        self.store.apply(self.last_changes)
        return bp

    def _next(self) -> int:
        self.offset += 1
        return self.offset - 1


@pytest.fixture
def part() -> Partition:
    return Partition()


def encoded(outcome: Decision) -> list[bytes]:
    """Every record an outcome would put on the wire, encoded."""
    out = [encode(e) for e in outcome.events]
    if outcome.rejection is not None:
        out.append(encode(outcome.rejection))
    out.extend(encode(leg) for leg in outcome.legs)
    if outcome.state_after is not None:
        out.append(encode(outcome.state_after))
    return out
