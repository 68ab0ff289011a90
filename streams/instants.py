"""Instants as people and the API give them: epoch milliseconds, or an ISO 8601 date-time."""

from __future__ import annotations

import datetime
import re

DIGITS = re.compile(r"^[0-9]{1,19}$")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def parse_instant(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 date-time (UTC unless it says otherwise), in
    whole milliseconds rounded down, with no float on the way. ValueError if neither."""
    if DIGITS.match(text):
        return int(text)
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return (when - _EPOCH) // datetime.timedelta(milliseconds=1)
