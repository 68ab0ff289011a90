"""The worker's checkpoint, not the group's committed offset, says where it resumes."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.models import Deposit, OpenAccount, encode_batch
from streams.processor import partition_for

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
