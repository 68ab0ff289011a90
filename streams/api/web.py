"""HTTP on the worker's web server: accounts, their events, transactions, commands,
health, metrics.

The API is described in ``streams/api/openapi.yaml`` (served at ``GET /openapi.yaml``).
Any worker answers for any account: a read of an account whose partition another
worker owns is forwarded to that worker's web server (its URL comes from Faust's
partition assignor, by partition number) and its answer relayed as it is. Every
error is JSON, ``{"error": <code>, "detail": <text>, ...}``, with a status that
says what happened: 400 unreadable body, 404 no such account (or path), 409 the
command conflicts with the ledger's state, 422 invalid input or a command the
rules refuse, 503 not ready (partition moving, history catching up).

The same server hands out a web page for people (``GET /``, its files under
``/static/``, from ``streams/api/static``) and a server-sent events stream of an
account's new events (``GET /accounts/{id}/stream``) that the page follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
import logging
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import faust
from aiohttp import web as aioweb
from confluent_kafka import KafkaException
from faust.web import Request, Response, View
from faust.web.exceptions import WebError
from pydantic import ValidationError
from yarl import URL

from producers.client import CommandRefused, DeliveryError, LedgerClient, QueueFull
from schemas.codec import CODEC
from schemas.models import (
    COMMAND_TYPES,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY,
    MAX_METADATA_VALUE,
    AccountState,
    CommandBase,
    ExpireHold,
    ExpireTransaction,
    LedgerEvent,
    Posting,
    TransactionRecord,
)
from schemas.money import format_amount
from schemas.text import plain
from streams import instants
from streams.core import transaction_key, valid_id
from streams.partitions import partition_for
from streams.readmodels.history import History
from streams.readmodels.statement import TooLong, statement, to_csv
from streams.settings import Settings
from streams.worker import metrics
from streams.worker.processor import account_key
from streams.worker.state import PartitionView

log = logging.getLogger("ledger.web")

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_STATIC_NAME = re.compile(r"^[a-z0-9_-]{1,64}\.[a-z]{1,8}$")
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
}
# GET /accounts/{id}/stream: the history index polled for versions above the last sent.
STREAM_POLL_S = 0.25
STREAM_HEARTBEAT_S = 10.0  # a comment line when idle: a client that left is noticed
STREAM_MAX_S = 300.0  # then the stream ends; EventSource reconnects with Last-Event-ID
STREAM_BATCH = 100  # events read from the index (and sent) per poll
MAX_STREAMS = 64  # open streams per worker, its own and those it relays; more get 503
MAX_STREAMS_PER_CLIENT = 8  # per caller: its principal, or its address if the API is open
STREAM_WRITE_TIMEOUT_S = 30.0  # a client that stops reading is let go after this
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"}
ROUTED_HEADER = "X-Ledger-Routed"  # set on a forwarded request: it is never forwarded again
FORWARD_TIMEOUT_S = 10.0
WAIT_OUTCOME_S = 10.0  # POST /commands?wait=true answers 202 "pending" after this
MAX_PAGE = 1000
# GET /transactions/{id}: events read per account from the transaction's start, at most
TRANSACTION_SCAN = MAX_PAGE
# GET /accounts/{id}/events?meta.KEY=VALUE: events looked at per request, at most
META_SCAN = 10 * MAX_PAGE
META_PREFIX = "meta."
INT64_MAX = 2**63 - 1
# Commands a client may send (expiring a hold or a transaction is the worker's own business).
PUBLIC_COMMANDS = {n: c for n, c in COMMAND_TYPES.items()
                   if c not in (ExpireHold, ExpireTransaction)}
# Rejections that say "the ledger's state differs from what you assumed": 409.
CONFLICT_REASONS = frozenset({"version_conflict", "idempotency_key_reused",
                              "account_already_exists", "hold_already_exists",
                              "already_reversed"})


class ApiError(Exception):
    """An answer other than success: ``status`` and a JSON body with ``error`` and ``detail``."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.doc = {"error": error, "detail": detail, **extra}


def _error_code(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


@aioweb.middleware
async def json_errors(request: aioweb.Request,
                      handler: Callable[[aioweb.Request], Awaitable[aioweb.StreamResponse]]
                      ) -> aioweb.StreamResponse:
    """ApiError, aiohttp's own errors (unknown path, body too large) and bugs, as JSON."""
    try:
        return await handler(request)
    except ApiError as exc:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return aioweb.json_response(exc.doc, status=exc.status, headers=headers)
    except aioweb.HTTPException as exc:
        if exc.status < 400:
            raise
        return aioweb.json_response({"error": _error_code(exc.status), "detail": exc.reason},
                                    status=exc.status)
    except Exception:
        log.exception("request failed", extra={"method": request.method,
                                                "path": request.path})
        return aioweb.json_response({"error": "internal_error",
                                     "detail": "the worker failed to answer; see its log"},
                                    status=500)


def allowed_hosts(s: Settings) -> frozenset[str]:
    """The Host names the API answers to: loopback, its own addresses, the configured."""
    names = {"127.0.0.1", "localhost", "::1", s.web_host.lower(),
             (URL(advertised_url(s)).host or "").lower()}
    names |= {h.strip().lower() for h in s.allowed_hosts.split(",")}
    return frozenset(names - {"", "0.0.0.0", "::"})


def caller(given: str, tokens: dict[str, str]) -> str | None:
    """The principal whose token the Authorization header carries; "" when the API has
    no tokens (open); None when it has and this is none of them."""
    if not tokens:
        return ""
    # a header's bytes that are not UTF-8 arrive as surrogates: compare bytes
    raw = given.encode(errors="surrogateescape")
    found = None
    for principal, token in tokens.items():  # every one, so the time says nothing
        if hmac.compare_digest(raw, f"Bearer {token}".encode()):
            found = principal
    return found


# What LEDGER_TOKEN_FOR_READS puts behind the token: the data, not the page's files.
PROTECTED_READS = ("/accounts", "/transactions", "/metrics")


def read_check(tokens: dict[str, str]) -> Any:
    @aioweb.middleware
    async def check(request: aioweb.Request,
                    handler: Callable[[aioweb.Request], Awaitable[aioweb.StreamResponse]]
                    ) -> aioweb.StreamResponse:
        if request.method in ("GET", "HEAD") and request.path.startswith(PROTECTED_READS) \
                and caller(request.headers.get("Authorization", ""), tokens) is None:
            raise ApiError(401, "unauthorized", "reading needs an Authorization: Bearer token")
        return await handler(request)

    return check


def host_check(allowed: frozenset[str]) -> Any:
    @aioweb.middleware
    async def check(request: aioweb.Request,
                    handler: Callable[[aioweb.Request], Awaitable[aioweb.StreamResponse]]
                    ) -> aioweb.StreamResponse:
        host = (request.url.host or "").lower().strip("[]")
        if host not in allowed:
            raise ApiError(421, "misdirected_request",
                           f"this worker does not answer for host {host[:100]!r}; "
                           "add it to LEDGER_ALLOWED_HOSTS if it is yours")
        return await handler(request)

    return check


class JsonView(View):
    """A view whose framework errors (such as 405) have the API's error shape."""

    async def on_request_error(self, request: Request, exc: WebError) -> Response:
        return self.json({"error": _error_code(exc.code), "detail": str(exc.detail)},
                         status=exc.code)


# ---------------------------------------------------------------- documents


def reservation_of(hold_key: str) -> tuple[str, str] | None:
    """(coordinator, transaction id) if a key among an account's holds is a transaction's
    reservation (``streams.domain.reservation_id``); None for a hold a client placed."""
    parts = hold_key.split("\0")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "transaction" else None


def account_json(state: AccountState) -> dict[str, Any]:
    """The account now. Its holds are those clients placed, by hold id; the amounts that
    pending transactions reserved are its ``reservations`` (both count in ``available``)."""
    holds = sorted(state.holds.items())
    return {
        "account_id": state.account_id,
        "currency": state.currency,
        "status": state.status,
        "version": state.version,
        "balance_minor": state.balance_minor,
        "available_minor": state.available_minor,
        "balance": format_amount(state.balance_minor, state.currency),
        "available": format_amount(state.available_minor, state.currency),
        "overdraft_limit_minor": state.overdraft_limit_minor,
        "holds": {k: {"amount_minor": h.amount_minor, "expires_at": h.expires_at}
                  for k, h in holds if reservation_of(k) is None},
        "reservations": [{"coordinator_account_id": r[0], "transaction_id": r[1],
                          "amount_minor": h.amount_minor,
                          "amount": format_amount(h.amount_minor, state.currency)}
                         for k, h in holds if (r := reservation_of(k)) is not None],
        "updated_at": state.updated_at,
        "metadata": dict(state.metadata),
    }


def event_json(e: LedgerEvent) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": e.version, "type": e.type, "account_id": e.account_id,
        "currency": e.currency, "balance_after_minor": e.balance_after_minor,
        "available_after_minor": e.available_after_minor, "occurred_at": e.occurred_at,
        "actor": e.actor, "command_id": e.command_id, "causation_id": e.causation_id,
        "correlation_id": e.correlation_id, "event_id": e.event_id,
        "payload": e.payload.model_dump(), "metadata": dict(e.metadata),
    }
    amount = getattr(e.payload, "amount_minor", None)
    if amount is not None:
        doc["amount_minor"] = amount
    return doc


_ENDS = {"TransactionCommitted": "committed", "TransactionRejected": "rejected"}
_STEPS = {"TransactionReserved": "reserved_at", "TransactionPosted": "posted_at",
          "TransactionReleased": "released_at"}


def _transfer_json(record: TransactionRecord,
                   events: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A transfer as ``transaction_json`` shows a transaction: committed once debited
    (posted at its source, then at its destination once credited), or rejected once the
    destination refused it (released at the source: the refund)."""
    tid, source = record.transaction_id, record.coordinator_account_id
    destination = record.postings[0].to_account_id

    def at(account: str, kind: str) -> dict[str, Any] | None:
        return next((e for e in events.get(account, ()) if e["type"] == kind
                     and e["payload"]["transfer_id"] == tid
                     and e["payload"].get("from_account_id", source) == source), None)

    debited, credited = at(source, "TransferDebited"), at(destination, "TransferCredited")
    refunded = at(source, "TransferReversed")
    doc: dict[str, Any] = {
        "kind": "transfer", "coordinator_account_id": source, "transaction_id": tid,
        "state": "rejected" if refunded or record.state == "rejected" else "committed",
        "postings": [posting_json(p) for p in record.postings],
        "reverses": None, "reversed_by": record.reversed_by, "started_at": record.issued_at,
        "deadline": None, "ended_at": (refunded or credited or {}).get("occurred_at"),
        "participants": [
            {"account_id": source, "reserved_at": None,
             "posted_at": None if debited is None else debited["occurred_at"],
             "released_at": None if refunded is None else refunded["occurred_at"]},
            {"account_id": destination, "reserved_at": None,
             "posted_at": None if credited is None else credited["occurred_at"],
             "released_at": None}],
    }
    if doc["state"] == "rejected":
        doc.update(reason=None if refunded is None else refunded["payload"]["reason"],
                   detail=f"refunded by {destination}", posting_index=0)
    return doc


def posting_json(p: Posting) -> dict[str, Any]:
    return {**p.to_avro(), "amount": format_amount(p.amount_minor, p.currency)}


def transaction_json(record: TransactionRecord,
                     events: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A transaction as its coordinator's ``record`` has it, with the time of each step
    found in ``events`` (per account, as ``event_json``, from the transaction's start).

    ``state`` is the coordinator's end event's if it is among them, else the record's
    (the history index trails the worker's state by a moment); a step not found (yet,
    or not within the events read) has its time null. A transfer's record (``kind``
    transfer) has the debit and the credit as its postings, and a refund as its end."""
    tid, coordinator = record.transaction_id, record.coordinator_account_id
    if record.transfer:
        return _transfer_json(record, events)
    end = next((e for e in events.get(coordinator, ()) if e["type"] in _ENDS
                and e["payload"]["transaction_id"] == tid), None)
    state = record.state if end is None else _ENDS[end["type"]]
    doc: dict[str, Any] = {
        "kind": "transaction", "coordinator_account_id": coordinator, "transaction_id": tid,
        "state": state,
        "postings": [posting_json(p) for p in record.postings],
        "reverses": record.reverses, "reversed_by": record.reversed_by,
        "started_at": record.issued_at, "deadline": record.deadline,
        "ended_at": None if end is None else end["occurred_at"],
        "participants": [],
    }
    if state == "rejected":
        why = {} if end is None else end["payload"]
        doc.update(reason=why.get("reason"), detail=why.get("detail"),
                   posting_index=why.get("posting_index"))
    for account in record.participants:
        steps = {_STEPS[e["type"]]: e["occurred_at"] for e in events.get(account, ())
                 if e["type"] in _STEPS and e["payload"]["transaction_id"] == tid
                 and e["payload"]["coordinator_account_id"] == coordinator}
        doc["participants"].append({"account_id": account, **dict.fromkeys(_STEPS.values()),
                                    **steps})
    return doc


def as_of_json(e: LedgerEvent, at_ms: int) -> dict[str, Any]:
    """The account right after event ``e``, the last one by ``at_ms``."""
    return {
        "account_id": e.account_id, "as_of": at_ms, "currency": e.currency,
        "status": "closed" if e.type == "AccountClosed" else "open", "version": e.version,
        "balance_minor": e.balance_after_minor, "available_minor": e.available_after_minor,
        "balance": format_amount(e.balance_after_minor, e.currency),
        "available": format_amount(e.available_after_minor, e.currency),
        "updated_at": e.occurred_at,
    }


def sse_event(e: LedgerEvent) -> bytes:
    """One server-sent event: id = version, data = the event's JSON on one line."""
    data = json.dumps(event_json(e), separators=(",", ":"))
    return f"id: {e.version}\nevent: ledger-event\ndata: {data}\n\n".encode()


# ---------------------------------------------------------------- input


def parse_instant(text: str, name: str = "as_of") -> int:
    """An instant (``streams.instants``) from a query parameter; else 422."""
    try:
        return instants.parse_instant(text)
    except (ValueError, OverflowError):
        raise ApiError(422, "invalid_parameter", f"{name} must be epoch milliseconds or an "
                       f"ISO 8601 date-time, not {text[:100]!r}", parameter=name) from None


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    value = int(text) if instants.DIGITS.match(text) else None
    if value is None or not low <= value <= high:
        raise ApiError(422, "invalid_parameter",
                       f"{name} must be an integer from {low} to {high}", parameter=name)
    return value


def meta_filter(request: Request) -> list[tuple[str, str]]:
    """The ``meta.KEY=VALUE`` query parameters, as (key, value) pairs (an event matches
    when its metadata holds every one); ApiError 422 for one no metadata could hold."""
    pairs = [(name[len(META_PREFIX):], value) for name, value in request.query.items()
             if name.startswith(META_PREFIX)]
    for key, value in pairs:
        problem = (
            f"its key must be 1 to {MAX_METADATA_KEY} characters"
            if not 1 <= len(key) <= MAX_METADATA_KEY else
            f"its value must be at most {MAX_METADATA_VALUE} characters"
            if len(value) > MAX_METADATA_VALUE else
            "its key and value must not hold control, format or line separator characters"
            if not (plain(key) and plain(value)) else None)
        if problem:
            raise ApiError(422, "invalid_metadata_filter", f"meta.KEY=VALUE: {problem}",
                           parameter=(META_PREFIX + key)[:100])
    if len(pairs) > MAX_METADATA_ENTRIES:
        raise ApiError(422, "invalid_metadata_filter", f"at most {MAX_METADATA_ENTRIES} "
                       "meta.KEY=VALUE parameters (metadata has no more entries)")
    return pairs


def query_bool(request: Request, name: str) -> bool:
    text = request.query.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid_parameter", f"{name} must be true or false",
                       parameter=name)
    return text in ("true", "1")


def stream_from(request: Request) -> int:
    """The first version a stream sends: ``from_version``, or after ``Last-Event-ID``."""
    version = query_int(request, "from_version", 1, 1, INT64_MAX)
    last = request.headers.get("Last-Event-ID", "").strip()
    if instants.DIGITS.match(last) and int(last) < INT64_MAX:
        version = max(version, int(last) + 1)
    return version


def static_file(name: str) -> tuple[bytes, str]:
    """A file of the web page (bytes, content type); ApiError 404 for any other name."""
    path = STATIC_DIR / name
    ctype = STATIC_TYPES.get(path.suffix)
    if not _STATIC_NAME.match(name) or ctype is None or not path.is_file():
        raise ApiError(404, "not_found", "no such file")
    return path.read_bytes(), ctype


def _invalid(errors: list[dict[str, Any]]) -> NoReturn:
    raise ApiError(422, "invalid_command", "the command does not match its schema",
                   errors=errors)


def parse_command(body: Any) -> CommandBase:
    """A command from its JSON form (the model's fields plus ``type``); ApiError 422 if not."""
    if not isinstance(body, dict):
        _invalid([{"loc": [], "msg": "expected a JSON object", "type": "object_type"}])
    kind = body.get("type")
    cls = PUBLIC_COMMANDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        _invalid([{"loc": ["type"], "type": "literal_error",
                   "msg": f"type must be one of {', '.join(PUBLIC_COMMANDS)}"}])
    try:
        command = cls.model_validate({k: v for k, v in body.items() if k != "type"},
                                     strict=True)  # no "12" or 12.0 for an integer
    except ValidationError as exc:
        _invalid([dict(e) for e in exc.errors(include_url=False, include_context=False,
                                              include_input=False)])
    return command


def outcome_response(view: View, outcome: Any) -> Response:
    if outcome.rejection is None:
        return view.json({"command_id": outcome.command_id, "accepted": True,
                          "events": [event_json(e) for e in outcome.events]})
    r = outcome.rejection
    return view.json({"error": r.reason, "detail": r.detail, "command_id": r.command_id,
                      "accepted": False, "reason": r.reason},
                     status=409 if r.reason in CONFLICT_REASONS else 422)


# ---------------------------------------------------------------- the worker's side


def advertised_url(s: Settings) -> str:
    """Where the other workers reach this one's web server."""
    host = s.web_host if s.web_host not in ("", "0.0.0.0", "::") else socket.gethostname()
    return f"http://{host}:{s.web_port}"


async def write(resp: aioweb.StreamResponse, data: bytes) -> None:
    """Write to a stream; a client that has not read for STREAM_WRITE_TIMEOUT_S is let go
    (TimeoutError), so it cannot hold its slot and its buffers for ever."""
    await asyncio.wait_for(resp.write(data), STREAM_WRITE_TIMEOUT_S)


def _unreachable(partition: int) -> ApiError:
    return ApiError(503, "owner_unreachable", f"the worker that owns partition {partition} "
                    "did not answer; try again", partition=partition)


def refuse_redirect(resp: aiohttp.ClientResponse, owner: str, partition: int) -> None:
    """A worker's answer is relayed as it is, never followed to another address."""
    if 300 <= resp.status < 400:
        log.warning("not following a redirect from a worker",
                    extra={"owner": owner, "status": resp.status})
        raise _unreachable(partition)


class Api:
    """The worker-wide objects behind the views: history index, command client, routing."""

    def __init__(self, app: faust.App, s: Settings) -> None:
        self.app = app
        self.s = s
        self.url = advertised_url(s)
        self.peer_url = re.compile(s.peer_url_pattern)
        self.history: History | None = None
        self._client: LedgerClient | None = None
        self._client_lock = asyncio.Lock()
        self.streams = 0  # open event streams, served or relayed
        self.streams_of: dict[str, int] = {}  # per caller (see stream_slot)
        self.closing = False  # the web server is shutting down: streams end

    def owned_partitions(self) -> set[int]:
        return {tp.partition for tp in self.app.assignor.assigned_actives()
                if tp.topic == self.s.commands_topic}

    def owner_url(self, partition: int) -> str | None:
        for url, topics in self.app.assignor.tables_metadata().items():
            if partition in topics.get(self.s.changelog_topic, ()):
                return str(url)
        return None

    def relayed(self, request: Request) -> dict[str, str]:
        """The headers a forwarded request carries: who relayed it, and the caller's."""
        headers = {ROUTED_HEADER: self.url}
        for name in ("Authorization", "Last-Event-ID"):
            if name in request.headers:
                headers[name] = request.headers[name]
        return headers

    def owner(self, partition: int) -> str:
        """The URL of the other worker that owns ``partition``: only a member's advertised
        URL that matches ``LEDGER_PEER_URL_PATTERN``."""
        url = self.owner_url(partition)
        if url is None or url == self.url:
            raise ApiError(503, "not_owner", f"partition {partition} is moving between "
                           "workers; try again", partition=partition)
        if not self.peer_url.fullmatch(url):
            log.warning("not forwarding: the owner's URL does not match "
                        "LEDGER_PEER_URL_PATTERN", extra={"owner": url, "partition": partition})
            raise _unreachable(partition)
        return url

    def target(self, request: Request, partition: int) -> tuple[str, URL]:
        """The owner of ``partition`` and the address to relay ``request`` to there; a
        request relayed here already is not relayed again."""
        if request.headers.get(ROUTED_HEADER):
            raise ApiError(503, "not_owner", f"partition {partition} is moving between "
                           "workers; try again", partition=partition)
        url = self.owner(partition)
        return url, URL(url.rstrip("/") + request.rel_url.raw_path_qs, encoded=True)

    async def get_json(self, request: Request, partition: int, path: str,
                       ) -> tuple[int, dict[str, Any]]:
        """GET ``path`` from the worker that owns ``partition``, with the caller's headers
        (as ``forward`` sends them): its status and JSON object."""
        url = self.owner(partition)
        session: aiohttp.ClientSession = self.app.http_client
        try:
            async with session.get(URL(url.rstrip("/") + path, encoded=True),
                                   headers=self.relayed(request), allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S)
                                   ) as resp:
                refuse_redirect(resp, url, partition)
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("read from owner failed", extra={"owner": url, "error": repr(exc)})
            raise _unreachable(partition) from None
        if not isinstance(doc, dict):
            raise _unreachable(partition)
        if resp.status not in (200, 404):  # 503 and the like: the caller tries again
            raise ApiError(503, str(doc.get("error", "owner_unreachable")),
                           str(doc.get("detail", "")), partition=partition)
        return resp.status, doc

    async def events_since(self, request: Request, account_id: str,
                           at_ms: int) -> list[dict[str, Any]]:
        """Up to TRANSACTION_SCAN events of the account (as ``event_json``) from its first
        at or after ``at_ms``: from this worker's history index, or read from the owner's
        ``/accounts`` endpoints. [] for an account that does not exist."""
        p = partition_for(account_id, self.s.partitions)
        if p in self.owned_partitions():
            return [event_json(e) for e in
                    self.history_of(p).since(account_id, at_ms, TRANSACTION_SCAN)]
        path = f"/accounts/{urllib.parse.quote(account_id, safe='')}"
        version = 1
        if at_ms > 0:  # the version after the last event before at_ms
            status, doc = await self.get_json(request, p, f"{path}?as_of={at_ms - 1}")
            version = doc["version"] + 1 if status == 200 else 1
        status, doc = await self.get_json(
            request, p, f"{path}/events?from_version={version}&limit={TRANSACTION_SCAN}")
        return list(doc["events"]) if status == 200 else []

    async def forward(self, view: View, request: Request, partition: int) -> Response:
        """Relay the request to the worker that owns ``partition`` (never a redirect)."""
        url, target = self.target(request, partition)
        session: aiohttp.ClientSession = self.app.http_client
        try:
            async with session.get(target, headers=self.relayed(request), allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S)
                                   ) as resp:
                refuse_redirect(resp, url, partition)
                body = await resp.read()
                return view.bytes(body, content_type=resp.content_type, status=resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("forward failed", extra={"owner": url, "error": repr(exc)})
            raise _unreachable(partition) from None

    async def forward_stream(self, request: Request, partition: int) -> aioweb.StreamResponse:
        """Relay an event stream from the worker that owns ``partition``, as it comes."""
        url, target = self.target(request, partition)
        headers = self.relayed(request)
        session: aiohttp.ClientSession = self.app.http_client
        out = aioweb.StreamResponse(headers=SSE_HEADERS)
        timeout = aiohttp.ClientTimeout(total=STREAM_MAX_S + FORWARD_TIMEOUT_S,
                                        connect=FORWARD_TIMEOUT_S,
                                        sock_read=STREAM_HEARTBEAT_S + FORWARD_TIMEOUT_S)
        try:
            async with session.get(target, headers=headers, timeout=timeout,
                                   allow_redirects=False) as resp:
                refuse_redirect(resp, url, partition)
                if resp.status != 200 or resp.content_type != "text/event-stream":
                    return aioweb.Response(body=await resp.read(), status=resp.status,
                                           content_type=resp.content_type)
                await out.prepare(aioweb_request(request))
                async for chunk in resp.content.iter_any():
                    if self.closing:
                        break
                    await write(out, chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not out.prepared:
                log.debug("forward failed", extra={"owner": url, "error": repr(exc)})
                raise _unreachable(partition) from None
        except ConnectionResetError:
            pass  # the client went away
        return out

    async def stream(self, request: Request, account_id: str, partition: int,
                     version: int) -> aioweb.StreamResponse:
        """The account's events from ``version`` on, then each new one as it is indexed.

        Ends when the client disconnects, after ``STREAM_MAX_S``, when the worker stops
        or when the partition leaves this worker (the client reconnects and is routed)."""
        resp = aioweb.StreamResponse(headers=SSE_HEADERS)
        loop = asyncio.get_running_loop()
        try:
            raw = aioweb_request(request)
            await resp.prepare(raw)
            await write(resp, b"retry: 2000\n\n")
            start = last_write = loop.time()
            while not self.closing and loop.time() - start < STREAM_MAX_S:
                if raw.transport is None or raw.transport.is_closing():
                    break
                history = self.history
                if history is None or not history.caught_up(partition) \
                        or partition not in self.owned_partitions():
                    break
                events = history.events(account_id, version, STREAM_BATCH)
                if events:
                    await write(resp, b"".join(sse_event(e) for e in events))
                    version = events[-1].version + 1
                    last_write = loop.time()
                elif loop.time() - last_write >= STREAM_HEARTBEAT_S:
                    await write(resp, b": idle\n\n")
                    last_write = loop.time()
                if len(events) < STREAM_BATCH:
                    await asyncio.sleep(STREAM_POLL_S)
        except (ConnectionResetError, TimeoutError):
            pass  # the client went away, or stopped reading
        return resp

    async def from_peer(self, request: Request) -> bool:
        """Whether a request comes from another worker of the group: it names (in
        ROUTED_HEADER) a member's URL, and it comes from that URL's host."""
        routed = request.headers.get(ROUTED_HEADER)
        members = {str(url) for url in self.app.assignor.tables_metadata()}
        if not routed or routed not in members or routed == self.url:
            return False
        host, remote = URL(routed).host, aioweb_request(request).remote
        if not host or not remote:
            return False
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, None)
        except OSError:
            return False
        return remote in {str(info[4][0]) for info in found}

    @contextlib.contextmanager
    def stream_slot(self, request: Request, principal: str, peer: bool) -> Iterator[None]:
        """Hold one of the worker's stream slots, and one of the caller's, or answer 503.

        A caller is its token's principal, or with an open API its address. A stream
        another worker relays here holds a slot there too, under its caller's name."""
        who = principal or f"address {aioweb_request(request).remote}"
        if peer:
            who = f"relayed {who}"  # the relaying worker held the caller's own slot
        if self.streams >= MAX_STREAMS:
            raise ApiError(503, "too_many_streams", f"this worker already serves "
                           f"{MAX_STREAMS} event streams; try again later")
        cap = MAX_STREAMS if peer else MAX_STREAMS_PER_CLIENT
        if self.streams_of.get(who, 0) >= cap:
            raise ApiError(503, "too_many_streams", f"you already have {cap} event "
                           "streams open on this worker; close one first")
        self.streams += 1
        self.streams_of[who] = self.streams_of.get(who, 0) + 1
        try:
            yield
        finally:
            self.streams -= 1
            self.streams_of[who] -= 1
            if not self.streams_of[who]:
                del self.streams_of[who]

    def history_of(self, partition: int) -> History:
        """The history index, if it holds all of ``partition``'s events so far."""
        h = self.history
        if h is None or not h.caught_up(partition):
            raise ApiError(503, "history_catching_up", f"this worker is still reading the "
                           f"events of partition {partition}; try again", partition=partition)
        return h

    async def client(self) -> LedgerClient:
        async with self._client_lock:
            if self._client is None:
                # Its constructor waits for the broker (reading the outcome topics' ends).
                loop = asyncio.get_running_loop()
                try:
                    self._client = await loop.run_in_executor(None, LedgerClient, self.s)
                except (KafkaException, RuntimeError) as exc:  # DeliveryError, login refused
                    # the cause (addresses, principals) is for the log, not for callers
                    log.warning("no client for the HTTP API", extra={"error": repr(exc)})
                    raise ApiError(503, "broker_unavailable",
                                   "cannot reach the broker; try again") from None
            return self._client

    def start(self) -> None:
        self.history = History(self.s)
        self.history.start()

    def stop(self) -> None:
        self.closing = True
        history, self.history = self.history, None  # reads answer 503 from now on
        # Commands answered 202 may still be queued in the client: flush them.
        if self._client is not None:
            self._client.close()
        if history is not None:
            history.stop()


def aioweb_request(request: Request) -> aioweb.Request:
    """The aiohttp request under Faust's request type (the web driver is aiohttp)."""
    assert isinstance(request, aioweb.Request)
    return request


def _account_id(account_id: str) -> str:
    """The id if an account could have it; else no such account (404)."""
    if not valid_id(account_id):
        raise ApiError(404, "account_not_found", "no account has this id",
                       account_id=account_id[:200])
    return account_id


def register(app: faust.App, s: Settings) -> None:
    api = Api(app, s)
    app.ledger_api = api  # type: ignore[attr-defined]
    # The URL the assignor hands to the other workers: Faust's default is the host name.
    app.conf.canonical_url = URL(api.url)
    app.web.web_app.middlewares.append(json_errors)  # type: ignore[attr-defined]
    app.web.web_app.middlewares.append(host_check(allowed_hosts(s)))  # type: ignore[attr-defined]
    tokens = s.tokens()
    if s.token_for_reads and tokens:
        app.web.web_app.middlewares.append(read_check(tokens))  # type: ignore[attr-defined]

    async def end_streams(_: aioweb.Application) -> None:
        api.closing = True  # before aiohttp waits for open requests to finish

    app.web.web_app.on_shutdown.append(end_streams)  # type: ignore[attr-defined]

    def owned(partition: int) -> bool:
        return partition in api.owned_partitions()

    @app.task  # type: ignore[untyped-decorator]
    async def start_history() -> None:
        api.start()

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def follow_assignment() -> None:
        if api.history is not None and not app.rebalancing:
            api.history.follow(api.owned_partitions())

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stop_api(sender: Any, *args: Any, **kwargs: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, api.stop)

    @app.page("/accounts/{account_id}")
    class AccountView(JsonView):
        async def get(self, request: Request, account_id: str) -> Response:
            p = partition_for(account_id, s.partitions)
            if not owned(p):
                return await api.forward(self, request, p)
            as_of = request.query.get("as_of")
            if as_of is not None:
                at_ms = parse_instant(as_of)
                event = api.history_of(p).as_of(_account_id(account_id), at_ms)
                if event is None:
                    raise ApiError(404, "account_not_found", f"account {account_id!r} had "
                                   f"no event at or before {at_ms}", account_id=account_id)
                return self.json(as_of_json(event, at_ms))
            db = app.accounts_table.data._db_for_partition(p)  # type: ignore[attr-defined]
            raw = PartitionView(db).get(account_key(account_id))
            if raw is None:
                raise ApiError(404, "account_not_found", "no account has this id",
                               account_id=account_id[:200])
            state = AccountState.from_avro(CODEC.decode(raw, expect=AccountState.avro_name)[1])
            return self.json(account_json(state))

    @app.page("/accounts/{account_id}/events")
    class EventsView(JsonView):
        async def get(self, request: Request, account_id: str) -> Response:
            p = partition_for(account_id, s.partitions)
            if not owned(p):
                return await api.forward(self, request, p)
            from_version = query_int(request, "from_version", 1, 1, INT64_MAX)
            limit = query_int(request, "limit", 100, 1, MAX_PAGE)
            meta = meta_filter(request)
            history = api.history_of(p)
            if meta:  # the matching ones among the next META_SCAN events
                events, after = history.matching(_account_id(account_id), from_version,
                                                 limit, meta, META_SCAN)
            else:
                events = history.events(_account_id(account_id), from_version, limit + 1)
                after = events[limit - 1].version + 1 if len(events) > limit else None
            if not events and not history.exists(account_id):
                raise ApiError(404, "account_not_found", "no account has this id",
                               account_id=account_id)
            return self.json({
                "account_id": account_id,
                "events": [event_json(e) for e in events[:limit]],
                "next_from_version": after,
            })

    @app.page("/accounts/{account_id}/statement")
    class StatementView(JsonView):
        async def get(self, request: Request, account_id: str) -> Response:
            p = partition_for(account_id, s.partitions)
            if not owned(p):
                return await api.forward(self, request, p)
            if "from" not in request.query or "to" not in request.query:
                raise ApiError(422, "invalid_parameter", "from and to are required")
            from_ms = parse_instant(request.query["from"], "from")
            to_ms = parse_instant(request.query["to"], "to")
            history = api.history_of(p)
            if not history.exists(_account_id(account_id)):
                raise ApiError(404, "account_not_found", "no account has this id",
                               account_id=account_id)
            try:
                doc = statement(history, account_id, from_ms, to_ms)
            except TooLong as exc:
                raise ApiError(422, "statement_too_long", str(exc)) from None
            if request.query.get("format") == "csv":
                return self.bytes(to_csv(doc).encode(), content_type="text/csv")
            return self.json(doc)

    @app.page("/transactions/{transaction_id}")
    class TransactionView(JsonView):
        async def get(self, request: Request, transaction_id: str) -> Response:
            coordinator = request.query.get("coordinator", "")
            if not coordinator:
                raise ApiError(422, "invalid_parameter", "coordinator (the account the "
                               "transaction was submitted to) is required",
                               parameter="coordinator")
            p = partition_for(coordinator, s.partitions)
            if not owned(p):
                return await api.forward(self, request, p)
            raw = None
            if valid_id(coordinator) and valid_id(transaction_id):
                db = app.accounts_table.data._db_for_partition(p)  # type: ignore[attr-defined]
                raw = PartitionView(db).get(transaction_key(coordinator, transaction_id))
            if raw is None:
                raise ApiError(404, "transaction_not_found", "the coordinator has no "
                               "transaction or transfer with this id",
                               coordinator_account_id=coordinator[:200],
                               transaction_id=transaction_id[:200])
            record = TransactionRecord.from_avro(
                CODEC.decode(raw, expect=TransactionRecord.avro_name)[1])
            accounts = list(dict.fromkeys([coordinator, *record.participants]))
            found = await asyncio.gather(*(api.events_since(request, a, record.issued_at)
                                           for a in accounts))
            return self.json(transaction_json(record, dict(zip(accounts, found, strict=True))))

    @app.page("/accounts/{account_id}/stream")
    class StreamView(JsonView):
        async def get(self, request: Request, account_id: str) -> aioweb.StreamResponse:
            p = partition_for(account_id, s.partitions)
            principal = caller(request.headers.get("Authorization", ""), tokens) or ""
            if not owned(p):
                with api.stream_slot(request, principal, peer=False):
                    return await api.forward_stream(request, p)
            version = stream_from(request)
            history = api.history_of(p)
            if not history.exists(_account_id(account_id)):
                raise ApiError(404, "account_not_found", "no account has this id",
                               account_id=account_id)
            peer = await api.from_peer(request)
            with api.stream_slot(request, principal, peer):
                return await api.stream(request, account_id, p, version)

    @app.page("/")
    class Page(JsonView):
        async def get(self, request: Request) -> Response:
            body, ctype = static_file("index.html")
            return self.bytes(body, headers={**PAGE_HEADERS,
                                             "Content-Type": f"{ctype}; charset=utf-8"})

    @app.page("/static/{name}")
    class Static(JsonView):
        async def get(self, request: Request, name: str) -> Response:
            body, ctype = static_file(name)
            return self.bytes(body, headers={**PAGE_HEADERS,
                                             "Content-Type": f"{ctype}; charset=utf-8"})

    @app.page("/commands")
    class CommandsView(JsonView):
        async def post(self, request: Request) -> Response:
            principal = caller(request.headers.get("Authorization", ""), tokens)
            if principal is None:
                raise ApiError(401, "unauthorized",
                               "submitting needs an Authorization: Bearer token")
            media = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if media != "application/json":
                # also what keeps another site's page from posting here: a cross-site
                # application/json request needs a CORS preflight, which is never allowed
                raise ApiError(415, "unsupported_media_type",
                               "send the command as Content-Type: application/json")
            wait = query_bool(request, "wait")
            try:
                body = json.loads(await request.read())
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from None
            except RecursionError:  # arrays or objects nested thousands deep
                raise ApiError(400, "malformed_json", "the body is nested too deep") from None
            if principal and isinstance(body, dict):
                body["actor"] = principal  # the caller, whatever the body says
            command = parse_command(body)
            client = await api.client()
            try:
                fut = client.submit(command, block_s=0)  # never wait on the event loop
            except CommandRefused as exc:
                raise ApiError(422, exc.reason, exc.detail, command_id=command.command_id,
                               accepted=False, reason=exc.reason) from None
            except QueueFull:
                raise ApiError(503, "busy", "too many commands in flight; try again later",
                               command_id=command.command_id) from None
            except RuntimeError:  # the client is closed: the worker is stopping
                raise ApiError(503, "stopping", "the worker is stopping") from None
            if wait:
                try:
                    outcome = await asyncio.wait_for(asyncio.wrap_future(fut), WAIT_OUTCOME_S)
                    return outcome_response(self, outcome)
                except TimeoutError:
                    pass
                except DeliveryError as exc:
                    log.warning("command not delivered", extra={
                        "command_id": command.command_id, "error": str(exc)})
                    raise ApiError(503, "not_delivered", "the command did not reach the "
                                   "broker; send it again with the same command_id",
                                   command_id=command.command_id) from None
            return self.json({"command_id": command.command_id,
                              "status": "pending" if wait else "submitted"}, status=202)

    @app.page("/openapi.yaml")
    class OpenApi(JsonView):
        async def get(self, request: Request) -> Response:
            return self.bytes(OPENAPI_PATH.read_bytes(), content_type="application/yaml")

    @app.page("/metrics")
    class Metrics(JsonView):
        async def get(self, request: Request) -> Response:
            return self.bytes(metrics.exposition(),
                              content_type="text/plain; version=0.0.4")

    @app.page("/health/live")
    class Live(JsonView):
        async def get(self, request: Request) -> Response:
            return self.json({"live": True})


def register_health(app: faust.App, s: Settings) -> None:
    @app.page("/health/ready")
    class Ready(JsonView):
        """Ready once table recovery is done and this worker consumes its partitions."""

        async def get(self, request: Request) -> Response:
            recovery = app.tables.recovery  # type: ignore[attr-defined]
            assigned = [tp for tp in app.assignor.assigned_actives()
                        if tp.topic == s.commands_topic]
            health = app.ledger_health  # type: ignore[attr-defined]
            stalled = health["stalled_s"] > s.stall_timeout_s
            ready = (recovery.completed.is_set() and not recovery.in_recovery
                     and not app.rebalancing and bool(assigned) and not stalled)
            doc = {"ready": ready, "partitions": sorted(tp.partition for tp in assigned),
                   "in_recovery": recovery.in_recovery, "rebalancing": app.rebalancing,
                   "stalled_s": round(health["stalled_s"], 1), "lag": health["lag"]}
            return self.json(doc, status=200 if ready else 503)
