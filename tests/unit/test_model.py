"""The processor checked against a model of the rules written here, on its own: random
openings, deposits, withdrawals and closings with amounts across the whole int64 range
the schemas carry, retries of earlier commands (the same, or the same id for another
command) within and past the idempotency window, through ``BatchProcessor`` (the
compiled core where it is built, the general path where it declines).

The model is plain arithmetic over a dict, not ``streams.domain``: a rule the ledger
gets wrong in both of its paths is still caught here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from schemas.codec import CODEC
from schemas.models import CloseAccount, CommandBase, Deposit, OpenAccount, Withdraw, encode_batch
from streams.worker.processor import EVENTS, REJECTIONS, account_key
from tests.unit.conftest import T0, Partition, accounts_on

WINDOW_MS = 100_000
INT64 = st.integers(-(2**63), 2**63 - 1)
EDGES = [0, 1, 2**53 - 1, 2**53, 2**53 + 1, 2**62 - 1, 2**62, 2**62 + 1, 2**63 - 1,
         -1, -(2**53), -(2**63)]
AMOUNTS = st.one_of(st.integers(-5, 5_000), INT64, st.sampled_from(EDGES))
ACCOUNTS = accounts_on(0, 3)
KNOWN = {"USD", "EUR", "JPY"}


@dataclass
class Account:
    currency: str
    overdraft: int
    balance: int = 0
    version: int = 1
    closed: bool = False


@dataclass
class Model:
    """What the ledger must answer, from its documented rules alone."""

    accounts: dict[str, Account] = field(default_factory=dict)

    def decide(self, c: CommandBase) -> str | None:
        """The reason ``c`` is refused (None: accepted, and applied to the model)."""
        amount = getattr(c, "amount_minor", None)
        if amount is not None and not 1 <= amount <= 2**53:
            return "invalid_amount"
        currency = getattr(c, "currency", None)
        if currency is not None and currency not in KNOWN:
            return "unsupported_currency"
        if isinstance(c, OpenAccount):
            if not 0 <= c.overdraft_limit_minor <= 2**53:
                return "invalid_overdraft_limit"
            if c.account_id in self.accounts:
                return "account_already_exists"
            if c.expected_version not in (None, 0):
                return "version_conflict"
            self.accounts[c.account_id] = Account(c.currency, c.overdraft_limit_minor)
            return None
        a = self.accounts.get(c.account_id)
        if a is None:
            return "account_not_found"
        if a.closed:
            return "account_closed"
        if c.expected_version is not None and c.expected_version != a.version:
            return "version_conflict"
        if currency is not None and currency != a.currency:
            return "currency_mismatch"
        if isinstance(c, Deposit):
            if a.balance + c.amount_minor > 2**62:
                return "balance_out_of_range"
            a.balance += c.amount_minor
        elif isinstance(c, Withdraw):
            if a.balance - c.amount_minor < -a.overdraft:
                return "insufficient_funds"
            a.balance -= c.amount_minor
        elif isinstance(c, CloseAccount):
            if a.balance != 0:
                return "balance_not_zero"
            a.closed = True
        a.version += 1
        return None


@dataclass(frozen=True)
class Op:
    kind: str  # open, deposit, withdraw, drain, fill, close, retry, reuse
    account: int
    amount: int
    currency: str
    expected_version: int | None
    pick: int
    dt: int  # ms the partition clock moves before this op


ops = st.lists(st.builds(
    Op,
    kind=st.sampled_from(["open"] * 2 + ["deposit"] * 5 + ["withdraw"] * 4 + ["close"]
                         + ["retry"] * 3 + ["reuse", "fill", "drain"]),
    account=st.integers(0, len(ACCOUNTS) - 1),
    amount=AMOUNTS,
    currency=st.sampled_from(["USD"] * 6 + ["EUR", "JPY", "XYZ"]),
    expected_version=st.none() | st.none() | st.integers(-1, 6),
    pick=st.integers(0, 10_000),
    dt=st.one_of(st.integers(0, 2_000), st.sampled_from([WINDOW_MS - 1, WINDOW_MS, WINDOW_MS + 1]),
                 st.integers(0, 3 * WINDOW_MS)),
), min_size=10, max_size=60)


def build(op: Op, n: int, clock: int) -> list[CommandBase]:
    kw = {"account_id": ACCOUNTS[op.account], "actor": "model", "issued_at": clock,
          "expected_version": op.expected_version}
    if op.kind == "open":
        return [OpenAccount(command_id=f"c{n}", currency=op.currency,
                            overdraft_limit_minor=op.amount, **kw)]
    if op.kind == "deposit":
        return [Deposit(command_id=f"c{n}", amount_minor=op.amount, currency=op.currency, **kw)]
    if op.kind == "withdraw":
        return [Withdraw(command_id=f"c{n}", amount_minor=op.amount, currency=op.currency,
                         **kw)]
    if op.kind == "fill":  # up to 2**62, the most a balance may hold, in deposits of 2**53
        return [Deposit(command_id=f"c{n}.{i}", amount_minor=2**53, currency=op.currency,
                        **{**kw, "expected_version": None}) for i in range(500 + op.pick % 20)]
    return [CloseAccount(command_id=f"c{n}", **kw)]


@settings(max_examples=200, deadline=None, database=None, report_multiple_bugs=False,
          phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain: slow here
          suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_the_processor_answers_as_the_model_does(script: list[Op]) -> None:
    note(f"script: {script!r}")  # (Hypothesis prints a list of these as empty)
    model, part = Model(), Partition(window_ms=WINDOW_MS)
    # command_id -> the command last decided with it, when, and what it gave
    decided: dict[str, tuple[CommandBase, int, tuple[str, bytes]]] = {}
    for n, op in enumerate(script):
        part.clock += op.dt
        if op.kind in ("retry", "reuse") and decided:
            latest = sorted(decided, key=lambda i: decided[i][1])[-3:]  # most at the edge
            first = decided[latest[op.pick % len(latest)]][0]
            commands = [first if op.kind == "retry" else
                        first.model_copy(update={"actor": first.actor + "+"})]
        elif op.kind == "drain":  # all that may be taken, one minor unit less, or more
            a = model.accounts.get(ACCOUNTS[op.account])
            amount = a.balance + a.overdraft + op.pick % 3 - 1 if a else op.amount
            commands = build(replace(op, kind="withdraw", amount=amount), n, part.clock)
        else:
            commands = build(op, n, part.clock)
        outputs = part.batch([encode_batch(commands)]).outputs
        assert len(outputs) == len(commands)
        for command, o in zip(commands, outputs, strict=True):
            body = CODEC.decode(o.value)[1]
            prior = decided.get(command.command_id)
            if prior is not None:
                event(f"id used again, {part.clock - prior[1] - WINDOW_MS:+} ms from the "
                      "window's end" if abs(part.clock - prior[1] - WINDOW_MS) <= 1 else
                      "id used again, inside the window" if part.clock - prior[1] <= WINDOW_MS
                      else "id used again, past the window")
            if prior is not None and part.clock - prior[1] <= WINDOW_MS:  # remembered
                if command is prior[0]:  # the first answer again, changing nothing
                    assert (o.kind, o.value) == prior[2]
                else:  # the same id for another command
                    assert (o.kind, body["reason"]) == (REJECTIONS, "idempotency_key_reused")
                continue
            reason = model.decide(command)  # new, or forgotten: decided as new
            event(f"outcome: {reason or 'accepted'}")
            if reason is not None:
                assert (o.kind, body["reason"]) == (REJECTIONS, reason), body
            else:
                a = model.accounts[command.account_id]
                assert o.kind == EVENTS, body
                assert (body["version"], body["balance_after_minor"]) == (a.version, a.balance)
            decided[command.command_id] = (command, part.clock, (o.kind, o.value))

    for account_id, a in model.accounts.items():
        state = CODEC.decode(part.store[account_key(account_id)])[1]
        assert (state["balance_minor"], state["version"], state["status"]) == \
            (a.balance, a.version, "closed" if a.closed else "open")
    for account_id in set(ACCOUNTS) - set(model.accounts):
        assert account_key(account_id) not in part.store


def test_the_model_is_not_the_processor_by_accident() -> None:
    """Its own rules, on cases worked by hand."""
    m = Model()
    a, t = ACCOUNTS[0], T0
    kw = {"account_id": a, "actor": "model", "issued_at": t}
    assert m.decide(Deposit(command_id="1", amount_minor=5, currency="USD", **kw)) == \
        "account_not_found"
    assert m.decide(OpenAccount(command_id="2", currency="USD", overdraft_limit_minor=10,
                                **kw)) is None
    m.accounts[a].balance = 2**62 - 3
    assert m.decide(Deposit(command_id="3", amount_minor=3, currency="USD", **kw)) is None
    assert m.decide(Deposit(command_id="4", amount_minor=1, currency="USD", **kw)) == \
        "balance_out_of_range"
    assert m.decide(Withdraw(command_id="5", amount_minor=2**53 + 1, currency="USD", **kw)) == \
        "invalid_amount"
    assert m.decide(Withdraw(command_id="6", amount_minor=2**62 + 10, currency="EUR", **kw)) == \
        "invalid_amount"
    assert m.decide(Withdraw(command_id="7", amount_minor=10, currency="EUR", **kw)) == \
        "currency_mismatch"
    assert m.decide(CloseAccount(command_id="8", **kw)) == "balance_not_zero"
    assert m.accounts[a].balance == 2**62 and m.accounts[a].version == 2
