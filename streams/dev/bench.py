"""``ledger bench``: how fast the ledger is on this machine, with every guarantee on.

One run measures, on the same broker:

- raw confluent-kafka produce and consume rates of as many records (this machine's
  limit in this run);
- backlog: commands/s over a pre-produced backlog, from the first outcome to the last
  (outcome record timestamps), and its ratio to the raw produce rate;
- end to end: commands/s with submitting and deciding at once, from the first
  submit to the last outcome;
- latency of single submits at 20% of the backlog rate, open loop (fixed arrival
  times), submit -> outcome seen by the client: p50/p99/p999;
- replay: events folded per second rebuilding every balance from the events topic;
- ``as-of`` and ``GET /accounts/{id}`` latency p50/p99;
- the cores used by the broker (if the bench started it), the workers and the bench
  itself over the backlog and the latency runs: who has the machine;
- the workers' peak resident memory (the largest of them), and the resident memory
  half-way through the backlog and at its end.

``--workers N`` runs N worker processes (one consumer group; each owns some of the
partitions), as one would on a machine with N cores to spare.

It ends by checking the result (``verify`` green, the worker's balances equal an
independent fold of the events), so a fast wrong answer fails. ``--json`` keys are
stable: see ``KEYS``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from prometheus_client.parser import text_string_to_metric_families

from producers.client import LedgerClient
from schemas import models as m
from schemas.codec import CODEC, HEADER_LEN
from streams.core import Reader
from streams.dev.kafka_local import broker_for_job, free_port
from streams.dev.procs import WorkerProcess
from streams.ops.topics import ensure_topics
from streams.ops.verify import verify
from streams.settings import Settings
from streams.worker.processor import core_build

KEYS = (
    "commands", "mix", "workers", "raw_produce_per_s", "raw_consume_per_s",
    "backlog_commands_per_s", "backlog_vs_raw_produce", "e2e_commands_per_s",
    "latency_rate_per_s", "latency_ms_p50",
    "latency_ms_p99", "latency_ms_p999", "replay_events_per_s", "as_of_ms_p50",
    "as_of_ms_p99", "get_ms_p50", "get_ms_p99", "worker_rss_mb_peak",
    "worker_rss_mb_half", "worker_rss_mb_end", "backlog_cores", "latency_cores", "e2e_cores",
    "check_ok",
    "decide_us_per_command", "core",
)
ACCOUNTS = 10_000
PARTITIONS: int = Settings.model_fields["partitions"].default  # of the ledger's topics


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- workloads


def workload(mix: str, n: int, rng: random.Random, prefix: str) -> list[m.CommandBase]:
    """Opens for every account first, then ``n`` commands of the mix (opens included)."""
    accounts = [f"{prefix}{i}" for i in range(ACCOUNTS)]
    t = iter(range(int(time.time() * 1000), 10**14))
    out: list[m.CommandBase] = [
        m.OpenAccount(command_id=f"o{i}", account_id=a, actor="bench", issued_at=next(t),
                      currency="USD", overdraft_limit_minor=1_000 if i % 10 == 0 else 0)
        for i, a in enumerate(accounts)]
    i = len(out)
    holds: list[tuple[str, str]] = []
    while len(out) < n:
        a = accounts[rng.randrange(ACCOUNTS)]
        cid = f"c{i}"
        i += 1
        roll = rng.random()
        if mix == "simple" or roll < 0.6:
            if rng.random() < 0.55:
                out.append(m.Deposit(command_id=cid, account_id=a, actor="bench",
                                     issued_at=next(t), amount_minor=rng.randint(100, 50_000),
                                     currency="USD"))
            else:
                out.append(m.Withdraw(command_id=cid, account_id=a, actor="bench",
                                      issued_at=next(t), amount_minor=rng.randint(100, 50_000),
                                      currency="USD"))
        elif roll < 0.85:
            b = accounts[rng.randrange(ACCOUNTS)]
            if b == a:
                b = f"{prefix}missing"  # refunded: the saga's other ending
            out.append(m.Transfer(command_id=cid, account_id=a, actor="bench",
                                  issued_at=next(t), to_account_id=b,
                                  amount_minor=rng.randint(100, 20_000), currency="USD"))
        elif roll < 0.88:  # a payment split three ways (a fee, and a partner's share)
            fee = accounts[0] if a != accounts[0] else accounts[1]
            b = c = a
            while len({a, b, c, fee}) < 4:
                b, c = (accounts[rng.randrange(ACCOUNTS)] for _ in range(2))
            amount = rng.randint(1_000, 20_000)
            out.append(m.Transaction(command_id=cid, account_id=a, actor="bench",
                                     issued_at=next(t), postings=[
                m.Posting(from_account_id=a, to_account_id=b, amount_minor=amount,
                          currency="USD"),
                m.Posting(from_account_id=a, to_account_id=fee,
                          amount_minor=amount // 50, currency="USD"),
                m.Posting(from_account_id=b, to_account_id=c, amount_minor=amount // 10,
                          currency="USD")]))
        elif roll < 0.92 or not holds:
            hold = f"h{i}"
            holds.append((a, hold))
            out.append(m.PlaceHold(command_id=cid, account_id=a, actor="bench",
                                   issued_at=next(t), hold_id=hold, currency="USD",
                                   amount_minor=rng.randint(100, 5_000),
                                   expires_at=next(t) + 3_600_000))
        elif roll < 0.97:
            a, hold = holds.pop(rng.randrange(len(holds)))
            if rng.random() < 0.5:
                out.append(m.CaptureHold(command_id=cid, account_id=a, actor="bench",
                                         issued_at=next(t), hold_id=hold))
            else:
                out.append(m.ReleaseHold(command_id=cid, account_id=a, actor="bench",
                                         issued_at=next(t), hold_id=hold))
        else:  # invalid: unknown accounts, wrong currency
            if rng.random() < 0.5:
                out.append(m.Withdraw(command_id=cid, account_id=f"{prefix}ghost{i}",
                                      actor="bench", issued_at=next(t), amount_minor=1,
                                      currency="USD"))
            else:
                out.append(m.Deposit(command_id=cid, account_id=a, actor="bench",
                                     issued_at=next(t), amount_minor=1, currency="EUR"))
    return out


# ---------------------------------------------------------------- measurements


def deciding(commands: list[m.CommandBase], per_record: int) -> Callable[[], int]:
    """A run of ``BatchProcessor`` alone (what the worker runs per partition and batch:
    decode the command records, validate, decide, encode events, outcomes and state)
    over ``commands``, ``per_record`` to a record, a dict as the store; it returns the
    commands decided. No Kafka, Faust or RocksDB: the Python per command. Each record
    is stamped as the broker would stamp it: at its last command's ``issued_at``."""
    from streams.partitions import partition_for
    from streams.worker.processor import BatchProcessor, LegSigner

    by_partition: dict[int, list[m.CommandBase]] = {}
    for c in commands:
        by_partition.setdefault(partition_for(c.account_id, PARTITIONS), []).append(c)
    chunks = {p: [cs[i:i + per_record] for i in range(0, len(cs), per_record)]
              for p, cs in by_partition.items()}
    records = {p: [(m.encode_batch(chunk), chunk[-1].issued_at) for chunk in cs]
               for p, cs in chunks.items()}
    signer = LegSigner(b"bench-secret")

    def run() -> int:
        decided = rejected = 0
        for p, recs in records.items():
            store: dict[bytes, bytes] = {}
            for offset, (record, timestamp) in enumerate(recs):
                # nothing expires within a run: the retention index is never scanned
                bp = BatchProcessor(store.get, lambda _start: (), p, PARTITIONS, signer,
                                    window_ms=86_400_000)
                bp.command_record(None, record, "ledger.commands", offset, timestamp)
                store.update({k: v for k, v in bp.finish().items() if v is not None})
                decided += bp.stats.commands
                rejected += bp.stats.rejections
        # what is timed is deciding, not turning every command away at the door
        assert rejected * 2 < decided, f"{rejected} of {decided} commands rejected"
        return decided

    return run


def decide_us(run: Callable[[], int], repeat: int) -> float:
    """The best of ``repeat`` runs of ``deciding``, in µs per command."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        n = run()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best




def raw_rates(s: Settings, n: int) -> tuple[float, float]:
    """Produce then consume ``n`` records of ~100 bytes with confluent-kafka."""
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(s.kafka_config())
    admin.create_topics([NewTopic(topic, s.partitions, s.replication_factor)])[topic].result(30)
    producer = Producer(s.producer_config(**{"linger.ms": 5, "batch.num.messages": 10_000}))
    value = os.urandom(100)
    start = time.perf_counter()
    for i in range(n):
        while True:
            try:
                producer.produce(topic, value, str(i % ACCOUNTS).encode())
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    produce_s = time.perf_counter() - start
    consumer = Consumer({**s.kafka_config(), "group.id": f"bench-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    got, first = 0, 0.0
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        batch = consumer.consume(10_000, timeout=1)
        if batch and not first:
            first = time.perf_counter()
        got += sum(1 for msg in batch if msg.error() is None)
    consume_s = time.perf_counter() - first
    consumer.close()
    admin.delete_topics([topic])
    return n / produce_s, got / max(consume_s, 1e-9)


_EVENT_HEAD = CODEC._single_object_headers[m.LedgerEvent.avro_name]
_REJECTION_HEAD = CODEC._single_object_headers[m.Rejection.avro_name]


def outcome_ids(value: bytes) -> tuple[str, str]:
    """(command_id, causation_id) of an event or a rejection (whose cause is its
    command), read without decoding the rest: the bench's reader of outcomes shares
    the cores with what it measures, and a whole decode cost it ~10 µs a record."""
    head = value[:HEADER_LEN]
    if head == _REJECTION_HEAD:
        command_id = Reader(value, HEADER_LEN).string()
        return command_id, command_id
    if head != _EVENT_HEAD:  # another schema version
        _, d = CODEC.decode(value)
        return d["command_id"], d.get("causation_id", d["command_id"])
    r = Reader(value, HEADER_LEN)
    r.string()  # event_id
    r.string()  # account_id
    r.long()  # version
    r.string()  # currency
    r.long()  # balance_after_minor
    r.long()  # available_after_minor
    r.long()  # occurred_at
    return r.string(), r.string()


class OutcomeWatch:
    """Counts command outcomes (events caused by a command, or its rejection) as they land."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.consumer = Consumer({**s.kafka_config(), "group.id": f"bench-{uuid.uuid4()}",
                                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                  "fetch.wait.max.ms": 20})
        self.consumer.assign([TopicPartition(t, p, 0) for t in (s.events_topic,
                              s.rejections_topic) for p in range(s.partitions)])
        self.ids: set[bytes] = set()
        self.first_ts: int | None = None
        self.last_ts = 0

    def poll(self) -> None:
        for msg in self.consumer.consume(20_000, timeout=0.2):
            value = msg.value()
            if msg.error() is not None or value is None:
                continue
            command_id, causation_id = outcome_ids(value)
            if causation_id != command_id:
                continue  # a transfer leg's event, not a command's outcome
            self.ids.add(command_id.encode())
            _, ts = msg.timestamp()
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = max(self.last_ts, ts)

    def wait(self, n: int, timeout_s: float, label: str,
             workers: list[WorkerProcess]) -> list[tuple[int, float]]:
        """Until ``n`` outcomes; returns (outcomes, the largest worker RSS in MB) every 2 s
        and at the end."""
        deadline = time.monotonic() + timeout_s
        shown = 0.0
        rss: list[tuple[int, float]] = []

        def sample() -> None:
            rss.append((len(self.ids), max(rss_mb(w.proc.pid) for w in workers)))

        while len(self.ids) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {len(self.ids)}/{n} outcomes in {timeout_s}s")
            self.poll()
            if time.monotonic() - shown > 2:
                sample()
                say(f"  {label}: {len(self.ids)}/{n} outcomes, worker RSS {rss[-1][1]:.0f} MB")
                shown = time.monotonic()
        sample()
        return rss

    def close(self) -> None:
        self.consumer.close()


def submit_all(s: Settings, commands: list[m.CommandBase]) -> float:
    """Send every command through the client (coalesced per partition); seconds taken."""
    start = time.perf_counter()
    with LedgerClient(s, wait_outcomes=False, max_batch_commands=2000) as client:
        for c in commands:
            client.submit(c)
        client.flush(300)
    return time.perf_counter() - start


def latency(s: Settings, accounts: list[str], rate: float, seconds: float) -> list[float]:
    """Open loop: submits at fixed arrival times; ms from submit to the client's outcome."""
    results: list[float] = []
    lock = threading.Lock()
    n = max(50, int(rate * seconds))
    with LedgerClient(s, linger_ms=0.5) as client:
        start = time.perf_counter()
        pending = []
        for i in range(n):
            due = start + i / rate
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            sent = time.perf_counter()
            fut = client.submit(m.Deposit(command_id=f"lat{i}-{uuid.uuid4().hex[:6]}",
                                          account_id=accounts[i % len(accounts)],
                                          actor="bench", issued_at=int(time.time() * 1000),
                                          amount_minor=1, currency="USD"))

            def done(_f: Any, sent: float = sent) -> None:
                with lock:
                    results.append((time.perf_counter() - sent) * 1000)

            fut.add_done_callback(done)
            pending.append(fut)
        for f in pending:
            f.result(timeout=60)
    return results


def worker_metrics(url: str) -> dict[str, float]:
    """A worker's ``/metrics``, by sample name."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return {sample.name: sample.value for family in
                text_string_to_metric_families(resp.read().decode())
                for sample in family.samples}


def worker_steps(url: str) -> tuple[float, float, float]:
    """A worker's steps so far: how many, their flushes' seconds, their commands."""
    m = worker_metrics(url)
    return (m["ledger_flush_seconds_count"], m["ledger_flush_seconds_sum"],
            m["ledger_batch_commands_sum"])


def wait_quiet(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Until no worker has input waiting (transfer legs included) and none has taken a
    step for three seconds (four looks a second apart). The health's lag alone is not
    enough: it is measured every 2 s, and empty while a worker starts; a latency run
    begun on it could find the worker still deciding the backlog's last steps."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    before: list[float] = []
    while quiet < 3:
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers still have input waiting after {timeout_s}s")
        docs = [w.get("/health/ready") for w in workers]
        steps = [worker_steps(w.url)[0] for w in workers]
        idle = steps == before and all(st == 200 and not d.get("lag") for st, d in docs)
        quiet, before = quiet + 1 if idle else 0, steps
        time.sleep(1.0)


def http_latency(url: str, paths: list[str]) -> list[float]:
    out = []
    for path in paths:
        t0 = time.perf_counter()
        with urllib.request.urlopen(url + path, timeout=5) as resp:
            resp.read()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def family(pid: int) -> list[int]:
    """A process and its descendants, as they are now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in children.read_text().split())
    return out


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory with its child processes' now (VmRSS) or the sum of
    their peaks (VmHWM), in MB."""
    kb = []
    for p in family(pid):
        with contextlib.suppress(OSError):
            kb += [int(line.split()[1]) for line in
                   Path(f"/proc/{p}/status").read_text().splitlines()
                   if line.startswith(field + ":")]
    return sum(kb) / 1024 if kb else float("nan")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, all its threads (0 once
    it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Cores:
    """Cores used on average between ``start`` and ``stop``, per named group of processes
    with their child processes (a worker's history index runs in one), each counted in
    one group only (a group with a pid not known, such as a broker the bench did not
    start, is left out)."""

    def __init__(self, pids: dict[str, list[int | None]]) -> None:
        self.pids = {name: [p for p in ps if p is not None] for name, ps in pids.items()
                     if None not in ps}

    def _now(self) -> dict[str, float]:
        fam = {name: {q for p in ps for q in family(p)} for name, ps in self.pids.items()}
        used = {}
        for name, mine in fam.items():
            # less the groups below this one (the bench's children: the broker, workers)
            below = [fam[o] for o in fam if o != name and mine.issuperset(self.pids[o])]
            used[name] = sum(cpu_s(q) for q in mine.difference(*below))
        return used

    def start(self) -> None:
        self._t0, self._c0 = time.monotonic(), self._now()

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        return {k: round((v - self._c0[k]) / wall, 2) for k, v in self._now().items()}


def format_cores(used: dict[str, float] | None) -> str:
    return "n/a" if not used else ", ".join(f"{k} {v:.2f}" for k, v in used.items())


def rss_at(samples: list[tuple[int, float]], outcomes: int) -> float:
    """The first RSS sample taken with at least ``outcomes`` outcomes seen."""
    return next((mb for seen, mb in samples if seen >= outcomes), samples[-1][1])


# ---------------------------------------------------------------- the run


def scratch_ledger(stack: ExitStack, name: str) -> tuple[Settings, int | None, Path]:
    """A temporary directory, a broker in it (or ``LEDGER_BOOTSTRAP_SERVERS``) and a new
    ledger's topics, all cleaned up by ``stack``: (the ledger's settings, the broker's
    pid if started here, the directory)."""
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"ledger-{name}-")))
    bootstrap, broker_pid = broker_for_job(stack, work / "kafka", say)
    s = Settings(bootstrap_servers=bootstrap).isolated(
        f"{name}-{random.randrange(1 << 32):08x}", data_dir=work / "w", web_port=free_port())
    ensure_topics(s)
    return s, broker_pid, work




def replay_rate(s: Settings) -> float:
    """Events/s rebuilding every balance from the events topic into a fresh store."""
    from streams.readmodels.projection import replay

    result = replay(s, fresh=True)
    if not result.ok:
        raise AssertionError(f"replay differs from the live state: {result.differences[:5]}")
    return result.events_per_s


def as_of_latency(s: Settings, accounts: list[str]) -> list[float]:
    """ms per as-of query on the projection built by ``replay_rate``."""
    from streams.readmodels.projection import Projection

    now = int(time.time() * 1000)
    out = []
    with Projection(s) as proj:
        for i, a in enumerate(accounts):
            t0 = time.perf_counter()
            proj.as_of(a, now - (i % 60) * 1000)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def run_bench(commands: int = 200_000, mix: str = "full", seed: int = 1,
              json_out: bool = False, workers: int = 1) -> int:
    rng = random.Random(seed)
    results: dict[str, Any] = {"commands": commands, "mix": mix, "workers": workers}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ledger-bench-")))
        bootstrap, broker_pid = broker_for_job(stack, work / "kafka", say)
        run = f"bench-{uuid.uuid4().hex[:6]}"
        base = Settings(bootstrap_servers=bootstrap, app_id=run, data_dir=work / "w",
                        web_port=free_port())

        def ledger(name: str) -> Settings:
            return base.isolated(f"{run}-{name}", data_dir=work / name, web_port=free_port())

        def start_workers(s: Settings, name: str) -> list[WorkerProcess]:
            """The worker processes, started; not yet ready (``wait_ready``)."""
            started = []
            for i in range(workers):
                w = WorkerProcess(s.model_copy(update={"data_dir": work / f"{name}-{i}",
                                                       "web_port": free_port()}),
                                  work / f"{name}-{i}.log")
                stack.callback(w.stop)
                started.append(w)
            return started

        say(f"raw confluent-kafka rates over {commands} records")
        results["raw_produce_per_s"], results["raw_consume_per_s"] = raw_rates(base, commands)

        say(f"generating {commands} commands, mix {mix}, over {ACCOUNTS} accounts")
        cmds = workload(mix, commands, rng, prefix="a")
        # The workload is the bench's input, alive to the end: out of the collector's
        # way, or every full collection while clients submit walks all of it
        # (submitting 200,000 commands took 15-27% less time frozen; the worker freezes
        # what its start-up made the same way)
        gc.freeze()
        # The speed of this machine's core now, to read the other figures against: it
        # moves by more than a third over an hour here (other tenants of the host).
        results["decide_us_per_command"] = decide_us(deciding(cmds[:20_000], 500), 3)
        results["core"] = core_build()
        say(f"  deciding alone: {results['decide_us_per_command']:.1f} µs/command "
            f"({results['core']} core)")

        # -- backlog: everything produced first, then the workers decide it
        s = ledger("backlog")
        ensure_topics(s)
        say("producing the backlog")
        submit_all(s, cmds)
        watch = OutcomeWatch(s)
        say(f"starting {workers} worker(s) on the backlog")
        pool = start_workers(s, "backlog")
        worker = pool[0]  # HTTP goes here; it forwards to the owner of an account
        cores = Cores({"broker": [broker_pid], "workers": [w.proc.pid for w in pool],
                       "bench": [os.getpid()]})
        # From the start: the first worker ready can get through a small backlog
        # before the last one is (start-up's CPU counts too).
        cores.start()
        for w in pool:
            w.wait_ready()
        rss = watch.wait(len(cmds), 1800, "backlog", pool)
        results["backlog_cores"] = cores.stop()
        # Memory growth with the number of commands: RSS half-way through the backlog
        # and at its end (the idempotency window keeps every id of a run; RocksDB keeps
        # them on disk, with bounded memtables and cache).
        results["worker_rss_mb_half"] = rss_at(rss, len(cmds) // 2)
        results["worker_rss_mb_end"] = rss[-1][1]
        assert watch.first_ts is not None
        span_s = max((watch.last_ts - watch.first_ts) / 1000, 1e-3)
        results["backlog_commands_per_s"] = len(cmds) / span_s
        results["backlog_vs_raw_produce"] = (results["backlog_commands_per_s"]
                                             / results["raw_produce_per_s"])
        watch.close()
        say(f"  backlog: {results['backlog_commands_per_s']:,.0f} commands/s")
        say("waiting for the last transfer legs")
        wait_quiet(pool, 600)

        # -- latency at 20% of the backlog rate, single submits, open loop
        rate = min(0.2 * results["backlog_commands_per_s"], 5_000.0)
        say(f"latency: single submits at {rate:,.0f}/s for 10 s")
        opened = [c.account_id for c in cmds[:ACCOUNTS]]
        cores.start()
        lat = latency(s, opened, rate, 10.0)
        results["latency_cores"] = cores.stop()
        results["latency_rate_per_s"] = rate
        results["latency_ms_p50"] = percentile(lat, 0.50)
        results["latency_ms_p99"] = percentile(lat, 0.99)
        results["latency_ms_p999"] = percentile(lat, 0.999)

        say("GET /accounts/{id} latency")
        sample = [opened[rng.randrange(len(opened))] for _ in range(500)]
        got = http_latency(worker.url, [f"/accounts/{a}" for a in sample])
        results["get_ms_p50"], results["get_ms_p99"] = percentile(got, .5), percentile(got, .99)

        wait_quiet(pool, 120)
        say("checking: verify, and the worker's balances against the fold of the events")
        report = verify(s)
        mismatches = 0
        for a in sample[:200]:
            with urllib.request.urlopen(f"{worker.url}/accounts/{a}", timeout=5) as resp:
                doc = json.loads(resp.read())
            state = report.states[a]
            mismatches += (doc["balance_minor"], doc["version"]) != (state.balance_minor,
                                                                    state.version)
        results["check_ok"] = report.ok and mismatches == 0 and \
            report.transfers_in_flight == report.transactions_in_flight == 0
        if not results["check_ok"]:
            say(f"CHECK FAILED: {report.breaches[:5]}, {mismatches} balance mismatches, "
                f"{report.transfers_in_flight} transfers and {report.transactions_in_flight} "
                "transactions in flight")
        results["worker_rss_mb_peak"] = max(rss_mb(w.proc.pid, "VmHWM") for w in pool)
        for w in pool:
            w.stop()

        say("replay: rebuilding every balance from the events topic")
        results["replay_events_per_s"] = replay_rate(s)
        asof = as_of_latency(s, sample)
        results["as_of_ms_p50"] = percentile(asof, .5)
        results["as_of_ms_p99"] = percentile(asof, .99)

        # -- end to end: a fresh ledger, the worker running while commands arrive
        s2 = ledger("e2e")
        ensure_topics(s2)
        pool = start_workers(s2, "e2e")
        for w in pool:
            w.wait_ready()
        watch2 = OutcomeWatch(s2)
        say("end to end: submitting while the worker decides")
        cores = Cores({"broker": [broker_pid], "workers": [w.proc.pid for w in pool],
                       "bench": [os.getpid()]})
        cores.start()
        t0 = time.time()
        sender = threading.Thread(target=submit_all, args=(s2, cmds))
        sender.start()
        watch2.wait(len(cmds), 1800, "e2e", pool)
        sender.join()
        results["e2e_cores"] = cores.stop()
        results["e2e_commands_per_s"] = len(cmds) / max(watch2.last_ts / 1000 - t0, 1e-3)
        results["worker_rss_mb_peak"] = max(results["worker_rss_mb_peak"],
                                            *(rss_mb(w.proc.pid, "VmHWM") for w in pool))
        watch2.close()

    for k in KEYS:
        results.setdefault(k, None)
    if json_out:
        print(json.dumps({k: results[k] for k in KEYS}))
    else:
        print(render(results))
    return 0 if results["check_ok"] else 1


def render(r: dict[str, Any]) -> str:
    def f(v: Any, fmt: str = ",.0f") -> str:
        return "n/a" if v is None or v != v else format(v, fmt)

    rows = [
        ("commands (mix, workers)", f"{r['commands']:,} ({r['mix']}, {r['workers']})"),
        ("raw produce / consume, records/s",
         f"{f(r['raw_produce_per_s'])} / {f(r['raw_consume_per_s'])}"),
        ("backlog, commands/s", f"{f(r['backlog_commands_per_s'])} "
         f"({f(r['backlog_vs_raw_produce'], '.2f')} of raw produce)"),
        ("end to end, commands/s", f(r["e2e_commands_per_s"])),
        (f"latency at {f(r['latency_rate_per_s'])}/s, ms p50/p99/p999",
         f"{f(r['latency_ms_p50'], '.1f')} / {f(r['latency_ms_p99'], '.1f')} / "
         f"{f(r['latency_ms_p999'], '.1f')}"),
        ("replay, events/s", f(r["replay_events_per_s"])),
        ("as-of, ms p50/p99", f"{f(r['as_of_ms_p50'], '.2f')} / {f(r['as_of_ms_p99'], '.2f')}"),
        ("GET /accounts/{id}, ms p50/p99",
         f"{f(r['get_ms_p50'], '.2f')} / {f(r['get_ms_p99'], '.2f')}"),
        ("cores used, backlog", format_cores(r["backlog_cores"])),
        ("cores used, latency run", format_cores(r["latency_cores"])),
        ("cores used, end to end", format_cores(r["e2e_cores"])),
        ("worker peak RSS, MB", f(r["worker_rss_mb_peak"])),
        ("worker RSS half-way / end of backlog, MB",
         f"{f(r['worker_rss_mb_half'])} / {f(r['worker_rss_mb_end'])}"),
        ("deciding alone (bench/decide.py), µs/command", f(r["decide_us_per_command"], ".1f")),
        ("core (streams/core.py)", str(r.get("core"))),
        ("check (verify + balances = fold)", "ok" if r["check_ok"] else "FAILED"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

