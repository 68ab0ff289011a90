"""The compiled core (``streams.core``) against the processor's general path.

The core takes the commands it knows straight from their Avro bytes; everything
else, and anything it is unsure of, goes to the general path (the pydantic models and
``streams.domain``). Both must give the same bytes: here every history is run twice,
once as the worker runs it and once with the core switched off (as with a schema
registry), and the outputs and the whole store are compared byte for byte. CI runs
this file against the compiled build and against the plain source.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import CODEC
from schemas.models import (
    CommandBase,
    Deposit,
    PlaceHold,
    Posting,
    Reverse,
    Transaction,
    Transfer,
    encode_batch,
)
from streams.worker import processor
from streams.worker.processor import REJECTIONS, TRANSFERS, BatchProcessor
from tests.unit.conftest import (
    T0,
    Partition,
    accounts_on,
    deposit,
    open_account,
    transfer,
    triples,
    withdraw,
)
from tests.unit.test_properties import ACCOUNTS, build, steps


def run(commands: list[CommandBase], cuts: list[int], general: bool,
        monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, bytes | None, bytes]],
                                                  dict[bytes, bytes]]:
    """Outputs and final store of ``commands``, in records cut at ``cuts``, one batch
    per record (with the clock moving, so some ids are forgotten on the way). The
    transfer legs a batch sends are received by the next batch, and again by the one
    after it (a redelivery)."""
    with monkeypatch.context() as m:
        if general:
            m.setattr(processor, "_headers", lambda: None)
        part = Partition(window_ms=200)
        outputs = []
        bounds = [0, *sorted({c % (len(commands) + 1) for c in cuts}), len(commands)]
        legs: list[bytes] = []
        again: list[bytes] = []
        for start, end in [*itertools.pairwise(bounds), (0, 0), (0, 0)]:
            bp = part.batch([encode_batch(commands[start:end])] if start < end else [],
                            legs=[*again, *legs])
            outputs += triples(bp.outputs)
            again, legs = legs, [value for kind, _, value in triples(bp.outputs)
                                 if kind == TRANSFERS]
            part.clock += 50
        return outputs, dict(part.store)


def odd_ids(commands: list[CommandBase], picks: list[int]) -> list[CommandBase]:
    """Some commands with ids the models refuse (bypassing validation to send them)."""
    bad = ["", "x" * 201, "new\nline", "nul\x00", "del\x7f", "ok-" + "é" * 190]
    out = list(commands)
    for i, pick in enumerate(picks):
        if out:
            c = out[pick % len(out)]
            field = ("command_id", "account_id", "actor")[i % 3]
            out[pick % len(out)] = type(c).model_construct(
                **{**c.__dict__, field: bad[pick % len(bad)]})
    return out


@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(script=steps, cuts=st.lists(st.integers(0, 200), max_size=6),
       picks=st.lists(st.integers(0, 1000), max_size=4))
def test_the_core_and_the_general_path_give_the_same_bytes(script, cuts, picks, monkeypatch):
    names = accounts_on(0, len(ACCOUNTS))
    alias = dict(zip([*ACCOUNTS, "nowhere"], [*names, "acct-nowhere"], strict=True))
    a, b, c = names[:3]
    clock, commands = T0, [open_account(a, "USD", 100, issued_at=T0),
                           open_account(b, "USD", 0, issued_at=T0),
                           open_account(c, "EUR", 0, issued_at=T0),
                           deposit(200, a, "USD", issued_at=T0),
                           deposit(150, b, "USD", issued_at=T0)]
    placed: list[tuple[str, str, int]] = []
    for i, step in enumerate(script):
        clock += step.dt
        if step.kind == "deliver":
            if commands:  # a retry (of the same id, or the id reused for another command)
                commands.append(commands[step.pick % len(commands)])
            continue
        cid = f"c{i}" if step.pick % 5 else f"c{step.pick % 3}"
        account, hold, at = alias[step.account], None, clock
        if step.kind in ("capture_hold", "release_hold", "expire_hold") and placed:
            account, hold, expires_at = placed[step.pick % len(placed)]  # aim at a hold
            if step.kind == "expire_hold" and step.pick % 3:
                at = max(clock, expires_at)  # mostly when it is due
        command = build(step, cid, at, account, alias[step.other], hold)
        if isinstance(command, Transfer) and step.pick % 3 == 0:  # a transaction instead
            base = {k: v for k, v in command.__dict__.items()
                    if k not in ("to_account_id", "amount_minor", "currency")}
            command = Transaction(**base | {"command_id": f"t{i}", "postings": [
                Posting(from_account_id=account, to_account_id=alias[step.other],
                        amount_minor=step.amount, currency=step.currency),
                Posting(from_account_id=alias[step.other], to_account_id=a,
                        amount_minor=step.amount // 2 + 1, currency="USD")]})
            commands.append(command)
            if step.pick % 2:
                command = Reverse(command_id=f"r{i}", account_id=account, actor="t",
                                  issued_at=at, transaction_id=f"t{i}")
        elif isinstance(command, Transfer) and step.pick % 3 == 1:  # and its reversal
            commands.append(command)
            command = Reverse(command_id=f"r{i}", account_id=account, actor="t",
                              issued_at=at, transaction_id=command.command_id)
        if step.pick % 7 == 1 and "metadata" in type(command).model_fields:  # general path
            command = command.replace(metadata={"k": f"v{i}", "order": str(step.pick)})
        if isinstance(command, PlaceHold):
            placed.append((command.account_id, command.hold_id, command.expires_at))
        commands.append(command)
    commands = odd_ids(commands, picks)

    fast = run(commands, cuts, general=False, monkeypatch=monkeypatch)
    general = run(commands, cuts, general=True, monkeypatch=monkeypatch)
    assert fast[0] == general[0]
    assert fast[1] == general[1]


@pytest.fixture
def general(monkeypatch) -> list[str]:
    """The commands that went to the general path (their record names), in order."""
    seen: list[str] = []
    item = BatchProcessor._item
    monkeypatch.setattr(BatchProcessor, "_item",
                        lambda self, it: (seen.append(it[0]), item(self, it))[1])
    return seen


def test_the_core_takes_opens_deposits_and_withdrawals(part, general):
    (a,) = accounts_on(0, 1)
    part.batch([encode_batch([open_account(a, issued_at=T0), deposit(50, a, issued_at=T0)])])
    assert general == []
    bp = part.batch([encode_batch([Deposit.model_construct(
        command_id="y" * 201, account_id=a, actor="t", issued_at=T0, amount_minor=1,
        currency="USD", expected_version=None, correlation_id=None)])])
    [(kind, _, _)] = triples(bp.outputs)
    assert kind == REJECTIONS and bp.stats.reasons == {"invalid_command": 1}
    assert general == ["ledger.Deposit"]


def test_a_transaction_takes_the_core_with_the_rest_of_its_record(part, general):
    a, b = accounts_on(0, 2)
    bp = part.batch([encode_batch([
        open_account(a, issued_at=T0), open_account(b, issued_at=T0),
        deposit(50, a, issued_at=T0),
        Transaction(command_id="t1", account_id=a, actor="t", issued_at=T0, postings=[
            Posting(from_account_id=a, to_account_id=b, amount_minor=20, currency="USD",
                    expected_version=2)]),
        deposit(5, b, issued_at=T0)])])
    assert general == []
    assert [CODEC.decode(v)[1]["payload"][0] for k, _, v in triples(bp.outputs)
            if k == "events"][-2:] == ["ledger.TransactionStarted", "ledger.Deposited"]


def test_the_core_answers_a_retry_and_refuses_an_id_reused(part, general):
    (a,) = accounts_on(0, 1)
    first = deposit(50, a, issued_at=T0)
    bp = part.batch([encode_batch([open_account(a, issued_at=T0), first])])
    event = triples(bp.outputs)[-1]

    again = part.batch([encode_batch([first])])
    assert triples(again.outputs) == [event] and again.stats.replays == 1
    reused = part.batch([encode_batch([first.replace(amount_minor=51)])])
    [(kind, _, value)] = triples(reused.outputs)
    assert kind == REJECTIONS and reused.stats.reasons == {"idempotency_key_reused": 1}
    assert CODEC.decode(value)[1]["detail"] == \
        f"command_id {first.command_id!r} was used for another command"
    assert general == []


def test_the_core_credits_a_transfers_leg(part, monkeypatch):
    """A signed leg takes the core: a credit, a credit refused (with its refund leg) and
    the refund; a redelivery takes the general path (the outcomes are the general
    path's either way, as the test above shows byte for byte)."""
    decoded: list[str] = []
    decode = CODEC.decode
    monkeypatch.setattr(CODEC, "decode", lambda raw, expect=None: (
        decoded.append((r := decode(raw, expect=expect))[0]), r)[1])
    a, b, c = accounts_on(0, 3)
    bp = part.batch([encode_batch([open_account(a, issued_at=T0), open_account(b, issued_at=T0),
                                   open_account(c, "EUR", issued_at=T0),
                                   deposit(100, a, issued_at=T0),
                                   transfer(40, b, a, issued_at=T0),
                                   transfer(10, c, a, issued_at=T0)])])
    to_b, to_c = [v for kind, _, v in triples(bp.outputs) if kind == TRANSFERS]
    decoded.clear()

    credited = part.batch(legs=[to_b])
    [(kind, _, event)] = triples(credited.outputs)
    assert kind == "events" and CODEC.decode(event)[1]["payload"][0] == "ledger.TransferCredited"
    assert "ledger.TransferLeg" not in decoded

    refused = part.batch(legs=[to_c])  # EUR account: a rejection and a refund leg
    assert [kind for kind, _, _ in triples(refused.outputs)] == [REJECTIONS, TRANSFERS]
    refund = triples(refused.outputs)[1][2]
    [(kind, key, event)] = triples(part.batch(legs=[refund]).outputs)
    assert (kind, key) == ("events", a.encode())
    assert CODEC.decode(event)[1]["payload"][0] == "ledger.TransferReversed"
    assert "ledger.TransferLeg" not in decoded

    assert triples(part.batch(legs=[refund]).outputs) == [("events", a.encode(), event)]
    assert decoded.count("ledger.TransferLeg") == 1


def test_a_compiled_core_older_than_its_source_is_stale(tmp_path):
    (tmp_path / "streams").mkdir()
    built = tmp_path / "streams" / "core.cpython-311-x86_64-linux-gnu.so"
    source = tmp_path / "streams" / "core.py"
    built.write_bytes(b"")
    source.write_text("")
    os.utime(built, (1_000, 1_000))
    os.utime(source, (2_000, 2_000))
    assert not processor.stale(built)  # an installed copy: no pyproject.toml beside it
    (tmp_path / "pyproject.toml").write_text("")
    assert processor.stale(built)  # a checkout whose core.py was edited after the build
    os.utime(built, (3_000, 3_000))
    assert not processor.stale(built)


def test_the_cores_rejection_details_speak_in_the_accounts_currency(part, general):
    (a,) = accounts_on(0, 1)
    bp = part.batch([encode_batch([open_account(a, issued_at=T0), deposit(50, a, issued_at=T0),
                                   withdraw(80, a, issued_at=T0)])])
    assert general == []  # all three on the core
    rejection = [CODEC.decode(v)[1] for k, _, v in triples(bp.outputs) if k == REJECTIONS]
    assert [r["detail"] for r in rejection] == [
        "available 0.50 USD minus 0.80 USD would be below the overdraft limit of 0.00 USD"]


@given(st.lists(st.one_of(st.text(), st.text("ab'\"\\\né\x7f ")), min_size=4, max_size=4),
       st.one_of(st.none(), st.integers()), st.integers(-2**63, 2**63 - 1))
def test_content_digest_is_the_general_paths(texts, expected_version, amount):
    """A retry is matched by the digest of its content: the core's must be the general
    path's (``processor.command_digest``), whatever the text."""
    from streams import core

    command_id, account_id, actor, currency = texts
    c = core.Cmd(core.DEPOSIT, command_id, account_id, actor, 1, expected_version, None)
    c.amount_minor, c.currency = amount, currency
    general = Deposit.model_construct(command_id=command_id, account_id=account_id,
                                      actor=actor, issued_at=1,
                                      expected_version=expected_version, amount_minor=amount,
                                      currency=currency)
    assert core.content_digest(core._content(c)) == processor.command_digest(general)


def test_event_ids_are_version_4_uuids_of_the_keyed_hash():
    import hashlib
    import uuid

    from streams.core import event_id

    for n in range(200):
        raw = bytearray(hashlib.blake2b(f"c{n}/a{n}/{n}".encode(), digest_size=16,
                                        key=b"ledger-event-id-v1").digest())
        raw[6] = raw[6] & 0x0F | 0x40
        raw[8] = raw[8] & 0x3F | 0x80
        assert event_id(f"c{n}", f"a{n}", n) == str(uuid.UUID(bytes=bytes(raw)))
        assert uuid.UUID(event_id(f"c{n}", f"a{n}", n)).version == 4


def transactions_through_one_partition(general: bool, monkeypatch: pytest.MonkeyPatch,
                                        ) -> tuple[list[str], list[tuple], dict[bytes, bytes]]:
    """A committed and a rejected transaction, each step fed to the next batch: the
    messages the general path decoded, every output, and the store."""
    decoded: list[str] = []
    decode = CODEC.decode
    with monkeypatch.context() as m:
        m.setattr(CODEC, "decode", lambda raw, expect=None: (
            decoded.append((r := decode(raw, expect=expect))[0]), r)[1])
        if general:
            m.setattr(processor, "_headers", lambda: None)
        part = Partition()
        a, b, c = accounts_on(0, 3)
        outputs = triples(part.batch([encode_batch([
            open_account(a, issued_at=T0, command_id="o1"),
            open_account(b, issued_at=T0, command_id="o2"),
            deposit(100, a, issued_at=T0, command_id="d1")])]).outputs)
        kinds: list[str] = []
        for tid, to in (("t1", b), ("t2", c)):  # c is missing: refused
            bp = part.batch([encode_batch([Transaction(
                command_id=tid, account_id=a, actor="t", issued_at=T0, postings=[
                    Posting(from_account_id=a, to_account_id=to, amount_minor=30,
                            currency="USD"),
                    Posting(from_account_id=b, to_account_id=a, amount_minor=5,
                            currency="USD")])])])
            while bp.outputs:
                outputs += triples(bp.outputs)
                decoded.clear()
                bp = part.batch(legs=[v for k, _, v in triples(bp.outputs) if k == TRANSFERS])
                kinds += [d for d in decoded if d == "ledger.TransactionMessage"]
        return kinds, outputs, dict(part.store)


def test_the_core_takes_a_participants_steps_and_leaves_the_votes(monkeypatch):
    """Every step takes the core, with the general path's bytes, but a VOTE for a
    transaction that is over and an ABORT to an account that reserved nothing."""
    fast_kinds, *fast = transactions_through_one_partition(False, monkeypatch)
    general_kinds, *general = transactions_through_one_partition(True, monkeypatch)
    assert fast == general
    # t2 (a, c, b): b's yes came after c's no: it is answered with an ABORT, which finds
    # b released already; the ABORT to c, which voted no, finds nothing reserved
    assert len(fast_kinds) == 3
    assert len(general_kinds) == 2 * 3 + 3 * 3 + 1  # every step of both
