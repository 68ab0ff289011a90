"""Authentication and authorization on a real secured broker: nobody forges money.

A broker of this module's own (SASL/SCRAM-SHA-512 only, the StandardAuthorizer,
nothing allowed without an ACL) with three users: ``admin`` creates the topics
and ``ledger acl``'s bindings, a worker runs as ``worker``, commands come from
``client``. Every log, CLI output and exception text these tests produce is
kept and searched for the passwords at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from pydantic import SecretStr

from producers.client import LedgerClient, Outcome
from schemas.codec import CODEC
from schemas.models import Deposit, LedgerEvent, OpenAccount, Transfer
from streams import exits
from streams.dev.kafka_local import LocalBroker, ensure_jars, free_port
from streams.dev.procs import WorkerProcess, settings_env
from streams.ops.acl import AuthenticationFailed, apply_acls, ledger_acls
from streams.ops.topics import ensure_topics
from streams.ops.verify import Report, verify
from streams.partitions import partition_for
from streams.readmodels.projection import replay
from streams.settings import Settings

pytestmark = pytest.mark.kafka

PARTITIONS = 4
WRONG = "not-the-password-" + secrets.token_hex(6)


@dataclass
class Secured:
    broker: LocalBroker
    passwords: dict[str, str]
    base: Settings  # the ledger's names, logged in as nobody yet
    tmp: Path
    outputs: list[str] = field(default_factory=list)  # CLI output and exception texts

    def as_user(self, user: str, password: str | None = None, **updates: object) -> Settings:
        return self.base.model_copy(update={
            "security_protocol": "SASL_PLAINTEXT", "sasl_username": user,
            "sasl_password": SecretStr(password or self.passwords[user]), **updates})

    def cli(self, s: Settings, *args: str, timeout_s: float = 120) -> tuple[int, str, str, float]:
        env = {**os.environ, **settings_env(s)}
        started = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env,
                           capture_output=True, text=True, timeout=timeout_s, check=False)
        self.outputs += [r.stdout, r.stderr]
        return r.returncode, r.stdout, r.stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    ensure_jars()
    passwords = {u: f"{u}-{secrets.token_hex(12)}" for u in ("admin", "worker", "client")}
    broker = LocalBroker(users=passwords)
    try:
        broker.start()
        tmp = tmp_path_factory.mktemp("auth")
        base = Settings(bootstrap_servers=broker.bootstrap_servers, partitions=PARTITIONS,
                        leg_secret=SecretStr("auth-test-leg-secret"), data_dir=tmp / "data"
                        ).isolated(f"auth-{uuid.uuid4().hex[:8]}")
        yield Secured(broker, passwords, base, tmp)
    finally:
        broker.__exit__(None, None, None)


@pytest.fixture(scope="module")
def ledger(secured: Secured) -> Secured:
    """Topics created and ACLs granted as admin, through the CLI a person would use."""
    admin = secured.as_user("admin")
    ensure_topics(admin)
    rc, out, err, _ = secured.cli(admin, "--json", "acl")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["created"] == len(ledger_acls(admin)) == len(doc["acls"])
    # again: nothing new, nothing fails
    assert apply_acls(admin, ledger_acls(admin)) == 0
    return secured


@pytest.fixture(scope="module")
def worker(ledger: Secured) -> Iterator[WorkerProcess]:
    s = ledger.as_user("worker", data_dir=ledger.tmp / "worker-data", web_port=free_port())
    w = WorkerProcess(s, ledger.tmp / "worker.log")
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


def now_ms() -> int:
    return int(time.time() * 1000)


def accounts_on_two_partitions() -> tuple[str, str]:
    names = (f"acct-{i}" for i in range(1000))
    a = next(names)
    b = next(n for n in names if partition_for(n, PARTITIONS) != partition_for(a, PARTITIONS))
    return a, b


def snapshot(report: Report) -> dict[str, object]:
    s = report.summary()
    return {**{k: s[k] for k in ("ok", "records", "events", "accounts", "balances_minor",
                                 "money_in_minor", "transfers_credited", "breaches")},
            "states": {a: st.model_dump() for a, st in report.states.items()}}


def read_events_as_client(ledger: Secured, group: str, count: int) -> list[LedgerEvent]:
    consumer = Consumer({**ledger.as_user("client").kafka_config(), "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([ledger.base.events_topic])
    events: list[LedgerEvent] = []
    deadline = time.monotonic() + 60
    try:
        while len(events) < count and time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, m.error()
            events.append(LedgerEvent.from_avro(CODEC.decode(m.value() or b"")[1]))
    finally:
        consumer.close()
    return events


# ------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def funded(ledger: Secured, worker: WorkerProcess) -> tuple[str, str, Outcome]:
    """Two accounts on two partitions, a deposit and a transfer between them, submitted
    as the client (the same ids every time: a second submission is a retry); returns
    the accounts and the transfer's settlement. Any test of this module can take it."""
    alice, bob = accounts_on_two_partitions()
    t = iter(range(now_ms(), now_ms() + 10**6))
    with LedgerClient(ledger.as_user("client")) as client:
        setup = [OpenAccount(command_id=f"open-{a}", account_id=a, actor="t",
                             issued_at=next(t), currency="USD") for a in (alice, bob)]
        setup.append(Deposit(command_id="dep-1", account_id=alice, actor="t",
                             issued_at=next(t), amount_minor=10_000, currency="USD"))
        for c in setup:
            assert client.submit(c).result(timeout=60).accepted
        fut = client.submit(Transfer(command_id="tr-1", account_id=alice, to_account_id=bob,
                                     actor="t", issued_at=next(t), amount_minor=2_500,
                                     currency="USD"))
        assert fut.result(timeout=60).accepted
        settled = fut.settlement.result(timeout=60)  # type: ignore[attr-defined]
    return alice, bob, settled


def test_pipeline_runs_with_auth_on(ledger: Secured, worker: WorkerProcess,
                                    funded: tuple[str, str, Outcome], tmp_path: Path) -> None:
    alice, bob, settled = funded
    assert settled.events[0].type == "TransferCredited"
    assert settled.events[0].account_id == bob

    # the client reads the events, in a consumer group of its own prefix
    events = read_events_as_client(ledger, f"ledger-client-{uuid.uuid4().hex[:6]}", 5)
    assert sorted((e.account_id, e.version, e.type) for e in events) == sorted([
        (alice, 1, "AccountOpened"), (bob, 1, "AccountOpened"), (alice, 2, "Deposited"),
        (alice, 3, "TransferDebited"), (bob, 2, "TransferCredited")])

    # the worker's table state, over HTTP
    for account, balance, version in ((alice, 7_500, 3), (bob, 2_500, 2)):
        deadline = time.monotonic() + 30
        while True:
            status, doc = worker.get(f"/accounts/{account}")
            if (status == 200 and doc["version"] == version) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (status, doc["balance_minor"], doc["version"]) == (200, balance, version)

    # a replay of the events (as the worker, whose groups start with the app id)
    r = replay(ledger.as_user("worker"), path=tmp_path / "balances", fresh=True)
    assert r.ok and r.events_applied == 5 and r.accounts == 2, r.differences
    assert r.checksum == r.live_checksum


# ------------------------------------------------------------------ authorization


def produce_as_client(ledger: Secured, topic: str, value: bytes) -> KafkaError | None:
    results: list[KafkaError | None] = []
    p = Producer(ledger.as_user("client").producer_config())
    p.produce(topic, value, b"forged", partition=0,
              on_delivery=lambda err, _msg: results.append(err))
    left = p.flush(30)
    assert left == 0 and len(results) == 1, "no delivery report within 30 s"
    return results[0]


def first_consumer_error(ledger: Secured, topic: str, group: str) -> KafkaError | None:
    c = Consumer({**ledger.as_user("client").kafka_config(), "group.id": group,
                  "auto.offset.reset": "earliest"})
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is not None:
                return m.error()
            assert m is None, f"{topic} gave the client a record"
        return None
    finally:
        c.close()


def test_client_cannot_forge_events_or_transfer_legs(ledger: Secured, worker: WorkerProcess,
                                                     funded: tuple[str, str, Outcome]) -> None:
    s = ledger.as_user("worker")
    before = verify(s)
    assert before.ok and before.events >= 5
    rich = max(before.states, key=lambda a: before.states[a].balance_minor)
    _, doc_before = worker.get(f"/accounts/{rich}")

    # a well-formed event that would mint a million: right next version, bigger balance
    last = max((e for e in read_events_as_client(ledger, f"ledger-client-{uuid.uuid4().hex[:6]}",
                                                 before.events) if e.account_id == rich),
               key=lambda e: e.version)
    datum = last.to_avro() | {"version": last.version + 1,
                                "balance_after_minor": last.balance_after_minor + 10**8,
                                "available_after_minor": last.available_after_minor + 10**8,
                                "event_id": str(uuid.uuid4())}
    value = CODEC.encode(LedgerEvent.avro_name, datum)

    for topic in (s.events_topic, s.transfers_topic, s.changelog_topic):
        err = produce_as_client(ledger, topic, value)
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, \
            (topic, err)
        ledger.outputs.append(err.str())
    # while the commands topic takes the same client's records
    assert produce_as_client(ledger, s.commands_topic, b"not a command") is None

    # reading what it was not granted is refused too, as is a group outside its prefix
    mine = f"ledger-client-{uuid.uuid4().hex[:6]}"
    for topic, group, code in ((s.transfers_topic, mine, KafkaError.TOPIC_AUTHORIZATION_FAILED),
                               (s.changelog_topic, mine, KafkaError.TOPIC_AUTHORIZATION_FAILED),
                               (s.events_topic, s.app_id, KafkaError.GROUP_AUTHORIZATION_FAILED)):
        err = first_consumer_error(ledger, topic, group)
        assert err is not None and err.code() == code, (topic, group, err)
        ledger.outputs.append(err.str())

    # Anything that did land is decided before a command sent after it to the same
    # partition: one for an account that does not exist changes nothing but says so.
    nobody = next(f"nobody-{i}" for i in range(1000) if partition_for(f"nobody-{i}",
                                                                       PARTITIONS) == 0)
    with LedgerClient(ledger.as_user("client")) as client:
        last = client.submit(Deposit(command_id=f"after-{uuid.uuid4().hex[:6]}",
                                     account_id=nobody, actor="t", issued_at=now_ms(),
                                     amount_minor=1, currency="USD")).result(timeout=60)
    assert last.reason == "account_not_found"
    after = verify(s)
    assert snapshot(after) == snapshot(before)
    assert worker.get(f"/accounts/{rich}") == (200, doc_before)
    rc, out, err, _ = ledger.cli(s, "--json", "verify")
    assert rc == 0, err
    assert json.loads(out)["balances_minor"] == before.balances_minor


# ------------------------------------------------------------------ authentication


def test_wrong_password_fails_fast_in_the_client_library(ledger: Secured) -> None:
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed) as info:
        LedgerClient(ledger.as_user("client", WRONG))
    assert time.monotonic() - started < 15
    text = str(info.value)
    ledger.outputs.append(text)
    assert "authentication failed" in text and "'client'" in text
    assert "invalid credentials" in text  # the broker's reason, passed on


def test_wrong_password_fails_fast_in_the_cli(ledger: Secured) -> None:
    for user, args in (("client", ("submit", "open", "nobody", "USD")),
                       ("client", ("--json", "submit", "open", "nobody", "USD")),
                       ("worker", ("verify",)),
                       ("admin", ("acl",))):
        rc, out, err, took = ledger.cli(ledger.as_user(user, WRONG), *args, timeout_s=60)
        assert rc == exits.NO_PERMISSION, (args, rc, err)
        assert took < 30, (args, took)
        assert f"error: authentication failed: the Kafka broker at " \
               f"{ledger.broker.bootstrap_servers} refused user '{user}'" in err
        assert out == ""
    # and the right one works
    rc, out, err, _ = ledger.cli(ledger.as_user("worker"), "--json", "verify")
    assert rc == 0 and json.loads(out)["ok"], err


def test_worker_with_a_wrong_password_exits_with_a_clear_error(ledger: Secured) -> None:
    s = ledger.as_user("worker", WRONG, data_dir=ledger.tmp / "bad-worker-data",
                       web_port=free_port())
    started = time.monotonic()
    w = WorkerProcess(s, ledger.tmp / "bad-worker.log")
    try:
        rc = w.proc.wait(timeout=60)
    finally:
        w.stop()
    assert time.monotonic() - started < 30
    assert rc == exits.NO_PERMISSION  # as the CLI; UNAVAILABLE would say "no broker"
    last = json.loads(w.log_path.read_text().splitlines()[-1])
    assert last["level"] == "critical"
    assert last["msg"].startswith("worker exiting: authentication failed") and "'worker'" in \
        last["msg"]


# ------------------------------------------------------------------ secrecy


def test_no_password_appears_in_any_log_output_or_error(ledger: Secured,
                                                       worker: WorkerProcess) -> None:
    # what the refused logins print and log, made here when their tests have not run
    # before this one (alone, or in another order)
    if not any("authentication failed" in t for t in ledger.outputs):
        test_wrong_password_fails_fast_in_the_client_library(ledger)
        test_wrong_password_fails_fast_in_the_cli(ledger)
    if not (ledger.tmp / "bad-worker.log").is_file():
        test_worker_with_a_wrong_password_exits_with_a_clear_error(ledger)
    admin = ledger.as_user("admin")
    texts = {f"output {i}": t for i, t in enumerate(ledger.outputs)}
    texts |= {"repr(settings)": repr(admin), "str(settings)": str(admin),
              "settings json": admin.model_dump_json(),
              "faust credentials": repr(admin.faust_credentials())}
    logs = list(ledger.tmp.glob("*.log"))
    broker_dir = ledger.broker.data_dir
    logs += [broker_dir / "broker.log", *(broker_dir / "logs").glob("*")]
    assert {"worker.log", "bad-worker.log"} <= {p.name for p in logs}
    for p in logs:
        texts[str(p)] = p.read_text(errors="replace")
    assert any("authentication failed" in t for t in texts.values())
    for password in (*ledger.passwords.values(), WRONG):
        leaks = [name for name, text in texts.items() if password in text]
        assert not leaks, f"a password appears in {leaks}"
