"""The history index without Kafka: records fed to it as its consumer would."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from confluent_kafka import KafkaError

from schemas.models import AccountOpened, Deposited, LedgerEvent, encode
from streams.readmodels.history import History, Indexer, _key_of, event_key
from streams.settings import Settings


class Msg:
    def __init__(self, partition: int, offset: int, value: bytes | None = None,
                 eof: bool = False) -> None:
        self._p, self._o, self._v, self._eof = partition, offset, value, eof

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes | None:
        return self._v

    def error(self):
        return KafkaError(KafkaError._PARTITION_EOF) if self._eof else None


def event(account: str, version: int, occurred_at: int, amount: int = 10) -> bytes:
    payload = AccountOpened(overdraft_limit_minor=0) if version == 1 else \
        Deposited(amount_minor=amount)
    return encode(LedgerEvent(
        event_id=f"{account}-{version}", account_id=account, version=version, currency="USD",
        balance_after_minor=amount * (version - 1), available_after_minor=amount * (version - 1),
        occurred_at=occurred_at, command_id=f"c{version}", causation_id=f"c{version}",
        correlation_id=None, actor="t", payload=payload))


class Indexed(History):
    """The reading side, and the indexing side run here (not in its process)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.indexer = Indexer(settings, self.path, self.wanted, self.caught)

    def caught_up(self, partition: int) -> bool:  # no process to be alive
        return bool(self.wanted[partition] and self.caught[partition])

    def _index(self, msgs, assigned: frozenset[int]) -> None:
        self.follow(set(assigned))
        self.indexer._index(msgs, assigned)

    def _next_offset(self, partition: int) -> int:
        return self.indexer._next_offset(partition)

    def stop(self) -> None:
        super().stop()
        self.indexer.close()


@pytest.fixture
def history(tmp_path):
    h = Indexed(Settings(data_dir=tmp_path))
    yield h
    h.stop()


def test_key_of_reads_account_and_version():
    assert _key_of(event("alice", 7, 1)) == event_key("alice", 7) == \
        b"alice\0" + (7).to_bytes(8, "big")
    assert _key_of(b"not an event") is None


def test_key_of_a_cut_or_bent_event_is_none_never_an_error():
    raw = event("alice", 2**40, 1)
    assert _key_of(raw) == b"alice\0" + (2**40).to_bytes(8, "big")
    for cut in range(len(raw)):  # every prefix: None, or the key if the fields fit
        assert _key_of(raw[:cut]) in (None, event_key("alice", 2**40))
    assert _key_of(raw[:12]) is None
    # a negative version, and an account id length past the end
    head = raw[:10]
    assert _key_of(head + b"\x02e" + b"\x02a" + b"\x01") is None
    assert _key_of(head + b"\x02e" + b"\x7ea" + b"\x02") is None
    assert _key_of(head + b"\x02e" + b"\x02a" + b"\x02") == event_key("a", 1)


def test_paging_duplicates_and_offsets(history):
    records = [event("a", v, 100 * v) for v in range(1, 6)]
    msgs = [Msg(0, i, r) for i, r in enumerate(records)]
    msgs += [Msg(0, 5, records[2]), Msg(0, 6, event("ab", 1, 1)), Msg(0, 7, eof=True)]
    assert not history.caught_up(0)
    history._index(msgs, frozenset({0}))
    assert history.caught_up(0)
    assert [e.version for e in history.events("a", 1, 100)] == [1, 2, 3, 4, 5]  # once each
    assert [e.version for e in history.events("a", 2, 2)] == [2, 3]
    assert history.events("a", 6, 10) == []
    assert [e.account_id for e in history.events("ab", 0, 10)] == ["ab"]  # "a" is no prefix
    assert history._next_offset(0) == 7
    assert not history.exists("b")


def test_as_of_is_the_last_event_by_then(history):
    # versions 1..9; 4, 5 and 6 at the same instant; version 8 missing (a gap)
    times = {1: 100, 2: 200, 3: 300, 4: 400, 5: 400, 6: 400, 7: 700, 9: 900}
    history._index([Msg(1, i, event("acct", v, t)) for i, (v, t) in enumerate(times.items())],
                   frozenset({1}))
    answers = {t: history.as_of("acct", t) for t in (99, 100, 150, 399, 400, 699, 700, 899,
                                                      900, 10**15)}
    assert {t: e and e.version for t, e in answers.items()} == {
        99: None, 100: 1, 150: 1, 399: 3, 400: 6, 699: 6, 700: 7, 899: 7, 900: 9, 10**15: 9}
    assert history.as_of("nobody", 10**15) is None
    assert history.as_of("acc", 10**15) is None


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_indexing_process_is_started_again_and_stopped(tmp_path, monkeypatch):
    # no broker: the process runs, its consumer finds nobody to fetch from
    monkeypatch.setattr(History, "RESTART_AFTER_S", 0.0)
    h = History(Settings(data_dir=tmp_path, bootstrap_servers="127.0.0.1:9"))
    h.start()
    try:
        first = h._proc
        assert first is not None and first.is_alive()
        h.follow({1})
        h.caught[1] = 1  # as the indexer marks a partition read to its end
        assert h.caught_up(1)
        first.kill()
        first.join(10)
        assert not h.caught_up(1)  # a dead indexer vouches for nothing
        h.follow({1})
        second = h._proc
        assert second is not first and second is not None and second.is_alive()
        assert not h.caught_up(1)  # what the first one read is not taken on trust
    finally:
        h.stop()
    assert not second.is_alive()


def worker_with_indexer(tmp_path, then: str) -> tuple[subprocess.Popen[str], int]:
    """A process that starts the history index, then runs ``then``: it and the index's pid."""
    script = (
        "import os, signal, sys, time\n"
        "from streams.readmodels.history import History\n"
        "from streams.settings import Settings\n"
        "h = History(Settings(data_dir=sys.argv[1], bootstrap_servers='127.0.0.1:9'))\n"
        "h.start()\n"
        "print(h._proc.pid, flush=True)\n" + then + "\n")
    worker = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    return worker, int(worker.stdout.readline())


def test_the_indexing_process_dies_with_the_worker(tmp_path):
    # a worker killed with SIGKILL runs no cleanup: the kernel ends its indexer
    worker, indexer = worker_with_indexer(tmp_path, "time.sleep(60)")
    try:
        assert not _gone(indexer, 1.0)
        worker.kill()
        worker.wait(10)
        assert _gone(indexer, 10.0)
    finally:
        worker.kill()
        worker.wait(10)


def test_the_indexing_process_ends_if_the_worker_died_while_it_started(tmp_path):
    # killed before the child could ask the kernel to be signalled: it must see that
    # its parent is gone and exit, not index for ever with no one to read it
    worker, indexer = worker_with_indexer(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    worker.wait(10)
    assert _gone(indexer, 15.0)
