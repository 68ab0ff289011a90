"""/health/ready is false while the worker restores its table, and true once it decides."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from schemas.models import OpenAccount

pytestmark = pytest.mark.kafka


def test_not_ready_during_recovery_then_ready(ledger_settings, start_worker, client):
    s = ledger_settings
    # A changelog long enough that restoring it takes a while (keys nothing reads).
    producer = Producer(s.producer_config(**{"linger.ms": 20}))
    for i in range(60_000):
        while True:
            try:
                producer.produce(s.changelog_topic, b"v" * 32, b"zfiller-%d" % i,
                                 partition=i % s.partitions)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0

    worker = start_worker(ready=False)
    seen: list[tuple[int, bool]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            status, doc = worker.get("/health/ready", timeout_s=2)
        except OSError:
            continue  # the web server is not up yet
        seen.append((status, bool(doc.get("in_recovery"))))
        if status == 200:
            break
        time.sleep(0.05)
    assert (503, True) in seen, seen[:10]  # answered "not ready" while recovering
    assert seen[-1][0] == 200
    assert live(worker) == 200
    outcome = client.submit(OpenAccount(command_id="o", account_id="after-recovery",
                                        actor="t", issued_at=int(time.time() * 1000),
                                        currency="USD")).result(timeout=60)
    assert outcome.accepted


def live(worker) -> int:
    return worker.get("/health/live")[0]
