"""The local Kafka broker works end to end: topics, idempotent produce, consume, restart."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.dev.kafka_local import LocalBroker
from streams.ops.topics import ensure_topics, specs
from streams.settings import Settings

pytestmark = pytest.mark.kafka

MESSAGE_COUNT = 100
TIMEOUT_S = 30.0


def create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=1)],
        operation_timeout=TIMEOUT_S,
        request_timeout=TIMEOUT_S,
    )
    futures[topic].result(timeout=TIMEOUT_S)


def produce(bootstrap: str, topic: str, count: int) -> list[tuple[bytes, bytes]]:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "delivery.timeout.ms": int(TIMEOUT_S * 1000),
        }
    )
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    sent = [(f"key-{i}".encode(), f"value-{i}".encode()) for i in range(count)]
    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(TIMEOUT_S) == 0, "messages still undelivered after flush"
    assert errors == []
    return sent


def consume(bootstrap: str, topic: str, group: str, count: int) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        consumer.subscribe([topic])
        while len(received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"got {len(received)} of {count} messages in {TIMEOUT_S:.0f} s")
            msg = consumer.poll(timeout=min(1.0, remaining))
            if msg is None:
                continue
            if msg.error() is not None:
                raise KafkaException(msg.error())
            key, value = msg.key(), msg.value()
            assert key is not None and value is not None
            received.append((key, value))
    finally:
        consumer.close()
    return received


def test_produce_and_consume_in_order(
    kafka_bootstrap: str, unique_name: Callable[..., str]
) -> None:
    topic = unique_name("topic")
    create_topic(kafka_bootstrap, topic)

    sent = produce(kafka_bootstrap, topic, MESSAGE_COUNT)

    assert consume(kafka_bootstrap, topic, unique_name("group"), MESSAGE_COUNT) == sent


def test_restart_keeps_topic_and_messages(
    local_broker: LocalBroker, unique_name: Callable[..., str]
) -> None:
    bootstrap = local_broker.bootstrap_servers
    topic = unique_name("topic")
    create_topic(bootstrap, topic)
    sent = produce(bootstrap, topic, MESSAGE_COUNT)

    local_broker.restart()

    assert local_broker.bootstrap_servers == bootstrap
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=TIMEOUT_S)
    assert topic in metadata.topics
    assert consume(bootstrap, topic, unique_name("group-after-restart"), MESSAGE_COUNT) == sent


def test_new_topics_answer_on_every_partition(kafka_bootstrap: str,
                                              unique_name: Callable[..., str],
                                              tmp_path: Path) -> None:
    """Once ensure_topics returns, every partition answers at once (no NOT_LEADER window)."""
    for round_ in range(3):
        s = Settings(bootstrap_servers=kafka_bootstrap).isolated(
            unique_name(f"r{round_}"), data_dir=tmp_path / f"d{round_}")
        assert ensure_topics(s)
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "probe"})
        try:
            for spec in specs(s):
                for p in range(spec.partitions):
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(spec.name, p), timeout=10)
                    assert (low, high) == (0, 0), (spec.name, p)
        finally:
            consumer.close()
