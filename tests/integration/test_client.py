"""Whose outcome a caller gets: ids are scoped per account, so the same ``command_id``
on two accounts is two commands with two outcomes (client and HTTP), and a transfer's
settlement is its own, not that of another account's command with the same id."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from producers.client import DeliveryError, LedgerClient, QueueFull
from schemas.codec import CODEC
from schemas.models import Deposit, OpenAccount, Transfer
from streams.partitions import partition_for
from streams.readmodels.eventlog import read_all

pytestmark = pytest.mark.kafka


def now_ms() -> int:
    return int(time.time() * 1000)


def open_accounts(client: LedgerClient, *accounts: str) -> None:
    futs = [client.submit(OpenAccount(command_id="open", account_id=a, actor="t",
                                      issued_at=now_ms(), currency="USD")) for a in accounts]
    assert all(f.result(timeout=60).accepted for f in futs)


def test_the_same_id_on_two_accounts_gets_each_its_own_outcome(ledger_settings, start_worker,
                                                               client):
    start_worker()
    x, y = "same-id-x", "same-id-y"
    open_accounts(client, x, y)
    fx = client.submit(Deposit(command_id="dep", account_id=x, actor="t", issued_at=now_ms(),
                               amount_minor=100, currency="USD"))
    fy = client.submit(Deposit(command_id="dep", account_id=y, actor="t", issued_at=now_ms(),
                               amount_minor=7, currency="USD"))
    ox, oy = fx.result(timeout=60), fy.result(timeout=60)
    assert [(e.account_id, e.balance_after_minor) for e in ox.events] == [(x, 100)]
    assert [(e.account_id, e.balance_after_minor) for e in oy.events] == [(y, 7)]

    # a transfer x -> y with id "t", while y has a deposit of its own called "t": the
    # deposit's outcome is y's Deposited, the transfer's settlement the credit at y
    ft = client.submit(Transfer(command_id="t", account_id=x, actor="t", issued_at=now_ms(),
                                to_account_id=y, amount_minor=30, currency="USD"))
    fd = client.submit(Deposit(command_id="t", account_id=y, actor="t", issued_at=now_ms(),
                               amount_minor=1, currency="USD"))
    assert [e.type for e in ft.result(timeout=60).events] == ["TransferDebited"]
    assert [(e.type, e.account_id) for e in fd.result(timeout=60).events] == [("Deposited", y)]
    settled = ft.settlement.result(timeout=60).events
    assert [(e.type, e.account_id) for e in settled] == [("TransferCredited", y)]


def test_a_retry_submitted_while_the_first_waits_gets_the_same_outcome(ledger_settings,
                                                                      start_worker, client):
    start_worker()
    open_accounts(client, "retry")
    dep = Deposit(command_id="d", account_id="retry", actor="t", issued_at=now_ms(),
                  amount_minor=5, currency="USD")
    first, again = client.submit(dep), client.submit(dep)
    assert first.result(timeout=60).events == again.result(timeout=60).events
    assert first.result().events[0].balance_after_minor == 5


def test_a_client_reads_only_the_partitions_it_waits_on(ledger_settings, start_worker):
    start_worker()
    s = ledger_settings
    with LedgerClient(s) as client:
        # (what the client's consumer was assigned: the consumer itself is busy polling
        # on the outcome thread, and a call from here would wait for it)
        assert client._reading == set()
        open_accounts(client, "reader-a")
        p = partition_for("reader-a", s.partitions)
        assert client._reading == {(s.events_topic, p), (s.rejections_topic, p)}
        fut = client.submit(Transfer(command_id="t", account_id="reader-a", actor="t",
                                     issued_at=now_ms(), to_account_id="reader-b",
                                     amount_minor=1, currency="USD"))
        assert fut.result(timeout=60).reason == "insufficient_funds"
        q = partition_for("reader-b", s.partitions)
        assert client._reading == {(s.events_topic, p), (s.rejections_topic, p),
                                   (s.events_topic, q)}


def test_submit_is_bounded(ledger_settings):
    # no worker: nothing resolves, so the in-flight commands stay in flight
    with LedgerClient(ledger_settings, max_in_flight=2) as client:
        def dep(i: int) -> Deposit:
            return Deposit(command_id=f"d{i}", account_id="bounded", actor="t",
                           issued_at=now_ms(), amount_minor=1, currency="USD")

        client.submit(dep(1))
        client.submit(dep(2))
        with pytest.raises(QueueFull, match="2 commands already queued"):
            client.submit(dep(3), block_s=0)
        started = time.monotonic()
        with pytest.raises(QueueFull):
            client.submit(dep(4), block_s=0.3)
        assert time.monotonic() - started >= 0.3


def test_records_are_cut_to_the_size_asked(ledger_settings):
    """Commands coalesce into records of at most ``max_batch_bytes`` (a record is cut in
    halves until it fits), every command once, in the order submitted."""
    s = ledger_settings
    commands = [Deposit(command_id=f"d{i:03}", account_id="sized", actor="t",
                        issued_at=now_ms(), amount_minor=1, currency="USD",
                        correlation_id="c" * (10 + i % 50)) for i in range(300)]
    with LedgerClient(s, wait_outcomes=False, max_batch_bytes=3000, linger_ms=50) as client:
        futures = [client.submit(c) for c in commands]
        client.flush(30)
        where = [f.result(timeout=30) for f in futures]
    records = {o.offset for o in where}
    assert 1 < len(records) < 300
    got = []
    for m in read_all(s, s.commands_topic):
        assert len(m.value()) <= 3000
        got += [body["command_id"] for _, body in
                CODEC.decode(m.value(), expect="ledger.CommandBatch")[1]["commands"]]
    assert got == [c.command_id for c in commands]


class ImplicitAcks:
    """The client's producer, reporting every delivery as librdkafka's idempotent
    producer reports a batch it only infers was written: no error, no offset."""

    class NoOffset:
        def __init__(self, msg) -> None:
            self.msg = msg

        def offset(self) -> int:
            return -1001

        def __getattr__(self, name):
            return getattr(self.msg, name)

    def __init__(self, producer) -> None:
        self.producer = producer

    def produce(self, *args, on_delivery, **kw):
        self.producer.produce(*args, **kw, on_delivery=lambda err, msg: on_delivery(
            err, self.NoOffset(msg)))

    def __getattr__(self, name):
        return getattr(self.producer, name)


@pytest.mark.parametrize("wait_outcomes", [False, True])
def test_an_acknowledgement_without_an_offset_is_not_a_delivery(ledger_settings,
                                                                wait_outcomes):
    with LedgerClient(ledger_settings, wait_outcomes=wait_outcomes) as client:
        client.producer = ImplicitAcks(client.producer)
        f = client.submit(Deposit(command_id="d1", account_id="implicit", actor="t",
                                  issued_at=now_ms(), amount_minor=1, currency="USD"))
        with pytest.raises(DeliveryError, match="without an offset"):
            f.result(timeout=30)


def test_http_callers_with_the_same_id_on_two_accounts(ledger_settings, start_worker):
    url = start_worker().url

    def post(body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(url + "/commands?wait=true", json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())

    def command(kind: str, account: str, **fields: object) -> dict:
        return {"type": kind, "command_id": "same", "account_id": account, "actor": "t",
                "issued_at": now_ms(), **fields}

    accounts = [f"http-same-{i}" for i in range(4)]
    with ThreadPoolExecutor(len(accounts)) as pool:
        opened = list(pool.map(lambda a: post(command("OpenAccount", a, currency="USD")),
                               accounts))
    for account, (status, doc) in zip(accounts, opened, strict=True):
        assert status == 200, doc
        assert [(e["type"], e["account_id"]) for e in doc["events"]] == \
            [("AccountOpened", account)]
