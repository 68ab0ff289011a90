"""Session-wide fixtures: one real Kafka broker for the test run, and unique names.

Tests that need Kafka take ``kafka_bootstrap`` (a bootstrap servers string).
By default it starts a local Apache Kafka broker (``streams.dev.kafka_local``)
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
from pathlib import Path
from typing import Any

import pytest

from producers.client import LedgerClient
from streams.dev.kafka_local import BrokerError, LocalBroker, ensure_jars, free_port
from streams.dev.procs import WorkerProcess
from streams.ops.topics import ensure_topics
from streams.settings import Settings

EXTERNAL_BOOTSTRAP_ENV = "LEDGER_BOOTSTRAP_SERVERS"
# Property tests draw fresh examples on every run; in CI from this seed, so that a red
# run can be repeated (``--hypothesis-seed`` or LEDGER_HYPOTHESIS_SEED choose another).
CI_HYPOTHESIS_SEED = 20261205


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("hypothesis_seed", None) is None:
        seed = os.environ.get("LEDGER_HYPOTHESIS_SEED") or (
            str(CI_HYPOTHESIS_SEED) if os.environ.get("CI") else None)
        config.option.hypothesis_seed = seed


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.getoption("hypothesis_seed", None)
    return f"hypothesis seed: {seed}" if seed is not None else \
        "hypothesis seed: fresh each run (a failure prints the one to repeat it with)"

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
    if report.failed:
        for w in getattr(item, "ledger_workers", []):
            report.sections.append((f"worker log {w.log_path.name} (tail)", w.log_tail(60)))
    return report


# ---------------------------------------------------------------- ledgers and workers


@pytest.fixture
def ledger_settings(kafka_bootstrap: str, unique_name: Callable[..., str],
                    tmp_path: Path) -> Settings:
    """A ledger of its own: unique topic names and app id, topics created."""
    s = Settings(bootstrap_servers=kafka_bootstrap).isolated(
        unique_name(), data_dir=tmp_path / "data")  # with a random leg secret of its own
    ensure_topics(s)
    return s


@pytest.fixture
def start_worker(ledger_settings: Settings, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start a ready ``ledger worker`` process (own data dir and web port)."""
    workers: list[WorkerProcess] = []
    request.node.ledger_workers = workers  # the report hook shows their logs on failure

    def start(name: str = "w1", ready: bool = True, **overrides: object) -> WorkerProcess:
        s = ledger_settings.model_copy(update={
            "data_dir": tmp_path / f"data-{name}", "web_port": free_port(), **overrides})
        w = WorkerProcess(s, tmp_path / f"{name}.log")
        workers.append(w)
        if ready:
            w.wait_ready()
        return w

    yield start
    for w in workers:
        w.stop()


@pytest.fixture
def client(ledger_settings: Settings) -> Iterator[LedgerClient]:
    with LedgerClient(ledger_settings) as c:
        yield c
