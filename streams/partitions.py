"""An account's partition: the same on every topic, for the client and the worker."""

from __future__ import annotations

from functools import lru_cache

from streams import core

# Kafka's default (murmur2) partition of a key: the same as Faust and the Java client.
partition_for = lru_cache(maxsize=1 << 16)(core.partition_for)
