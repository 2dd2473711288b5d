"""A real Apache Kafka broker (KRaft, one combined node) assembled from Maven Central.

Used by the test suite (one broker per session), by ``make run`` and by the benchmarks. The broker's
jars are resolved once with Maven into a cache directory and reused; each start gets free ports and
a fresh data directory, so runs never see each other's topics.

    python scripts/kafka_broker.py fetch          # resolve the jars (cached)
    python scripts/kafka_broker.py run     # start, print the bootstrap address, wait for Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
POM_DIR = HERE / "kafka"
CACHE_DIR = Path(os.environ.get("PURGE_WORKER_CACHE", Path.home() / ".cache" / "purge-worker"))
LIBS_DIR = CACHE_DIR / "kafka-4.1.1" / "libs"
HEAP = os.environ.get("KAFKA_HEAP", "-Xmx512m")
START_TIMEOUT_S = 90.0


class BrokerError(RuntimeError):
    """The broker could not be fetched or started; the message carries the reason or its log."""


def fetch() -> Path:
    """Resolve the broker's runtime classpath into the cache; a no-op when already there."""
    marker = LIBS_DIR / ".complete"
    if marker.exists():
        return LIBS_DIR
    LIBS_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [
        "mvn",
        "-q",
        "-B",
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={LIBS_DIR}",
    ]
    proc = subprocess.run(cmd, cwd=POM_DIR, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BrokerError(f"mvn failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    marker.write_text("ok\n")
    return LIBS_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    return str(Path(home) / "bin" / "java") if home else "java"


class Broker:
    """One KRaft node on loopback. ``start()`` blocks until it answers; ``stop()`` is idempotent."""

    def __init__(self, port: int | None = None) -> None:
        # Ports asked for one after the other can repeat (each socket is closed before the next
        # is bound), and the broker then refuses to start: ask until they differ.
        ports: list[int] = [port] if port else []
        while len(ports) < 1 + len(self.extra_listeners()) + 1:
            candidate = free_port()
            if candidate not in ports:
                ports.append(candidate)
        self.port, self.controller_port = ports[0], ports[-1]
        self.ports = dict(zip(self.extra_listeners(), ports[1:-1], strict=True))
        self.workdir = Path(tempfile.mkdtemp(prefix="purge-worker-kafka-"))
        self.log_path = self.workdir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def extra_listeners(self) -> dict[str, str]:
        """Listeners besides PLAINTEXT and CONTROLLER: name -> security protocol."""
        return {}

    def extra_properties(self) -> str:
        """Broker properties besides the listeners (a secured broker adds its own)."""
        return ""

    def advertised_ports(self) -> dict[str, int]:
        """Listeners announced to clients at another port than their own."""
        return {}

    def format_arguments(self) -> list[str]:
        """Arguments for formatting the storage besides the config (SCRAM users, say)."""
        return []

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        data = self.workdir / "data"
        names = {"PLAINTEXT": ("PLAINTEXT", self.port)}
        names |= {n: (proto, self.ports[n]) for n, proto in self.extra_listeners().items()}
        names["CONTROLLER"] = ("PLAINTEXT", self.controller_port)
        listeners = ",".join(f"{n}://127.0.0.1:{port}" for n, (_, port) in names.items())
        # A listener may be announced at another port (a proxy in front of it).
        advertised = ",".join(
            f"{n}://127.0.0.1:{self.advertised_ports().get(n, port)}"
            for n, (_, port) in names.items()
        )
        protocols = ",".join(f"{n}:{proto}" for n, (proto, _) in names.items())
        props = f"""process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}
listeners={listeners}
advertised.listeners={advertised}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map={protocols}
log.dirs={data}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.flush.interval.messages=9223372036854775807
""" + self.extra_properties()
        path = self.workdir / "server.properties"
        path.write_text(props)
        log4j = self.workdir / "log4j2.properties"
        log4j.write_text(
            "rootLogger.level=WARN\nrootLogger.appenderRef.f.ref=F\n"
            "appender.f.type=Console\nappender.f.name=F\n"
            "appender.f.layout.type=PatternLayout\nappender.f.layout.pattern=[%d] %p %m (%c)%n\n"
            "logger.kafka.name=kafka\nlogger.kafka.level=INFO\n"
            # Every operation the authorizer denies, for the security tests to count.
            "logger.authorizer.name=kafka.authorizer.logger\nlogger.authorizer.level=INFO\n"
        )
        return path

    def start(self) -> Broker:
        libs = fetch()
        config = self._write_config()
        cp = f"{libs}/*"
        cluster_id = str(uuid.uuid4())
        # StorageTool wants a base64 UUID; the Java tool generates one in the right shape.
        gen = subprocess.run(
            [_java(), "-cp", cp, "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True,
            text=True,
            check=False,
        )
        cluster_id = gen.stdout.strip() or cluster_id
        fmt = subprocess.run(
            [
                _java(),
                "-cp",
                cp,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                cluster_id,
                "-c",
                str(config),
                *self.format_arguments(),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"kafka storage format failed:\n{fmt.stdout}\n{fmt.stderr}")
        self._spawn("wb")
        try:
            self._wait_ready()
        except BrokerError:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"broker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._answers_metadata():
                return
            time.sleep(0.3)
        raise BrokerError(
            f"broker did not answer within {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
        )

    def _answers_metadata(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        # A listening socket is not yet a ready broker: ask for metadata through a real client.
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=3000
            )
        except (KafkaError, OSError, ValueError):
            return False
        try:
            admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """Stop the broker abruptly (failure tests); the data dir stays for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """Start again on the same ports and data (after ``stop`` or ``kill``)."""
        self._spawn("ab")
        self._wait_ready()

    def _spawn(self, log_mode: str) -> None:
        cmd = [
            _java(),
            HEAP,
            # A test broker: small heap, quick start, no parallel GC threads fighting the tests.
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{fetch()}/*",
            "kafka.Kafka",
            str(self.workdir / "server.properties"),
        ]
        # The child keeps its own descriptor; ours is closed as soon as it has started.
        with self.log_path.open(log_mode) as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch", "run"])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--ready-file", help="write the bootstrap address here once ready")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch())
            return 0
        broker = Broker(port=args.port).start()
    except BrokerError as exc:
        print(f"kafka broker: {exc}", file=sys.stderr)
        return 1
    print(f"kafka broker ready at {broker.bootstrap} (log: {broker.log_path})", flush=True)
    if args.ready_file:
        Path(args.ready_file).write_text(broker.bootstrap)

    def _stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while broker.proc is not None and broker.proc.poll() is None:
            time.sleep(0.5)
        print(f"kafka broker exited:\n{broker.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.cleanup()


if __name__ == "__main__":
    sys.exit(main())
