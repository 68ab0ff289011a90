"""``ledger status`` against a live worker: owners, lag that drains, rates."""

from __future__ import annotations

import json
import time

import pytest

from schemas.models import Deposit, OpenAccount
from streams.ops.status import status
from tests.integration.test_verify import run_cli

pytestmark = pytest.mark.kafka


def test_status_shows_the_owner_and_lag_draining_to_zero(ledger_settings, start_worker, client):
    s = ledger_settings
    worker = start_worker("solo")
    now = int(time.time() * 1000)
    commands = []
    for i in range(40):
        commands += [OpenAccount(command_id=f"o{i}", account_id=f"st-{i}", actor="t",
                                 issued_at=now, currency="USD"),
                     Deposit(command_id=f"d{i}", account_id=f"st-{i}", actor="t",
                             issued_at=now + 1, amount_minor=100, currency="USD")]
    futures = [client.submit(c) for c in commands]
    assert all(f.result(timeout=60).accepted for f in futures)

    deadline = time.monotonic() + 30
    while True:  # the worker commits about once a second
        doc = status(s, sample_s=0.5)
        if doc["lag_total"] == 0 or time.monotonic() > deadline:
            break
    assert doc["lag_total"] == 0, doc["partitions"]
    assert doc["state"] == "stable"
    assert len(doc["workers"]) == 1
    rows = doc["partitions"]
    assert len(rows) == 2 * s.partitions
    assert {r["owner"] for r in rows} == set(doc["workers"])
    commands_rows = [r for r in rows if r["topic"] == s.commands_topic]
    assert sum(r["end"] for r in commands_rows) >= 1  # records arrived
    assert all(r["committed"] == r["end"] for r in commands_rows if r["end"])

    out = run_cli(s, "status", "--json", "--sample", "0.2")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["workers"] == doc["workers"]
    human = run_cli(s, "status", "--sample", "0.2")
    assert f"group {s.app_id} (stable): 1 worker(s)" in human.stdout
    worker.stop()
