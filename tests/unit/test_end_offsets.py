"""Asking the broker for end offsets never waits without end."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from streams.ops.topics import end_offsets


class SilentAdmin:
    """An admin client whose list_offsets request never completes."""

    def list_offsets(self, request: dict, request_timeout: float) -> dict:
        return {tp: Future() for tp in request}


def test_a_request_that_never_completes_ends_in_a_timeout():
    """A worker stopped with such a request in flight waited on it for ever, and its
    process never exited (seen: 'worker stopped cleanly', then alive an hour later)."""
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        end_offsets(SilentAdmin(), [("t", 0), ("t", 1)], timeout_s=0.2)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
