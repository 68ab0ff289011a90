"""Exit statuses of ``ledger`` and of a worker, in one place (sysexits.h where one fits),
and how a child process ends with the one that started it.

A supervisor can tell them apart: restart on UNAVAILABLE or INTERNAL; fix the settings
on NO_PERMISSION or CONFIG, where a restart does not help.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

REFUSED = 1  # the command ran and the answer is no: a rejection, an unknown account
USAGE = 2  # bad input on the command line, or the worker asked did not answer
TIMEOUT = 3  # submitted, and no outcome came in time
UNAVAILABLE = 69  # EX_UNAVAILABLE: no Kafka broker answered
INTERNAL = 70  # EX_SOFTWARE: one of the worker's services failed
NO_PERMISSION = 77  # EX_NOPERM: the broker refused the login or the TLS handshake
CONFIG = 78  # EX_CONFIG: settings unsafe outside development mode


_PR_SET_PDEATHSIG = 1
# Looked up before a fork: a forked child should do as little as possible before exec.
_PRCTL: Callable[..., int] | None = (
    ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
)


def can_die_with_parent() -> bool:
    return _PRCTL is not None


def die_with_parent(parent: int | None = None) -> None:
    """In a child process: SIGKILL it when the *thread* that forked it exits (Linux; a
    no-op elsewhere). Start such children from the main thread only.

    ``parent``: the pid of the process that started this one. A child that gets here
    after its parent died (a kill -9 while the child was starting) is not signalled:
    it exits now instead."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if parent is not None and os.getppid() != parent:
            os._exit(0)
