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
from collections.abc import Callable
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
        self._writers = {name: compile_writer(s.parsed) for name, s in self.current.items()}
        self._readers = {s.fingerprint: compile_reader(s.parsed) for s in self.current.values()}
        self._single_object_headers = {name: MAGIC + s.fingerprint
                                       for name, s in self.current.items()}

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
            header = self._headers.get(name)
            if header is None:
                header = self._register(self.current[name])
            return header + self.body(name, datum)
        return self._single_object_headers[name] + self.body(name, datum)

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
        try:
            return self._writers[name](datum)
        except Exception:  # a datum the generated writer does not take: fastavro decides
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
        try:
            if reader is writer:  # the current schema: the generated reader
                datum, end = self._readers[writer.fingerprint](bytes(data), start)
            else:
                buf = io.BytesIO(data)
                buf.seek(start)
                resolve_to = None if reader is None else reader.parsed
                datum = fastavro.schemaless_reader(buf, writer.parsed, resolve_to,
                                                   return_record_name=True)
                end = buf.tell()
        except Exception as exc:  # truncated or garbled bodies raise many kinds
            raise DecodeError(f"corrupt {writer.name} body: {type(exc).__name__}: {exc}") from exc
        if end > len(data):
            raise DecodeError(f"truncated {writer.name} body: {end - len(data)} bytes short")
        if end != len(data):
            raise DecodeError(f"{len(data) - end} trailing bytes after a {writer.name}")
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


# ---------------------------------------------------------------- reading


def compile_reader(schema: Any) -> Callable[[bytes, int], tuple[Any, int]]:
    """A function ``read(buf, i) -> (datum, end)`` for an Avro body of ``schema`` (parsed)
    written with that same schema.

    The reading twin of ``compile_writer``: fastavro's ``schemaless_reader`` costs a
    per-call set-up the worker pays for every command record and account state it
    reads. The datum is what fastavro gives with ``return_record_name=True`` (a
    union of records is ``(full name, record)``; timestamps stay ints); the tests
    compare the two on random data of every schema. It is strict where fastavro is
    lenient (a boolean byte other than 0 or 1, a negative length or enum index) and
    raises on bad bytes (``Codec.decode`` turns any exception into a DecodeError);
    it reads past the end of ``buf`` only by returning an ``end`` beyond it, which
    the caller checks. Records of older schema versions are read by fastavro,
    resolved to the current schema.
    """
    lines: list[str] = []
    consts: dict[str, Any] = {"_rl": read_long}
    named: dict[str, Any] = {}
    counter = iter(range(1 << 30))

    def long_(var: str, ind: str) -> None:
        lines.append(f"{ind}{var} = buf[i]")
        lines.append(f"{ind}if {var} < 128:")
        lines.append(f"{ind}    {var} = ({var} >> 1) ^ -({var} & 1); i += 1")
        lines.append(f"{ind}else:")
        lines.append(f"{ind}    {var}, i = _rl(buf, i)")

    def length(var: str, ind: str) -> None:
        long_(var, ind)
        lines.append(f"{ind}if {var} < 0: raise ValueError('negative length')")

    def emit(sch: Any, var: str, ind: str) -> None:
        if isinstance(sch, str):
            if sch in named:
                emit(named[sch], var, ind)
            elif sch in ("long", "int"):
                long_(var, ind)
            elif sch in ("string", "bytes"):
                length("n", ind)
                decode = ".decode()" if sch == "string" else ""
                lines.append(f"{ind}{var} = buf[i:i + n]{decode}; i += n")
            elif sch == "boolean":
                lines.append(f"{ind}{var} = buf[i]; i += 1")
                lines.append(f"{ind}if {var} > 1: raise ValueError('boolean byte')")
                lines.append(f"{ind}{var} = {var} == 1")
            elif sch == "null":
                lines.append(f"{ind}{var} = None")
            else:
                raise ValueError(f"cannot compile Avro type {sch!r}")
            return
        if isinstance(sch, list):
            n = next(counter)
            long_(f"u{n}", ind)
            for k, branch in enumerate(sch):
                lines.append(f"{ind}{'if' if k == 0 else 'elif'} u{n} == {k}:")
                target = named.get(branch, branch) if isinstance(branch, str) else branch
                if isinstance(target, dict) and target["type"] == "record":
                    emit(branch, f"r{n}", ind + "    ")
                    lines.append(f"{ind}    {var} = ({target['name']!r}, r{n})")
                else:
                    emit(branch, var, ind + "    ")
            lines.append(f"{ind}else:")
            lines.append(f"{ind}    raise ValueError('union branch')")
            return
        kind = sch["type"]
        if kind == "record":
            named[sch["name"]] = sch
            fields = []
            for f in sch["fields"]:
                n = next(counter)
                emit(f["type"], f"f{n}", ind)
                fields.append(f"{f['name']!r}: f{n}")
            lines.append(f"{ind}{var} = {{{', '.join(fields)}}}")
        elif kind == "enum":
            named[sch["name"]] = sch
            n = next(counter)
            consts[f"E{n}"] = tuple(sch["symbols"])
            long_(f"e{n}", ind)
            lines.append(f"{ind}if e{n} < 0: raise ValueError('enum index')")
            lines.append(f"{ind}{var} = E{n}[e{n}]")
        elif kind in ("array", "map"):
            n = next(counter)
            lines.append(f"{ind}{var} = {'[]' if kind == 'array' else '{}'}")
            lines.append(f"{ind}while True:")
            long_(f"c{n}", ind + "    ")
            lines.append(f"{ind}    if c{n} == 0: break")
            lines.append(f"{ind}    if c{n} < 0:")
            lines.append(f"{ind}        c{n} = -c{n}")
            long_("_size", ind + "        ")
            lines.append(f"{ind}    for _ in range(c{n}):")
            if kind == "array":
                emit(sch["items"], f"i{n}", ind + "        ")
                lines.append(f"{ind}        {var}.append(i{n})")
            else:
                emit("string", f"k{n}", ind + "        ")
                emit(sch["values"], f"i{n}", ind + "        ")
                lines.append(f"{ind}        {var}[k{n}] = i{n}")
        else:  # a primitive written as {"type": ...}, logical types included
            emit(kind, var, ind)

    emit(schema, "d", "    ")
    source = "def read(buf, i):\n" + "\n".join(lines) + "\n    return d, i\n"
    exec(compile(source, f"<avro reader {schema.get('name')}>", "exec"), consts)
    reader: Callable[[bytes, int], tuple[Any, int]] = consts["read"]
    return reader


# ---------------------------------------------------------------- writing

_SMALL_LONGS = [bytes([i]) for i in range(128)]


def write_long(n: int) -> bytes:
    """An Avro long: zigzag, then a little-endian base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    if 0 <= z < 128:
        return _SMALL_LONGS[z]
    if z < 0 or z >> 64:
        raise OverflowError(f"{n} does not fit an Avro long")
    out = bytearray()
    while z > 127:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def compile_writer(schema: Any) -> Callable[[Any], bytes]:
    """A function that writes a datum of ``schema`` (parsed) as an Avro body.

    fastavro's ``schemaless_writer`` spends most of a call on set-up, and the worker
    writes several small records per command; this generates straight-line Python for
    one schema instead. It writes the same bytes as fastavro: the tests compare the
    two for every schema. A datum it cannot write (a union branch given without its
    name, a datetime for a timestamp) raises, and ``Codec.body`` hands that datum
    to fastavro.
    """
    lines: list[str] = []
    consts: dict[str, Any] = {"_long": write_long, "_len": _SMALL_LONGS[0:128:2]}
    named: dict[str, Any] = {}
    counter = iter(range(1 << 30))

    def emit(sch: Any, var: str, ind: str) -> None:
        if isinstance(sch, str):
            if sch in named:
                emit(named[sch], var, ind)
            elif sch in ("long", "int"):
                lines.append(f"{ind}a(_len[{var}] if 0 <= {var} < 64 else _long({var}))")
            elif sch == "string":
                lines.append(f"{ind}b = {var}.encode(); n = len(b)")
                lines.append(f"{ind}a(_len[n] if n < 64 else _long(n)); a(b)")
            elif sch == "bytes":
                lines.append(f"{ind}a(_long(len({var}))); a(bytes({var}))")
            elif sch == "boolean":
                lines.append(f"{ind}a(b'\\x01' if {var} else b'\\x00')")
            elif sch != "null":
                raise ValueError(f"cannot compile Avro type {sch!r}")
            return
        if isinstance(sch, list):
            if len(sch) == 2 and sch[0] == "null":
                lines.append(f"{ind}if {var} is None:")
                lines.append(f"{ind}    a(b'\\x00')")
                lines.append(f"{ind}else:")
                lines.append(f"{ind}    a(b'\\x02')")
                emit(sch[1], var, ind + "    ")
                return
            # a union of named types: the datum is (full name, value), as fastavro reads it
            n = next(counter)
            lines.append(f"{ind}n{n}, v{n} = {var}")
            for i, branch in enumerate(sch):
                branch_name = branch["name"] if isinstance(branch, dict) else branch
                if branch_name not in named and not isinstance(branch, dict):
                    raise ValueError(f"cannot compile a union branch {branch!r}")
                lines.append(f"{ind}{'if' if i == 0 else 'elif'} n{n} == {branch_name!r}:")
                lines.append(f"{ind}    a({write_long(i)!r})")
                emit(branch, f"v{n}", ind + "    ")
            lines.append(f"{ind}else:")
            lines.append(f"{ind}    raise ValueError(n{n})")
            return
        kind = sch["type"]
        if kind == "record":
            named[sch["name"]] = sch
            for f in sch["fields"]:
                n = next(counter)
                lines.append(f"{ind}f{n} = {var}[{f['name']!r}]")
                emit(f["type"], f"f{n}", ind)
        elif kind == "enum":
            named[sch["name"]] = sch
            n = next(counter)
            consts[f"E{n}"] = {sym: write_long(i) for i, sym in enumerate(sch["symbols"])}
            lines.append(f"{ind}a(E{n}[{var}])")
        elif kind in ("array", "map"):
            n = next(counter)
            lines.append(f"{ind}if {var}:")
            lines.append(f"{ind}    a(_long(len({var})))")
            if kind == "array":
                lines.append(f"{ind}    for i{n} in {var}:")
                emit(sch["items"], f"i{n}", ind + "        ")
            else:
                lines.append(f"{ind}    for k{n}, i{n} in {var}.items():")
                emit("string", f"k{n}", ind + "        ")
                emit(sch["values"], f"i{n}", ind + "        ")
            lines.append(f"{ind}a(b'\\x00')")
        else:  # a primitive written as {"type": ...}, logical types included
            emit(kind, var, ind)

    emit(schema, "d", "    ")
    source = "def write(d):\n    out = []\n    a = out.append\n" + "\n".join(lines) \
        + "\n    return b''.join(out)\n"
    exec(compile(source, f"<avro writer {schema.get('name')}>", "exec"), consts)
    writer: Callable[[Any], bytes] = consts["write"]
    return writer


CODEC = Codec()
