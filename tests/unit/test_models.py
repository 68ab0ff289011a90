"""The pydantic models mirror the Avro schemas and survive encode -> decode unchanged."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.codec import CODEC, SCHEMA_DIR
from schemas.models import (
    COMMAND_TYPES,
    PAYLOAD_TYPES,
    AccountClosed,
    AccountOpened,
    AccountState,
    CommandBase,
    CommandOutcome,
    Deposited,
    ExpireTransaction,
    Hold,
    HoldCaptured,
    HoldPlaced,
    HoldReleased,
    LedgerEvent,
    Posting,
    Rejection,
    Reverse,
    SetAccountMetadata,
    Transaction,
    TransactionMessage,
    TransactionRecord,
    TransferCredited,
    TransferDebited,
    TransferLeg,
    TransferReversed,
    Withdrawn,
    command_from_avro,
    command_to_avro,
    encode,
    encode_batch,
)
from schemas.money import MAX_MINOR
from tests.unit.conftest import (
    ACTOR,
    T0,
    capture_hold,
    close_account,
    command,
    deposit,
    expire_hold,
    open_account,
    place_hold,
    release_hold,
    transfer,
    withdraw,
)

MIN_LONG = -(2**63)


def avsc(name: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


def union_records(schema: dict, field: str) -> dict[str, list[str]]:
    """Record name -> field names, for the union in ``field`` of ``schema``."""
    (f,) = [f for f in schema["fields"] if f["name"] == field]
    union = f["type"]["items"] if isinstance(f["type"], dict) else f["type"]
    return {r["name"]: [x["name"] for x in r["fields"]] for r in union}


def round_trip(obj):
    data = encode(obj)
    _, datum = CODEC.decode(data, expect=obj.avro_name)
    back = type(obj).from_avro(datum)
    return back, data


ALL_COMMANDS = [
    open_account("A", "JPY", overdraft=10, correlation_id="trace", expected_version=0),
    open_account("B"),
    deposit(MAX_MINOR, "A", "JPY", expected_version=1),
    withdraw(1, "A", "JPY", correlation_id="x" * 200),
    transfer(5, "B", "A", "JPY"),
    place_hold(7, "h", "A", "JPY", expires_at=T0 + 1),
    capture_hold("h", None, "A"),
    capture_hold("h", 3, "A"),
    release_hold("h", "A", actor="svc"),
    expire_hold("h", "A", issued_at=0),
    close_account("A", issued_at=MIN_LONG),
    command(Transaction, "A", postings=[
        Posting(from_account_id="A", to_account_id="B", amount_minor=5, currency="JPY"),
        Posting(from_account_id="B", to_account_id="C", amount_minor=MAX_MINOR,
                currency="USD", expected_version=3)]),
    command(Reverse, "A", transaction_id="t1", metadata={"why": "refund"}),
    command(ExpireTransaction, "A", transaction_id="t1", actor="ledger"),
    command(SetAccountMetadata, "A", metadata={"tier": "gold", "owner": "é" * 256}),
    deposit(1, "A", "JPY", metadata={f"k{i}": "v" for i in range(16)}),
]


def a_event(payload, **kw) -> LedgerEvent:
    fields = {"event_id": "e-1", "account_id": "A", "version": 2, "currency": "USD",
              "balance_after_minor": -50, "available_after_minor": -70, "occurred_at": T0,
              "command_id": "c-1", "causation_id": "c-1:credit", "correlation_id": None,
              "actor": ACTOR, "payload": payload, **kw}
    return LedgerEvent(**fields)


PAYLOADS = [
    AccountOpened(overdraft_limit_minor=100),
    Deposited(amount_minor=1),
    Withdrawn(amount_minor=MAX_MINOR),
    TransferDebited(transfer_id="t", to_account_id="B", amount_minor=5),
    TransferCredited(transfer_id="t", from_account_id="A", amount_minor=5),
    TransferReversed(transfer_id="t", to_account_id="B", amount_minor=5, reason="account_closed"),
    HoldPlaced(hold_id="h", amount_minor=9, expires_at=T0 + 1000),
    HoldCaptured(hold_id="h", captured_minor=4, released_minor=5),
    HoldReleased(hold_id="h", amount_minor=9, reason="released"),
    HoldReleased(hold_id="h", amount_minor=9, reason="expired"),
    AccountClosed(),
]


# ================================================================ mirror of the .avsc files


def test_command_models_mirror_the_command_batch_schema():
    records = union_records(avsc("command_batch"), "commands")

    assert set(records) == set(COMMAND_TYPES)
    for name, fields in records.items():
        assert list(COMMAND_TYPES[name].model_fields) == fields, name


def test_payload_models_mirror_the_event_schema():
    records = union_records(avsc("ledger_event"), "payload")

    assert set(records) == set(PAYLOAD_TYPES)
    for name, fields in records.items():
        assert list(PAYLOAD_TYPES[name].model_fields) == fields, name


@pytest.mark.parametrize("model, schema", [
    (LedgerEvent, "ledger_event"), (Rejection, "rejection"), (TransferLeg, "transfer_leg"),
    (AccountState, "account_state"), (CommandOutcome, "command_outcome"),
    (TransactionMessage, "transaction_message"), (TransactionRecord, "transaction_record"),
], ids=lambda x: getattr(x, "__name__", x))
def test_record_models_mirror_their_schema(model, schema):
    raw = avsc(schema)

    assert list(model.model_fields) == [f["name"] for f in raw["fields"]]
    assert model.avro_name == f"{raw['namespace']}.{raw['name']}"


def test_hold_mirrors_the_hold_record():
    (holds,) = [f for f in avsc("account_state")["fields"] if f["name"] == "holds"]

    assert list(Hold.model_fields) == [f["name"] for f in holds["type"]["values"]["fields"]]


# ================================================================ round trips


def test_every_command_type_round_trips_inside_a_command_batch():
    assert {c.type for c in ALL_COMMANDS} == set(COMMAND_TYPES)

    name, datum = CODEC.decode(encode_batch(ALL_COMMANDS), expect="ledger.CommandBatch")

    assert name == "ledger.CommandBatch"
    back = [command_from_avro(item) for item in datum["commands"]]
    assert back == ALL_COMMANDS
    assert [type(c) for c in back] == [type(c) for c in ALL_COMMANDS]
    assert encode_batch(back) == encode_batch(ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.type)
def test_command_to_avro_names_the_record(command):
    name, body = command_to_avro(command)

    assert name == f"ledger.{command.type}"
    assert command_from_avro((name, body)) == command
    assert command_from_avro((command.type, body)) == command  # unqualified name too


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: f"{type(p).__name__}"
                         f"{'-' + p.reason if isinstance(p, HoldReleased) else ''}")
def test_every_event_payload_round_trips(payload):
    event = a_event(payload, correlation_id="trace-1")

    back, data = round_trip(event)

    assert back == event
    assert type(back.payload) is type(payload)
    assert back.type == type(payload).__name__
    assert encode(back) == data


def test_rejection_round_trips():
    rejection = Rejection(command_id="c", account_id="A", command_type="Withdraw",
                          reason="insufficient_funds", detail="d" * 500, occurred_at=T0,
                          correlation_id=None, actor=ACTOR)

    back, data = round_trip(rejection)

    assert back == rejection and encode(back) == data


@pytest.mark.parametrize("leg", [
    TransferLeg(kind="CREDIT", transfer_id="t", from_account_id="A", to_account_id="B",
                amount_minor=5, currency="USD", issued_at=T0, actor=ACTOR),
    TransferLeg(kind="REFUND", transfer_id="t", from_account_id="A", to_account_id="B",
                amount_minor=5, currency="USD", issued_at=T0, actor=ACTOR,
                correlation_id="trace", reason="account_not_found", signature=bytes(range(32))),
], ids=["credit-defaults", "refund-full"])
def test_transfer_leg_round_trips(leg):
    back, data = round_trip(leg)

    assert back == leg and encode(back) == data
    assert (back.account_id, back.leg_id) == (leg.account_id, leg.leg_id)


@pytest.mark.parametrize("holds", [{}, {"h1": Hold(amount_minor=5, expires_at=T0),
                                        "h2": Hold(amount_minor=MAX_MINOR, expires_at=0)}],
                         ids=["no-holds", "two-holds"])
def test_account_state_round_trips(holds):
    state = AccountState(account_id="A", currency="KWD", status="closed",
                         overdraft_limit_minor=0, balance_minor=MIN_LONG, held_minor=5,
                         version=9, updated_at=T0, holds=holds)

    back, data = round_trip(state)

    assert back == state and back.holds == holds
    assert back.available_minor == state.available_minor
    assert encode(back) == data


@pytest.mark.parametrize("records", [[], [b""], [b"\xc3\x01abc", b"\x00" * 100]])
def test_command_outcome_round_trips(records):
    outcome = CommandOutcome(digest=b"\x01" * 16, records=records, rejected=bool(records))

    back, data = round_trip(outcome)

    assert back == outcome and encode(back) == data


text = st.text(max_size=20)
long = st.integers(MIN_LONG, MAX_MINOR)


@settings(max_examples=200, deadline=None, database=None)
@given(st.builds(
    LedgerEvent, event_id=text, account_id=text, version=long, currency=text,
    balance_after_minor=long, available_after_minor=long, occurred_at=long, command_id=text,
    causation_id=text, correlation_id=st.none() | text, actor=text,
    payload=st.one_of(
        st.builds(AccountOpened, overdraft_limit_minor=long),
        st.builds(TransferReversed, transfer_id=text, to_account_id=text, amount_minor=long,
                  reason=text),
        st.builds(HoldPlaced, hold_id=text, amount_minor=long, expires_at=long),
        st.builds(HoldReleased, hold_id=text, amount_minor=long,
                  reason=st.sampled_from(["released", "expired"])),
        st.just(AccountClosed()),
    ),
))
def test_any_event_round_trips(event):
    back, _ = round_trip(event)

    assert back == event


@settings(max_examples=100, deadline=None, database=None)
@given(st.dictionaries(text, st.builds(Hold, amount_minor=long, expires_at=long), max_size=4),
       long, long)
def test_any_account_state_round_trips(holds, balance, held):
    state = AccountState(account_id="A\0b", currency="USD", status="open",
                         overdraft_limit_minor=0, balance_minor=balance, held_minor=held,
                         version=1, updated_at=0, holds=holds)

    back, _ = round_trip(state)

    assert back == state


# ================================================================ validation


@pytest.mark.parametrize("field", ["command_id", "account_id", "actor"])
def test_command_ids_must_not_be_empty(field):
    fields = {"command_id": "c", "account_id": "A", "actor": ACTOR, "issued_at": T0,
              "amount_minor": 1, "currency": "USD", field: ""}

    with pytest.raises(ValidationError):
        COMMAND_TYPES["Deposit"](**fields)


def test_ids_longer_than_200_are_refused():
    with pytest.raises(ValidationError):
        deposit(1, "A" * 201)
    deposit(1, "A" * 200)


def test_models_are_frozen_and_strict_about_fields():
    cmd = deposit(1)

    with pytest.raises(ValidationError):
        cmd.amount_minor = 2
    with pytest.raises(ValidationError):
        COMMAND_TYPES["CloseAccount"](command_id="c", account_id="A", actor=ACTOR,
                                      issued_at=T0, amount_minor=1)


def test_command_type_is_the_class_name():
    assert all(COMMAND_TYPES[name].__name__ == name for name in COMMAND_TYPES)
    assert issubclass(COMMAND_TYPES["Transfer"], CommandBase)
    assert transfer(1).type == "Transfer"


def test_trusted_and_replace_make_what_validation_and_model_copy_make():
    state = AccountState(account_id="A", currency="USD", status="open", overdraft_limit_minor=0,
                         balance_minor=5, held_minor=0, version=1, updated_at=T0,
                         holds={"h": Hold(amount_minor=1, expires_at=T0)})

    trusted = AccountState.trusted(**dict(state.__dict__))
    replaced = state.replace(balance_minor=7, version=2)
    copied = state.model_copy(update={"balance_minor": 7, "version": 2})

    assert trusted == state and trusted.model_dump() == state.model_dump()
    assert replaced == copied and replaced.model_dump() == copied.model_dump()
    assert state.balance_minor == 5  # the original is untouched
    assert encode(replaced) == encode(copied)


@pytest.mark.parametrize("cls, field", [
    (cls, name) for cls in COMMAND_TYPES.values() for name in cls.model_fields
    if name in ("issued_at", "expected_version", "amount_minor", "overdraft_limit_minor",
                "expires_at")])
def test_a_command_number_is_an_avro_long(cls, field):
    """The models are where a command is validated (the HTTP API and the client only
    build them): a number outside int64 is refused, named ``int64_range``."""
    for value, ok in ((2**63 - 1, True), (-(2**63), True), (2**63, False),
                      (-(2**63) - 1, False)):
        body = {"command_id": "c", "account_id": "a", "actor": "t", "issued_at": 1,
                "currency": "USD", "amount_minor": 1, "hold_id": "h", "expires_at": 2,
                "to_account_id": "b", "transaction_id": "t", "metadata": {},
                "postings": [{"from_account_id": "a", "to_account_id": "b", "amount_minor": 1,
                              "currency": "USD"}], field: value}
        body = {k: v for k, v in body.items() if k in cls.model_fields}
        if ok:
            assert getattr(cls.model_validate(body), field) == value
        else:
            with pytest.raises(ValidationError) as info:
                cls.model_validate(body)
            assert [(e["type"], e["loc"]) for e in info.value.errors()] == \
                [("int64_range", (field,))]


@pytest.mark.parametrize("cls", [c for c in COMMAND_TYPES.values()
                                 if "currency" in c.model_fields])
def test_a_command_text_is_unicode(cls):
    body = {"command_id": "c", "account_id": "a", "actor": "t", "issued_at": 1,
            "currency": "US\ud800", "amount_minor": 1, "hold_id": "h", "expires_at": 2,
            "to_account_id": "b"}
    with pytest.raises(ValidationError) as info:
        cls.model_validate({k: v for k, v in body.items() if k in cls.model_fields})
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == \
        [("string_unicode", ("currency",))]
