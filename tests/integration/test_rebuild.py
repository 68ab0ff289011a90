"""Lose the changelog and the disk: rebuild the worker's state from the events alone."""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import AdminClient

from schemas.codec import CODEC
from schemas.models import CommandOutcome, Deposit, OpenAccount, Transfer, Withdraw
from streams.ops.rebuild import rebuild
from streams.ops.verify import verify
from streams.readmodels.eventlog import read_all
from streams.readmodels.projection import GroupActive
from streams.settings import Settings
from streams.worker.processor import _MS, retained, unpack_records
from streams.worker.state import _HEAD, payload

pytestmark = pytest.mark.kafka


def test_rebuild_from_events_after_losing_changelog_and_disk(ledger_settings, start_worker,
                                                             client):
    s = ledger_settings
    worker = start_worker("before")
    t0 = int(time.time() * 1000)
    seq = iter(range(t0, t0 + 10**6))
    accounts = [f"r{i}" for i in range(20)]
    history = [OpenAccount(command_id=f"o-{a}", account_id=a, actor="t", issued_at=next(seq),
                           currency="USD") for a in accounts]
    history += [Deposit(command_id=f"d-{a}", account_id=a, actor="t", issued_at=next(seq),
                        amount_minor=10_000, currency="USD") for a in accounts]
    history += [Transfer(command_id=f"t{i}", account_id=accounts[i], actor="t",
                         issued_at=next(seq), to_account_id=accounts[(i + 7) % 20],
                         amount_minor=2_500, currency="USD") for i in range(20)]
    history += [Withdraw(command_id=f"w{i}", account_id=accounts[i], actor="t",
                         issued_at=next(seq), amount_minor=50_000, currency="USD")
                for i in range(5)]  # refused: insufficient funds
    # Accounts first: a transfer's credit leg that reached its destination before the
    # destination's OpenAccount would be refunded (correctly), and change the count.
    first = {}
    for part in (history[:40], history[40:]):
        futures = [client.submit(c) for c in part]
        first.update({c.command_id: f.result(timeout=60)
                      for c, f in zip(part, futures, strict=True)})
    for c, f in zip(history[40:], futures, strict=True):
        if isinstance(c, Transfer):
            assert f.settlement.result(timeout=60).events[0].type == "TransferCredited"
    before = verify(s)
    assert before.ok and before.transfers_in_flight == 0

    with pytest.raises(GroupActive):  # never behind a live worker's back
        rebuild(s)
    assert worker.stop() == 0

    delete_changelog(s)

    result = rebuild(s)
    assert result.accounts == 20
    assert result.outcomes == len(history) + 20  # + the transfers' credit legs
    # each rebuilt outcome is kept for the idempotency window, and indexed to be forgotten
    stored = {m.key(): m.value() for m in read_all(s, s.changelog_topic)}
    assert not [k for k in stored if k.startswith(b"i")]  # packed, as the worker writes
    logs = {(m.partition(), m.key()): m.value() for m in read_all(s, s.changelog_topic)
            if m.key().startswith(b"o")}  # a partition's keys, not the topic's
    outcomes = {k: CommandOutcome.from_avro(CODEC.decode(payload(v))[1])
                for log in logs.values() for k, v in unpack_records(payload(log))}
    assert len(outcomes) == result.outcomes
    assert all(o.expires_at > time.time() * 1000 for o in outcomes.values())
    indexed = sorted((_MS.unpack_from(k, 1)[0], okey) for k, v in stored.items()
                     if k.startswith(b"e") for okey in retained(k, v[_HEAD.size:]))
    assert sorted((o.expires_at, k) for k, o in outcomes.items()) == \
        [(at, k) for at, k in indexed if k.startswith(b"i")]
    # each packed record is forgotten with the last of its outcomes
    assert sorted(k for _, k in indexed if k.startswith(b"o")) == sorted(k for _, k in logs)

    after = start_worker("after")  # a new, empty data directory: the disk is lost too
    for a in accounts:
        status, doc = after.get(f"/accounts/{a}")
        assert status == 200
        assert (doc["balance_minor"], doc["version"]) == (before.states[a].balance_minor,
                                                          before.states[a].version)
    # retries of old commands get their first outcome, with no second effect
    for c in history[40:45] + history[-2:]:
        again = client.submit(c).result(timeout=60)
        assert again.accepted == first[c.command_id].accepted
        assert again.events == first[c.command_id].events
        assert again.reason == first[c.command_id].reason
    # and the ledger goes on: new versions follow on, gapless
    more = client.submit(Deposit(command_id="after-1", account_id="r0", actor="t",
                                 issued_at=next(seq), amount_minor=1, currency="USD"))
    assert more.result(timeout=60).events[0].version == before.states["r0"].version + 1
    final = verify(s)
    assert final.ok, final.breaches
    assert final.states["r0"].balance_minor == before.states["r0"].balance_minor + 1


def delete_changelog(s: Settings) -> None:
    """The worker's state lost: its changelog topic deleted (and gone from the broker)."""
    admin = AdminClient(s.kafka_config())
    admin.delete_topics([s.changelog_topic])[s.changelog_topic].result(30)
    deadline = time.monotonic() + 60
    while s.changelog_topic in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, "changelog topic not deleted"
        time.sleep(0.2)
