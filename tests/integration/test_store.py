"""The worker's RocksDB stores open within the worker's memory budget, not Faust's
defaults (see streams.worker.store; tests/unit/test_store.py shows the budget holding)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.kafka


def test_every_partition_store_opens_with_bounded_memtables(ledger_settings, start_worker):
    worker = start_worker()

    # RocksDB writes the options each database really opened with next to its data
    # (the shared block cache and write buffer manager are not among them)
    opened = {}
    for path in worker.settings.data_dir.rglob("OPTIONS-*"):
        text = path.read_text()
        opened[path.parent.name] = tuple(
            m.group(1) if (m := re.search(rf"^\s*{name}=(\w+)", text, re.M)) else None
            for name in ("write_buffer_size", "max_write_buffer_number",
                         "cache_index_and_filter_blocks",
                         "pin_l0_filter_and_index_blocks_in_cache"))
    accounts = {db: v for db, v in opened.items() if "accounts" in db}

    assert len(accounts) == ledger_settings.partitions
    # Faust's defaults: 64 MB x 3, and index and filter blocks held outside the cache
    assert set(accounts.values()) == {(str(8 << 20), "2", "true", "true")}
