"""An account's partition: the same on every topic, for the client and the worker."""

from __future__ import annotations

from functools import lru_cache

from aiokafka.partitioner import murmur2


@lru_cache(maxsize=1 << 16)
def partition_for(account_id: str, partitions: int) -> int:
    """Kafka's default (murmur2) partition of a key: the same as Faust and the Java client."""
    return int(murmur2(account_id.encode()) & 0x7FFFFFFF) % partitions
