"""Fixtures for tests against the real broker: isolated ledgers and worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producers.client import LedgerClient
from streams.procs import WorkerProcess, free_port
from streams.settings import Settings
from streams.topics import ensure_topics


@pytest.fixture
def ledger_settings(kafka_bootstrap: str, unique_name: Callable[..., str],
                    tmp_path: Path) -> Settings:
    """A ledger of its own: unique topic names and app id, topics created."""
    prefix = unique_name()
    s = Settings(
        bootstrap_servers=kafka_bootstrap, app_id=prefix, data_dir=tmp_path / "data",
        commands_topic=f"{prefix}.commands", transfers_topic=f"{prefix}.transfers",
        events_topic=f"{prefix}.events", rejections_topic=f"{prefix}.rejections",
        dlq_topic=f"{prefix}.dlq", leg_secret="test-leg-secret",  # type: ignore[arg-type]
    )
    ensure_topics(s)
    return s


@pytest.fixture
def start_worker(ledger_settings: Settings, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start a ready ``ledger worker`` process (own data dir and web port)."""
    workers: list[WorkerProcess] = []

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
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for w in workers:
            print(f"--- {w.log_path.name} (tail)\n{w.log_tail(60)}")


@pytest.fixture
def client(ledger_settings: Settings) -> Iterator[LedgerClient]:
    with LedgerClient(ledger_settings) as c:
        yield c
