"""A worker without a broker waits and says so; it does not crash-loop or hang silently."""

from __future__ import annotations

import json
import time

from schemas.models import OpenAccount
from streams import exits
from streams.dev.kafka_local import free_port
from streams.dev.procs import WorkerProcess
from streams.settings import Settings


def test_worker_waits_for_an_unreachable_broker_then_exits_clearly(tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    s = Settings(bootstrap_servers=dead, data_dir=tmp_path / "data", web_port=free_port(),
                 startup_timeout_s=10.0).isolated("lifecycle")  # its own leg secret
    w = WorkerProcess(s, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and w.proc.poll() is None:
            time.sleep(0.2)
        assert w.proc.returncode == exits.UNAVAILABLE  # after the bounded wait
    finally:
        w.stop()
    lines = [json.loads(x) for x in w.log_path.read_text().splitlines() if x.startswith("{")]
    waits = [x for x in lines if x["msg"] == "waiting for the broker"]
    assert len(waits) >= 3  # retried, with backoff
    assert [x["retry_in_s"] for x in waits[:3]] == sorted(x["retry_in_s"] for x in waits[:3])
    assert all(x["bootstrap"] == dead and x["level"] == "warning" for x in waits)
    last = lines[-1]
    assert last["level"] == "critical" and "no Kafka broker answered" in last["msg"]


def test_a_worker_logs_json_only_and_says_it_stopped_cleanly(start_worker, client):
    w = start_worker("json")
    assert client.submit(OpenAccount(command_id="o", account_id="acct-json", actor="t",
                                     issued_at=int(time.time() * 1000),
                                     currency="USD")).result(timeout=60).accepted
    assert w.stop() == 0
    lines = w.log_path.read_text().splitlines()
    assert not [x for x in lines if not x.startswith("{")]  # librdkafka's lines included
    docs = [json.loads(x) for x in lines]
    assert any(d["logger"] == "librdkafka" for d in docs)
    assert not [d for d in docs if d["level"] in ("error", "critical")]
    assert docs[-1]["msg"] == "worker stopped cleanly"
