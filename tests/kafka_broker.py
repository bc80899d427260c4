"""Apache Kafka itself, for the Kafka test tier: fetched from Maven Central, single-node KRaft, loopback.

``KafkaBroker`` fetches ``org.apache.kafka:kafka_2.13`` and its runtime dependencies with Maven into a
cache (``~/.cache/gpu-worker/kafka-<version>``, or ``$WORKER_KAFKA_CACHE``; a second run asks nothing of
the network), makes a CA and certificates with the ``openssl`` CLI, formats storage with SCRAM users, and
starts one combined broker+controller on free loopback ports:

=========  ================  ==========================================================
listener   protocol          for
=========  ================  ==========================================================
PLAINTEXT  PLAINTEXT         every integration test of the tier (``bootstrap``)
SASL_SSL   SASL_SSL          SCRAM-SHA-512 and PLAIN users (``sasl_ssl``), server TLS
SSL        SSL               server authentication only (``ssl``)
MTLS       SSL               client certificate required (``mtls``)
CONTROLLER PLAINTEXT         KRaft controller (internal)
=========  ================  ==========================================================

``python -m tests.kafka_broker`` starts it, prints the version and the listeners, and stops it: the CI
script's check that the tier can run at all (a failing fetch is loud there, not a hundred errors).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

from worker.broker import BrokerProcess

KAFKA_VERSION = os.environ.get("WORKER_KAFKA_VERSION", "4.4.0")
# The SLF4J 1.7 binding to Log4j 2 that Kafka's own distribution ships (kafka_2.13 leaves it out).
LOG4J_VERSION = "2.25.5"

USERS = {"alice": "alice-secret"}  # SCRAM-SHA-512 and PLAIN, on the SASL_SSL listener

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.gpuworker</groupId><artifactId>kafka-broker-fetch</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def _both_brokers():
    import pytest

    return pytest.mark.parametrize("broker", [pytest.param("tansu"), pytest.param("kafka", marks=pytest.mark.kafka)],
                                   indirect=True)


# Decorate a test (or set as a module's ``pytestmark``) whose ``broker`` should be tansu and Apache Kafka.
both_brokers = _both_brokers()


def distinct_free_ports(n: int) -> list[int]:
    """``n`` free loopback ports, all bound at once while they are picked: one at a time, the system can
    hand out the same port twice, and the broker then refuses two listeners on one port."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tools_missing() -> str | None:
    """Why the Kafka tier cannot run here, or None when java and mvn are on PATH."""
    missing = [tool for tool in ("java", "mvn", "openssl") if shutil.which(tool) is None]
    return f"Kafka tier: no {'/'.join(missing)} on PATH" if missing else None


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    root = os.environ.get("WORKER_KAFKA_CACHE") or os.path.expanduser("~/.cache/gpu-worker")
    return Path(root) / f"kafka-{version}"


def fetch(version: str = KAFKA_VERSION) -> Path:
    """The folder of Kafka's jars, fetched with Maven once; raises with Maven's output when it fails."""
    home = cache_dir(version)
    libs = home / "libs"
    done = home / "complete"
    if done.exists():
        return libs
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION))
    if libs.exists():
        shutil.rmtree(libs)
    cmd = ["mvn", "-q", "-B", "-f", str(home / "pom.xml"), "dependency:copy-dependencies",
           f"-DoutputDirectory={libs}", "-DincludeScope=runtime"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if run.returncode != 0 or not (libs / f"kafka_2.13-{version}.jar").exists():
        tail = (run.stdout + run.stderr)[-3000:]
        raise RuntimeError(f"Kafka tier: Maven could not fetch org.apache.kafka:kafka_2.13:{version} "
                           f"(exit {run.returncode}): {' '.join(cmd)}\n{tail}")
    done.write_text(version)
    return libs


def kafka_version(libs: Path) -> str:
    """'4.4.0 (commit abc...)', as the broker logs it at start-up."""
    jar = next(libs.glob("kafka-clients-*.jar"))  # AppInfoParser reads the same file at start-up
    with zipfile.ZipFile(jar) as z:
        props = dict(line.split("=", 1) for line in z.read("kafka/kafka-version.properties").decode().splitlines()
                     if "=" in line and not line.startswith("#"))
    return f"{props.get('version', '?')} (commit {props.get('commitId', '?')})"


def _openssl(*args: str, cwd: Path) -> None:
    run = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {run.stderr[-2000:]}")


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all PEM (EC P-256)."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3",
             "-subj", "/CN=gpu-worker test CA", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                       "extendedKeyUsage=serverAuth\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "gpu-worker-client")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "3", "-extfile", f"{name}.ext", cwd=folder)
    # Kafka's PEM key store: the private key (unencrypted PKCS#8) followed by the certificate chain.
    keystore = folder / "server-keystore.pem"
    keystore.write_text((folder / "server.key").read_text() + (folder / "server.pem").read_text()
                        + (folder / "ca.pem").read_text())
    return {"ca": folder / "ca.pem", "server_keystore": keystore,
            "client_cert": folder / "client.pem", "client_key": folder / "client.key",
            "ca_key": folder / "ca.key"}


def _cluster_id() -> str:
    """A random KRaft cluster id, never starting with "-": the storage tool would read one that does as an
    option (CI: "argument --cluster-id/-t: expected one argument", 1 start in 64); Kafka's own
    Uuid.randomUuid() skips those too."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaBroker(BrokerProcess):
    """Start with ``start()`` or as a context manager; ``bootstrap`` is the PLAINTEXT listener."""

    def __init__(self, version: str = KAFKA_VERSION, tls: bool = True, initial_rebalance_delay_ms: int = 0) -> None:
        """``tls=False``: the PLAINTEXT listener alone, no certificates (no ``openssl`` needed): the bench's
        ``--broker kafka`` on a machine that has Java but perhaps no openssl CLI (the GPU machines).
        ``initial_rebalance_delay_ms``: how long the coordinator waits for more members after a new group's first
        join (Kafka's ``group.initial.rebalance.delay.ms``). 0 here (a test's lone consumer joins at once); Kafka's
        own default is 3000, what a real cluster runs and what the bench asks for: with 0, the first of a pod's
        intakes gets a generation of its own and every later one forces a rebalance (run 27's K sweeps)."""
        self.version_wanted = version
        self.version = ""
        self.tls = tls
        self.initial_rebalance_delay_ms = initial_rebalance_delay_ms
        self.home = Path(tempfile.mkdtemp(prefix="kafka-"))
        self.log_file = self.home / "logs" / "server.log"
        names = ("PLAINTEXT", "SASL_SSL", "SSL", "MTLS", "CONTROLLER") if tls else ("PLAINTEXT", "CONTROLLER")
        self.ports = dict(zip(names, distinct_free_ports(len(names))))
        self.bootstrap = f"127.0.0.1:{self.ports['PLAINTEXT']}"
        at = {n: f"127.0.0.1:{port}" for n, port in self.ports.items()}
        self.sasl_ssl, self.ssl, self.mtls = at.get("SASL_SSL", ""), at.get("SSL", ""), at.get("MTLS", "")
        self.users = dict(USERS)
        self.certs: dict[str, Path] = {}
        self._proc: subprocess.Popen | None = None
        self._libs: Path | None = None

    def _properties(self) -> str:
        p = self.ports
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{p['CONTROLLER']}",
            "listeners": ",".join(f"{n}://127.0.0.1:{port}" for n, port in p.items()),
            "advertised.listeners": ",".join(f"{n}://127.0.0.1:{port}" for n, port in p.items()
                                             if n != "CONTROLLER"),
            "listener.security.protocol.map": ("PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL,MTLS:SSL,"
                                               "CONTROLLER:PLAINTEXT") if self.tls else
                                              "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.home / "data"),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": str(self.initial_rebalance_delay_ms),
            "log.flush.interval.messages": "100000000",
        }
        if self.tls:
            lines |= self._tls_properties()
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def _tls_properties(self) -> dict[str, str]:
        ca, keystore = self.certs["ca"], self.certs["server_keystore"]
        plain_users = " ".join(f'user_{u}="{pw}"' for u, pw in self.users.items())
        return {
            # TLS: the same server key store on every TLS listener; MTLS demands a client certificate.
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(ca),
            "ssl.client.auth": "none",
            "listener.name.mtls.ssl.client.auth": "required",
            # SASL on the SASL_SSL listener: SCRAM users were written at format time; PLAIN users here.
            "sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_ssl.plain.sasl.jaas.config":
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};",
        }

    def _java(self, main: str, *args: str, **popen: object):
        assert self._libs is not None
        log_dir = self.home / "logs"
        # A one-shot tool starts faster on the client compiler alone.
        quick = ["-XX:TieredStopAtLevel=1"] if main != "kafka.Kafka" else []
        cmd = ["java", "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", *quick,
               "-Djava.awt.headless=true", f"-Dkafka.logs.dir={log_dir}",
               f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
               "-cp", f"{self._libs}/*", main, *args]
        return cmd

    def start(self, timeout: float = 120.0) -> KafkaBroker:
        self._libs = fetch(self.version_wanted)
        self.version = kafka_version(self._libs)
        self.certs = make_certificates(self.home / "certs") if self.tls else {}
        (self.home / "logs").mkdir(exist_ok=True)
        (self.home / "log4j2.properties").write_text(_LOG4J2)
        props = self.home / "server.properties"
        props.write_text(self._properties())
        scram = [a for u, pw in self.users.items()
                 for a in ("--add-scram", f"SCRAM-SHA-512=[name={u},password={pw}]")]
        fmt = subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props),
                                        *scram), capture_output=True, text=True, timeout=120)
        if fmt.returncode != 0:
            raise RuntimeError(f"Kafka StorageTool format failed ({fmt.returncode}): {fmt.stdout}{fmt.stderr}")
        out = open(self.home / "logs" / "stdout.log", "wb")
        self._proc = subprocess.Popen(self._java("kafka.Kafka", str(props)), stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"Kafka exited with {self._proc.returncode} while starting; "
                                       f"logs: {self.home / 'logs'}\n{self.log_tail()}")
                if self._answers_metadata():
                    return self
                time.sleep(0.3)
            raise RuntimeError(f"Kafka did not answer metadata on {self.bootstrap} within {timeout}s; "
                               f"logs: {self.home / 'logs'}\n{self.log_tail()}")
        except BaseException:
            self.stop()  # its own session: it would outlive us (seen: a probe that raised left it running)
            raise

    def _answers_metadata(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.ports["PLAINTEXT"]), timeout=0.3).close()
        except OSError:
            return False

        async def probe() -> bool:
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
            try:
                await admin.start()
                await admin.list_topics()
                return True
            except Exception:
                return False
            finally:
                await admin.close()

        return asyncio.run(probe())

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for f in (self.home / "logs" / "stdout.log", self.log_file):
            if f.exists():
                parts.append(f"--- {f}\n{f.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL after 30 s; the data folder goes with it."""
        self._terminate(30)
        shutil.rmtree(self.home / "data", ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    why = tools_missing()
    if why:
        print(f"{why}: the Kafka tier will be skipped")
        raise SystemExit(0)
    t0 = time.monotonic()
    with KafkaBroker() as k:
        print(f"Apache Kafka {k.version} (KRaft, single node) listening on {k.bootstrap} "
              f"(SASL_SSL {k.sasl_ssl}, SSL {k.ssl}, mTLS {k.mtls}); started in {time.monotonic() - t0:.1f}s")
