"""The three services of the local stack: how each is installed, configured, started and probed.

Kafka (KRaft, broker and controller in one process), Apicurio Registry (Confluent-compatible API
under /apis/ccompat/v7, schemas kept in an H2 file database) and MinIO. Each service knows its
ports, its command line and a real health check; none of them starts or stops anything itself:
that is lifecycle.py's job.
"""

from __future__ import annotations

import base64
import logging
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from infra.errors import StackError
from infra.settings import StackSettings, StorageSettings
from infra.stack import install
from infra.stack.install import Java, Progress

KAFKA_MIN_JAVA = 17
REGISTRY_MIN_JAVA = 21
MESSAGE_MAX_BYTES = 8 * 1024 * 1024  # KafkaSettings.max_message_bytes

_quiet = logging.getLogger("nextstate.stack.kafka-probe")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class Port:
    port: int
    role: str


class Service(ABC):
    """One program of the stack, with its own directory under the state dir."""

    name: str

    def __init__(self, stack: StackSettings) -> None:
        self.stack = stack
        self.home = stack.state_dir / self.name

    @property
    def log_path(self) -> Path:
        return self.stack.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    @abstractmethod
    def version(self) -> str: ...

    @property
    @abstractmethod
    def ports(self) -> list[Port]: ...

    @property
    @abstractmethod
    def address(self) -> str: ...

    @abstractmethod
    def install(self, progress: Progress) -> None:
        """Make sure the program is in the cache (slow only the first time on a machine)."""

    @abstractmethod
    def prepare(self) -> list[str]:
        """Write config files and initialise data; return the command line to start it with."""

    def env(self) -> dict[str, str]:
        return {}

    @abstractmethod
    def healthy(self, timeout_s: float = 5.0) -> bool:
        """True if the service answers a real request (not just a TCP connect)."""


def _http_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _jvm_flags(java: Java) -> list[str]:
    flags = ["-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]
    if java.version >= 24:
        # Kafka's compression libraries and Netty still use these; on new JDKs they would
        # otherwise print a warning per library at every start.
        flags += ["--sun-misc-unsafe-memory-access=allow", "--enable-native-access=ALL-UNNAMED"]
    return flags


class Kafka(Service):
    name = "kafka"

    @property
    def version(self) -> str:
        return self.stack.kafka_version

    @property
    def ports(self) -> list[Port]:
        return [Port(self.stack.kafka_port, "broker"), Port(self.stack.controller_port, "controller")]

    @property
    def address(self) -> str:
        return f"{self.stack.host}:{self.stack.kafka_port}"

    def install(self, progress: Progress) -> None:
        install.kafka_libs(self.stack.cache_dir, self.version, progress)

    def _server_properties(self) -> str:
        host, broker, controller = self.stack.host, self.stack.kafka_port, self.stack.controller_port
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{host}:{controller}",
            "listeners": f"PLAINTEXT://{host}:{broker},CONTROLLER://{host}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{host}:{broker}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.home / "data"),
            "num.partitions": "1",
            # One node: every internal topic has exactly one replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Topics are provisioned explicitly (infra/provision.py), never by a typo.
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(MESSAGE_MAX_BYTES),
            "replica.fetch.max.bytes": str(MESSAGE_MAX_BYTES),
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def _log4j2(self) -> str:
        return "\n".join(
            [
                "status = warn",
                "appender.out.type = Console",
                "appender.out.name = OUT",
                "appender.out.layout.type = PatternLayout",
                "appender.out.layout.pattern = [%d] %p %m (%c)%n",
                "rootLogger.level = INFO",
                "rootLogger.appenderRef.out.ref = OUT",
                # The per-request and per-partition chatter drowns what matters in a dev log.
                "logger.state.name = state.change.logger",
                "logger.state.level = WARN",
                "logger.request.name = kafka.request.logger",
                "logger.request.level = WARN",
                "logger.cleaner.name = kafka.log.LogCleaner",
                "logger.cleaner.level = WARN",
                # Each client and server config is otherwise dumped in full, hundreds of lines.
                "logger.config.name = org.apache.kafka.common.config.AbstractConfig",
                "logger.config.level = WARN",
                "",
            ]
        )

    def prepare(self) -> list[str]:
        java = install.find_java(KAFKA_MIN_JAVA, self.stack.java_home, f"Kafka {self.version}")
        libs = install.kafka_libs(self.stack.cache_dir, self.version, lambda _: None)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "server.properties").write_text(self._server_properties())
        (self.home / "log4j2.properties").write_text(self._log4j2())
        base = [
            str(java.executable), *_jvm_flags(java),
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            # Kafka logs its own orderly shutdown; log4j's hook would stop logging halfway.
            "-Dlog4j2.shutdownHookEnabled=false",
            f"-Dkafka.logs.dir={self.stack.state_dir / 'logs'}",
            "-cp", f"{libs}/*",
        ]
        if not (self.home / "data" / "meta.properties").exists():
            self._format(base)
        return [*base, *self.stack.kafka_heap.split(), "kafka.Kafka", str(self.home / "server.properties")]

    def _format(self, base: list[str]) -> None:
        cluster_file = self.home / "cluster.id"
        if not cluster_file.exists():
            # Kafka's cluster ids are 16 random bytes in URL-safe base64 without padding.
            cluster_file.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))
        cluster_id = cluster_file.read_text().strip()
        cmd = [
            *base, "-Xmx256m", "kafka.tools.StorageTool", "format",
            "-t", cluster_id, "-c", str(self.home / "server.properties"), "--standalone",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
            raise StackError(f"formatting Kafka storage in {self.home / 'data'} failed:\n" + "\n".join(tail))

    def healthy(self, timeout_s: float = 5.0) -> bool:
        # Cheap pre-check, so that a broker that is not up yet costs no client setup or log noise.
        try:
            socket.create_connection((self.stack.host, self.stack.kafka_port), timeout=timeout_s).close()
        except OSError:
            return False
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.address, "logger": _quiet})
        try:
            metadata = admin.list_topics(timeout=timeout_s)
        except Exception:  # KafkaException on timeout, anything else means not ready either
            return False
        return bool(metadata.brokers) and metadata.controller_id >= 0


class Registry(Service):
    name = "registry"

    @property
    def version(self) -> str:
        return self.stack.apicurio_version

    @property
    def ports(self) -> list[Port]:
        return [Port(self.stack.registry_port, "http"), Port(self.stack.registry_management_port, "management")]

    @property
    def address(self) -> str:
        return f"http://{self.stack.host}:{self.stack.registry_port}/apis/ccompat/v7"

    def install(self, progress: Progress) -> None:
        install.apicurio_app(self.stack.cache_dir, self.version, progress)

    def prepare(self) -> list[str]:
        java = install.find_java(REGISTRY_MIN_JAVA, self.stack.java_home, f"Apicurio Registry {self.version}")
        app = install.apicurio_app(self.stack.cache_dir, self.version, lambda _: None)
        (self.home / "db").mkdir(parents=True, exist_ok=True)
        host = self.stack.host
        props = {
            "quarkus.http.host": host,
            "quarkus.http.port": self.stack.registry_port,
            # Apicurio's management port (health, metrics) defaults to 9000, MinIO's port.
            "quarkus.management.host": host,
            "quarkus.management.port": self.stack.registry_management_port,
            # Schemas survive restarts: an H2 file database in the state dir, not in memory.
            "apicurio.datasource.url": f"jdbc:h2:file:{self.home / 'db' / 'registry'}",
            "apicurio.datasource.jdbc.initial-size": 2,
            "apicurio.datasource.jdbc.min-size": 2,
            "apicurio.datasource.jdbc.max-size": 20,
            # Confluent's registry checks BACKWARD compatibility unless told otherwise; Apicurio's
            # default is no rule at all, so a subject without its own config would accept anything.
            "apicurio.rules.global.compatibility": "BACKWARD",
            # Let tests and replays delete the subjects they made (Apicurio forbids it by default).
            "apicurio.rest.deletion.artifact.enabled": "true",
            "apicurio.rest.deletion.artifact-version.enabled": "true",
            "apicurio.rest.deletion.group.enabled": "true",
            # Every health probe would otherwise be an access-log line.
            "quarkus.http.access-log.enabled": "false",
            "quarkus.log.console.format": "%d{yyyy-MM-dd HH:mm:ss,SSS} %-5p [%c{3.}] (%t) %s%e%n",
        }
        return [
            str(java.executable), *_jvm_flags(java), *self.stack.registry_heap.split(),
            *(f"-D{key}={value}" for key, value in props.items()),
            "-jar", str(app / "quarkus-run.jar"),
        ]

    def healthy(self, timeout_s: float = 5.0) -> bool:
        base = f"http://{self.stack.host}"
        return _http_ok(f"{self.address}/subjects", timeout_s) and _http_ok(
            f"{base}:{self.stack.registry_management_port}/health/ready", timeout_s
        )


class Minio(Service):
    name = "minio"

    def __init__(self, stack: StackSettings, storage: StorageSettings) -> None:
        super().__init__(stack)
        self.storage = storage

    @property
    def version(self) -> str:
        return self.stack.minio_release

    @property
    def ports(self) -> list[Port]:
        return [Port(self.stack.minio_port, "s3"), Port(self.stack.minio_console_port, "console")]

    @property
    def address(self) -> str:
        return f"http://{self.stack.host}:{self.stack.minio_port}"

    def install(self, progress: Progress) -> None:
        install.minio_binary(self.stack.cache_dir, self.version, progress)

    def prepare(self) -> list[str]:
        binary = install.minio_binary(self.stack.cache_dir, self.version, lambda _: None)
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        host = self.stack.host
        return [
            str(binary), "server", str(self.home / "data"),
            "--address", f"{host}:{self.stack.minio_port}",
            "--console-address", f"{host}:{self.stack.minio_console_port}",
        ]

    def env(self) -> dict[str, str]:
        user = self.storage.access_key
        secret = self.storage.secret_key.get_secret_value() if self.storage.secret_key else None
        if not user or len(user) < 3 or not secret or len(secret) < 8:
            raise StackError(
                "MinIO needs storage.access_key (3+ characters) and storage.secret_key (8+ characters); "
                f"got an access key of {len(user or '')} and a secret of {len(secret or '')} characters"
            )
        return {
            "MINIO_ROOT_USER": user,
            "MINIO_ROOT_PASSWORD": secret,
            "MINIO_UPDATE": "off",
        }

    def healthy(self, timeout_s: float = 5.0) -> bool:
        return _http_ok(f"{self.address}/minio/health/live", timeout_s) and _http_ok(
            f"{self.address}/minio/health/ready", timeout_s
        )


def all_services(stack: StackSettings, storage: StorageSettings) -> list[Service]:
    return [Kafka(stack), Registry(stack), Minio(stack, storage)]
