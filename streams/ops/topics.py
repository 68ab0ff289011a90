"""Create the ledger's topics with the partition count and configs the design needs.

Faust never changes the config of a topic that exists, and only compacts the
topics it creates itself, so every topic (the table changelog included) is
created here, before a worker starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    NewTopic,
    OffsetSpec,
)

from streams.ops.acl import LoginWatch
from streams.settings import Settings

log = logging.getLogger("ledger.topics")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def specs(s: Settings) -> list[TopicSpec]:
    keep = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
    big = {"max.message.bytes": str(16 * 1024 * 1024)}
    # The worker's partition clock (idempotency window) is the inputs' timestamps:
    # the broker's, not whatever a producer put in.
    stamped = {"message.timestamp.type": "LogAppendTime"}
    return [
        TopicSpec(s.commands_topic, s.partitions,
                  {"retention.ms": str(7 * 86_400_000), **big, **stamped}),
        TopicSpec(s.transfers_topic, s.partitions, {**keep, **stamped}),
        # The source of truth: kept forever, never compacted.
        TopicSpec(s.events_topic, s.partitions, {**keep}),
        TopicSpec(s.rejections_topic, s.partitions, {**keep}),
        TopicSpec(s.dlq_topic, s.partitions, {**keep, **big}),
        TopicSpec(s.changelog_topic, s.partitions, {"cleanup.policy": "compact", **big}),
        # Faust's leader assignor looks for it at every start (and logs an error when
        # it is missing: the worker does not declare topics itself)
        TopicSpec(f"{s.app_id}-__assignor-__leader", 1, {}),
    ]


def wait_for_broker(s: Settings, timeout_s: float, max_delay_s: float = 10.0) -> None:
    """Block until the cluster answers, retrying with backoff and saying so each time."""
    login = LoginWatch(s)  # a refused login is final: fail at once instead of retrying
    admin = AdminClient({**s.kafka_config(), "log.connection.close": False,
                         "error_cb": login,  # type: ignore[dict-item]
                         "logger": logging.getLogger("ledger.librdkafka")})  # type: ignore[dict-item]
    deadline = time.monotonic() + timeout_s
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            admin.list_topics(timeout=2.0)
            if attempt > 1:
                log.info("broker reachable", extra={"bootstrap": s.bootstrap_servers,
                                                    "attempts": attempt})
            return
        except KafkaException as exc:
            admin.poll(0.2)
            login.raise_if_refused()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no Kafka broker answered at {s.bootstrap_servers} "
                                   f"for {timeout_s:.0f}s ({attempt} attempts): "
                                   f"{exc.args[0].str()}") from None
            log.warning("waiting for the broker", extra={
                "bootstrap": s.bootstrap_servers, "attempt": attempt,
                "error": exc.args[0].str(), "retry_in_s": round(min(delay, left), 1)})
            time.sleep(min(delay, left))
            delay = min(delay * 2, max_delay_s)


def ensure_topics(s: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics; returns the names created. Existing ones are checked."""
    admin = AdminClient(s.kafka_config())
    existing = admin.list_topics(timeout=timeout_s).topics
    wanted = specs(s)
    for spec in wanted:
        if spec.name in existing:
            have = len(existing[spec.name].partitions)
            if have != spec.partitions:
                raise RuntimeError(f"topic {spec.name} has {have} partitions, the ledger needs "
                                   f"{spec.partitions}: every account-keyed topic must match")
    new = [NewTopic(t.name, t.partitions, s.replication_factor, config=t.config)
           for t in wanted if t.name not in existing]
    created: list[str] = []
    for name, fut in (admin.create_topics(new, operation_timeout=timeout_s).items() if new
                      else []):
        try:
            fut.result(timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: a racing worker made it
                raise
    if created:
        log.info("created topics %s", ", ".join(sorted(created)))
        _wait_for_leaders(admin, created, timeout_s)
    return created


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    """New topics are usable once every partition answers a list-offsets request.

    Metadata lists a leader before the broker has made the partition (Kafka 4.1
    updates its metadata cache first): for about a second after creation a
    produce or a watermark query gets NOT_LEADER_OR_FOLLOWER, so leaders alone
    are not enough.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=timeout_s).topics
        missing = [n for n in names if n not in topics or topics[n].error is not None
                   or any(p.leader < 0 for p in topics[n].partitions.values())]
        if not missing:
            try:
                end_offsets_when_ready(admin, [(n, p) for n in names
                                               for p in topics[n].partitions], deadline)
                return
            except TimeoutError:
                raise TimeoutError(f"topics not ready after {timeout_s}s: {names}") from None
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics without leaders after {timeout_s}s: {missing}")
        time.sleep(0.1)


def end_offsets_when_ready(admin: AdminClient, tps: list[tuple[str, int]],
                           deadline: float) -> dict[tuple[str, int], int]:
    """``end_offsets``, asked again until ``deadline`` (monotonic) while the partitions'
    leaders are still being made or elected: NOT_LEADER and friends are not flagged
    retriable, yet pass in a moment. TimeoutError says the last error."""
    while True:
        try:
            return end_offsets(admin, tps, timeout_s=max(1.0, deadline - time.monotonic()))
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no end offsets for {tps}: "
                                   f"{exc.args[0].str()}") from exc
            time.sleep(0.1)


def end_offsets(admin: AdminClient, tps: Iterable[tuple[str, int]],
                timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """The broker's end offset of each (topic, partition), in one request.

    Its answer is waited for twice ``timeout_s``, then TimeoutError: a request
    librdkafka never completes (it has been seen when the worker stops with one in
    flight) must not hold the thread that waits, nor the process's exit, for ever."""
    latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
    futures = admin.list_offsets({TopicPartition(t, p): latest for t, p in tps},
                                 request_timeout=timeout_s)
    until = time.monotonic() + 2 * timeout_s
    return {(tp.topic, tp.partition): f.result(timeout=max(0.0, until - time.monotonic())).offset
            for tp, f in futures.items()}
