"""Relaying a request to the worker that owns its partition: only to a member's URL that
matches LEDGER_PEER_URL_PATTERN, never through a redirect; and 503s that keep their
cause in the log. A loopback HTTP server stands in for the other worker."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from confluent_kafka import KafkaException

from streams.api import web as ledger_web
from streams.api.web import Api, ApiError
from streams.settings import Settings

S = Settings(dev_mode=True)


def run(coro):
    """asyncio.run on a thread of its own: the browser tests' Playwright keeps a loop
    running on the main thread for the session."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def api_owned_by(url: str, session: aiohttp.ClientSession | None = None) -> Api:
    """An Api whose group says partition 0 is served at ``url``."""
    assignor = SimpleNamespace(tables_metadata=lambda: {url: {S.changelog_topic: [0]}})
    return Api(SimpleNamespace(assignor=assignor, http_client=session), S)  # type: ignore[arg-type]


class View:
    def bytes(self, body: bytes, content_type: str, status: int) -> tuple[int, bytes]:
        return status, body


@pytest.mark.parametrize("url", ["http://10.0.0.7:6066/admin", "http://user@w2:6066",
                                 "https://w2:6066", "file:///etc/passwd", "http://w2"])
def test_an_owner_url_outside_the_pattern_is_not_relayed_to(url):
    with pytest.raises(ApiError) as err:
        api_owned_by(url).target(make_mocked_request("GET", "/accounts/a"), 0)
    assert err.value.status == 503 and err.value.doc["error"] == "owner_unreachable"


def test_a_member_url_in_the_pattern_is_relayed_to():
    _, target = api_owned_by("http://worker-2.internal:6067").target(
        make_mocked_request("GET", "/accounts/a?x=1"), 0)
    assert str(target) == "http://worker-2.internal:6067/accounts/a?x=1"


def test_a_redirect_from_the_owner_is_not_followed():
    hits: list[str] = []

    async def redirect(_: web.Request) -> web.Response:
        hits.append("redirect")
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(_: web.Request) -> web.Response:
        hits.append("elsewhere")
        return web.json_response({"secret": 1})

    async def main() -> int:
        app = web.Application()
        app.router.add_get("/accounts/a", redirect)
        app.router.add_get("/elsewhere", elsewhere)
        async with TestServer(app, host="127.0.0.1") as server, \
                aiohttp.ClientSession() as session:
            api = api_owned_by(f"http://127.0.0.1:{server.port}", session)
            try:
                await api.forward(View(), make_mocked_request("GET", "/accounts/a"), 0)
            except ApiError as exc:
                return exc.status
            return 200

    assert run(main()) == 503
    assert hits == ["redirect"]


def test_a_broker_failure_is_logged_not_told(monkeypatch, caplog):
    def refused(_s: Settings) -> None:
        raise KafkaException("SASL authentication failed for user app at 10.1.2.3:9093")

    monkeypatch.setattr(ledger_web, "LedgerClient", refused)
    with pytest.raises(ApiError) as err:
        run(api_owned_by("http://w2:6066").client())
    assert err.value.status == 503 and err.value.doc["error"] == "broker_unavailable"
    assert "10.1.2.3" not in str(err.value.doc) and "SASL" not in str(err.value.doc)
    assert any("10.1.2.3" in getattr(r, "error", "") for r in caplog.records)


def request_from(address: str, headers: dict[str, str] | None = None):
    transport = SimpleNamespace(get_extra_info=lambda name, default=None:
                                (address, 50000) if name == "peername" else default,
                                is_closing=lambda: False)
    return make_mocked_request("GET", "/accounts/a/stream", headers=headers or {},
                               transport=transport)


def test_one_caller_holds_a_few_streams_not_the_worker(monkeypatch):
    api = api_owned_by("http://w2:6066")
    held = contextlib.ExitStack()
    for _ in range(ledger_web.MAX_STREAMS_PER_CLIENT):
        held.enter_context(api.stream_slot(request_from("10.0.0.9"), "", peer=False))
    with pytest.raises(ApiError) as err:
        held.enter_context(api.stream_slot(request_from("10.0.0.9"), "", peer=False))
    assert err.value.status == 503 and err.value.doc["error"] == "too_many_streams"
    with api.stream_slot(request_from("10.0.0.10"), "", peer=False):  # someone else
        assert api.streams == ledger_web.MAX_STREAMS_PER_CLIENT + 1
    # a principal is one caller from any address; a header claiming a relay changes
    # nothing unless it comes from a member's host
    for i in range(ledger_web.MAX_STREAMS_PER_CLIENT):
        held.enter_context(api.stream_slot(request_from(f"10.1.0.{i}"), "alice", peer=False))
    with pytest.raises(ApiError):
        api.stream_slot(request_from("10.2.0.1"), "alice", peer=False).__enter__()
    forged = request_from("10.0.0.9", {ledger_web.ROUTED_HEADER: "http://w2:6066"})
    assert not run(api.from_peer(forged))  # w2 does not resolve to 10.0.0.9
    relayed = request_from("127.0.0.1", {ledger_web.ROUTED_HEADER: "http://localhost:6067"})
    assert not run(api.from_peer(relayed))  # not a member
    member = api_owned_by("http://localhost:6067")
    assert run(member.from_peer(relayed))
    held.close()
    assert api.streams == 0 and api.streams_of == {}


def test_a_client_that_stops_reading_is_let_go(monkeypatch):
    class Stuck:
        async def write(self, data: bytes) -> None:
            await asyncio.sleep(60)

    monkeypatch.setattr(ledger_web, "STREAM_WRITE_TIMEOUT_S", 0.05)
    with pytest.raises(TimeoutError):
        run(ledger_web.write(Stuck(), b"data: x\n\n"))  # type: ignore[arg-type]
