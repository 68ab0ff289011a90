"""``ledger demo --serve`` stops on Ctrl-C however it was started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVE = """
from streams.dev.demo import serve_until_interrupted

class Worker:  # a worker that runs until stopped
    url = "http://127.0.0.1:1"
    class proc:
        @staticmethod
        def poll():
            return None

serve_until_interrupted(Worker())
print("stopped", flush=True)
"""


def test_ctrl_c_stops_the_page_even_when_sigint_was_ignored_at_start():
    """Started with SIGINT ignored (a script's background job, nohup), Python leaves it
    ignored: the demo's page stayed up for ever, and CI's demo test timed out."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while "the page" not in proc.stdout.readline():
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read().strip().endswith("stopped")
    finally:
        proc.kill()
