"""The worker killed at every named point (streams.worker.engine.CRASH_POINTS): each step of its
commit path, each step of finishing a batch a crashed worker left pending, during table
recovery and during a rebalance handover, while clients wait for their outcomes. What
each client was told is what the log holds, once."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, TopicPartition

from producers.client import LedgerClient, Outcome
from schemas.models import CommandBase, encode
from streams.dev.procs import WorkerProcess
from streams.settings import Settings
from streams.worker.engine import CRASH_POINTS
from tests.chaos.test_kill9 import (
    Supervisor,
    check_ledger,
    outcomes_by_command,
    report_run,
    seed,
    workload,
)

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]

OPTIONS = {"session_timeout_s": 6.0, "stall_timeout_s": 10.0}

# The commit path's points in an order where each ``resolve/`` point follows a crash
# that leaves a batch pending (its intent on the changelog, its state not): the next
# worker finishes that batch first, and is killed doing it.
COMMIT_ORDER = ["intent", "resolve/intent", "resolve/outputs-half", "resolve/outputs",
                "resolve/state-half", "resolve/state", "outputs-half", "resolve/stored",
                "outputs", "state-half", "state", "stored", "deciding-next"]
HANDOVER_ORDER = ["handover", "handover-done", "recovering"]


def test_every_crash_point_is_driven() -> None:
    assert sorted(COMMIT_ORDER + HANDOVER_ORDER) == sorted(CRASH_POINTS)


class Load:
    """A client submitting steadily (20 commands every 0.1 s) and keeping its futures;
    after ``finish()`` it submits 50 more rounds and stops."""

    def __init__(self, s: Settings, commands: list[CommandBase]) -> None:
        self.s, self.commands = s, commands
        self.submitted: list[tuple[CommandBase, object]] = []
        self.finishing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="crash-submitter", daemon=True)

    def __enter__(self) -> Load:
        self.client = LedgerClient(self.s).__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finishing.set()
        self.thread.join(120)
        self.client.__exit__(None, None, None)

    def _run(self) -> None:
        rounds_after = 0
        for i in range(0, len(self.commands), 20):
            chunk = self.commands[i:i + 20]
            self.submitted.extend((c, self.client.submit(c)) for c in chunk)
            if self.finishing.is_set():
                rounds_after += 1
                if rounds_after > 50:
                    return
            time.sleep(0.1)

    def running(self) -> None:
        assert self.thread.is_alive(), "ran out of commands before every crash point"

    def told(self) -> dict[str, Outcome]:
        """Every submitted command's outcome, as its client was told it."""
        self.finishing.set()
        self.thread.join(120)
        assert not self.thread.is_alive()
        return {c.command_id: fut.result(timeout=300)  # type: ignore[attr-defined]
                for c, fut in self.submitted}

    def answered(self) -> int:
        return sum(1 for _, fut in list(self.submitted) if fut.done())  # type: ignore


def killed_at(worker: WorkerProcess, point: str, timeout_s: float, load: Load) -> None:
    """Wait (bounded) for ``worker`` to kill itself at ``point``."""
    deadline = time.monotonic() + timeout_s
    while worker.proc.poll() is None:
        assert time.monotonic() < deadline, f"not killed at {point} in {timeout_s}s:\n" \
                                            f"{worker.log_tail()}"
        load.running()
        time.sleep(0.2)
    assert worker.proc.returncode == -signal.SIGKILL, worker.log_tail()
    assert f"killing the worker at {point}" in worker.log_path.read_text()


def wait_until(what: str, done: Callable[[], bool], timeout_s: float, load: Load) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not in {timeout_s}s"
        load.running()
        time.sleep(0.5)


def changelog_records(s: Settings) -> int:
    consumer = Consumer({**s.kafka_config(), "group.id": "unused"})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(s.changelog_topic, p),
                                                  timeout=10)[1]
                   for p in range(s.partitions))
    finally:
        consumer.close()


def check_told(s: Settings, told: dict[str, Outcome]) -> None:
    seen, _ = outcomes_by_command(s)
    for command_id, outcome in told.items():
        records = {encode(e) for e in outcome.events} if outcome.accepted else \
            {encode(outcome.rejection)}
        assert records == seen[command_id], command_id


def check_the_run(s: Settings, load: Load, told: dict[str, Outcome], supervisor: Supervisor,
                  points: list[str]) -> None:
    """Every command has one outcome, verify passes, and each client was told the log's."""
    report = check_ledger(s, [c for c, _ in load.submitted], supervisor)
    assert report.events > len(told) // 2
    check_told(s, told)
    report_run("crash points: " + ", ".join(points), len(told), len(told), report.duplicates,
               worker_kills=len(points))
    print(f"crash points met: {points}; {len(told)} outcomes told, each the log's")


def test_a_crash_at_every_step_of_the_commit_path(ledger_settings, start_worker):
    rng = random.Random(seed(11))
    s = ledger_settings.model_copy(update={"session_timeout_s": 6.0})

    def arm(i: int) -> str | None:
        if i == len(COMMIT_ORDER):
            return None
        point = COMMIT_ORDER[i]  # a pending batch is finished once: its first step
        return f"{point}:{1 if point.startswith('resolve/') else rng.randint(2, 6)}"

    worker = start_worker("c0", crash_at=arm(0), **OPTIONS)
    with Load(s, workload(rng, [f"acct-{i}" for i in range(80)], 60_000)) as load:
        for i, point in enumerate(COMMIT_ORDER):
            killed_at(worker, point, 120, load)
            worker = start_worker(f"c{i + 1}", ready=False, crash_at=arm(i + 1),
                                  data_dir=worker.settings.data_dir, **OPTIONS)
        told = load.told()

    check_the_run(s, load, told, Supervisor(start_worker, worker), COMMIT_ORDER)


def test_a_crash_in_a_rebalance_handover_and_during_recovery(ledger_settings, start_worker):
    """Worker a is killed handing its partitions over to b as b joins; c, once settled,
    is killed after handing its partitions over as d joins; d, with a store of its own
    to fill from the changelog, is killed part-way through recovering it; e restarts on
    d's half-recovered store. b and e finish the load."""
    rng = random.Random(seed(13))
    s = ledger_settings.model_copy(update={"session_timeout_s": 6.0})

    def has_all_partitions(w: WorkerProcess) -> bool:
        status, doc = w.get("/health/ready")
        return status == 200 and len(doc["partitions"]) == s.partitions

    a = start_worker("a", crash_at="handover:1", **OPTIONS)
    with Load(s, workload(rng, [f"acct-{i}" for i in range(80)], 40_000)) as load:
        wait_until("a answers", lambda: load.answered() > 500, 60, load)
        b = start_worker("b", ready=False, **OPTIONS)
        killed_at(a, "handover", 60, load)
        wait_until("b owns every partition", lambda: has_all_partitions(b), 120, load)
        c = start_worker("c", crash_at="handover-done:1", **OPTIONS)
        # enough changelog that recovering d's share takes several batches of 1,000
        wait_until("a long changelog", lambda: changelog_records(s) > 15_000, 180, load)
        d = start_worker("d", ready=False, crash_at=f"recovering:{rng.randint(1, 3)}",
                         **OPTIONS)
        killed_at(c, "handover-done", 60, load)
        killed_at(d, "recovering", 120, load)
        recovery = d.log_path.read_text()
        assert "Restoring state from changelog topics" in recovery
        assert "Done reading from changelog topics" not in recovery  # killed part-way
        e = start_worker("e", ready=False, data_dir=d.settings.data_dir, **OPTIONS)
        e.wait_ready(120)
        told = load.told()

    check_the_run(s, load, told, Supervisor(start_worker, e), HANDOVER_ORDER)
