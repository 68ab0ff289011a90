"""Deciding alone: the worker's per-command Python, without Kafka, Faust or RocksDB.

    python bench/decide.py [--commands 30000] [--mix full|simple] [--per-record 500]
                           [--profile]

Runs ``BatchProcessor`` (what the worker runs per partition and batch: decode the
command records, validate, decide, encode events, outcomes and state) over the
``ledger bench`` workload, 500 commands per record as the client coalesces them
(``--per-record 1``: one per record, as single submits make),
with a dict as the store. Prints the best of ``--repeat`` runs in µs per command;
``--profile`` prints the functions that take the time (cProfile). This is the part
of the hot path that a faster machine, or less Python per command, speeds up; the
full pipeline is measured by ``ledger bench``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections import defaultdict

from schemas.models import encode_batch
from streams.bench import workload
from streams.processor import BatchProcessor, LegSigner, partition_for

PARTITIONS = 12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commands", type=int, default=30_000)
    ap.add_argument("--mix", choices=("full", "simple"), default="full")
    ap.add_argument("--per-record", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    by_partition = defaultdict(list)
    for c in workload(args.mix, args.commands, random.Random(1), "a"):
        by_partition[partition_for(c.account_id, PARTITIONS)].append(c)
    per = args.per_record
    records = {p: [encode_batch(cs[i:i + per]) for i in range(0, len(cs), per)]
               for p, cs in by_partition.items()}
    signer = LegSigner(b"bench-secret")

    def run() -> int:
        decided = 0
        for p, recs in records.items():
            store: dict[bytes, bytes] = {}
            for offset, record in enumerate(recs):
                # nothing expires within a run: the retention index is never scanned
                bp = BatchProcessor(store.get, lambda _start: (), p, PARTITIONS, signer,
                                    window_ms=86_400_000)
                bp.command_record(None, record, "ledger.commands", offset, 1)
                store.update({k: v for k, v in bp.finish().items() if v is not None})
                decided += bp.stats.commands
        return decided

    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(run)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    best = float("inf")
    for i in range(args.repeat):
        start = time.perf_counter()
        n = run()
        best = min(best, time.perf_counter() - start)
        print(f"[decide] run {i + 1}/{args.repeat}: {(time.perf_counter() - start) / n * 1e6:.1f}"
              " µs/command", flush=True)
    print(f"deciding alone, mix {args.mix}, {args.per_record} per record: "
          f"{best / n * 1e6:.1f} µs/command "
          f"({n / best:,.0f} commands/s on one core), best of {args.repeat}")


if __name__ == "__main__":
    main()
