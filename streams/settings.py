"""One frozen settings object for every process, read from ``LEDGER_*`` variables.

Kafka client options that matter for correctness (acks, idempotence, partitioner)
are set on purpose in ``producer_config``; secrets are ``SecretStr`` and never
printed.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_LEG_SECRET = "dev-only-leg-secret-change-me"
# Leg secrets a worker refuses outside development mode: the built-in one and the
# placeholder the compose files once used; and anything shorter than this.
WEAK_LEG_SECRETS = frozenset({DEV_LEG_SECRET, "change-me-in-production"})
MIN_LEG_SECRET_BYTES = 16
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error must not echo the password it was given.
    model_config = SettingsConfigDict(env_prefix="LEDGER_", frozen=True, extra="ignore",
                                      hide_input_in_errors=True)

    bootstrap_servers: str = "127.0.0.1:9092"
    # PLAINTEXT; SASL_PLAINTEXT or SASL_SSL with a user (every client of a process logs
    # in as the same one: the worker's Faust consumers and confluent-kafka clients
    # alike); SSL, where the brokers may ask for a client certificate instead.
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SSL", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # TLS (SSL, SASL_SSL): the CA that signed the brokers' certificates (PEM; the
    # system's CAs when unset), and this process's certificate and key (PEM) when the
    # brokers ask clients for one.
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None

    partitions: int = Field(default=12, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1)
    commands_topic: str = "ledger.commands"
    transfers_topic: str = "ledger.transfers"
    events_topic: str = "ledger.events"
    rejections_topic: str = "ledger.rejections"
    dlq_topic: str = "ledger.dlq"

    app_id: str = "ledger"
    data_dir: Path = Path("data")
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    leg_secret: SecretStr = SecretStr(DEV_LEG_SECRET)
    # Host names the HTTP API answers to besides loopback, web_host and the name the
    # worker advertises to the others (comma-separated); any other Host gets 421, so a
    # web page elsewhere cannot reach a worker through DNS rebinding.
    allowed_hosts: str = ""
    # The URLs of other workers this one relays requests to (a regular expression each
    # advertised URL must match in full): narrow it to your workers' hosts and ports.
    # A URL outside it, or a redirect from a worker, is never followed.
    peer_url_pattern: str = r"http://[A-Za-z0-9.-]+:[0-9]{1,5}"
    # A developer's machine: the worker starts with the built-in leg secret, and serves
    # the API on any address without a token. Never in production.
    dev_mode: bool = False
    # When set, ``POST /commands`` answers 401 unless the request carries
    # ``Authorization: Bearer <token>``; reads stay open unless token_for_reads.
    api_token: SecretStr | None = None
    # Several callers, each with a token of its own: "PRINCIPAL=TOKEN,...". A command
    # submitted over HTTP records its caller's principal as its actor ("api" for
    # LEDGER_API_TOKEN).
    api_tokens: SecretStr | None = None
    # With a token set, reads need it too: accounts, history, event streams, /metrics
    # (the page's files, /openapi.yaml and /health/* stay open).
    token_for_reads: bool = False
    # When set, records are written in the Confluent wire format with schemas registered
    # here (RecordNameStrategy); both framings are always read.
    schema_registry_url: str | None = None

    # Bounds of one unit of work in the worker (records taken from Faust per batch,
    # and how long to wait for a batch to fill); what is taken is decided and made
    # durable in steps of at most batch_max_bytes of input records (at least one record),
    # so a worker's memory does not grow with the backlog in front of it.
    batch_max_records: int = Field(default=2000, ge=1, le=100_000)
    batch_within_ms: int = Field(default=2, ge=1, le=10_000)
    batch_max_bytes: int = Field(default=1_000_000, ge=1024)
    # How long a command_id is remembered after its decision (partition clock: broker
    # append time). A retry within it gets the first outcome; after it, the id is new.
    idempotency_window_s: int = Field(default=7 * 86_400, ge=1)
    # A command whose issued_at is more than this ahead of the broker's append time is
    # rejected (issued_in_future): its time would become its events' times.
    max_skew_s: int = Field(default=300, ge=0)
    # A transaction a participant has not answered by then is rejected (transaction_timed_out).
    transaction_timeout_s: int = Field(default=60, ge=1)
    # A command record bigger than this is dead-lettered unread.
    max_record_bytes: int = Field(default=1_000_000, ge=1024)
    # How fast the group notices a dead worker (its partitions move after this).
    session_timeout_s: float = Field(default=10.0, ge=1)
    # A worker with input waiting on its partitions and no batch done for this long is
    # stalled: not ready at once, and it exits (for its supervisor to restart) after 2x.
    stall_timeout_s: float = Field(default=30.0, gt=0)
    # How long a starting worker waits for the broker (retrying with backoff) before
    # it exits non-zero.
    startup_timeout_s: float = Field(default=300.0, gt=0)
    # How long a flush to the broker may take before the worker gives up and exits.
    flush_timeout_s: float = Field(default=60.0, gt=0)
    # For crash tests: "POINT:N" makes the worker SIGKILL itself the N-th time it
    # reaches POINT (see streams.worker.engine.CRASH_POINTS). Off unless
    # the worker's own environment sets LEDGER_CRASH_AT; nothing a client sends can.
    crash_at: str | None = Field(default=None, pattern=r"^[a-z/-]+:[1-9][0-9]{0,5}$")

    @property
    def idempotency_window_ms(self) -> int:
        return self.idempotency_window_s * 1000

    @model_validator(mode="after")
    def _sasl_needs_a_user(self) -> Settings:
        if self.sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs "
                             "LEDGER_SASL_USERNAME and LEDGER_SASL_PASSWORD")
        if (self.ssl_certificate_location is None) != (self.ssl_key_location is None):
            raise ValueError("a client certificate needs both LEDGER_SSL_CERTIFICATE_LOCATION "
                             "and LEDGER_SSL_KEY_LOCATION")
        return self

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    @property
    def changelog_topic(self) -> str:
        """Faust's name for the accounts table changelog."""
        return f"{self.app_id}-accounts-changelog"

    def isolated(self, prefix: str, **updates: Any) -> Settings:
        """A ledger of its own on the same broker: app id and every topic under
        ``prefix``, and a random leg secret (all its workers share this object's)."""
        return self.model_copy(update={
            "app_id": prefix, "commands_topic": f"{prefix}.commands",
            "transfers_topic": f"{prefix}.transfers", "events_topic": f"{prefix}.events",
            "rejections_topic": f"{prefix}.rejections", "dlq_topic": f"{prefix}.dlq",
            "leg_secret": SecretStr(secrets.token_urlsafe(32)), **updates})

    def tokens(self) -> dict[str, str]:
        """The HTTP API's tokens: principal -> token (none: the API is open)."""
        out = {} if self.api_token is None else {"api": self.api_token.get_secret_value()}
        for pair in (self.api_tokens.get_secret_value() if self.api_tokens else "").split(","):
            principal, _, token = pair.strip().partition("=")
            if principal and token:
                out[principal.strip()] = token.strip()
        return out

    def production_problems(self) -> list[str]:
        """What makes a worker with these settings unsafe outside a developer's machine."""
        problems = []
        secret = self.leg_secret.get_secret_value()
        if secret in WEAK_LEG_SECRETS:
            problems.append("LEDGER_LEG_SECRET is the built-in placeholder: anyone who has "
                            "read the source can sign transfer legs")
        elif len(secret.encode()) < MIN_LEG_SECRET_BYTES:
            problems.append(f"LEDGER_LEG_SECRET is {'empty' if not secret else 'short'}: "
                            f"use {MIN_LEG_SECRET_BYTES}+ random bytes (32 recommended), "
                            "the same on every worker")
        if self.web_host not in LOOPBACK_HOSTS and not self.tokens():
            problems.append(f"the HTTP API would take commands from anyone who can reach "
                            f"{self.web_host}:{self.web_port}: set LEDGER_API_TOKEN or "
                            "LEDGER_API_TOKENS (or LEDGER_WEB_HOST=127.0.0.1)")
        return problems

    def kafka_config(self) -> dict[str, Any]:
        """Connection and security options shared by every confluent-kafka client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            # librdkafka's own lines (%4|...) through Python's logging: JSON in a worker
            "logger": LIBRDKAFKA_LOG,
        }
        if self.sasl and self.sasl_password is not None:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.tls:
            for key, value in (("ssl.ca.location", self.ssl_ca_location),
                               ("ssl.certificate.location", self.ssl_certificate_location),
                               ("ssl.key.location", self.ssl_key_location),
                               ("ssl.key.password", self.ssl_key_password)):
                if value is not None:
                    conf[key] = value.get_secret_value() if isinstance(value, SecretStr) \
                        else str(value)
        return conf

    def faust_credentials(self) -> Any:
        """``broker_credentials`` for ``faust.App`` (aiokafka): the same login and TLS
        trust, or None."""
        if self.security_protocol == "PLAINTEXT":
            return None
        import faust  # here: importing faust is slow and sets up its event loop
        from aiokafka.helpers import create_ssl_context

        context = create_ssl_context(
            cafile=self.ssl_ca_location, certfile=self.ssl_certificate_location,
            keyfile=self.ssl_key_location,
            password=self.ssl_key_password.get_secret_value() if self.ssl_key_password
            else None) if self.tls else None
        if not self.sasl:
            return faust.SSLCredentials(context)
        assert self.sasl_password is not None
        return faust.SASLCredentials(username=self.sasl_username,
                                     password=self.sasl_password.get_secret_value(),
                                     mechanism=self.sasl_mechanism, ssl_context=context)

    def producer_config(self, **overrides: Any) -> dict[str, Any]:
        return {
            **self.kafka_config(),
            "acks": "all",
            "enable.idempotence": True,
            # Faust (aiokafka) partitions with murmur2; librdkafka's default is CRC32.
            "partitioner": "murmur2_random",
            "linger.ms": 2,
            # Nagle's algorithm holds a small request back until the previous one is
            # acked, which doubles a flush's wait.
            "socket.nagle.disable": True,
            "message.max.bytes": 16 * 1024 * 1024,
            **overrides,
        }


def load() -> Settings:
    return Settings()
