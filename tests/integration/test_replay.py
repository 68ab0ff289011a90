"""The balances projection on the real broker: rebuild from the log, as-of queries, and
replay refused while the group has a live member."""

from __future__ import annotations

import random
import time
import uuid

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer
from confluent_kafka.admin import AdminClient

from schemas.codec import CODEC, MAGIC
from schemas.codec import write_long as _long  # the Avro long encoding
from schemas.models import (
    AccountClosed,
    AccountOpened,
    Deposit,
    Deposited,
    LedgerEvent,
    OpenAccount,
    Transfer,
    Withdraw,
    encode,
)
from streams.ops.verify import verify
from streams.readmodels.projection import (
    GroupActive,
    Projection,
    checksum_of,
    replay,
    reset_offsets,
    state_checksum,
)

pytestmark = pytest.mark.kafka


def now_ms() -> int:
    return int(time.time() * 1000)


def committed_offsets(settings, group_id) -> dict[int, int]:
    admin = AdminClient(settings.kafka_config())
    fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group_id)])[group_id]
    return {tp.partition: tp.offset for tp in fut.result(timeout=30).topic_partitions
            if tp.topic == settings.events_topic}


def event(account, version, balance, payload, occurred_at, currency="USD"):
    return LedgerEvent(
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{account}/{version}")),
        account_id=account, version=version, currency=currency,
        balance_after_minor=balance, available_after_minor=balance, occurred_at=occurred_at,
        command_id=f"c-{account}-{version}", causation_id=f"c-{account}-{version}",
        correlation_id=None, actor="test", payload=payload)


class Produced:
    """Produce raw event records keyed by account; remembers where each one landed."""

    def __init__(self, settings):
        self.s = settings
        self.producer = Producer(settings.producer_config(**{
            "linger.ms": 5, "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000}))
        self.offsets: list[tuple[int, int]] = []
        self.errors: list[str] = []

    def _delivered(self, err, msg):
        if err is not None:
            self.errors.append(err.str())
        else:
            self.offsets.append((msg.partition(), msg.offset()))

    def send(self, account: str, value: bytes, timestamp: int | None = None) -> None:
        kw = {"timestamp": timestamp} if timestamp is not None else {}
        while True:
            try:
                self.producer.produce(self.s.events_topic, value, account.encode(),
                                      on_delivery=self._delivered, **kw)
                return
            except BufferError:
                self.producer.poll(0.05)

    def flush(self) -> list[tuple[int, int]]:
        assert self.producer.flush(60) == 0 and not self.errors, self.errors
        done, self.offsets = self.offsets, []
        return done


# ---------------------------------------------------------------- rebuild


def test_rebuild_from_the_log_matches_the_live_state(ledger_settings, start_worker, client):
    s = ledger_settings
    worker = start_worker()
    rng = random.Random(7)
    accounts = [f"r{i:02d}" for i in range(24)]
    t = iter(range(now_ms(), now_ms() + 10**9))

    def wait(futures, settle=()):
        outcomes = [f.result(timeout=60) for f in futures]
        for f in settle:
            f.settlement.result(timeout=60)
        return outcomes

    opens = [OpenAccount(command_id=f"open-{a}", account_id=a, actor="t", issued_at=next(t),
                         currency="USD", overdraft_limit_minor=rng.choice([0, 0, 2_000]))
             for a in accounts]
    assert all(o.accepted for o in wait([client.submit(c) for c in opens]))
    seeds = [Deposit(command_id=f"seed-{a}-{k}", account_id=a, actor="t", issued_at=next(t),
                     amount_minor=rng.randint(1_000, 50_000), currency="USD")
             for a in accounts for k in range(2)]
    wait([client.submit(c) for c in seeds])

    mixed = []
    for k in range(220):
        a = rng.choice(accounts)
        kind = rng.random()
        if kind < 0.4:
            b = rng.choice([x for x in accounts if x != a])
            mixed.append(Transfer(command_id=f"tr-{k}", account_id=a, actor="t",
                                  issued_at=next(t), to_account_id=b,
                                  amount_minor=rng.randint(1, 20_000), currency="USD"))
        elif kind < 0.7:
            mixed.append(Withdraw(command_id=f"wd-{k}", account_id=a, actor="t",
                                  issued_at=next(t), amount_minor=rng.randint(1, 30_000),
                                  currency="USD"))
        else:
            mixed.append(Deposit(command_id=f"dp-{k}", account_id=a, actor="t",
                                 issued_at=next(t), amount_minor=rng.randint(1, 10_000),
                                 currency="USD"))
    futures = [client.submit(c) for c in mixed]
    outcomes = wait(futures)
    wait([], settle=[f for c, f, o in zip(mixed, futures, outcomes, strict=True)
                     if isinstance(c, Transfer) and o.accepted])
    # Retries: the same command objects again; the ledger re-emits the first events.
    retried = rng.sample(opens + seeds + mixed, 40)
    again = wait([client.submit(c) for c in retried])
    assert any(o.accepted for o in again)

    report = verify(s)
    assert report.ok, report.breaches[:10]
    assert report.duplicates > 0
    live_checksum = state_checksum(report.states)

    # the projection, following the log
    with Projection(s) as projection:
        applied = projection.run_until_caught_up(60)
        assert applied == report.events
        assert projection.duplicates == report.duplicates
        assert projection.gaps == 0
        assert projection.checksum() == live_checksum

    # delete its store, reset to earliest, rebuild
    store = s.data_dir / "balances"
    (store / "stale-marker").write_text("deleted by a fresh replay")
    seen: list[tuple[int, int]] = []
    result = replay(s, fresh=True, progress=lambda done, total: seen.append((done, total)))
    assert not (store / "stale-marker").exists()
    assert result.ok, result.differences[:10]
    assert result.events_applied == report.events  # everything again: it started from nothing
    assert result.checksum == result.live_checksum == live_checksum
    assert result.accounts == len(accounts) and result.gaps == 0
    assert set(result.reset_to.values()) == {0}
    assert seen and seen[-1][0] == seen[-1][1] == report.records
    print(f"\nrebuild after {len(opens) + len(seeds) + len(mixed) + len(retried)} commands: "
          f"{result.events_applied} events in {result.seconds:.3f}s "
          f"({result.events_per_s:,.0f} events/s, group join included)")

    with Projection(s) as projection:
        balances = projection.balances()
    assert checksum_of((a, b["balance_minor"], b["available_minor"], b["version"])
                       for a, b in balances.items()) == live_checksum
    for a in accounts[::3]:
        status, doc = worker.get(f"/accounts/{a}")
        assert status == 200, doc
        assert (balances[a]["balance_minor"], balances[a]["version"]) == \
            (doc["balance_minor"], doc["version"]), a
        assert balances[a]["status"] == "open" and balances[a]["currency"] == "USD"


# ---------------------------------------------------------------- as of


def test_as_of_returns_the_balance_that_held_then(ledger_settings, start_worker, client):
    s = ledger_settings
    start_worker()
    t0 = (now_ms() // 1000 - 3600) * 1000  # an hour ago

    def run(cls, cid, account, at, **kw):
        fut = client.submit(cls(command_id=cid, account_id=account, actor="t", issued_at=at,
                                **kw))
        outcome = fut.result(timeout=60)
        assert outcome.accepted, outcome.rejection
        if cls is Transfer:
            assert fut.settlement.result(timeout=60).events[0].type == "TransferCredited"

    run(OpenAccount, "o-ann", "ann", t0, currency="USD")
    run(OpenAccount, "o-ben", "ben", t0 + 500, currency="USD")
    run(Deposit, "d1", "ann", t0 + 1000, amount_minor=10_000, currency="USD")
    run(Withdraw, "w1", "ann", t0 + 2000, amount_minor=2_500, currency="USD")
    run(Deposit, "d2", "ann", t0 + 3000, amount_minor=500, currency="USD")
    run(Transfer, "t1", "ann", t0 + 4000, to_account_id="ben", amount_minor=1_000,
        currency="USD")
    run(Deposit, "d3", "ann", t0 + 5000, amount_minor=100, currency="USD")
    run(Deposit, "d4", "ann", t0 + 5000, amount_minor=200, currency="USD")  # same instant
    run(Deposit, "d5", "ann", t0 + 4500, amount_minor=50, currency="USD")  # late: at t0+5000

    with Projection(s) as projection:
        assert projection.run_until_caught_up(60) == 10

        def at(account, ms):
            r = projection.as_of(account, ms)
            return None if r is None else (r["balance_minor"], r["version"])

        assert at("ann", t0 - 1) is None
        assert at("ann", t0) == (0, 1)
        assert at("ann", t0 + 999) == (0, 1)
        assert at("ann", t0 + 1000) == (10_000, 2)
        assert at("ann", t0 + 1999) == (10_000, 2)
        assert at("ann", t0 + 2000) == (7_500, 3)
        assert at("ann", t0 + 3500) == (8_000, 4)
        assert at("ann", t0 + 4000) == (7_000, 5)
        assert at("ann", t0 + 4999) == (7_000, 5)
        assert at("ann", t0 + 5000) == (7_350, 8)  # the last of three events at that instant
        assert at("ann", 2**63) == (7_350, 8)
        assert at("ben", t0 + 499) is None
        assert at("ben", t0 + 500) == (0, 1)
        assert at("ben", t0 + 3999) == (0, 1)
        assert at("ben", t0 + 4000) == (1_000, 2)
        assert at("an", t0 + 5000) is None and at("annie", t0 + 5000) is None
        assert at("nobody", now_ms()) is None
        assert projection.as_of("ann", t0 + 5000)["occurred_at"] == t0 + 5000
        for a, b in projection.balances().items():
            assert at(a, now_ms()) == (b["balance_minor"], b["version"])


# ---------------------------------------------------------------- live members


def test_replay_is_refused_while_the_group_has_a_live_member(ledger_settings, tmp_path):
    s = ledger_settings
    out = Produced(s)
    t1 = now_ms() - 120_000
    t2 = t1 + 60_000
    base = t1
    balances = {}
    for i in range(10):
        a = f"x{i}"
        out.send(a, encode(event(a, 1, 0, AccountOpened(overdraft_limit_minor=0), base)), t1)
        for v in range(2, 6):
            balances[a] = 100 * v
            record = encode(event(a, v, 100 * v, Deposited(amount_minor=100), base + v))
            out.send(a, record, t1)
            if v == 3:
                out.send(a, record, t1)  # a byte-identical duplicate
    # an account whose version 3 never reached the log
    out.send("gappy", encode(event("gappy", 1, 0, AccountOpened(overdraft_limit_minor=0), base)),
             t1)
    out.send("gappy", encode(event("gappy", 2, 7, Deposited(amount_minor=7), base)), t1)
    out.send("gappy", encode(event("gappy", 4, 9, Deposited(amount_minor=2), base)), t1)
    first = out.flush()

    path = tmp_path / "live"
    projection = Projection(s, path=path)
    try:
        assert projection.run_until_caught_up(30) == 10 * 5 + 2
        assert (projection.duplicates, projection.gaps) == (10, 1)
        assert projection.balance("gappy")["version"] == 2
        assert projection.assignment()  # joined: a live member of the group

        for i in range(10):  # more events the member has not read yet
            a = f"x{i}"
            out.send(a, encode(event(a, 6, 1_000, Deposited(amount_minor=400), base + 6)), t2)
        out.send("x0", encode(event("x0", 7, 1_000, AccountClosed(), base + 7)), t2)
        second = out.flush()

        before = committed_offsets(s, projection.group_id)
        assert sum(before.values()) == len(first)
        with pytest.raises(GroupActive) as refused:
            reset_offsets(s, projection.group_id, to="earliest")
        assert "ledger-projection-" in str(refused.value)
        assert "host=" in str(refused.value)
        with pytest.raises(GroupActive):
            reset_offsets(s, projection.group_id, to="latest")
        with pytest.raises(GroupActive):
            replay(s, projection.group_id, path, fresh=True)
        assert committed_offsets(s, projection.group_id) == before  # nothing moved
        assert path.exists() and projection.balance("x3")["balance_minor"] == 500  # nor deleted
    finally:
        projection.close()

    # Without members: reset to the first record produced at or after t2.
    starts: dict[int, int] = {}
    for p, off in second:
        starts[p] = min(off, starts.get(p, off))
    ends = {p: off + 1 for p, off in first}
    want = {p: starts.get(p, ends.get(p, 0)) for p in range(s.partitions)}
    assert reset_offsets(s, projection.group_id, at_ms=t2) == want
    assert committed_offsets(s, projection.group_id) == want
    with Projection(s, path=path) as again:
        assert again.run_until_caught_up(30) == 11
        assert again.duplicates == 0
        assert again.balance("x0")["status"] == "closed"
        assert again.balance("x1")["version"] == 6
    # From the start, on the same store: every event is already applied.
    assert reset_offsets(s, projection.group_id, to="earliest") == \
        {p: 0 for p in range(s.partitions)}
    with Projection(s, path=path) as again:
        assert again.run_until_caught_up(30) == 0
        assert again.duplicates == len(first) + len(second) - 1  # the gap is counted apart
        assert again.gaps == 1
        rows = again.balances()
    assert rows["x1"]["balance_minor"] == 1_000 and rows["x0"]["status"] == "closed"
    with pytest.raises(ValueError):
        reset_offsets(s, projection.group_id, offsets={s.partitions: 0})


class FakeRegistry:
    """Just enough of a schema registry for CODEC.use_registry (ids from 100)."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.schemas: dict[int, object] = {}

    def register_schema(self, subject, schema):
        schema_id = self.ids.setdefault(schema.schema_str, 100 + len(self.ids))
        self.schemas[schema_id] = schema
        return schema_id

    def get_schema(self, schema_id):
        return self.schemas[schema_id]


def test_confluent_framed_events_fold_like_single_object_ones(ledger_settings, tmp_path):
    s = ledger_settings
    out = Produced(s)
    t0 = now_ms() - 60_000
    events = [event(f"f{k}", 1, 0, AccountOpened(overdraft_limit_minor=0), t0) for k in range(4)]
    events += [event(f"f{k}", v, 10 * v, Deposited(amount_minor=10), t0 + v)
               for v in range(2, 26) for k in range(4)]
    events.append(event("f0", 26, 250, AccountClosed(), t0 + 30))
    for e in events[:40]:
        out.send(e.account_id, encode(e))
    CODEC.use_registry("http://registry.invalid", client=FakeRegistry())
    try:
        framed = [encode(e) for e in events[40:]]
        assert framed[0][:1] == b"\0"  # 00 + schema id: the Confluent wire format
        for e, record in zip(events[40:], framed, strict=True):
            out.send(e.account_id, record)
        out.flush()
        with Projection(s, path=tmp_path / "framed") as projection:
            assert projection.run_until_caught_up(30) == len(events)
            assert projection.bad_records == 0
            assert projection.slow_records == 1  # the first framed one, to learn its schema id
            rows = projection.balances()
            assert projection.as_of("f2", t0 + 12)["balance_minor"] == 120
    finally:
        CODEC.use_registry(None)
    assert rows["f0"] == {"account_id": "f0", "balance_minor": 250, "available_minor": 250,
                          "version": 26, "currency": "USD", "status": "closed",
                          "updated_at": t0 + 30}
    assert rows["f3"]["version"] == 25 and rows["f3"]["status"] == "open"


# ---------------------------------------------------------------- throughput


def _string(text: str) -> bytes:
    raw = text.encode()
    return _long(len(raw)) + raw


_HEADER = MAGIC + CODEC.current[LedgerEvent.avro_name].fingerprint


def fast_event(account: str, index: int, version: int, balance: int,
               occurred_at: int) -> bytes:
    """A current-schema LedgerEvent (AccountOpened at version 1, else Deposited), fast."""
    cid = f"c-{account}-{version}"
    payload = _long(0) + _long(0) if version == 1 else _long(1) + _long(100)
    return b"".join((
        _HEADER, _string(f"{version:08x}-0000-4000-8000-{index:012x}"), _string(account),
        _long(version), _string("USD"), _long(balance), _long(balance), _long(occurred_at),
        _string(cid), _string(cid), _long(0), _string("bulk"), payload, _long(0)))  # no metadata


def test_fold_rate_on_a_fresh_store(ledger_settings, tmp_path):
    s = ledger_settings
    accounts, versions = 2_000, 100
    t0 = now_ms() - 86_400_000
    a0 = "bulk-00007"
    for v, payload in ((1, AccountOpened(overdraft_limit_minor=0)),
                       (3, Deposited(amount_minor=100))):
        model = event(a0, v, 100 * (v - 1), payload, t0 + v).model_copy(update={
            "event_id": f"{v:08x}-0000-4000-8000-{7:012x}", "actor": "bulk"})
        assert fast_event(a0, 7, v, 100 * (v - 1), t0 + v) == encode(model)

    out = Produced(s)
    names = [f"bulk-{i:05d}" for i in range(accounts)]
    encoded = [(a.encode(), _string(a)) for a in names]
    produce = out.producer.produce
    for v in range(1, versions + 1):
        # fast_event's bytes, with the parts shared by a version computed once
        middle = b"".join((_long(v), _string("USD"), _long(100 * (v - 1)) * 2, _long(t0 + v)))
        payload = _long(0) + _long(0) if v == 1 else _long(1) + _long(100)
        for i, (key, account) in enumerate(encoded):
            cid = _string(f"c-{names[i]}-{v}")
            value = b"".join((_HEADER, _string(f"{v:08x}-0000-4000-8000-{i:012x}"), account,
                              middle, cid, cid, b"\0\x08bulk", payload, b"\0"))
            if i == 7:
                assert value == fast_event(names[i], i, v, 100 * (v - 1), t0 + v)
            while True:
                try:
                    produce(s.events_topic, value, key, on_delivery=out._delivered)
                    break
                except BufferError:
                    out.producer.poll(0.05)
    assert len(out.flush()) == accounts * versions
    total = accounts * versions

    with Projection(s, path=tmp_path / "fresh") as projection:
        started = time.monotonic()
        applied = projection.run_until_caught_up(120)
        seconds = time.monotonic() - started
        print(f"\nrun_until_caught_up on a fresh store: {applied:,} events in {seconds:.2f}s "
              f"= {applied / seconds:,.0f} events/s (group join included)")
        assert applied == total
        assert projection.checksum() == checksum_of(
            (a, 100 * (versions - 1), 100 * (versions - 1), versions) for a in names)
        assert projection.as_of(a0, t0 + 50)["balance_minor"] == 4_900
        assert projection.as_of(a0, t0) is None
    assert applied / seconds > 25_000  # loose (a shared machine); the decode-all path is ~12k/s
