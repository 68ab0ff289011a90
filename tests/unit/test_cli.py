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
