"""The worker's RocksDB stores open with bounded memtables, not Faust's defaults."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.kafka


def test_every_partition_store_opens_with_bounded_memtables(ledger_settings, start_worker):
    worker = start_worker()

    # RocksDB writes the options each database really opened with next to its data
    # (the block cache's size is not among them: see streams.app.STORE_OPTIONS)
    opened = {}
    for path in worker.settings.data_dir.rglob("OPTIONS-*"):
        text = path.read_text()
        opened[path.parent.name] = tuple(
            int(m.group(1)) if (m := re.search(rf"^\s*{name}=(\d+)", text, re.M)) else None
            for name in ("write_buffer_size", "max_write_buffer_number"))
    accounts = {db: v for db, v in opened.items() if "accounts" in db}

    assert len(accounts) == ledger_settings.partitions
    assert set(accounts.values()) == {(8 << 20, 2)}
