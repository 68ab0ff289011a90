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

from streams.dev.bench import decide_us, deciding, workload
from streams.worker.processor import core_build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commands", type=int, default=30_000)
    ap.add_argument("--mix", choices=("full", "simple"), default="full")
    ap.add_argument("--per-record", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    run = deciding(workload(args.mix, args.commands, random.Random(1), "a"), args.per_record)
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(run)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    us = decide_us(run, args.repeat)
    print(f"deciding alone, mix {args.mix}, {args.per_record} per record: {us:.1f} µs/command "
          f"({1e6 / us:,.0f} commands/s on one core), best of {args.repeat}, {core_build()} core")


if __name__ == "__main__":
    main()
