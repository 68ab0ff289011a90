"""Confluent wire format with a schema registry: ``00`` + 4-byte big-endian id + Avro body.

A tiny Schema Registry runs in-process (``http.server`` on 127.0.0.1, a thread, a
bounded lifetime). It implements only the endpoints ``SchemaRegistryClient`` calls for
``register_schema`` and ``get_schema`` and records any other request, which fails the
test. Each test uses its own ``Codec()``; the global ``CODEC`` is never touched.

The codec is driven through two clients: confluent-kafka's ``SchemaRegistryClient``
(skipped when ``confluent_kafka.schema_registry`` cannot be imported, i.e. without the
``schemaregistry`` extra) and ``StdlibRegistryClient`` below, which makes the same HTTP
calls with urllib, so the framing and the fake registry are exercised either way.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import (
    CODEC,
    CONFLUENT_HEADER_LEN,
    MAGIC,
    SCHEMA_DIR,
    Codec,
    DecodeError,
    UnknownSchema,
    WrongSchema,
)
from schemas.models import Deposited, LedgerEvent, command_from_avro, command_to_avro
from streams.settings import Settings
from tests.unit.conftest import (
    ACTOR,
    T0,
    capture_hold,
    close_account,
    deposit,
    expire_hold,
    open_account,
    place_hold,
    release_hold,
    transfer,
    withdraw,
)

CONFLUENT_MISSING = ""
try:
    import confluent_kafka.schema_registry  # noqa: F401 - only whether it imports
except ImportError as exc:  # the schemaregistry extra (httpx2, certifi, ...) is missing
    CONFLUENT_MISSING = f"confluent_kafka.schema_registry not importable: {exc}"

needs_confluent = pytest.mark.skipif(bool(CONFLUENT_MISSING), reason=CONFLUENT_MISSING)
MakeClient = Callable[[], Any]
Record = dict[str, Any]

V1_EVENT = SCHEMA_DIR / "history" / "ledger_event.v1.avsc"
SERVER_LIFETIME_S = 60.0


# ================================================================ fake Schema Registry


class FakeRegistry:
    """Ids are global and start at 1; the same schema text always gets the same id."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}  # schema text -> id
        self.schemas: dict[int, dict[str, Any]] = {}  # id -> GET /schemas/ids/{id} body
        self.subjects: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.registry = self  # type: ignore[attr-defined]
        port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        # Bounded lifetime: even if a teardown never runs, the server stops.
        self.deadline = threading.Timer(SERVER_LIFETIME_S, self.server.shutdown)
        self.deadline.daemon = True
        self.running = False

    def start(self) -> FakeRegistry:
        self.thread.start()
        self.deadline.start()
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.deadline.cancel()
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()

    def register(self, subject: str, schema: str, schema_type: str = "AVRO") -> int:
        with self.lock:
            schema_id = self.ids.get(schema)
            if schema_id is None:
                schema_id = self.ids[schema] = len(self.ids) + 1
                self.schemas[schema_id] = {"schema": schema, "schemaType": schema_type}
            versions = self.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def posts(self) -> list[str]:
        return [path for method, path in self.requests if method == "POST"]

    def gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET"]


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_implemented(self) -> None:
        self.server.registry.unexpected.append((self.command, self.path))
        self._reply(404, {"error_code": 404, "message": f"fake: {self.command} {self.path}"})

    def do_POST(self) -> None:
        registry: FakeRegistry = self.server.registry
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        registry.requests.append(("POST", url.path))
        if len(parts) != 3 or parts[0] != "subjects" or parts[2] != "versions":
            self._not_implemented()
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if body.get("references"):
            self._reply(422, {"error_code": 42201, "message": "fake: no references"})
            return
        subject = urllib.parse.unquote(parts[1])
        schema_id = registry.register(subject, body["schema"], body.get("schemaType", "AVRO"))
        self._reply(200, {"id": schema_id})

    def do_GET(self) -> None:
        registry: FakeRegistry = self.server.registry
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        registry.requests.append(("GET", url.path))
        if len(parts) != 3 or parts[:2] != ["schemas", "ids"] or not parts[2].isdigit():
            self._not_implemented()
            return
        found = registry.schemas.get(int(parts[2]))
        if found is None:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})
        else:
            self._reply(200, found)

    def do_PUT(self) -> None:
        self._not_implemented()

    def do_DELETE(self) -> None:
        self._not_implemented()


class RegistryError(Exception):
    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(f"{message} (HTTP status code {status}, SR code {error_code})")
        self.error_code = error_code


class StdlibRegistryClient:
    """The two calls of ``SchemaRegistryClient`` the codec makes, as the same HTTP requests."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/{path}", data=data, method=method,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json",
                     "Accept": "application/vnd.schemaregistry.v1+json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            reply = json.loads(err.read() or b"{}")
            raise RegistryError(err.code, reply.get("error_code", -1),
                                reply.get("message", "")) from None

    def register_schema(self, subject_name: str, schema: Any) -> int:
        subject = urllib.parse.quote(subject_name, safe="")
        reply = self._call("POST", f"subjects/{subject}/versions?normalize=False",
                           {"schema": schema.schema_str, "schemaType": schema.schema_type,
                            "references": []})
        return int(reply["id"])

    def get_schema(self, schema_id: int) -> Any:
        reply = self._call("GET", f"schemas/ids/{schema_id}")
        return SimpleNamespace(schema_str=reply.get("schema"),
                               schema_type=reply.get("schemaType", "AVRO"))


# ================================================================ fixtures


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry().start()
    try:
        yield fake
    finally:
        fake.stop()
    assert not fake.unexpected, f"the client called endpoints the fake lacks: {fake.unexpected}"


@pytest.fixture
def make_client(registry: FakeRegistry) -> MakeClient:
    # A client that makes the same HTTP calls as confluent's SchemaRegistryClient: the
    # schemaregistry extra cannot be installed here (it needs a newer certifi than the
    # package index serves); the one test below covers the real client where it is.
    def make() -> Any:
        return StdlibRegistryClient(registry.url)
    return make


@pytest.fixture
def codec(registry: FakeRegistry, make_client: MakeClient) -> Codec:
    c = Codec()
    c.use_registry(registry.url, make_client())
    return c


# ================================================================ records


def a_rejection() -> Record:
    return {"command_id": "c-1", "account_id": "A", "command_type": "Deposit",
            "reason": "insufficient_funds", "detail": "no", "occurred_at": T0,
            "correlation_id": None, "actor": ACTOR}


def a_v1_event(payload: tuple[str, Record]) -> Record:
    return {"event_id": "e-1", "account_id": "A", "version": 3, "currency": "USD",
            "balance_after_minor": 1234, "occurred_at": T0, "command_id": "c-1",
            "causation_id": "c-1", "correlation_id": "trace", "actor": ACTOR,
            "payload": payload}


def a_leg() -> Record:
    return {"kind": "REFUND", "transfer_id": "t", "from_account_id": "A", "to_account_id": "B",
            "amount_minor": 1, "currency": "USD", "issued_at": T0, "actor": ACTOR,
            "correlation_id": "trace", "reason": "account_closed", "expires_at": T0 + 1,
            "signature": b"\x01\x02"}


def a_batch() -> Record:
    commands = [open_account(overdraft=10), deposit(500), withdraw(1), transfer(2),
                place_hold(3), capture_hold(amount=2), release_hold(), expire_hold(),
                close_account(expected_version=9, correlation_id="trace")]
    return {"commands": [command_to_avro(c) for c in commands]}


RECORDS: dict[str, Callable[[], Record]] = {
    "ledger.CommandBatch": a_batch,
    "ledger.LedgerEvent": lambda: {
        **a_v1_event(("ledger.HoldPlaced", {"hold_id": "h", "amount_minor": 5,
                                            "expires_at": T0 + 1})),
        "available_after_minor": 1229, "metadata": {"order": "o-1"}},
    "ledger.Rejection": a_rejection,
    "ledger.TransferLeg": lambda: {**a_leg(), "metadata": {"order": "o-1", "k": ""}},
    "ledger.state.AccountState": lambda: {
        "account_id": "A", "currency": "USD", "status": "open", "overdraft_limit_minor": 0,
        "balance_minor": 10, "held_minor": 5, "version": 2, "updated_at": T0,
        "holds": {"h": {"amount_minor": 5, "expires_at": T0 + 1}}, "metadata": {"tier": "gold"}},
    "ledger.state.CommandOutcome": lambda: {
        "digest": b"\x00" * 32, "records": [b"a", b""], "rejected": True,
        "expires_at": 1_700_000_000_000},
    "ledger.TransactionMessage": lambda: {
        "kind": "VOTE", "transaction_id": "t", "coordinator_account_id": "A",
        "account_id": "B", "postings": [a_posting()], "accepted": False,
        "reason": "insufficient_funds", "detail": "no", "posting_index": 0, "issued_at": T0,
        "actor": ACTOR, "correlation_id": None, "expires_at": T0 + 1, "reverses": "t0",
        "metadata": {}, "signature": b"\x01"},
    "ledger.state.TransactionRecord": lambda: {
        "transaction_id": "t", "coordinator_account_id": "A", "postings": [a_posting()],
        "participants": ["A", "B"], "voted": ["A"], "state": "pending", "deadline": T0 + 1,
        "issued_at": T0, "actor": ACTOR, "correlation_id": None, "reverses": None,
        "reversed_by": None, "metadata": {"batch": "payroll-12"}, "transfer": True},
}


def a_posting() -> Record:
    return {"from_account_id": "A", "to_account_id": "B", "amount_minor": 1, "currency": "USD",
            "expected_version": None}


def schema_id_of(data: bytes) -> int:
    return int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big")


def framed(schema_id: int, parsed: Any, datum: Record) -> bytes:
    buf = io.BytesIO()
    buf.write(b"\x00" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, parsed, datum)
    return buf.getvalue()


def parse(path: Path) -> Any:
    return parse_text(path.read_text())


def parse_text(text: str) -> Any:
    return fastavro.parse_schema(json.loads(text))


# ================================================================ encode


def test_every_current_schema_has_a_record_to_encode() -> None:
    assert set(RECORDS) == set(CODEC.current)


def test_encode_writes_00_then_the_big_endian_registry_id_then_the_body(
    codec: Codec, registry: FakeRegistry,
) -> None:
    data = codec.encode("ledger.Rejection", a_rejection())

    assert data[0] == 0
    assert schema_id_of(data) == registry.subjects["ledger.Rejection"][0]
    assert data[CONFLUENT_HEADER_LEN:] == codec.body("ledger.Rejection", a_rejection())


def test_the_subject_is_the_record_full_name_and_the_schema_is_the_current_one(
    codec: Codec, registry: FakeRegistry,
) -> None:
    for name in RECORDS:
        codec.encode(name, RECORDS[name]())

    assert sorted(registry.subjects) == sorted(CODEC.current)
    for name, (schema_id,) in registry.subjects.items():
        text = registry.schemas[schema_id]["schema"]
        assert parse_text(text) == CODEC.current[name].parsed
        assert json.loads(text)["doc"]  # docs travel to the registry


def test_each_schema_is_registered_once(codec: Codec, registry: FakeRegistry) -> None:
    for _ in range(3):
        codec.encode("ledger.Rejection", a_rejection())
        codec.encode("ledger.TransferLeg", a_leg())

    assert registry.posts() == ["/subjects/ledger.Rejection/versions",
                                "/subjects/ledger.TransferLeg/versions"]
    assert registry.gets() == []


def test_the_same_schema_gets_the_same_id_in_another_codec(
    codec: Codec, registry: FakeRegistry, make_client: MakeClient,
) -> None:
    other = Codec()
    other.use_registry(registry.url, make_client())

    assert (codec.encode("ledger.Rejection", a_rejection())
            == other.encode("ledger.Rejection", a_rejection()))


def test_an_unknown_name_is_a_key_error_and_registers_nothing(
    codec: Codec, registry: FakeRegistry,
) -> None:
    with pytest.raises(KeyError):
        codec.encode("ledger.Nope", {})

    assert registry.requests == []


def test_use_registry_none_switches_back_to_single_object(
    codec: Codec, registry: FakeRegistry,
) -> None:
    framed_data = codec.encode("ledger.Rejection", a_rejection())

    codec.use_registry(None)

    assert codec.registry_url is None
    data = codec.encode("ledger.Rejection", a_rejection())
    assert data == CODEC.encode("ledger.Rejection", a_rejection())
    assert data[:2] == MAGIC
    with pytest.raises(DecodeError, match="no schema registry") as info:
        codec.decode(framed_data)
    assert type(info.value) is DecodeError  # malformed, as before registries


def test_a_registry_down_while_encoding_raises_and_caches_nothing(
    codec: Codec, registry: FakeRegistry,
) -> None:
    registry.stop()

    with pytest.raises(Exception) as info:  # whatever the client raises
        codec.encode("ledger.Rejection", a_rejection())

    assert not isinstance(info.value, DecodeError)
    assert codec._headers == {}


# ================================================================ decode


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_record_type_round_trips(codec: Codec, name: str) -> None:
    datum = RECORDS[name]()

    data = codec.encode(name, datum)

    assert data[0] == 0
    assert codec.decode(data) == (name, datum)
    assert codec.decode(data, expect=name)[0] == name


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_another_codec_reads_the_writer_schema_from_the_registry_once(
    codec: Codec, registry: FakeRegistry, make_client: MakeClient, name: str,
) -> None:
    datum = RECORDS[name]()
    data = codec.encode(name, datum)
    reader = Codec()
    reader.use_registry(registry.url, make_client())

    assert reader.decode(data) == (name, datum)
    assert reader.decode(data) == (name, datum)
    assert registry.gets() == [f"/schemas/ids/{schema_id_of(data)}"]


def test_a_command_batch_decodes_to_the_same_commands(codec: Codec) -> None:
    batch = a_batch()

    _, datum = codec.decode(codec.encode("ledger.CommandBatch", batch))

    expected = [command_from_avro(item) for item in batch["commands"]]
    assert [command_from_avro(item) for item in datum["commands"]] == expected


def test_single_object_records_still_decode_with_a_registry(
    codec: Codec, registry: FakeRegistry,
) -> None:
    for name, make in RECORDS.items():
        datum = make()
        assert codec.decode(CODEC.encode(name, datum)) == (name, datum)

    assert registry.requests == []


def test_an_old_schema_version_in_the_registry_is_resolved_to_the_current_shape(
    codec: Codec, registry: FakeRegistry,
) -> None:
    schema_id = registry.register("ledger.LedgerEvent", V1_EVENT.read_text())
    data = framed(schema_id, parse(V1_EVENT), a_v1_event(("ledger.Deposited",
                                                          {"amount_minor": 7})))

    name, datum = codec.decode(data, expect="ledger.LedgerEvent")

    assert name == "ledger.LedgerEvent"
    assert datum["available_after_minor"] == 0  # the default of the new field
    event = LedgerEvent.from_avro(datum)
    assert isinstance(event.payload, Deposited) and event.payload.amount_minor == 7
    assert event.balance_after_minor == 1234 and event.correlation_id == "trace"


def test_an_unknown_version_of_one_of_our_records_is_resolved_too(
    codec: Codec, registry: FakeRegistry,
) -> None:
    # A writer schema nobody shipped to this codec: Rejection without correlation_id.
    raw = json.loads((SCHEMA_DIR / "rejection.avsc").read_text())
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "correlation_id"]
    schema_id = registry.register("ledger.Rejection", json.dumps(raw))
    datum = {k: v for k, v in a_rejection().items() if k != "correlation_id"}

    name, decoded = codec.decode(framed(schema_id, parse_text(json.dumps(raw)), datum))

    assert (name, decoded) == ("ledger.Rejection", a_rejection())


def test_the_wrong_record_type_is_wrong_schema(codec: Codec) -> None:
    data = codec.encode("ledger.Rejection", a_rejection())

    with pytest.raises(WrongSchema) as info:
        codec.decode(data, expect="ledger.CommandBatch")

    assert info.value.code == "wrong_schema"


def test_an_id_the_registry_does_not_know_is_unknown_schema(
    codec: Codec, registry: FakeRegistry,
) -> None:
    body = codec.body("ledger.Rejection", a_rejection())

    with pytest.raises(UnknownSchema) as info:
        codec.decode(b"\x00" + (4242).to_bytes(4, "big") + body)

    assert info.value.code == "unknown_schema"
    assert "4242" in str(info.value) and "not found" in str(info.value)
    assert registry.gets() == ["/schemas/ids/4242"]


def test_an_id_that_is_not_ours_is_unknown_schema(codec: Codec, registry: FakeRegistry) -> None:
    foreign = {"type": "record", "name": "Thing", "namespace": "other",
               "fields": [{"name": "x", "type": "long"}]}
    cases = {
        registry.register("other.Thing", json.dumps(foreign)): "other.Thing",
        registry.register("s", json.dumps("string")): "not an Avro record",
        registry.register("p", 'syntax = "proto3";', "PROTOBUF"): "PROTOBUF",
        registry.register("j", "{not json"): "unreadable",
    }

    for schema_id, message in cases.items():
        with pytest.raises(UnknownSchema, match=message):
            codec.decode(b"\x00" + schema_id.to_bytes(4, "big") + b"\x02")


def test_a_registry_down_while_decoding_an_unknown_id_is_unknown_schema(
    codec: Codec, registry: FakeRegistry,
) -> None:
    known = codec.encode("ledger.Rejection", a_rejection())
    registry.stop()

    with pytest.raises(UnknownSchema) as info:
        codec.decode(b"\x00" + (77).to_bytes(4, "big") + b"\x02")

    assert type(info.value) is UnknownSchema and "registry lookup failed" in str(info.value)
    assert codec.decode(known) == ("ledger.Rejection", a_rejection())  # ids stay cached


def test_a_confluent_record_without_a_registry_is_malformed_as_before() -> None:
    data = b"\x00" + (1).to_bytes(4, "big") + CODEC.body("ledger.Rejection", a_rejection())

    for codec in (Codec(), CODEC):
        with pytest.raises(DecodeError, match="no schema registry") as info:
            codec.decode(data)
        assert type(info.value) is DecodeError and info.value.code == "malformed"


@pytest.mark.parametrize("data", [
    pytest.param(b"\x00", id="magic-only"),
    pytest.param(b"\x00\x00\x00\x01", id="short-header"),
])
def test_a_truncated_confluent_header_is_malformed(codec: Codec, data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(data)

    assert type(info.value) is DecodeError and info.value.code == "malformed"


def test_garbage_after_a_known_id_is_malformed(codec: Codec) -> None:
    data = codec.encode("ledger.TransferLeg", a_leg())
    header = data[:CONFLUENT_HEADER_LEN]

    for bad in (header, header + b"\xff" * 12, header + b"garbage bytes",
                data[:-1], data + b"\x00", header + b"\x0a" + data[CONFLUENT_HEADER_LEN + 1:]):
        with pytest.raises(DecodeError) as info:
            codec.decode(bad)
        assert type(info.value) is DecodeError, bad


def test_arbitrary_bodies_after_a_known_id_raise_nothing_but_decode_error(codec: Codec) -> None:
    headers = {name: codec.encode(name, make())[:CONFLUENT_HEADER_LEN]
               for name, make in RECORDS.items()}

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(sorted(RECORDS)), st.binary(max_size=64),
           st.sampled_from([None, "ledger.CommandBatch", "ledger.TransferLeg"]))
    def check(name: str, body: bytes, expect: str | None) -> None:
        try:
            decoded, _ = codec.decode(headers[name] + body, expect=expect)
        except DecodeError:
            return
        assert decoded == name and expect in (None, name)

    check()


# ================================================================ wiring


@needs_confluent
def test_use_registry_with_a_url_alone_makes_a_confluent_client(registry: FakeRegistry) -> None:
    codec = Codec()
    codec.use_registry(registry.url)

    data = codec.encode("ledger.Rejection", a_rejection())

    assert schema_id_of(data) == registry.subjects["ledger.Rejection"][0]
    assert codec.decode(data) == ("ledger.Rejection", a_rejection())
    codec.use_registry(None)


def test_use_registry_without_the_confluent_extra_fails_loudly_and_changes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # as on a machine without the extra: the import fails
    monkeypatch.setitem(sys.modules, "confluent_kafka.schema_registry", None)
    codec = Codec()

    with pytest.raises(RuntimeError, match=r"confluent-kafka\[schemaregistry\]"):
        codec.use_registry("http://127.0.0.1:1")

    assert codec.registry_url is None
    assert codec.encode("ledger.Rejection", a_rejection())[:2] == MAGIC


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEDGER_SCHEMA_REGISTRY_URL", raising=False)
    assert Settings().schema_registry_url is None

    monkeypatch.setenv("LEDGER_SCHEMA_REGISTRY_URL", "http://registry:8081")

    assert Settings().schema_registry_url == "http://registry:8081"
