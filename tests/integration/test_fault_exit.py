"""An internal service of a live worker fails: the worker exits non-zero and says why.

The fault: the worker's consumer meets lz4-compressed records but cannot decompress
them (its codec library is hidden from it, the case of a broken install). Faust's
fetcher crashes, and the worker must not stay up deciding nothing.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from confluent_kafka import Producer

from schemas.codec import CODEC
from schemas.models import Deposit, OpenAccount, encode_batch
from streams import exits
from streams.dev.kafka_local import free_port
from streams.dev.procs import WorkerProcess
from streams.partitions import partition_for
from streams.readmodels.eventlog import read_all

pytestmark = pytest.mark.kafka


def test_a_crashed_fetcher_makes_the_worker_exit_and_a_restart_loses_nothing(
        ledger_settings, start_worker, client, tmp_path):
    s = ledger_settings.model_copy(update={"data_dir": tmp_path / "data",
                                           "web_port": free_port(), "stall_timeout_s": 5.0})
    shim = tmp_path / "shim" / "cramjam"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("cramjam hidden by the test")\n')
    # aiokafka's compiled record reader decodes lz4 by itself; its pure-Python one (the
    # one a platform without wheels gets) needs cramjam, which the shim hides.
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")]),
           "AIOKAFKA_NO_EXTENSIONS": "1"}
    broken = WorkerProcess(s, tmp_path / "broken.log", extra_env=env)
    try:
        broken.wait_ready()
        now = int(time.time() * 1000)
        opened = client.submit(OpenAccount(command_id="o", account_id="lz", actor="t",
                                           issued_at=now, currency="USD"))
        assert opened.result(timeout=60).accepted
        # fifty commands in one record: big enough that librdkafka really compresses it
        deposits = [Deposit(command_id=f"d-lz4-{i}", account_id="lz", actor="t",
                            issued_at=now + 1 + i, amount_minor=25, currency="USD")
                    for i in range(50)]
        producer = Producer(s.producer_config(**{"compression.type": "lz4"}))
        producer.produce(s.commands_topic, encode_batch(deposits), b"lz",
                         partition=partition_for("lz", s.partitions))
        assert producer.flush(30) == 0

        started = time.monotonic()
        while broken.proc.poll() is None and time.monotonic() - started < 90:
            time.sleep(0.2)
        assert broken.proc.returncode == exits.INTERNAL, broken.log_tail()
        assert time.monotonic() - started < 30  # 2 x stall_timeout_s, and a timer tick
    finally:
        broken.stop()
    last = json.loads(broken.log_path.read_text().splitlines()[-1])
    assert last["level"] == "critical"
    assert last["msg"].startswith("worker exiting: "), last
    assert "crashed: UnsupportedCodecError('Libraries for lz4 compression codec not found" \
        in last["msg"], last

    fixed = start_worker("fixed", data_dir=s.data_dir)  # the codec is back
    deadline = time.monotonic() + 60
    while True:
        events = [CODEC.decode(m.value())[1] for m in read_all(s, s.events_topic)]
        done = [e for e in events if e["command_id"].startswith("d-lz4-")]
        if len(done) >= 50 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(e["command_id"] for e in done) == sorted(d.command_id for d in deposits)
    status, doc = fixed.get("/accounts/lz")
    assert status == 200 and doc["balance_minor"] == 50 * 25 and doc["version"] == 51
