"""confluent-kafka (librdkafka) and Faust (aiokafka) must put a key on the same partition."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streams.partitions import partition_for
from streams.readmodels.eventlog import read_all
from streams.settings import Settings

pytestmark = pytest.mark.kafka
PARTITIONS = 12


def test_ten_thousand_keys_land_where_faust_expects(kafka_bootstrap, unique_name):
    topic = unique_name("keys")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
    s = Settings(bootstrap_servers=kafka_bootstrap)
    # The producer config every confluent-kafka client of the ledger uses; no explicit
    # partition, so librdkafka's partitioner decides.
    producer = Producer(s.producer_config())
    keys = [f"account-{i}" for i in range(10_000)]
    for k in keys:
        producer.produce(topic, b"", k.encode())
        producer.poll(0)
    assert producer.flush(30) == 0

    landed = {m.key().decode(): m.partition()
              for m in read_all(s.model_copy(update={"partitions": PARTITIONS}), topic)}
    assert len(landed) == len(keys)
    all_partitions = list(range(PARTITIONS))
    faust_choice = {k: DefaultPartitioner()(k.encode(), all_partitions, all_partitions)
                    for k in keys}
    assert landed == faust_choice
    assert landed == {k: partition_for(k, PARTITIONS) for k in keys}
    assert len(set(landed.values())) == PARTITIONS


def test_librdkafka_default_partitioner_would_disagree(kafka_bootstrap, unique_name):
    """Why the setting matters: with librdkafka's default (CRC32) keys land elsewhere."""
    topic = unique_name("crc")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
    s = Settings(bootstrap_servers=kafka_bootstrap)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    keys = [f"account-{i}" for i in range(500)]
    for k in keys:
        producer.produce(topic, b"", k.encode())
    assert producer.flush(30) == 0
    landed = {m.key().decode(): m.partition() for m in read_all(s, topic)}
    disagree = sum(landed[k] != partition_for(k, PARTITIONS) for k in keys)
    assert disagree > 300
