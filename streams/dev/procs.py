"""Start and stop ``ledger worker`` processes (for the demo, the benchmark and tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from streams.settings import Settings


def settings_env(s: Settings) -> dict[str, str]:
    """The ``LEDGER_*`` variables that reproduce ``s`` in a child process."""
    env: dict[str, str] = {}
    for name, value in s.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"LEDGER_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """One ``ledger worker`` child process with its own data dir and web port."""

    def __init__(self, s: Settings, log_path: Path, extra_env: dict[str, str] | None = None):
        self.settings = s
        self.log_path = log_path
        self.url = f"http://{s.web_host}:{s.web_port}"
        env = {**os.environ, **settings_env(s), **(extra_env or {})}
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], env=env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; "
                                   f"log:\n{self.log_tail()}")
            try:
                if self.get("/health/ready", timeout_s=2)[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready in {timeout_s}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the crash the ledger is built to survive."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()
        return int(self.proc.returncode)
