"""The worker's checkpoint, not the group's committed offset, says where it resumes."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.models import Deposit, OpenAccount, encode_batch
from streams.partitions import partition_for

pytestmark = pytest.mark.kafka


def test_commands_the_group_committed_past_are_still_decided(ledger_settings, start_worker,
                                                              client):
    """Faust can commit offsets it never delivered (after a rebalance its fetch loop
    marks skipped offsets as done). Here the group's offset is moved past five commands
    while no worker runs; on a quiet partition nothing new would ever make Faust
    deliver them, so the worker must notice and fetch from its own checkpoint."""
    s = ledger_settings
    now = int(time.time() * 1000)
    first = start_worker("first")
    assert client.submit(OpenAccount(command_id="o", account_id="quiet", actor="t",
                                     issued_at=now, currency="USD")).result(60).accepted
    assert first.stop() == 0

    p = partition_for("quiet", s.partitions)
    producer = Producer(s.producer_config())
    for i in range(5):
        producer.produce(s.commands_topic, encode_batch([Deposit(
            command_id=f"d{i}", account_id="quiet", actor="t", issued_at=now + 1 + i,
            amount_minor=100, currency="USD")]), b"quiet", partition=p)
    assert producer.flush(30) == 0
    admin = AdminClient(s.kafka_config())
    end = TopicPartition(s.commands_topic, p)
    end.offset = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(s.app_id, [TopicPartition(s.commands_topic, p)])]
    )[s.app_id].result().topic_partitions[0].offset + 5
    admin.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(s.app_id, [end])])[s.app_id].result()

    second = start_worker("second", data_dir=first.settings.data_dir, stall_timeout_s=3.0)
    deadline = time.monotonic() + 60
    while True:
        status, doc = second.get("/accounts/quiet")
        if (status == 200 and doc["version"] == 6) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (status, doc["version"], doc["balance_minor"]) == (200, 6, 500), doc
    assert "stalled partitions: fetching from the checkpoint" in second.log_path.read_text()


def test_a_worker_rebuilt_from_the_changelog_knows_the_command_ids(ledger_settings,
                                                                  start_worker, client):
    """The changelog carries a step's outcome records in one record: a worker whose
    store is made from the changelog alone (a new machine) must still answer a retry
    with the first outcome, not apply it again."""
    now = int(time.time() * 1000)
    first = start_worker("first")
    deposit = Deposit(command_id="d1", account_id="moved", actor="t", issued_at=now + 1,
                      amount_minor=700, currency="USD")
    assert client.submit(OpenAccount(command_id="o", account_id="moved", actor="t",
                                     issued_at=now, currency="USD")).result(60).accepted
    told = client.submit(deposit).result(60)
    assert first.stop() == 0

    second = start_worker("second")  # a data dir of its own: the store from the changelog
    again = client.submit(deposit).result(60)
    assert again.events == told.events  # the same event: a replay
    status, doc = second.get("/accounts/moved")
    assert (status, doc["balance_minor"], doc["version"]) == (200, 700, 2)


def test_a_rebalance_while_a_batch_has_steps_left_does_not_stop_the_worker(
        ledger_settings, start_worker):
    """A batch is decided in steps, and a step taken during a rebalance waits for it to
    end: the rebalance must not wait for the whole batch in hand (it would wait for
    itself until the flush timeout, and the worker would exit)."""
    s = ledger_settings
    now = int(time.time() * 1000)
    producer = Producer(s.producer_config())
    for i in range(3000):  # records of 20 commands, one step each (1 KB a step)
        account = f"busy-{i % 40}"
        commands = [Deposit(command_id=f"d{i}-{j}", account_id=account, actor="t",
                            issued_at=now, amount_minor=1, currency="USD") for j in range(20)]
        producer.produce(s.commands_topic, encode_batch(commands), account.encode(),
                         partition=partition_for(account, s.partitions))
    assert producer.flush(30) == 0
    a = start_worker("a", batch_max_bytes=1024, flush_timeout_s=15.0)
    b = start_worker("b", batch_max_bytes=1024, flush_timeout_s=15.0)  # a rebalance
    time.sleep(20)  # longer than the flush timeout: a worker stuck on itself exits by now
    assert a.proc.poll() is None, a.log_tail()
    assert b.proc.poll() is None, b.log_tail()
    assert "did not finish" not in a.log_path.read_text()
