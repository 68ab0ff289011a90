"""An account's statement, from its events: opening balance, entries, closing balance."""

from __future__ import annotations

import csv
import io

import pytest

from schemas.models import LedgerEvent
from streams.readmodels import statement as st
from tests.unit.conftest import (
    T0,
    Book,
    capture_hold,
    deposit,
    open_account,
    place_hold,
    transfer,
    withdraw,
)
from tests.unit.test_transactions import Ledger, funded, posting, txn


class Events:
    """The history index's reads, over a list."""

    def __init__(self, events: list[LedgerEvent]) -> None:
        self.all = events

    def events(self, account_id: str, from_version: int, limit: int) -> list[LedgerEvent]:
        return [e for e in self.all if e.version >= from_version][:limit]

    def as_of(self, account_id: str, at_ms: int) -> LedgerEvent | None:
        by_then = [e for e in self.all if e.occurred_at <= at_ms]
        return by_then[-1] if by_then else None


@pytest.fixture
def history() -> Events:
    book = Book()
    book.do_all([open_account("A", "USD", issued_at=T0), open_account("B", "USD", issued_at=T0),
                 deposit(10_000, "A", issued_at=T0 + 100),
                 withdraw(2_500, "A", issued_at=T0 + 200),
                 place_hold(1_000, "h1", "A", issued_at=T0 + 300, expires_at=T0 + 10_000),
                 capture_hold("h1", 400, "A", issued_at=T0 + 400),
                 transfer(1_234, "B", "A", issued_at=T0 + 500, command_id="t-1"),
                 deposit(1, "A", issued_at=T0 + 600)])
    return Events(book.events["A"])


def test_a_period_has_its_opening_balance_entries_and_closing_balance(history):
    doc = st.statement(history, "A", T0 + 200, T0 + 600)

    assert doc["opening_balance_minor"] == 10_000 and doc["opening_balance"] == "100.00 USD"
    assert [(e["type"], e["amount_minor"]) for e in doc["entries"]] == [
        ("Withdrawn", -2_500), ("HoldPlaced", 0), ("HoldCaptured", -400),
        ("TransferDebited", -1_234)]
    assert doc["closing_balance_minor"] == 10_000 - 2_500 - 400 - 1_234
    assert doc["closing_balance_minor"] == doc["entries"][-1]["balance_after_minor"]
    debit = doc["entries"][-1]
    assert (debit["counterparty"], debit["transfer_id"]) == ("B", "t-1")
    assert doc["entries"][1]["description"] == "HoldPlaced h1"


def test_a_period_before_the_account_or_without_events(history):
    before = st.statement(history, "A", T0 - 1_000, T0)
    assert before["entries"] == [] and before["opening_balance_minor"] == 0
    assert before["currency"] is None
    quiet = st.statement(history, "A", T0 + 10_000, T0 + 20_000)
    assert quiet["entries"] == [] and quiet["opening_balance_minor"] == \
        quiet["closing_balance_minor"] == 10_000 - 2_500 - 400 - 1_234 + 1


def test_a_long_period_is_read_in_pages_and_bounded(monkeypatch, history):
    monkeypatch.setattr(st, "_PAGE", 2)
    assert len(st.statement(history, "A", T0, T0 + 1_000)["entries"]) == 7
    monkeypatch.setattr(st, "MAX_ENTRIES", 6)
    with pytest.raises(st.TooLong):
        st.statement(history, "A", T0, T0 + 1_000)


def test_the_csv_has_an_opening_row_a_row_an_entry_and_a_closing_row(history):
    rows = list(csv.reader(io.StringIO(st.to_csv(st.statement(history, "A", T0 + 200,
                                                                T0 + 300)))))
    assert rows[0] == st.CSV_COLUMNS
    assert rows[1][2] == "opening balance" and rows[1][-1] == "100.00 USD"
    assert rows[2][2] == "Withdrawn" and rows[2][7] == "-25.00 USD"
    assert rows[-1][2] == "closing balance" and rows[-1][-1] == "75.00 USD"


def test_text_a_spreadsheet_would_run_is_quoted():
    assert st._cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert st._cell("@SUM") == "'@SUM"
    assert st._cell("-25.00 USD") == "-25.00 USD" and st._cell(None) == ""


def test_a_transaction_posts_its_net_and_names_its_id_and_counterparties():
    ledger = Ledger()
    funded(ledger, payer=10_000, merchant=0, fees=0)
    ledger.submit(txn("payer", posting("payer", "merchant", 9_700),
                      posting("payer", "fees", 300)))
    ledger.run()

    payer = st.statement(Events(ledger.of("payer")), "payer", 0, 2**62)
    rows = [(e["type"], e["amount_minor"], e["transaction_id"], e["counterparty"])
            for e in payer["entries"][-4:]]
    assert rows == [("TransactionStarted", 0, "t1", None),
                    ("TransactionReserved", 0, "t1", None),  # a hold: available only
                    ("TransactionCommitted", 0, "t1", None),
                    ("TransactionPosted", -10_000, "t1", "merchant, fees")]
    assert payer["entries"][-1]["description"] == "TransactionPosted t1"
    assert payer["closing_balance_minor"] == 0

    merchant = st.statement(Events(ledger.of("merchant")), "merchant", 0, 2**62)
    posted = merchant["entries"][-1]
    assert (posted["amount"], posted["counterparty"], posted["description"]) == (
        "97.00 USD", "payer", "TransactionPosted t1 (coordinator payer)")
    rows = list(csv.reader(io.StringIO(st.to_csv(merchant))))
    assert rows[-2][3] == "TransactionPosted t1 (coordinator payer)"
    assert rows[-2][4] == "payer" and rows[-2][7] == "97.00 USD"


def test_a_rejected_transaction_reserves_and_releases_without_changing_the_balance():
    ledger = Ledger()
    funded(ledger, payer=1_000, merchant=0, poor=50)
    ledger.submit(txn("payer", posting("payer", "merchant", 500),
                      posting("poor", "merchant", 60)))
    ledger.run()
    payer = st.statement(Events(ledger.of("payer")), "payer", 0, 2**62)
    assert [(e["type"], e["amount_minor"], e["description"]) for e in payer["entries"][-4:]] \
        == [("TransactionStarted", 0, "TransactionStarted t1"),
            ("TransactionReserved", 0, "TransactionReserved t1"),
            ("TransactionRejected", 0, "TransactionRejected t1"),
            ("TransactionReleased", 0, "TransactionReleased t1")]
    assert payer["closing_balance_minor"] == payer["opening_balance_minor"] + 1_000
