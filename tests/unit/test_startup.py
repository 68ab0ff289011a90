"""A worker refuses settings that are unsafe outside a developer's machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import SecretStr

from streams.exits import CONFIG as EXIT_CONFIG
from streams.settings import DEV_LEG_SECRET, Settings

GOOD = SecretStr("k" * 32)


@pytest.mark.parametrize(("updates", "says"), [
    ({"leg_secret": SecretStr(DEV_LEG_SECRET)}, "built-in placeholder"),
    ({"leg_secret": SecretStr("change-me-in-production")}, "built-in placeholder"),
    ({"leg_secret": SecretStr("")}, "is empty"),
    ({"leg_secret": SecretStr("fifteen-bytes!!")}, "is short"),
    ({"leg_secret": GOOD, "web_host": "0.0.0.0"}, "LEDGER_API_TOKEN"),
])
def test_unsafe_settings_are_named(updates, says):
    problems = Settings().model_copy(update=updates).production_problems()
    assert len(problems) == 1 and says in problems[0], problems


def test_safe_settings_have_no_problem():
    assert Settings(leg_secret=GOOD).production_problems() == []
    assert Settings(leg_secret=GOOD, web_host="0.0.0.0",
                    api_token=SecretStr("t")).production_problems() == []
    assert Settings().isolated("x").production_problems() == []  # a random secret


def _worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    # a broker nobody listens on: a worker that got past the check would wait for it
    base.update({"LEDGER_BOOTSTRAP_SERVERS": "127.0.0.1:9", "LEDGER_STARTUP_TIMEOUT_S": "1"})
    return subprocess.run([sys.executable, "-m", "streams.cli", "worker"],
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_a_worker_with_the_built_in_leg_secret_refuses_to_start():
    done = _worker({})
    assert done.returncode == EXIT_CONFIG, done.stderr[-2000:]
    assert "refusing to start" in done.stderr + done.stdout
    assert "LEDGER_DEV_MODE=true" in done.stderr + done.stdout

    allowed = _worker({"LEDGER_DEV_MODE": "true"})  # gets past the check, to the broker
    assert allowed.returncode not in (0, EXIT_CONFIG), allowed.stderr[-2000:]


def test_tokens_name_their_principals():
    s = Settings(api_token=SecretStr("one"), api_tokens=SecretStr(" alice=a1 , bob = b2,bad"))
    assert s.tokens() == {"api": "one", "alice": "a1", "bob": "b2"}
    assert Settings().tokens() == {}
    open_to_all = Settings(leg_secret=GOOD, web_host="0.0.0.0", api_tokens=SecretStr("c=t"))
    assert open_to_all.production_problems() == []
