"""``ledger``: the command line of the ledger.

    ledger kafka up                 a local Apache Kafka broker (no Docker), foreground
    ledger kafka up --secure        the same with SASL/SCRAM users and ACLs (--tls: behind TLS)
    ledger acl                      grant the worker and client users their ACLs
    ledger topics                   create the ledger's topics
    ledger worker                   run a Faust worker (the ledger agent + HTTP)
    ledger submit deposit ACCT "12.34 USD"   submit a command and print its outcome
    ledger balance ACCT             an account's balance, from a worker
    ledger history ACCT             an account's events, paged, from a worker
    ledger statement ACCT --from T --to T [--format text|json|csv]   a period's statement
    ledger status                   workers, partition owners, lag and rates
    ledger demo [--serve]           broker + worker + a scripted scenario, end to end
                                    (--serve: then the page, until Ctrl-C)

Connection settings come from ``LEDGER_*`` variables (see ``streams.settings``);
``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException

from schemas.money import format_amount, parse_amount
from streams import exits
from streams.instants import parse_instant
from streams.settings import Settings


def _print(args: argparse.Namespace, doc: Any, human: str) -> None:
    print(json.dumps(doc, default=str) if args.json else human)


def cmd_kafka(args: argparse.Namespace) -> int:
    from streams.dev.kafka_local import BrokerError, run_foreground, users_from_env

    try:
        users = users_from_env() if args.secure else None
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exits.USAGE
    run_foreground(args.port, users, tls=args.tls)
    return 0


def cmd_acl(args: argparse.Namespace) -> int:
    from streams.ops.acl import apply_acls, ledger_acls
    from streams.ops.acl import rows as acl_rows

    s = Settings()
    acls = ledger_acls(s, args.worker_user, args.client_user, args.client_group_prefix)
    created = apply_acls(s, acls)
    rows = acl_rows(acls)
    _print(args, {"acls": rows, "created": created},
           "\n".join(f"{r['principal']} {r['operation']} {r['resource']} {r['pattern']} "
                     f"{r['name']}" for r in rows) + f"\n({created} new)")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from streams.ops.topics import ensure_topics, specs

    s = Settings()
    created = ensure_topics(s)
    names = [t.name for t in specs(s)]
    _print(args, {"topics": names, "created": created},
           "\n".join(f"{n}{'  (created)' if n in created else ''}" for n in names))
    return 0


# The worker runs Python on several threads (the agent's loop, Faust's consumer, the
# history indexer, the flush's): a shorter switch interval than CPython's 5 ms keeps a
# flush from waiting that long for the GIL (docs/performance.md has the figures).
WORKER_SWITCH_INTERVAL_S = 0.0005
WORKER_GC_THRESHOLD = 50_000


def cmd_worker(args: argparse.Namespace) -> int:
    os.environ.setdefault("FAUST_LOOP", "uvloop")  # read by faust at import time
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
    # A batch makes hundreds of thousands of short-lived objects: collecting the young
    # generation every 700 of them (CPython's default) is a large share of deciding.
    gc.set_threshold(WORKER_GC_THRESHOLD, 20, 100)
    from streams import logs

    logs.setup(args.loglevel.upper())
    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.web_port:
        overrides["web_port"] = args.web_port
    s = Settings(**overrides)
    problems = [] if s.dev_mode else s.production_problems()
    if problems:
        logging.getLogger("ledger.worker").critical(
            "worker refusing to start: %s (on a developer's machine, LEDGER_DEV_MODE=true "
            "allows it)", "; ".join(problems))
        return exits.CONFIG
    from streams.ops.topics import ensure_topics, wait_for_broker

    try:
        wait_for_broker(s, s.startup_timeout_s)
        ensure_topics(s)
    except (RuntimeError, KafkaException) as exc:
        logging.getLogger("ledger.worker").critical("worker exiting: %s", exc)
        from streams.ops.acl import AuthenticationFailed

        # a wrong login is not an outage: a supervisor restarting it will not help
        return exits.NO_PERMISSION if isinstance(exc, AuthenticationFailed) \
            else exits.UNAVAILABLE
    import faust

    from streams.worker.app import crash_reason, create_app

    app = create_app(s)
    # The log is JSON for machines: no banner, and no progress spinner (Faust's writes
    # terminal escape codes when start-up ends, terminal or not).
    worker = faust.Worker(app, loglevel=args.loglevel, override_logging=False, quiet=True)
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if not exc.code:
            logging.getLogger("ledger.worker").info("worker stopped cleanly")
            raise
        # Faust stopped itself after a crash: make the cause the last line.
        reason = crash_reason(app) or f"{worker.crash_reason!r}"
        logging.getLogger("ledger.worker").critical("worker exiting: %s", reason)
        return exits.INTERNAL
    logging.getLogger("ledger.worker").info("worker stopped cleanly")
    return 0


def _command(kind: str, args: argparse.Namespace) -> Any:
    """The command the arguments ask for, with ``--meta``'s metadata (refused with a
    ``ValueError`` for a command that has none)."""
    command = _bare_command(kind, args)
    meta = dict(args.meta or ())
    if kind == "set-metadata" or not meta:
        return command
    if "metadata" not in type(command).model_fields:
        raise ValueError(f"{kind} carries no metadata")
    return type(command)(**{**command.__dict__, "metadata": meta})


def _bare_command(kind: str, args: argparse.Namespace) -> Any:
    from schemas import models as m

    base: dict[str, Any] = {
        "command_id": args.command_id or str(uuid.uuid4()), "account_id": args.account,
        "actor": args.actor, "issued_at": int(time.time() * 1000),
        "expected_version": args.expected_version, "correlation_id": args.correlation_id,
    }
    if kind == "open":
        limit = 0
        if args.overdraft:
            limit, _ = parse_amount(f"{args.overdraft} {args.currency}")
        return m.OpenAccount(**base, currency=args.currency.upper(),
                             overdraft_limit_minor=limit)
    if kind == "close":
        return m.CloseAccount(**base)
    if kind == "set-metadata":  # without --meta: none from now on
        return m.SetAccountMetadata(**base, metadata=dict(args.meta or ()))
    if kind == "reverse":
        return m.Reverse(**base, transaction_id=args.transaction_id)
    if kind == "transaction":
        postings = []
        for src, dst, text in args.posting:
            minor, code = parse_amount(text)
            postings.append(m.Posting(from_account_id=src, to_account_id=dst,
                                      amount_minor=minor, currency=code))
        return m.Transaction(**base, postings=postings)
    if kind in ("release-hold", "capture-hold"):
        if kind == "release-hold":
            return m.ReleaseHold(**base, hold_id=args.hold_id)
        amount = parse_amount(args.amount)[0] if args.amount else None
        return m.CaptureHold(**base, hold_id=args.hold_id, amount_minor=amount)
    amount, currency = parse_amount(args.amount)
    if kind == "deposit":
        return m.Deposit(**base, amount_minor=amount, currency=currency)
    if kind == "withdraw":
        return m.Withdraw(**base, amount_minor=amount, currency=currency)
    if kind == "transfer":
        return m.Transfer(**base, to_account_id=args.to, amount_minor=amount, currency=currency)
    if kind == "hold":
        return m.PlaceHold(**base, hold_id=args.hold_id, amount_minor=amount, currency=currency,
                           expires_at=base["issued_at"] + int(args.expires_in_s * 1000))
    raise SystemExit(f"unknown command {kind}")


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def outcome_doc(outcome: Any) -> dict[str, Any]:
    if outcome.rejection is not None:
        r = outcome.rejection
        return {"command_id": outcome.command_id, "accepted": False, "reason": r.reason,
                "detail": r.detail}
    return {"command_id": outcome.command_id, "accepted": True,
            "events": [event_doc(e) for e in outcome.events]}


def event_doc(e: Any) -> dict[str, Any]:
    return {"account_id": e.account_id, "version": e.version, "type": e.type,
            "payload": e.payload.model_dump(), "balance_after_minor": e.balance_after_minor,
            "balance_after": format_amount(e.balance_after_minor, e.currency),
            "occurred_at": e.occurred_at, "command_id": e.command_id, "actor": e.actor}


def cmd_submit(args: argparse.Namespace) -> int:
    from producers.client import CommandRefused, LedgerClient

    try:
        command = _command(args.kind, args)
    except ValueError as exc:  # an amount, or a command the models refuse
        print(f"error: {exc}", file=sys.stderr)
        return exits.USAGE
    with LedgerClient(Settings()) as client:
        try:
            fut = client.submit(command)
        except CommandRefused as exc:
            _print(args, {"accepted": False, "reason": exc.reason, "detail": exc.detail},
                   f"refused before sending: {exc}")
            return exits.REFUSED
        try:
            outcome = fut.result(timeout=args.timeout)
        except TimeoutError:
            print(f"error: no outcome for {command.command_id} within {args.timeout}s "
                  "(is a worker running, and the broker reachable?)", file=sys.stderr)
            return exits.TIMEOUT
        doc = outcome_doc(outcome)
        if outcome.accepted and args.kind in ("transaction", "reverse"):
            try:  # wait for it to end: committed, or rejected with the reason
                outcome = fut.settlement.result(timeout=args.timeout)  # type: ignore[attr-defined]
            except TimeoutError:
                print(f"error: transaction {command.command_id} did not end within "
                      f"{args.timeout}s", file=sys.stderr)
                return exits.TIMEOUT
            doc = {**outcome_doc(outcome),
                   "events": doc["events"] + [event_doc(e) for e in outcome.events]}
            end = outcome.events[0].payload
            human = f"committed: transaction {command.command_id} of {command.account_id}" \
                if outcome.accepted else f"rejected: transaction {command.command_id}: " \
                f"{end.reason} at posting {end.posting_index} ({end.detail})"
            _print(args, doc, human)
            return 0 if outcome.accepted else exits.REFUSED
    if outcome.accepted:
        e = outcome.events[0]
        human = f"ok: {e.type} {e.account_id} v{e.version}, balance " \
                f"{format_amount(e.balance_after_minor, e.currency)}"
    else:
        human = f"rejected: {doc['reason']} ({doc['detail']})"
    _print(args, doc, human)
    return 0 if outcome.accepted else exits.REFUSED


def get_json(base_url: str, path: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET a worker's JSON; an HTTP error's body comes back with its ``status``."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}{path}", timeout=timeout_s) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read()) | {"status": exc.code}  # type: ignore[no-any-return]


def ask_worker(args: argparse.Namespace, path: str, timeout_s: float) -> dict[str, Any] | int:
    """GET ``path`` (under the account's URL) from the worker at ``args.url``: its JSON,
    or the exit status after saying why there is none."""
    url_path = f"/accounts/{urllib.parse.quote(args.account, safe='')}{path}"
    try:
        doc = get_json(args.url, url_path, timeout_s)
    except OSError as exc:
        print(f"error: no answer from {args.url}: {exc}", file=sys.stderr)
        return exits.USAGE
    if "error" in doc:
        _print(args, doc, f"{args.account}: {doc.get('error')} ({doc.get('detail')})")
        return exits.REFUSED
    return doc


def worker_url() -> str:
    """Where the CLI finds a worker: ``LEDGER_URL``, else this machine's web port
    (``LEDGER_WEB_PORT``, the one ``ledger worker`` serves on)."""
    return os.environ.get("LEDGER_URL") or f"http://127.0.0.1:{Settings().web_port}"


def cmd_balance(args: argparse.Namespace) -> int:
    doc = ask_worker(args, "", 5.0)
    if isinstance(doc, int):
        return doc
    meta = doc.get("metadata") or {}
    _print(args, doc, f"{doc['account_id']}: balance {doc['balance']}, available "
                      f"{doc['available']}, version {doc['version']}, {doc['status']}"
                      + (f"\n  metadata {_meta_text(meta.items())}" if meta else ""))
    return 0


def _meta_text(pairs: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in pairs)


def cmd_history(args: argparse.Namespace) -> int:
    events: list[dict[str, Any]] = []
    version: int | None = args.from_version
    meta = [(f"meta.{k}", v) for k, v in args.meta or ()]
    while version is not None and (args.limit is None or len(events) < args.limit):
        page_size = min(1000, args.limit - len(events)) if args.limit else 1000
        query = urllib.parse.urlencode([("from_version", version), ("limit", page_size), *meta])
        page = ask_worker(args, f"/events?{query}", 10.0)
        if isinstance(page, int):
            return page
        events += page["events"]
        version = page["next_from_version"]
    lines = [f"v{e['version']:<5} {_iso(e['occurred_at'])}  {e['type']:<16} "
             + (f"{format_amount(e['amount_minor'], e['currency']):>16}"
                if "amount_minor" in e else " " * 16)
             + f"  balance {format_amount(e['balance_after_minor'], e['currency'])}, available "
             f"{format_amount(e['available_after_minor'], e['currency'])}  "
             f"[{e['command_id']} by {e['actor']}]"
             + (f"  {{{_meta_text(e['metadata'].items())}}}" if e.get("metadata") else "")
             for e in events]
    which = f" with {_meta_text(args.meta)}" if args.meta else ""
    _print(args, {"account_id": args.account, "events": events},
           "\n".join(lines) or f"{args.account}: no events{which} from version "
                                f"{args.from_version}")
    return 0


def cmd_statement(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"from": args.from_, "to": args.to})
    doc = ask_worker(args, f"/statement?{query}", 30.0)
    if isinstance(doc, int):
        return doc
    args.json = args.json or args.format == "json"
    if args.format == "csv":
        from streams.readmodels.statement import to_csv

        print(to_csv(doc), end="")
        return 0
    lines = [f"{args.account} from {_iso(doc['from'])} to {_iso(doc['to'])}",
             f"  opening balance {doc.get('opening_balance', '-'):>16}"]
    lines += [f"  {_iso(e['occurred_at'])}  {e['description']:<30} {e['amount']:>16}  "
              f"balance {e['balance_after']}"
              + (f"  ({e['counterparty']}, {e.get('transaction_id') or e['transfer_id']})"
                 if e["counterparty"] else "")
              for e in doc["entries"]]
    lines.append(f"  closing balance {doc.get('closing_balance', '-'):>16}")
    _print(args, doc, "\n".join(lines))
    return 0


def cmd_transaction(args: argparse.Namespace) -> int:
    path = f"/transactions/{urllib.parse.quote(args.transaction_id, safe='')}?" + \
        urllib.parse.urlencode({"coordinator": args.coordinator})
    try:
        doc = get_json(args.url, path, 10.0)
    except OSError as exc:
        print(f"error: no answer from {args.url}: {exc}", file=sys.stderr)
        return exits.USAGE
    if "error" in doc:
        _print(args, doc, f"{args.transaction_id}: {doc.get('error')} ({doc.get('detail')})")
        return exits.REFUSED

    def at(ms: int | None) -> str:
        return "-" if ms is None else _iso(ms)

    kind = doc.get("kind", "transaction")  # a worker of an older version has no kind
    lines = [f"{kind} {doc['transaction_id']} of {doc['coordinator_account_id']}: "
             f"{doc['state']}" + (f", {doc['reason']} at posting {doc['posting_index']} "
                                  f"({doc['detail']})" if doc["state"] == "rejected" else "")]
    lines += [f"  posting {i}: {p['from_account_id']} -> {p['to_account_id']} {p['amount']}"
              for i, p in enumerate(doc["postings"])]
    lines.append(f"  started {at(doc['started_at'])}, ended {at(doc['ended_at'])}")
    lines += [f"  {p['account_id']}: reserved {at(p['reserved_at'])}, posted "
              f"{at(p['posted_at'])}, released {at(p['released_at'])}"
              for p in doc["participants"]]
    for link in ("reverses", "reversed_by"):
        if doc.get(link):
            lines.append(f"  {link.replace('_', ' ')} {doc[link]}")
    _print(args, doc, "\n".join(lines))
    return 0


def _iso(epoch_ms: int) -> str:
    when = datetime.datetime.fromtimestamp(epoch_ms / 1000, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cmd_status(args: argparse.Namespace) -> int:
    from streams.ops.status import render, status

    doc = status(Settings(), sample_s=args.sample)
    _print(args, doc, render(doc))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.dev.demo import run_demo

    return run_demo(json_out=args.json, serve=args.serve)




def _progress(args: argparse.Namespace) -> Any:
    if args.json:
        return None

    def show(done: int, total: int) -> None:
        if total:
            print(f"\r  {done:,}/{total:,} events", end="", file=sys.stderr, flush=True)

    return show


def cmd_verify(args: argparse.Namespace) -> int:
    from streams.ops.verify import verify

    report = verify(Settings(), progress=not args.json)
    doc = report.summary()
    lines = [f"{k}: {v}" for k, v in doc.items() if k != "breaches"]
    lines += [f"BREACH {b}" for b in report.breaches[:50]] or ["ok: every invariant holds"]
    _print(args, doc, "\n".join(lines))
    return 0 if report.ok else exits.REFUSED


def cmd_replay(args: argparse.Namespace) -> int:
    from streams.readmodels.projection import GroupActive, replay

    offsets = None
    if args.offsets:
        offsets = {int(p): int(o) for p, o in (x.split(":") for x in args.offsets.split(","))}
    try:
        r = replay(Settings(), args.group, Path(args.path) if args.path else None,
                   fresh=args.fresh, to=args.to,
                   at_ms=parse_instant(args.at) if args.at else None, offsets=offsets,
                   progress=_progress(args))
    except GroupActive as exc:
        print(f"\nrefused: {exc}", file=sys.stderr)
        return exits.USAGE
    doc = {"ok": r.ok, "events_applied": r.events_applied, "accounts": r.accounts,
           "checksum": r.checksum, "live_checksum": r.live_checksum, "seconds": r.seconds,
           "events_per_s": r.events_per_s, "differences": r.differences[:50]}
    human = (f"\nreplayed {r.events_applied:,} events into {r.accounts:,} accounts in "
             f"{r.seconds:.1f}s ({r.events_per_s:,.0f}/s); checksum {r.checksum[:16]} vs live "
             f"{r.live_checksum[:16]}: " + ("same" if r.ok else
                                            f"{len(r.differences)} DIFFERENCES\n"
                                            + "\n".join(r.differences[:20])))
    _print(args, doc, human)
    return 0 if r.ok else exits.REFUSED


def cmd_as_of(args: argparse.Namespace) -> int:
    from streams.readmodels.projection import Projection

    at_ms = parse_instant(args.time)
    with Projection(Settings(), args.group, Path(args.path) if args.path else None) as proj:
        proj.run_until_caught_up(timeout_s=args.timeout)
        doc = proj.as_of(args.account, at_ms)
    if doc is None:
        _print(args, {"account_id": args.account, "at_ms": at_ms, "error": "no_history"},
               f"{args.account}: no event at or before {args.time}")
        return exits.REFUSED
    doc = {"at_ms": at_ms, **doc}
    cur = doc["currency"]
    human = (f"{args.account} as of {args.time}: balance "
             f"{format_amount(doc['balance_minor'], cur)}, available "
             f"{format_amount(doc['available_minor'], cur)}, version {doc['version']}")
    _print(args, doc, human)
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from streams import logs
    from streams.readmodels.projection import Projection

    logs.setup()
    log = logging.getLogger("ledger.projection")
    with Projection(Settings(), args.group, Path(args.path) if args.path else None) as proj:
        log.info("projection running", extra={"group": proj.group_id, "path": str(proj.path)})
        try:
            while True:
                proj.poll_batch()
        except KeyboardInterrupt:
            return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from streams.ops.rebuild import rebuild
    from streams.readmodels.projection import GroupActive

    s = Settings()
    try:
        r = rebuild(s, progress=None if args.json else (lambda msg: print(f"==> {msg}")))
    except GroupActive as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return exits.USAGE
    doc = {"accounts": r.accounts, "outcomes": r.outcomes, "records": r.records,
           "seconds": round(r.seconds, 2),
           "checkpoints": {p: [c.commands, c.transfers] for p, c in r.checkpoints.items()}}
    _print(args, doc, f"wrote {r.records:,} records ({r.accounts:,} accounts, {r.outcomes:,} "
                      f"command outcomes) to {s.changelog_topic} in {r.seconds:.1f}s; start "
                      "workers with empty data directories to restore from it")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streams.dev.bench import run_bench

    return run_bench(commands=args.commands, mix=args.mix, seed=args.seed, json_out=args.json,
                     workers=args.workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    k = sub.add_parser("kafka", help="a local Kafka broker")
    k.add_argument("action", choices=["up"])
    k.add_argument("--port", type=int, default=9092)
    k.add_argument("--secure", action="store_true",
                   help="SASL/SCRAM and ACLs; passwords from LEDGER_KAFKA_{ADMIN,WORKER,"
                        "CLIENT}_PASSWORD")
    k.add_argument("--tls", action="store_true",
                   help="the listener behind TLS (SASL_SSL with --secure, else SSL with "
                        "client certificates); a test CA and certificates are made with "
                        "openssl in the data dir")
    k.set_defaults(fn=cmd_kafka)

    sub.add_parser("topics", help="create the ledger's topics").set_defaults(fn=cmd_topics)

    ac = sub.add_parser("acl", help="grant the worker and client users their ACLs (as admin)")
    ac.add_argument("--worker-user", default="worker")
    ac.add_argument("--client-user", default="client")
    ac.add_argument("--client-group-prefix", default="ledger-client",
                    help="consumer groups the client user may use")
    ac.set_defaults(fn=cmd_acl)

    w = sub.add_parser("worker", help="run a ledger worker")
    w.add_argument("--data-dir")
    w.add_argument("--web-port", type=int)
    w.add_argument("--loglevel", default="info")
    w.set_defaults(fn=cmd_worker)

    s = sub.add_parser("submit", help="submit a command and wait for its outcome")
    s.add_argument("--command-id", help="idempotency key (default: a new uuid)")
    s.add_argument("--actor", default=os.environ.get("USER", "cli"))
    s.add_argument("--expected-version", type=int)
    s.add_argument("--correlation-id")
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("--meta", action="append", type=key_value, metavar="KEY=VALUE",
                   help="metadata of the command (carried into its events; of the account "
                   "for open and set-metadata); repeat for more")
    ss = s.add_subparsers(dest="kind", required=True)
    _add_kind = ss.add_parser

    def add_kind(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add_kind(name, parents=[common], **kw)  # so --json goes after the command too

    ss.add_parser = add_kind  # type: ignore[method-assign]
    o = ss.add_parser("open")
    o.add_argument("account")
    o.add_argument("currency")
    o.add_argument("--overdraft", help="overdraft limit in major units, e.g. 100.00")
    for kind in ("deposit", "withdraw"):
        x = ss.add_parser(kind)
        x.add_argument("account")
        x.add_argument("amount", help='e.g. "12.34 USD"')
    t = ss.add_parser("transfer")
    t.add_argument("account")
    t.add_argument("to")
    t.add_argument("amount")
    h = ss.add_parser("hold")
    h.add_argument("account")
    h.add_argument("hold_id")
    h.add_argument("amount")
    h.add_argument("--expires-in-s", type=float, default=3600)
    c = ss.add_parser("capture-hold")
    c.add_argument("account")
    c.add_argument("hold_id")
    c.add_argument("amount", nargs="?")
    r = ss.add_parser("release-hold")
    r.add_argument("account")
    r.add_argument("hold_id")
    cl = ss.add_parser("close")
    cl.add_argument("account")
    tx = ss.add_parser("transaction", help="postings that all apply or none does; ACCOUNT "
                       "coordinates (the transaction id is the command id, scoped to it)")
    tx.add_argument("account")
    tx.add_argument("--posting", action="append", nargs=3, required=True,
                    metavar=("FROM", "TO", "AMOUNT"), help='e.g. alice shop "97.00 USD"; '
                    "repeat for each posting")
    rv = ss.add_parser("reverse", help="post the opposite of a committed transaction of ACCOUNT")
    rv.add_argument("account")
    rv.add_argument("transaction_id")
    sm = ss.add_parser("set-metadata", help="replace the account's metadata with --meta's "
                       "(none: clear it)")
    sm.add_argument("account")
    s.set_defaults(fn=cmd_submit)

    b = sub.add_parser("balance", help="an account's balance, from a worker")
    b.add_argument("account")
    b.add_argument("--url", default=worker_url(),
                   help="any worker (default: LEDGER_URL, else LEDGER_WEB_PORT on 127.0.0.1)")
    b.set_defaults(fn=cmd_balance)

    hi = sub.add_parser("history", help="an account's events, oldest first, read through a "
                                        "worker's HTTP API (GET /accounts/ID/events)")
    hi.add_argument("account")
    hi.add_argument("--from-version", type=int, default=1)
    hi.add_argument("--limit", type=int, help="at most this many events (default: all)")
    hi.add_argument("--meta", action="append", type=key_value, metavar="KEY=VALUE",
                    help="only the events whose metadata has KEY=VALUE; repeat: all must match")
    hi.add_argument("--url", default=worker_url(),
                    help="any worker: it forwards to the account's owner (default: LEDGER_URL, "
                         "else LEDGER_WEB_PORT on 127.0.0.1)")
    hi.set_defaults(fn=cmd_history)

    sm = sub.add_parser("statement", help="an account's statement for a period: opening "
                                          "balance, entries, closing balance "
                                          "(GET /accounts/ID/statement)")
    sm.add_argument("account")
    sm.add_argument("--from", dest="from_", required=True,
                    help="start (included): epoch ms or ISO 8601, UTC unless it says otherwise")
    sm.add_argument("--to", required=True, help="end (excluded)")
    sm.add_argument("--format", choices=["text", "json", "csv"], default="text")
    sm.add_argument("--url", default=worker_url(),
                    help="any worker: it forwards to the account's owner")
    sm.set_defaults(fn=cmd_statement)

    tr = sub.add_parser("transaction", help="a transaction: its postings, how it ended, when "
                        "each account took each step")
    tr.add_argument("transaction_id")
    tr.add_argument("--coordinator", required=True,
                    help="the account the transaction was submitted to")
    tr.add_argument("--url", default=worker_url(),
                    help="any worker (default: LEDGER_URL, else LEDGER_WEB_PORT on 127.0.0.1)")
    tr.set_defaults(fn=cmd_transaction)

    st = sub.add_parser("status", help="workers, partition owners, lag and rates at a glance")
    st.add_argument("--sample", type=float, default=2.0, help="seconds to measure rates over")
    st.set_defaults(fn=cmd_status)

    d = sub.add_parser("demo", help="run the whole pipeline on a scripted scenario")
    d.add_argument("--serve", action="store_true",
                   help="then leave the worker and its page running until Ctrl-C")
    d.set_defaults(fn=cmd_demo)

    v = sub.add_parser("verify", help="fold the events topic and check every invariant")
    v.set_defaults(fn=cmd_verify)

    rp = sub.add_parser("replay", help="reset the balances projection's offsets, re-run it, "
                                       "compare with the live state")
    rp.add_argument("--group", help="consumer group (default <app_id>-balances)")
    rp.add_argument("--path", help="projection store (default <data_dir>/balances)")
    rp.add_argument("--fresh", action="store_true", help="delete the store first (rebuild)")
    rp.add_argument("--to", choices=["earliest", "latest"], default="earliest")
    rp.add_argument("--at", help="reset to the offsets at this instant (record timestamps; "
                                 "ISO 8601 or epoch ms)")
    rp.add_argument("--offsets", help="explicit offsets: partition:offset,...")
    rp.set_defaults(fn=cmd_replay)

    ao = sub.add_parser("as-of", help="an account's balance at a past instant")
    ao.add_argument("account")
    ao.add_argument("time", help="ISO 8601 (e.g. 2026-11-12T09:30:00Z) or epoch ms")
    ao.add_argument("--group")
    ao.add_argument("--path")
    ao.add_argument("--timeout", type=float, default=120.0)
    ao.set_defaults(fn=cmd_as_of)

    sub.add_parser("rebuild", help="re-derive the worker's state from the events alone, "
                                   "into its changelog").set_defaults(fn=cmd_rebuild)

    pj = sub.add_parser("project", help="run the balances projection (read model)")
    pj.add_argument("--group")
    pj.add_argument("--path")
    pj.set_defaults(fn=cmd_project)

    bn = sub.add_parser("bench", help="measure throughput, latency, replay; check the result")
    bn.add_argument("--commands", type=int, default=200_000)
    bn.add_argument("--mix", choices=["full", "simple"], default="full")
    bn.add_argument("--seed", type=int, default=1)
    bn.add_argument("--workers", type=int, default=1,
                    help="worker processes in one group (each owns some partitions)")
    bn.set_defaults(fn=cmd_bench)

    args = parser.parse_args(argv)
    from streams.ops.acl import AuthenticationFailed, check_login

    try:
        if args.cmd not in ("kafka", "worker", "balance", "demo", "bench"):
            check_login(Settings())  # a wrong password: a clear error now, not a timeout later
        return int(args.fn(args))
    except AuthenticationFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exits.NO_PERMISSION


if __name__ == "__main__":
    sys.exit(main())
