"""The page's files and the event stream it follows, over plain HTTP (no browser)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from schemas.models import Deposit, OpenAccount
from streams.partitions import partition_for

pytestmark = pytest.mark.kafka


def open_stream(url: str, last_event_id: str | None = None, timeout_s: float = 30.0):
    """GET a stream, asking again while the worker answers 503 (history catching up) or
    404 (the account's first event is not indexed yet: reads lag outcomes slightly)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    req = urllib.request.Request(url, headers=headers)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resp = urllib.request.urlopen(req, timeout=30)
        except urllib.error.HTTPError as exc:
            assert exc.code in (404, 503) and time.monotonic() < deadline, \
                (exc.code, exc.read())
            time.sleep(0.2)
            continue
        assert resp.headers.get_content_type() == "text/event-stream"
        return resp


def test_static_files_and_stream_endpoint(start_worker, client):
    w = start_worker()
    with urllib.request.urlopen(w.url + "/", timeout=10) as resp:
        assert resp.headers.get_content_type() == "text/html"
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert b'<script src="/static/app.js" defer>' in resp.read()
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        with urllib.request.urlopen(f"{w.url}/static/{name}", timeout=10) as resp:
            assert resp.headers.get_content_type() == ctype
    for path in ("/static/nope.js", "/static/..%2Fweb.py", "/static/openapi.yaml"):
        try:
            urllib.request.urlopen(w.url + path, timeout=10)
            raise AssertionError(path)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and json.loads(exc.read())["error"] == "not_found", path

    for c in (OpenAccount(command_id="o", account_id="dave", actor="t", issued_at=1,
                          currency="EUR"),
              Deposit(command_id="d", account_id="dave", actor="t", issued_at=2,
                      amount_minor=2**53, currency="EUR")):
        assert client.submit(c).result(timeout=60).accepted
    # The stream: versions from Last-Event-ID on, then a new one as it happens.
    resp = open_stream(w.url + "/accounts/dave/stream", last_event_id="1")
    with resp:
        got = read_events(resp, 1)
        assert [(e["version"], e["balance_after_minor"]) for e in got] == [(2, 2**53)]
        client.submit(Deposit(command_id="d2", account_id="dave", actor="t", issued_at=3,
                              amount_minor=1, currency="EUR")).result(timeout=60)
        got = read_events(resp, 1)
        assert [(e["version"], e["balance_after_minor"]) for e in got] == [(3, 2**53 + 1)]
    try:
        urllib.request.urlopen(w.url + "/accounts/nobody/stream", timeout=10)
        raise AssertionError("no 404")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404 and json.loads(exc.read())["error"] == "account_not_found"

    # An open stream does not hold up the worker's shutdown, and it ends cleanly.
    with open_stream(w.url + "/accounts/dave/stream?from_version=3") as resp:
        assert [e["version"] for e in read_events(resp, 1)] == [3]
        started = time.monotonic()
        assert w.stop() == 0
        assert time.monotonic() - started < 20
        assert resp.read().strip() in (b"", b": idle")  # then the end of the stream


def read_events(resp, n: int) -> list[dict]:
    """The next ``n`` ledger events of an open text/event-stream response."""
    out: list[dict] = []
    event_id = None
    while len(out) < n:
        line = resp.readline().decode()
        assert line, "the stream ended"
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            doc = json.loads(line[6:])
            assert doc["version"] == event_id
            out.append(doc)
    return out



def test_stream_through_a_worker_that_does_not_own_the_account(ledger_settings, start_worker,
                                                               client):
    w1, w2 = start_worker("w1"), start_worker("w2")
    deadline = time.monotonic() + 90
    while True:  # both workers own some partitions
        parts = {w.url: w.get("/health/ready")[1].get("partitions", []) for w in (w1, w2)}
        if all(parts.values()) and sum(map(len, parts.values())) == ledger_settings.partitions:
            break
        assert time.monotonic() < deadline, parts
        time.sleep(0.2)
    account = next(f"acct-{i}" for i in range(1000)
                   if partition_for(f"acct-{i}", ledger_settings.partitions) in parts[w1.url])
    assert client.submit(OpenAccount(command_id="o", account_id=account, actor="t",
                                     issued_at=1, currency="USD")).result(timeout=60).accepted
    # w2 relays w1's stream as it comes, new events included.
    with open_stream(f"{w2.url}/accounts/{account}/stream?from_version=1") as resp:
        assert [e["type"] for e in read_events(resp, 1)] == ["AccountOpened"]
        assert client.submit(Deposit(command_id="d", account_id=account, actor="t",
                                     issued_at=2, amount_minor=42,
                                     currency="USD")).result(timeout=60).accepted
        got = read_events(resp, 1)
        assert [(e["version"], e["amount_minor"]) for e in got] == [(2, 42)]
