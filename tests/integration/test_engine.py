"""The engine against the real broker, without Faust: what it does with the records it is given."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from rocksdict import Options, Rdict

from schemas.codec import CODEC
from schemas.models import Deposit, OpenAccount, encode_batch
from streams.ops.topics import ensure_topics
from streams.partitions import partition_for
from streams.readmodels.eventlog import read_all
from streams.worker.engine import DeliveryFailed, Engine, PartitionInput, Record
from streams.worker.processor import outcome_log_key, unpack_records
from streams.worker.state import FAUST_OFFSET_KEY, PartitionView, payload

pytestmark = pytest.mark.kafka


def run(coro):
    """asyncio.run on a thread of its own: the browser tests' Playwright keeps a loop
    running on the main thread for the session."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def open_and_deposit(s, account: str, deposits: int):
    """An open and ``deposits`` deposits (1, 2, ...) on the log, one record each:
    (partition, commands, records)."""
    p = partition_for(account, s.partitions)
    now = int(time.time() * 1000)
    commands = [OpenAccount(command_id="open", account_id=account, actor="test",
                            issued_at=now, currency="USD")]
    commands += [Deposit(command_id=f"d{i}", account_id=account, actor="test",
                         issued_at=now + i, amount_minor=i, currency="USD")
                 for i in range(1, deposits + 1)]
    producer = Producer(s.producer_config())
    for c in commands:
        producer.produce(s.commands_topic, encode_batch([c]), account.encode(), partition=p)
    assert producer.flush(30) == 0
    records = [Record(m.key(), m.value(), m.offset() or 0, m.timestamp()[1])
               for m in read_all(s, s.commands_topic) if m.partition() == p]
    return p, commands, records


def test_a_hole_in_the_given_records_is_read_from_the_log(ledger_settings, tmp_path):
    """Faust can skip offsets after a rebalance; the checkpoint must not pass them undecided."""
    s = ledger_settings
    ensure_topics(s)
    p, commands, records = open_and_deposit(s, "acct-gap", 20)
    assert len(records) == 21

    db = Rdict(str(tmp_path / "p"), Options(raw_mode=True))
    try:
        engine = Engine(s, lambda _: db)
        given = records[:4] + records[11:]  # offsets 4..10 never handed over
        report = run(engine.process({p: PartitionInput(commands=given)}))
        engine.close()
        assert report.gaps_filled == 1
        assert report.stats.commands == 21
        assert PartitionView(db).checkpoint.commands == records[-1].offset

        # Given again (a redelivery), nothing is decided twice.
        report = run(engine.process({p: PartitionInput(commands=records)}))
        assert report.stats.commands == 0 and report.gaps_filled == 0
    finally:
        db.close()

    events = [CODEC.decode(m.value())[1] for m in read_all(s, s.events_topic)]
    assert [e["version"] for e in events] == list(range(1, 22))
    assert [e["command_id"] for e in events] == [c.command_id for c in commands]
    assert events[-1]["balance_after_minor"] == sum(range(1, 21))


def test_a_step_decided_while_the_one_before_commits_sees_its_changes(ledger_settings,
                                                                      tmp_path):
    """The worker decides the next step while this one's flushes are out: the next must
    read the accounts as this one leaves them, and the store end as a serial run's."""
    s = ledger_settings
    p, _, records = open_and_deposit(s, "acct-pipe", 6)
    steps = [records[:1], records[1:4], records[4:]]

    async def pipelined(engine: Engine, db: Rdict) -> list[int]:
        # step k+1 is decided before step k is committed, as the worker does
        decided = [await engine.decide({p: PartitionInput(commands=steps[0])})]
        reports = []
        for nxt in steps[1:]:
            decided.append(await engine.decide({p: PartitionInput(commands=nxt)}))
            reports.append(await engine.commit(decided[-2]))
            # the store says the next step is pending, as the changelog does last: a
            # worker restarted on this store must decide those inputs again first
            assert PartitionView(db).checkpoint.pending == decided[-1].work[0].tag
        reports.append(await engine.commit(decided[-1]))
        # each later step's intent went out with the state of the one before
        assert [d.intent_sent for d in decided] == [False, True, True]
        return [r.stats.events for r in reports]

    async def serial(engine: Engine, _db: Rdict) -> list[int]:
        return [(await engine.process({p: PartitionInput(commands=st)})).stats.events
                for st in steps]

    stores = []
    for name, how in (("serial", serial), ("pipelined", pipelined)):
        db = Rdict(str(tmp_path / name), Options(raw_mode=True))
        try:
            engine = Engine(s, lambda _, db=db: db)
            # no deposit refused: the account is open
            assert run(how(engine, db)) == [1, 3, 3], name
            engine.close()
            stores.append({k: v for k, v in db.items() if not k.startswith(b"__faust")})
        finally:
            db.close()
    assert stores[0] == stores[1]
    events = [CODEC.decode(m.value())[1] for m in read_all(s, s.events_topic)]
    assert [e["version"] for e in events] == list(range(1, 8)) * 2
    assert events[-1]["balance_after_minor"] == sum(range(1, 7))


def test_accounts_kept_across_steps_are_forgotten_when_partitions_move(ledger_settings,
                                                                      tmp_path):
    """The engine keeps the accounts its steps leave in memory for the next step; a
    partition that moves away and back may have been changed by another worker
    meanwhile, and must be read from the store again."""
    s = ledger_settings
    p, _, records = open_and_deposit(s, "acct-moves", 5)
    db = Rdict(str(tmp_path / "p"), Options(raw_mode=True))
    try:
        here, elsewhere = Engine(s, lambda _: db), Engine(s, lambda _: db)
        run(here.process({p: PartitionInput(commands=records[:3])}))  # open, 1, 2
        run(elsewhere.process({p: PartitionInput(commands=records[3:5])}))  # 3, 4: 10 now
        here.forget_resident()  # what a rebalance does
        report = run(here.process({p: PartitionInput(commands=records[5:])}))
        assert report.stats.events == 1
        here.close()
        elsewhere.close()
    finally:
        db.close()
    last = CODEC.decode(list(read_all(s, s.events_topic))[-1].value())[1]
    assert (last["version"], last["balance_after_minor"]) == (6, 15)


class CountingProducer:
    """The engine's producer, counting the records that ask for a delivery report."""

    def __init__(self, producer: Producer, slow_after: bytes | None = None) -> None:
        self.producer = producer
        self.records = self.reported = 0
        self.slow_after = slow_after
        self.unreported: list[bytes | None] = []

    def produce(self, topic, value=None, key=None, **kw):
        self.records += 1
        self.reported += kw.get("on_delivery") is not None
        if kw.get("on_delivery") is None:
            self.unreported.append(value)
        self.producer.produce(topic, value, key, **kw)
        if value is not None and value == self.slow_after:
            time.sleep(0.5)  # the records so far go out in a request of their own

    def __getattr__(self, name):
        return getattr(self.producer, name)


def test_a_step_asks_one_delivery_report_per_partition(ledger_settings, tmp_path):
    s = ledger_settings
    p, _, records = open_and_deposit(s, "acct-reports", 30)
    db = Rdict(str(tmp_path / "p"), Options(raw_mode=True))
    try:
        engine = Engine(s, lambda _: db)
        counting = engine.producer = CountingProducer(engine.producer)
        report = run(engine.process({p: PartitionInput(commands=records)}))
        assert report.stats.events == 31
        # intent; events; state: each on one partition, but the events' reports
        assert counting.records > 31 + 5 and counting.reported == 3
        # the store's changelog offset, from the last record's report, is the log's last
        _, hi = Consumer({**s.kafka_config(), "group.id": "t"}).get_watermark_offsets(
            TopicPartition(s.changelog_topic, p), timeout=10)
        assert int(db[FAUST_OFFSET_KEY]) == hi - 1
        engine.close()
    finally:
        db.close()


def test_a_record_refused_before_a_partitions_last_fails_the_step(ledger_settings):
    """Only a partition's last record reports its delivery: one refused before it, in an
    earlier request, must still fail the flush (the producer's gapless guarantee)."""
    s = ledger_settings
    topic = f"{s.app_id}-small"
    admin = AdminClient(s.kafka_config())
    for f in admin.create_topics([NewTopic(topic, 1, 1, config={
            "max.message.bytes": "2000"})]).values():
        f.result(30)
    too_big = b"x" * 5000
    records = [(topic, 0, None, b"a", None), (topic, 0, None, too_big, None),
               (topic, 0, None, b"b", None), (topic, 0, None, b"c", None)]

    async def step(engine: Engine, records) -> None:
        engine._send(records)
        await engine._flush("small")

    engine = Engine(s, lambda _: None)
    counting = engine.producer = CountingProducer(engine.producer, slow_after=too_big)
    run(step(engine, records[:1]))  # connected, and the partition's leader known
    with pytest.raises(DeliveryFailed, match=r"(?i)fatal|too large"):
        run(step(engine, records))
    assert too_big in counting.unreported  # it failed, and only the producer said so


def test_a_steps_outcome_records_go_to_the_changelog_as_one_record(ledger_settings, tmp_path):
    s = ledger_settings
    p, _, records = open_and_deposit(s, "acct-log", 9)
    db = Rdict(str(tmp_path / "p"), Options(raw_mode=True))
    try:
        engine = Engine(s, lambda _: db)
        run(engine.process({p: PartitionInput(commands=records[:4])}))
        run(engine.process({p: PartitionInput(commands=records[4:])}))
        engine.close()
        stored = {k: v for k, v in db.items() if k[:1] == b"i"}
    finally:
        db.close()
    assert len(stored) == 10  # an outcome record per command, in RocksDB
    changelog = [m for m in read_all(s, s.changelog_topic) if m.partition() == p]
    assert not [m for m in changelog if m.key()[:1] == b"i"]
    logs = [m for m in changelog if m.key()[:1] == b"o"]
    assert [m.key() for m in logs] == [outcome_log_key((records[3].offset, -1)),
                                       outcome_log_key((records[-1].offset, -1))]
    unpacked = dict(kv for m in logs for kv in unpack_records(payload(m.value())))
    assert unpacked == stored
