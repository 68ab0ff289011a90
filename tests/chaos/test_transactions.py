"""Transactions across every partition while the worker is killed with kill -9 three times:
each ends committed or rejected as a whole, and money is conserved."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from schemas.codec import CODEC
from schemas.models import (
    CloseAccount,
    CommandBase,
    Deposit,
    OpenAccount,
    Posting,
    Reverse,
    Transaction,
    Transfer,
)
from streams.readmodels.eventlog import read_all
from streams.settings import Settings
from tests.chaos.test_kill9 import Supervisor, check_ledger, report_run, seed, submit_paced

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]

SEED_MINOR = 50_000
# Each kind of transaction bound to fail, and the reason it must end with.
BOUND_TO_FAIL = {"missing": "account_not_found", "closed": "account_closed",
                 "currency": "currency_mismatch", "funds": "insufficient_funds"}


def workload(rng: random.Random, n: int) -> tuple[list[CommandBase], dict[str, str], list[str]]:
    """200 accounts (180 funded USD, 10 EUR, 10 closed) and ``n`` transactions of 2-5
    postings, a fifth of them bound to fail one way each, with ``n // 10`` transfers
    among them (a tenth to a closed or missing account: refunded); a few reversals of
    earlier transactions and transfers. Returns the commands, the reason each doomed
    transaction (or reversal of a refunded transfer) must end with, and the funded
    accounts."""
    t = iter(range(int(time.time() * 1000), 10**14))
    usd = [f"acct-{i}" for i in range(180)]
    eur = [f"euro-{i}" for i in range(10)]
    closed = [f"shut-{i}" for i in range(10)]
    out: list[CommandBase] = []

    def cmd(cls: type[CommandBase], account: str, cid: str, **kw: object) -> None:
        out.append(cls(command_id=cid, account_id=account, actor="chaos", issued_at=next(t),
                       **kw))

    for a in usd + eur + closed:
        cmd(OpenAccount, a, f"open-{a}", currency="EUR" if a in eur else "USD")
    for a in usd:
        cmd(Deposit, a, f"seed-{a}", amount_minor=SEED_MINOR, currency="USD")
    for a in closed:
        cmd(CloseAccount, a, f"close-{a}")
    doomed: dict[str, str] = {}
    for i in range(n):
        tid = f"t{i}"
        postings = []
        for _ in range(rng.randint(2, 5)):
            src, dst = rng.sample(usd, 2)
            postings.append(Posting(from_account_id=src, to_account_id=dst,
                                    amount_minor=rng.randint(1, 300), currency="USD"))
        fault = rng.choice([*BOUND_TO_FAIL, *[None] * 16])
        if fault is not None:
            k = rng.randrange(len(postings))
            p = postings[k]
            if fault == "missing":
                p = p.model_copy(update={"to_account_id": f"ghost-{i}"})
            elif fault == "closed":
                p = p.model_copy(update={"to_account_id": rng.choice(closed)})
            elif fault == "currency":
                p = p.model_copy(update={"to_account_id": rng.choice(eur)})
            else:  # more than there is in the whole ledger
                p = p.model_copy(update={"amount_minor": SEED_MINOR * len(usd) + 1})
            postings[k] = p
            doomed[tid] = BOUND_TO_FAIL[fault]
        cmd(Transaction, rng.choice(usd), tid, postings=postings)
        if i % 10 == 0:
            src, dst = rng.sample(usd, 2)
            if i % 100 == 0:
                dst = rng.choice([*closed, f"ghost-p{i}"])
                doomed[f"rp{i}"] = "transfer_refunded"
            cmd(Transfer, src, f"p{i}", to_account_id=dst, amount_minor=rng.randint(1, 300),
                currency="USD")
    coordinators = {c.command_id: c.account_id for c in out
                    if isinstance(c, Transaction | Transfer)}
    for i in rng.sample(range(n), n // 20):
        cmd(Reverse, coordinators[f"t{i}"], f"r{i}", transaction_id=f"t{i}")
    for i in range(0, n, 10):
        if i % 100 == 0 or rng.random() < 0.2:
            cmd(Reverse, coordinators[f"p{i}"], f"rp{i}", transaction_id=f"p{i}")
    return out, doomed, usd


def endings(s: Settings) -> dict[str, tuple[str, str]]:
    """Each transaction's ending at its coordinator: (event type, reason)."""
    out: dict[str, tuple[str, str]] = {}
    for m in read_all(s, s.events_topic):
        _, d = CODEC.decode(m.value())
        name, body = d["payload"]
        if name in ("ledger.TransactionCommitted", "ledger.TransactionRejected"):
            out[body["transaction_id"]] = (name.rsplit(".", 1)[1], body.get("reason", ""))
    return out


def test_transactions_across_partitions_survive_kill9_three_times(ledger_settings, start_worker):
    rng = random.Random(seed(22))
    s = ledger_settings.model_copy(update={"session_timeout_s": 6.0})
    commands, doomed, funded = workload(rng, 2_000)
    done = threading.Event()
    producer = submit_paced(s, commands, seconds=30, done=done)
    worker = start_worker("w0", session_timeout_s=6.0, stall_timeout_s=10.0)
    for kill in range(3):
        time.sleep(rng.uniform(2.0, 6.0))
        assert worker.proc.poll() is None, f"worker died by itself:\n{worker.log_tail()}"
        worker.kill()
        worker = start_worker(f"w{kill + 1}", session_timeout_s=6.0, stall_timeout_s=10.0,
                              data_dir=worker.settings.data_dir)
    producer.join(180)
    assert done.is_set(), "the producer did not finish"

    report = check_ledger(s, commands, Supervisor(start_worker, worker))
    started = sum(isinstance(c, Transaction | Reverse) for c in commands)
    ends = endings(s)
    print(f"transactions: {report.transactions_committed} committed, "
          f"{report.transactions_rejected} rejected, {report.reversals} reversals; "
          f"rejected for: {Counter(r for kind, r in ends.values() if r)}")
    assert report.transactions_in_flight == 0
    assert report.transactions_committed + report.transactions_rejected == len(ends)
    assert len(ends) <= started and report.transactions_committed > 500
    refused = {d["command_id"]: d["reason"] for m in read_all(s, s.rejections_topic)
               for d in [CODEC.decode(m.value())[1]]}
    for tid, reason in doomed.items():
        if reason == "transfer_refunded" and tid not in ends:  # the refund back before it:
            assert refused.get(tid) == reason, tid                 # the source refused it
            continue
        assert ends[tid] == ("TransactionRejected", reason), tid
    assert sum(report.states[a].balance_minor for a in report.states) == \
        SEED_MINOR * len(funded)
    assert all(not state.holds for state in report.states.values())
    report_run("transactions, kill -9 three times", len(commands), 0, report.duplicates,
               worker_kills=3)
