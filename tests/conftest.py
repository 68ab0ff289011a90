"""Session-wide fixtures: one real Kafka broker for the test run, and unique names.

Tests that need Kafka take ``kafka_bootstrap`` (a bootstrap servers string).
By default it starts a local Apache Kafka broker (``streams.kafka_local``)
once per session; set ``LEDGER_BOOTSTRAP_SERVERS`` to use an external broker
instead. Tests that restart or kill the broker take ``local_broker``, which
is skipped when an external broker is configured.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from streams.kafka_local import BrokerError, LocalBroker, ensure_jars

EXTERNAL_BOOTSTRAP_ENV = "LEDGER_BOOTSTRAP_SERVERS"

_KAFKA_FIXTURES = frozenset({"kafka_bootstrap", "local_broker"})
_session_broker: LocalBroker | None = None


@pytest.fixture(scope="session")
def local_broker() -> Iterator[LocalBroker]:
    """The session's local broker (skipped when an external broker is configured)."""
    global _session_broker
    if os.environ.get(EXTERNAL_BOOTSTRAP_ENV):
        pytest.skip(
            f"{EXTERNAL_BOOTSTRAP_ENV} is set, so tests use an external broker; "
            "this test needs the local broker (it restarts or kills it)"
        )
    ensure_jars()
    broker = LocalBroker()
    try:
        broker.start()
    except BrokerError:
        print(f"\nKafka broker failed to start; log tail:\n{broker.log_tail()}", file=sys.stderr)
        broker.__exit__(None, None, None)
        raise
    _session_broker = broker
    try:
        yield broker
    finally:
        _session_broker = None
        broker.__exit__(None, None, None)


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """Bootstrap servers of the external broker if configured, else of the session broker."""
    external = os.environ.get(EXTERNAL_BOOTSTRAP_ENV)
    if external:
        return external
    broker: LocalBroker = request.getfixturevalue("local_broker")
    return broker.bootstrap_servers


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[..., str]:
    """Factory of topic/group names unique per call: ``<test-name>[-<label>]-<8 hex>``.

    Only ``[a-z0-9-]`` is used: Kafka treats ``.`` and ``_`` as colliding in
    topic names.
    """
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]

    def make(label: str = "") -> str:
        label = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        return "-".join(part for part in (base, label, uuid.uuid4().hex[:8]) if part)

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    # A failing Kafka test is much easier to diagnose with the broker's side of it.
    broker = _session_broker
    if (
        report.failed
        and broker is not None
        and _KAFKA_FIXTURES & set(getattr(item, "fixturenames", ()))
    ):
        report.sections.append(("kafka broker log (tail)", broker.log_tail()))
    return report
