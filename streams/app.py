"""The Faust worker: one agent over ``ledger.commands`` + ``ledger.transfers``.

Faust owns the consumer group, partition assignment, rebalancing, the accounts
table's RocksDB stores and their recovery from the changelog, and the web server.
The agent takes records in batches and hands them to ``streams.engine.Engine``,
which decides them and writes outputs and state itself (see its docstring for the
order that makes kill -9 safe).

Run it with ``ledger worker`` (see ``streams.cli``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from typing import Any

import faust
from faust.types import EventT

from schemas.models import ExpireHold
from streams import metrics
from streams.engine import Engine, PartitionInput, Record
from streams.processor import parse_expiry_key
from streams.settings import Settings
from streams.state import PartitionView

log = logging.getLogger("ledger.worker")

EXIT_INTERNAL_FAILURE = 70  # EX_SOFTWARE: a supervisor should restart the worker


def die(reason: str) -> None:
    """Exit at once, non-zero, saying why: a half-alive worker is worse than none."""
    log.critical("worker exiting: %s", reason)
    for h in logging.getLogger().handlers:
        h.flush()
    os._exit(EXIT_INTERNAL_FAILURE)


def create_app(s: Settings) -> faust.App:
    app = faust.App(
        s.app_id,
        broker=f"kafka://{s.bootstrap_servers}",
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
        web_bind=s.web_host,
        web_port=s.web_port,
        web_in_thread=False,
    )
    channel = app.topic(s.commands_topic, s.transfers_topic, key_serializer="raw",
                        value_serializer="raw",
                        partitions=s.partitions)
    accounts = app.Table("accounts", key_type=bytes, value_type=bytes, partitions=s.partitions)
    engine = Engine(s, lambda p: accounts.data._db_for_partition(p))  # type: ignore[attr-defined]
    app.ledger_engine = engine  # type: ignore[attr-defined]
    app.accounts_table = accounts  # type: ignore[attr-defined]
    totals = {"commands": 0, "batches": 0, "since": time.monotonic(), "logged": 0}
    health: dict[str, Any] = {"progress_at": time.monotonic(), "lag": {}, "stalled_s": 0.0}
    app.ledger_health = health  # type: ignore[attr-defined]

    @app.agent(channel)
    async def ledger(stream: Any) -> None:
        async for events in stream.take_events(s.batch_max_records, s.batch_within_ms / 1000):
            batch = asyncio.ensure_future(_handle(events))
            try:
                await asyncio.shield(batch)
            except asyncio.CancelledError:
                # Stopping (SIGTERM): finish the batch in hand, so that the acks Faust
                # sends on the way out cover only inputs whose outputs and state are
                # written; if it cannot finish, exit before anything is acked.
                try:
                    await asyncio.wait_for(batch, timeout=s.flush_timeout_s)
                except BaseException as exc:
                    die(f"stopping: the batch in hand did not finish: {exc!r}")
                log.info("stopping: batch in hand finished")
                raise
            except BaseException as exc:  # any failure here must stop the worker
                log.exception("batch failed")
                die(f"batch failed: {type(exc).__name__}: {exc}")

    async def _handle(events: list[EventT[Any]]) -> None:
        inputs: dict[int, PartitionInput] = defaultdict(PartitionInput)
        for ev in events:
            m = ev.message
            part = inputs[m.partition]
            (part.legs if m.topic == s.transfers_topic else part.commands).append(
                Record(m.key, m.value, m.offset))
        report = await engine.process(inputs)
        health["progress_at"] = time.monotonic()
        metrics.record_batch(report, int(time.time() * 1000))
        totals["commands"] += report.stats.commands
        totals["batches"] += 1
        log.debug("batch", extra={"records": len(events), "commands": report.stats.commands,
                                  "decide_ms": round(report.decide_ms, 2),
                                  "flush_ms": round(report.flush_ms, 2)})
        now = time.monotonic()
        if now - totals["logged"] >= 10:
            rate = totals["commands"] / max(now - totals["since"], 1e-9)
            log.info("progress", extra={"commands_total": totals["commands"],
                                        "batches_total": totals["batches"],
                                        "commands_per_s": round(rate, 1)})
            totals["logged"] = now

    @app.timer(1.0)  # type: ignore[untyped-decorator]
    async def watchdog() -> None:
        # Faust's fetcher or consumer can crash and leave the worker alive but idle.
        for name, svc in (("fetcher", app._fetcher), ("consumer", app.consumer),
                          ("agent", ledger)):
            if getattr(svc, "crashed", False):
                die(f"{name} crashed: {getattr(svc, 'crash_reason', None)!r}")

    @app.timer(2.0)  # type: ignore[untyped-decorator]
    async def stall_watchdog() -> None:
        # Faust can stop feeding an agent without crashing anything (a lost wake-up
        # after a rebalance, a fetcher stuck on a partition): input waits, nothing is
        # decided. Measure it against our own checkpoints and make it loud.
        tps = [tp for tp in app.assignor.assigned_actives()
               if tp.topic in (s.commands_topic, s.transfers_topic)]
        recovery = app.tables.recovery  # type: ignore[attr-defined]
        if not tps or app.rebalancing or recovery.in_recovery:
            health["progress_at"] = time.monotonic()
            health["lag"], health["stalled_s"] = {}, 0.0
            return
        highwaters = await app.consumer.highwaters(*tps)
        lag = {}
        by_tp = {}
        for tp in tps:
            ck = PartitionView(accounts.data._db_for_partition(tp.partition)).checkpoint  # type: ignore[attr-defined]
            done = ck.commands if tp.topic == s.commands_topic else ck.transfers
            by_tp[(tp.topic, tp.partition)] = max(0, highwaters.get(tp, 0) - done - 1)
            if by_tp[(tp.topic, tp.partition)]:
                lag[f"{tp.topic}[{tp.partition}]"] = by_tp[(tp.topic, tp.partition)]
        health["lag"] = lag
        metrics.record_lag(by_tp)
        if not lag:
            health["progress_at"] = time.monotonic()
        health["stalled_s"] = time.monotonic() - health["progress_at"]
        metrics.STALLED.set(health["stalled_s"])
        if health["stalled_s"] > 2 * s.stall_timeout_s:
            die(f"stalled: no batch for {health['stalled_s']:.0f}s with input waiting "
                f"({sum(lag.values())} records on {len(lag)} partitions); hot path: "
                f"{engine.phase}")

    expiry_sent: dict[bytes, float] = {}

    @app.timer(1.0)  # type: ignore[untyped-decorator]
    async def expire_holds() -> None:
        # A hold's expiry acts through the log, as an ExpireHold command keyed by its
        # account, so a replay meets it in the same order; its content is fixed by
        # the hold (issued_at = expires_at), so a re-send is an idempotent retry.
        now = time.time()
        for tp in app.assignor.assigned_actives():
            if tp.topic == s.commands_topic:
                due = _due_holds(tp.partition, int(now * 1000), now)
                for i in range(0, len(due), 500):
                    engine.submit_commands(tp.partition, due[i:i + 500])
        for key, sent in list(expiry_sent.items()):
            if now - sent > 300:
                del expiry_sent[key]

    def _due_holds(partition: int, now_ms: int, now: float) -> list[ExpireHold]:
        view = PartitionView(accounts.data._db_for_partition(partition))  # type: ignore[attr-defined]
        due = []
        for key in view.db.keys(from_key=b"x"):
            if not key.startswith(b"x"):
                break
            expires_at, account, hold_id = parse_expiry_key(key)
            if expires_at > now_ms:
                break
            if view.get(key) is None or now - expiry_sent.get(key, 0.0) < 30:
                continue
            expiry_sent[key] = now
            due.append(ExpireHold(command_id=f"expire:{hold_id}:{expires_at}",
                                  account_id=account, actor="ledger", issued_at=expires_at,
                                  hold_id=hold_id))
        return due

    @app.task  # type: ignore[untyped-decorator]
    async def announce() -> None:
        log.info("worker started", extra={"bootstrap": s.bootstrap_servers,
                                          "partitions": s.partitions, "web_port": s.web_port})

    from streams import web

    web.register(app, s)
    web.register_health(app, s)
    return app
