"""A real cluster: three brokers, replication factor 3, min.insync.replicas 2. Partition
leaders and then a second broker die mid-stream (SIGKILL), and a worker is killed -9,
while clients wait for their outcomes: what each was told is what the log holds, once."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from producers.client import LedgerClient, Outcome
from schemas.models import CommandBase, encode
from streams.dev.kafka_local import LocalCluster, ensure_jars
from streams.ops.topics import ensure_topics
from streams.partitions import partition_for
from streams.settings import Settings
from tests.chaos.test_kill9 import (
    Supervisor,
    check_ledger,
    outcomes_by_command,
    report_run,
    seed,
    workload,
)

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]


@pytest.fixture(scope="module")
def cluster():
    ensure_jars()
    c = LocalCluster(3)
    c.start()
    yield c
    c.stop()


@pytest.fixture
def ledger_settings(cluster, unique_name, tmp_path) -> Settings:
    """The ledger on the cluster (start_worker takes its workers' settings from here)."""
    s = Settings(bootstrap_servers=cluster.bootstrap_servers, replication_factor=3,
                 session_timeout_s=6.0).isolated(unique_name(), data_dir=tmp_path / "data")
    ensure_topics(s)
    return s


def test_brokers_and_a_worker_die_mid_stream(cluster, ledger_settings, start_worker):
    s = ledger_settings
    rng = random.Random(seed(11))
    accounts = [f"acct-{i}" for i in range(100)]
    commands = workload(rng, accounts, 5_000)
    submitted: list[tuple[CommandBase, object]] = []
    options = {"session_timeout_s": 6.0, "stall_timeout_s": 20.0}
    worker = start_worker("w0", **options)
    supervisor = Supervisor(start_worker, worker)

    def submit() -> None:
        for i in range(0, len(commands), 20):
            submitted.extend((c, client.submit(c)) for c in commands[i:i + 20])
            time.sleep(0.1)

    busiest = Counter(partition_for(c.account_id, s.partitions)
                      for c in commands).most_common(1)[0][0]
    broker_kills: list[int] = []
    with LedgerClient(s) as client:
        submitter = threading.Thread(target=submit, name="cluster-submitter", daemon=True)
        submitter.start()
        time.sleep(4)
        # the leader of the busiest partition, then another broker while it is down
        first = cluster.leader_of(s.commands_topic, busiest)
        cluster.kill(first)
        broker_kills.append(first)
        time.sleep(5)
        second = cluster.leader_of(s.events_topic, busiest)
        if second in (first, -1):
            second = next(n for n in cluster.nodes if n != first)
        cluster.kill(second)
        broker_kills.append(second)
        time.sleep(3)  # one broker of three: no quorum, no in-sync pair; writes wait
        cluster.start_node(first)
        cluster.start_node(second)
        time.sleep(3)
        supervisor.worker.kill()  # and a worker, kill -9, once the cluster is back
        supervisor.worker = start_worker("w1", ready=False,
                                         data_dir=supervisor.worker.settings.data_dir,
                                         **options)
        submitter.join(180)
        assert not submitter.is_alive()
        deadline = time.monotonic() + 300
        while not all(f.done() for _, f in submitted):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "outcomes still missing"
            supervisor.check()
            time.sleep(0.5)
        told: dict[str, Outcome] = {c.command_id: f.result() for c, f in submitted}  # type: ignore[attr-defined]

    report = check_ledger(s, [c for c, _ in submitted], supervisor)
    seen, _ = outcomes_by_command(s)
    for command_id, outcome in told.items():
        records = {encode(e) for e in outcome.events} if outcome.accepted else \
            {encode(outcome.rejection)}
        assert records == seen[command_id], command_id
    report_run("3 brokers: leader and a second broker killed, worker kill -9", len(told),
               len(told), report.duplicates, broker_kills=len(broker_kills), worker_kills=1)
    print(f"3 brokers: {len(told)} commands, broker kills {broker_kills} (the second while "
          f"the first was down), worker kills 1 (+{supervisor.restarts} restarts by the "
          f"supervisor); lost 0, doubled 0; duplicate event records {report.duplicates}")
