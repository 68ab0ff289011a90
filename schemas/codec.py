"""Avro single-object encoding, with the writer schema found by its fingerprint.

Every record the ledger writes is ``C3 01`` + CRC-64-AVRO fingerprint of the writer
schema (8 bytes, little-endian) + the Avro body. The ``.avsc`` files in this package
are the current schemas; ``history/`` keeps every older published version, so a
record written by an old producer is still read, resolved to the current schema.

Timestamps stay epoch-millisecond integers in Python (the schemas say
``timestamp-millis`` for other readers); see ``_keep_timestamps_as_ints``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro import read as _fastavro_read
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
SCHEMA_DIR = Path(__file__).parent


class DecodeError(ValueError):
    """Bytes that cannot be read as a ledger record; ``code`` names the kind."""

    code = "malformed"


class UnknownSchema(DecodeError):
    code = "unknown_schema"


class WrongSchema(DecodeError):
    code = "wrong_schema"


def _keep_timestamps_as_ints() -> None:
    # The domain compares and orders instants as integers; converting every
    # timestamp to a datetime on read and back on write would cost time on the
    # hot path for nothing.
    ident = lambda datum, *_: datum  # noqa: E731
    _fastavro_read.LOGICAL_READERS["long-timestamp-millis"] = ident


_keep_timestamps_as_ints()


@dataclass(frozen=True)
class Schema:
    name: str
    parsed: Any
    fingerprint: bytes
    current: bool


def _load(path: Path, current: bool) -> Schema:
    raw = json.loads(path.read_text())
    parsed: dict[str, Any] = fastavro.parse_schema(raw, _write_hint=False)  # type: ignore[assignment]
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    # single-object encoding puts the fingerprint little-endian
    return Schema(name=parsed["name"], parsed=parsed, fingerprint=fp[::-1], current=current)


class Codec:
    """Encode by schema name with the current version; decode any known version."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.by_fingerprint: dict[bytes, Schema] = {}
        self.current: dict[str, Schema] = {}
        for path in sorted(schema_dir.glob("*.avsc")):
            s = _load(path, current=True)
            self.current[s.name] = s
            self.by_fingerprint[s.fingerprint] = s
        for path in sorted(schema_dir.glob("history/*.avsc")):
            s = _load(path, current=False)
            self.by_fingerprint.setdefault(s.fingerprint, s)

    def encode(self, name: str, datum: dict[str, Any]) -> bytes:
        schema = self.current[name]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        fastavro.schemaless_writer(buf, schema.parsed, datum)
        return buf.getvalue()

    def body(self, name: str, datum: dict[str, Any]) -> bytes:
        """The Avro body alone (no header): a canonical form to hash."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.current[name].parsed, datum)
        return buf.getvalue()

    def decode(self, data: bytes, expect: str | None = None) -> tuple[str, dict[str, Any]]:
        """Return (schema name, datum); raise a DecodeError subclass on bad input."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoded (missing C3 01 header)")
        writer = self.by_fingerprint.get(bytes(data[2:HEADER_LEN]))
        if writer is None:
            raise UnknownSchema(f"unknown schema fingerprint {bytes(data[2:HEADER_LEN]).hex()}")
        if expect is not None and writer.name != expect:
            raise WrongSchema(f"expected a {expect}, got a {writer.name}")
        reader = self.current.get(writer.name)
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            resolve_to = None if reader is None or reader is writer else reader.parsed
            datum = fastavro.schemaless_reader(buf, writer.parsed, resolve_to,
                                               return_record_name=True)
        except Exception as exc:  # fastavro raises many kinds on truncated or garbled bodies
            raise DecodeError(f"corrupt {writer.name} body: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after a {writer.name}")
        assert isinstance(datum, dict)
        return writer.name, datum


CODEC = Codec()
