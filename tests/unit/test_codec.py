"""Avro single-object encoding: header layout, schema evolution, and bad input.

Whatever bytes arrive, ``CODEC.decode`` returns a record or raises a ``DecodeError``
subclass whose ``code`` names the problem; nothing else escapes.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import (
    CODEC,
    HEADER_LEN,
    MAGIC,
    SCHEMA_DIR,
    Codec,
    DecodeError,
    UnknownSchema,
    WrongSchema,
)
from schemas.models import LedgerEvent, command_from_avro
from tests.unit.conftest import ACTOR, T0

V1_BATCH = SCHEMA_DIR / "history" / "command_batch.v1.avsc"
V1_EVENT = SCHEMA_DIR / "history" / "ledger_event.v1.avsc"

CURRENT_NAMES = {"ledger.CommandBatch", "ledger.LedgerEvent", "ledger.Rejection",
                 "ledger.TransferLeg", "ledger.TransactionMessage", "ledger.state.AccountState",
                 "ledger.state.CommandOutcome", "ledger.state.TransactionRecord"}


def parse(path: Path):
    return fastavro.parse_schema(json.loads(path.read_text()), _write_hint=False)


def fingerprint_of(parsed) -> bytes:
    """CRC-64-AVRO of the canonical form, little-endian, as single-object encoding wants."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))[::-1]


def single_object(parsed, datum) -> bytes:
    """Encode ``datum`` with ``parsed`` as writer schema, exactly as Codec.encode does."""
    buf = io.BytesIO()
    buf.write(MAGIC + fingerprint_of(parsed))
    fastavro.schemaless_writer(buf, parsed, datum)
    return buf.getvalue()


def a_rejection() -> dict:
    return {"command_id": "c-1", "account_id": "A", "command_type": "Deposit",
            "reason": "insufficient_funds", "detail": "no", "occurred_at": T0,
            "correlation_id": None, "actor": ACTOR}


def a_v1_event(payload) -> dict:
    return {"event_id": "e-1", "account_id": "A", "version": 3, "currency": "USD",
            "balance_after_minor": 1234, "occurred_at": T0, "command_id": "c-1",
            "causation_id": "c-1", "correlation_id": "trace", "actor": ACTOR,
            "payload": payload}


# ================================================================ layout


def test_the_codec_knows_every_current_schema():
    assert set(CODEC.current) == CURRENT_NAMES


@pytest.mark.parametrize("path", sorted(SCHEMA_DIR.glob("*.avsc")), ids=lambda p: p.stem)
def test_header_is_magic_then_little_endian_crc64_fingerprint(path):
    parsed = parse(path)
    name = parsed["name"]
    schema = CODEC.current[name]

    assert schema.fingerprint == fingerprint_of(parsed)
    assert CODEC.by_fingerprint[schema.fingerprint] is schema


def test_encode_is_header_plus_schemaless_body():
    datum = a_rejection()

    data = CODEC.encode("ledger.Rejection", datum)

    assert data[:2] == MAGIC == b"\xc3\x01"
    assert data[2:HEADER_LEN] == CODEC.current["ledger.Rejection"].fingerprint
    assert data[HEADER_LEN:] == CODEC.body("ledger.Rejection", datum)
    assert data == single_object(parse(SCHEMA_DIR / "rejection.avsc"), datum)


def test_decode_returns_the_schema_name_and_the_datum():
    datum = a_rejection()

    assert CODEC.decode(CODEC.encode("ledger.Rejection", datum)) == ("ledger.Rejection", datum)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda t: t.__name__)
def test_decode_accepts_any_bytes_like(wrap):
    data = CODEC.encode("ledger.Rejection", a_rejection())

    assert CODEC.decode(wrap(data))[1] == a_rejection()


def test_decode_with_the_expected_name_passes():
    data = CODEC.encode("ledger.Rejection", a_rejection())

    assert CODEC.decode(data, expect="ledger.Rejection")[0] == "ledger.Rejection"


def test_timestamps_stay_integers():
    _, datum = CODEC.decode(CODEC.encode("ledger.Rejection", a_rejection()))

    assert type(datum["occurred_at"]) is int


# ================================================================ schema evolution


def test_history_schemas_are_known_but_not_current():
    for path in (V1_BATCH, V1_EVENT):
        fp = fingerprint_of(parse(path))
        assert fp in CODEC.by_fingerprint
        assert CODEC.by_fingerprint[fp].current is False
        assert fp != CODEC.current[parse(path)["name"]].fingerprint


def test_a_v1_command_batch_is_read_with_the_new_fields_defaulted():
    base = {"command_id": "c-1", "account_id": "A", "actor": ACTOR, "issued_at": T0}
    v1 = single_object(parse(V1_BATCH), {"commands": [
        ("ledger.OpenAccount", {**base, "currency": "USD", "overdraft_limit_minor": 0}),
        ("ledger.Deposit", {**base, "command_id": "c-2", "amount_minor": 500,
                            "currency": "USD"}),
        ("ledger.CaptureHold", {**base, "command_id": "c-3", "hold_id": "h", "amount_minor": None}),
        ("ledger.CloseAccount", {**base, "command_id": "c-4"}),
    ]})

    name, datum = CODEC.decode(v1, expect="ledger.CommandBatch")

    assert name == "ledger.CommandBatch"
    names = [n for n, _ in datum["commands"]]
    assert names == ["ledger.OpenAccount", "ledger.Deposit", "ledger.CaptureHold",
                     "ledger.CloseAccount"]
    for _, body in datum["commands"]:
        assert body["expected_version"] is None
        assert body["correlation_id"] is None
    commands = [command_from_avro(item) for item in datum["commands"]]
    assert commands[1].amount_minor == 500 and commands[1].expected_version is None
    assert commands[2].amount_minor is None


def test_a_v1_event_is_read_with_available_after_defaulted_to_0():
    v1 = single_object(parse(V1_EVENT), a_v1_event(("ledger.Deposited", {"amount_minor": 7})))

    name, datum = CODEC.decode(v1, expect="ledger.LedgerEvent")

    assert name == "ledger.LedgerEvent"
    assert datum["available_after_minor"] == 0
    assert datum["balance_after_minor"] == 1234
    event = LedgerEvent.from_avro(datum)
    assert event.type == "Deposited" and event.payload.amount_minor == 7
    assert event.correlation_id == "trace"


def test_a_codec_without_history_does_not_know_v1(tmp_path):
    for path in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(path, tmp_path / path.name)
    codec = Codec(tmp_path)
    v1 = single_object(parse(V1_EVENT), a_v1_event(("ledger.AccountClosed", {})))

    with pytest.raises(UnknownSchema):
        codec.decode(v1)
    assert CODEC.decode(v1)[0] == "ledger.LedgerEvent"


# ================================================================ bad input


def test_error_codes():
    assert issubclass(UnknownSchema, DecodeError) and issubclass(WrongSchema, DecodeError)
    assert issubclass(DecodeError, ValueError)
    assert (DecodeError.code, UnknownSchema.code, WrongSchema.code) == (
        "malformed", "unknown_schema", "wrong_schema")


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xc3", id="half-magic"),
    pytest.param(MAGIC + b"\x00" * 7, id="short-header"),
    pytest.param(b"\xc3\x02" + CODEC.current["ledger.Rejection"].fingerprint, id="wrong-magic"),
    pytest.param(b"random bytes that are not avro", id="random"),
    pytest.param(json.dumps(a_rejection()).encode(), id="json"),
])
def test_not_single_object_encoded_is_malformed(data):
    with pytest.raises(DecodeError) as info:
        CODEC.decode(data)

    assert type(info.value) is DecodeError and info.value.code == "malformed"


@pytest.mark.parametrize("data", ["a string", None, 42, [1, 2]], ids=repr)
def test_not_bytes_at_all_is_malformed(data):
    with pytest.raises(DecodeError, match="expected bytes"):
        CODEC.decode(data)


def test_right_magic_and_unknown_fingerprint_is_unknown_schema():
    body = CODEC.body("ledger.Rejection", a_rejection())

    with pytest.raises(UnknownSchema) as info:
        CODEC.decode(MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + body)

    assert info.value.code == "unknown_schema"
    assert "0102030405060708" in str(info.value)


def test_every_truncation_of_a_record_is_malformed():
    data = CODEC.encode("ledger.Rejection", a_rejection())

    for cut in range(HEADER_LEN, len(data)):
        with pytest.raises(DecodeError) as info:
            CODEC.decode(data[:cut])
        assert type(info.value) is DecodeError, cut


@pytest.mark.parametrize("extra", [b"\x00", b"garbage", b"\xc3\x01"], ids=repr)
def test_trailing_garbage_is_malformed(extra):
    data = CODEC.encode("ledger.Rejection", a_rejection())

    with pytest.raises(DecodeError, match="trailing"):
        CODEC.decode(data + extra)


def test_an_event_where_a_command_batch_is_expected_is_wrong_schema():
    event = single_object(parse(V1_EVENT), a_v1_event(("ledger.AccountClosed", {})))
    current = CODEC.encode("ledger.Rejection", a_rejection())

    for data in (event, current):
        with pytest.raises(WrongSchema) as info:
            CODEC.decode(data, expect="ledger.CommandBatch")
        assert info.value.code == "wrong_schema"


def test_a_body_that_does_not_fit_the_schema_is_malformed():
    fp = CODEC.current["ledger.CommandBatch"].fingerprint

    # array block of 1 item, union index 99 (no such command type)
    with pytest.raises(DecodeError) as info:
        CODEC.decode(MAGIC + fp + b"\x02\xc6\x01\x00")

    assert type(info.value) is DecodeError


def test_an_invalid_enum_index_is_malformed():
    data = bytearray(CODEC.encode("ledger.TransferLeg", {
        "kind": "CREDIT", "transfer_id": "t", "from_account_id": "A", "to_account_id": "B",
        "amount_minor": 1, "currency": "USD", "issued_at": T0, "actor": ACTOR,
        "correlation_id": None, "reason": None, "signature": b""}))
    data[HEADER_LEN] = 0x0A  # enum index 5 of a 2-symbol enum

    with pytest.raises(DecodeError):
        CODEC.decode(bytes(data))


KNOWN = sorted(CODEC.by_fingerprint)
VALID = [
    CODEC.encode("ledger.Rejection", a_rejection()),
    single_object(parse(V1_EVENT), a_v1_event(("ledger.HoldReleased",
                                               {"hold_id": "h", "amount_minor": 5,
                                                "reason": "expired"}))),
]


@settings(max_examples=500, deadline=None, database=None)
@given(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda fp, body: MAGIC + fp + body, st.sampled_from(KNOWN), st.binary(max_size=64)),
), st.sampled_from([None, "ledger.CommandBatch", "ledger.TransferLeg"]))
def test_arbitrary_bytes_raise_nothing_but_decode_error(data, expect):
    try:
        name, _ = CODEC.decode(data, expect=expect)
    except DecodeError:
        return
    assert expect is None or name == expect


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(VALID), st.integers(HEADER_LEN, 200), st.integers(0, 255))
def test_a_flipped_byte_in_a_body_raises_nothing_but_decode_error(valid, index, value):
    data = bytearray(valid)
    data[index % len(data)] = value
    with contextlib.suppress(DecodeError):
        CODEC.decode(bytes(data))


# ---------------------------------------------------------------- the generated writers


def _datum(sch, named):
    """A hypothesis strategy for data of one parsed Avro schema."""
    if isinstance(sch, str):
        if sch in named:
            return _datum(named[sch], named)
        return {"long": st.integers(-2**63, 2**63 - 1), "int": st.integers(-2**31, 2**31 - 1),
                "string": st.text(max_size=20), "bytes": st.binary(max_size=20),
                "boolean": st.booleans(), "null": st.none()}[sch]
    if isinstance(sch, list):
        if len(sch) == 2 and sch[0] == "null":
            return st.none() | _datum(sch[1], named)
        return st.one_of(*[st.tuples(st.just(b["name"] if isinstance(b, dict) else b),
                                     _datum(b, named)) for b in sch])
    kind = sch["type"]
    if kind == "record":
        named[sch["name"]] = sch
        return st.fixed_dictionaries({f["name"]: _datum(f["type"], named)
                                      for f in sch["fields"]})
    if kind == "enum":
        named[sch["name"]] = sch
        return st.sampled_from(sch["symbols"])
    if kind == "array":
        return st.lists(_datum(sch["items"], named), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(max_size=5), _datum(sch["values"], named), max_size=3)
    return _datum(kind, named)


@pytest.mark.parametrize("name", sorted(CURRENT_NAMES))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_generated_writer_writes_what_fastavro_writes(name, data):
    parsed = CODEC.current[name].parsed
    datum = data.draw(_datum(parsed, {}))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, datum)
    # the generated writer itself, not Codec.body (which would fall back to fastavro)
    assert CODEC._writers[name](datum) == buf.getvalue()


def test_a_long_out_of_range_is_refused_not_wrapped():
    rejection = a_rejection()
    for bad in (2**63, -2**63 - 1):
        with pytest.raises(OverflowError):
            CODEC._writers["ledger.Rejection"]({**rejection, "occurred_at": bad})
        with pytest.raises((OverflowError, ValueError)):
            CODEC.body("ledger.Rejection", {**rejection, "occurred_at": bad})


@pytest.mark.parametrize("name", sorted(CURRENT_NAMES))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_generated_reader_reads_what_fastavro_reads(name, data):
    schema = CODEC.current[name]
    body = CODEC.body(name, data.draw(_datum(schema.parsed, {})))
    expected = fastavro.schemaless_reader(io.BytesIO(body), schema.parsed, None,
                                          return_record_name=True)
    # the generated reader itself, then through decode
    assert CODEC._readers[schema.fingerprint](body, 0) == (expected, len(body))
    assert CODEC.decode(MAGIC + schema.fingerprint + body) == (name, expected)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(sorted(CURRENT_NAMES)), st.binary(max_size=64))
def test_on_random_bodies_the_generated_reader_never_reads_what_fastavro_would_not(name, body):
    schema = CODEC.current[name]
    try:
        got = CODEC.decode(MAGIC + schema.fingerprint + body)[1]
    except DecodeError:
        return
    buf = io.BytesIO(body)
    assert fastavro.schemaless_reader(buf, schema.parsed, None, return_record_name=True) == got
    assert buf.tell() == len(body)
