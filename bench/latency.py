"""Latency of single submits against the arrival rate, and who has the cores meanwhile.

    python bench/latency.py [--rates 50,200,500,1000] [--seconds 10] [--warmup 60]
                            [--backlog 0]

Starts a broker (or uses ``LEDGER_BOOTSTRAP_SERVERS``) and one worker, opens 10,000
accounts (then, with ``--backlog N``, has the worker decide N commands of the full mix
first, as ``ledger bench`` measures latency right after its backlog), then for each
rate submits single deposits open loop (fixed arrival times, as ``ledger bench`` does
at 20% of its backlog rate) and prints submit -> outcome
p50/p99 with the cores the broker, the worker and this process used meanwhile, and
the worker's steps meanwhile (how many, their commands and flush time each). Where
p99 leaves the flush times behind and climbs with the run, the queue is growing:
that rate is past what this machine sustains for one-command records. A warm-up at
200/s comes first: at 50 submits/s a fresh broker used 0.9 of a core in its first
10 s, most of it in the JVM's compiler threads, and 0.17-0.19 after about 80 s;
latency measured meanwhile is the broker's warm-up, not the ledger's.
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
    ap.add_argument("--rates", default="50,200,500,1000",
                    help="submits per second, comma-separated, run in this order")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds of submits at 200/s first, not reported (a fresh broker "
                         "spends its first minute or so compiling)")
    ap.add_argument("--backlog", type=int, default=0,
                    help="commands of the full mix (transfers, holds, ...) for the worker "
                         "to decide after the opens, before the warm-up")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    with ExitStack() as stack:
        s, broker_pid, work = bench.scratch_ledger(stack, "latency")
        mix = "full" if args.backlog else "simple"  # both open every account first
        cmds = bench.workload(mix, bench.ACCOUNTS + args.backlog, random.Random(1), "a")
        bench.say(f"opening {bench.ACCOUNTS:,} accounts"
                  + (f", then a backlog of {args.backlog:,} commands" if args.backlog else ""))
        bench.submit_all(s, cmds)
        worker = WorkerProcess(s, work / "worker.log")
        stack.callback(worker.stop)
        worker.wait_ready()
        bench.wait_quiet([worker], 300)
        cores = bench.Cores({"broker": [broker_pid], "worker": [worker.proc.pid],
                             "bench": [os.getpid()]})
        accounts = [c.account_id for c in cmds[:bench.ACCOUNTS]]
        if args.warmup:
            bench.say(f"warming up: single submits at 200/s for {args.warmup:.0f} s")
            bench.latency(s, accounts, 200, args.warmup)
            bench.wait_quiet([worker], 300)
        for rate in rates:
            bench.say(f"single submits at {rate:,.0f}/s for {args.seconds:.0f} s")
            before = bench.worker_steps(worker.url)
            cores.start()
            lat = bench.latency(s, accounts, rate, args.seconds)
            used = cores.stop()
            after = bench.worker_steps(worker.url)
            n, flush_s, commands = (b - a for a, b in zip(before, after, strict=True))
            print(f"rate {rate:>7,.0f}/s  p50 {bench.percentile(lat, .5):9.1f} ms  "
                  f"p99 {bench.percentile(lat, .99):9.1f} ms  cores: {bench.format_cores(used)}"
                  f"  steps: {n:,.0f}, {commands / max(n, 1):,.0f} commands and "
                  f"{flush_s / max(n, 1) * 1000:,.1f} ms of flushes each", flush=True)
            bench.wait_quiet([worker], 300)


if __name__ == "__main__":
    main()
