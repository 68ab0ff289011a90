"""Read a whole topic (or every partition up to its current end) with confluent-kafka."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from confluent_kafka import Consumer, Message, TopicPartition

from streams.settings import Settings


def read_all(s: Settings, topic: str, timeout_s: float = 60.0,
             progress: bool = False) -> Iterator[Message]:
    """Every record of ``topic`` from the start to the end offsets seen on entry; raises
    TimeoutError if no record arrives for ``timeout_s`` (however long the whole read)."""
    consumer = Consumer({**s.kafka_config(), "group.id": f"ledger-read-{uuid.uuid4()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "enable.partition.eof": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"topic {topic}: {meta.error}")
        ends: dict[int, int] = {}
        starts = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                starts.append(TopicPartition(topic, p, low))
        if not ends:
            return
        total = sum(ends[tp.partition] - tp.offset for tp in starts)
        consumer.assign(starts)
        done: set[int] = set()
        seen = 0
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {seen}/{total} records of {topic}, then nothing "
                                   f"for {timeout_s}s")
            for m in consumer.consume(10_000, timeout=0.5):
                if m.error() is not None:
                    continue
                deadline = time.monotonic() + timeout_s
                p, offset = m.partition(), m.offset()
                if p is None or offset is None or p in done or offset >= ends[p]:
                    continue
                seen += 1
                yield m
                if offset >= ends[p] - 1:
                    done.add(p)
            if progress:
                print(f"\r  {topic}: {seen}/{total}", end="", flush=True)
        if progress:
            print()
    finally:
        consumer.close()
