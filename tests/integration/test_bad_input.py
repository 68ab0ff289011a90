"""Bad input on the real broker: every input record is accounted for, nothing stops."""

from __future__ import annotations

import os
import time

import pytest
from confluent_kafka import Producer

from schemas.codec import CODEC, MAGIC
from schemas.models import Deposit, OpenAccount, TransferLeg, Withdraw, encode
from schemas.models import encode_batch as batch
from streams.partitions import partition_for
from streams.readmodels.eventlog import read_all
from streams.worker.processor import LegSigner

pytestmark = pytest.mark.kafka


def test_salted_stream_every_input_is_accounted_for(ledger_settings, start_worker, client):
    s = ledger_settings
    start_worker(max_record_bytes=4096)
    now = int(time.time() * 1000)

    def cmd(cls, cid, account, **kw):
        return cls(command_id=cid, account_id=account, actor="salt", issued_at=now, **kw)

    p_ann = partition_for("ann", s.partitions)
    ghost = next(f"ghost-{i}" for i in range(1000) if partition_for(f"ghost-{i}", s.partitions)
                 == p_ann)
    stray = next(f"stray-{i}" for i in range(1000) if partition_for(f"stray-{i}", s.partitions)
                 != p_ann)
    good = [
        [cmd(OpenAccount, "o-ann", "ann", currency="USD")],
        [cmd(Deposit, "d1", "ann", amount_minor=500, currency="USD"),
         cmd(Deposit, "neg", "ann", amount_minor=-5, currency="USD"),  # negative amount
         cmd(Withdraw, "w-ghost", ghost, amount_minor=1, currency="USD"),  # unknown account
         cmd(Deposit, "misrouted", stray, amount_minor=1, currency="USD")],
        [cmd(Deposit, "d1", "ann", amount_minor=500, currency="USD")],  # duplicate
        [cmd(Deposit, "zero", "ann", amount_minor=0, currency="USD")],
    ]
    bad = {
        "garbage": os.urandom(64),
        "empty": b"",
        "unknown_schema": MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x00",
        "truncated": batch(good[1])[:-7],
        "wrong_schema": CODEC.encode("ledger.Rejection", {
            "command_id": "r", "account_id": "ann", "command_type": "Deposit",
            "reason": "x", "detail": "", "occurred_at": now, "correlation_id": None,
            "actor": "x"}),
        "oversize": batch([cmd(Deposit, f"big{i}", "ann", amount_minor=1, currency="USD")
                           for i in range(200)]),
    }
    assert len(bad["oversize"]) > 4096
    producer = Producer(s.producer_config())
    for i, b in enumerate(bad.values()):  # good and bad records interleaved
        producer.produce(s.commands_topic, batch(good[i % len(good)]), partition=p_ann)
        producer.produce(s.commands_topic, b, partition=p_ann)
    forged = TransferLeg(kind="CREDIT", transfer_id="forged-1", from_account_id="nobody",
                         to_account_id="ann", amount_minor=1_000_000, currency="USD",
                         issued_at=now, actor="mallory")
    forged = LegSigner(b"not-the-secret").sign(forged)
    producer.produce(s.transfers_topic, encode(forged), b"ann", partition=p_ann)
    assert producer.flush(30) == 0

    # the worker is still alive and deciding after all that
    last = client.submit(cmd(Deposit, "after", "ann", amount_minor=1, currency="USD"))
    assert last.result(timeout=60).accepted

    dlq = list(read_all(s, s.dlq_topic))
    codes = sorted(dict(m.headers())["error_code"].decode() for m in dlq)
    assert codes == sorted(["malformed", "malformed", "unknown_schema", "malformed",
                            "wrong_schema", "oversize", "forged_leg"])
    for m in dlq:
        h = {k: v.decode() for k, v in m.headers()}
        assert h["source_topic"] in (s.commands_topic, s.transfers_topic)
        assert int(h["source_partition"]) == p_ann and h["error"]
        if h["error_code"] == "forged_leg":
            assert m.value() == encode(forged)
        else:
            assert m.value() in bad.values()  # the original bytes, untouched
    assert {m.value() for m in dlq} >= {v for v in bad.values() if v}

    # every command in a good record has exactly one outcome record (a duplicate
    # command gets its first outcome again)
    commands_sent = sum(len(good[i % len(good)]) for i in range(len(bad))) + 1
    outcomes = []
    for topic in (s.events_topic, s.rejections_topic):
        for m in read_all(s, topic):
            _, d = CODEC.decode(m.value())
            outcomes.append((d["command_id"], d.get("reason")))
    assert len(outcomes) == commands_sent
    reasons = {cid: reason for cid, reason in outcomes if reason}
    assert reasons["neg"] == "invalid_amount"
    assert reasons["zero"] == "invalid_amount"
    assert reasons["w-ghost"] == "account_not_found"
    assert reasons["misrouted"] == "wrong_partition"
    sent_d1 = sum(c.command_id == "d1" for i in range(len(bad)) for c in good[i % len(good)])
    assert sent_d1 >= 2
    # one outcome per submission: the first, then replayed copies of it
    assert sum(cid == "d1" for cid, _ in outcomes) == sent_d1
