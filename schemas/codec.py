"""Avro single-object encoding, with the writer schema found by its fingerprint.

Every record the ledger writes is ``C3 01`` + CRC-64-AVRO fingerprint of the writer
schema (8 bytes, little-endian) + the Avro body. The ``.avsc`` files in this package
are the current schemas; ``history/`` keeps every older published version, so a
record written by an old producer is still read, resolved to the current schema.

With a schema registry configured (``Codec.use_registry``), records are written in
the Confluent wire format instead: ``00`` + the registry's schema id (4 bytes,
big-endian) + the same Avro body. Each current schema is registered once under its
record full name (RecordNameStrategy: several record types share a topic). ``decode``
then reads both framings; a Confluent record's writer schema is fetched from the
registry by id (cached) and resolved to the current schema of the same name, exactly
as for a single-object record.

Timestamps stay epoch-millisecond integers in Python (the schemas say
``timestamp-millis`` for other readers); see ``_keep_timestamps_as_ints``.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro import read as _fastavro_read
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_LEN = 5
SCHEMA_DIR = Path(__file__).parent


class DecodeError(ValueError):
    """Bytes that cannot be read as a ledger record; ``code`` names the kind."""

    code = "malformed"


class UnknownSchema(DecodeError):
    code = "unknown_schema"


class WrongSchema(DecodeError):
    code = "wrong_schema"


def read_long(buf: bytes, i: int) -> tuple[int, int]:
    """An Avro long (zigzag varint) at ``buf[i]``: (value, index after it)."""
    b = buf[i]
    n = b & 0x7F
    shift = 7
    i += 1
    while b & 0x80:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), i


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
    # The schema as JSON text (compact, docs kept): what is registered in a registry.
    text: str = field(default="", repr=False, compare=False)


def _fingerprint(parsed: Any) -> bytes:
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    # single-object encoding puts the fingerprint little-endian
    return fp[::-1]


def _load(path: Path, current: bool) -> Schema:
    raw = json.loads(path.read_text())
    parsed: dict[str, Any] = fastavro.parse_schema(raw)  # type: ignore[assignment]
    return Schema(name=parsed["name"], parsed=parsed, fingerprint=_fingerprint(parsed),
                  current=current, text=json.dumps(raw, separators=(",", ":")))


class RegistryClient(Protocol):
    """What the codec calls on a schema registry client.

    ``confluent_kafka.schema_registry.SchemaRegistryClient`` fits. ``register_schema``
    gets a ``confluent_kafka.schema_registry.Schema`` (or, if that package cannot be
    imported, an object with the same ``schema_str``/``schema_type``/``references``
    attributes) and returns the id; ``get_schema`` returns an object with
    ``schema_str`` and ``schema_type`` and raises if the id is unknown.
    """

    def register_schema(self, subject_name: str, schema: Any) -> int: ...

    def get_schema(self, schema_id: int) -> Any: ...


@dataclass(frozen=True)
class _PlainRegistrySchema:
    """Stand-in for ``confluent_kafka.schema_registry.Schema`` when it cannot be imported."""

    schema_str: str
    schema_type: str = "AVRO"
    references: list[Any] = field(default_factory=list)


def _registry_schema(text: str) -> Any:
    try:
        from confluent_kafka.schema_registry import Schema as ConfluentSchema
    except ImportError:
        return _PlainRegistrySchema(text)
    return ConfluentSchema(text, "AVRO")


def _confluent_client(url: str) -> RegistryClient:
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient
    except ImportError as exc:
        raise RuntimeError(
            f"a schema registry is configured ({url}) but confluent_kafka.schema_registry "
            f"cannot be imported ({exc}); install confluent-kafka[schemaregistry]"
        ) from exc
    # bounded: the library's defaults retry with sleeps and wait forever on a hung registry
    client: RegistryClient = SchemaRegistryClient({"url": url, "timeout": 5,
                                                   "max.retries": 1})
    return client


class Codec:
    """Encode by schema name with the current version; decode any known version."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.by_fingerprint: dict[bytes, Schema] = {}
        self.current: dict[str, Schema] = {}
        # Schema registry (None: single-object encoding). The caches belong to one
        # registry: name -> 5-byte Confluent header, registry id -> writer schema.
        self.registry_url: str | None = None
        self._registry: RegistryClient | None = None
        self._owns_registry = False
        self._headers: dict[str, bytes] = {}
        self._by_id: dict[int, Schema] = {}
        for path in sorted(schema_dir.glob("*.avsc")):
            s = _load(path, current=True)
            self.current[s.name] = s
            self.by_fingerprint[s.fingerprint] = s
        for path in sorted(schema_dir.glob("history/*.avsc")):
            s = _load(path, current=False)
            self.by_fingerprint.setdefault(s.fingerprint, s)

    def use_registry(self, url: str | None, client: RegistryClient | None = None) -> None:
        """Write the Confluent wire format with schemas registered at ``url`` (None: stop).

        ``client`` replaces the ``SchemaRegistryClient({"url": url})`` made by default.
        Switching (or switching off) forgets every cached id. Decoding reads both
        framings while a registry is set; with none, a Confluent-framed record is a plain
        ``DecodeError`` (malformed), exactly as before registries were supported.
        Encoding registers each schema on first use; registry errors then propagate.
        """
        new: RegistryClient | None = None
        if url is not None:
            new = client if client is not None else _confluent_client(url)
        old, owned = self._registry, self._owns_registry
        self._registry, self._owns_registry = new, url is not None and client is None
        self.registry_url = url
        self._headers = {}
        self._by_id = {}
        close = getattr(old, "close", None) if owned and old is not new else None
        if callable(close):
            with contextlib.suppress(Exception):
                close()  # the HTTP session of the client this codec made

    def encode(self, name: str, datum: dict[str, Any]) -> bytes:
        if self._registry is not None:
            return self._encode_framed(name, datum)
        schema = self.current[name]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        fastavro.schemaless_writer(buf, schema.parsed, datum)
        return buf.getvalue()

    def _encode_framed(self, name: str, datum: dict[str, Any]) -> bytes:
        schema = self.current[name]
        header = self._headers.get(name)
        if header is None:
            header = self._register(schema)
        buf = io.BytesIO()
        buf.write(header)
        fastavro.schemaless_writer(buf, schema.parsed, datum)
        return buf.getvalue()

    def _register(self, schema: Schema) -> bytes:
        """Register ``schema`` under its full name; errors of the registry propagate."""
        registry = self._registry
        assert registry is not None
        schema_id = registry.register_schema(schema.name, _registry_schema(schema.text))
        if not isinstance(schema_id, int) or not 0 <= schema_id < 2**32:
            raise RuntimeError(f"schema registry gave {schema.name} the id {schema_id!r}")
        header = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
        if registry is self._registry:  # not switched meanwhile
            self._by_id[schema_id] = schema
            self._headers[schema.name] = header
        return header

    def body(self, name: str, datum: dict[str, Any]) -> bytes:
        """The Avro body alone (no header): a canonical form to hash."""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.current[name].parsed, datum)
        return buf.getvalue()

    def decode(self, data: bytes, expect: str | None = None) -> tuple[str, dict[str, Any]]:
        """Return (schema name, datum); raise a DecodeError subclass on bad input."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        if len(data) >= HEADER_LEN and data[:2] == MAGIC:
            writer = self.by_fingerprint.get(bytes(data[2:HEADER_LEN]))
            if writer is None:
                raise UnknownSchema(f"unknown schema fingerprint {bytes(data[2:HEADER_LEN]).hex()}")
            start = HEADER_LEN
        elif data[:1] == CONFLUENT_MAGIC:
            writer = self._framed_writer(data)
            start = CONFLUENT_HEADER_LEN
        else:
            raise DecodeError("not Avro single-object encoded (missing C3 01 header)"
                              " nor Confluent framed (00 + schema id)")
        if expect is not None and writer.name != expect:
            raise WrongSchema(f"expected a {expect}, got a {writer.name}")
        reader = self.current.get(writer.name)
        buf = io.BytesIO(data)
        buf.seek(start)
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

    def _framed_writer(self, data: bytes | bytearray | memoryview) -> Schema:
        """The writer schema of a Confluent-framed record, from the registry by id."""
        if len(data) < CONFLUENT_HEADER_LEN:
            raise DecodeError(f"{len(data)} bytes: too short for a Confluent header")
        schema_id = int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big")
        writer = self._by_id.get(schema_id)
        if writer is not None:
            return writer
        registry = self._registry
        if registry is None:  # as before registries: not a format this codec reads
            raise DecodeError(f"Confluent framing (schema id {schema_id}) but no schema "
                              "registry is configured")
        try:
            found = registry.get_schema(schema_id)
            schema_type, text = getattr(found, "schema_type", None), found.schema_str
        except Exception as exc:  # not found, registry down, timeouts: all the same here
            raise UnknownSchema(
                f"schema id {schema_id}: registry lookup failed: {type(exc).__name__}: {exc}"
            ) from exc
        writer = self._registry_writer(schema_id, schema_type, text)
        if registry is self._registry:
            self._by_id[schema_id] = writer
        return writer

    def _registry_writer(self, schema_id: int, schema_type: Any, text: Any) -> Schema:
        """Parse what the registry returned for ``schema_id``; it must be one of ours."""
        if schema_type not in (None, "AVRO"):  # the REST API leaves schemaType out for Avro
            raise UnknownSchema(f"schema id {schema_id} is a {schema_type} schema, not Avro")
        try:
            parsed: Any = fastavro.parse_schema(json.loads(text))
            fp = _fingerprint(parsed)
        except Exception as exc:  # bad JSON, bad Avro, missing attribute, None, ...
            raise UnknownSchema(
                f"schema id {schema_id}: unreadable schema: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            raise UnknownSchema(f"schema id {schema_id} is not an Avro record schema")
        name = parsed.get("name")
        if name not in self.current:
            raise UnknownSchema(f"schema id {schema_id} is {name}, not a ledger record")
        known = self.by_fingerprint.get(fp)
        if known is not None:
            return known  # a schema we ship: same object, so no resolution when current
        return Schema(name=name, parsed=parsed, fingerprint=fp, current=False)


CODEC = Codec()
