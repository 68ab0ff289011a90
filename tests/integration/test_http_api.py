"""The worker's HTTP API on the real broker: reads, history, as-of, commands, routing."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from confluent_kafka import Producer

from schemas.models import Deposit, OpenAccount, PlaceHold, Withdraw, encode
from streams.cli import main
from streams.partitions import partition_for

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def call(url: str, path: str, body: Any = None, method: str | None = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, text, ctype = resp.status, resp.read(), resp.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, text, ctype = exc.code, exc.read(), exc.headers.get_content_type()
    assert ctype == "application/json", (status, ctype, text[:200])
    return status, json.loads(text)


def until(fn, timeout_s: float = 30.0):
    """fn() until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = fn()
        if result or time.monotonic() > deadline:
            assert result, f"not true within {timeout_s}s: {result!r}"
            return result
        time.sleep(0.1)


def answer(url: str, path: str, status: int = 200, timeout_s: float = 30.0) -> Any:
    """The body of GET path once it answers ``status`` (history and routing lag behind)."""
    seen: list[tuple[int, Any]] = []

    def attempt() -> Any:
        got = call(url, path)
        seen.append(got)
        return got[1] if got[0] == status else None

    try:
        return until(attempt, timeout_s)
    except AssertionError:
        raise AssertionError(f"GET {path}: wanted {status}, last answers {seen[-3:]}") from None


def command(kind: str, command_id: str, account_id: str, issued_at: int, **fields: Any) -> dict:
    return {"type": kind, "command_id": command_id, "account_id": account_id,
            "actor": "test", "issued_at": issued_at, **fields}


def scripted_history(client, account: str) -> None:
    """v1..v5 at T0, T0+1s, ..., T0+4s."""
    for c in (
        OpenAccount(command_id="o", account_id=account, actor="t", issued_at=T0, currency="USD"),
        Deposit(command_id="d1", account_id=account, actor="t", issued_at=T0 + 1000,
                amount_minor=1000, currency="USD"),
        Withdraw(command_id="w1", account_id=account, actor="t", issued_at=T0 + 2000,
                 amount_minor=300, currency="USD", correlation_id="corr-1"),
        PlaceHold(command_id="h1", account_id=account, actor="t", issued_at=T0 + 3000,
                  hold_id="hold-1", amount_minor=200, currency="USD",
                  expires_at=T0 + 10 * 365 * 86_400_000),
        Deposit(command_id="d2", account_id=account, actor="t", issued_at=T0 + 4000,
                amount_minor=5, currency="USD"),
    ):
        outcome = client.submit(c).result(timeout=60)
        assert outcome.accepted, outcome.rejection


def test_account_events_paging_and_as_of(ledger_settings, start_worker, client, capsys):
    w = start_worker()
    scripted_history(client, "alice")

    now = until(lambda: (d := call(w.url, "/accounts/alice")[1]).get("version") == 5 and d)
    assert (now["balance_minor"], now["available_minor"], now["balance"]) == (705, 505, "7.05 USD")
    assert now["holds"] == {"hold-1": {"amount_minor": 200,
                                       "expires_at": T0 + 10 * 365 * 86_400_000}}

    # events, a page at a time
    page = answer(w.url, "/accounts/alice/events?limit=2")
    assert [e["version"] for e in page["events"]] == [1, 2]
    assert page["next_from_version"] == 3
    opened, deposited = page["events"]
    assert opened["type"] == "AccountOpened" and "amount_minor" not in opened
    assert deposited == {**deposited, "type": "Deposited", "amount_minor": 1000,
                         "balance_after_minor": 1000, "available_after_minor": 1000,
                         "occurred_at": T0 + 1000, "actor": "t", "command_id": "d1",
                         "causation_id": "d1", "correlation_id": None}
    page = answer(w.url, "/accounts/alice/events?from_version=3&limit=2")
    assert [(e["version"], e["type"]) for e in page["events"]] == [(3, "Withdrawn"),
                                                                   (4, "HoldPlaced")]
    assert page["events"][0]["correlation_id"] == "corr-1"
    assert page["events"][1]["available_after_minor"] == 500
    assert page["next_from_version"] == 5
    last = answer(w.url, "/accounts/alice/events?from_version=5&limit=2")
    assert [e["version"] for e in last["events"]] == [5]
    assert last["next_from_version"] is None
    everything = answer(w.url, "/accounts/alice/events")
    assert [e["version"] for e in everything["events"]] == [1, 2, 3, 4, 5]
    assert [e.get("amount_minor") for e in everything["events"]] == [None, 1000, 300, 200, 5]

    # as of an instant: after the last event at or before it
    for as_of, version, balance, available in (
        (str(T0), 1, 0, 0),
        (str(T0 + 999), 1, 0, 0),
        (str(T0 + 1000), 2, 1000, 1000),
        ("2026-01-01T00:00:02Z", 3, 700, 700),
        ("2026-01-01T01:00:03.500+01:00", 4, 700, 500),  # T0 + 3.5s in UTC
        ("2030-01-01T00:00:00", 5, 705, 505),
    ):
        doc = answer(w.url, f"/accounts/alice?as_of={urllib.request.quote(as_of)}")
        assert (doc["version"], doc["balance_minor"], doc["available_minor"]) == \
            (version, balance, available), as_of
        assert doc["status"] == "open"
    status, doc = call(w.url, f"/accounts/alice?as_of={T0 - 1}")
    assert (status, doc["error"]) == (404, "account_not_found")

    # errors: JSON with a code, the right status
    assert call(w.url, "/accounts/nobody")[0] == 404
    status, doc = call(w.url, "/accounts/nobody/events")
    assert (status, doc["error"]) == (404, "account_not_found")
    for path in ("/accounts/alice/events?limit=0", "/accounts/alice/events?limit=1001",
                 "/accounts/alice/events?from_version=x", "/accounts/alice?as_of=yesterday"):
        status, doc = call(w.url, path)
        assert (status, doc["error"]) == (422, "invalid_parameter"), path
    status, doc = call(w.url, "/no/such/path")
    assert (status, doc["error"]) == (404, "not_found")
    status, doc = call(w.url, "/accounts/alice", body={}, method="PUT")
    assert (status, doc["error"]) == (405, "method_not_allowed")

    # the CLI reads the same pages
    capsys.readouterr()
    assert main(["history", "alice", "--url", w.url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [e["version"] for e in doc["events"]] == [1, 2, 3, 4, 5]
    assert main(["history", "alice", "--url", w.url, "--from-version", "2", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("v2     2026-01-01T00:00:01.000Z  Deposited")
    assert "10.00 USD  balance 10.00 USD, available 10.00 USD  [d1 by t]" in lines[0]
    assert "3.00 USD  balance 7.00 USD" in lines[1]
    assert main(["history", "nobody", "--url", w.url]) == 1
    assert "account_not_found" in capsys.readouterr().out
    # without --url or LEDGER_URL: the worker on this machine's LEDGER_WEB_PORT
    with pytest.MonkeyPatch.context() as env:
        env.delenv("LEDGER_URL", raising=False)
        env.setenv("LEDGER_WEB_PORT", w.url.rsplit(":", 1)[1])
        assert main(["balance", "alice"]) == 0
        assert capsys.readouterr().out.startswith("alice: balance")
        env.setenv("LEDGER_WEB_PORT", "9")  # nothing listens: said, not a traceback
        assert main(["balance", "alice"]) == 2
        assert "no answer from http://127.0.0.1:9" in capsys.readouterr().err


def test_a_statement_over_http_and_the_cli(ledger_settings, start_worker, client, capsys):
    w = start_worker()
    scripted_history(client, "stella")
    period = f"from={T0 + 1500}&to=2026-01-01T00:00:04Z"  # v3 and v4; v5 is at the end

    doc = until(lambda: (d := call(w.url, f"/accounts/stella/statement?{period}")[1])
                .get("entries") and d)
    assert (doc["opening_balance"], doc["closing_balance"]) == ("10.00 USD", "7.00 USD")
    assert [(e["version"], e["type"], e["amount_minor"]) for e in doc["entries"]] == [
        (3, "Withdrawn", -300), (4, "HoldPlaced", 0)]
    req = urllib.request.Request(f"{w.url}/accounts/stella/statement?{period}&format=csv")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers.get_content_type() == "text/csv"
        rows = resp.read().decode().splitlines()
    assert rows[1].endswith("opening balance,,,,,,10.00 USD")
    assert rows[2].split(",")[2:4] == ["Withdrawn", "Withdrawn"] and len(rows) == 5

    for path, status, error in (
        ("/accounts/stella/statement?from=1", 422, "invalid_parameter"),
        ("/accounts/stella/statement?from=x&to=1", 422, "invalid_parameter"),
        ("/accounts/nobody/statement?from=1&to=2", 404, "account_not_found"),
    ):
        got, body = call(w.url, path)
        assert (got, body["error"]) == (status, error), path

    capsys.readouterr()
    assert main(["statement", "stella", "--url", w.url, "--from", str(T0 + 1500),
                 "--to", "2026-01-01T00:00:04Z", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == rows
    assert main(["statement", "stella", "--url", w.url, "--from", str(T0), "--to",
                 "2027-01-01"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[1].split() == ["opening", "balance", "0.00", "USD"] and len(lines) == 8
    assert lines[-1].split() == ["closing", "balance", "7.05", "USD"]


def test_duplicate_event_records_appear_once(ledger_settings, start_worker, client):
    s = ledger_settings
    w = start_worker()
    first = client.submit(OpenAccount(command_id="o", account_id="dup", actor="t",
                                      issued_at=T0, currency="EUR")).result(timeout=60)
    # The same record again on the topic, as a worker that crashed mid-batch sends it.
    producer = Producer(s.producer_config())
    producer.produce(s.events_topic, encode(first.events[0]), b"dup",
                     partition=partition_for("dup", s.partitions))
    assert producer.flush(30) == 0
    client.submit(Deposit(command_id="d", account_id="dup", actor="t", issued_at=T0 + 1,
                          amount_minor=7, currency="EUR")).result(timeout=60)
    page = until(lambda: (p := call(w.url, "/accounts/dup/events")[1]).get("events")
                 and p["events"][-1]["version"] == 2 and p)
    assert [e["version"] for e in page["events"]] == [1, 2]


def test_history_resumes_after_restart(ledger_settings, start_worker, client):
    w = start_worker()
    scripted_history(client, "carol")
    answer(w.url, "/accounts/carol/events?from_version=5")
    assert w.stop() == 0
    w2 = start_worker(data_dir=w.settings.data_dir)  # same data dir: history kept
    client.submit(Deposit(command_id="d3", account_id="carol", actor="t", issued_at=T0 + 5000,
                          amount_minor=1, currency="USD")).result(timeout=60)
    page = until(lambda: (p := call(w2.url, "/accounts/carol/events")[1]).get("events")
                 and len(p["events"]) == 6 and p)
    assert [e["version"] for e in page["events"]] == [1, 2, 3, 4, 5, 6]


def test_post_commands(ledger_settings, start_worker):
    w = start_worker()
    url = w.url

    status, doc = call(url, "/commands?wait=true",
                       command("OpenAccount", "o1", "bob", T0, currency="USD"))
    assert status == 200 and doc["accepted"] is True
    assert [(e["type"], e["version"]) for e in doc["events"]] == [("AccountOpened", 1)]

    status, doc = call(url, "/commands?wait=true",
                       command("Deposit", "d1", "bob", T0 + 1, amount_minor=1234,
                               currency="USD"))
    assert status == 200
    assert (doc["events"][0]["balance_after_minor"], doc["events"][0]["amount_minor"]) == \
        (1234, 1234)

    # the same command again: the same outcome, applied once
    status, again = call(url, "/commands?wait=true",
                         command("Deposit", "d1", "bob", T0 + 1, amount_minor=1234,
                                 currency="USD"))
    assert (status, again["events"]) == (200, doc["events"])

    # without wait: 202 now, the event shortly
    status, doc = call(url, "/commands", command("Withdraw", "w1", "bob", T0 + 2,
                                                 amount_minor=34, currency="USD"))
    assert (status, doc) == (202, {"command_id": "w1", "status": "submitted"})
    until(lambda: call(url, "/accounts/bob")[1].get("balance_minor") == 1200)

    # refused by the rules: 409 for a conflict with the state, 422 otherwise
    refusals = [
        (command("OpenAccount", "o2", "bob", T0 + 3, currency="USD"), 409,
         "account_already_exists"),
        (command("Deposit", "d2", "bob", T0 + 3, amount_minor=1, currency="USD",
                 expected_version=1), 409, "version_conflict"),
        (command("Deposit", "d1", "bob", T0 + 3, amount_minor=999, currency="USD"), 409,
         "idempotency_key_reused"),
        (command("Withdraw", "w2", "bob", T0 + 3, amount_minor=100_000, currency="USD"), 422,
         "insufficient_funds"),
        (command("Deposit", "d3", "nobody", T0 + 3, amount_minor=1, currency="USD"), 422,
         "account_not_found"),
        (command("Deposit", "d4", "bob", T0 + 3, amount_minor=0, currency="USD"), 422,
         "invalid_amount"),  # refused before it is sent
    ]
    for body, want_status, reason in refusals:
        status, doc = call(url, "/commands?wait=true", body)
        assert (status, doc["error"], doc["accepted"], doc["reason"]) == \
            (want_status, reason, False, reason), body

    # invalid: 422 with the validation errors, nothing sent
    invalid = [
        ({"type": "Deposit", "command_id": "x"}, {"account_id", "actor", "issued_at",
                                                  "amount_minor", "currency"}),
        (command("Deposit", "x", "bob", T0, amount_minor="12", currency="USD"),
         {"amount_minor"}),
        (command("Deposit", "x", "bob", T0, amount_minor=12.5, currency="USD"),
         {"amount_minor"}),
        (command("Deposit", "x", "bob", T0, amount_minor=1, currency="USD", color="red"),
         {"color"}),
        (command("Deposit", "x", "bob", T0, amount_minor=2**64, currency="USD"),
         {"amount_minor"}),
        (command("Deposit", "x\n", "bob", T0, amount_minor=1, currency="USD"), {"command_id"}),
        (command("ExpireHold", "x", "bob", T0, hold_id="h"), {"type"}),
        (command("Teleport", "x", "bob", T0), {"type"}),
        ([1, 2], set()),
    ]
    for body, fields in invalid:
        status, doc = call(url, "/commands?wait=true", body)
        assert (status, doc["error"]) == (422, "invalid_command"), body
        assert {str(e["loc"][0]) for e in doc["errors"] if e["loc"]} == fields, doc
    status, doc = call(url, "/commands", command("Deposit", "d-plain", "bob", T0 + 9,
                                                  amount_minor=1, currency="USD"),
                       headers={"Content-Type": "text/plain"})  # what a cross-site form sends
    assert (status, doc["error"]) == (415, "unsupported_media_type")
    for raw in (b"{not json", b"[" * 200_000, b'{"a":' * 100_000):
        status, doc = call(url, "/commands", raw=raw)
        assert (status, doc["error"]) == (400, "malformed_json"), raw[:10]
    status, doc = call(url, "/commands?wait=maybe", command("CloseAccount", "c", "bob", T0))
    assert (status, doc["error"]) == (422, "invalid_parameter")
    status, _ = call(url, "/commands", method="GET")
    assert status == 405
    for path in ("/router/", "/table/accounts/bob/"):  # Faust's own pages are off
        status, doc = call(url, path)
        assert (status, doc["error"]) == (404, "not_found"), path
    # another site's name pointed at this worker (DNS rebinding): not answered
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "10.9.8.7"):
        for path, body in (("/accounts/bob", None),
                           ("/commands", command("Deposit", "d-rebound", "bob", T0 + 9,
                                                 amount_minor=1, currency="USD"))):
            status, doc = call(url, path, body, headers={"Host": host})
            assert (status, doc["error"]) == (421, "misdirected_request"), (host, path)
    assert call(url, "/accounts/bob", headers={"Host": f"localhost:{port}"})[0] == 200

    final = call(url, "/accounts/bob")[1]
    assert (final["version"], final["balance_minor"]) == (3, 1200)
    # the worker's log stays JSON for machines: no terminal escape codes, and no error
    # at every start for Faust's leader topic (aiokafka may still log a transient one
    # while a fresh broker makes its offsets topic)
    text = w.log_path.read_text()
    assert "\x1b" not in text
    assert "__assignor-__leader not found" not in text
    docs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [d for d in docs if d["logger"].startswith("ledger")
            and d["level"] in ("error", "critical")] == []


def test_submitting_needs_the_token_when_one_is_set(ledger_settings, start_worker):
    w = start_worker(api_token="t0ken-for-this-test")
    open_bob = command("OpenAccount", "o1", "bob", T0, currency="USD")

    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "t0ken-for-this-test"},
                    {"Authorization": "Bearer \xff"}):  # not UTF-8 on the wire
        status, doc = call(w.url, "/commands?wait=true", open_bob, headers=headers)
        assert (status, doc["error"]) == (401, "unauthorized"), headers
        assert "t0ken" not in json.dumps(doc)
    assert answer(w.url, "/accounts/bob", status=404)["error"] == "account_not_found"

    status, doc = call(w.url, "/commands?wait=true", open_bob,
                       headers={"Authorization": "Bearer t0ken-for-this-test"})
    assert status == 200 and doc["accepted"] is True
    assert answer(w.url, "/accounts/bob")["version"] == 1  # reads need no token
    assert "t0ken-for-this-test" not in w.log_path.read_text()


def test_each_caller_has_a_token_and_is_recorded_as_the_actor(ledger_settings, start_worker):
    w = start_worker(api_tokens="alice=tok-alice,bob=tok-bob")
    as_bob = {"Authorization": "Bearer tok-bob"}
    status, doc = call(w.url, "/commands?wait=true",
                       command("OpenAccount", "o1", "x", T0, currency="USD"), headers=as_bob)
    assert status == 200 and doc["events"][0]["actor"] == "bob"
    body = {**command("Deposit", "d1", "x", T0 + 1, amount_minor=5, currency="USD"),
            "actor": "cfo@bank"}  # what the caller writes is not who the caller is
    status, doc = call(w.url, "/commands?wait=true", body,
                       headers={"Authorization": "Bearer tok-alice"})
    assert status == 200 and doc["events"][0]["actor"] == "alice"
    for headers in ({}, {"Authorization": "Bearer tok-carol"}, {"Authorization": "tok-bob"}):
        status, doc = call(w.url, "/commands?wait=true", body, headers=headers)
        assert (status, doc["error"]) == (401, "unauthorized"), headers
    # history follows the events topic and can trail the outcome the caller was told
    events = until(lambda: len(ev := answer(w.url, "/accounts/x/events")["events"]) >= 2
                   and ev)
    assert [(e["version"], e["actor"]) for e in events] == [(1, "bob"), (2, "alice")]


def test_reads_need_the_token_when_told(ledger_settings, start_worker, client):
    token = {"Authorization": "Bearer read-t0ken"}
    w1 = start_worker("w1", api_token="read-t0ken", token_for_reads=True)
    w2 = start_worker("w2", api_token="read-t0ken", token_for_reads=True)

    def split() -> dict[str, list[int]] | None:
        parts = {w.url: call(w.url, "/health/ready")[1].get("partitions", [])
                 for w in (w1, w2)}  # health stays open
        ok = all(parts.values()) and sum(map(len, parts.values())) == ledger_settings.partitions
        return parts if ok else None

    parts = until(split, 90)
    accounts = {}  # one account on a partition of each worker
    for i in range(200):
        owner = w1 if partition_for(f"r-{i}", ledger_settings.partitions) in parts[w1.url] \
            else w2
        accounts.setdefault(owner.url, f"r-{i}")
    for account in accounts.values():
        client.submit(OpenAccount(command_id="o", account_id=account, actor="t",
                                  issued_at=T0, currency="USD")).result(timeout=60)
    for account in accounts.values():  # one of the two is forwarded, with the token
        for path in (f"/accounts/{account}", f"/accounts/{account}/events"):
            assert call(w1.url, path)[1]["error"] == "unauthorized", path
            assert until(lambda path=path: call(w1.url, path, headers=token)[0] == 200)
        path = f"/transactions/none?coordinator={account}"  # read at the coordinator's owner
        assert call(w1.url, path)[1]["error"] == "unauthorized", path
        assert call(w1.url, path, headers=token)[1]["error"] == "transaction_not_found"
    status, doc = call(w1.url, "/metrics")
    assert (status, doc["error"]) == (401, "unauthorized")
    with urllib.request.urlopen(w1.url + "/", timeout=10) as page:  # the page's files: open
        assert page.status == 200


def split_between(workers: tuple[Any, ...], partitions: int) -> dict[str, list[int]]:
    """Each worker's partitions (by its URL), once every partition has an owner and each
    worker has some (waits up to 90 s)."""
    def split() -> dict[str, list[int]] | None:
        parts = {w.url: call(w.url, "/health/ready")[1].get("partitions", []) for w in workers}
        ok = all(parts.values()) and sum(map(len, parts.values())) == partitions
        return parts if ok else None

    return until(split, 90)


def test_any_worker_answers_for_any_account(ledger_settings, start_worker, client):
    w1 = start_worker("w1")
    w2 = start_worker("w2")

    parts = split_between((w1, w2), ledger_settings.partitions)
    # one account on a partition of each worker
    accounts = {}
    for i in range(200):
        p = partition_for(f"acct-{i}", ledger_settings.partitions)
        owner = w1 if p in parts[w1.url] else w2
        accounts.setdefault(owner.url, f"acct-{i}")
    assert len(accounts) == 2
    for n, account in enumerate(accounts.values()):
        scripted_history(client, account)
        client.submit(Deposit(command_id="extra", account_id=account, actor="t",
                              issued_at=T0 + 5000, amount_minor=n + 1,
                              currency="USD")).result(timeout=60)

    for n, (owner_url, account) in enumerate(accounts.items()):
        other = w2 if owner_url == w1.url else w1
        for w in (other, w1 if other is w2 else w2):  # the non-owner first
            doc = until(lambda w=w, account=account: (
                d := call(w.url, f"/accounts/{account}")[1]).get("version") == 6 and d)
            assert (doc["account_id"], doc["balance_minor"]) == (account, 705 + n + 1)
            # history follows the events topic and can trail the account's state
            events = until(lambda w=w, account=account: answer(
                w.url, f"/accounts/{account}/events?from_version=6")["events"])
            assert [e["amount_minor"] for e in events] == [n + 1]
            then = answer(w.url, f"/accounts/{account}?as_of={T0 + 2000}")
            assert (then["version"], then["balance_minor"]) == (3, 700)
    # a missing account on the other worker's partition: its 404, relayed
    for owner_url, account in accounts.items():
        other = w2 if owner_url == w1.url else w1
        missing = next(f"{account}-missing-{i}" for i in range(1000)
                       if partition_for(f"{account}-missing-{i}", ledger_settings.partitions)
                       in parts[owner_url])
        status, doc = call(other.url, f"/accounts/{missing}")
        assert (status, doc["error"], doc["account_id"]) == (404, "account_not_found", missing)
