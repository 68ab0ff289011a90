"""EventReader on the real broker: duplicates handed once, restarts without loss, where
it starts (committed, earliest, latest, a timestamp)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer
from confluent_kafka.admin import AdminClient

from producers.reader import EventReader
from schemas.codec import CODEC
from schemas.models import Deposit, LedgerEvent, OpenAccount
from streams.dev.procs import settings_env
from streams.readmodels.eventlog import read_all
from tests.unit.test_codec import V1_EVENT, a_v1_event, parse, single_object

pytestmark = pytest.mark.kafka

IDLE_S = 3.0  # a run ends after holding partitions this long without a record


class Stop(Exception):
    pass


def now_ms() -> int:
    return int(time.time() * 1000)


def make_events(client, accounts: list[str], deposits: int, tag: str) -> dict:
    """Open each account (tag "a" only) and deposit; (account, version) -> event."""
    commands = []
    for a in accounts:
        if tag == "a":
            commands.append(OpenAccount(command_id=f"open-{a}", account_id=a, actor="t",
                                        issued_at=now_ms(), currency="USD"))
        commands += [Deposit(command_id=f"dep-{tag}-{a}-{k}", account_id=a, actor="t",
                             issued_at=now_ms(), amount_minor=100 + k, currency="USD")
                     for k in range(deposits)]
    events = {}
    for f in [client.submit(c) for c in commands]:
        outcome = f.result(timeout=60)
        assert outcome.accepted, outcome.rejection
        for e in outcome.events:
            events[(e.account_id, e.version)] = e
    assert len(events) == len(commands)
    return events


def topic_records(s) -> list[tuple[int, int, bytes]]:
    """(partition, offset, value) of every record on the events topic."""
    return [(m.partition(), m.offset(), m.value()) for m in read_all(s, s.events_topic)]


def key_of(value: bytes) -> tuple[str, int]:
    _, d = CODEC.decode(value, expect=LedgerEvent.avro_name)
    return d["account_id"], d["version"]


def produce_raw(s, records: list[tuple[int, bytes, bytes]]) -> None:
    """Write (partition, key, value) records as they are, with a plain producer."""
    producer = Producer(s.producer_config())
    errors = []
    for p, key, value in records:
        producer.produce(s.events_topic, value, key, partition=p,
                         on_delivery=lambda err, _m: err is not None and errors.append(err))
    assert producer.flush(30) == 0 and not errors, errors


def salt_with_copies(s, every: int) -> int:
    """Byte-identical copies of every ``every``-th event record, in the same partition."""
    records = topic_records(s)
    copies = [(p, key_of(v)[0].encode(), v) for p, _, v in records[::every]]
    produce_raw(s, copies)
    return len(copies)


def committed(s, group_id) -> dict[int, int]:
    admin = AdminClient(s.kafka_config())
    fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group_id)])[group_id]
    return {tp.partition: tp.offset for tp in fut.result(timeout=30).topic_partitions}


def handed_again_allowed(records, first: list, offsets: dict[int, int]) -> set:
    """What the docstring allows a restarted reader to hand again: events handed before
    that have a record (original or copy) at or after the committed position."""
    after = {key_of(v) for p, off, v in records if off >= offsets.get(p, 0)}
    return set(first) & after


def read(s, group_id, **kw) -> tuple[list[LedgerEvent], EventReader]:
    handed: list[LedgerEvent] = []
    with EventReader(s, group_id, **kw) as reader:
        reader.run(handed.append, max_idle_s=IDLE_S)
    return handed, reader


# ---------------------------------------------------------------- duplicates


def test_each_event_is_handed_once_from_a_topic_with_copies(ledger_settings, start_worker,
                                                            client):
    s = ledger_settings
    start_worker()
    accounts = [f"d{i:02d}" for i in range(10)]
    events = make_events(client, accounts, 4, "a")
    copies = salt_with_copies(s, every=3)
    # an event of the first schema version, and a record that is not an event
    old = single_object(parse(V1_EVENT), dict(a_v1_event(("ledger.Deposited",
                                                          {"amount_minor": 7})),
                                              account_id="legacy", version=1))
    produce_raw(s, [(0, b"legacy", old), (1, b"junk", b"not avro at all")])
    assert copies >= 15

    handed, reader = read(s, "fraud", start="earliest")

    keys = [(e.account_id, e.version) for e in handed]
    assert len(keys) == len(set(keys)) == len(events) + 1
    assert set(keys) == set(events) | {("legacy", 1)}
    assert reader.duplicates == copies
    assert reader.bad_records == 1 and reader.gaps == 0
    for e in handed:
        if e.account_id == "legacy":
            assert e.available_after_minor == 0 and e.payload.amount_minor == 7
        else:
            assert e == events[(e.account_id, e.version)]
    for a in accounts:  # each account's events in version order
        assert [v for acc, v in keys if acc == a] == [1, 2, 3, 4, 5]
    # everything read is committed: the end of every partition
    ends: dict[int, int] = {}
    for p, off, _ in topic_records(s):
        ends[p] = max(ends.get(p, 0), off + 1)
    assert {p: o for p, o in committed(s, "fraud").items() if p in ends} == ends


# ---------------------------------------------------------------- restarts


def test_a_reader_stopped_midway_resumes_without_loss(ledger_settings, start_worker, client):
    s = ledger_settings
    start_worker()
    events = make_events(client, [f"r{i:02d}" for i in range(12)], 5, "a")
    salt_with_copies(s, every=4)
    records = topic_records(s)
    n = 30
    first: list[tuple[str, int]] = []
    in_hand = []

    def handle(e: LedgerEvent) -> None:
        if len(first) == n:
            in_hand.append((e.account_id, e.version))
            raise Stop  # the in-hand event is not handled: it must not be committed
        first.append((e.account_id, e.version))

    with EventReader(s, "analytics", batch_max_events=7) as reader, pytest.raises(Stop):
        reader.run(handle, max_idle_s=30)
    offsets = committed(s, "analytics")
    # committed exactly past what was handled (or dropped as a copy), not the in-hand one
    assert {key_of(v) for p, off, v in records if off < offsets.get(p, 0)} == set(first)

    handed, reader = read(s, "analytics")
    second = [(e.account_id, e.version) for e in handed]

    assert len(first) == len(set(first)) == n
    assert len(second) == len(set(second))
    assert in_hand[0] in second and in_hand[0] not in first
    assert set(first) | set(second) == set(events)
    assert set(first) & set(second) == handed_again_allowed(records, first, offsets)
    # only copies are handed again: an original is never re-read after a clean stop
    originals: dict[tuple[str, int], tuple[int, int]] = {}
    for p, off, v in records:
        originals.setdefault(key_of(v), (p, off))
    assert all(originals[k][1] < offsets[originals[k][0]] for k in first)


_CHILD = """
import sys, time
from producers.reader import EventReader
from streams.settings import Settings

out = open(sys.argv[1], "a", buffering=1)

def handle(e):
    time.sleep(0.05)  # work
    out.write(f"{e.account_id} {e.version}\\n")

with EventReader(Settings(), sys.argv[2], batch_max_events=int(sys.argv[3])) as reader:
    reader.run(handle, max_idle_s=60)
"""


def test_a_killed_reader_hands_again_at_most_one_batch(ledger_settings, start_worker, client,
                                                       tmp_path: Path):
    s = ledger_settings
    start_worker()
    events = make_events(client, [f"k{i:02d}" for i in range(12)], 5, "a")
    salt_with_copies(s, every=5)
    records = topic_records(s)
    batch = 10
    lines = tmp_path / "handled.txt"
    # the broker's minimum: the restarted reader's join waits this long for the dead one
    env = {**os.environ, **settings_env(s), "LEDGER_SESSION_TIMEOUT_S": "6"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(lines), "billing", str(batch)],
                             env=env, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while not (lines.exists() and len(lines.read_text().splitlines()) >= 25):
            assert child.poll() is None, "the reader exited early"
            assert time.monotonic() < deadline, "the reader handled nothing in 60 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    first = [(a, int(v)) for a, v in (line.split() for line in lines.read_text().splitlines())]
    offsets = committed(s, "billing")

    handed, _ = read(s, "billing")
    second = [(e.account_id, e.version) for e in handed]

    assert len(first) == len(set(first)) and len(first) < len(events)
    assert len(second) == len(set(second))
    assert set(first) | set(second) == set(events)
    again = set(first) & set(second)
    # at most what the docstring allows: an event whose only record after the commit is
    # a copy that lands behind a later version of its account is stale there, and dropped
    assert again <= handed_again_allowed(records, first, offsets)
    # those handed since the last commit (an original after it) are all handed again
    originals = {}
    for p, off, v in records:
        originals.setdefault(key_of(v), (p, off))
    uncommitted = {k for k in first if originals[k][1] >= offsets.get(originals[k][0], 0)}
    assert uncommitted <= again
    assert len(uncommitted) <= batch


# ---------------------------------------------------------------- where it starts


def test_start_latest_and_at_a_timestamp_read_only_later_events(ledger_settings, start_worker,
                                                                 client):
    s = ledger_settings
    start_worker()
    accounts = [f"t{i:02d}" for i in range(8)]
    before = make_events(client, accounts, 2, "a")
    at = now_ms() + 1
    while now_ms() < at:  # every later record is written at or after ``at``
        time.sleep(0.001)
    latest = EventReader(s, "latest", start="latest")  # the end offsets, now
    try:
        after = make_events(client, accounts, 3, "b")
        handed: list[LedgerEvent] = []
        latest.run(handed.append, max_idle_s=IDLE_S)
    finally:
        latest.close()
    assert {(e.account_id, e.version) for e in handed} == set(after)
    assert len(handed) == len(after) == 24

    handed, _ = read(s, "since", start=at)
    assert {(e.account_id, e.version) for e in handed} == set(after)
    assert len(handed) == len(after)

    # an explicit start wins over the committed offsets; "committed" resumes from them
    handed, _ = read(s, "since", start="earliest")
    assert {(e.account_id, e.version) for e in handed} == set(before) | set(after)
    handed, _ = read(s, "since")
    assert handed == []
    with pytest.raises(ValueError):
        EventReader(s, "x", start="yesterday")  # type: ignore[arg-type]
