"""An account's statement for a period: the opening balance, each entry, the closing
balance, from the history index (``streams.readmodels.history``)."""

from __future__ import annotations

import csv
import io
from typing import Any, Protocol

from schemas.models import LedgerEvent, TransactionPosted
from schemas.money import format_amount

MAX_ENTRIES = 10_000  # a statement is read in one request: longer periods are refused
_PAGE = 500


class Events(Protocol):
    def events(self, account_id: str, from_version: int, limit: int) -> list[LedgerEvent]: ...

    def as_of(self, account_id: str, at_ms: int) -> LedgerEvent | None: ...


class TooLong(ValueError):
    """More than MAX_ENTRIES entries in the period."""


def statement(history: Events, account_id: str, from_ms: int, to_ms: int) -> dict[str, Any]:
    """Entries with ``from_ms <= occurred_at < to_ms``; each entry's amount is what it
    changed the balance by (a hold, and a transaction's reservation and its release,
    change the available balance only: amount 0; a transaction's posting changes the
    balance by the net of the account's postings)."""
    before = history.as_of(account_id, from_ms - 1)
    opening = before.balance_after_minor if before else 0
    currency = before.currency if before else None
    balance, version = opening, (before.version if before else 0) + 1
    entries: list[dict[str, Any]] = []
    while True:
        page = history.events(account_id, version, _PAGE)
        for e in page:
            if e.occurred_at >= to_ms:
                break
            if len(entries) == MAX_ENTRIES:
                raise TooLong(f"more than {MAX_ENTRIES} entries: ask for a shorter period")
            entries.append(entry(e, e.balance_after_minor - balance))
            balance, currency = e.balance_after_minor, e.currency
        else:
            if len(page) == _PAGE:
                version = page[-1].version + 1
                continue
        break
    doc: dict[str, Any] = {"account_id": account_id, "from": from_ms, "to": to_ms,
                           "currency": currency, "opening_balance_minor": opening,
                           "closing_balance_minor": balance, "entries": entries}
    if currency is not None:
        doc["opening_balance"] = format_amount(opening, currency)
        doc["closing_balance"] = format_amount(balance, currency)
    return doc


def entry(e: LedgerEvent, amount: int) -> dict[str, Any]:
    p = e.payload
    name = getattr(p, "hold_id", None) or getattr(p, "transaction_id", None)
    description = e.type + (f" {name}" if name else "")
    coordinator = getattr(p, "coordinator_account_id", e.account_id)
    if coordinator != e.account_id:  # a transaction's id is its coordinator's
        description += f" (coordinator {coordinator})"
    if isinstance(p, TransactionPosted):  # the other accounts of its postings
        counterparty: str | None = ", ".join(dict.fromkeys(
            a for q in p.postings for a in (q.from_account_id, q.to_account_id)
            if a != e.account_id))
    else:
        counterparty = getattr(p, "to_account_id", None) or getattr(p, "from_account_id", None)
    return {
        "occurred_at": e.occurred_at, "version": e.version, "type": e.type,
        "description": description, "counterparty": counterparty,
        "transfer_id": getattr(p, "transfer_id", None),
        "transaction_id": getattr(p, "transaction_id", None), "command_id": e.command_id,
        "amount_minor": amount, "amount": format_amount(amount, e.currency),
        "balance_after_minor": e.balance_after_minor,
        "balance_after": format_amount(e.balance_after_minor, e.currency),
    }


CSV_COLUMNS = ["occurred_at", "version", "type", "description", "counterparty",
               "transfer_id", "command_id", "amount", "balance_after"]


def to_csv(doc: dict[str, Any]) -> str:
    """The statement as CSV: an opening row, one row an entry, a closing row."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerow([doc["from"], "", "opening balance", "", "", "", "", "",
                doc.get("opening_balance", "")])
    for e in doc["entries"]:
        w.writerow([_cell(e[c]) for c in CSV_COLUMNS])
    w.writerow([doc["to"], "", "closing balance", "", "", "", "", "",
                doc.get("closing_balance", "")])
    return out.getvalue()


def _cell(value: object) -> object:
    """A CSV cell; text a spreadsheet would run as a formula starts with a quote."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "@") and not value[1:2].isdigit():
        return "'" + value
    return value
