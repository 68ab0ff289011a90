"""Property tests: random command sequences over a few accounts, through decide/evolve.

Commands of every type, small amounts, account and hold ids from small pools (so
that rules collide often), and an ``issued_at`` that mostly moves forward but
sometimes goes back. Transfer legs are delivered at random points, in random
order; whatever is still in flight is delivered at the end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.models import (
    CommandBase,
    Deposited,
    HoldCaptured,
    TransferCredited,
    TransferDebited,
    TransferReversed,
    Withdrawn,
    encode_batch,
)
from streams.domain import decide, decide_leg, fold
from streams.worker.processor import EVENTS, REJECTIONS, TRANSFERS
from tests.unit.conftest import (
    T0,
    Book,
    Partition,
    accounts_on,
    capture_hold,
    close_account,
    deposit,
    encoded,
    expire_hold,
    open_account,
    place_hold,
    release_hold,
    state_of,
    transfer,
    triples,
    withdraw,
)

ACCOUNTS = ["A", "B", "C", "D"]
CURRENCY = {"A": "USD", "B": "USD", "C": "EUR", "D": "USD"}  # "own" currency of each
HOLDS = ["h1", "h2", "h3"]
WEIGHTS = {"open": 2, "deposit": 6, "withdraw": 3, "transfer": 5, "place_hold": 4,
           "capture_hold": 3, "release_hold": 2, "expire_hold": 2, "close": 1, "deliver": 5}
KINDS = [kind for kind, weight in WEIGHTS.items() for _ in range(weight)]

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Step:
    kind: str
    account: str
    other: str
    amount: int
    currency: str
    hold: str
    dt: int
    ttl: int
    capture: int | None
    overdraft: int
    expected_version: int | None
    pick: int


steps = st.lists(st.builds(
    Step,
    kind=st.sampled_from(KINDS),
    account=st.sampled_from(ACCOUNTS),
    other=st.sampled_from([*ACCOUNTS, *ACCOUNTS, "nowhere"]),
    amount=st.integers(0, 60),
    currency=st.sampled_from(["own"] * 8 + ["USD", "EUR", "XYZ"]),
    hold=st.sampled_from(HOLDS),
    dt=st.integers(-40, 60),
    ttl=st.integers(-5, 80),
    capture=st.none() | st.integers(1, 70),
    overdraft=st.sampled_from([0, 0, 25, 100, -1]),
    expected_version=st.sampled_from([None] * 40 + [0, 1, 2, 3, 4, 5]),
    pick=st.integers(0, 1000),
), min_size=8, max_size=80)


def build(step: Step, command_id: str, issued_at: int, account: str | None = None,
          other: str | None = None, hold: str | None = None) -> CommandBase:
    a = account or step.account
    hold = hold or step.hold
    currency = CURRENCY[step.account] if step.currency == "own" else step.currency
    kw = {"command_id": command_id, "issued_at": issued_at,
          "expected_version": step.expected_version}
    match step.kind:
        case "open":
            return open_account(a, currency, step.overdraft, **kw)
        case "deposit":
            return deposit(step.amount, a, currency, **kw)
        case "withdraw":
            return withdraw(step.amount, a, currency, **kw)
        case "transfer":
            return transfer(step.amount, other or step.other, a, currency, **kw)
        case "place_hold":
            return place_hold(step.amount, step.hold, a, currency,
                              expires_at=issued_at + step.ttl, **kw)
        case "capture_hold":
            return capture_hold(hold, step.capture, a, **kw)
        case "release_hold":
            return release_hold(hold, a, **kw)
        case "expire_hold":
            return expire_hold(hold, a, **kw)
        case "close":
            return close_account(a, **kw)
    raise AssertionError(step.kind)


def given_accounts(book: Book) -> None:
    """A and B in USD (A with an overdraft), C in EUR; D is left for the script to open."""
    book.do_all([open_account("A", "USD", 100, issued_at=T0),
                 open_account("B", "USD", 0, issued_at=T0),
                 open_account("C", "EUR", 0, issued_at=T0),
                 deposit(200, "A", "USD", issued_at=T0),
                 deposit(150, "B", "USD", issued_at=T0),
                 deposit(100, "C", "EUR", issued_at=T0)])


def run(book: Book, script: list[Step], check_each_step: bool = True) -> None:
    given_accounts(book)
    clock = T0
    for i, step in enumerate(script):
        clock += step.dt  # mostly forward, sometimes back
        if step.kind == "deliver":
            if book.in_flight:
                leg = book.in_flight[step.pick % len(book.in_flight)]
                book.in_flight.remove(leg)
                state = book.state(leg.account_id)
                assert encoded(decide_leg(state, leg)) == encoded(decide_leg(state, leg))
                book.deliver(leg)
        else:
            cmd = build(step, f"c{i}", clock, *aim_at_open_hold(book, step))
            state = book.state(cmd.account_id)
            assert encoded(decide(state, cmd)) == encoded(decide(state, cmd))
            book.do(cmd)
        if check_each_step:
            check_accounts(book)
            check_money_is_conserved(book)
    book.deliver_all()
    check_accounts(book)
    check_money_is_conserved(book)


def aim_at_open_hold(book: Book, step: Step) -> tuple[str | None, None, str | None]:
    """Most hold commands go to a hold that is open (somewhere); the rest hit at random."""
    open_holds = sorted((account, hold) for account, state in book.states.items()
                        for hold in state.holds)
    if step.kind in ("capture_hold", "release_hold", "expire_hold") and open_holds \
            and step.pick % 4:
        account, hold = open_holds[step.pick % len(open_holds)]
        return account, None, hold
    return None, None, None


def check_accounts(book: Book) -> None:
    for account, events in book.events.items():
        state = book.state(account)
        assert state == fold(events)
        assert [e.version for e in events] == list(range(1, len(events) + 1))
        times = [e.occurred_at for e in events]
        assert times == sorted(times)
        assert all(e.account_id == account and e.currency == state.currency for e in events)
        assert state.available_minor >= -state.overdraft_limit_minor
        assert state.held_minor == sum(h.amount_minor for h in state.holds.values())
        assert all(h.amount_minor > 0 for h in state.holds.values())
        for n, event in enumerate(events, start=1):
            prefix = fold(events[:n])
            assert event.balance_after_minor == prefix.balance_minor
            assert event.available_after_minor == prefix.available_minor


def external_flows(book: Book) -> Counter[str]:
    """Per currency: deposits - withdrawals - captured holds (money entering/leaving)."""
    flows: Counter[str] = Counter()
    for events in book.events.values():
        for e in events:
            p = e.payload
            if isinstance(p, Deposited):
                flows[e.currency] += p.amount_minor
            elif isinstance(p, Withdrawn):
                flows[e.currency] -= p.amount_minor
            elif isinstance(p, HoldCaptured):
                flows[e.currency] -= p.captured_minor
    return flows


def check_money_is_conserved(book: Book) -> None:
    held: Counter[str] = Counter()
    for state in book.states.values():
        held[state.currency] += state.balance_minor
    for leg in book.in_flight:  # debited at the source, not yet credited or refunded
        held[leg.currency] += leg.amount_minor
    flows = external_flows(book)
    for currency in set(held) | set(flows):
        assert held[currency] == flows[currency], currency


def check_every_transfer_ended_one_way(book: Book) -> None:
    debited: Counter[str] = Counter()
    credited: Counter[str] = Counter()
    reversed_: Counter[str] = Counter()
    for events in book.events.values():
        for e in events:
            p = e.payload
            if isinstance(p, TransferDebited):
                debited[p.transfer_id] += 1
            elif isinstance(p, TransferCredited):
                credited[p.transfer_id] += 1
            elif isinstance(p, TransferReversed):
                reversed_[p.transfer_id] += 1
    assert all(n == 1 for n in debited.values())
    assert set(credited) | set(reversed_) <= set(debited)
    for transfer_id in debited:
        assert credited[transfer_id] + reversed_[transfer_id] == 1, transfer_id


@FAST
@given(steps)
def test_random_histories_keep_every_invariant(script):
    book = Book()

    run(book, script)

    assert not book.in_flight
    check_every_transfer_ended_one_way(book)


@FAST
@given(steps)
def test_sum_of_balances_is_deposits_minus_withdrawals_minus_captures(script):
    book = Book()

    run(book, script, check_each_step=False)

    total = sum(s.balance_minor for s in book.states.values())
    assert total == sum(external_flows(book).values())


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_processor_gives_the_same_bytes_however_commands_are_batched(script):
    """One batch, or one batch per command (with retries mixed in): same outputs, same store."""
    names = accounts_on(0, len(ACCOUNTS))
    alias = dict(zip([*ACCOUNTS, "nowhere"], [*names, "acct-nowhere"], strict=True))
    clock, commands = T0, []
    for i, step in enumerate(script):
        clock += step.dt
        if step.kind == "deliver":
            if commands:  # a retry of an earlier command (same id, same content)
                commands.append(commands[step.pick % len(commands)])
            continue
        commands.append(build(step, f"c{i}", clock, alias[step.account], alias[step.other]))

    together, apart = Partition(), Partition()
    out_together = triples(together.batch([encode_batch(commands)]).outputs) if commands else []
    out_apart = []
    for c in commands:
        out_apart += triples(apart.batch([encode_batch([c])]).outputs)

    assert out_together == out_apart
    assert state_of(together.store) == state_of(apart.store)
    kinds = {kind for kind, _, _ in out_together}
    assert kinds <= {EVENTS, REJECTIONS, TRANSFERS}
