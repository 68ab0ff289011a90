"""The batch histogram says what prometheus_client's own Histogram says, value by value."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streams.worker.metrics import BatchHistogram

BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1_000)


def test_batch_histogram_matches_prometheus_histogram() -> None:
    rng = random.Random(7)
    values = [rng.choice([0, 5, 10, 1_000, 1_001]) for _ in range(50)]
    values += [rng.randrange(0, 3_000) for _ in range(500)]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("latency_seconds", "x", BOUNDS_MS, ours)
    single = Histogram("latency_seconds", "x", registry=theirs,
                       buckets=[b / 1000 for b in BOUNDS_MS])
    for i in range(0, len(values), 100):
        batch.observe_many(values[i:i + 100])
    for v in values:
        single.observe(v / 1000)

    def samples(registry: CollectorRegistry) -> dict[str, float]:
        out = {}
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("latency_seconds_") and "_created" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    got, want = samples(ours), samples(theirs)
    assert got.pop("latency_seconds_sum") == sum(values) / 1000
    assert abs(want.pop("latency_seconds_sum") - sum(values) / 1000) < 1e-6
    assert got == want
    assert got['latency_seconds_bucket{le="0.005"}'] == sum(v <= 5 for v in values)
