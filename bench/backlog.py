"""The backlog alone: one worker over a pre-produced backlog, and where its time went.

    python bench/backlog.py [--commands 100000] [--mix full|simple]

Starts a broker (or uses ``LEDGER_BOOTSTRAP_SERVERS``), produces ``--commands`` of the
``ledger bench`` workload, starts one worker on them and prints the backlog rate (as
``ledger bench`` measures it: from the first outcome to the last), the cores the
broker, the worker and this script used meanwhile, the worker's seconds deciding and
in flushes (its ``/metrics``), and ``bench/decide.py``'s measure of this machine's
core just before. A minute or two, against ``ledger bench``'s eight: for comparing
two versions of the hot path, run old and new in turn, more than once.
"""

from __future__ import annotations

import argparse
import os
import random
from contextlib import ExitStack

from streams.dev import bench
from streams.dev.procs import WorkerProcess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commands", type=int, default=100_000)
    ap.add_argument("--mix", choices=("full", "simple"), default="full")
    args = ap.parse_args()
    with ExitStack() as stack:
        s, broker_pid, work = bench.scratch_ledger(stack, "backlog")
        cmds = bench.workload(args.mix, args.commands, random.Random(1), "a")
        decide_us = bench.decide_us(bench.deciding(cmds[:20_000], 500), 3)
        bench.say(f"producing {len(cmds):,} commands, mix {args.mix}")
        bench.submit_all(s, cmds)
        watch = bench.OutcomeWatch(s)
        worker = WorkerProcess(s, work / "worker.log")
        stack.callback(worker.stop)
        cores = bench.Cores({"broker": [broker_pid], "worker": [worker.proc.pid],
                             "bench": [os.getpid()]})
        cores.start()
        worker.wait_ready()
        watch.wait(len(cmds), 1800, "backlog", [worker])
        used = cores.stop()
        assert watch.first_ts is not None
        rate = len(cmds) / max((watch.last_ts - watch.first_ts) / 1000, 1e-3)
        bench.wait_quiet([worker], 120)  # outcomes are out before their batch's state is
        metrics = bench.worker_metrics(worker.url)
        watch.close()
    print(f"backlog {rate:,.0f} commands/s; cores: {bench.format_cores(used)}; "
          f"deciding {metrics['ledger_decide_seconds_sum']:.1f} s and flushing "
          f"{metrics['ledger_flush_seconds_sum']:.1f} s in "
          f"{metrics['ledger_decide_seconds_count']:.0f} steps; deciding alone "
          f"{decide_us:.1f} µs/command", flush=True)


if __name__ == "__main__":
    main()
