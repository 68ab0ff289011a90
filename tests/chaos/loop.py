"""Run the chaos tests (crash points, kill -9, SIGTERM, the 3-broker cluster) N times,
each with another seed, and print the tally.

    .venv/bin/python tests/chaos/loop.py [--runs 10] [--first-seed 1] [-k EXPR]

Each run is one pytest process over ``tests/chaos`` with ``LEDGER_CHAOS_SEED`` set; a
failed run keeps its output in ``chaos-loop-<seed>.log`` in the current directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("-k", default="", help="pytest -k expression (default: every chaos test)")
    args = ap.parse_args()
    tests = Path(__file__).resolve().parent
    green = 0
    for seed in range(args.first_seed, args.first_seed + args.runs):
        started = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", str(tests)]
        if args.k:
            cmd += ["-k", args.k]
        result = subprocess.run(cmd, env={**os.environ, "LEDGER_CHAOS_SEED": str(seed)},
                                capture_output=True, text=True, check=False)
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        ok = result.returncode == 0
        green += ok
        if not ok:
            Path(f"chaos-loop-{seed}.log").write_text(result.stdout + result.stderr)
        print(f"seed {seed}: {'green' if ok else 'RED'} in {time.monotonic() - started:.0f} s"
              f" ({last})", flush=True)
    print(f"{green} of {args.runs} green")
    return 0 if green == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
