"""Undo-tagged store values and the per-partition checkpoint (streams.worker.state)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams import core
from streams.core import wrap_changes
from streams.worker.state import CHECKPOINT_KEY, Checkpoint, PartitionView, unwrap, wrap


@pytest.mark.parametrize("tag", [(5, 7), (-1, 7), (5, -1), (0, 0)])
def test_a_value_whose_tag_the_checkpoint_covers_reads_as_new(tag):
    ck = Checkpoint(commands=5, transfers=7)

    assert unwrap(wrap(tag, b"old", b"new"), ck) == b"new"
    assert unwrap(wrap(tag, None, b"new"), ck) == b"new"


@pytest.mark.parametrize("tag", [(6, 7), (5, 8), (6, 8)])
def test_a_value_written_by_an_unfinished_batch_reads_as_prev(tag):
    ck = Checkpoint(commands=5, transfers=7)

    assert unwrap(wrap(tag, b"old", b"new"), ck) == b"old"


def test_an_uncovered_value_without_prev_reads_as_absent():
    ck = Checkpoint(commands=5, transfers=7)

    assert unwrap(wrap((6, 7), None, b"new"), ck) is None


def test_an_empty_prev_is_not_an_absent_prev():
    ck = Checkpoint()

    assert unwrap(wrap((0, 0), b"", b"new"), ck) == b""
    assert unwrap(wrap((0, 0), b"", b"new"), Checkpoint(0, 0)) == b"new"


def test_empty_new_values_survive():
    assert unwrap(wrap((1, 1), b"old", b""), Checkpoint(1, 1)) == b""
    assert unwrap(wrap((1, 1), None, b""), Checkpoint(1, 1)) == b""


def test_a_missing_record_reads_as_absent():
    assert unwrap(None, Checkpoint(10, 10)) is None


def test_the_fresh_checkpoint_covers_nothing_written():
    ck = Checkpoint()

    assert (ck.commands, ck.transfers, ck.pending) == (-1, -1, None)
    assert ck.covers(-1, -1)
    assert not ck.covers(0, -1) and not ck.covers(-1, 0)


def test_values_with_binary_content_are_split_exactly():
    prev, new = bytes(range(256)), b"\x00\xff" * 300
    raw = wrap((3, 4), prev, new)

    assert unwrap(raw, Checkpoint(3, 4)) == new
    assert unwrap(raw, Checkpoint(2, 4)) == prev


@pytest.mark.parametrize("ck", [Checkpoint(), Checkpoint(10, 3),
                                Checkpoint(10, 3, pending=(12, 5)),
                                Checkpoint(-1, 9, pending=(4, 9))], ids=repr)
def test_checkpoint_encode_decode_round_trip(ck):
    back = Checkpoint.decode(ck.encode())

    assert back == ck
    assert back.pending is None or isinstance(back.pending, tuple)


def test_no_checkpoint_decodes_as_the_fresh_one():
    assert Checkpoint.decode(None) == Checkpoint()


def test_advancing_clears_pending_and_never_goes_back():
    ck = Checkpoint(10, 3, pending=(12, 5))

    assert ck.advanced(12, 5) == Checkpoint(12, 5)
    assert ck.advanced(8, 1) == Checkpoint(10, 3)


def test_partition_view_reads_as_of_its_checkpoint():
    db = {CHECKPOINT_KEY: Checkpoint(5, 5).encode(),
          b"done": wrap((5, 5), b"v1", b"v2"),
          b"half": wrap((6, 5), b"v1", b"v2"),
          b"new-half": wrap((6, 5), None, b"v2")}
    view = PartitionView(db)

    assert (view.get(b"done"), view.get(b"half"), view.get(b"new-half"),
            view.get(b"missing")) == (b"v2", b"v1", None, None)


def test_partition_view_wraps_changes_with_the_committed_prev():
    db = {CHECKPOINT_KEY: Checkpoint(5, 5).encode(),
          b"k": wrap((4, 4), b"v0", b"v1"),           # committed: v1
          b"torn": wrap((6, 6), b"v1", b"garbage")}   # unfinished: committed is v1
    view = PartitionView(db)

    records = view.changes_to_records({b"k": b"v2", b"torn": b"v2", b"fresh": b"v2",
                                       b"gone": None}, tag=(7, 7))

    assert records[b"gone"] is None
    for key, prev in ((b"k", b"v1"), (b"torn", b"v1"), (b"fresh", None)):
        assert unwrap(records[key], Checkpoint(7, 7)) == b"v2"
        assert unwrap(records[key], Checkpoint(5, 5)) == prev


class CountingDb(dict):
    def __init__(self, *args):
        super().__init__(*args)
        self.reads: list[bytes] = []

    def get(self, key, default=None):
        self.reads.append(key)
        return super().get(key, default)


def test_accounts_kept_across_steps_are_read_from_the_store_once():
    db = CountingDb({CHECKPOINT_KEY: Checkpoint(5, 5).encode(),
                     b"aone": wrap((4, 4), None, b"one-v1"), b"ione": wrap((4, 4), None, b"o")})
    resident: dict[bytes, bytes | None] = {}
    first = PartitionView(db, resident=resident)
    assert (first.get(b"aone"), first.get(b"atwo"), first.get(b"ione")) == \
        (b"one-v1", None, b"o")
    # the step wrote account two and changed account one
    core.keep_resident(resident, first.reads.known, {b"atwo": b"two-v1", b"aone": b"one-v2",
                                                     b"inew": b"x"}, max_keys=10)
    assert resident == {b"aone": b"one-v2", b"atwo": b"two-v1"}  # accounts only

    db.reads.clear()
    second = PartitionView(db, Checkpoint(6, 6), resident=resident)
    assert (second.get(b"aone"), second.get(b"atwo"), second.get(b"ione")) == \
        (b"one-v2", b"two-v1", b"o")
    assert db.reads == [b"ione"]
    # a value wrapped for the store carries the resident value as its previous one
    records = second.changes_to_records({b"aone": b"one-v3"}, tag=(7, 7))
    assert unwrap(records[b"aone"], Checkpoint(6, 6)) == b"one-v2"


def test_accounts_kept_across_steps_are_bounded_the_latest_written_kept():
    resident: dict[bytes, bytes | None] = {}
    core.keep_resident(resident, {b"a1": b"1", b"a2": b"2", b"a3": None}, {}, max_keys=3)
    core.keep_resident(resident, {b"a4": b"4"}, {b"a1": b"1'"}, max_keys=3)
    assert resident == {b"a3": None, b"a4": b"4", b"a1": b"1'"}


@pytest.mark.parametrize("ck", [Checkpoint(), Checkpoint(5, -1),
                                Checkpoint(2**40, 7, (2**40 + 3, 9)), Checkpoint(-1, -1, (4, -1))])
def test_a_checkpoint_is_packed_and_reads_back(ck):
    raw = ck.encode()
    assert raw[:1] in (b"\x01", b"\x02") and len(raw) <= 33
    assert Checkpoint.decode(raw) == ck


def test_a_checkpoint_written_as_json_still_reads():
    """Stores and changelogs written before the packed form hold JSON checkpoints."""
    assert Checkpoint.decode(b'{"commands": 9, "transfers": 3, "pending": null}') == \
        Checkpoint(9, 3)
    assert Checkpoint.decode(b'{"commands": 9, "transfers": 3, "pending": [12, 4]}') == \
        Checkpoint(9, 3, (12, 4))


@given(st.dictionaries(st.binary(max_size=6), st.one_of(st.none(), st.binary(max_size=40))),
       st.dictionaries(st.binary(max_size=6), st.one_of(st.none(), st.binary(max_size=40))),
       st.integers(-1, 2**62), st.integers(-1, 2**62))
def test_the_cores_wrap_is_the_reference_wrap(changes, stored, tag_c, tag_x):
    """streams.core.wrap_changes (compiled) writes what streams.worker.state.wrap does, whether a
    previous value was read already (``known``) or is read now."""
    known = dict(list(stored.items())[::2])
    got = wrap_changes(changes, known, lambda k: stored.get(k), tag_c, tag_x)
    assert got == {k: None if v is None else wrap((tag_c, tag_x), stored.get(k), v)
                   for k, v in changes.items()}
