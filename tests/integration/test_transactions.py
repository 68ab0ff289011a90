"""Transactions on the real broker: the client's settlement, a reversal, the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from schemas.models import CommandBase, Deposit, OpenAccount, Posting, Reverse, Transaction
from streams.dev.procs import settings_env

pytestmark = pytest.mark.kafka


def cmd(cls: type[CommandBase], account: str, **kw: object) -> CommandBase:
    kw.setdefault("command_id", uuid.uuid4().hex)
    return cls(account_id=account, actor="test", issued_at=int(time.time() * 1000), **kw)


def posting(src: str, dst: str, amount: int) -> Posting:
    return Posting(from_account_id=src, to_account_id=dst, amount_minor=amount, currency="USD")


def settle(client, command: CommandBase):
    fut = client.submit(command)
    first = fut.result(timeout=30)
    return first, fut.settlement.result(timeout=30)


def test_the_client_is_told_how_a_transaction_ended(client, start_worker):
    worker = start_worker()
    for a, amount in (("card", 10_000), ("merchant", 0), ("fees", 0)):
        client.submit(cmd(OpenAccount, a, currency="USD")).result(timeout=30)
        if amount:
            client.submit(cmd(Deposit, a, amount_minor=amount, currency="USD")).result(30)

    first, end = settle(client, cmd(Transaction, "card", command_id="pay-1", postings=[
        posting("card", "merchant", 9_700), posting("card", "fees", 300)]))
    assert first.accepted and first.events[0].type == "TransactionStarted"
    assert end.accepted and end.events[0].type == "TransactionCommitted"

    _, refused = settle(client, cmd(Transaction, "card", command_id="pay-2", postings=[
        posting("fees", "merchant", 1), posting("card", "merchant", 1)]))
    assert (refused.accepted, refused.reason) == (False, "insufficient_funds")
    assert refused.events[0].payload.posting_index == 1  # the card has nothing left

    _, back = settle(client, cmd(Reverse, "card", command_id="refund-1",
                                 transaction_id="pay-1"))
    assert back.accepted
    for account, balance in (("card", 10_000), ("merchant", 0), ("fees", 0)):
        deadline = time.monotonic() + 30
        while (doc := worker.get(f"/accounts/{account}")[1])["balance_minor"] != balance \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (doc["balance_minor"], doc["available_minor"]) == (balance, balance), doc

    again = client.submit(cmd(Reverse, "card", command_id="refund-2",
                              transaction_id="pay-1")).result(timeout=30)
    assert again.reason == "already_reversed"


def test_the_command_line_splits_a_payment_and_reverses_it(client, start_worker,
                                                           ledger_settings):
    worker = start_worker()
    client.submit(cmd(OpenAccount, "shop", currency="USD")).result(timeout=30)
    client.submit(cmd(OpenAccount, "fee", currency="USD")).result(timeout=30)
    client.submit(cmd(OpenAccount, "buyer", currency="USD")).result(timeout=30)
    client.submit(cmd(Deposit, "buyer", amount_minor=10_000, currency="USD")).result(30)
    env = {**os.environ, **settings_env(ledger_settings)}

    def ledger(*args: str) -> tuple[int, str, str]:
        r = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env,
                           capture_output=True, text=True, timeout=120, check=False)
        return r.returncode, r.stdout, r.stderr

    rc, out, err = ledger("submit", "--command-id", "order-7", "transaction", "buyer",
                          "--posting", "buyer", "shop", "97.00 USD",
                          "--posting", "buyer", "fee", "3.00 USD")
    assert (rc, out.strip()) == (0, "committed: transaction order-7 of buyer"), err
    rc, out, err = ledger("submit", "--command-id", "order-8", "transaction", "buyer",
                          "--posting", "buyer", "shop", "1.00 USD", "--json")
    assert rc != 0
    doc = json.loads(out)
    assert (doc["accepted"], doc["reason"]) == (False, "insufficient_funds")
    assert [e["type"] for e in doc["events"]] == ["TransactionStarted", "TransactionRejected"]
    rc, out, err = ledger("submit", "--command-id", "undo-7", "reverse", "buyer", "order-7")
    assert (rc, out.strip()) == (0, "committed: transaction undo-7 of buyer"), err

    # a transfer, reversed the same way; and how each one is told
    rc, out, err = ledger("submit", "--command-id", "tip-1", "transfer", "buyer", "shop",
                          "2.00 USD")
    assert rc == 0, err
    rc, out, err = ledger("submit", "--command-id", "undo-tip", "reverse", "buyer", "tip-1")
    assert (rc, out.strip()) == (0, "committed: transaction undo-tip of buyer"), err
    for tid, first, link in (("order-7", "transaction order-7 of buyer: committed",
                              "reversed by undo-7"),
                             ("tip-1", "transfer tip-1 of buyer: committed",
                              "reversed by undo-tip")):
        deadline = time.monotonic() + 30
        while True:  # the history index trails the outcome by a moment
            rc, out, err = ledger("transaction", tid, "--coordinator", "buyer", "--url",
                                  worker.url)
            if (rc == 0 and "ended -" not in out) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        lines = out.splitlines()
        assert rc == 0 and lines[0] == first and lines[-1].strip() == link, (out, err)


def test_a_participant_that_does_not_answer_ends_the_transaction_at_its_deadline(
        client, start_worker, ledger_settings):
    """Two workers; the one that owns the payee's partition is stopped (SIGSTOP) while a
    transaction waits for its answer: the worker's timer rejects it at its deadline, and
    once the payee's partition is read again its reservation is released."""
    import signal

    from streams.partitions import partition_for

    a = start_worker("a", transaction_timeout_s=2, session_timeout_s=6.0)
    b = start_worker("b", transaction_timeout_s=2, session_timeout_s=6.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        owned = [set(w.get("/health/ready")[1].get("partitions", [])) for w in (a, b)]
        if all(owned) and len(owned[0] | owned[1]) == ledger_settings.partitions:
            break
        time.sleep(0.5)
    accounts = [f"acct-{i}" for i in range(40)]
    parts = {x: partition_for(x, ledger_settings.partitions) for x in accounts}
    payer = next(x for x in accounts if parts[x] in owned[0])
    payee = next(x for x in accounts if parts[x] in owned[1])
    for x in (payer, payee):
        client.submit(cmd(OpenAccount, x, currency="USD")).result(timeout=30)
    client.submit(cmd(Deposit, payer, amount_minor=500, currency="USD")).result(timeout=30)

    b.proc.send_signal(signal.SIGSTOP)
    try:
        first, end = settle(client, cmd(Transaction, payer, command_id="slow", postings=[
            posting(payer, payee, 200)]))
        assert first.accepted
        assert (end.accepted, end.reason) == (False, "transaction_timed_out")
        assert payee in end.rejection.detail
    finally:
        b.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        doc, other = (a.get(f"/accounts/{x}")[1] for x in (payer, payee))
        if doc.get("available_minor") == 500 and not doc.get("reservations") \
                and other.get("version", 0) >= 3 and not other.get("reservations"):
            break
        time.sleep(0.5)
    assert (doc["balance_minor"], doc["available_minor"]) == (500, 500), doc
    # the payee reserved when its PREPARE was read at last, and was told to release
    assert (other["balance_minor"], other["version"], other["reservations"]) == (0, 3, []), \
        other
