"""Metadata: bounded text on accounts and money-moving commands, carried into their events."""

from __future__ import annotations

import hashlib
import hmac
import io

import fastavro
import pytest
from pydantic import ValidationError

from schemas.codec import CODEC
from schemas.models import (
    MAX_METADATA_ENTRIES,
    Deposit,
    OpenAccount,
    Reverse,
    SetAccountMetadata,
    TransferLeg,
)
from streams.worker.processor import LegSigner, account_key, command_digest
from tests.unit.conftest import SECRET, T0, command, deposit, open_account, transfer
from tests.unit.test_transactions import PAYEE, PAYER, Ledger, funded, posting, txn

ORDER = {"order": "o-17", "channel": "web"}


def test_a_deposit_and_both_sides_of_a_transfer_carry_the_commands_metadata():
    ledger = Ledger()
    funded(ledger, **{PAYER: 0, PAYEE: 0})
    ledger.submit(deposit(500, PAYER, metadata=ORDER))
    ledger.submit(transfer(200, PAYEE, PAYER, metadata={"invoice": "2026-12"}))
    ledger.run()
    debit, credit = ledger.of(PAYER)[-1], ledger.of(PAYEE)[-1]
    assert ledger.of(PAYER)[-2].metadata == ORDER
    assert (debit.type, debit.metadata) == ("TransferDebited", {"invoice": "2026-12"})
    assert (credit.type, credit.metadata) == ("TransferCredited", {"invoice": "2026-12"})
    assert ledger.of(PAYER)[0].metadata == {}  # the opening had none


def test_every_step_of_a_transaction_and_its_reversal_carries_their_metadata():
    ledger = Ledger()
    funded(ledger, **{PAYER: 1_000, PAYEE: 0})
    ledger.submit(txn(PAYER, posting(PAYER, PAYEE, 400), metadata=ORDER))
    ledger.run()
    ledger.submit(command(Reverse, PAYER, command_id="r1", transaction_id="t1",
                          metadata={"why": "returned"}))
    ledger.run()
    steps = [e for e in ledger.of(PAYER) + ledger.of(PAYEE) if e.type.startswith("Transaction")]
    assert {e.command_id for e in steps} == {"t1", "r1"}
    assert all(e.metadata == (ORDER if e.command_id == "t1" else {"why": "returned"})
               for e in steps)
    assert len(steps) == 2 * 6  # each: started, reserved twice, committed, posted twice


def test_an_account_has_metadata_from_its_opening_and_a_command_replaces_it():
    ledger = Ledger()
    ledger.submit(command(OpenAccount, PAYER, currency="USD", metadata={"tier": "gold"}))
    ledger.run()
    assert ledger.report().states[PAYER].metadata == {"tier": "gold"}
    ledger.submit(command(SetAccountMetadata, PAYER, metadata={"tier": "silver", "kyc": "ok"}))
    ledger.submit(deposit(5, PAYER, metadata={"tier": "not the account's"}))
    ledger.run()
    opened, changed, deposited = ledger.of(PAYER)
    assert opened.metadata == {"tier": "gold"}
    assert deposited.metadata == {"tier": "not the account's"}
    assert (changed.type, changed.payload.metadata) == (
        "AccountMetadataSet", {"tier": "silver", "kyc": "ok"})
    assert changed.metadata == {}
    assert ledger.report().states[PAYER].metadata == {"tier": "silver", "kyc": "ok"}
    assert ledger.report().ok


@pytest.mark.parametrize("metadata, error", [
    ({f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}, "too_long"),
    ({"k" * 65: "v"}, "string_too_long"),
    ({"": "v"}, "string_too_short"),
    ({"k": "v" * 257}, "string_too_long"),
    ({"k": "line\nbreak"}, "value_error"),
])
def test_metadata_beyond_its_bounds_is_an_invalid_command(metadata, error):
    with pytest.raises(ValidationError) as info:
        Deposit(command_id="c", account_id="a", actor="t", issued_at=T0, amount_minor=1,
                currency="USD", metadata=metadata)
    assert error in {e["type"] for e in info.value.errors()}


def test_metadata_beyond_its_bounds_sent_anyway_is_refused_with_the_reason():
    ledger = Ledger()
    funded(ledger, **{PAYER: 0})
    ledger.submit(Deposit.model_construct(
        command_id="big", account_id=PAYER, actor="t", issued_at=T0, amount_minor=1,
        currency="USD", expected_version=None, correlation_id=None,
        metadata={f"k{i}": "v" for i in range(17)}))
    ledger.run()
    assert ledger.rejections[-1]["reason"] == "invalid_command"
    assert "metadata" in ledger.rejections[-1]["detail"]


def test_no_metadata_gives_the_digest_a_command_had_before_commands_carried_it():
    """A retry across the upgrade is a retry, not an id reused for another command."""
    d = deposit(5, "A", command_id="c1", actor="t", correlation_id="x")
    before = (d.command_id, d.account_id, d.actor, d.expected_version, d.amount_minor,
              d.currency)
    assert command_digest(d) == hashlib.blake2b(repr(("Deposit", before)).encode(),
                                                digest_size=16).digest()
    assert command_digest(d.replace(metadata={"a": "b"})) != command_digest(d)


def test_a_leg_signed_before_legs_carried_metadata_still_verifies():
    signer = LegSigner(SECRET)
    leg = TransferLeg(kind="CREDIT", transfer_id="t", from_account_id="a", to_account_id="b",
                      amount_minor=5, currency="USD", issued_at=T0, actor="t",
                      expires_at=T0 + 1)
    (second,) = [s for s in CODEC.by_fingerprint.values() if s.name == TransferLeg.avro_name
                 and not s.current and "metadata" not in str(s.parsed) and
                 "expires_at" in str(s.parsed)]
    datum = {k: v for k, v in leg.to_avro().items() if k not in ("metadata", "signature")}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, second.parsed, {**datum, "signature": b""})
    old = leg.replace(signature=hmac.new(signer.key, buf.getvalue(), hashlib.sha256).digest())
    assert signer.verify(old)
    assert not signer.verify(old.replace(amount_minor=6))
    assert not signer.verify(old.replace(metadata={"a": "b"}))  # only a leg without any
    assert signer.verify(signer.sign(leg.replace(metadata={"a": "b"})))


def test_an_opening_with_metadata_round_trips_through_the_store():
    ledger = Ledger()
    ledger.submit(open_account(PAYER).replace(metadata={"é": "ü" * 10}))
    ledger.run()
    ledger.submit(deposit(1, PAYER))  # read back from the store, written again
    ledger.run()
    assert ledger.report().states[PAYER].metadata == {"é": "ü" * 10}
    raw = ledger.parts[0].store[account_key(PAYER)]
    assert CODEC.decode(raw)[1]["metadata"] == {"é": "ü" * 10}
