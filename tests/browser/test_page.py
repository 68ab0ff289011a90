"""The web page in headless Chromium against a live worker on the real broker.

Every step goes through the page as a person would (forms, keyboard, the slider);
waits are Playwright's bounded ``expect`` (``WAIT_MS``), never sleeps.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from datetime import UTC, datetime

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.browser]
expect = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing (pip install -e '.[dev]')"
).expect


def submit(page, kind: str, account: str, amount: str = "", to: str = "",
           currency: str = "USD") -> None:
    page.select_option("#cmd-type", kind)
    page.fill("#cmd-account", account)
    if kind == "Transfer":
        page.fill("#cmd-to", to)
    if kind != "OpenAccount":
        page.fill("#cmd-amount", amount)
    page.select_option("#cmd-currency", currency)
    page.click("#cmd-submit")


def rows(page):
    return page.locator("#history tbody tr")


def row(page, version: int):
    return page.locator(f'#history tbody tr[data-version="{version}"]')


def post_command(url: str, doc: dict) -> dict:
    req = urllib.request.Request(url + "/commands?wait=true", data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def local_input(ms: int) -> str:
    """The datetime-local value of an instant (the page's clock is UTC)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{ms % 1000:03d}"


def test_page_end_to_end(new_page, artifacts, start_worker):
    w = start_worker()
    page = new_page()
    page.goto(w.url + "/")
    expect(page).to_have_title("Ledger")
    expect(page.get_by_role("heading", name="Submit a command")).to_be_visible()

    # Open two accounts through the form; the page shows the one just opened.
    submit(page, "OpenAccount", "bob")
    expect(page.locator("#outcome")).to_have_text("Opened account “bob” in USD.")
    submit(page, "OpenAccount", "alice")
    expect(page.locator("#outcome")).to_have_text("Opened account “alice” in USD.")
    expect(page.locator("#acc-id")).to_have_text("“alice”")
    expect(page.locator("#acc-balance")).to_have_text("0.00 USD")
    expect(page.locator("#acc-status")).to_have_text("open")
    expect(rows(page)).to_have_count(1)
    page.evaluate("window.notReloaded = true")

    # Deposit, withdraw, transfer: the outcome in words, the balance and new history rows.
    submit(page, "Deposit", "alice", "150")
    expect(page.locator("#outcome")).to_have_text(
        "Deposited 150.00 USD into “alice”. Its balance is now 150.00 USD.")
    expect(row(page, 2)).to_contain_text("Deposit")
    expect(row(page, 2)).to_contain_text("150.00 USD")
    submit(page, "Withdraw", "alice", "20.05")
    expect(page.locator("#outcome")).to_contain_text("Withdrew 20.05 USD from “alice”")
    expect(row(page, 3)).to_contain_text("129.95 USD")
    submit(page, "Transfer", "alice", "30.1", to="bob")
    expect(page.locator("#outcome")).to_contain_text(
        "Sent 30.10 USD from “alice” to “bob”. “alice” now has 99.85 USD")
    expect(row(page, 4)).to_contain_text("Transfer to bob")
    expect(page.locator("#acc-balance")).to_have_text("99.85 USD")
    expect(page.locator("#acc-version")).to_have_text("4")

    # A command from elsewhere (not through the page) arrives over the stream, no reload.
    expect(page.locator("#live")).to_contain_text("Live")
    post_command(w.url, {"type": "Deposit", "command_id": "outside-1", "account_id": "alice",
                         "actor": "teller", "issued_at": int(time.time() * 1000),
                         "amount_minor": 5, "currency": "USD",
                         "correlation_id": "corr-outside"})
    expect(row(page, 5)).to_contain_text("teller")
    expect(row(page, 5)).to_contain_text("corr-outside")
    expect(row(page, 5)).to_contain_text("outside-1")
    expect(page.locator("#acc-balance")).to_have_text("99.90 USD")
    expect(rows(page)).to_have_count(5)
    assert page.evaluate("window.notReloaded") is True
    # Newest first; every version once.
    assert [int(v) for v in rows(page).evaluate_all(
        "rs => rs.map(r => r.dataset.version)")] == [5, 4, 3, 2, 1]

    # Input the page refuses before sending, in words, pointing at the field.
    submit(page, "Deposit", "alice", "1.234")
    outcome = page.locator("#outcome")
    expect(outcome).to_contain_text("USD has 2 decimal places")
    expect(page.locator("#cmd-amount")).to_have_attribute("aria-invalid", "true")
    # An overdraft is refused, and the reason is said in words.
    submit(page, "Withdraw", "alice", "1000")
    expect(outcome).to_contain_text("Refused: Insufficient funds: the available balance is "
                                    "too low.")
    expect(outcome).to_have_class(re.compile(r"\brefused\b"))
    expect(page.locator("#cmd-amount")).not_to_have_attribute("aria-invalid", "true")
    assert "Traceback" not in outcome.inner_text()
    expect(page.locator("#acc-balance")).to_have_text("99.90 USD")
    expect(rows(page)).to_have_count(5)

    # The chart draws one step per event.
    expect(page.locator("#chart svg path.line")).to_have_count(1)
    expect(page.locator("#chart-caption")).to_contain_text("highest 150.00 USD")

    # Time travel with the keyboard on the slider: the start, then one change later.
    events = json.loads(urllib.request.urlopen(w.url + "/accounts/alice/events",
                                               timeout=10).read())["events"]
    at = {e["version"]: e["occurred_at"] for e in events}
    slider = page.locator("#time-slider")
    slider.focus()
    page.keyboard.press("Home")
    expect(page.locator("#acc-when")).to_contain_text("(version 1)")
    expect(page.locator("#acc-balance")).to_have_text("0.00 USD")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#acc-balance")).to_have_text("150.00 USD")
    expect(page.locator("#acc-version")).to_have_text("2")
    expect(rows(page)).to_have_count(2)  # the history as of then
    expect(page.locator("#chart svg line.marker")).to_have_count(1)
    # The exact instant of the withdrawal, typed into the date-time input.
    page.fill("#time-input", local_input(at[3]))
    page.locator("#time-input").dispatch_event("change")
    expect(page.locator("#acc-balance")).to_have_text("129.95 USD")
    expect(page.locator("#acc-when")).to_contain_text("(version 3)")
    expect(rows(page)).to_have_count(3)
    # One millisecond before the account was opened, it did not exist.
    page.fill("#time-input", local_input(at[1] - 1))
    page.locator("#time-input").dispatch_event("change")
    expect(page.locator("#acc-when")).to_contain_text("did not exist yet")
    expect(rows(page)).to_have_count(0)
    page.click("#time-now")
    expect(page.locator("#acc-balance")).to_have_text("99.90 USD")
    expect(rows(page)).to_have_count(5)
    page.screenshot(path=str(artifacts / "page.png"), full_page=True)

    # bob, found by id with the keyboard: the transfer arrived (the saga's credit leg).
    page.locator("#find-id").fill("bob")
    page.locator("#find-id").press("Enter")
    expect(page.locator("#acc-id")).to_have_text("“bob”")
    expect(page.locator("#acc-balance")).to_have_text("30.10 USD")
    expect(row(page, 2)).to_contain_text("Transfer from alice")

    # No such account: said in words.
    page.locator("#find-id").fill("nobody")
    page.locator("#find-id").press("Enter")
    expect(page.locator("#find-status")).to_have_text("No account has the id “nobody”.")
    expect(page.locator("#account")).to_be_hidden()


def test_phone_width_and_errors_in_words(new_page, artifacts, start_worker):
    w = start_worker()
    page = new_page(width=375, height=760)
    page.goto(w.url + "/")
    submit(page, "OpenAccount", "carol", currency="JPY")
    expect(page.locator("#outcome")).to_have_text("Opened account “carol” in JPY.")
    submit(page, "Deposit", "carol", "1200", currency="JPY")
    expect(page.locator("#acc-balance")).to_have_text("1200 JPY")
    expect(row(page, 2)).to_contain_text("1200 JPY")
    # Nothing wider than the phone's screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    # A transfer to itself and one in a currency the account does not hold: both refused.
    submit(page, "Transfer", "carol", "5", to="carol", currency="JPY")
    expect(page.locator("#outcome")).to_contain_text(
        "Refused: An account cannot transfer to itself.")
    submit(page, "Deposit", "carol", "5.00", currency="USD")
    expect(page.locator("#outcome")).to_contain_text(
        "Refused: The currency is not the account's currency.")
    page.screenshot(path=str(artifacts / "page-phone.png"), full_page=True)



def test_a_month_statement_and_its_csv(new_page, start_worker):
    w = start_worker()
    t = int(time.time() * 1000)
    month = datetime.fromtimestamp(t / 1000, UTC).strftime("%Y-%m")
    for i, (kind, fields) in enumerate((
            ("OpenAccount", {"currency": "USD"}),
            ("Deposit", {"amount_minor": 15_000, "currency": "USD"}),
            ("Withdraw", {"amount_minor": 2_005, "currency": "USD"}),
            ("PlaceHold", {"hold_id": "h-1", "amount_minor": 100, "currency": "USD",
                           "expires_at": t + 3_600_000}))):
        post_command(w.url, {"type": kind, "command_id": f"s{i}", "account_id": "sam",
                             "actor": "t", "issued_at": t + i, **fields})
    page = new_page()
    page.goto(w.url + "/#sam")
    expect(page.locator("#acc-version")).to_have_text("4")

    page.fill("#statement-month", month)
    page.click("text=Show statement")
    expect(page.locator("#statement-summary")).to_have_text(
        f"{month}: opening balance 0.00 USD, 4 entries, closing balance 129.95 USD.")
    entries = page.locator("#statement tbody tr")
    expect(entries).to_have_count(4)
    expect(entries.nth(2)).to_contain_text("-20.05 USD")
    expect(entries.nth(3)).to_contain_text("HoldPlaced h-1")
    link = page.locator("#statement-csv")
    expect(link).to_be_visible()
    assert link.get_attribute("download") == f"statement-sam-{month}.csv"
    with urllib.request.urlopen(w.url + link.get_attribute("href"), timeout=30) as resp:
        csv_rows = resp.read().decode().splitlines()
    assert len(csv_rows) == 1 + 1 + 4 + 1 and csv_rows[-1].endswith("129.95 USD")

    page.fill("#statement-month", "2001-01")  # before the account
    page.click("text=Show statement")
    expect(page.locator("#statement-summary")).to_have_text(
        "2001-01: opening balance none (no account yet), 0 entries, closing balance none.")
    expect(page.locator("#statement")).to_be_hidden()


def test_a_transaction_in_the_history_the_statement_and_the_holds(new_page, start_worker):
    w = start_worker()
    t = int(time.time() * 1000)
    month = datetime.fromtimestamp(t / 1000, UTC).strftime("%Y-%m")
    for i, (kind, account, fields) in enumerate((
            ("OpenAccount", "payer", {"currency": "USD"}),
            ("OpenAccount", "merchant", {"currency": "USD"}),
            ("OpenAccount", "fees", {"currency": "USD"}),
            ("Deposit", "payer", {"amount_minor": 10_000, "currency": "USD"}),
            ("Transaction", "payer", {"postings": [
                {"from_account_id": "payer", "to_account_id": "merchant",
                 "amount_minor": 9_700, "currency": "USD"},
                {"from_account_id": "payer", "to_account_id": "fees",
                 "amount_minor": 300, "currency": "USD"}]}))):
        post_command(w.url, {"type": kind, "command_id": f"c{i}", "account_id": account,
                             "actor": "t", "issued_at": t + i, **fields})
    page = new_page()
    page.goto(w.url + "/#payer")
    expect(page.locator("#acc-balance")).to_have_text("0.00 USD")
    expect(row(page, 3)).to_contain_text("Transaction c4 started: 2 postings")
    expect(row(page, 4)).to_contain_text("Reserved for transaction c4")
    expect(row(page, 4)).to_contain_text("100.00 USD")
    expect(row(page, 5)).to_contain_text("Transaction c4 committed")
    expect(row(page, 6)).to_contain_text("Posted transaction c4: to merchant, fees")
    expect(row(page, 6)).to_contain_text("-100.00 USD")

    page.locator("#find-id").fill("merchant")
    page.locator("#find-id").press("Enter")
    expect(page.locator("#acc-balance")).to_have_text("97.00 USD")
    expect(row(page, 3)).to_contain_text(
        "Posted transaction c4 (coordinator payer): from payer")
    page.fill("#statement-month", month)
    page.click("text=Show statement")
    posted = page.locator("#statement tbody tr").nth(2)
    expect(posted).to_contain_text("TransactionPosted c4 (coordinator payer)")
    expect(posted).to_contain_text("payer")
    expect(posted).to_contain_text("c4")
    expect(posted).to_contain_text("97.00 USD")

    # A reservation, as GET /accounts/{id} lists it while a transaction is pending.
    def with_reservation(route):
        doc = route.fetch().json()
        doc["reservations"] = [{"coordinator_account_id": "payer", "transaction_id": "T9",
                                "amount_minor": 250, "amount": "2.50 USD"}]
        route.fulfill(json=doc)

    page.route(re.compile(r".*/accounts/fees$"), with_reservation)
    page.locator("#find-id").fill("fees")
    page.locator("#find-id").press("Enter")
    holds = page.locator("#holds tbody tr")
    expect(holds).to_have_count(1)
    expect(holds.first).to_contain_text("transaction T9 (coordinator payer)")
    expect(holds.first).to_contain_text("2.50 USD")
    expect(holds.first).to_contain_text("when the transaction ends")


def test_an_accounts_metadata_and_its_events(new_page, start_worker):
    w = start_worker()
    t = int(time.time() * 1000)
    for i, (kind, account, fields) in enumerate((
            ("OpenAccount", "shop", {"currency": "USD", "metadata": {"tier": "gold"}}),
            ("OpenAccount", "buyer", {"currency": "USD"}),
            ("Deposit", "buyer", {"amount_minor": 1_000, "currency": "USD",
                                  "metadata": {"order": "o-1", "channel": "web"}}),
            ("Transfer", "buyer", {"to_account_id": "shop", "amount_minor": 300,
                                   "currency": "USD", "metadata": {"order": "o-1"}}))):
        post_command(w.url, {"type": kind, "command_id": f"m{i}", "account_id": account,
                             "actor": "t", "issued_at": t + i, **fields})
    page = new_page()
    page.goto(w.url + "/#shop")
    expect(page.locator("#acc-balance")).to_have_text("3.00 USD")
    # the account's metadata, near its balance; each event's under its description
    expect(page.locator("#acc-metadata")).to_be_visible()
    expect(page.locator("#acc-metadata dt")).to_have_text(["tier"])
    expect(page.locator("#acc-metadata dd")).to_have_text(["gold"])
    expect(row(page, 1).locator(".meta")).to_have_text("tier=gold")
    expect(row(page, 2)).to_contain_text("Transfer from buyer")
    expect(row(page, 2).locator(".meta")).to_have_text("order=o-1")

    # set through the form: the list and the history follow
    page.select_option("#cmd-type", "SetAccountMetadata")
    expect(page.locator("#cmd-amount")).to_be_hidden()
    expect(page.locator("#cmd-currency")).to_be_hidden()
    page.fill("#cmd-account", "shop")
    page.fill("#cmd-meta", "tier=silver\nkyc = ok")
    page.click("#cmd-submit")
    expect(page.locator("#outcome")).to_have_text(
        "Set the metadata of “shop”: tier=silver, kyc=ok.")
    expect(row(page, 3)).to_contain_text("Metadata set: tier=silver, kyc=ok")
    expect(page.locator("#acc-metadata dt")).to_have_text(["tier", "kyc"])
    expect(page.locator("#acc-metadata dd")).to_have_text(["silver", "ok"])
    # a line that is not KEY=VALUE is refused before sending, pointing at the field
    page.fill("#cmd-meta", "no value here")
    page.click("#cmd-submit")
    expect(page.locator("#outcome")).to_contain_text("Metadata: write KEY=VALUE")
    expect(page.locator("#cmd-meta")).to_have_attribute("aria-invalid", "true")

    # an account without metadata has no list, and rows without it no line
    page.locator("#find-id").fill("buyer")
    page.locator("#find-id").press("Enter")
    expect(page.locator("#acc-balance")).to_have_text("7.00 USD")
    expect(page.locator("#acc-metadata-box")).to_be_hidden()
    expect(row(page, 2).locator(".meta")).to_have_text("order=o-1, channel=web")
    expect(row(page, 3)).to_contain_text("Transfer to shop")
    expect(row(page, 3).locator(".meta")).to_have_text("order=o-1")
    expect(row(page, 1).locator(".meta")).to_have_count(0)
    # a deposit through the form carries what the field holds
    page.fill("#cmd-meta", "order=o-2")
    submit(page, "Deposit", "buyer", "1")
    expect(row(page, 4).locator(".meta")).to_have_text("order=o-2")
