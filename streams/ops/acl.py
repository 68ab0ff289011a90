"""Who may do what on a secured broker, and a login check that fails fast.

Two principals besides the broker's super user (``admin``):

- ``worker`` (the ledger workers): reads and writes the ledger's topics and the
  ``<app_id>-`` topics Faust keeps (the accounts changelog, ...), may create them,
  and uses consumer groups and transactional ids starting with ``<app_id>``.
- ``client`` (whoever submits commands): writes ``ledger.commands`` and reads
  ``ledger.events`` and ``ledger.rejections``, with consumer groups starting with
  its own prefix. Nothing else: a client cannot write an event, a transfer leg or
  the worker's state.

``ledger acl`` (run as ``admin``) creates these bindings; creating them again
changes nothing.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from streams.settings import Settings

CLIENT_GROUP_PREFIX = "ledger-client"

_TOPIC_RW = (AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE,
             AclOperation.CREATE, AclOperation.DESCRIBE_CONFIGS)


class AuthenticationFailed(RuntimeError):
    """The broker refused the configured user's login (wrong name, password or
    mechanism), or the TLS handshake failed (a broker certificate the configured CA did
    not sign, or a client certificate the broker does not accept)."""

    def __init__(self, s: Settings, reason: str, tls: bool = False) -> None:
        if tls:
            what = (f"the TLS handshake with the Kafka broker at {s.bootstrap_servers} "
                    "failed; check LEDGER_SSL_CA_LOCATION (the CA that signed the brokers' "
                    "certificates) and, where the brokers ask for one, the client "
                    "certificate (LEDGER_SSL_CERTIFICATE_LOCATION, LEDGER_SSL_KEY_LOCATION)")
        else:
            what = (f"the Kafka broker at {s.bootstrap_servers} refused user "
                    f"{s.sasl_username!r} ({s.sasl_mechanism}); check LEDGER_SASL_USERNAME "
                    "and LEDGER_SASL_PASSWORD")
        super().__init__(f"authentication failed: {what}. librdkafka said: {reason}")


class LoginWatch:
    """An ``error_cb`` for librdkafka, which reports a refused login only there."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.reason: str | None = None
        self.tls = False

    def __call__(self, err: KafkaError) -> None:
        # A broker that refuses this client's certificate answers the handshake with a
        # TLS alert, which librdkafka reports as a transport error.
        tls = err.code() == KafkaError._SSL or (
            err.code() == KafkaError._TRANSPORT and "SSL routines" in err.str())
        if tls or err.code() == KafkaError._AUTHENTICATION:
            self.reason, self.tls = err.str(), tls

    def raise_if_refused(self) -> None:
        if self.reason is not None:
            raise AuthenticationFailed(self.s, self.reason, self.tls)


def check_login(s: Settings, timeout_s: float = 15.0) -> None:
    """Raise AuthenticationFailed if the broker refuses the login or the TLS handshake
    fails; no-op on PLAINTEXT.

    Returns once the broker answers, or after ``timeout_s`` if it never does (an
    unreachable broker is for the caller to handle as before).
    """
    if s.security_protocol == "PLAINTEXT":
        return
    watch = LoginWatch(s)
    # log_level 0: the refused attempts are reported once, by the exception.
    admin = AdminClient({**s.kafka_config(), "error_cb": watch,  # type: ignore[dict-item]
                         "log_level": 0})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=1.0)
            return
        except KafkaException:
            admin.poll(0.2)  # error_cb runs only from poll()
            watch.raise_if_refused()
        if time.monotonic() > deadline:
            return


def _allow(principal: str, kind: ResourceType, name: str, pattern: ResourcePatternType,
           *operations: AclOperation) -> list[AclBinding]:
    return [AclBinding(kind, name, pattern, principal, "*", op, AclPermissionType.ALLOW)
            for op in operations]


def ledger_acls(s: Settings, worker: str = "worker", client: str = "client",
                client_group_prefix: str = CLIENT_GROUP_PREFIX) -> list[AclBinding]:
    """The bindings for the ledger named by ``s`` (its topics and app id)."""
    topic, group, txn = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    w, c = f"User:{worker}", f"User:{client}"
    acls: list[AclBinding] = []
    for name in (s.commands_topic, s.transfers_topic, s.events_topic, s.rejections_topic,
                 s.dlq_topic):
        acls += _allow(w, topic, name, literal, *_TOPIC_RW)
    acls += _allow(w, topic, f"{s.app_id}-", prefixed, *_TOPIC_RW)
    acls += _allow(w, group, s.app_id, prefixed, AclOperation.READ, AclOperation.DESCRIBE)
    acls += _allow(w, txn, s.app_id, prefixed, AclOperation.WRITE, AclOperation.DESCRIBE)
    acls += _allow(c, topic, s.commands_topic, literal, AclOperation.WRITE)
    acls += _allow(c, topic, s.events_topic, literal, AclOperation.READ)
    acls += _allow(c, topic, s.rejections_topic, literal, AclOperation.READ)
    acls += _allow(c, group, client_group_prefix, prefixed, AclOperation.READ)
    return acls


def rows(acls: list[AclBinding]) -> list[dict[str, str]]:
    """Bindings as plain rows (for printing)."""
    def name(x: object) -> str:
        return str(getattr(x, "name", x))

    return [{"principal": b.principal, "operation": name(b.operation),
             "resource": name(b.restype), "pattern": name(b.resource_pattern_type),
             "name": b.name} for b in acls]


def _key(b: AclBinding) -> tuple[object, ...]:
    return (b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation,
            b.permission_type)


def current_acls(admin: AdminClient) -> list[AclBinding]:
    none: Any = None  # any name, principal and host
    every = AclBindingFilter(ResourceType.ANY, none, ResourcePatternType.ANY, none, none,
                             AclOperation.ANY, AclPermissionType.ANY)
    return list(admin.describe_acls(every, request_timeout=15).result())


def apply_acls(s: Settings, acls: list[AclBinding], timeout_s: float = 30.0) -> int:
    """Create ``acls`` (as ``s``'s user, a super user) and wait until the broker lists them.

    Returns how many were not there before.
    """
    check_login(s)
    admin = AdminClient(s.kafka_config())
    before = {_key(b) for b in current_acls(admin)}
    for fut in admin.create_acls(acls, request_timeout=15).values():
        fut.result()
    wanted = {_key(b) for b in acls}
    deadline = time.monotonic() + timeout_s
    while not wanted <= {_key(b) for b in current_acls(admin)}:  # they appear a bit later
        if time.monotonic() > deadline:
            raise TimeoutError(f"the broker does not list the new ACLs after {timeout_s:.0f}s")
        time.sleep(0.2)
    return len(wanted - before)
