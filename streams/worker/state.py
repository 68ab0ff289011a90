"""The accounts store: values that survive a crash half-way through a batch.

The worker writes each batch's state changes to Faust's changelog itself (through
librdkafka), then to RocksDB in one WriteBatch. A crash can leave only part of a
batch's changelog records on the broker, and Faust's recovery applies whatever is
there. So every value carries its own undo information:

    tag_commands (8) | tag_transfers (8) | len(prev) (4, -1 = none) | prev | new

``tag_*`` are the last input offsets of the batch that wrote it. A value whose tag
is beyond the partition's committed checkpoint was written by a batch that never
finished: readers see ``prev`` instead, and the batch is decided again from the
same state (see ``Checkpoint.pending``). Deletions (the hold-expiry index) are
plain tombstones: nothing in ``decide`` reads those keys.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from typing import Any

from streams import core

CHECKPOINT_KEY = b"\x00checkpoint"
FAUST_OFFSET_KEY = b"__faust\0offset__"
_HEAD = core.VALUE_HEAD
_CK, _CK_PENDING = struct.Struct(">Bqq"), struct.Struct(">Bqqqq")


@dataclass(frozen=True)
class Checkpoint:
    """Per partition: the last input offsets whose outputs are acked and state written.

    ``pending`` is set (to the batch's last offsets) before a batch's outputs are
    produced and cleared when its state is written: if a worker finds it set, the
    outputs may be partly out, and it decides exactly those inputs again, in the
    same order (transfer legs first, then commands), to send the same bytes.
    """

    commands: int = -1
    transfers: int = -1
    pending: tuple[int, int] | None = None

    def encode(self) -> bytes:
        """Packed: a format byte, then the offsets (and the pending pair, if any)."""
        if self.pending is None:
            return _CK.pack(1, self.commands, self.transfers)
        return _CK_PENDING.pack(2, self.commands, self.transfers, *self.pending)

    @classmethod
    def decode(cls, raw: bytes | None) -> Checkpoint:
        if raw is None:
            return cls()
        if raw[:1] == b"{":  # written as JSON before the packed form
            d = json.loads(raw)
            pending = tuple(d["pending"]) if d.get("pending") is not None else None
            return cls(d["commands"], d["transfers"], pending)
        if raw[0] == 1:
            _, commands, transfers = _CK.unpack(raw)
            return cls(commands, transfers)
        _, commands, transfers, pc, pt = _CK_PENDING.unpack(raw)
        return cls(commands, transfers, (pc, pt))

    def covers(self, tag_commands: int, tag_transfers: int) -> bool:
        return tag_commands <= self.commands and tag_transfers <= self.transfers

    def advanced(self, commands: int, transfers: int) -> Checkpoint:
        return replace(self, commands=max(self.commands, commands),
                       transfers=max(self.transfers, transfers), pending=None)


def wrap(tag: tuple[int, int], prev: bytes | None, new: bytes) -> bytes:
    if prev is None:
        return _HEAD.pack(tag[0], tag[1], -1) + new
    return _HEAD.pack(tag[0], tag[1], len(prev)) + prev + new


def unwrap(raw: bytes | None, ck: Checkpoint) -> bytes | None:
    """The committed value of a stored record, as of checkpoint ``ck``."""
    return core.unwrap(raw, ck.commands, ck.transfers)


def payload(raw: bytes) -> bytes:
    """The new value of a stored record, whatever its tag."""
    _, _, prev_len = _HEAD.unpack_from(raw)
    return raw[_HEAD.size + max(prev_len, 0):]


class PartitionView:
    """Committed reads of one partition's RocksDB, as of its checkpoint.

    A view lives for one batch, while nothing writes the store: each key is read from
    RocksDB once (the batch reads a key to decide, then again for the previous value
    that its new value carries).
    """

    def __init__(self, db: Any, checkpoint: Checkpoint | None = None,
                 overlay: dict[bytes, bytes | None] | None = None,
                 resident: dict[bytes, bytes | None] | None = None) -> None:
        self.db = db
        self.checkpoint = checkpoint if checkpoint is not None else \
            Checkpoint.decode(db.get(CHECKPOINT_KEY))
        # ``overlay``: the changes of a step decided before and not yet written here;
        # ``resident``: accounts as the steps before left them (``core.keep_resident``)
        self.reads = core.Reads(db.get, self.checkpoint.commands, self.checkpoint.transfers,
                                overlay if overlay is not None else {},
                                resident if resident is not None else {})

    def get(self, key: bytes) -> bytes | None:
        return self.reads.get(key)

    def changes_to_records(self, changes: dict[bytes, bytes | None],
                           tag: tuple[int, int]) -> dict[bytes, bytes | None]:
        """Store records (key -> wrapped value, None deletes) for a batch's changes."""
        return core.wrap_changes(changes, self.reads.known, self.reads.get, *tag)
