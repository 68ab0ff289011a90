"""``ledger status``: the worker group at a glance, from the broker alone.

Who owns which input partition (the Faust consumer group's members), how far each
partition's committed position is behind its end (lag), and how fast records
arrive and are done, measured over a short sample. Workers commit about once a
second, so the lag seen here trails a worker's own (``GET /health/ready``) by that.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.ops.topics import end_offsets
from streams.settings import Settings


@dataclass
class PartitionStatus:
    topic: str
    partition: int
    owner: str | None
    end: int
    committed: int | None
    lag: int
    in_per_s: float
    done_per_s: float


TPKey = tuple[str, int]


def _owners(admin: AdminClient, group: str, timeout_s: float) -> tuple[str, dict[TPKey, str]]:
    desc = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group].result()
    owners = {}
    for m in desc.members:
        for tp in m.assignment.topic_partitions:
            owners[(tp.topic, tp.partition)] = f"{m.client_id}@{m.host}"
    return str(desc.state).rsplit(".", 1)[-1].lower(), owners


def _positions(admin: AdminClient, group: str, tps: list[TopicPartition],
               timeout_s: float) -> tuple[dict[TPKey, int], dict[TPKey, int]]:
    ends = end_offsets(admin, ((tp.topic, tp.partition) for tp in tps), timeout_s)
    done = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, tps)], request_timeout=timeout_s)[group].result()
    committed = {(tp.topic, tp.partition): tp.offset for tp in done.topic_partitions
                 if tp.offset >= 0}
    return ends, committed


def status(s: Settings, sample_s: float = 2.0, timeout_s: float = 10.0) -> dict[str, Any]:
    admin = AdminClient(s.kafka_config())
    group = s.app_id  # Faust's consumer group is its app id
    state, owners = _owners(admin, group, timeout_s)
    tps = [TopicPartition(t, p) for t in (s.commands_topic, s.transfers_topic)
           for p in range(s.partitions)]
    t0 = time.monotonic()
    ends0, done0 = _positions(admin, group, tps, timeout_s)
    time.sleep(sample_s)
    ends1, done1 = _positions(admin, group, tps, timeout_s)
    dt = max(time.monotonic() - t0, 1e-9)
    rows = []
    for tp in tps:
        key = (tp.topic, tp.partition)
        committed = done1.get(key)
        rows.append(PartitionStatus(
            topic=tp.topic, partition=tp.partition, owner=owners.get(key), end=ends1[key],
            committed=committed, lag=ends1[key] - (committed or 0),
            in_per_s=round((ends1[key] - ends0[key]) / dt, 1),
            done_per_s=round(((committed or 0) - done0.get(key, 0)) / dt, 1)))
    return {
        "group": group, "state": state,
        "workers": sorted(set(owners.values())),
        "lag_total": sum(r.lag for r in rows),
        "in_per_s": round(sum(r.in_per_s for r in rows), 1),
        "done_per_s": round(sum(r.done_per_s for r in rows), 1),
        "partitions": [asdict(r) for r in rows],
    }


def render(doc: dict[str, Any]) -> str:
    lines = [f"group {doc['group']} ({doc['state']}): {len(doc['workers'])} worker(s) "
             f"{', '.join(doc['workers']) or '-'}",
             f"lag {doc['lag_total']} records; in {doc['in_per_s']}/s, "
             f"done {doc['done_per_s']}/s",
             f"{'topic':<28} {'p':>3} {'end':>9} {'committed':>9} {'lag':>7} "
             f"{'in/s':>8} {'done/s':>8}  owner"]
    for r in doc["partitions"]:
        committed = "-" if r["committed"] is None else r["committed"]
        lines.append(f"{r['topic']:<28} {r['partition']:>3} {r['end']:>9} {committed:>9} "
                     f"{r['lag']:>7} {r['in_per_s']:>8} {r['done_per_s']:>8}  "
                     f"{r['owner'] or '-'}")
    return "\n".join(lines)
