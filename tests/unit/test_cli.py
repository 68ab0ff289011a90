"""The command line's parsing (what reaches each command), without a broker."""

from __future__ import annotations

import argparse

import pytest

from streams import cli


@pytest.mark.parametrize("argv", [
    ["submit", "deposit", "alice", "1.00 USD", "--json"],
    ["--json", "submit", "deposit", "alice", "1.00 USD"],
    ["submit", "open", "alice", "USD", "--json"],
    ["submit", "close", "alice", "--json"],
])
def test_json_is_taken_before_or_after_a_submitted_command(argv, monkeypatch):
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "cmd_submit", lambda args: seen.append(args) or 0)
    assert cli.main(argv) == 0
    assert seen[0].json is True


def test_balance_and_history_default_to_this_machines_web_port(monkeypatch):
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "cmd_balance", lambda args: seen.append(args) or 0)
    monkeypatch.setattr(cli, "cmd_history", lambda args: seen.append(args) or 0)
    monkeypatch.delenv("LEDGER_URL", raising=False)
    monkeypatch.setenv("LEDGER_WEB_PORT", "7171")
    assert cli.main(["balance", "alice"]) == 0 and cli.main(["history", "alice"]) == 0
    assert [a.url for a in seen] == ["http://127.0.0.1:7171"] * 2
    monkeypatch.setenv("LEDGER_URL", "http://worker-2:6066")
    assert cli.main(["balance", "alice"]) == 0
    assert seen[-1].url == "http://worker-2:6066"


@pytest.mark.parametrize(("text", "ms"), [
    ("1767225600000", 1_767_225_600_000),
    ("2026-01-01T00:00:00Z", 1_767_225_600_000),
    ("2026-01-01T01:00:00+01:00", 1_767_225_600_000),
    ("2026-01-01T00:00:00.0019", 1_767_225_600_001),  # microseconds: rounded down
    ("1969-12-31T23:59:59.9995Z", -1),  # before 1970: still down, not toward zero
    ("9999-12-31T23:59:59.999Z", 253_402_300_799_999),  # exact where a float is not
])
def test_instants_are_parsed_to_exact_milliseconds(text, ms):
    assert cli.parse_instant(text) == ms


def submitted(argv: list[str], monkeypatch) -> object:
    """The command ``ledger submit ...`` would send (or the exit status it refuses with)."""
    seen: list[object] = []

    def fake(args: argparse.Namespace) -> int:
        try:
            seen.append(cli._command(args.kind, args))
        except ValueError as exc:
            seen.append(exc)
        return 0

    monkeypatch.setattr(cli, "cmd_submit", fake)
    assert cli.main(["submit", *argv]) == 0
    return seen[0]


def test_meta_goes_on_any_command_that_carries_metadata(monkeypatch):
    opened = submitted(["--meta", "tier=gold", "--meta", "kyc=", "open", "al", "USD"],
                       monkeypatch)
    assert opened.metadata == {"tier": "gold", "kyc": ""}
    moved = submitted(["--meta", "order=o-1", "transaction", "al", "--posting", "al", "bo",
                       "1.00 USD"], monkeypatch)
    assert (moved.metadata, moved.postings[0].amount_minor) == ({"order": "o-1"}, 100)
    assert submitted(["set-metadata", "al"], monkeypatch).metadata == {}  # clears it
    refused = submitted(["--meta", "a=b", "close", "al"], monkeypatch)
    assert isinstance(refused, ValueError) and "close carries no metadata" in str(refused)
    too_many = submitted([*[f"--meta=k{i}=v" for i in range(17)], "deposit", "al", "1.00 USD"],
                         monkeypatch)
    assert isinstance(too_many, ValueError) and "metadata" in str(too_many)
