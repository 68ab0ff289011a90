"""The read side of metadata on the real broker: an account's in GET /accounts/{id}, each
event's in its JSON, GET /accounts/{id}/events?meta.KEY=VALUE (both sides of a transfer,
every step of a transaction, paged), ``ledger history --meta`` and ``ledger balance``;
metadata over POST /commands, within its bounds or refused with pydantic's reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
from typing import Any

import pytest

from schemas.models import AccountOpened, Deposited, LedgerEvent, encode
from streams.dev.procs import settings_env
from streams.settings import Settings
from tests.integration.test_http_api import call, command, until
from tests.unit.test_history import Indexed, Msg

pytestmark = pytest.mark.kafka

ORDER = {"order": "o-1", "channel": "web"}


def post(url: str, kind: str, command_id: str, account: str, **fields: Any) -> dict[str, Any]:
    status, doc = call(url, "/commands?wait=true", command(
        kind, command_id, account, int(time.time() * 1000), **fields))
    assert status == 200 and doc["accepted"], doc
    return doc


def events(url: str, account: str, **meta: str) -> list[dict[str, Any]]:
    """Every event of the account with this metadata, following next_from_version."""
    found: list[dict[str, Any]] = []
    version: int | None = 1
    while version is not None:
        query = urllib.parse.urlencode({"from_version": version, "limit": 1000,
                                        **{f"meta.{k}": v for k, v in meta.items()}})
        status, page = call(url, f"/accounts/{account}/events?{query}")
        assert status == 200, page
        found += page["events"]
        version = page["next_from_version"]
    return found


def test_metadata_on_accounts_and_events_and_finding_events_by_it(
        ledger_settings, start_worker):
    w = start_worker()
    opened = post(w.url, "OpenAccount", "o-shop", "shop", currency="USD",
                  metadata={"tier": "gold"})
    assert opened["events"][0]["metadata"] == {"tier": "gold"}
    post(w.url, "OpenAccount", "o-buyer", "buyer", currency="USD")
    post(w.url, "Deposit", "d-1", "buyer", amount_minor=10_000, currency="USD", metadata=ORDER)
    post(w.url, "Deposit", "d-2", "buyer", amount_minor=5, currency="USD",
         metadata={"order": "o-2", "channel": "web"})
    post(w.url, "Transfer", "t-1", "buyer", to_account_id="shop", amount_minor=300,
         currency="USD", metadata={"order": "o-1", "channel": "pos"})
    post(w.url, "Transaction", "x-1", "buyer", metadata={"order": "o-1"}, postings=[
        {"from_account_id": "buyer", "to_account_id": "shop", "amount_minor": 100,
         "currency": "USD"}])
    changed = post(w.url, "SetAccountMetadata", "m-1", "shop",
                   metadata={"tier": "silver", "kyc": "ok"})
    assert [(e["type"], e["payload"], e["metadata"]) for e in changed["events"]] == [
        ("AccountMetadataSet", {"metadata": {"tier": "silver", "kyc": "ok"}}, {})]

    # the account's metadata: its opening's, then what SetAccountMetadata set (GET
    # /accounts reads the worker's state, which trails the outcome by a moment)
    until(lambda: call(w.url, "/accounts/shop")[1]["metadata"] == {"tier": "silver",
                                                                   "kyc": "ok"})
    assert call(w.url, "/accounts/buyer")[1]["metadata"] == {}

    # once the transaction has posted at both and the history index has every event
    # (503 history_catching_up until it has read the partitions)
    def indexed(account: str) -> int:
        status, page = call(w.url, f"/accounts/{account}/events?limit=1000")
        return len(page["events"]) if status == 200 else 0

    until(lambda: indexed("buyer") == 8 and indexed("shop") == 5, 60)

    every = events(w.url, "buyer")
    assert all("metadata" in e for e in every)
    assert [e["metadata"] for e in every[:3]] == [{}, ORDER, {"order": "o-2", "channel": "web"}]

    # only the events with order=o-1: the deposit, the transfer's debit and every step of
    # the transaction here; its credit and the transaction's steps at the other account
    mine = events(w.url, "buyer", order="o-1")
    assert [e["type"] for e in mine] == [
        "Deposited", "TransferDebited", "TransactionStarted", "TransactionReserved",
        "TransactionCommitted", "TransactionPosted"]
    assert all(e["metadata"]["order"] == "o-1" for e in mine)
    assert [e["version"] for e in mine] == sorted(e["version"] for e in mine)
    theirs = events(w.url, "shop", order="o-1")
    assert [e["type"] for e in theirs] == [
        "TransferCredited", "TransactionReserved", "TransactionPosted"]
    assert [(e["type"], e["metadata"]) for e in events(w.url, "shop", tier="gold")] == [
        ("AccountOpened", {"tier": "gold"})]  # the opening's event carries the opening's

    # two filters: both must match; the same key twice: both values (so none)
    for account, kind in (("buyer", "TransferDebited"), ("shop", "TransferCredited")):
        both = events(w.url, account, order="o-1", channel="pos")
        assert [(e["type"], e["metadata"]) for e in both] == [
            (kind, {"order": "o-1", "channel": "pos"})]
    status, page = call(w.url, "/accounts/buyer/events?meta.order=o-1&meta.order=o-2")
    assert (status, page["events"], page["next_from_version"]) == (200, [], None)

    # no match: an empty last page; an account that does not exist: 404
    status, page = call(w.url, "/accounts/buyer/events?meta.order=o-9")
    assert (status, page) == (200, {"account_id": "buyer", "events": [],
                                    "next_from_version": None})
    status, page = call(w.url, "/accounts/nobody/events?meta.order=o-1")
    assert (status, page["error"]) == (404, "account_not_found")

    # pages of one: each goes on after the last event it looked at
    status, page = call(w.url, "/accounts/buyer/events?meta.order=o-1&limit=1")
    assert status == 200 and [e["type"] for e in page["events"]] == ["Deposited"]
    assert page["next_from_version"] == page["events"][0]["version"] + 1
    status, page = call(w.url, f"/accounts/buyer/events?meta.order=o-1&limit=1"
                               f"&from_version={page['next_from_version']}")
    assert [e["type"] for e in page["events"]] == ["TransferDebited"]

    # a filter no metadata could hold: 422, naming it
    for query, parameter in (
        ("meta.=x", "meta."),
        ("meta." + "k" * 65 + "=x", "meta." + "k" * 65),
        ("meta.k=" + "v" * 257, "meta.k"),
        ("meta.k=a%0Ab", "meta.k"),
        ("&".join(f"meta.k{i}=v" for i in range(17)), None),
    ):
        status, doc = call(w.url, f"/accounts/buyer/events?{query}")
        assert (status, doc["error"]) == (422, "invalid_metadata_filter"), query
        assert doc.get("parameter") == parameter, doc
    # at the limits it is a filter like any other
    status, page = call(w.url, "/accounts/buyer/events?meta." + "k" * 64 + "=" + "v" * 256)
    assert (status, page["events"]) == (200, [])

    # the command line: ledger history --meta, ledger balance
    env = {**os.environ, **settings_env(ledger_settings)}

    def ledger(*args: str) -> tuple[int, str, str]:
        r = subprocess.run([sys.executable, "-m", "streams.cli", *args, "--url", w.url],
                           env=env, capture_output=True, text=True, timeout=120, check=False)
        return r.returncode, r.stdout, r.stderr

    rc, out, err = ledger("history", "buyer", "--meta", "order=o-1", "--meta", "channel=pos")
    assert rc == 0, err
    (line,) = out.strip().splitlines()
    assert "TransferDebited" in line and line.endswith("{order=o-1, channel=pos}"), line
    rc, out, err = ledger("history", "buyer", "--meta", "order=o-1", "--json")
    assert rc == 0, err
    assert [e["type"] for e in json.loads(out)["events"]] == [e["type"] for e in mine]
    rc, out, err = ledger("history", "buyer", "--meta", "order=o-1", "--limit", "2")
    assert [ln.split()[2] for ln in out.strip().splitlines()] == [
        "Deposited", "TransferDebited"], err
    rc, out, err = ledger("history", "buyer", "--meta", "order=o-9")
    assert (rc, out.strip()) == (0, "buyer: no events with order=o-9 from version 1"), err
    rc, out, err = ledger("balance", "shop")
    assert rc == 0 and out.strip().splitlines()[-1] == "  metadata tier=silver, kyc=ok", out


def test_metadata_over_post_commands_within_its_bounds(start_worker):
    w = start_worker()
    t = int(time.time() * 1000)
    post(w.url, "OpenAccount", "o", "acct", currency="USD")
    most = {f"k{i:02}" + "k" * 61: "v" * 256 for i in range(16)}  # 16 keys of 64, values of 256
    for kind, fields in (
        ("Deposit", {"amount_minor": 500, "currency": "USD"}),
        ("Withdraw", {"amount_minor": 1, "currency": "USD"}),
        ("PlaceHold", {"hold_id": "h", "amount_minor": 2, "currency": "USD",
                       "expires_at": t + 3_600_000}),
        ("CaptureHold", {"hold_id": "h"}),
        ("SetAccountMetadata", {}),
    ):
        doc = post(w.url, kind, f"c-{kind}", "acct", metadata=most, **fields)
        e = doc["events"][0]
        assert (e["payload"]["metadata"] if kind == "SetAccountMetadata"
                else e["metadata"]) == most, kind
    post(w.url, "SetAccountMetadata", "clear", "acct", metadata={})
    assert until(lambda: call(w.url, "/accounts/acct")[1]["metadata"] == {})

    base = command("Deposit", "bad", "acct", t, amount_minor=1, currency="USD")
    for metadata, loc, error in (
        ({f"k{i}": "v" for i in range(17)}, ["metadata"], "too_long"),
        ({"k" * 65: "v"}, ["metadata", "k" * 65, "[key]"], "string_too_long"),
        ({"": "v"}, ["metadata", "", "[key]"], "string_too_short"),
        ({"k": "v" * 257}, ["metadata", "k"], "string_too_long"),
        ({"k": "line\nbreak"}, ["metadata", "k"], "value_error"),
        ({"k": 1}, ["metadata", "k"], "string_type"),
    ):
        status, doc = call(w.url, "/commands?wait=true", {**base, "metadata": metadata})
        assert (status, doc["error"]) == (422, "invalid_command"), doc
        assert [(e["loc"], e["type"]) for e in doc["errors"]] == [(loc, error)], doc
    status, doc = call(w.url, "/commands?wait=true", command(
        "SetAccountMetadata", "none", "acct", t))  # which metadata: it is required
    assert (status, doc["errors"][0]["loc"], doc["errors"][0]["type"]) == (
        422, ["metadata"], "missing")
    status, doc = call(w.url, "/commands?wait=true", command(
        "ReleaseHold", "r", "acct", t, hold_id="h", metadata={"a": "b"}))
    assert (status, doc["errors"][0]["type"]) == (422, "extra_forbidden")  # it has none


def test_a_filtered_look_is_bounded_and_goes_on_where_it_stopped(tmp_path):
    history = Indexed(Settings(data_dir=tmp_path))
    try:
        history._index([Msg(0, v, raw) for v, raw in enumerate(
            tagged("acct", v, {"order": "o-1"} if v % 3 == 0 else {"order": "o-10"})
            for v in range(1, 11))], frozenset({0}))
        want = [("order", "o-1")]
        # versions 3, 6, 9 match: "o-10" holds the bytes of "o-1" and is decoded, not taken
        found, after = history.matching("acct", 1, 100, want, 100)
        assert ([e.version for e in found], after) == ([3, 6, 9], None)
        assert found[0] == history.events("acct", 3, 1)[0]
        found, after = history.matching("acct", 1, 100, want, 4)  # looks at 1..4
        assert ([e.version for e in found], after) == ([3], 5)
        found, after = history.matching("acct", 5, 100, want, 4)  # 5..8
        assert ([e.version for e in found], after) == ([6], 9)
        found, after = history.matching("acct", 9, 100, want, 4)  # 9, 10: the end
        assert ([e.version for e in found], after) == ([9], None)
        found, after = history.matching("acct", 1, 1, want, 100)  # the limit first
        assert ([e.version for e in found], after) == ([3], 4)
        assert history.matching("acct", 1, 100, [("order", "o-1"), ("x", "")], 100) == (
            [], None)
        assert history.matching("nobody", 1, 100, want, 100) == ([], None)
    finally:
        history.stop()


def tagged(account: str, version: int, metadata: dict[str, str]) -> bytes:
    payload = AccountOpened(overdraft_limit_minor=0) if version == 1 else \
        Deposited(amount_minor=1)
    return encode(LedgerEvent(
        event_id=f"{account}-{version}", account_id=account, version=version, currency="USD",
        balance_after_minor=version, available_after_minor=version, occurred_at=version,
        command_id=f"c{version}", causation_id=f"c{version}", correlation_id=None,
        actor="t", payload=payload, metadata=metadata))
