"""/metrics during a real run: counters match what was submitted, lag returns to zero."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.models import Deposit, OpenAccount, Withdraw

pytestmark = pytest.mark.kafka


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


def test_metrics_count_what_was_submitted_and_lag_drains(ledger_settings, start_worker, client):
    worker = start_worker()
    now = int(time.time() * 1000)
    commands = [OpenAccount(command_id=f"o{i}", account_id=f"m{i}", actor="t", issued_at=now,
                            currency="USD") for i in range(30)]
    commands += [Deposit(command_id=f"d{i}", account_id=f"m{i % 30}", actor="t",
                         issued_at=now, amount_minor=100, currency="USD") for i in range(150)]
    commands += [Withdraw(command_id=f"w{i}", account_id=f"m{i % 30}", actor="t",
                          issued_at=now, amount_minor=10_000, currency="USD")
                 for i in range(20)]  # all refused: insufficient funds
    futures = [client.submit(c) for c in commands]
    assert sum(not f.result(timeout=60).accepted for f in futures) == 20

    deadline = time.monotonic() + 30
    while True:
        samples = scrape(worker.url)
        lag = [v for (n, _), v in samples.items() if n == "ledger_consumer_lag"]
        if lag and not any(lag) and total(samples, "ledger_commands_total") == 200:
            break
        assert time.monotonic() < deadline, f"lag {lag}"
        time.sleep(0.5)
    assert total(samples, "ledger_commands_total", type="OpenAccount") == 30
    assert total(samples, "ledger_commands_total", type="Deposit") == 150
    assert total(samples, "ledger_rejections_total", reason="insufficient_funds") == 20
    assert total(samples, "ledger_events_total") == 180
    assert total(samples, "ledger_dead_letters_total") == 0
    assert ("ledger_recovery_records_remaining", ()) in samples
    assert total(samples, "ledger_recovery_records_remaining") == 0
    assert total(samples, "ledger_command_latency_seconds_count") == 200
    assert total(samples, "ledger_batch_commands_sum") == 200
    assert len(lag) == 2 * ledger_settings.partitions  # commands and transfers, all at 0
