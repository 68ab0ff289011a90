"""Fold the whole events topic and check every invariant of the ledger.

``verify(settings)`` reads ``ledger.events`` from the start, keeps the first record of
each ``(account_id, version)`` (a later copy must be byte-identical, or it is a
breach), folds each account through ``evolve`` and checks:

- versions are gapless from 1 per account;
- every event's ``balance_after_minor`` / ``available_after_minor`` equal the fold;
- no available balance below ``-overdraft_limit_minor``;
- every transfer debited ended exactly one way (credited or reversed), or is still
  in flight; nothing is credited or reversed that was not debited. A transfer is
  known by its source account and id (the Transfer's command_id, scoped to its
  account; in a log from before the ledger kept a record of each transfer, an id could
  be used again after the idempotency window): each ending is matched to a debit of
  the same source and id, the oldest first;
- every transaction (known by its coordinator and id) started once and ended at most
  once, committed or rejected as a whole: a participant posts only a committed
  transaction's postings, exactly those that name it, once; nothing is posted for a
  rejected one, nor released for a committed one; reservations and postings belong
  to a transaction that started. A reversal names a committed transaction of its
  coordinator or a transfer from it (credited, if the reversal committed), its
  postings are the original's reversed, and nothing is reversed by two that committed;
- conservation: the sum of all balances equals money in (deposits) minus money
  out (withdrawals, captured holds) minus transfers still in flight, plus what
  committed transactions have posted so far (zero once every participant posted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.codec import CODEC, DecodeError
from schemas.models import (
    AccountOpened,
    AccountState,
    Deposited,
    HoldCaptured,
    LedgerEvent,
    Posting,
    TransactionCommitted,
    TransactionPosted,
    TransactionRejected,
    TransactionReleased,
    TransactionReserved,
    TransactionStarted,
    TransferCredited,
    TransferDebited,
    TransferReversed,
    Withdrawn,
)
from streams.domain import evolve
from streams.readmodels.eventlog import read_all
from streams.settings import Settings
from streams.transactions import net_of, participants


@dataclass
class Report:
    records: int = 0
    events: int = 0
    duplicates: int = 0
    accounts: int = 0
    transfers_credited: int = 0
    transfers_reversed: int = 0
    transfers_in_flight: int = 0
    transactions_committed: int = 0
    transactions_rejected: int = 0
    transactions_in_flight: int = 0
    reversals: int = 0
    money_in_minor: dict[str, int] = field(default_factory=dict)
    money_out_minor: dict[str, int] = field(default_factory=dict)
    balances_minor: dict[str, int] = field(default_factory=dict)
    breaches: list[str] = field(default_factory=list)
    states: dict[str, AccountState] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.breaches

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok, "records": self.records, "events": self.events,
            "duplicates": self.duplicates, "accounts": self.accounts,
            "transfers_credited": self.transfers_credited,
            "transfers_reversed": self.transfers_reversed,
            "transfers_in_flight": self.transfers_in_flight,
            "transactions_committed": self.transactions_committed,
            "transactions_rejected": self.transactions_rejected,
            "transactions_in_flight": self.transactions_in_flight,
            "reversals": self.reversals,
            "money_in_minor": self.money_in_minor, "money_out_minor": self.money_out_minor,
            "balances_minor": self.balances_minor, "breaches": self.breaches[:50],
        }


def check(records: Iterable[bytes]) -> Report:
    """Check raw event records in log order (per account order is what matters)."""
    r = Report()
    first: dict[tuple[str, int], bytes] = {}
    events: dict[str, list[LedgerEvent]] = {}
    for raw in records:
        r.records += 1
        try:
            _, datum = CODEC.decode(raw, expect=LedgerEvent.avro_name)
        except DecodeError as exc:
            r.breaches.append(f"record {r.records}: not an event: {exc}")
            continue
        key = (datum["account_id"], datum["version"])
        if key in first:
            r.duplicates += 1
            if first[key] != raw:
                r.breaches.append(f"{key}: a second, different event for the same version")
            continue
        first[key] = raw
        events.setdefault(key[0], []).append(LedgerEvent.from_avro(datum))
    r.events = len(first)
    r.accounts = len(events)

    debited: dict[tuple[str, str], list[tuple[TransferDebited, str]]] = {}
    ended: dict[tuple[str, str], list[str]] = {}
    txns = _Transactions()
    for account, evs in events.items():
        state: AccountState | None = None
        limit = 0
        for expect, e in enumerate(sorted(evs, key=lambda e: e.version), start=1):
            if e.version != expect:
                r.breaches.append(f"{account}: version {e.version} where {expect} was due")
                break
            try:
                state = evolve(state, e)
            except (ValueError, KeyError) as exc:
                r.breaches.append(f"{account} v{e.version}: cannot apply: {exc!r}")
                break
            p = e.payload
            if isinstance(p, AccountOpened):
                limit = p.overdraft_limit_minor
            if (e.balance_after_minor, e.available_after_minor) != (state.balance_minor,
                                                                    state.available_minor):
                r.breaches.append(f"{account} v{e.version}: balance_after "
                                  f"{e.balance_after_minor}/{e.available_after_minor} but "
                                  f"the fold gives {state.balance_minor}/"
                                  f"{state.available_minor}")
            if state.available_minor < -limit:
                r.breaches.append(f"{account} v{e.version}: available {state.available_minor}"
                                  f" below the limit -{limit}")
            cur = e.currency
            if isinstance(p, Deposited):
                r.money_in_minor[cur] = r.money_in_minor.get(cur, 0) + p.amount_minor
            elif isinstance(p, Withdrawn):
                r.money_out_minor[cur] = r.money_out_minor.get(cur, 0) + p.amount_minor
            elif isinstance(p, HoldCaptured):
                r.money_out_minor[cur] = r.money_out_minor.get(cur, 0) + p.captured_minor
            elif isinstance(p, TransferDebited):
                debited.setdefault((account, p.transfer_id), []).append((p, cur))
            elif isinstance(p, TransferCredited):
                ended.setdefault((p.from_account_id, p.transfer_id), []).append("credited")
            elif isinstance(p, TransferReversed):
                ended.setdefault((account, p.transfer_id), []).append("reversed")
            else:
                txns.add(account, e)
        if state is not None:
            r.states[account] = state
            r.balances_minor[state.currency] = (r.balances_minor.get(state.currency, 0)
                                                + state.balance_minor)

    in_flight: dict[str, int] = {}
    for (source, tid), how in ended.items():
        n = len(debited.get((source, tid), []))
        if not n:
            r.breaches.append(f"transfer {tid} from {source} {how} but never debited")
        elif len(how) > n:
            r.breaches.append(f"transfer {tid} from {source} ended {len(how)} times "
                              f"({how}) but was debited {n} time(s)")
    for key, debits in debited.items():
        how = ended.get(key, [])
        r.transfers_credited += how.count("credited")
        r.transfers_reversed += how.count("reversed")
        for d, cur in debits[len(how):]:
            r.transfers_in_flight += 1
            in_flight[cur] = in_flight.get(cur, 0) + d.amount_minor

    # a transfer a reversal names: its posting reversed once credited, else None
    named = {(key[0], starts[0].reverses) for key, starts in txns.started.items()
             if starts[0].reverses is not None}
    transfers: dict[Key, list[Posting] | None] = {}
    for source, tid in named & debited.keys():
        debits, how = debited[(source, tid)], ended.get((source, tid), [])
        d, cur = debits[-1]
        transfers[(source, tid)] = [Posting.trusted(
            from_account_id=d.to_account_id, to_account_id=source, amount_minor=d.amount_minor,
            currency=cur, expected_version=None)] \
            if len(how) == len(debits) and how[-1] == "credited" else None
    posted = txns.check(r, transfers)
    for cur in set(r.money_in_minor) | set(r.money_out_minor) | set(r.balances_minor):
        expected = (r.money_in_minor.get(cur, 0) - r.money_out_minor.get(cur, 0)
                    - in_flight.get(cur, 0) + posted.get(cur, 0))
        if r.balances_minor.get(cur, 0) != expected:
            r.breaches.append(f"{cur}: balances sum to {r.balances_minor.get(cur, 0)}, "
                              f"money in - out - in flight is {expected}")
    return r


Key = tuple[str, str]  # (coordinator, transaction id)


@dataclass
class _Transactions:
    """What the log says of each transaction, gathered account by account."""

    started: dict[Key, list[TransactionStarted]] = field(default_factory=dict)
    ends: dict[Key, list[str]] = field(default_factory=dict)
    reserved: dict[Key, list[str]] = field(default_factory=dict)
    released: dict[Key, list[str]] = field(default_factory=dict)
    posted: dict[Key, list[tuple[str, str, TransactionPosted]]] = field(default_factory=dict)

    def add(self, account: str, e: LedgerEvent) -> None:
        p = e.payload
        if isinstance(p, TransactionStarted):
            self.started.setdefault((account, p.transaction_id), []).append(p)
        elif isinstance(p, TransactionCommitted | TransactionRejected):
            self.ends.setdefault((account, p.transaction_id), []).append(
                "committed" if isinstance(p, TransactionCommitted) else "rejected")
        elif isinstance(p, TransactionReserved):
            self.reserved.setdefault((p.coordinator_account_id, p.transaction_id),
                                     []).append(account)
        elif isinstance(p, TransactionReleased):
            self.released.setdefault((p.coordinator_account_id, p.transaction_id),
                                     []).append(account)
        elif isinstance(p, TransactionPosted):
            self.posted.setdefault((p.coordinator_account_id, p.transaction_id),
                                   []).append((account, e.currency, p))

    def check(self, r: Report, transfers: dict[Key, list[Posting] | None],
              ) -> dict[str, int]:
        """Add the breaches; return what committed transactions posted, per currency
        (``transfers``: a transfer's posting reversed, None if it was not credited)."""
        total: dict[str, int] = {}
        for key in {*self.ends, *self.reserved, *self.released, *self.posted} - \
                set(self.started):
            r.breaches.append(f"transaction {key[1]} of {key[0]}: steps, but never started")
        reversed_by: dict[Key, list[str]] = {}
        for key, starts in self.started.items():
            name = f"transaction {key[1]} of {key[0]}"
            if len(starts) > 1:
                r.breaches.append(f"{name}: started {len(starts)} times")
            ends = self.ends.get(key, [])
            end = ends[0] if ends else "pending"
            if len(ends) > 1:
                r.breaches.append(f"{name}: ended {len(ends)} times ({ends})")
            postings = starts[0].postings
            posted = self.posted.get(key, [])
            accounts = [a for a, _, _ in posted]
            for a in set(accounts):
                if accounts.count(a) > 1:
                    r.breaches.append(f"{name}: posted {accounts.count(a)} times at {a}")
            if posted and end != "committed":
                r.breaches.append(f"{name}: posted at {sorted(set(accounts))} but {end}")
            if end == "committed":
                r.transactions_committed += 1
                for a in self.released.get(key, []):
                    r.breaches.append(f"{name}: committed, but released at {a}")
                missing = set(participants(postings)) - set(self.reserved.get(key, []))
                if missing:
                    r.breaches.append(f"{name}: committed without a reservation at "
                                      f"{sorted(missing)}")
                for a, cur, p in posted:
                    mine = [q for q in postings if a in (q.from_account_id, q.to_account_id)]
                    if p.postings != mine or p.amount_minor != net_of(a, mine):
                        r.breaches.append(f"{name}: {a} posted {p.amount_minor} of "
                                          f"{p.postings}, not its postings {mine}")
                    total[cur] = total.get(cur, 0) + p.amount_minor
                if set(accounts) != set(participants(postings)):
                    r.transactions_in_flight += 1
            elif end == "rejected":
                r.transactions_rejected += 1
            else:
                r.transactions_in_flight += 1
            reverses = starts[0].reverses
            if reverses is not None and (key[0], reverses) in transfers:
                mirror = transfers[(key[0], reverses)]
                if mirror is None and end == "committed":
                    r.breaches.append(f"{name}: reverses transfer {reverses} of {key[0]}, "
                                      "which was not credited")
                elif mirror is not None and postings != mirror:
                    r.breaches.append(f"{name}: does not mirror transfer {reverses}")
            elif reverses is not None:
                original = self.started.get((key[0], reverses))
                if original is None or self.ends.get((key[0], reverses), [None])[0] != \
                        "committed":
                    r.breaches.append(f"{name}: reverses {reverses}, not a committed "
                                      f"transaction or transfer of {key[0]}")
                elif postings != _opposite(original[0].postings):
                    r.breaches.append(f"{name}: does not mirror {reverses}")
            if reverses is not None and end == "committed":
                r.reversals += 1
                reversed_by.setdefault((key[0], reverses), []).append(key[1])
        for key, by in reversed_by.items():
            if len(by) > 1:
                r.breaches.append(f"{key[1]} of {key[0]}: reversed by {by}")
        return total


def _opposite(postings: list[Posting]) -> list[Posting]:
    return [Posting.trusted(from_account_id=p.to_account_id, to_account_id=p.from_account_id,
                            amount_minor=p.amount_minor, currency=p.currency,
                            expected_version=None) for p in postings]


def verify(s: Settings, progress: bool = False) -> Report:
    return check(m.value() or b"" for m in read_all(s, s.events_topic, progress=progress))
