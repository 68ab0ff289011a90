"""``ledger bench``'s workloads are commands a client would send."""

from __future__ import annotations

import random

import pytest

from streams.dev.bench import workload
from streams.domain import check_command


@pytest.mark.parametrize("mix", ["full", "simple"])
def test_every_command_of_a_bench_workload_passes_the_clients_checks(mix):
    """A transaction's postings once named the same account on both sides now and then
    (the client refused it, and the benchmark stopped)."""
    commands = workload(mix, 300_000, random.Random(1), "a")
    for c in commands:
        check_command(c)  # raises Refused
    kinds = {type(c).__name__ for c in commands}
    assert ("Transaction" in kinds) == (mix == "full")
