"""A real local Apache Kafka broker (KRaft, combined broker+controller) without Docker.

The broker jars come from Maven Central: ``ensure_jars()`` runs ``mvn
dependency:copy-dependencies`` on ``streams/dev/broker/pom.xml`` into a cache
outside the repo (``$LEDGER_KAFKA_CACHE`` or ``~/.cache/ledger/kafka-4.1.1``),
once. ``LocalBroker`` then formats a data directory and runs ``kafka.Kafka``
with the ``java`` found on ``PATH``, on free 127.0.0.1 ports::

    from streams.dev.kafka_local import LocalBroker, ensure_jars

    ensure_jars()
    with LocalBroker() as broker:
        print(broker.bootstrap_servers)  # "127.0.0.1:<port>"
        broker.restart()                 # same ports and data

    # SASL/SCRAM + ACLs: only the given users may log in, ``admin`` is the super user
    with LocalBroker(users={"admin": "...", "worker": "...", "client": "..."}) as broker:
        broker.client_config("worker")   # confluent-kafka options to log in as worker

For people, ``run_foreground()`` (the future ``ledger kafka up``) keeps a
broker running on a persistent data dir until Ctrl-C::

    python -c 'from streams.dev.kafka_local import run_foreground; run_foreground(None)'

Tests use the fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import importlib.resources
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from confluent_kafka.admin import AdminClient

from streams.exits import can_die_with_parent, die_with_parent

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "LocalBroker",
    "LocalCluster",
    "cache_dir",
    "ensure_jars",
    "run_foreground",
    "users_from_env",
]

KAFKA_VERSION = "4.1.1"

log = logging.getLogger("ledger.kafka")

_MARKER_NAME = ".complete"
_PARTIAL_PREFIX = "lib.partial-"
_MVN_TIMEOUT_S = 900.0
_FORMAT_TIMEOUT_S = 120.0
_POLL_INTERVAL_S = 0.2
_LOG_TAIL_LINES = 40
_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3
_HEAP = "-Xmx512m"
_TEST_KEYSTORE_PASSWORD = "local-test-only"
_USER_NAME = re.compile(r"[A-Za-z0-9_-]+")
_PASSWORD = re.compile(r"[A-Za-z0-9._~+-]+")


class BrokerError(RuntimeError):
    """The broker could not be set up, started or reached."""


# --------------------------------------------------------------------------- jars


def cache_dir() -> Path:
    """The jar cache: ``$LEDGER_KAFKA_CACHE`` or ``~/.cache/ledger/kafka-<version>``."""
    override = os.environ.get("LEDGER_KAFKA_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "ledger" / f"kafka-{KAFKA_VERSION}"


def _lib_is_complete(lib: Path) -> bool:
    marker = lib / _MARKER_NAME
    if not marker.is_file():
        return False
    expected = [name for name in marker.read_text().splitlines() if name]
    return bool(expected) and all((lib / name).is_file() for name in expected)


@contextlib.contextmanager
def _pom_path() -> Iterator[Path]:
    resource = importlib.resources.files("streams").joinpath("broker/pom.xml")
    if not resource.is_file():  # e.g. a zipped install that dropped package data
        yield Path(__file__).parent / "broker" / "pom.xml"
        return
    with importlib.resources.as_file(resource) as path:
        yield path


def ensure_jars() -> Path:
    """Return the directory of Kafka broker jars, downloading them with Maven if needed.

    Safe to call concurrently from several processes (a file lock serialises
    the download) and after an interrupted download (only a directory with
    a complete marker is trusted).
    """
    cache = cache_dir()
    lib = cache / "lib"
    if _lib_is_complete(lib):
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if _lib_is_complete(lib):  # another process finished while we waited
            return lib
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("`mvn` is not on PATH; it is needed once to fetch the Kafka jars")
        # Holding the lock, any partial dir is the leftover of a killed download.
        for leftover in cache.glob(f"{_PARTIAL_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=cache))
        try:
            log.info("downloading Kafka %s jars with Maven into %s", KAFKA_VERSION, lib)
            started = time.monotonic()
            with _pom_path() as pom:
                cmd = [
                    mvn, "-q", "-B", "-f", str(pom),
                    "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
                ]  # fmt: skip
                _run(cmd, "mvn", _MVN_TIMEOUT_S)
            jars = sorted(p.name for p in staging.glob("*.jar"))
            if not any(name.startswith("kafka_2.13-") for name in jars):
                raise BrokerError(f"mvn succeeded but no kafka_2.13 jar is in {staging}")
            (staging / _MARKER_NAME).write_text("\n".join(jars) + "\n")
            if lib.exists():  # present but not trusted: marker missing or jars gone
                shutil.rmtree(lib)
            staging.rename(lib)
            log.info("fetched %d jars in %.1f s", len(jars), time.monotonic() - started)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return lib


# ------------------------------------------------------------------------- broker


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range.

    A port from that range (what binding port 0 gives), freed again, can be taken by
    any outgoing connection before the process meant to listen on it binds it: a
    worker of ``ledger bench`` once failed to start so. Ports below the range are
    never handed to outgoing connections.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)
        if port_is_free(port):
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def _run(cmd: list[str], what: str, timeout_s: float, cwd: Path | None = None) -> None:
    """Run a tool to completion; BrokerError, with the end of its output, if it fails."""
    try:
        result = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise BrokerError(f"{what} did not finish in {timeout_s:.0f} s") from e
    if result.returncode != 0:
        raise BrokerError(f"{what} failed (exit {result.returncode}):\n"
                          f"{_tail(result.stdout + result.stderr)}")


def make_test_certificates(folder: Path) -> None:
    """A CA, a certificate for a broker on 127.0.0.1/localhost (``broker.p12``) and one
    for a client (``client.pem``, ``client.key``, subject CN=ledger-client), all signed
    by the CA (``ca.pem``), for 30 days. For tests and local runs only: the keys are not
    encrypted (the keystore's password is in this module)."""
    if (folder / "broker.p12").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        _run(["openssl", *args], f"openssl {args[0]}", 60.0, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            "-subj", "/CN=ledger-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, subject in (("broker", "/CN=localhost"), ("client", "/CN=ledger-client")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                "-keyout", f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "30", "-extfile", "san.ext", "-out", f"{name}.pem")
    openssl("pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key",
            "-CAfile", "ca.pem", "-chain", "-name", "broker",
            "-passout", f"pass:{_TEST_KEYSTORE_PASSWORD}", "-out", "broker.p12")


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
    return True


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _file_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            return _tail(f.read().decode("utf-8", errors="replace"), lines)
    except FileNotFoundError:
        return "(no log written)"


def _random_cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64, no padding.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")


def _read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip()
    return props


def _write_properties(path: Path, props: dict[str, str]) -> None:
    body = "".join(f"{key}={value}\n" for key, value in props.items())
    # Owner-only before anything is written: a secured broker's file holds a password.
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("# Written by streams.dev.kafka_local; rewritten on every start.\n" + body)


_LOG4J2_TEMPLATE = """\
status = warn
name = ledger-kafka

appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n

appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log_dir}/server.log
appender.file.filePattern = {log_dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3

rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
rootLogger.appenderRef.file.ref = FILE

logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.requestchannel.name = kafka.network.RequestChannel$
logger.requestchannel.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""


# Strong references on purpose: a broker dropped without stop() must still be
# stopped (and its temporary data dir removed) when the interpreter exits.
_brokers_to_clean_up: set[LocalBroker] = set()


@atexit.register
def _clean_up_brokers() -> None:
    for broker in list(_brokers_to_clean_up):
        with contextlib.suppress(Exception):
            broker.stop(timeout_s=10)
            broker._remove_owned_data_dir()


@dataclass(frozen=True)
class Quorum:
    """A node's place in a cluster whose nodes are each broker and controller, with a
    static set of voters (see ``LocalCluster``)."""

    cluster_id: str
    node_id: int
    ports: Mapping[int, int]  # node id -> client port
    controllers: Mapping[int, int]  # node id -> controller port

    def properties(self) -> dict[str, str]:
        nodes = len(self.ports)
        replicas, min_isr = str(min(3, nodes)), str(max(1, min(2, nodes - 1)))
        return {
            "node.id": str(self.node_id),
            "controller.quorum.voters": ",".join(
                f"{i}@{_HOST}:{port}" for i, port in sorted(self.controllers.items())),
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
        }


class LocalBroker:
    """One Kafka broker process (KRaft, node 1, broker+controller) on 127.0.0.1.

    ``data_dir`` holds ``server.properties``, the log4j2 config, ``broker.log``
    (stdout+stderr of the current run), ``logs/server.log`` (rolling, kept
    across runs) and the Kafka data in ``kraft-data/``. A temporary
    ``data_dir`` (the default) is deleted by ``__exit__`` and at interpreter
    exit; a given one is kept. ``port`` is the client (PLAINTEXT) port; free
    ones are picked when it is None, and once chosen the ports stay fixed for
    ``restart()``. ``extra_properties`` override or add server properties.

    ``users`` (name -> password, ``admin`` among them) makes a secured broker:
    one SASL_PLAINTEXT listener with SCRAM-SHA-512, the users created when the
    storage is formatted (a data dir keeps its first users), ``admin`` the only
    super user, and the StandardAuthorizer denying whatever no ACL allows
    (``streams.ops.acl`` grants the ledger's). The broker's own links log in as
    ``admin`` (SCRAM between brokers, PLAIN to the controller). Passwords may
    use letters, digits and ``._~+-`` only.

    ``tls`` puts the listener behind TLS: SASL_SSL with ``users``, else SSL, which
    also asks every client for a certificate (mutual TLS: the principal is the
    certificate's subject). A test CA, the broker's certificate (for 127.0.0.1 and
    localhost) and a client certificate signed by it are made with ``openssl`` in
    ``data_dir/tls`` (``ca_path``, ``client_cert_path``, ``client_key_path``).
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        extra_properties: dict[str, str] | None = None,
        users: Mapping[str, str] | None = None,
        quorum: Quorum | None = None,
        tls: bool = False,
    ) -> None:
        self._quorum = quorum
        self._tls = tls
        if users is not None:
            if "admin" not in users:
                raise BrokerError("a secured broker needs an `admin` user")
            for name, password in users.items():
                if not (_USER_NAME.fullmatch(name) and _PASSWORD.fullmatch(password)):
                    raise BrokerError(f"user {name!r}: name or password has characters the "
                                      "broker configuration cannot quote")
        self._users = dict(users) if users is not None else None
        self._owns_data_dir = data_dir is None
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="ledger-kafka-"))
        self._data_dir = Path(data_dir).expanduser().resolve()
        self._requested_port = port
        self._extra_properties = dict(extra_properties or {})
        self._port: int | None = None
        self._controller_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- paths and addresses

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """stdout+stderr of the current (or last) broker run."""
        return self._data_dir / "broker.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the broker has no port yet; call start() first")
        return self._port

    @property
    def controller_port(self) -> int:
        if self._controller_port is None:
            raise BrokerError("the broker has no port yet; call start() first")
        return self._controller_port

    @property
    def bootstrap_servers(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def secured(self) -> bool:
        return self._users is not None

    @property
    def security_protocol(self) -> str:
        return ("SASL_" if self.secured else "") + ("SSL" if self._tls else "PLAINTEXT")

    @property
    def tls_dir(self) -> Path:
        return self._data_dir / "tls"

    @property
    def ca_path(self) -> Path:
        """The CA that signed the broker's and the client's certificates (PEM)."""
        return self.tls_dir / "ca.pem"

    @property
    def client_cert_path(self) -> Path:
        return self.tls_dir / "client.pem"

    @property
    def client_key_path(self) -> Path:
        return self.tls_dir / "client.key"

    def client_config(self, user: str = "admin") -> dict[str, str]:
        """confluent-kafka connection options, logged in as ``user`` when secured."""
        conf = {"bootstrap.servers": self.bootstrap_servers,
                "security.protocol": self.security_protocol}
        if self._users is not None:
            conf |= {"sasl.mechanism": "SCRAM-SHA-512", "sasl.username": user,
                     "sasl.password": self._users[user]}
        if self._tls:
            conf["ssl.ca.location"] = str(self.ca_path)
            if not self.secured:
                conf |= {"ssl.certificate.location": str(self.client_cert_path),
                         "ssl.key.location": str(self.client_key_path)}
        return conf

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return _file_tail(self.log_path, lines)

    # -- lifecycle

    def start(self, timeout_s: float = 90) -> None:
        """Start the broker and return once it answers metadata requests.

        Raises ``BrokerError`` (with the end of the broker log) if the process
        exits or is not ready within ``timeout_s``.
        """
        if self.is_running():
            raise BrokerError(f"broker already running (pid {self.pid})")
        deadline = time.monotonic() + timeout_s
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            # A port picked by _free_ports can be taken by someone else before
            # the JVM binds it; picking again is only fine while we choose freely.
            may_repick = self._port is None and self._requested_port is None
            started = time.monotonic()
            self.launch(deadline)
            try:
                self._wait_until_ready(deadline)
                break
            except BrokerError:
                clash = "Address already in use" in self.log_tail(400)
                if not (may_repick and clash and attempt < _PORT_ATTEMPTS):
                    raise
                log.warning("port clash on %s; retrying on new ports", self.bootstrap_servers)
                self._port = self._controller_port = None
        log.info(
            "Kafka %s up on %s in %.1f s (pid %s, data %s)",
            KAFKA_VERSION, self.bootstrap_servers, time.monotonic() - started,
            self.pid, self._data_dir,
        )  # fmt: skip

    def launch(self, deadline: float) -> None:
        """Write the configuration, format the storage (once) and start the process,
        without waiting for it (a cluster's nodes need each other to be ready)."""
        lib = ensure_jars()
        java = shutil.which("java")
        if java is None:
            raise BrokerError("`java` (17 or newer) is not on PATH")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        _brokers_to_clean_up.add(self)
        self._choose_ports()
        config = self._write_config()
        self._format_storage(java, lib, config, deadline)
        self._spawn(java, lib, config)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the broker (a clean shutdown); SIGKILL it if still alive after ``timeout_s``."""
        process = self._process
        if process is not None and process.poll() is None:
            log.info("stopping Kafka broker (pid %s)", process.pid)
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "broker pid %s ignored SIGTERM for %.0f s; killing", process.pid, timeout_s
                )
                process.kill()
                process.wait(timeout=timeout_s)
            # a JVM stopped by SIGTERM exits with 143 (128 + 15) after a clean shutdown
            if process.returncode in (0, 128 + signal.SIGTERM):
                log.info("Kafka broker stopped cleanly")
            else:
                log.warning("Kafka broker stopped (exit code %s)", process.returncode)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the broker with no clean shutdown (for chaos tests)."""
        process = self._process
        if process is not None and process.poll() is None:
            log.info("killing Kafka broker (pid %s)", process.pid)
            process.kill()
            process.wait(timeout=30)
        self._close_log()

    def restart(self, timeout_s: float = 90) -> None:
        """Stop (if running) and start again on the same ports and data dir."""
        self.stop()
        self.start(timeout_s=timeout_s)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._remove_owned_data_dir()

    # -- internals

    def _remove_owned_data_dir(self) -> None:
        _brokers_to_clean_up.discard(self)
        if self._owns_data_dir and not self.is_running():
            shutil.rmtree(self._data_dir, ignore_errors=True)

    def _choose_ports(self) -> None:
        if self._port is not None and self._controller_port is not None:
            return
        if self._quorum is not None:
            self._port = self._quorum.ports[self._quorum.node_id]
            self._controller_port = self._quorum.controllers[self._quorum.node_id]
            return
        previous = self._previous_ports()
        if previous is not None and all(port_is_free(p) for p in previous):
            # Reusing a formatted data dir: keep its ports so the bootstrap
            # address people copied and the stored controller endpoint stay valid.
            port, controller = previous
            if self._requested_port is not None and self._requested_port != port:
                port = self._requested_port
            if port != controller:
                self._port, self._controller_port = port, controller
                return
        if self._requested_port is not None:
            self._port = self._requested_port
            self._controller_port = next(p for p in _free_ports(2) if p != self._requested_port)
        else:
            self._port, self._controller_port = _free_ports(2)

    def _previous_ports(self) -> tuple[int, int] | None:
        config = self._data_dir / "server.properties"
        formatted = (self._data_dir / "kraft-data" / "meta.properties").is_file()
        if not (formatted and config.is_file()):
            return None
        listeners = _read_properties(config).get("listeners", "")
        ports: dict[str, int] = {}
        for listener in listeners.split(","):
            name, _, address = listener.partition("://")
            with contextlib.suppress(ValueError):
                ports[name.strip()] = int(address.rpartition(":")[2])
        client = next((ports[n] for n in ("PLAINTEXT", "SASL_PLAINTEXT", "SSL", "SASL_SSL")
                       if n in ports), None)
        if client is not None and "CONTROLLER" in ports:
            return client, ports["CONTROLLER"]
        return None

    def _write_config(self) -> Path:
        port, controller = self.port, self.controller_port
        log_dir = self._data_dir / "logs"
        log_dir.mkdir(exist_ok=True)
        # One listener for the clients and the brokers' own links, and the controller's
        # (on loopback, never behind TLS).
        client = self.security_protocol
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{_HOST}:{controller}",
            "listeners": f"{client}://{_HOST}:{port},CONTROLLER://{_HOST}:{controller}",
            "advertised.listeners": f"{client}://{_HOST}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": client,
            "listener.security.protocol.map":
                f"CONTROLLER:{'SASL_PLAINTEXT' if self.secured else 'PLAINTEXT'},"
                f"{client}:{client}",
            "log.dirs": str(self._data_dir / "kraft-data"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            # After a kill() the old registration blocks the new one until the
            # broker session expires (default 9 s); a shorter one keeps chaos
            # restarts quick while staying well above the heartbeat interval.
            "broker.heartbeat.interval.ms": "1000",
            "broker.session.timeout.ms": "4000",
        }
        if self._users is not None:
            props |= self._security_properties()
        if self._tls:
            props |= self._tls_properties()
        if self._quorum is not None:
            props |= self._quorum.properties()
            del props["controller.quorum.bootstrap.servers"]
        props.update(self._extra_properties)
        config = self._data_dir / "server.properties"
        _write_properties(config, props)
        (self._data_dir / "log4j2.properties").write_text(_LOG4J2_TEMPLATE.format(log_dir=log_dir))
        return config

    def _security_properties(self) -> dict[str, str]:
        assert self._users is not None
        admin = self._users["admin"]
        name = self.security_protocol.lower()  # sasl_plaintext, or sasl_ssl
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        return {
            # Clients and broker-to-broker: SCRAM, users kept in the metadata log.
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            f"listener.name.{name}.sasl.enabled.mechanisms": "SCRAM-SHA-512",
            f"listener.name.{name}.scram-sha-512.sasl.jaas.config":
                f'{scram} required username="admin" password="{admin}";',
            # Broker to controller: PLAIN with a static user, since SCRAM users only
            # exist once the metadata log (served by the controller) is read.
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config":
                f'{plain} required username="admin" password="{admin}" user_admin="{admin}";',
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:admin",
            "allow.everyone.if.no.acl.found": "false",
        }

    def _tls_properties(self) -> dict[str, str]:
        """The client listener's certificate (and its CA, for the broker's own links)."""
        make_test_certificates(self.tls_dir)
        name = self.security_protocol.lower()  # ssl, or sasl_ssl
        return {
            f"listener.name.{name}.ssl.keystore.type": "PKCS12",
            f"listener.name.{name}.ssl.keystore.location": str(self.tls_dir / "broker.p12"),
            f"listener.name.{name}.ssl.keystore.password": _TEST_KEYSTORE_PASSWORD,
            f"listener.name.{name}.ssl.truststore.type": "PEM",
            f"listener.name.{name}.ssl.truststore.location": str(self.ca_path),
            f"listener.name.{name}.ssl.client.auth": "none" if self.secured else "required",
        }

    def _java(self, java: str, lib: Path, *args: str, heap: str | None = None) -> list[str]:
        return [
            java,
            *([heap] if heap else []),
            f"-Dlog4j2.configurationFile={self._data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self._data_dir / 'logs'}",
            "-cp",
            f"{lib}/*",
            *args,
        ]

    def _format_storage(self, java: str, lib: Path, config: Path, deadline: float) -> None:
        log_dirs = _read_properties(config)["log.dirs"].split(",")
        if all((Path(d) / "meta.properties").is_file() for d in log_dirs):
            return
        cmd = self._java(
            java, lib, "kafka.tools.StorageTool", "format",
            # "=" form: a base64 id may start with "-" and read as an option
            f"--cluster-id={self._quorum.cluster_id if self._quorum else _random_cluster_id()}",
            "-c", str(config), *(() if self._quorum else ("--standalone",)),
            *(f"--add-scram=SCRAM-SHA-512=[name={name},password={password}]"
              for name, password in (self._users or {}).items()),
        )  # fmt: skip
        log.info("formatting Kafka storage in %s", ", ".join(log_dirs))
        _run(cmd, "formatting Kafka storage",
             max(1.0, min(_FORMAT_TIMEOUT_S, deadline - time.monotonic())))

    def _spawn(self, java: str, lib: Path, config: Path) -> None:
        self._close_log()
        # A fresh file per run keeps the tail about this run; logs/server.log keeps history.
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        # PDEATHSIG fires when the forking *thread* exits, so only use it from the
        # main thread; other callers rely on the atexit hook.
        preexec = (
            die_with_parent
            if can_die_with_parent() and threading.current_thread() is threading.main_thread()
            else None
        )
        self._process = subprocess.Popen(
            self._java(java, lib, "kafka.Kafka", str(config), heap=_HEAP),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._data_dir,
            # Own session: a Ctrl-C meant for Python must not kill the broker
            # before we stop it cleanly.
            start_new_session=True,
            preexec_fn=preexec,
        )  # fmt: skip

    def _wait_until_ready(self, deadline: float) -> None:
        admin = AdminClient(
            {
                **self.client_config(),
                # librdkafka reports every refused connection while the JVM boots.
                "log_level": 2,
                "socket.connection.setup.timeout.ms": 1000,
                "reconnect.backoff.ms": 100,
                "reconnect.backoff.max.ms": 200,
            }
        )
        last_error = "no answer yet"
        while True:
            process = self._process
            assert process is not None
            if process.poll() is not None:
                raise BrokerError(
                    f"Kafka broker exited with code {process.returncode} during start-up; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise BrokerError(
                    f"Kafka broker not ready on {self.bootstrap_servers} in time "
                    f"({last_error}); last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if self._tcp_accepts():
                try:
                    metadata = admin.list_topics(timeout=max(0.1, min(2.0, remaining)))
                except Exception as e:  # KafkaException while the broker registers
                    last_error = str(e)
                else:
                    if metadata.brokers and process.poll() is None:
                        return
                    last_error = "metadata lists no brokers yet"
            time.sleep(_POLL_INTERVAL_S)

    def _tcp_accepts(self) -> bool:
        try:
            with socket.create_connection((_HOST, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class LocalCluster:
    """``nodes`` brokers on 127.0.0.1, each also a controller (a static quorum of voters),
    for tests of what a deployment meets: a partition's leader dying mid-stream.

    Internal topics get replication factor 3 and ``min.insync.replicas`` 2 (with three
    nodes), as do topics created without a replication factor. ``kill(node)`` and
    ``start_node(node)`` take one node down and bring it back on its ports and data.
    """

    def __init__(self, nodes: int = 3, data_dir: Path | None = None) -> None:
        self._owns_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else \
            Path(tempfile.mkdtemp(prefix="ledger-kafka-cluster-"))
        ids = range(1, nodes + 1)
        ports = _free_ports(2 * nodes)
        client = dict(zip(ids, ports[:nodes], strict=True))
        controllers = dict(zip(ids, ports[nodes:], strict=True))
        cluster_id = _random_cluster_id()
        self.nodes = {i: LocalBroker(self.data_dir / f"node{i}",
                                     quorum=Quorum(cluster_id, i, client, controllers))
                      for i in ids}

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(node.bootstrap_servers for node in self.nodes.values())

    def start(self, timeout_s: float = 180) -> None:
        """Start every node, and return once each answers metadata requests."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes.values():
            if not node.is_running():
                node.launch(deadline)
        for node in self.nodes.values():  # a node is ready only once a quorum is up
            node._wait_until_ready(deadline)
        log.info("Kafka cluster of %d nodes up on %s", len(self.nodes), self.bootstrap_servers)

    def start_node(self, node_id: int, timeout_s: float = 90) -> None:
        node = self.nodes[node_id]
        deadline = time.monotonic() + timeout_s
        node.launch(deadline)
        node._wait_until_ready(deadline)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: no clean shutdown, no leadership handed over first."""
        self.nodes[node_id].kill()

    def leader_of(self, topic: str, partition: int) -> int:
        """The node that leads ``topic[partition]`` now (-1: none)."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 2})
        return int(admin.list_topics(topic, timeout=10).topics[topic].partitions[partition].leader)

    def stop(self) -> None:
        """Kill every node (the last ones of a quorum cannot shut down cleanly: they wait
        for the controllers that are gone); the data of a temporary cluster goes too."""
        for node in self.nodes.values():
            node.kill()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------- foreground


def default_data_dir(secured: bool = False, tls: bool = False) -> Path:
    """Data dir of ``run_foreground``: ``$LEDGER_KAFKA_DATA`` or ``~/.local/share/ledger/kafka``
    (``kafka-secure`` for a secured broker, ``-tls`` after either behind TLS)."""
    override = os.environ.get("LEDGER_KAFKA_DATA")
    if override:
        return Path(override).expanduser()
    name = ("kafka-secure" if secured else "kafka") + ("-tls" if tls else "")
    return Path.home() / ".local" / "share" / "ledger" / name


SECURE_USERS = ("admin", "worker", "client")


def users_from_env() -> dict[str, str]:
    """Passwords of a secured broker's users, from ``LEDGER_KAFKA_<USER>_PASSWORD``."""
    names = {user: f"LEDGER_KAFKA_{user.upper()}_PASSWORD" for user in SECURE_USERS}
    missing = [var for var in names.values() if not os.environ.get(var)]
    if missing:
        raise BrokerError(f"a secured broker needs {', '.join(missing)} set")
    return {user: os.environ[var] for user, var in names.items()}


def broker_for_job(stack: ExitStack, data_dir: Path,
                   say: Callable[[str], None]) -> tuple[str, int | None]:
    """``LEDGER_BOOTSTRAP_SERVERS`` if set, else a local broker that ``stack`` stops:
    (bootstrap servers, the local broker's pid or None)."""
    external = os.environ.get("LEDGER_BOOTSTRAP_SERVERS")
    if external:
        return external, None
    say("fetching the Apache Kafka jars (first run only) and starting a local broker")
    ensure_jars()
    broker = stack.enter_context(LocalBroker(data_dir=data_dir))
    return broker.bootstrap_servers, broker.pid


def run_foreground(port: int | None, users: Mapping[str, str] | None = None,
                   tls: bool = False) -> None:
    """Run a broker on the persistent data dir until Ctrl-C or SIGTERM, then stop it cleanly.

    Prints ``LEDGER_BOOTSTRAP_SERVERS=127.0.0.1:<port>`` once the broker is
    ready. With ``port=None`` the ports of the previous run are reused if free.
    With ``users`` the broker is secured (see ``LocalBroker``); its data dir
    keeps the users it was first started with. With ``tls`` its listener is behind
    TLS (see ``LocalBroker``), and the settings a client needs are printed too.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    # While starting, either signal interrupts the wait (KeyboardInterrupt);
    # once up, they only ask the loop below to stop.
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    broker = LocalBroker(data_dir=default_data_dir(users is not None, tls), port=port,
                         users=users, tls=tls)
    try:
        try:
            broker.start()
        except KeyboardInterrupt:
            log.info("interrupted during start-up")
            return
        for sig in signals:
            signal.signal(sig, request_stop)
        print(f"LEDGER_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        if broker.security_protocol != "PLAINTEXT":
            print(f"LEDGER_SECURITY_PROTOCOL={broker.security_protocol}", flush=True)
        if tls:
            print(f"LEDGER_SSL_CA_LOCATION={broker.ca_path}", flush=True)
        if tls and not broker.secured:
            print(f"LEDGER_SSL_CERTIFICATE_LOCATION={broker.client_cert_path}\n"
                  f"LEDGER_SSL_KEY_LOCATION={broker.client_key_path}", flush=True)
        while not stop_requested.wait(timeout=1.0):
            if not broker.is_running():
                raise BrokerError(
                    f"Kafka broker exited unexpectedly; last lines of {broker.log_path}:\n"
                    f"{broker.log_tail()}"
                )
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
