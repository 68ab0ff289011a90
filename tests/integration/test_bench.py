"""``ledger bench`` end to end on a small run: every figure printed, its own check green."""

from __future__ import annotations

import json
import math

import pytest

from streams.dev.bench import KEYS, run_bench

pytestmark = pytest.mark.kafka


def test_a_small_bench_run_reports_every_key_and_checks_itself(kafka_bootstrap, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("LEDGER_BOOTSTRAP_SERVERS", kafka_bootstrap)  # the session's broker
    # the workload opens all 10,000 accounts first, so this is 10,000 opens + 2,000 more
    assert run_bench(commands=12_000, json_out=True, workers=2) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert list(doc) == list(KEYS)
    assert doc["check_ok"] is True
    assert (doc["commands"], doc["mix"], doc["workers"]) == (12_000, "full", 2)
    for phase in ("backlog_cores", "latency_cores", "e2e_cores"):  # no broker: the session's
        assert set(doc[phase]) == {"workers", "bench"} and min(doc[phase].values()) > 0, doc
    figures = {k: v for k, v in doc.items()
               if k not in ("commands", "mix", "workers", "check_ok", "backlog_cores",
                            "latency_cores", "e2e_cores", "core")}
    assert doc["core"] in ("compiled", "interpreted")
    bad = {k: v for k, v in figures.items()
           if not isinstance(v, int | float) or math.isnan(v) or v <= 0}
    assert not bad, bad
    assert doc["latency_ms_p50"] <= doc["latency_ms_p99"] <= doc["latency_ms_p999"]
    assert doc["worker_rss_mb_half"] <= doc["worker_rss_mb_peak"]
    # progress is shown while it runs
    assert any("backlog:" in line and "outcomes" in line for line in out)
