"""The worker killed at every step of its commit path, one after another, while clients
wait for their outcomes: what each client was told is what the log holds, once."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from producers.client import LedgerClient, Outcome
from schemas.models import CommandBase, encode
from streams.engine import CRASH_POINTS
from tests.chaos.test_kill9 import (
    Supervisor,
    check_ledger,
    outcomes_by_command,
    seed,
    workload,
)

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]


def test_a_crash_at_every_step_of_the_commit_path(ledger_settings, start_worker):
    rng = random.Random(seed(11))
    s = ledger_settings.model_copy(update={"session_timeout_s": 6.0})
    commands = workload(rng, [f"acct-{i}" for i in range(80)], 40_000)
    crashes_done = threading.Event()
    submitted: list[tuple[CommandBase, object]] = []

    def submit() -> None:
        # steadily, so that every crash point is met, then the rest of a round number
        with_rest = 0
        for i in range(0, len(commands), 20):
            submitted.extend((c, client.submit(c)) for c in commands[i:i + 20])
            if crashes_done.is_set():
                with_rest += 1
                if with_rest > 50:
                    return
            time.sleep(0.1)

    options = {"session_timeout_s": 6.0, "stall_timeout_s": 10.0}
    points = list(CRASH_POINTS)
    worker = start_worker("c0", crash_at=f"{points[0]}:{rng.randint(2, 6)}", **options)
    with LedgerClient(s) as client:
        submitter = threading.Thread(target=submit, name="crash-submitter", daemon=True)
        submitter.start()
        killed = []
        deadline = time.monotonic() + 600
        while len(killed) < len(points):
            assert time.monotonic() < deadline, f"crashed at {killed} only"
            assert submitter.is_alive(), "ran out of commands before every crash point"
            if worker.proc.poll() is None:
                time.sleep(0.2)
                continue
            point = points[len(killed)]
            assert worker.proc.returncode == -signal.SIGKILL, worker.log_tail()
            assert f"killing the worker at {point}" in worker.log_path.read_text()
            killed.append(point)
            crash_at = (f"{points[len(killed)]}:{rng.randint(2, 6)}"
                        if len(killed) < len(points) else None)
            worker = start_worker(f"c{len(killed)}", ready=False, crash_at=crash_at,
                                  data_dir=worker.settings.data_dir, **options)
        crashes_done.set()
        submitter.join(120)
        assert not submitter.is_alive()
        told: dict[str, Outcome] = {}
        for c, fut in submitted:
            told[c.command_id] = fut.result(timeout=300)  # type: ignore[attr-defined]

    assert killed == points
    report = check_ledger(s, [c for c, _ in submitted], Supervisor(start_worker, worker))
    assert report.events > len(submitted) // 2
    seen, _ = outcomes_by_command(s)
    for command_id, outcome in told.items():
        records = {encode(e) for e in outcome.events} if outcome.accepted else \
            {encode(outcome.rejection)}
        assert records == seen[command_id], command_id
    print(f"crash points met: {killed}; {len(told)} outcomes told, each the log's")
