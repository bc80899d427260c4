"""Real worker processes for fault-injection tests: start, probe, signal, read their logs and topics.

A worker here is ``python -m worker run`` in a subprocess, configured by ``WORKER_*`` variables, with its
JSON log in a file; ``python -m tests.procs`` runs the same worker with a wrapped engine that raises a
``DeviceError`` on a marker image (the fatal-error test); ``python -m tests.procs stuck-on-stop``, with
intakes whose shutdown never ends. Topic readers and a paced producer talk to the
real broker with aiokafka, like the tests' other helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker.broker import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def worker_env(bootstrap: str, topics: dict[str, str], **settings: object) -> dict[str, str]:
    """Environment of a test worker: the test's topics and group, CPU inference, JSON logs, a free HTTP
    port; ``settings`` are more WORKER_* values by field name (``max_in_flight=64``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") or k == "WORKER_MODEL_CACHE"}
    base = {"bootstrap_servers": bootstrap, "input_topic": topics["input"], "output_topic": topics["output"],
            "dlq_topic": topics["dlq"], "group_id": topics["group"], "device": "cpu", "decode_workers": 2,
            "session_timeout_ms": 6000,  # tansu holds a join for about half of it
            "commit_interval_ms": 200, "log_format": "json", "log_level": "info", "http_port": 0}
    base.update(settings)
    for name, value in base.items():
        env[f"WORKER_{name.upper()}"] = str(value)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.fixture(autouse=True)
def no_leftover_workers(monkeypatch):
    """Whatever a test leaves running (it failed half-way) is killed at teardown. Autouse where imported."""
    started: list[WorkerProc] = []
    real_start = WorkerProc.start

    def start(self):
        started.append(self)
        return real_start(self)

    monkeypatch.setattr(WorkerProc, "start", start)
    yield
    for proc in started:
        if proc.alive():
            proc.kill()


class WorkerProc:
    """One worker process. ``args`` default to the real CLI; the HTTP port is chosen here."""

    def __init__(self, env: dict[str, str], log_path: Path, args: Sequence[str] = ("-m", "worker", "run"),
                 name: str = "worker", prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command the interpreter runs under, which must exec it (``unshare ... sh -c 'exec
        "$0" "$@"'``) so that ``pid`` stays the worker's."""
        self.name = name
        self.prefix = list(prefix)
        self.port = free_port()
        self.env = dict(env, WORKER_HTTP_PORT=str(self.port))
        self.log_path = log_path
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> WorkerProc:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([*self.prefix, PYTHON, *self.args], env=self.env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.alive():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for the exit; a process still running then is killed and the test fails on it."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Where it is stuck: every process logs its threads' and tasks' stacks on SIGUSR1 (worker.stacks)
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                os.kill(self.proc.pid, signal.SIGUSR1)
                time.sleep(3)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} (pid {self.proc.pid}) did not exit within {timeout}s; "
                                 f"log: {self.log_path}; its tail, with the stack dumps:\n"
                                 f"{self.log_tail(60)}") from None
        finally:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            self.wait(10)

    # --- probes -------------------------------------------------------------------------------
    def probe(self, path: str = "/readyz", timeout: float = 1.0) -> tuple[int, dict] | None:
        """(HTTP status, JSON body) of a probe, or None if the server does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return None

    def metric(self, name: str) -> float | None:
        """A sample of /metrics summed over its series (``worker_in_flight_messages`` of every process:
        the supervisor labels each process's series ``process=...``), or None."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1.0) as r:
                text = r.read().decode()
        except (OSError, ValueError):
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + " ") or line.startswith(name + "{")]
        return sum(values) if values else None

    def ready(self) -> bool:
        answer = self.probe()
        return answer is not None and answer[0] == 200

    async def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from start until /readyz says 200 (models loaded, group joined, broker reachable)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited with {self.returncode()} before ready; "
                                     f"log tail:\n{self.log_tail()}")
            if await asyncio.to_thread(self.ready):
                return time.monotonic() - self.started_at
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} not ready within {timeout}s; log tail:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and its live descendants (the supervisor, its
        GPU process and intakes; Linux /proc)."""
        total, todo, seen = 0.0, [self.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo.extend(int(c) for c in (task / "children").read_text().split())
            except (OSError, ValueError):
                continue
        return total

    # --- the log ------------------------------------------------------------------------------
    def events(self) -> list[dict]:
        return read_log(self.log_path)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def read_log(path: Path) -> list[dict]:
    """The JSON lines of a worker log (non-JSON lines, e.g. stdlib logging of aiokafka, as {"raw": ...})."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            out.append({"raw": line})
            continue
        out.append(doc if isinstance(doc, dict) else {"raw": line})
    return out


# --- topics ---------------------------------------------------------------------------------------------
class TopicReader:
    """Reads a topic from the beginning, incrementally: ``poll()`` adds what arrived since last time."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list = []

    async def __aenter__(self) -> TopicReader:
        self._consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, group_id=None,
                                          auto_offset_reset="earliest", enable_auto_commit=False,
                                          max_partition_fetch_bytes=50_000_000, fetch_max_bytes=100_000_000)
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_ms: int = 100) -> list:
        new = []
        for records in (await self._consumer.getmany(timeout_ms=timeout_ms)).values():
            new.extend(records)
        self.records.extend(new)
        return new

    async def until(self, done: Callable[[list], bool], timeout_s: float, settle_s: float = 0.0,
                    alive: Callable[[], bool] | None = None) -> list:
        """Poll until ``done(records)`` (then ``settle_s`` more, to catch extras) or the timeout."""
        deadline = time.monotonic() + timeout_s
        while not done(self.records):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.topic}: condition not met within {timeout_s}s "
                                     f"({len(self.records)} records read)")
            if alive is not None and not alive():
                raise AssertionError(f"{self.topic}: the worker died while waiting")
            await self.poll(200)
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            await self.poll(200)
        return self.records


def source_coords(record) -> tuple[int, int]:
    """(partition, offset) of the input message an output record is for, from its source-* headers."""
    h = {k: v.decode() for k, v in record.headers}
    return int(h["source-partition"]), int(h["source-offset"])


class PacedProducer:
    """Writes values to a topic over time (``rate`` per second, round-robin over partitions) and records
    the (partition, offset) the broker gave each; run as a task with ``run()``."""

    def __init__(self, bootstrap: str, topic: str, values: Sequence[bytes | None], partitions: int, rate: float,
                 headers: Sequence[list | None] | None = None) -> None:
        self.bootstrap, self.topic, self.values = bootstrap, topic, values
        self.partitions, self.rate, self.headers = partitions, rate, headers
        self.coords: list[tuple[int, int] | None] = [None] * len(values)
        self.sent = 0

    async def run(self) -> list[tuple[int, int]]:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                    max_request_size=50_000_000, request_timeout_ms=120_000)
        await producer.start()
        try:
            started = time.monotonic()
            pending = []
            for i, value in enumerate(self.values):
                due = started + i / self.rate
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                fut = await producer.send(self.topic, value, key=f"k{i}".encode(), partition=i % self.partitions,
                                          headers=self.headers[i] if self.headers else None)
                pending.append((i, fut))
                self.sent = i + 1
                if len(pending) >= 200:
                    await self._collect(pending)
            await self._collect(pending)
        finally:
            await producer.stop()
        return [c for c in self.coords if c is not None]

    async def _collect(self, pending: list) -> None:
        for i, fut in pending:
            meta = await fut
            self.coords[i] = (meta.partition, meta.offset)
        pending.clear()


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


def duplicates(records: Iterable) -> int:
    coords = [source_coords(r) for r in records]
    return len(coords) - len(set(coords))


# --- a worker with a device that fails on a marker image --------------------------------------------------
class FailingEngine:
    """Wraps a real engine; a batch holding an image whose every pre-processed byte equals ``marker``
    raises ``DeviceError``, as a CUDA fault (illegal address, Xid) surfaces from an engine."""

    def __init__(self, inner: Any, marker: int) -> None:
        self._inner = inner
        self.spec = inner.spec
        self._marker = marker

    def activate(self, runtime: Any, max_batch_size: int) -> None:
        self._inner.activate(runtime, max_batch_size)

    def enqueue(self, batch):  # noqa: ANN001
        import numpy as np

        from worker.errors import DeviceError

        flat = batch.reshape(batch.shape[0], -1)
        if bool(np.any(np.all(flat == self._marker, axis=1))):
            raise DeviceError("CUDA error: an illegal memory access was encountered (injected by the test)",
                              cuda_error="CUDA_ERROR_ILLEGAL_ADDRESS")
        return self._inner.enqueue(batch)

    def deactivate(self) -> None:
        self._inner.deactivate()


class FailingEngineFactory:
    """Picklable: the supervisor hands it to the GPU process, which makes its engines with it."""

    def __init__(self, marker: int) -> None:
        self.marker = marker

    def __call__(self, spec: Any, settings: Any) -> FailingEngine:
        from worker.engines import create_engine

        return FailingEngine(create_engine(spec, settings), self.marker)


class StuckOnStop:
    """Intake hooks (pickled into each intake): once the worker is told to stop, block the intake's event
    loop, so that its shutdown never ends and the supervisor has to kill it."""

    async def during(self, worker: Any) -> None:
        await worker._stop.wait()
        time.sleep(600)  # the loop's thread, blocked: no drain, no exit

    def report(self, worker: Any, code: int) -> dict[str, Any]:
        return {}


def _main(mode: str) -> int:
    """`worker run` (the supervisor and its processes) with, by ``mode``: the GPU process's engines
    wrapped (``failing-engine``, FAKE_DEVICE_ERROR_MARKER), or intakes that hang on stop (``stuck-on-stop``)."""
    from worker import log, settings as settings_mod
    from worker.supervisor import supervise

    s = settings_mod.load()
    log.configure(s.log_format, s.log_level)
    if mode == "stuck-on-stop":
        return asyncio.run(supervise(s, hooks=StuckOnStop())).exit_code
    factory = FailingEngineFactory(int(os.environ["FAKE_DEVICE_ERROR_MARKER"]))
    return asyncio.run(supervise(s, engine_factory=factory)).exit_code


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1] if len(sys.argv) > 1 else "failing-engine"))
