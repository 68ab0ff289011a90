"""RocksDB in the worker: one memory budget for all of its stores.

Faust opens one RocksDB per partition of the accounts table, each with its own block
cache and memtables (its defaults: 2 GB and 3 x 64 MB) and, outside any cache, the
index and filter blocks of every table file it has written; the history index opens
one more with RocksDB's defaults. So a worker's memory could grow with the partitions
it held and with the data in them (every command_id of the idempotency window).

Here every partition's store, and the history index (``streams.readmodels.history``), charge
their memtables (through a shared write buffer manager) and their index and filter
blocks to one block cache of ``STORE_CACHE_BYTES`` per process: RocksDB's memory stays
inside that however many commands or partitions the worker has (the history index's
process has one budget, the worker, reading the index too, another). (What else a worker's
memory follows, the size of what it decides at once, is bounded by
``Settings.batch_max_bytes``.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import rocksdict
from faust.stores.rocksdb import RocksDBOptions

from streams.worker.processor import OUTCOME_LOG_PREFIX, unpack_records
from streams.worker.state import payload

STORE_CACHE_BYTES = 96 << 20  # the worker's RocksDB memory, all partitions
MEMTABLE_BYTES = 32 << 20  # of which memtables (all partitions), charged to the cache
# Per partition, within those totals: the memtable size before a flush.
STORE_OPTIONS = {"write_buffer_size": 8 << 20, "max_write_buffer_number": 2}

_cache: rocksdict.Cache | None = None
_memtables: rocksdict.WriteBufferManager | None = None


def _shared() -> tuple[rocksdict.Cache, rocksdict.WriteBufferManager]:
    global _cache, _memtables
    if _cache is None or _memtables is None:
        _cache = rocksdict.Cache(STORE_CACHE_BYTES)
        _memtables = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            MEMTABLE_BYTES, False, _cache)
    return _cache, _memtables


def within_budget(options: rocksdict.Options, bloom_bits: int = 10) -> rocksdict.Options:
    """``options`` with the worker's shared cache and memtable budget (any RocksDB the
    worker opens: the accounts table's partitions, the history index)."""
    cache, memtables = _shared()
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(bloom_bits, True)
    table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
    table.set_block_cache(cache)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    options.set_block_based_table_factory(table)
    options.set_write_buffer_manager(memtables)
    return options


class SharedBudget(RocksDBOptions):
    """Faust's options for one partition's RocksDB, with the worker's shared budget."""

    def as_options(self) -> Any:
        return within_budget(super().as_options(), self.bloom_filter_size)


def use_shared_budget(table: Any) -> None:
    """Make a Faust RocksDB table open its partitions within the worker's budget."""
    store = table.data
    store.rocksdb_options = SharedBudget(**store.options, use_rocksdict=True)


def unpack_outcome_logs(table: Any, applied: Callable[[], None] = lambda: None) -> None:
    """Make Faust's changelog recovery of the accounts table also write the outcome
    records each step's outcome log carries (``streams.worker.processor.outcome_log_key``):
    the changelog holds them only there. They are written before the records Faust
    applies, whose persisted offset moves last, so a crash in between unpacks them
    again. A log of a step that never finished holds values tagged beyond the
    checkpoint, which read as absent (``streams.worker.state``), as its other records do.
    ``applied`` is called after each batch is in the store (a crash test's point)."""
    store = table.data
    apply = store.apply_changelog_batch

    def apply_changelog_batch(batch: Iterable[Any], to_key: Any, to_value: Any) -> None:
        events = list(batch)
        writes: dict[int, rocksdict.WriteBatch] = {}
        for event in events:
            m = event.message
            if m.key is None or m.key[:1] != OUTCOME_LOG_PREFIX or m.value is None:
                continue
            wb = writes.setdefault(m.partition, rocksdict.WriteBatch(raw_mode=True))
            for key, value in unpack_records(payload(m.value)):
                if value is None:
                    wb.delete(key)
                else:
                    wb.put(key, value)
        for partition, wb in writes.items():
            store._db_for_partition(partition).write(wb)
        apply(events, to_key, to_value)
        applied()

    store.apply_changelog_batch = apply_changelog_batch
