"""A flush next to a busy Python thread: what the GIL's switch interval costs it.

    python bench/flush.py [--rounds 200]

Starts a broker (or uses ``LEDGER_BOOTSTRAP_SERVERS``) and times ``Producer.flush`` of
40 records over 12 partitions, as the worker's producer is set up (idempotent,
``acks=all``, ``linger.ms=0``), with a delivery callback per record or none, at
CPython's default switch interval (5 ms) and at the worker's
(``streams.cli.WORKER_SWITCH_INTERVAL_S``), first alone and then with a thread
computing in Python alongside, as Faust's consumer thread and the agent's loop do in
a worker. librdkafka runs each delivery callback with the GIL held, so next to a busy
thread each can wait for a whole switch interval.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streams.cli import WORKER_SWITCH_INTERVAL_S
from streams.dev import bench
from streams.dev.kafka_local import broker_for_job

TOPIC, PARTITIONS, RECORDS = "bench-flush", 12, 40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            raise SystemExit(f"not delivered: {err.str()}")

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ledger-flush-")))
        bootstrap, _ = broker_for_job(stack, work / "kafka", bench.say)
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for f in admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)]).values():
            f.result()
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                             "acks": "all", "linger.ms": 0, "socket.nagle.disable": True})

        def flushes(rounds: int, callback: bool) -> list[float]:
            out = []
            for _ in range(rounds):
                for i in range(RECORDS):
                    producer.produce(TOPIC, b"x" * 200, partition=i % PARTITIONS,
                                     on_delivery=delivered if callback else None)
                start = time.perf_counter()
                if producer.flush(30):
                    raise SystemExit("flush timed out")
                out.append((time.perf_counter() - start) * 1000)
            return out

        bench.say("warming the broker up")
        flushes(3 * args.rounds, True)
        for alongside in ("idle", "busy"):
            if alongside == "busy":
                threading.Thread(target=busy, daemon=True).start()
            for interval in (0.005, WORKER_SWITCH_INTERVAL_S):
                sys.setswitchinterval(interval)
                for callback in (True, False):
                    ms = flushes(args.rounds, callback)
                    print(f"thread alongside {alongside}, switch interval "
                          f"{interval * 1000:.1f} ms, callbacks {'yes' if callback else 'no '}: "
                          f"flush p50 {bench.percentile(ms, .5):6.2f} ms  "
                          f"p90 {bench.percentile(ms, .9):7.2f} ms", flush=True)
        stop.set()


if __name__ == "__main__":
    main()
