"""BatchProcessor over a dict-backed store: batching, idempotency, routing, dead letters, legs."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import CODEC, MAGIC
from schemas.models import (
    AccountState,
    CommandOutcome,
    LedgerEvent,
    Rejection,
    TransferLeg,
    encode,
    encode_batch,
)
from streams.domain import Reason
from streams.partitions import partition_for
from streams.worker import processor
from streams.worker.processor import (
    DLQ,
    EVENTS,
    REJECTIONS,
    TRANSFERS,
    LegSigner,
    account_key,
    command_digest,
    expiry_key,
    leg_outcome_key,
    outcome_key,
    outcome_log_key,
    pack_records,
    parse_expiry_key,
    retained,
    retention_key,
    unpack_records,
)
from tests.unit.conftest import (
    ACTOR,
    PARTITIONS,
    SECRET,
    T0,
    Partition,
    account_off,
    accounts_on,
    capture_hold,
    close_account,
    deposit,
    index_of,
    open_account,
    place_hold,
    release_hold,
    state_of,
    transfer,
    triples,
    withdraw,
)
from tests.unit.test_domain import DOMAIN_REASONS, PROCESSOR_REASONS, TRANSACTION_REASONS

A, B, C = accounts_on(0, 3)


def decoded(output):
    name, datum = CODEC.decode(output.value)
    return name, datum


def rejections_of(bp) -> list[dict]:
    return [decoded(o)[1] for o in bp.outputs if o.kind == REJECTIONS]


def events_of(bp) -> list[LedgerEvent]:
    return [LedgerEvent.from_avro(decoded(o)[1]) for o in bp.outputs if o.kind == EVENTS]


def state_in(part: Partition, account: str) -> AccountState | None:
    return state_in_store(part.store, account)


def state_in_store(store: dict[bytes, bytes], account: str) -> AccountState | None:
    raw = store.get(account_key(account))
    return None if raw is None else AccountState.from_avro(CODEC.decode(raw)[1])


def header(output, name: str) -> bytes:
    return dict(output.headers)[name]


def a_history():
    """Commands for accounts on partition 0 touching every kind of output and store key."""
    return [
        open_account(A, overdraft=50), open_account(B), open_account(C, "EUR"),
        deposit(1000, A), deposit(10, B, correlation_id="trace-1"),
        withdraw(2000, A),                                   # rejected: insufficient funds
        place_hold(300, "h1", A, expires_at=T0 + 10_000), capture_hold("h1", 100, A),
        place_hold(50, "h2", A), place_hold(60, "h3", A), release_hold("h3", A),
        transfer(200, B, A), transfer(5, C, A),              # legs to B and to C (EUR)
        deposit(5, C, "USD"),                                # rejected: currency mismatch
        withdraw(10, B), close_account(B),
        deposit(1, account_off(0)),                          # rejected: wrong partition
    ]


# ================================================================ (a) batching


def test_one_record_many_records_and_many_batches_give_the_same_bytes():
    commands = a_history()
    one_record, many_records, many_batches = Partition(), Partition(), Partition()

    out_one = triples(one_record.batch([encode_batch(commands)]).outputs)
    out_records = triples(many_records.batch([encode_batch([c]) for c in commands]).outputs)
    out_batches = []
    for c in commands:
        out_batches += triples(many_batches.batch([encode_batch([c])]).outputs)

    assert out_one == out_records == out_batches
    assert state_of(one_record.store) == state_of(many_records.store) == \
        state_of(many_batches.store)
    kinds = [kind for kind, _, _ in out_one]
    assert kinds.count(EVENTS) == 14
    assert kinds.count(REJECTIONS) == 3
    assert kinds.count(TRANSFERS) == 2


def test_the_store_holds_accounts_outcomes_and_the_open_hold_index():
    part = Partition()

    part.batch([encode_batch(a_history())])

    a = state_in(part, A)
    assert a.balance_minor == 1000 - 100 - 200 - 5
    assert set(a.holds) == {"h2"}
    assert state_in(part, B).status == "closed"
    hold_keys = [k for k in part.store if k.startswith(b"x")]
    assert [parse_expiry_key(k) for k in hold_keys] == [(a.holds["h2"].expires_at, A, "h2")]
    assert part.store[hold_keys[0]] == b""
    on_this_partition = [c for c in a_history() if partition_for(c.account_id, PARTITIONS) == 0]
    assert len([k for k in part.store if k.startswith(b"i")]) == len(on_this_partition)
    assert len([k for k in part.store if k.startswith(b"a")]) == 3


def test_outputs_are_keyed_by_account():
    part = Partition()
    cmd = transfer(5, B, A)
    part.batch([encode_batch([open_account(A), deposit(10, A)])])

    bp = part.batch([encode_batch([cmd])])

    assert [(o.kind, o.key) for o in bp.outputs] == [(EVENTS, A.encode()),
                                                     (TRANSFERS, B.encode())]


def test_an_empty_batch_changes_nothing(part):
    bp = part.batch([encode_batch([])])

    assert bp.outputs == [] and part.last_changes == {} and part.store == {}


# ================================================================ (b) idempotency


@pytest.mark.parametrize("original", [
    pytest.param(lambda: deposit(25, A, command_id="dep-1"), id="event"),
    pytest.param(lambda: withdraw(5000, A, command_id="wd-1"), id="rejection"),
    pytest.param(lambda: capture_hold("h1", 40, A, command_id="cap-1"), id="capture"),
])
@pytest.mark.parametrize("same_batch", [False, True], ids=["later-batch", "same-batch"])
def test_a_retry_gets_the_original_records_and_changes_nothing(original, same_batch):
    part = Partition()
    part.batch([encode_batch([open_account(A), deposit(100, A), place_hold(50, "h1", A)])])
    first = original()
    retry = first.model_copy(update={"issued_at": first.issued_at + 60_000,
                                     "correlation_id": "another-trace"})

    if same_batch:
        bp = part.batch([encode_batch([first, retry])])
        original_out, retry_out = bp.outputs[:1], bp.outputs[1:]
    else:
        original_out = part.batch([encode_batch([first])]).outputs
        store_before = dict(part.store)
        bp = part.batch([encode_batch([retry])])
        retry_out = bp.outputs
        assert part.last_changes == {}
        assert part.store == store_before

    assert len(original_out) == 1
    assert triples(retry_out) == triples(original_out)
    assert bp.stats.replays == 1


def test_a_retried_transfer_re_sends_its_event_but_no_second_leg(part):
    part.batch([encode_batch([open_account(A), deposit(100, A)])])
    cmd = transfer(30, B, A)
    first = part.batch([encode_batch([cmd])]).outputs

    retry = part.batch([encode_batch([cmd])]).outputs

    assert [o.kind for o in first] == [EVENTS, TRANSFERS]
    assert triples(retry) == triples(first[:1])
    assert state_in(part, A).balance_minor == 70


def test_same_command_id_with_other_content_is_refused(part):
    part.batch([encode_batch([open_account(A), deposit(100, A, command_id="dep-1")])])
    balance = state_in(part, A).balance_minor

    bp = part.batch([encode_batch([deposit(999, A, command_id="dep-1")])])

    (rejection,) = rejections_of(bp)
    assert rejection["reason"] == Reason.IDEMPOTENCY_KEY_REUSED.value
    assert rejection["command_id"] == "dep-1"
    assert [o.kind for o in bp.outputs] == [REJECTIONS]
    assert state_in(part, A).balance_minor == balance
    assert list(part.last_changes) == []


def test_command_ids_are_per_account(part):
    part.batch([encode_batch([open_account(A, command_id="open"),
                              open_account(B, command_id="open")])])

    bp = part.batch([encode_batch([deposit(5, A, command_id="x"), deposit(7, B, command_id="x")])])

    assert [e.balance_after_minor for e in events_of(bp)] == [5, 7]


def test_digest_ignores_issued_at_and_correlation_id_only():
    cmd = deposit(5, A, command_id="d")

    assert command_digest(cmd) == command_digest(
        cmd.model_copy(update={"issued_at": 1, "correlation_id": "z"}))
    for change in ({"amount_minor": 6}, {"actor": "mallory"}, {"expected_version": 3},
                   {"currency": "EUR"}):
        assert command_digest(cmd) != command_digest(cmd.model_copy(update=change)), change


# ================================================================ (b2) the idempotency window

WINDOW = Partition().window_ms


def outcome_keys(part: Partition) -> set[bytes]:
    return {k for k in part.store if k.startswith(b"i")}


def retention_keys(part: Partition) -> set[bytes]:
    return {k for k in part.store if k.startswith(b"e")}


def retention_index(part: Partition) -> list[tuple[int, bytes]]:
    return index_of(part.store)


def test_an_id_is_remembered_for_the_window_then_is_a_new_command(part):
    part.batch([encode_batch([open_account(A), deposit(100, A, command_id="dep-1")])])
    decided_at = part.clock

    part.clock = decided_at + WINDOW  # the last instant it is remembered
    within = part.batch([encode_batch([deposit(100, A, command_id="dep-1")])])
    part.clock = decided_at + WINDOW + 1
    after = part.batch([encode_batch([deposit(100, A, command_id="dep-1")])])

    assert within.stats.replays == 1 and events_of(within)[0].balance_after_minor == 100
    assert after.stats.replays == 0 and events_of(after)[0].balance_after_minor == 200
    # the first outcomes and their index entries are gone; the new one is kept
    new = CommandOutcome.from_avro(CODEC.decode(part.store[outcome_key(A, "dep-1")])[1])
    assert new.expires_at == part.clock + WINDOW
    assert outcome_keys(part) == {outcome_key(A, "dep-1")}
    assert retention_index(part) == [(new.expires_at, outcome_key(A, "dep-1"))]


def test_the_store_stays_bounded_while_ids_keep_coming(part):
    part.batch([encode_batch([open_account(A)])])
    sizes = []
    for i in range(40):
        part.clock += WINDOW // 4
        part.batch([encode_batch([deposit(1, A, command_id=f"d{i}-{j}") for j in range(10)])])
        sizes.append(len(part.store))

    assert len(outcome_keys(part)) == 50  # the last five batches' ids, nothing older
    assert max(sizes[5:]) == min(sizes[5:])
    assert state_in(part, A).balance_minor == 400


def test_forgetting_is_bounded_per_batch_and_when_it_runs_changes_no_answer(monkeypatch):
    monkeypatch.setattr(processor, "FORGET_PER_BATCH", 2)
    part = Partition()
    part.batch([encode_batch([open_account(A)] +
                             [deposit(1, A, command_id=f"d{i}") for i in range(5)])])
    part.clock += WINDOW + 1

    bp = part.batch([encode_batch([deposit(1, A, command_id="d4")])])

    assert bp.stats.replays == 0 and events_of(bp)[0].balance_after_minor == 6
    assert len(outcome_keys(part)) == 4  # six kept for a moment, two deleted, d4 new
    # the group's other four are indexed again, before its record is deleted: a crash
    # that lands a prefix of these changes must not leave them indexed nowhere
    changes = [k for k in part.last_changes if k.startswith(b"e")]
    rest = retention_key(bp._now - 1, outcome_key(A, "d1"))
    assert changes.index(rest) < changes.index(next(k for k in changes
                                                    if part.last_changes[k] is None))
    for _ in range(3):
        part.batch([encode_batch([])])
    assert outcome_keys(part) == {outcome_key(A, "d4")}  # the new d4 outlived the old entry
    assert len(retention_keys(part)) == 1


def test_the_retention_index_is_one_record_per_batch_and_instant():
    part = Partition()
    part.batch([encode_batch([open_account(A, command_id="open")] +
                             [deposit(1, A, command_id=f"d{i}") for i in range(3)])])
    expires_at = part.clock + WINDOW
    part.clock += 1
    part.batch([encode_batch([deposit(1, A, command_id="d3")]),
                encode_batch([deposit(1, A, command_id="d4")])])

    assert {k: v for k, v in part.store.items() if k.startswith(b"e")} == {
        retention_key(expires_at, outcome_key(A, "open")):
            b"\xff".join(outcome_key(A, f"d{i}") for i in range(3)),
        retention_key(expires_at + 1, outcome_key(A, "d3")): outcome_key(A, "d4")}


def test_an_outcome_stored_again_at_the_same_instant_joins_its_retention_record():
    part = Partition()
    part.batch([encode_batch([open_account(A, command_id="open"),
                              deposit(1, A, command_id="d0")])])
    # the outcome of "open" gone while its retention record stays (as when a refund leg's
    # outcome key is also a command's): deciding it again at the same instant stores it
    # again, first in its batch, under the same retention key
    del part.store[outcome_key(A, "open")]
    part.batch([encode_batch([open_account(A, command_id="open")])])

    assert index_of(part.store) == [(part.clock + WINDOW, outcome_key(A, c))
                                    for c in ("d0", "open")]


def test_retention_records_of_the_old_form_are_still_forgotten():
    part = Partition()
    part.batch([encode_batch([open_account(A), deposit(1, A, command_id="d0")])])
    # as a store written before the index was grouped: one key per outcome, no value
    for key, value in [(k, v) for k, v in part.store.items() if k.startswith(b"e")]:
        del part.store[key]
        for okey in retained(key, value):
            part.store[key[:9] + okey] = b""
    assert len(retention_keys(part)) == 2
    part.clock += WINDOW + 1

    bp = part.batch([encode_batch([deposit(1, A, command_id="d0")])])

    assert bp.stats.replays == 0  # forgotten: a new command
    assert outcome_keys(part) == {outcome_key(A, "d0")}
    assert retention_index(part) == [(part.clock + WINDOW, outcome_key(A, "d0"))]


def test_the_partition_clock_never_goes_back(monkeypatch):
    monkeypatch.setattr(processor, "FORGET_PER_BATCH", 0)  # so only the clock decides
    part = Partition()
    part.batch([encode_batch([open_account(A), deposit(5, A, command_id="d")])])
    part.clock += WINDOW + 1
    part.batch([encode_batch([deposit(1, A)])])

    part.clock -= WINDOW  # the broker's clock stepped back
    bp = part.batch([encode_batch([deposit(5, A, command_id="d")])])

    assert bp.stats.replays == 0 and events_of(bp)[0].balance_after_minor == 11


def test_expiry_gives_the_same_bytes_however_the_records_are_cut():
    ids = [f"d{i}" for i in range(6)]
    stamped = [(encode_batch([open_account(A)]), T0)]
    for step in range(12):  # deposits, then retries 0.9 to 3 windows later
        stamped.append((encode_batch([deposit(1, A, command_id=ids[step % 6])]),
                        T0 + step * step * WINDOW // 40))

    def run(cuts: list[int]) -> tuple[list, dict]:
        part, out, i = Partition(), [], 0
        for n in cuts:
            bp = part.processor()
            for value, ts in stamped[i:i + n]:
                bp.command_record(None, value, "ledger.commands", i, ts)
                i += 1
            part.store.apply(dict(bp.finish()))
            out += triples(bp.outputs)
        return out, state_of(part.store)

    one, singles, pairs = run([13]), run([1] * 13), run([1] + [2] * 6)

    assert one == singles == pairs
    assert len([o for o in one[0] if o[0] == EVENTS]) == 13  # each answered with an event
    assert state_in_store(one[1][0], A).balance_minor == 11  # d0 retried in time, d1..d5 not


# ================================================================ (c) routing


def test_a_command_for_an_account_of_another_partition_is_refused(part):
    elsewhere = account_off(0)
    cmd = open_account(elsewhere)

    bp = part.batch([encode_batch([cmd])])

    (rejection,) = rejections_of(bp)
    assert rejection["reason"] == Reason.WRONG_PARTITION.value
    assert rejection["account_id"] == elsewhere
    assert str(partition_for(elsewhere, PARTITIONS)) in rejection["detail"]
    assert bp.outputs[0].key == elsewhere.encode()
    assert part.store == {}


@pytest.mark.parametrize("key, java_murmur2", [
    # test vectors of org.apache.kafka.common.utils.Utils.murmur2 (Kafka's UtilsTest)
    ("21", -973932308), ("foobar", -790332482), ("a-little-bit-long-string", -985981536),
    ("a-little-bit-longer-string", -1486304829), ("abc", 479470107),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
])
def test_partition_for_matches_the_java_client(key, java_murmur2):
    for partitions in (1, 4, 12, 1024):
        assert partition_for(key, partitions) == (java_murmur2 & 0x7FFFFFFF) % partitions


@given(st.binary(max_size=300))
def test_murmur2_is_the_one_faust_partitions_with(data):
    """The worker's own murmur2 (compiled with the core) against aiokafka's, which
    Faust and the producers' librdkafka ("murmur2_random") partition with."""
    from aiokafka.partitioner import murmur2 as aiokafka_murmur2

    from streams.core import murmur2
    assert murmur2(data) == aiokafka_murmur2(data)


def test_partition_for_spreads_accounts():
    assert all(0 <= partition_for(f"acct-{i}", 7) < 7 for i in range(200))
    assert len({partition_for(f"acct-{i}", 4) for i in range(200)}) == 4


# ================================================================ (d) invalid commands


def raw_command(name: str, **body) -> bytes:
    base = {"command_id": "c1", "account_id": A, "actor": ACTOR, "issued_at": T0,
            "expected_version": None, "correlation_id": "trace-9"}
    return CODEC.encode("ledger.CommandBatch", {"commands": [(f"ledger.{name}",
                                                              {**base, **body})]})


@pytest.mark.parametrize("body", [
    pytest.param({"command_id": ""}, id="empty-command-id"),
    pytest.param({"account_id": ""}, id="empty-account-id"),
    pytest.param({"actor": ""}, id="empty-actor"),
    pytest.param({"correlation_id": "x" * 201}, id="long-correlation-id"),
])
def test_schema_valid_but_model_invalid_command_is_refused(part, body):
    value = raw_command("Deposit", amount_minor=5, currency="USD", **body)

    bp = part.batch([value])

    (rejection,) = rejections_of(bp)
    assert rejection["reason"] == Reason.INVALID_COMMAND.value
    assert rejection["command_type"] == "Deposit"
    assert rejection["occurred_at"] == T0
    assert rejection["detail"]
    assert [o.kind for o in bp.outputs] == [REJECTIONS]
    assert part.store == {}


def test_an_invalid_command_does_not_stop_the_rest_of_its_record(part):
    good = open_account(A)
    bad = ("ledger.Deposit", {"command_id": "", "account_id": A, "actor": ACTOR,
                              "issued_at": T0, "expected_version": None,
                              "correlation_id": None, "amount_minor": 5, "currency": "USD"})
    value = CODEC.encode("ledger.CommandBatch", {"commands": [bad, ("ledger.OpenAccount",
                                                                     good.__dict__)]})

    bp = part.batch([value])

    assert [o.kind for o in bp.outputs] == [REJECTIONS, EVENTS]
    assert state_in(part, A).version == 1


# ================================================================ (e) dead letters


def dlq_cases() -> list:
    event = LedgerEvent.from_avro(CODEC.decode(
        Partition().batch([encode_batch([open_account(A)])]).outputs[0].value)[1])
    return [
        pytest.param(b"\x00\x01garbage", "malformed", id="garbage"),
        pytest.param(b"", "malformed", id="empty-bytes"),
        pytest.param(MAGIC + b"\xff" * 8 + b"\x00", "unknown_schema", id="unknown-fingerprint"),
        pytest.param(encode_batch([open_account(A)])[:-3], "malformed", id="truncated"),
        pytest.param(encode_batch([open_account(A)]) + b"\x00", "malformed", id="trailing"),
        pytest.param(encode(event), "wrong_schema", id="an-event"),
        pytest.param(b"\xc3\x01" + b"x" * 2000, "oversize", id="oversize"),
    ]


@pytest.mark.parametrize("value, code", dlq_cases())
def test_unreadable_command_records_go_to_the_dlq_untouched(value, code):
    part = Partition(partition=2, max_record_bytes=1024)
    part.offset = 41

    bp = part.batch([value])

    (out,) = bp.outputs
    assert out.kind == DLQ
    assert out.value == value
    assert [name for name, _ in out.headers] == ["source_topic", "source_partition",
                                                 "source_offset", "error_code", "error"]
    assert header(out, "source_topic") == b"ledger.commands"
    assert header(out, "source_partition") == b"2"
    assert header(out, "source_offset") == b"41"
    assert header(out, "error_code") == code.encode()
    assert header(out, "error")
    assert part.store == {}
    assert bp.stats.dead_letters == 1


def test_a_tombstone_command_record_is_a_dead_letter(part):
    bp = part.batch([None])

    (out,) = bp.outputs
    assert (out.kind, out.value, header(out, "error_code")) == (DLQ, b"", b"empty")


def test_a_dead_letter_does_not_stop_the_batch(part):
    bp = part.batch([b"junk", encode_batch([open_account(A)])])

    assert [o.kind for o in bp.outputs] == [DLQ, EVENTS]


def test_the_dlq_error_header_is_capped(part):
    bp = part.processor()
    bp.dead_letter(b"k", b"v", "t", 0, "e" * 5000, "malformed")

    assert len(header(bp.outputs[0], "error")) == 1000


# ================================================================ (f) transfer legs


def credit_leg(amount: int = 40, to: str = B, transfer_id: str = "t-1", **kw) -> TransferLeg:
    fields = {"kind": "CREDIT", "transfer_id": transfer_id, "from_account_id": A,
              "to_account_id": to, "amount_minor": amount, "currency": "USD",
              "issued_at": T0, "actor": ACTOR, "correlation_id": "trace-t", **kw}
    return TransferLeg(**fields)


def test_a_properly_signed_credit_credits_the_destination(part):
    part.batch([encode_batch([open_account(B), deposit(10, B)])])
    leg = part.signer.sign(credit_leg(40))

    bp = part.batch(legs=[encode(leg)])

    (event,) = events_of(bp)
    assert event.account_id == B and event.type == "TransferCredited"
    assert event.balance_after_minor == 50
    assert event.causation_id == leg.leg_id
    assert state_in(part, B).balance_minor == 50


def test_a_replayed_leg_has_no_second_effect(part):
    part.batch([encode_batch([open_account(B)])])
    value = encode(part.signer.sign(credit_leg(40)))
    first = part.batch(legs=[value]).outputs
    store = dict(part.store)

    again = part.batch(legs=[value]).outputs

    assert triples(again) == triples(first)
    assert part.last_changes == {}
    assert part.store == store
    assert state_in(part, B).balance_minor == 40


def test_credits_of_two_sources_with_one_transfer_id_are_told_apart(part):
    part.batch([encode_batch([open_account(B)])])
    from_a = encode(part.signer.sign(credit_leg(40, transfer_id="t1")))
    from_c = encode(part.signer.sign(credit_leg(5, transfer_id="t1", from_account_id=C)))

    part.batch(legs=[from_a, from_c])
    again = part.batch(legs=[from_a, from_c])  # both re-sent by their sources

    assert again.stats.replays == 2
    assert state_in(part, B).balance_minor == 45


def test_a_replayed_leg_re_encoded_has_no_second_effect(part):
    """The same leg in other bytes (a non-minimal varint: the decoder reads it, and the
    signature covers the decoded content) is still the same leg: credited once."""
    part.batch([encode_batch([open_account(B)])])
    leg = part.signer.sign(credit_leg(40, transfer_id="t-9"))
    value = encode(leg)
    at = value.index(b"\x06t-9")  # the transfer id's length, zigzag 3 -> one byte
    padded = value[:at] + b"\x86\x00" + value[at + 1:]  # the same length in two bytes
    assert padded != value and CODEC.decode(padded)[1] == CODEC.decode(value)[1]
    part.batch(legs=[value])

    again = part.batch(legs=[padded])

    assert again.stats.replays == 1 and events_of(again)[0].balance_after_minor == 40
    assert state_in(part, B).balance_minor == 40


def test_a_transfer_sends_its_leg_with_the_window_as_its_expiry(part):
    part.batch([encode_batch([open_account(A), deposit(100, A)])])
    bp = part.batch([encode_batch([transfer(30, to=account_off(0), account_id=A)])])
    (leg,) = [TransferLeg.from_avro(CODEC.decode(v)[1]) for k, _, v in triples(bp.outputs)
              if k == TRANSFERS]
    assert leg.expires_at == part.clock + WINDOW
    assert part.signer.verify(leg)
    assert not part.signer.verify(leg.replace(expires_at=leg.expires_at + 1))


def test_a_leg_past_its_expiry_is_a_dead_letter_not_a_second_credit(part):
    """The exact bytes of a leg, captured and sent again once its id is forgotten at
    the destination, would credit it again: past its expiry a leg is refused."""
    part.batch([encode_batch([open_account(B)])])
    value = encode(part.signer.sign(credit_leg(40, expires_at=part.clock + WINDOW)))
    part.batch(legs=[value])
    assert state_in(part, B).balance_minor == 40

    part.clock += WINDOW  # its expiry: the id is forgotten from here on
    again = part.batch(legs=[value])

    assert again.stats.dead_letters == 1 and events_of(again) == []
    (dead,) = [o for o in again.outputs if o.kind == DLQ]
    assert dict(dead.headers)["error_code"] == b"expired_leg" and dead.value == value
    assert state_in(part, B).balance_minor == 40


def test_a_leg_of_the_first_version_expires_a_window_after_it_was_issued(part):
    """A leg without an expiry (signed before legs had one) is credited while young, and
    its exact bytes sent again once the credit could be forgotten are refused."""
    part.batch([encode_batch([open_account(B)])])
    leg = part.signer.sign(credit_leg(40, issued_at=part.clock))
    assert not leg.expires_at and part.signer.verify(leg)
    value = encode(leg)
    part.batch(legs=[value])
    assert state_in(part, B).balance_minor == 40

    part.clock += WINDOW - part.processor().max_skew_ms  # the credit is still remembered
    again = part.batch(legs=[value])

    assert again.stats.dead_letters == 1 and events_of(again) == []
    (dead,) = [o for o in again.outputs if o.kind == DLQ]
    assert dict(dead.headers)["error_code"] == b"expired_leg"
    assert state_in(part, B).balance_minor == 40


def test_a_leg_of_another_ledger_with_the_same_secret_is_forged(part):
    part.batch([encode_batch([open_account(B)])])
    other = LegSigner(SECRET, app_id="another-ledger")
    value = encode(other.sign(credit_leg(40, expires_at=part.clock + WINDOW)))

    bp = part.batch(legs=[value])

    assert bp.stats.dead_letters == 1 and events_of(bp) == []
    (dead,) = [o for o in bp.outputs if o.kind == DLQ]
    assert dict(dead.headers)["error_code"] == b"forged_leg"


def test_a_leg_stored_with_the_digest_of_its_bytes_is_still_a_replay(part):
    """Outcomes stored before a leg's digest was its content's hold its bytes' digest."""
    part.batch([encode_batch([open_account(B)])])
    value = encode(part.signer.sign(credit_leg(40)))
    part.batch(legs=[value])
    okey = leg_outcome_key(B, "t-1:credit", A)
    stored = CommandOutcome.from_avro(CODEC.decode(part.store[okey])[1])
    part.store[okey] = encode(stored.replace(digest=hashlib.sha256(value).digest()[:16]))

    again = part.batch(legs=[value])

    assert again.stats.replays == 1
    assert state_in(part, B).balance_minor == 40


def test_a_replayed_leg_in_the_same_batch_has_no_second_effect(part):
    part.batch([encode_batch([open_account(B)])])
    value = encode(part.signer.sign(credit_leg(40)))

    bp = part.batch(legs=[value, value])

    assert bp.outputs[0].value == bp.outputs[1].value
    assert state_in(part, B).balance_minor == 40


def test_a_leg_signed_with_another_secret_is_a_forged_dead_letter(part):
    part.batch([encode_batch([open_account(B)])])
    value = encode(LegSigner(b"not-the-secret").sign(credit_leg(40)))

    bp = part.batch(legs=[value])

    (out,) = bp.outputs
    assert out.kind == DLQ and out.value == value
    assert header(out, "error_code") == b"forged_leg"
    assert header(out, "source_topic") == b"ledger.transfers"
    assert state_in(part, B).balance_minor == 0


def test_a_tampered_leg_does_not_verify(part):
    signed = part.signer.sign(credit_leg(40))
    tampered = signed.model_copy(update={"amount_minor": 4000})

    assert part.signer.verify(signed)
    assert not part.signer.verify(tampered)
    assert not part.signer.verify(credit_leg(40))  # unsigned


def test_a_leg_for_an_account_of_another_partition_is_a_dead_letter(part):
    value = encode(part.signer.sign(credit_leg(40, to=account_off(0))))

    (out,) = part.batch(legs=[value]).outputs

    assert (out.kind, header(out, "error_code")) == (DLQ, b"wrong_partition")


def test_a_refund_for_an_unknown_account_is_a_dead_letter(part):
    refund = part.signer.sign(credit_leg(40, to=account_off(0), kind="REFUND"))

    (out,) = part.batch(legs=[encode(refund)]).outputs

    assert (out.kind, header(out, "error_code")) == (DLQ, b"forged_leg")


def test_an_unreadable_leg_is_a_dead_letter(part):
    (out,) = part.batch(legs=[b"nonsense"]).outputs

    assert (out.kind, header(out, "error_code")) == (DLQ, b"malformed")


def test_a_refused_credit_sends_a_signed_refund_that_restores_the_source():
    source, dest = Partition(partition=0), Partition(partition=0)
    source.batch([encode_batch([open_account(A), deposit(100, A)])])
    cmd = transfer(30, C, A)  # C is never opened
    (_, leg_out) = source.batch([encode_batch([cmd])]).outputs

    refused = dest.batch(legs=[leg_out.value])
    (rejection,) = rejections_of(refused)
    refund_out = [o for o in refused.outputs if o.kind == TRANSFERS]
    back = source.batch(legs=[o.value for o in refund_out])

    assert rejection["reason"] == Reason.ACCOUNT_NOT_FOUND.value
    assert [o.key for o in refund_out] == [A.encode()]
    refund = TransferLeg.from_avro(CODEC.decode(refund_out[0].value)[1])
    assert refund.kind == "REFUND" and source.signer.verify(refund)
    (event,) = events_of(back)
    assert event.type == "TransferReversed"
    assert state_in(source, A).balance_minor == 100


def refunded_transfer(source: Partition) -> tuple[str, list[bytes]]:
    """A transfer from A to an account never opened: its id, and the refund legs back."""
    source.batch([encode_batch([open_account(A), deposit(100, A)])])
    cmd = transfer(30, C, A)
    (_, leg_out) = source.batch([encode_batch([cmd])]).outputs
    refused = Partition(partition=0).batch(legs=[leg_out.value])
    return cmd.command_id, [o.value for o in refused.outputs if o.kind == TRANSFERS]


def test_a_command_named_as_a_refund_leg_keeps_its_own_outcome():
    source = Partition(partition=0)
    transfer_id, refund = refunded_transfer(source)
    named = deposit(5, A, command_id=f"{transfer_id}:refund")  # the refund leg's id
    first = source.batch([encode_batch([named])])

    back = source.batch(legs=refund)
    again = source.batch(legs=refund)  # a copy of the refund leg
    retry = source.batch([encode_batch([named])])

    assert events_of(back)[0].type == "TransferReversed"
    assert again.stats.replays == 1  # not refunded twice
    assert retry.stats.replays == 1 and triples(retry.outputs) == triples(first.outputs)
    assert state_in(source, A).balance_minor == 105


def test_a_refund_stored_under_its_former_key_is_still_known():
    source = Partition(partition=0)
    transfer_id, refund = refunded_transfer(source)
    source.batch(legs=refund)
    leg_id = f"{transfer_id}:refund"
    # as stored before a refund's key named its source
    source.store[outcome_key(A, leg_id)] = source.store.pop(leg_outcome_key(A, leg_id, A))

    again = source.batch(legs=refund)

    assert again.stats.replays == 1 and state_in(source, A).balance_minor == 100


def test_a_transfer_between_accounts_of_one_partition_goes_round_the_topic(part):
    part.batch([encode_batch([open_account(A), open_account(B), deposit(100, A)])])
    bp = part.batch([encode_batch([transfer(30, B, A)])])
    legs = [o.value for o in bp.outputs if o.kind == TRANSFERS]

    part.batch(legs=legs)

    assert (state_in(part, A).balance_minor, state_in(part, B).balance_minor) == (70, 30)


# ================================================================ store key helpers


def test_expiry_keys_sort_by_time_and_parse_back():
    keys = [expiry_key(t, A, "h") for t in (T0 + 5, 3, T0, 0)]

    assert sorted(keys) == [expiry_key(t, A, "h") for t in (0, 3, T0, T0 + 5)]
    assert parse_expiry_key(expiry_key(T0, A, "hold-1")) == (T0, A, "hold-1")


def test_stored_outcomes_decode(part):
    part.batch([encode_batch([open_account(A, command_id="o-1")])])

    outcome = CommandOutcome.from_avro(CODEC.decode(part.store[outcome_key(A, "o-1")])[1])

    assert outcome.rejected is False and len(outcome.records) == 1


# ================================================================ every Reason


@pytest.mark.parametrize("path", ["core", "general"])
def test_a_command_issued_ahead_of_the_clock_is_refused(part, path, monkeypatch):
    """issued_at becomes the events' time: more than max_skew_ms ahead of the broker's
    append time is refused, on the compiled core and on the general path alike."""
    if path == "general":
        monkeypatch.setattr(processor, "_headers", lambda: None)
    part.batch([encode_batch([open_account(A, issued_at=T0)])])
    late = deposit(5, A, command_id="late", issued_at=T0 + 300_001)
    edge = deposit(7, A, command_id="edge", issued_at=T0 + 300_000)

    bp = part.batch([encode_batch([late, edge])])

    (rejection,) = rejections_of(bp)
    assert (rejection["command_id"], rejection["reason"]) == ("late", "issued_in_future")
    assert rejection["detail"] == ("issued_at is 300001 ms ahead of the ledger's clock; "
                                   "at most 300000")
    assert [e.command_id for e in events_of(bp)] == ["edge"]
    part.clock = T0 + 400_000  # later, the same command is a retry: the same answer
    again = part.batch([encode_batch([late])])
    assert rejections_of(again) == [rejection] and again.stats.replays == 1


PROCESSOR_REASON_CASES = {
    Reason.ISSUED_IN_FUTURE: test_a_command_issued_ahead_of_the_clock_is_refused,
    Reason.IDEMPOTENCY_KEY_REUSED: test_same_command_id_with_other_content_is_refused,
    Reason.WRONG_PARTITION: test_a_command_for_an_account_of_another_partition_is_refused,
    Reason.INVALID_COMMAND: test_schema_valid_but_model_invalid_command_is_refused,
}


def test_every_reason_is_covered_by_the_domain_or_the_processor_tests():
    assert set(PROCESSOR_REASON_CASES) == PROCESSOR_REASONS
    assert DOMAIN_REASONS | set(PROCESSOR_REASON_CASES) | TRANSACTION_REASONS == set(Reason)


def test_every_reason_a_batch_can_report_is_a_reason_member():
    part = Partition()
    bp = part.batch([encode_batch(a_history()),
                     raw_command("Deposit", amount_minor=5, currency="USD", command_id=""),
                     encode_batch([deposit(1, A, command_id="dup"),
                                   withdraw(1, A, command_id="dup")])])

    assert set(bp.stats.reasons) <= {r.value for r in Reason}
    assert {Reason.INVALID_COMMAND.value, Reason.WRONG_PARTITION.value,
            Reason.IDEMPOTENCY_KEY_REUSED.value} <= set(bp.stats.reasons)


# ================================================================ known bugs


def _same_partition_pair() -> tuple[str, str]:
    """Accounts "x" and "x\\0<n>" that hash to the same partition."""
    n = next(i for i in range(1000)
             if partition_for("x", PARTITIONS) == partition_for(f"x\0{i}", PARTITIONS))
    return "x", f"x\0{n}"


def test_ids_with_control_characters_are_invalid_commands():
    # NUL separates the parts of store keys: ("x", "0\0k") and ("x\00", "k") would share
    # an idempotency key, and an expiry key would parse back as another account.
    plain, nul = _same_partition_pair()
    suffix = nul.split("\0", 1)[1]
    part = Partition(partition=partition_for(plain, PARTITIONS))
    bad = CODEC.encode("ledger.CommandBatch", {"commands": [
        ("ledger.OpenAccount", {**open_account(plain).__dict__, "command_id": f"{suffix}\0k"}),
        ("ledger.OpenAccount", {**open_account(plain).__dict__, "account_id": nul,
                                "command_id": "k"}),
    ]})

    bp = part.batch([bad])

    assert [r["reason"] for r in rejections_of(bp)] == ["invalid_command"] * 2
    assert state_in(part, plain) is None and state_in(part, nul) is None
    assert parse_expiry_key(expiry_key(T0, "x", "h")) == (T0, "x", "h")


INVISIBLE = ["\u202e", "\u200b", "\u0085", "\u2028", "\ufeff", "\U000e0041", "\u00ad"]


@pytest.mark.parametrize("path", ["core", "general"])
@pytest.mark.parametrize("char", INVISIBLE)
def test_ids_with_invisible_characters_are_invalid_commands(char, path, monkeypatch):
    """An id (or a correlation id) that reads as another, or reorders the text around
    it (right-to-left override, zero-width space, C1 controls, tags, ...) is refused."""
    if path == "general":
        monkeypatch.setattr(processor, "_headers", lambda: None)
    part = Partition()
    bad = CODEC.encode("ledger.CommandBatch", {"commands": [
        ("ledger.OpenAccount", {**open_account(A).__dict__, "command_id": f"o{char}1"}),
        ("ledger.OpenAccount", {**open_account(A).__dict__, "actor": f"{char}admin"}),
        ("ledger.OpenAccount", {**open_account(A).__dict__, "correlation_id": f"t{char}"}),
    ]})

    bp = part.batch([bad])

    assert [r["reason"] for r in rejections_of(bp)] == ["invalid_command"] * 3
    assert state_in(part, A) is None


def test_the_refused_characters_cover_this_pythons_unicode_database():
    """schemas.text lists them (workers on other Python versions must agree): every
    control, format, separator and surrogate code point this Python knows is there."""
    import unicodedata

    from schemas.text import REFUSED

    kinds = {"Cc", "Cf", "Zl", "Zp", "Cs"}
    assert [hex(c) for c in range(0x110000)
            if unicodedata.category(chr(c)) in kinds and c not in REFUSED] == []
    assert all(unicodedata.category(chr(c)) in kinds | {"Cn"} for c in REFUSED)


def test_rejection_model_matches_what_the_processor_writes(part):
    bp = part.batch([encode_batch([withdraw(1, A)])])

    rejection = Rejection.from_avro(rejections_of(bp)[0])

    assert encode(rejection) == bp.outputs[0].value


def test_every_log_line_about_a_command_carries_its_correlation_id(part, caplog):
    part.batch([encode_batch([open_account(A)])])
    ok = deposit(10, A).model_copy(update={"correlation_id": "corr-ok"})
    refused = withdraw(10_000, A).model_copy(update={"correlation_id": "corr-refused"})

    with caplog.at_level("DEBUG", logger="ledger.processor"):
        part.batch([encode_batch([ok, refused])])

    lines = {r.msg: r for r in caplog.records}
    assert lines["accepted"].correlation_id == "corr-ok"
    assert lines["accepted"].command_id == ok.command_id
    assert lines["rejected"].correlation_id == "corr-refused"
    assert lines["rejected"].reason == "insufficient_funds"


def test_nothing_per_command_is_logged_at_info(part, caplog):
    with caplog.at_level("INFO", logger="ledger.processor"):
        part.batch([encode_batch([open_account(A), deposit(10, A), withdraw(10_000, A)])])

    assert caplog.records == []


@given(st.lists(st.tuples(st.binary(max_size=30), st.one_of(st.none(), st.binary(max_size=60))),
                max_size=20))
def test_records_packed_in_one_value_unpack_as_they_were(records):
    assert unpack_records(pack_records(records)) == records


def test_a_steps_outcome_log_is_indexed_and_forgotten_like_its_outcomes(part):
    """With its step's tag, a batch indexes the one changelog record that will carry its
    outcome records (streams.worker.engine), and forgets it a window after the step."""
    tag = (41, -1)
    bp = part.processor()
    bp.command_record(None, encode_batch([open_account(A), deposit(5, A)]), "t", 41,
                      part.clock)
    changes = bp.finish(tag)
    assert retention_key(part.clock + WINDOW, outcome_log_key(tag)) in changes
    part.store.apply(changes)
    part.store[outcome_log_key(tag)] = b"the log, as recovery leaves it in the store"

    part.clock += WINDOW + 1
    later = part.batch([encode_batch([deposit(1, A, command_id="later")])])

    assert outcome_log_key(tag) not in part.store
    assert later.stats.events == 1
    # without a tag (a batch decided alone, as the benchmarks do) there is no log
    bp = part.processor()
    bp.command_record(None, encode_batch([deposit(2, A, command_id="again")]), "t", 60,
                      part.clock)
    assert not any(k[:1] == b"o" or k[9:10] == b"o" for k in bp.finish())


@pytest.mark.parametrize("mix", ["simple", "full"])
def test_deciding_alone_times_decisions_not_rejections_at_the_door(mix, monkeypatch):
    """``bench/decide.py``'s run stamps each record as the broker would: at a record time
    of 1 ms, as it once did, every command was issued_in_future and the figure timed
    rejections alone."""
    import random

    from streams.dev.bench import deciding, workload

    seen: list[processor.Stats] = []
    finish = processor.BatchProcessor.finish

    def finish_and_count(self, *args):
        seen.append(self.stats)
        return finish(self, *args)

    monkeypatch.setattr(processor.BatchProcessor, "finish", finish_and_count)
    commands = workload(mix, 3000, random.Random(1), "a")
    assert deciding(commands, 500)() == len(commands)
    events = sum(s.events for s in seen)
    reasons = {r for s in seen for r in s.reasons}
    assert events > len(commands) * 0.7 and "issued_in_future" not in reasons


def test_the_benchs_outcome_reader_reads_ids_as_a_decode_does(part):
    """``ledger bench`` counts outcomes from their ids alone: the command's event and
    rejection count, a leg's event (caused by the leg, not a command) does not."""
    from streams.dev.bench import outcome_ids

    a, b = accounts_on(0, 2)
    bp = part.batch([encode_batch([open_account(a, issued_at=T0), open_account(b, issued_at=T0),
                                   deposit(50, a, issued_at=T0), withdraw(500, a, issued_at=T0),
                                   transfer(20, b, a, issued_at=T0)])])
    legs = [v for kind, _, v in triples(bp.outputs) if kind == TRANSFERS]
    credited = part.batch(legs=legs)
    values = [v for kind, _, v in triples([*bp.outputs, *credited.outputs])
              if kind in (EVENTS, REJECTIONS)]
    assert len(values) == 6
    for value in values:
        d = CODEC.decode(value)[1]
        assert outcome_ids(value) == (d["command_id"], d.get("causation_id", d["command_id"]))
    assert sum(cid == cause for cid, cause in map(outcome_ids, values)) == 5
