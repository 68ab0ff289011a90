"""GET /transactions/{id}?coordinator= on the real broker: a committed fee split with the
time of each step, a rejected one with its reason and posting, a reversal, unknown ids,
and participants on another worker's partitions; Transaction and Reverse over POST."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from schemas.models import (
    AccountState,
    CommandBase,
    Deposit,
    Hold,
    OpenAccount,
    Posting,
    Transaction,
)
from streams.api.web import account_json
from streams.domain import reservation_id
from streams.partitions import partition_for
from tests.integration.test_http_api import call, command, split_between, until

pytestmark = pytest.mark.kafka


def cmd(cls: type[CommandBase], account: str, **kw: Any) -> CommandBase:
    kw.setdefault("command_id", uuid.uuid4().hex)
    return cls(account_id=account, actor="test", issued_at=int(time.time() * 1000), **kw)


def posting(src: str, dst: str, amount: int) -> dict[str, Any]:
    return {"from_account_id": src, "to_account_id": dst, "amount_minor": amount,
            "currency": "USD"}


def fund(client, **balances: int) -> None:
    for account, amount in balances.items():
        assert client.submit(cmd(OpenAccount, account, currency="USD")).result(60).accepted
        if amount:
            assert client.submit(cmd(Deposit, account, amount_minor=amount,
                                     currency="USD")).result(60).accepted


def settled(url: str, tid: str, coordinator: str, *finished: str,
            timeout_s: float = 30.0) -> dict[str, Any]:
    """GET the transaction until it has ended and each ``finished`` participant's last
    step (posted or released) shows: the history index trails the outcome by a moment."""
    def attempt() -> dict[str, Any] | None:
        status, doc = call(url, f"/transactions/{tid}?coordinator={coordinator}")
        if status in (404, 503):  # the worker's state and its history index trail the
            return None           # outcome it sent by a moment
        assert status == 200, doc
        last = {p["account_id"]: p["posted_at"] or p["released_at"]
                for p in doc["participants"]}
        done = doc["ended_at"] is not None and all(last[a] for a in finished)
        return doc if done else None

    return until(attempt, timeout_s)


def test_a_transaction_its_steps_and_how_it_ended(start_worker, client):
    w = start_worker()
    fund(client, payer=10_000, merchant=0, fees=0, poor=0)

    # a fee split, through the client: its outcome is the coordinator's TransactionStarted
    outcome = client.submit(cmd(Transaction, "payer", command_id="pay-1", postings=[
        Posting(**posting("payer", "merchant", 9_700)),
        Posting(**posting("payer", "fees", 300))])).result(timeout=60)
    assert outcome.accepted and outcome.events[0].type == "TransactionStarted"
    doc = settled(w.url, "pay-1", "payer", "payer", "merchant", "fees")
    assert (doc["coordinator_account_id"], doc["transaction_id"], doc["state"]) == (
        "payer", "pay-1", "committed")
    assert [(p["to_account_id"], p["amount_minor"], p["amount"]) for p in doc["postings"]] \
        == [("merchant", 9_700, "97.00 USD"), ("fees", 300, "3.00 USD")]
    assert (doc["reverses"], doc["reversed_by"]) == (None, None)
    assert "reason" not in doc
    assert [p["account_id"] for p in doc["participants"]] == ["payer", "merchant", "fees"]
    started, ended = doc["started_at"], doc["ended_at"]
    assert started == outcome.events[0].occurred_at and doc["deadline"] > started
    for p in doc["participants"]:
        assert started <= p["reserved_at"] <= ended <= p["posted_at"], p
        assert p["released_at"] is None

    # refused by one participant: nothing posted, the reserved released, the posting named
    status, body = call(w.url, "/commands?wait=true", command(
        "Transaction", "pay-2", "payer", int(time.time() * 1000),
        postings=[posting("merchant", "fees", 100), posting("poor", "fees", 5)]))
    assert status == 200 and [e["type"] for e in body["events"]] == ["TransactionStarted"]
    doc = settled(w.url, "pay-2", "payer", "merchant", "fees")
    assert (doc["state"], doc["reason"], doc["posting_index"]) == (
        "rejected", "insufficient_funds", 1)
    assert doc["detail"]
    steps = {p["account_id"]: p for p in doc["participants"]}
    assert set(steps) == {"merchant", "fees", "poor"}  # the coordinator is not a party
    assert steps["merchant"]["reserved_at"] <= steps["merchant"]["released_at"]
    assert steps["merchant"]["posted_at"] is None
    assert steps["poor"] == {"account_id": "poor", "reserved_at": None, "posted_at": None,
                             "released_at": None}  # it voted no: no event of its own

    # a reversal over POST: linked both ways
    status, body = call(w.url, "/commands?wait=true", command(
        "Reverse", "r-1", "payer", int(time.time() * 1000), transaction_id="pay-1"))
    assert status == 200 and body["events"][0]["type"] == "TransactionStarted"
    assert body["events"][0]["payload"]["reverses"] == "pay-1"
    back = settled(w.url, "r-1", "payer", "payer", "merchant", "fees")
    assert (back["state"], back["reverses"]) == ("committed", "pay-1")
    assert [(p["from_account_id"], p["to_account_id"]) for p in back["postings"]] == [
        ("merchant", "payer"), ("fees", "payer")]
    assert call(w.url, "/transactions/pay-1?coordinator=payer")[1]["reversed_by"] == "r-1"

    # no such transaction at this coordinator; none asked for; the worker's own command
    for path, want, error in (
        ("/transactions/nope?coordinator=payer", 404, "transaction_not_found"),
        ("/transactions/pay-1?coordinator=merchant", 404, "transaction_not_found"),
        ("/transactions/pay-1?coordinator=nobody", 404, "transaction_not_found"),
        ("/transactions/pay-1", 422, "invalid_parameter"),
    ):
        status, body = call(w.url, path)
        assert (status, body["error"]) == (want, error), path
    status, body = call(w.url, "/commands?wait=true", command(
        "ExpireTransaction", "x-1", "payer", int(time.time() * 1000), transaction_id="pay-1"))
    assert (status, body["error"]) == (422, "invalid_command")


def test_a_transfer_is_shown_as_one_posting_and_reversed(start_worker, client):
    w = start_worker()
    fund(client, payer=1_000, shop=0)

    def post(kind: str, command_id: str, **fields: Any) -> dict[str, Any]:
        status, body = call(w.url, "/commands?wait=true", command(
            kind, command_id, "payer", int(time.time() * 1000), **fields))
        want = {None: 200, "already_reversed": 409}.get(body.get("reason"), 422)
        assert status == want, body
        return body

    assert post("Transfer", "pay-t", to_account_id="shop", amount_minor=300,
                currency="USD")["events"][0]["type"] == "TransferDebited"
    doc = settled(w.url, "pay-t", "payer", "payer", "shop")
    assert (doc["kind"], doc["state"], doc["deadline"]) == ("transfer", "committed", None)
    assert [(p["from_account_id"], p["to_account_id"], p["amount"]) for p in doc["postings"]] \
        == [("payer", "shop", "3.00 USD")]
    assert doc["ended_at"] == doc["participants"][1]["posted_at"]  # the credit

    body = post("Reverse", "r-t", transaction_id="pay-t")
    assert body["events"][0]["payload"]["reverses"] == "pay-t"
    back = settled(w.url, "r-t", "payer", "payer", "shop")
    assert (back["kind"], back["state"], back["reverses"]) == ("transaction", "committed",
                                                               "pay-t")
    assert call(w.url, "/transactions/pay-t?coordinator=payer")[1]["reversed_by"] == "r-t"
    assert post("Reverse", "r-t2", transaction_id="pay-t")["reason"] == "already_reversed"
    until(lambda: call(w.url, "/accounts/shop")[1]["balance_minor"] == 0)

    # a transfer its destination refused: refunded, and not paid back a second time
    post("Transfer", "lost-t", to_account_id="nobody", amount_minor=200, currency="USD")
    doc = settled(w.url, "lost-t", "payer", "payer")
    assert (doc["state"], doc["reason"]) == ("rejected", "account_not_found")
    body = post("Reverse", "r-lost", transaction_id="lost-t")
    assert body["reason"] == "transfer_refunded", body
    assert call(w.url, "/accounts/payer")[1]["balance_minor"] == 1_000


def test_participants_on_another_workers_partitions(ledger_settings, start_worker, client):
    w1 = start_worker("w1")
    w2 = start_worker("w2")

    parts = split_between((w1, w2), ledger_settings.partitions)
    mine, theirs = (next(a for a in (f"{prefix}-{i}" for i in range(1000))
                         if partition_for(a, ledger_settings.partitions) in parts[w.url])
                    for prefix, w in (("payer", w1), ("payee", w2)))
    fund(client, **{mine: 500, theirs: 0})
    outcome = client.submit(cmd(Transaction, mine, command_id="t-1", postings=[
        Posting(**posting(mine, theirs, 200))])).result(timeout=60)
    assert outcome.accepted
    for w in (w2, w1):  # w2 relays to the coordinator's owner, which reads w2's account
        doc = settled(w.url, "t-1", mine, mine, theirs)
        assert doc["state"] == "committed"
        payee = doc["participants"][1]
        assert payee["account_id"] == theirs
        assert doc["started_at"] <= payee["reserved_at"] <= doc["ended_at"] <= payee["posted_at"]


def test_a_reservation_is_shown_apart_from_the_holds():
    state = AccountState(account_id="acct-2", currency="USD", status="open",
                         overdraft_limit_minor=0, balance_minor=1_000, held_minor=300,
                         version=3, updated_at=1, holds={
                             "h1": Hold(amount_minor=100, expires_at=5),
                             reservation_id("acct-1", "T1"): Hold(amount_minor=200,
                                                                  expires_at=0)})
    doc = account_json(state)
    assert doc["holds"] == {"h1": {"amount_minor": 100, "expires_at": 5}}
    assert doc["reservations"] == [{"coordinator_account_id": "acct-1",
                                    "transaction_id": "T1", "amount_minor": 200,
                                    "amount": "2.00 USD"}]
    assert doc["available_minor"] == 700
