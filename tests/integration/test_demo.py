"""``ledger demo --serve`` on the session's broker: the scripted day, then the worker
and its page left up until Ctrl-C, which stops them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from streams.dev.kafka_local import free_port

pytestmark = pytest.mark.kafka


def test_the_demo_leaves_its_page_up_until_interrupted(kafka_bootstrap, tmp_path):
    port = free_port()
    env = {**os.environ, "LEDGER_BOOTSTRAP_SERVERS": kafka_bootstrap, "LEDGER_WEB_PORT": str(port)}
    out = open(tmp_path / "demo.out", "w+")  # noqa: SIM115 - read back below
    demo = subprocess.Popen([sys.executable, "-m", "streams.cli", "demo", "--serve"], env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        url = None
        while url is None:
            assert time.monotonic() < deadline and demo.poll() is None, out.name
            time.sleep(0.5)
            for line in (tmp_path / "demo.out").read_text().splitlines():
                if line.startswith("==> the page: "):
                    url = line.split()[3]
        text = (tmp_path / "demo.out").read_text()
        assert "CaptureHold" in text and "rejected  insufficient_funds" in text
        assert url == f"http://127.0.0.1:{port}/"  # the port asked for, when free
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        with urllib.request.urlopen(url + "accounts/alice", timeout=10) as r:
            assert b'"balance_minor"' in r.read()

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        out.close()
    assert "stopping the worker and the broker" in (tmp_path / "demo.out").read_text()
