"""The ids of the expiries the worker's timer submits (holds, transactions)."""

from __future__ import annotations

from schemas.models import ExpireHold, ExpireTransaction
from schemas.text import MAX_ID_LENGTH
from streams.worker.app import internal_id


def test_an_expiry_of_a_short_name_keeps_the_id_it_always_had():
    assert internal_id("expire", "h1", 1_700_000_000_000) == "expire:h1:1700000000000"


def test_an_expiry_of_the_longest_name_is_still_a_valid_command():
    """A hold id of 200 characters made an expiry id of 221: the model refused it, and
    the hold never expired (the timer raised on it every second)."""
    name = "h" * MAX_ID_LENGTH
    hold = internal_id("expire", name, 1_700_000_000_000)
    txn = internal_id("timeout", name, 1_700_000_000_000)
    assert len(hold) <= MAX_ID_LENGTH and len(txn) <= MAX_ID_LENGTH and hold != txn
    assert hold != internal_id("expire", name[:-1] + "x", 1_700_000_000_000)
    ExpireHold(command_id=hold, account_id="a", actor="ledger", issued_at=1, hold_id=name)
    ExpireTransaction(command_id=txn, account_id="a", actor="ledger", issued_at=1,
                      transaction_id=name)
