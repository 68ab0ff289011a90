"""SIGTERM mid-stream: the worker finishes its batch, exits 0, and nothing is lost or doubled."""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.chaos.test_kill9 import (
    Supervisor,
    check_ledger,
    report_run,
    seed,
    submit_paced,
    workload,
)

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]


def test_sigterm_restart_loses_and_doubles_nothing(ledger_settings, start_worker):
    rng = random.Random(seed(11))
    s = ledger_settings.model_copy(update={"session_timeout_s": 6.0})
    commands = workload(rng, [f"acct-{i}" for i in range(100)], 5_000)
    done = threading.Event()
    producer = submit_paced(s, commands, seconds=12, done=done)
    worker = start_worker("first", session_timeout_s=6.0, stall_timeout_s=10.0)
    for i in range(2):
        time.sleep(rng.uniform(1.0, 3.0))
        started = time.monotonic()
        assert worker.stop(timeout_s=60) == 0, worker.log_tail()
        assert time.monotonic() - started < 30
        worker = start_worker(f"again{i}", session_timeout_s=6.0, stall_timeout_s=10.0,
                              data_dir=worker.settings.data_dir)
    producer.join(120)
    assert done.is_set()
    report = check_ledger(s, commands, Supervisor(start_worker, worker))
    report_run("SIGTERM restarts", len(commands), 0, report.duplicates)
