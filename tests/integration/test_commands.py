"""Submit-and-wait for every command type, and holds that the ledger expires itself."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

from producers.client import LedgerClient
from schemas.codec import CODEC
from schemas.models import (
    CaptureHold,
    CloseAccount,
    Deposit,
    OpenAccount,
    PlaceHold,
    ReleaseHold,
    Transfer,
    Withdraw,
)
from streams.ops.verify import verify
from streams.readmodels.eventlog import read_all

pytestmark = pytest.mark.kafka


def test_every_command_type_and_a_hold_that_expires(ledger_settings, start_worker, client):
    worker = start_worker()
    now = int(time.time() * 1000)
    seq = iter(range(now, now + 10_000))

    def run(cls, cid, account, **kw):
        return client.submit(cls(command_id=cid, account_id=account, actor="t",
                                 issued_at=next(seq), **kw)).result(timeout=60)

    assert run(OpenAccount, "o1", "ann", currency="USD", overdraft_limit_minor=1_000).accepted
    assert run(OpenAccount, "o2", "ben", currency="USD").accepted
    assert run(OpenAccount, "o1", "ann", currency="USD",
               overdraft_limit_minor=1_000).events[0].version == 1  # a retry: same answer
    assert run(OpenAccount, "o3", "ann", currency="USD").reason == "account_already_exists"
    assert run(Deposit, "o1", "ann", amount_minor=1, currency="USD").reason == \
        "idempotency_key_reused"
    assert run(Deposit, "d1", "ann", amount_minor=5_000, currency="USD").accepted
    assert run(Deposit, "d2", "ann", amount_minor=1, currency="EUR").reason == \
        "currency_mismatch"
    assert run(Withdraw, "w1", "ann", amount_minor=5_500, currency="USD").events[0] \
        .balance_after_minor == -500  # into the overdraft
    assert run(Withdraw, "w2", "ann", amount_minor=501, currency="USD").reason == \
        "insufficient_funds"
    assert run(Deposit, "d3", "ann", amount_minor=10_500, currency="USD",
               expected_version=99).reason == "version_conflict"
    assert run(Deposit, "d4", "ann", amount_minor=10_500, currency="USD").accepted

    fut = client.submit(Transfer(command_id="t1", account_id="ann", actor="t",
                                 issued_at=next(seq), to_account_id="ben", amount_minor=2_000,
                                 currency="USD"))
    assert fut.result(timeout=60).events[0].type == "TransferDebited"
    assert fut.settlement.result(timeout=60).events[0].type == "TransferCredited"

    held = run(PlaceHold, "h1", "ann", hold_id="card-1", amount_minor=3_000, currency="USD",
               expires_at=now + 3_600_000).events[0]
    assert held.available_after_minor == held.balance_after_minor - 3_000
    captured = run(CaptureHold, "h2", "ann", hold_id="card-1", amount_minor=1_200).events[0]
    assert captured.payload.released_minor == 1_800
    assert captured.available_after_minor == captured.balance_after_minor
    assert run(ReleaseHold, "h3", "ann", hold_id="card-1").reason == "hold_not_found"
    assert run(PlaceHold, "h4", "ann", hold_id="card-2", amount_minor=100, currency="USD",
               expires_at=now + 3_600_000).accepted
    assert run(ReleaseHold, "h5", "ann", hold_id="card-2").events[0].payload.reason == \
        "released"

    # A hold that expires: the worker's timer puts an ExpireHold on the log.
    placed = run(PlaceHold, "h6", "ben", hold_id="card-3", amount_minor=500, currency="USD",
                 expires_at=int(time.time() * 1000) + 1_500).events[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # an outcome is out before the state that records it: wait for the version
        # after the hold, not just for an empty list of holds
        _, doc = worker.get("/accounts/ben")
        if doc["version"] > placed.version:
            break
        time.sleep(0.2)
    assert doc["holds"] == {} and doc["available_minor"] == doc["balance_minor"] == 2_000

    assert run(CloseAccount, "c1", "ben").reason == "balance_not_zero"
    assert run(Withdraw, "w3", "ben", amount_minor=2_000, currency="USD").accepted
    assert run(CloseAccount, "c2", "ben").events[0].type == "AccountClosed"
    assert run(Deposit, "d5", "ben", amount_minor=1, currency="USD").reason == "account_closed"

    report = verify(ledger_settings)
    assert report.ok, report.breaches
    assert report.states["ben"].status == "closed"
    expiries = [m for m in read_all(ledger_settings, ledger_settings.events_topic)
                if b"expire:card-3:" in m.value()]
    assert len(expiries) >= 1
    (_, datum) = CODEC.decode(expiries[0].value())
    assert datum["payload"] == ("ledger.HoldReleased", {"hold_id": "card-3",
                                                        "amount_minor": 500,
                                                        "reason": "expired"})
    assert datum["actor"] == "ledger"


def test_a_command_id_is_remembered_for_the_window_by_the_brokers_clock(
        ledger_settings, start_worker, client):
    start_worker(idempotency_window_s=3)
    now = int(time.time() * 1000)
    assert client.submit(OpenAccount(command_id="o", account_id="win", actor="t",
                                     issued_at=now, currency="USD")).result(timeout=60).accepted
    # a client clock far behind or ahead does not matter: the broker stamps the records
    deposit = Deposit(command_id="d", account_id="win", actor="t", issued_at=now - 10**9,
                      amount_minor=100, currency="USD")

    first = client.submit(deposit).result(timeout=60).events[0]
    retry = client.submit(deposit).result(timeout=60).events[0]
    time.sleep(3.5)
    later = client.submit(deposit).result(timeout=60).events[0]

    assert retry == first and first.balance_after_minor == 100
    assert later.event_id != first.event_id and later.balance_after_minor == 200
    stamps = {m.timestamp()[0] for m in read_all(ledger_settings, ledger_settings.commands_topic)}
    assert stamps == {TIMESTAMP_LOG_APPEND_TIME}


def test_without_waiting_for_outcomes_a_submit_says_where_its_record_is(ledger_settings):
    deposits = [Deposit(command_id=f"bulk-{i}", account_id=f"bulk-{i % 3}", actor="t",
                        issued_at=1, amount_minor=1, currency="USD") for i in range(30)]
    with LedgerClient(ledger_settings, wait_outcomes=False) as client:
        acked = [f.result(timeout=60) for f in [client.submit(d) for d in deposits]]

    on_log = {}
    for m in read_all(ledger_settings, ledger_settings.commands_topic):
        for _name, body in CODEC.decode(m.value())[1]["commands"]:
            on_log[body["command_id"]] = (m.partition(), m.offset())
    assert {a.command_id: (a.partition, a.offset) for a in acked} == on_log
    assert all(a.events == [] and a.rejection is None for a in acked)
