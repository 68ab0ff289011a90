"""kill -9 the worker mid-stream, restart the broker: nothing lost, nothing doubled."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from producers.client import LedgerClient
from schemas.codec import CODEC
from schemas.models import (
    CommandBase,
    Deposit,
    OpenAccount,
    Posting,
    Transaction,
    Transfer,
    Withdraw,
)
from streams.ops.verify import Report, verify
from streams.readmodels.eventlog import read_all
from streams.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]


def workload(rng: random.Random, accounts: list[str], n: int) -> list[CommandBase]:
    t = iter(range(int(time.time() * 1000), 10**14))
    out: list[CommandBase] = []
    for a in accounts:
        out.append(OpenAccount(command_id=f"open-{a}", account_id=a, actor="chaos",
                               issued_at=next(t), currency="USD"))
        out.append(Deposit(command_id=f"seed-{a}", account_id=a, actor="chaos",
                           issued_at=next(t), amount_minor=50_000, currency="USD"))
    for i in range(n):
        a = rng.choice(accounts)
        roll = rng.random()
        if roll < 0.05:  # a transaction: two or three postings, a the coordinator
            out.append(Transaction(command_id=f"x{i}", account_id=a, actor="chaos",
                                   issued_at=next(t), postings=[
                Posting(from_account_id=src, to_account_id=dst, currency="USD",
                        amount_minor=rng.randint(1, 9_000))
                for src, dst in (rng.sample(accounts, 2) for _ in range(rng.randint(2, 3)))]))
        elif roll < 0.5:
            b = rng.choice(accounts)
            if b == a:
                b = accounts[(accounts.index(a) + 1) % len(accounts)]
            out.append(Transfer(command_id=f"x{i}", account_id=a, actor="chaos",
                                issued_at=next(t), to_account_id=b,
                                amount_minor=rng.randint(1, 9_000), currency="USD"))
        elif roll < 0.75:
            out.append(Deposit(command_id=f"x{i}", account_id=a, actor="chaos",
                               issued_at=next(t), amount_minor=rng.randint(1, 5_000),
                               currency="USD"))
        else:
            out.append(Withdraw(command_id=f"x{i}", account_id=a, actor="chaos",
                                issued_at=next(t), amount_minor=rng.randint(1, 9_000),
                                currency="USD"))
    return out


def seed(default: int) -> int:
    """``LEDGER_CHAOS_SEED`` if set (tests/chaos/loop.py sets it), else the test's own."""
    return int(os.environ.get("LEDGER_CHAOS_SEED", default))


ACKED: dict[str, tuple[int | None, int | None]] = {}  # command_id -> where the broker put it


def submit_paced(s: Settings, commands: list[CommandBase], seconds: float,
                 done: threading.Event, debug_log: Path | None = None) -> threading.Thread:
    """Produce the commands steadily over ``seconds`` (outcomes are checked from the log).

    ``debug_log``: where librdkafka's idempotence and message debug log of the run goes,
    to tell what the producer saw if an acknowledged command is missing."""

    def run() -> None:
        ACKED.clear()
        with LedgerClient(s, wait_outcomes=False) as client:
            if debug_log is not None:
                logger = logging.getLogger("chaos.librdkafka")
                logger.propagate = False
                logger.setLevel(logging.DEBUG)
                logger.addHandler(logging.FileHandler(debug_log))
                client.producer = Producer(s.producer_config(**{
                    "linger.ms": 1, "debug": "eos,msg", "logger": logger}))
            chunk = max(1, len(commands) // int(seconds * 10))
            sent = []
            for i in range(0, len(commands), chunk):
                sent += [client.submit(c) for c in commands[i:i + chunk]]
                time.sleep(0.1)
            client.flush(120)
            for f in sent:
                acked = f.result(timeout=0)  # raises DeliveryError for a refused record
                assert acked.offset is not None and acked.offset >= 0, acked
                ACKED[acked.command_id] = (acked.partition, acked.offset)
        done.set()

    thread = threading.Thread(target=run, name="chaos-producer", daemon=True)
    thread.start()
    return thread


def outcomes_by_command(s: Settings) -> tuple[dict[str, set[bytes]], int]:
    """Distinct outcome records per command_id (events it caused, or its rejection)."""
    seen: dict[str, set[bytes]] = defaultdict(set)
    records = 0
    for topic in (s.events_topic, s.rejections_topic):
        for m in read_all(s, topic):
            records += 1
            _, d = CODEC.decode(m.value())
            # legs cause events too (causation "<transfer>:credit"); count commands only
            if d.get("causation_id", d["command_id"]) == d["command_id"]:
                seen[d["command_id"]].add(m.value())
    return seen, records


def where_on_the_log(s: Settings, command_ids: set[str]) -> dict[str, str]:
    """partition@offset of each command's record on ``ledger.commands`` (or "absent"),
    and the log's start and end offsets of those partitions."""
    found = dict.fromkeys(command_ids, "absent")
    consumer = Consumer({**s.kafka_config(), "group.id": "unused"})
    for p in {p for p, _ in (ACKED.get(i, (None, None)) for i in command_ids) if p is not None}:
        found[f"p{p} start..end"] = str(consumer.get_watermark_offsets(
            TopicPartition(s.commands_topic, p), timeout=10))
    consumer.close()
    for m in read_all(s, s.commands_topic):
        _, batch = CODEC.decode(m.value())
        for _name, body in batch["commands"]:
            if body["command_id"] in found:
                found[body["command_id"]] = f"{m.partition()}@{m.offset()}"
    return found


class Supervisor:
    """Restarts a worker that exited by itself, as compose or systemd would.

    A worker exits on purpose when an internal service fails or it stalls (see the
    watchdogs in ``streams.worker.app``); nothing may be lost or doubled across that either.
    """

    def __init__(self, start_worker, worker) -> None:
        self.start_worker = start_worker
        self.worker = worker
        self.restarts = 0

    def check(self):
        if self.worker.proc.poll() is not None:
            self.restarts += 1
            print(f"\nsupervisor: worker exited with {self.worker.proc.returncode}, "
                  f"restarting; last log line: {self.worker.log_tail(1)}")
            self.worker = self.start_worker(f"restart{self.restarts}", ready=False,
                                            session_timeout_s=6.0, stall_timeout_s=10.0,
                                            data_dir=self.worker.settings.data_dir)
        return self.worker


def wait_for_outcomes(s: Settings, ids: set[str], timeout_s: float,
                      supervisor: Supervisor) -> dict[str, set[bytes]]:
    deadline = time.monotonic() + timeout_s
    while True:
        supervisor.check()
        seen, _ = outcomes_by_command(s)
        missing = ids - set(seen)
        if not missing:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} commands without an outcome, e.g. "
                                 f"{sorted(missing)[:5]}; acknowledged at (partition, "
                                 f"offset): { {i: ACKED.get(i) for i in missing} }; found on "
                                 f"the command log at: {where_on_the_log(s, missing)}")
        time.sleep(1)


def wait_settled(s: Settings, timeout_s: float) -> Report:
    deadline = time.monotonic() + timeout_s
    while True:
        report = verify(s)
        if report.transfers_in_flight == report.transactions_in_flight == 0 or \
                time.monotonic() > deadline:
            return report
        time.sleep(1)


def report_run(test: str, commands: int, told: int, duplicates: int, **more: int) -> None:
    """A line of the chaos loop's tally (tests/chaos/loop.py sets LEDGER_CHAOS_REPORT),
    written once every check of the test has passed: nothing lost, nothing doubled."""
    path = os.environ.get("LEDGER_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "seed": seed(0), "commands": commands,
                                "outcomes_told": told, "lost": 0, "doubled": 0,
                                "duplicates": duplicates, **more}) + "\n")


def check_ledger(s: Settings, commands: list[CommandBase], supervisor: Supervisor) -> Report:
    seen = wait_for_outcomes(s, {c.command_id for c in commands}, 240, supervisor)
    several = {cid: len(v) for cid, v in seen.items() if len(v) != 1}
    assert not several, f"commands with more than one distinct outcome: {several}"
    report = wait_settled(s, timeout_s=120)
    worker = supervisor.check()
    worker.wait_ready()
    print(f"\n{len(seen)} commands, each with exactly one outcome; {report.events} events; "
          f"{report.transfers_credited} transfers credited, {report.transfers_reversed} "
          f"reversed; {report.transactions_committed} transactions committed, "
          f"{report.transactions_rejected} rejected; duplicate event records "
          f"(byte-identical copies): {report.duplicates}; "
          f"restarts by the supervisor: {supervisor.restarts}")
    assert report.ok, report.breaches[:10]
    assert report.transfers_in_flight == report.transactions_in_flight == 0
    for account, state in report.states.items():
        status, doc = worker.get(f"/accounts/{account}")
        assert status == 200, (account, doc)
        assert (doc["balance_minor"], doc["version"]) == (state.balance_minor, state.version)
    return report


def test_kill9_worker_five_times_and_restart_broker(ledger_settings, start_worker,
                                                    local_broker, tmp_path):
    rng = random.Random(seed(2024))
    s = ledger_settings.model_copy(update={"session_timeout_s": 6.0})
    accounts = [f"acct-{i}" for i in range(300)]
    commands = workload(rng, accounts, 20_000)
    done = threading.Event()
    debug_log = tmp_path / "librdkafka-eos-msg.log"
    print(f"\nthe producer's librdkafka log (eos, msg): {debug_log}")
    producer = submit_paced(s, commands, seconds=50, done=done, debug_log=debug_log)

    worker = start_worker("w0", session_timeout_s=6.0, stall_timeout_s=10.0)
    kills = 0
    broker_restarted = False
    while kills < 5:
        time.sleep(rng.uniform(0.5, 4.0))
        if kills == 2 and not broker_restarted:
            local_broker.restart()  # with a worker running: it must ride it out
            broker_restarted = True
            time.sleep(rng.uniform(1.0, 4.0))
        assert worker.proc.poll() is None, f"worker died by itself:\n{worker.log_tail()}"
        worker.kill()
        kills += 1
        worker = start_worker(f"w{kills}", session_timeout_s=6.0, stall_timeout_s=10.0,
                              data_dir=worker.settings.data_dir)
    producer.join(180)
    assert done.is_set(), "the producer did not finish"
    assert broker_restarted and kills == 5
    assert len(commands) > 20_000
    assert "Idempotent producer state" in debug_log.read_text()[:100_000]  # there to read
    report = check_ledger(s, commands, Supervisor(start_worker, worker))
    report_run("kill -9 five times, broker restart", len(commands), 0, report.duplicates,
               worker_kills=5, broker_restarts=1)


def test_two_workers_one_killed_the_other_takes_over(ledger_settings, start_worker):
    rng = random.Random(seed(7))
    s = ledger_settings.model_copy(update={"session_timeout_s": 6.0})
    accounts = [f"acct-{i}" for i in range(200)]
    commands = workload(rng, accounts, 8_000)
    a = start_worker("a", session_timeout_s=6.0, stall_timeout_s=10.0)
    b = start_worker("b", session_timeout_s=6.0, stall_timeout_s=10.0)
    done = threading.Event()
    producer = submit_paced(s, commands, seconds=15, done=done)
    time.sleep(rng.uniform(3, 6))
    b.kill()
    producer.join(120)
    assert done.is_set()
    # a now owns every partition: b's state came back from the changelog
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, doc = a.get("/health/ready")
        if status == 200 and len(doc["partitions"]) == s.partitions:
            break
        time.sleep(0.5)
    assert len(doc["partitions"]) == s.partitions, doc
    report = check_ledger(s, commands, Supervisor(start_worker, a))
    report_run("two workers, one killed", len(commands), 0, report.duplicates, worker_kills=1)
