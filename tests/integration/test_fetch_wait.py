"""Faust's consumer fetches with a short wait: a fetch out on idle partitions must not
hold back records that land meanwhile on others for Faust's 1.5 s."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher

from streams.worker.app import FETCH_MAX_WAIT_MS, create_app

pytestmark = pytest.mark.kafka


def test_the_worker_caps_the_fetch_wait_of_faust_consumer(ledger_settings):
    s = ledger_settings

    async def wait_ms() -> int:
        # what Faust's driver passes (faust/transport/drivers/aiokafka.py)
        consumer = AIOKafkaConsumer(s.commands_topic, bootstrap_servers=s.bootstrap_servers,
                                    fetch_max_wait_ms=1500)
        await consumer.start()
        try:
            return int(consumer._fetcher._fetch_max_wait_ms)
        finally:
            await consumer.stop()

    def fetch_wait() -> int:  # on a thread of its own: this one may have a loop running
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, wait_ms()).result(60)

    if not getattr(Fetcher.__init__, "ledger_capped", False):  # no app made yet here
        assert fetch_wait() == 1500  # aiokafka as it comes
    create_app(s).ledger_engine.close()
    assert fetch_wait() == FETCH_MAX_WAIT_MS < 1500
