"""The Faust worker: one agent over ``ledger.commands`` + ``ledger.transfers``.

Faust owns the consumer group, partition assignment, rebalancing, the accounts
table's RocksDB stores and their recovery from the changelog, and the web server.
The agent takes records in batches and hands them to ``streams.worker.engine.Engine``,
which decides them and writes outputs and state itself (see its docstring for the
order that makes kill -9 safe).

Run it with ``ledger worker`` (see ``streams.cli``).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import faust
from aiokafka import codec as codecs
from aiokafka.consumer.fetcher import Fetcher
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from faust.types import TP, EventT

from schemas.models import ExpireHold, ExpireTransaction
from schemas.text import MAX_ID_LENGTH
from streams import exits
from streams.ops.topics import end_offsets
from streams.settings import Settings
from streams.worker import metrics
from streams.worker.engine import Engine, PartitionInput, Record
from streams.worker.processor import core_build, parse_expiry_key
from streams.worker.state import PartitionView
from streams.worker.store import STORE_OPTIONS, unpack_outcome_logs, use_shared_budget

log = logging.getLogger("ledger.worker")
T = TypeVar("T")



def die(reason: str) -> None:
    """Exit at once, non-zero, saying why: a half-alive worker is worse than none."""
    log.critical("worker exiting: %s", reason)
    for h in logging.getLogger().handlers:
        h.flush()
    os._exit(exits.INTERNAL)


def crash_reason(app: faust.App) -> str | None:
    """Which of the worker's internal services crashed, and why (None: none did)."""
    recovery = getattr(app.tables, "recovery", None)
    agents = list(app.agents.values())
    for name, svc in (("fetcher", app._fetcher), ("consumer", app.consumer),
                      ("table recovery", recovery), *(("agent", a) for a in agents),
                      ("producer", app.producer)):
        if getattr(svc, "crashed", False):
            return f"{name} crashed: {getattr(svc, 'crash_reason', None)!r}"
    return None


def split_by_size(items: list[T], size: Callable[[T], int], max_size: int) -> list[list[T]]:
    """``items`` in order, cut into runs of at most ``max_size`` (a bigger item alone)."""
    runs: list[list[T]] = []
    total = max_size + 1
    for item in items:
        n = size(item)
        if total + n > max_size:  # a new run: the first, or this item does not fit
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += n
    return runs


async def take_while_deciding(stream: Any, max_records: int,
                              within_s: float) -> AsyncIterator[list[EventT[Any]]]:
    """Batches of a stream's events, as Faust's ``take_events``, but the stream goes on
    filling the next batch while the agent decides and writes this one.

    ``take_events`` holds the stream for as long as the agent has a batch, then gathers
    for ``within`` only: however deep the backlog, a batch held what the stream passes
    in ``within``. With one command per record (single submits) that was a few dozen
    records at 2 ms, each batch waited for its three flushes, and a worker fell behind
    at ~600 records/s with more than 10,000 waiting. Here the next batch is whatever
    arrived meanwhile (at most ``max_records``; the stream waits while it is full).
    An idle stream waits for its first event, then gathers for ``within_s`` more.
    Acking is the agent's: it acks a batch's events once their outputs and state are
    written, which can be after it has taken the next batch.
    """
    events: list[EventT[Any]] = []
    arrived, full, room = asyncio.Event(), asyncio.Event(), asyncio.Event()
    room.set()

    async def add(value: Any) -> Any:
        event = stream.current_event
        if event is None:
            raise RuntimeError("an event with no current_event")
        while len(events) >= max_records:
            room.clear()
            await stream.wait(room)
        events.append(event)
        arrived.set()
        if len(events) >= max_records:
            full.set()
        return value

    stream.enable_acks = False
    stream.add_processor(add)
    stream._enable_passive(aiter(stream.channel))  # as take_events: the stream drains itself
    try:
        while not stream.should_stop:
            if not events:
                await stream.wait_for_stopped(arrived)
            await stream.wait_for_stopped(full, timeout=within_s)
            if not events:
                continue
            batch = events[:]
            events.clear()
            arrived.clear()
            full.clear()
            room.set()
            yield batch
    finally:
        stream._processors.remove(add)


# The longest a fetch of Faust's consumer waits on the broker for records (Faust
# hard-codes 1,500 ms). aiokafka sends one fetch per broker at a time, for the
# partitions whose last records have all been handed over; a partition that gets
# records while a fetch is out waits for that fetch to return. When the fetch out
# held only partitions with nothing coming (the transfer legs, say), that was up to
# 1.5 s: right after a backlog, single submits at 500-800/s met such stalls every
# ~2 s, and a queue of ~1,000 records. At 100 ms they were gone (p50 / p99 of 83 / 437
# ms at 500/s and 97 / 293 ms at 800/s, against 838 / 2,585 and 1,243 / 2,193 ms),
# for an empty fetch every 100 ms when idle.
FETCH_MAX_WAIT_MS = 100


def _cap_fetch_wait() -> None:
    """Cap ``fetch_max_wait_ms`` of every aiokafka fetcher in this process (Faust's)."""
    init = Fetcher.__init__
    if getattr(init, "ledger_capped", False):
        return

    def capped(self: Fetcher, *args: Any, fetch_max_wait_ms: int = 500, **kwargs: Any) -> None:
        init(self, *args, fetch_max_wait_ms=min(fetch_max_wait_ms, FETCH_MAX_WAIT_MS), **kwargs)

    capped.ledger_capped = True  # type: ignore[attr-defined]
    Fetcher.__init__ = capped


def _faust_app(s: Settings) -> faust.App:
    return faust.App(
        s.app_id,
        broker=f"kafka://{s.bootstrap_servers}",
        broker_credentials=s.faust_credentials(),
        store="rocksdb://",
        datadir=str(s.data_dir),
        topic_partitions=s.partitions,
        topic_replication_factor=s.replication_factor,
        topic_allow_declare=False,
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        stream_buffer_maxsize=max(4096, 4 * s.batch_max_records),
        broker_commit_every=1_000_000,
        broker_commit_interval=1.0,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=min(1.0, s.session_timeout_s / 3),
        table_standby_replicas=0,
        web_enabled=True,
        # Faust's own pages would list every worker's URL (/router/) and serve the
        # hot path's raw store (/table/): the worker serves its own API only
        web_router_enabled=False,
        web_tables_enabled=False,
        web_bind=s.web_host,
        web_port=s.web_port,
        web_in_thread=False,
    )


def create_app(s: Settings) -> faust.App:
    _cap_fetch_wait()
    app = _faust_app(s)
    channel = app.topic(s.commands_topic, s.transfers_topic, key_serializer="raw",
                        value_serializer="raw", partitions=s.partitions)
    # Faust's defaults would give each partition's RocksDB up to 3 x 64 MB of memtables,
    # a 2 GB block cache, and index and filter blocks outside any cache: a worker's
    # memory would grow with its data and its partitions. See streams.worker.store.
    accounts = app.Table("accounts", key_type=bytes, value_type=bytes, partitions=s.partitions,
                         options=dict(STORE_OPTIONS))
    use_shared_budget(accounts)
    engine = Engine(s, lambda p: accounts.data._db_for_partition(p))  # type: ignore[attr-defined]
    unpack_outcome_logs(accounts, applied=lambda: engine.crash.reached("recovering"))
    worker = Worker(app, s, engine, accounts)
    app.ledger_engine = engine  # type: ignore[attr-defined]
    app.accounts_table = accounts  # type: ignore[attr-defined]
    app.ledger_health = worker.health  # type: ignore[attr-defined]

    app.agent(channel, name=f"{__name__}.ledger")(worker.agent)
    # On a clean stop Faust closes the tables' stores before it stops the agents; it
    # calls this in between (and when partitions are revoked in a rebalance).
    app._consumer_wait_empty = worker.finish_before_tables_close  # type: ignore[method-assign]
    app.on_partitions_revoked.connect(worker.finish_step_on_revoke)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(worker.forget_resident)  # type: ignore[arg-type]
    app.timer(2.0)(worker.stall_watchdog)
    app.timer(1.0)(worker.expire_holds)
    app.task(worker.announce)

    from streams.api import web

    web.register(app, s)
    web.register_health(app, s)
    return app


def internal_id(kind: str, name: str, at: int) -> str:
    """The command id of an expiry the ledger issues: ``kind:name:at``, with a digest of
    the name where that would be longer than an id may be."""
    cid = f"{kind}:{name}:{at}"
    if len(cid) <= MAX_ID_LENGTH:
        return cid
    return f"{kind}:{hashlib.blake2b(name.encode(), digest_size=16).hexdigest()}:{at}"


class Worker:
    """The worker's agent, handlers and timers, and its mutable state in one place."""

    def __init__(self, app: faust.App, s: Settings, engine: Engine, accounts: Any) -> None:
        self.app, self.s, self.engine, self.accounts = app, s, engine, accounts
        # The batch the agent has in hand (all its steps), and the last step taken: a
        # task that decides it, waits for the step before to be committed, then commits.
        self.in_hand: asyncio.Future[Any] | None = None
        self.step: asyncio.Future[Any] | None = None
        self.wait_empty = app._consumer_wait_empty  # Faust's, which create_app replaces
        # progress, for the log every 10 s
        self.commands_total = self.batches_total = 0
        self.since = time.monotonic()
        self.logged = 0.0
        # what /health/ready and /health/live read (streams.api.web.register_health)
        self.health: dict[str, Any] = {"progress_at": time.monotonic(), "lag": {},
                                       "stalled_s": 0.0}
        self.still: dict[TP, tuple[int, float]] = {}  # per input partition: checkpoint, since
        self.expiry_sent: dict[bytes, float] = {}  # hold expiry key -> when last submitted
        self.admin = AdminClient(s.kafka_config())

    # ------------------------------------------------------------ the agent

    async def agent(self, stream: Any) -> None:
        async for events in take_while_deciding(stream, self.s.batch_max_records,
                                                self.s.batch_within_ms / 1000):
            if self.app.should_stop:  # the tables may be closing: the next owner decides these
                continue
            batch = self.in_hand = asyncio.ensure_future(self._handle_in_steps(stream, events))
            try:
                await asyncio.shield(batch)
            except asyncio.CancelledError:
                # Stopping (SIGTERM): finish the batch in hand, so that the acks Faust
                # sends on the way out cover only inputs whose outputs and state are
                # written; if it cannot finish, exit before anything is acked.
                await self.finish("stopping", in_hand=True)
                log.info("stopping: batch in hand finished")
                raise
            except BaseException as exc:  # any failure here must stop the worker
                log.exception("batch failed")
                die(f"batch failed: {type(exc).__name__}: {exc}")

    async def finish(self, why: str, in_hand: bool) -> None:
        """Wait for the batch in hand (if ``in_hand``), then the last step taken; a
        worker whose steps cannot finish exits before anything else happens."""
        for batch in ((self.in_hand, self.step) if in_hand else (self.step,)):
            if batch is not None and not batch.done():
                log.info("%s: finishing the batch in hand first", why)
                try:
                    await asyncio.wait_for(asyncio.shield(batch),
                                           timeout=self.s.flush_timeout_s)
                except BaseException as exc:
                    die(f"{why}: the batch in hand did not finish: {exc!r}")

    async def finish_before_tables_close(self, consumer: Any, logger: Any) -> None:
        # The batch in hand would write to (or open) a closed store. In a rebalance only
        # the step being committed is waited for, as the batch in hand takes its next
        # step once the rebalance is over (waiting for it would wait for ourselves).
        if self.app.should_stop:
            await self.finish("stopping", in_hand=True)
        else:
            self.engine.crash.reached("handover")
            await self.finish("rebalance", in_hand=False)
        await self.wait_empty(consumer, logger)

    async def finish_step_on_revoke(self, sender: Any, *args: Any, signal: Any,
                                    **kwargs: Any) -> None:
        # Faust does not wait for an agent's batch before it gives partitions away
        # (stream_wait_empty=False, see DESIGN.md). The rebalance cannot complete
        # while this receiver runs, so no new owner starts on a partition whose
        # outputs and state are still being written here. (Not the batch in hand: its
        # next step waits for the rebalance to end.)
        self.engine.forget_resident()
        await self.finish("rebalance", in_hand=False)
        if args and args[0]:  # the partitions revoked (Faust sends the signal with none too)
            self.engine.crash.reached("handover-done")

    async def forget_resident(self, sender: Any, *args: Any, signal: Any,
                              **kwargs: Any) -> None:
        self.engine.forget_resident()  # a partition assigned may have moved meanwhile

    async def _handle_in_steps(self, stream: Any, events: list[EventT[Any]]) -> None:
        # Faust hands over whatever it has fetched: over a backlog, hundreds of
        # thousands of commands at once. Deciding them in bounded steps keeps the
        # worker's memory bounded; the batch's events are acked after its last step.
        steps = split_by_size(events, lambda ev: len(ev.message.value or b""),
                              self.s.batch_max_bytes)
        for i, step in enumerate(steps):
            await self._take(stream, step, events if i == len(steps) - 1 else [])

    async def _take(self, stream: Any, events: list[EventT[Any]],
                    ack: list[EventT[Any]]) -> None:
        # A batch taken just before a rebalance is decided after it: against the state
        # recovered for the new assignment, and only for partitions this worker owns.
        # Records of a partition it lost are left to the new owner, which reads them
        # again from its own checkpoint.
        app, s = self.app, self.s
        while app.rebalancing and not app.should_stop:
            await asyncio.sleep(0.05)
        before = self.step
        if app.rebalancing:  # stopping mid-rebalance: what it holds may be another's now
            return
        owned = {tp.partition for tp in app.assignor.assigned_actives()
                 if tp.topic in (s.commands_topic, s.transfers_topic)}
        inputs: dict[int, PartitionInput] = defaultdict(PartitionInput)
        for ev in events:
            m = ev.message
            if m.partition not in owned:
                continue
            part = inputs[m.partition]
            (part.legs if m.topic == s.transfers_topic else part.commands).append(
                Record(m.key, m.value, m.offset, round((m.timestamp or 0) * 1000)))
        self.step = asyncio.ensure_future(self._step(stream, inputs, before, ack))
        # This step is decided while the one before is committed; the next is taken
        # once the one before is done, so at most two are in hand.
        if before is not None:
            await before

    async def _step(self, stream: Any, inputs: dict[int, PartitionInput],
                    before: asyncio.Future[Any] | None, ack: list[EventT[Any]]) -> None:
        decided = await self.engine.decide(inputs)
        if before is not None:
            await before
        report = await self.engine.commit(decided)
        for event in ack:
            await stream.ack(event)
        self.health["progress_at"] = time.monotonic()
        metrics.record_batch(report, int(time.time() * 1000))
        self.commands_total += report.stats.commands
        self.batches_total += 1
        log.debug("batch", extra={"commands": report.stats.commands,
                                  "decide_ms": round(report.decide_ms, 2),
                                  "flush_ms": round(report.flush_ms, 2)})
        now = time.monotonic()
        if now - self.logged >= 10:
            rate = self.commands_total / max(now - self.since, 1e-9)
            log.info("progress", extra={"commands_total": self.commands_total,
                                        "batches_total": self.batches_total,
                                        "commands_per_s": round(rate, 1)})
            self.logged = now

    # ------------------------------------------------------------ the stall watchdog

    def _inputs(self) -> list[TP]:
        return [tp for tp in self.app.assignor.assigned_actives()
                if tp.topic in (self.s.commands_topic, self.s.transfers_topic)]

    def _checkpoints(self, tps: list[TP]) -> dict[TP, int]:
        """The last offset of each input partition decided and written (our checkpoint)."""
        checkpoints = {p: PartitionView(self.accounts.data._db_for_partition(p)).checkpoint
                       for p in {tp.partition for tp in tps}}
        return {tp: (checkpoints[tp.partition].commands if tp.topic == self.s.commands_topic
                     else checkpoints[tp.partition].transfers) for tp in tps}

    async def stall_watchdog(self) -> None:
        # Faust can stop feeding an agent without crashing anything (a lost wake-up
        # after a rebalance, a fetcher stuck on a partition): input waits, nothing is
        # decided. Measure it against our own checkpoints and make it loud.
        app, health = self.app, self.health
        tps = self._inputs()
        recovery = app.tables.recovery  # type: ignore[attr-defined]
        metrics.RECOVERY.set(recovery.active_remaining_total() if recovery.in_recovery else 0)
        if not tps or app.rebalancing or recovery.in_recovery:
            health["progress_at"] = time.monotonic()
            health["lag"], health["stalled_s"] = {}, 0.0
            return
        # The broker's end offsets, not the consumer's: a fetch that keeps failing
        # (say, on records it cannot decompress) leaves the consumer's view stale.
        try:
            highwaters = await asyncio.get_running_loop().run_in_executor(
                None, end_offsets, self.admin, tps)
        except (KafkaException, TimeoutError) as exc:
            # No broker, no input to wait for: an outage is not a stall (and the worker
            # rides it out; see tests/chaos).
            log.warning("stall check skipped: %s", exc)
            health["progress_at"] = time.monotonic()
            return
        if app.rebalancing or recovery.in_recovery:  # began while we asked the broker
            return
        if not self.still:  # the first look since start: stalls are timed from here, so
            health["progress_at"] = time.monotonic()  # the fetch below comes before an exit
        done = self._checkpoints(tps)
        by_tp = {(tp.topic, tp.partition): max(0, highwaters.get(tp, 0) - done[tp] - 1)
                 for tp in tps}
        lag = {f"{t}[{p}]": n for (t, p), n in by_tp.items() if n}
        health["lag"] = lag
        metrics.record_lag(by_tp)
        if not lag:
            health["progress_at"] = time.monotonic()
        health["stalled_s"] = time.monotonic() - health["progress_at"]
        metrics.STALLED.set(health["stalled_s"])
        if await self._fetch_stuck_again(tps, done, by_tp):
            return
        if health["stalled_s"] > 2 * self.s.stall_timeout_s:
            missing = [name for name, ok in (("snappy", codecs.has_snappy()),
                                             ("lz4", codecs.has_lz4()),
                                             ("zstd", codecs.has_zstd())) if not ok]
            hint = (f"; the consumer cannot decompress {', '.join(missing)} records "
                    "(is cramjam installed?)" if missing else "")
            die(f"stalled: no batch for {health['stalled_s']:.0f}s with input waiting "
                f"({sum(lag.values())} records on {len(lag)} partitions); hot path: "
                f"{self.engine.phase}{hint}")

    async def _fetch_stuck_again(self, tps: list[TP], done: dict[TP, int],
                                 by_tp: dict[tuple[str, int], int]) -> bool:
        """Our checkpoint, not the group's committed offset, says where a partition
        stands: Faust can commit past records it skipped, and after a restart nothing
        would deliver them until new input arrived on that partition. A partition with
        input waiting and a checkpoint that has not moved for stall_timeout_s is
        fetched again from its checkpoint (whatever the other partitions are doing).
        True if some were."""
        now = time.monotonic()
        stuck = []
        for tp in tps:
            last, since = self.still.get(tp, (None, now))
            if not by_tp[(tp.topic, tp.partition)] or done[tp] != last:
                self.still[tp] = (done[tp], now)
            elif now - since > self.s.stall_timeout_s:
                stuck.append(tp)
                self.still[tp] = (done[tp], now)  # once per stall_timeout_s
        assigned = self.app.consumer.assignment()
        offsets = {tp: done[tp] + 1 for tp in stuck if tp in assigned}
        if not offsets:
            return False
        log.warning("stalled partitions: fetching from the checkpoint",
                    extra={"offsets": {f"{tp.topic}[{tp.partition}]": o
                                       for tp, o in offsets.items()}})
        try:
            await self.app.consumer.seek_wait(offsets)
        except Exception as exc:  # a rebalance moved them meanwhile: nothing to do
            log.warning("seek skipped: %r", exc)
            return False
        self.health["progress_at"] = time.monotonic()  # give it time to deliver
        return True

    # ------------------------------------------------------------ hold expiry

    async def expire_holds(self) -> None:
        # A hold's expiry acts through the log, as an ExpireHold command keyed by its
        # account, so a replay meets it in the same order; its content is fixed by
        # the hold (issued_at = expires_at), so a re-send is an idempotent retry.
        if self.app.rebalancing:
            return
        now = time.time()
        for tp in self.app.assignor.assigned_actives():
            if tp.topic == self.s.commands_topic:
                due = self._due_holds(tp.partition, int(now * 1000), now)
                for i in range(0, len(due), 500):
                    self.engine.submit_commands(tp.partition, due[i:i + 500])
        for key, sent in list(self.expiry_sent.items()):
            if now - sent > 300:
                del self.expiry_sent[key]

    def _due_holds(self, partition: int, now_ms: int, now: float,
                   ) -> list[ExpireHold | ExpireTransaction]:
        """Holds past their expiry (``x`` index) and transactions past their deadline
        (``y``), each submitted again at most every 30 s until it is done."""
        view = PartitionView(self.accounts.data._db_for_partition(partition))
        due: list[ExpireHold | ExpireTransaction] = []
        for prefix in (b"x", b"y"):
            for key in view.db.keys(from_key=prefix):
                if not key.startswith(prefix):
                    break
                at, account, name = parse_expiry_key(key)
                if at > now_ms:
                    break
                if view.get(key) is None or now - self.expiry_sent.get(key, 0.0) < 30:
                    continue
                self.expiry_sent[key] = now
                if prefix == b"x":
                    due.append(ExpireHold(command_id=internal_id("expire", name, at),
                                          account_id=account, actor="ledger", issued_at=at,
                                          hold_id=name))
                else:
                    due.append(ExpireTransaction(command_id=internal_id("timeout", name, at),
                                                 account_id=account, actor="ledger",
                                                 issued_at=at, transaction_id=name))
        return due

    # ------------------------------------------------------------ start-up, crash watch

    async def announce(self) -> None:
        gc.freeze()  # what start-up made lives as long as the worker: never scan it again
        threading.Thread(target=self.watch_for_crashes, name="ledger-crash-watch",
                         daemon=True).start()
        log.info("worker started", extra={"bootstrap": self.s.bootstrap_servers,
                                          "partitions": self.s.partitions,
                                          "web_port": self.s.web_port, "core": core_build()})

    def watch_for_crashes(self) -> None:
        # Faust's fetcher or consumer can crash and leave the worker alive but idle, or
        # start a shutdown that hangs (it stops the app's timers first): so this runs
        # on a thread of its own, which nothing in Faust stops. A service that fails
        # while a clean stop (SIGTERM) is under way is not a crash of the worker.
        stopping_cleanly = False
        while True:
            time.sleep(1.0)
            reason = crash_reason(self.app)
            if reason and not stopping_cleanly:
                die(reason)
            if self.app.should_stop and crash_reason(self.app) is None:
                stopping_cleanly = True
