"""Run the chaos tests (crash points, kill -9, SIGTERM, the 3-broker cluster) N times,
each with another seed, and print the tally.

    .venv/bin/python tests/chaos/loop.py [--runs 10] [--first-seed 1] [-k EXPR]

Each run is one pytest process over ``tests/chaos`` with ``LEDGER_CHAOS_SEED`` set; a
failed run keeps its output in ``chaos-loop-<seed>.log`` in the current directory. At
the end, a table per test of what its green runs checked (each test writes a line to
``LEDGER_CHAOS_REPORT`` once all its checks have passed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("-k", default="", help="pytest -k expression (default: every chaos test)")
    args = ap.parse_args()
    tests = Path(__file__).resolve().parent
    report = Path(tempfile.mkdtemp(prefix="chaos-loop-")) / "report.jsonl"
    report.touch()
    green = 0
    for seed in range(args.first_seed, args.first_seed + args.runs):
        started = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", str(tests)]
        if args.k:
            cmd += ["-k", args.k]
        result = subprocess.run(cmd, env={**os.environ, "LEDGER_CHAOS_SEED": str(seed),
                                          "LEDGER_CHAOS_REPORT": str(report)},
                                capture_output=True, text=True, check=False)
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        ok = result.returncode == 0
        green += ok
        if not ok:
            Path(f"chaos-loop-{seed}.log").write_text(result.stdout + result.stderr)
        print(f"seed {seed}: {'green' if ok else 'RED'} in {time.monotonic() - started:.0f} s"
              f" ({last})", flush=True)
    print(f"{green} of {args.runs} green")
    print(tally([json.loads(line) for line in report.read_text().splitlines()]))
    return 0 if green == args.runs else 1


def tally(rows: list[dict[str, object]]) -> str:
    """What the passing runs checked, per test (a Markdown table)."""
    out = ["| test | seeds | commands | outcomes told and checked | lost | doubled "
           "| duplicate event records | worker kills | broker kills |",
           "|---|---|---|---|---|---|---|---|---|"]
    for test in dict.fromkeys(str(r["test"]) for r in rows):
        mine = [r for r in rows if r["test"] == test]

        def total(key: str, rows: list[dict[str, object]] = mine) -> int:
            return sum(int(r.get(key, 0)) for r in rows)  # type: ignore[call-overload]
        seeds = ",".join(str(r["seed"]) for r in mine)
        out.append(f"| {test} | {seeds} | {total('commands'):,} | "
                   f"{total('outcomes_told'):,} | {total('lost')} | {total('doubled')} | "
                   f"{total('duplicates'):,} | {total('worker_kills')} | "
                   f"{total('broker_kills') + total('broker_restarts')} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
