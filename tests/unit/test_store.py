"""All of a worker's partition stores draw on one RocksDB memory budget."""

from __future__ import annotations

import os

import rocksdict

from streams.worker import store


def test_partition_stores_share_one_cache_that_holds_their_memtables_and_indexes(tmp_path):
    cache, memtables = store._shared()
    before = cache.get_usage()
    options = store.SharedBudget(**store.STORE_OPTIONS, use_rocksdict=True)
    dbs = [options.open(tmp_path / f"p{i}") for i in range(6)]
    try:
        # ~90 MB of outcome-like records over six partitions: more than the budget
        for n in range(60_000):
            dbs[n % 6][b"i" + os.urandom(24)] = os.urandom(1500)
        # memtables of all partitions are charged to the one cache, and bounded
        # (writes never stall: while a flush is under way they may pass it a little)
        assert 0 < memtables.get_usage() <= store.MEMTABLE_BYTES * 1.5
        assert cache.get_usage() > before
        # table files were written (the memtables were flushed), and reading them
        # goes through the same cache, whose size does not grow past its capacity
        for db in dbs:
            db.flush()
            assert sum(1 for _ in db.values()) == 10_000
        assert cache.get_usage() <= store.STORE_CACHE_BYTES * 1.05
    finally:
        for db in dbs:
            db.close()


def test_any_rocksdb_the_worker_opens_can_draw_on_the_same_budget(tmp_path):
    _, memtables = store._shared()
    before = memtables.get_usage()
    db = rocksdict.Rdict(str(tmp_path / "history"),
                         store.within_budget(rocksdict.Options(raw_mode=True)))
    try:
        for n in range(2_000):
            db[n.to_bytes(4, "big")] = os.urandom(1000)
        assert memtables.get_usage() > before  # its memtable is counted in the budget
    finally:
        db.close()
