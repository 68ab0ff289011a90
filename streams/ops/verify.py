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
  account, and free again after the idempotency window): each ending is matched
  to a debit of the same source and id, the oldest first;
- conservation: the sum of all balances equals money in (deposits) minus money
  out (withdrawals, captured holds) minus transfers still in flight.
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
    TransferCredited,
    TransferDebited,
    TransferReversed,
    Withdrawn,
)
from streams.domain import evolve
from streams.readmodels.eventlog import read_all
from streams.settings import Settings


@dataclass
class Report:
    records: int = 0
    events: int = 0
    duplicates: int = 0
    accounts: int = 0
    transfers_credited: int = 0
    transfers_reversed: int = 0
    transfers_in_flight: int = 0
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

    for cur in set(r.money_in_minor) | set(r.money_out_minor) | set(r.balances_minor):
        expected = (r.money_in_minor.get(cur, 0) - r.money_out_minor.get(cur, 0)
                    - in_flight.get(cur, 0))
        if r.balances_minor.get(cur, 0) != expected:
            r.breaches.append(f"{cur}: balances sum to {r.balances_minor.get(cur, 0)}, "
                              f"money in - out - in flight is {expected}")
    return r


def verify(s: Settings, progress: bool = False) -> Report:
    return check(m.value() or b"" for m in read_all(s, s.events_topic, progress=progress))
