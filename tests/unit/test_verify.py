"""verify's transfer accounting over events the batch processor writes (no Kafka)."""

from __future__ import annotations

from schemas.models import encode_batch
from streams.core import transaction_key
from streams.ops.verify import check
from streams.worker.processor import EVENTS, TRANSFERS
from tests.unit.conftest import Partition, accounts_on, deposit, open_account, transfer

A, B, C = accounts_on(0, 3)


def settle(part: Partition, commands: list) -> list[bytes]:
    """Decide ``commands`` on one partition and deliver every leg round the topic."""
    out = part.batch([encode_batch(commands)]).outputs
    events = [o.value for o in out if o.kind == EVENTS]
    legs = [o.value for o in out if o.kind == TRANSFERS]
    while legs:
        out = part.batch(legs=legs).outputs
        events += [o.value for o in out if o.kind == EVENTS]
        legs = [o.value for o in out if o.kind == TRANSFERS]
    return events


def test_a_transfer_is_known_by_its_source_and_id():
    part = Partition()
    events = settle(part, [open_account(A), open_account(B), open_account(C),
                           deposit(100, A), deposit(100, B),
                           transfer(10, C, A, command_id="t1"),  # ids are per account
                           transfer(20, C, B, command_id="t1")])

    report = check(events)

    assert report.ok, report.breaches
    assert (report.transfers_credited, report.transfers_in_flight) == (2, 0)
    assert report.states[C].balance_minor == 30


def test_a_transfer_id_used_again_after_the_window_is_another_transfer():
    """As the ledger allowed before it kept a record of each transfer (a log from then)."""
    part = Partition()
    events = settle(part, [open_account(A), deposit(100, A),
                           transfer(10, B, A, command_id="t1")])  # B does not exist yet
    part.clock += part.window_ms + 1
    events += settle(part, [open_account(B)])  # a batch after the window forgets it
    del part.store[transaction_key(A, "t1")]  # as a worker that kept no record of it
    events += settle(part, [transfer(10, B, A, command_id="t1")])

    report = check(events)

    assert report.ok, report.breaches
    assert (report.transfers_credited, report.transfers_reversed,
            report.transfers_in_flight) == (1, 1, 0)
    assert report.states[B].balance_minor == 10

