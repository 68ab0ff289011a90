"""Produce a batch, then flush: what the worker's producer's ``linger.ms`` costs it.

    python bench/linger.py [--rounds 300]

Starts a broker (or uses ``LEDGER_BOOTSTRAP_SERVERS``) and, as the worker's hot path
does, produces a batch of records over 12 partitions and flushes it: 40 records (a
batch of single submits) and 10,000 (a step of a backlog), at ``linger.ms`` 0 and at
the worker's (``streams.engine.LINGER_MS``). A flush sends at once whatever
``linger.ms`` says; at 0, each ``produce()`` wakes librdkafka's broker thread, which
sends small requests while the batch is still being produced. Prints, per setting,
the time in the produce loop and in the flush (p50) and the mean time per batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streams import bench
from streams.cli import WORKER_SWITCH_INTERVAL_S
from streams.engine import LINGER_MS
from streams.kafka_local import broker_for_job

TOPIC, PARTITIONS = "bench-linger", 12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            raise SystemExit(f"not delivered: {err.str()}")

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ledger-linger-")))
        bootstrap, _ = broker_for_job(stack, work / "kafka", bench.say)
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for f in admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)]).values():
            f.result()
        producers = {linger: Producer({
            "bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
            "socket.nagle.disable": True, "linger.ms": linger, "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 2_000_000, "queue.buffering.max.kbytes": 1_048_576,
        }) for linger in (0, LINGER_MS)}

        def batches(producer: Producer, records: int, rounds: int) -> tuple[list[float], ...]:
            loop, flush = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                for i in range(records):
                    producer.produce(TOPIC, b"x" * 150, b"k%d" % i, partition=i % PARTITIONS,
                                     on_delivery=delivered)
                produced = time.perf_counter()
                if producer.flush(30):
                    raise SystemExit("flush timed out")
                loop.append((produced - start) * 1000)
                flush.append((time.perf_counter() - produced) * 1000)
            return loop, flush

        for warm_up in (True, False):
            if warm_up:
                bench.say("warming the broker up")
            for records in (40, 10_000):
                rounds = max(10, args.rounds * 40 // records)
                for linger, producer in producers.items():
                    loop, flush = batches(producer, records, rounds)
                    if warm_up:
                        continue
                    print(f"{records:6,} records, linger.ms {linger:3}: produce loop p50 "
                          f"{bench.percentile(loop, .5):6.2f} ms, flush p50 "
                          f"{bench.percentile(flush, .5):6.2f} ms, mean per batch "
                          f"{(sum(loop) + sum(flush)) / rounds:6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
