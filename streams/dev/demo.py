"""``ledger demo``: a broker, a worker and a short scripted day of a ledger, end to end.

Uses the broker named by ``LEDGER_BOOTSTRAP_SERVERS`` if set, otherwise starts a
local one; starts a worker process; submits the scenario through the Python client;
prints every outcome, the balances (from the worker's HTTP API) and the events
(from the events topic); stops what it started. With ``serve`` it leaves the worker
and its page running (on LEDGER_WEB_PORT when that port is free) until Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from producers.client import LedgerClient
from schemas import models as m
from schemas.codec import CODEC
from schemas.money import format_amount, parse_amount
from streams.dev.kafka_local import broker_for_job, free_port, port_is_free
from streams.dev.procs import WorkerProcess
from streams.ops.topics import ensure_topics
from streams.readmodels.eventlog import read_all
from streams.settings import Settings


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def scenario(now: int) -> list[m.CommandBase]:
    """A short day: accounts, money in and out, a transfer, a refused one, a hold."""
    t = iter(range(now, now + 10_000))

    def c(cls: type[m.CommandBase], cid: str, account: str, **kw: Any) -> m.CommandBase:
        return cls(command_id=cid, account_id=account, actor="demo", issued_at=next(t), **kw)

    def usd(text: str) -> int:
        return parse_amount(text)[0]
    return [
        c(m.OpenAccount, "open-alice", "alice", currency="USD", overdraft_limit_minor=usd(
            "50.00 USD")),
        c(m.OpenAccount, "open-bob", "bob", currency="USD"),
        c(m.OpenAccount, "open-chen", "chen", currency="EUR"),
        c(m.Deposit, "dep-1", "alice", amount_minor=usd("120.00 USD"), currency="USD"),
        c(m.Deposit, "dep-2", "bob", amount_minor=usd("15.50 USD"), currency="USD"),
        c(m.Withdraw, "wd-1", "alice", amount_minor=usd("20.00 USD"), currency="USD"),
        c(m.Withdraw, "wd-2", "bob", amount_minor=usd("100.00 USD"), currency="USD"),
        c(m.Transfer, "tr-1", "alice", to_account_id="bob", amount_minor=usd("30.25 USD"),
          currency="USD"),
        c(m.Transfer, "tr-2", "alice", to_account_id="chen", amount_minor=usd("10.00 USD"),
          currency="USD"),
        c(m.PlaceHold, "hold-1", "bob", hold_id="h-1", amount_minor=usd("12.00 USD"),
          currency="USD", expires_at=now + 3_600_000),
        c(m.CaptureHold, "cap-1", "bob", hold_id="h-1", amount_minor=usd("7.00 USD")),
        c(m.Withdraw, "wd-3", "alice", amount_minor=usd("150.00 USD"), currency="USD"),
        c(m.Deposit, "dep-1", "alice", amount_minor=usd("120.00 USD"), currency="USD"),
        c(m.CloseAccount, "close-bob", "bob"),
    ]


def describe(outcome: Any) -> str:
    if not outcome.accepted:
        return f"rejected  {outcome.reason}: {outcome.rejection.detail}"
    e = outcome.events[0]
    return f"{e.type:<16} {e.account_id:<6} v{e.version:<3} balance " \
           f"{format_amount(e.balance_after_minor, e.currency)}"


def run_demo(json_out: bool = False, serve: bool = False) -> int:
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ledger-demo-")))
        bootstrap, _ = broker_for_job(stack, work / "kafka", step)
        run = f"demo-{uuid.uuid4().hex[:6]}"
        port = Settings().web_port
        s = Settings(bootstrap_servers=bootstrap).isolated(
            run, data_dir=work / "worker",
            web_port=port if serve and port_is_free(port) else free_port())
        step(f"broker {bootstrap}; creating topics {run}.*")
        ensure_topics(s)
        step("starting a worker")
        worker = WorkerProcess(s, work / "worker.log")
        stack.callback(worker.stop)
        worker.wait_ready()
        step(f"worker ready at {worker.url}; submitting the scenario")
        client = stack.enter_context(LedgerClient(s))
        results = []
        for cmd in scenario(int(time.time() * 1000)):
            fut = client.submit(cmd)
            outcome = fut.result(timeout=60)
            line = f"  {cmd.type:<12} {cmd.command_id:<10} -> {describe(outcome)}"
            if hasattr(fut, "settlement") and outcome.accepted:
                final = fut.settlement.result(timeout=60)
                e = final.events[0]
                how = e.payload.reason if e.type == "TransferReversed" else "credited"
                line += f"\n  {'':<23} -> settled: {e.type} on {e.account_id} ({how})"
            print(line, flush=True)
            results.append({"command_id": cmd.command_id, "type": cmd.type,
                            "accepted": outcome.accepted, "reason": outcome.reason})
        step("balances (GET /accounts/{id} on the worker)")
        balances = {}
        for account in ("alice", "bob", "chen"):
            _, doc = worker.get(f"/accounts/{account}")
            balances[account] = doc
            print(f"  {account:<6} balance {doc['balance']:>12}  available "
                  f"{doc['available']:>12}  v{doc['version']}  {doc['status']}")
        step(f"events on {s.events_topic}")
        # A consumer keeps the first record of each (account, version): the retried
        # dep-1 was answered by sending its original event again.
        unique: dict[tuple[str, int], m.LedgerEvent] = {}
        records = 0
        for r in read_all(s, s.events_topic):
            records += 1
            e = m.LedgerEvent.from_avro(CODEC.decode(r.value() or b"")[1])
            unique.setdefault((e.account_id, e.version), e)
        events = [unique[k] for k in sorted(unique)]
        print(f"  {records} records, {len(events)} distinct (account, version); "
              f"{records - len(events)} duplicate(s) from retried commands dropped")
        for e in events:
            print(f"  {e.account_id:<6} v{e.version:<3} {e.type:<16} balance after "
                  f"{format_amount(e.balance_after_minor, e.currency):>12}  "
                  f"by {e.actor} ({e.command_id})")
        if json_out:
            print(json.dumps({"outcomes": results, "balances": balances,
                              "events": len(events)}))
        if serve:
            serve_until_interrupted(worker)
        step("done; stopping the worker and the broker")
    return 0


def serve_until_interrupted(worker: WorkerProcess) -> None:
    """Keep the worker and its page up until Ctrl-C (or SIGTERM), or until it exits."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    # Ctrl-C too, even when started with SIGINT ignored (from a script's background
    # job, or nohup): Python then leaves it ignored, and the page would stay up for ever
    signal.signal(signal.SIGINT, interrupt)
    step(f"the page: {worker.url}/ (accounts alice, bob, chen); Ctrl-C stops the worker "
         "and the broker")
    try:
        while worker.proc.poll() is None:
            time.sleep(0.5)
        step(f"the worker exited ({worker.proc.returncode}); last lines:\n"
             f"{worker.log_tail(5)}")
    except KeyboardInterrupt:
        pass
