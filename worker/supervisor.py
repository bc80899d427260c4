"""The process model of `worker run`, `demo`, `replay` and `bench`: K intakes, one GPU process.

```
supervisor (this process: HTTP probes and merged /metrics, signals, shared memory, exit code)
 ├─ GPU process: models, the one GPU thread (worker.gpu.process)
 └─ intake 1..K: consumer-group members with decode pools, publishers, committers (worker.intake)
     each linked to the GPU process by a slot ring in shared memory and a pipe (worker.ipc)
```

Start-up: stale segments of a killed earlier run are unlinked; each intake's ring is created here (so
that this process, which outlives the others, can unlink them on every exit path); the GPU process
loads the models; the intakes start only when it is ready. A SIGTERM while the models load stops the
GPU process and exits 0.

Shutdown, by cause:
1. SIGTERM/SIGINT: every intake gets SIGTERM and drains (its guarantees: finish or cut, flush,
   commit, leave the group); then the GPU process is told to stop; exit 0 if every child did. A
   second signal kills every child at once (nothing more is committed) and exits 130.
2. An intake exits non-zero or is killed: the others are stopped as in 1 (their work is sound), and
   the exit code is 1, so Kubernetes restarts the pod. (A restart of the one intake alone would also
   keep the guarantees; stopping the pod keeps one simple rule: a death is loud.)
3. The GPU process exits or fails: the intakes see their link end (or its failure message), fail
   every waiting message without committing it, and exit 1; exit 1.
4. Every intake exits 0 by itself (a replay reached its end): the GPU process is stopped, exit 0.
Shared memory is unlinked in every case; children die with this process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from worker import errors, log
from worker.health import STALE_AFTER_S, HealthServer
from worker.ipc import shm
from worker.ipc.board import Row, new_board
from worker.metrics import merge_expositions
from worker.settings import Settings

GPU_STOP_TIMEOUT_S = 30.0
POLL_S = 0.1


@dataclass
class Outcome:
    exit_code: int
    counts: dict[str, int] = field(default_factory=dict)
    intakes: int = 0
    device: str = ""
    reports: list[dict[str, Any]] = field(default_factory=list)  # the intakes' IntakeHooks.report


class ProcessHealth:
    """``/healthz`` and ``/readyz`` over every process (the board), for worker.health.make_app."""

    def __init__(self, board: Any, intakes: int) -> None:
        self.board = board
        self.intakes = intakes
        self.children_alive = lambda: False

    def liveness(self, now: float | None = None) -> tuple[bool, dict]:
        now = time.monotonic() if now is None else now
        gpu = Row(self.board, 0)
        ages = [now - Row(self.board, i).get("beat") for i in range(1, self.intakes + 1)]
        checks = {"models_ready": bool(gpu.get("ready")), "gpu_heartbeat_age_s": round(now - gpu.get("beat"), 3),
                  "intake_heartbeat_age_s": round(max(ages), 3) if ages else None,
                  "processes_alive": self.children_alive()}
        ok = (checks["models_ready"] and checks["processes_alive"] and now - gpu.get("beat") < STALE_AFTER_S
              and all(a < STALE_AFTER_S for a in ages))
        return ok, checks

    def readiness(self) -> tuple[bool, dict]:
        rows = [Row(self.board, i) for i in range(1, self.intakes + 1)]
        checks = {"models_ready": bool(Row(self.board, 0).get("ready")),
                  "intakes_joined": sum(bool(r.get("joined")) for r in rows), "intakes": self.intakes,
                  "broker_reachable": all(bool(r.get("broker_ok")) for r in rows)}
        ok = checks["models_ready"] and checks["intakes_joined"] == self.intakes and checks["broker_reachable"]
        return ok, checks


class MergedMetrics:
    """``/metrics``: every process's latest snapshot, labelled by process."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)

    def exposition(self) -> bytes:
        texts = {}
        for path in sorted(self.run_dir.glob("metrics-*.prom")):
            try:
                texts[path.stem.removeprefix("metrics-")] = path.read_bytes()
            except OSError:
                continue
        return merge_expositions(texts)


class Supervisor:
    def __init__(self, settings: Settings, plan: Any = None, intakes: int | None = None, hooks: Any = None,
                 engine_factory: Any = None) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.plan = plan
        self.hooks = hooks
        self.k = intakes or settings.intakes
        self.ctx = mp.get_context("spawn")
        self.token = shm.creator_token()
        self.run_id = uuid.uuid4().hex[:8]
        self.run_dir = tempfile.mkdtemp(prefix="gpuworker-run-")
        self.board = new_board(self.ctx, self.k + 1)
        self.health = ProcessHealth(self.board, self.k)
        self.health.children_alive = self._children_alive
        self.metrics = MergedMetrics(self.run_dir)
        self.gpu: Any = None
        self.intake_procs: list[Any] = []
        self.segments: list[shm.Segment] = []
        self.stop_requested = asyncio.Event()
        self.signals = 0
        self.device = ""
        self.final_metrics = b""
        self._log = log.get("supervisor")

    def _children_alive(self) -> bool:
        procs = [self.gpu, *self.intake_procs]
        return all(p is not None and p.is_alive() for p in procs)

    # --- the whole life --------------------------------------------------------------------
    async def run(self) -> Outcome:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        from worker.codecs import check_codecs

        check_codecs()  # before any process starts: a missing codec library is a configuration error
        stale = shm.clean_stale()
        if stale:
            self._log.warning("unlinked shared memory left by a killed earlier run", segments=stale)
        server = HealthServer(self.health, self.metrics, self.settings.http_port) if self.settings.http_port else None  # type: ignore[arg-type]
        code = 1
        try:
            if server is not None:
                port = await server.start()
                self._log.info("http listening", port=port, paths=["/healthz", "/readyz", "/metrics"])
            decodes_on_device = await self._start_gpu()
            if decodes_on_device is None:  # stopped while the models loaded
                code = 0
            else:
                self._start_intakes(decodes_on_device)
                code = await self._watch()
        finally:
            code = await self._stop_all(code)
            counts = self._counts()
            reports = self._reports()
            self.final_metrics = self.metrics.exposition()  # the children's last snapshots (the bench reads it)
            self._cleanup()
            if server is not None:
                await server.stop()
            self._remove_signals(loop)
        self._log.info("stopped", exit_code=code, intakes=self.k, **counts)
        return Outcome(code, counts, self.k, self.device, reports)

    async def _start_gpu(self) -> bool | None:
        """Start the GPU process and wait for its models; None if a stop came first. Raises the
        start-up error (a bad model file is a ConfigError, as in a single-process worker)."""
        s = self.settings
        size = s.ipc_slots * s.ipc_slot_bytes
        self.segments = [shm.Segment.create(shm.segment_name(f"{self.run_id}-ring{i + 1}", self.token), size)
                         for i in range(self.k)]
        self.links = [self.ctx.Pipe(duplex=True) for _ in range(self.k)]
        self.control, gpu_control = self.ctx.Pipe(duplex=True)
        from worker.gpu import process as gpu_process

        self.gpu = self.ctx.Process(
            target=gpu_process.main, name="gpu",
            args=(s, [(gpu_end, seg.name) for (_, gpu_end), seg in zip(self.links, self.segments)], gpu_control,
                  self.board, self.run_dir, os.getpid(), s.ipc_slot_bytes, self.engine_factory))
        self.gpu.start()
        gpu_control.close()  # only the child holds its ends: their closing is how each side sees a death
        for _, gpu_end in self.links:
            gpu_end.close()
        self._log.info("gpu process started; loading models", pid=self.gpu.pid, intakes=self.k)
        loop = asyncio.get_running_loop()
        while True:
            if self.stop_requested.is_set():
                self._log.info("stop requested while the models load")
                return None
            if await loop.run_in_executor(None, self.control.poll, 0.2):
                try:
                    message = self.control.recv_bytes()
                except (EOFError, OSError):
                    message = b""
                break
            if not self.gpu.is_alive():
                message = b""
                break
        if message.startswith(b"ready"):
            info = orjson.loads(message[5:])
            self.device = info.get("device", "")
            return bool(info["decodes_on_device"])
        if message.startswith(b"error"):
            doc = orjson.loads(message[5:])
            cls = getattr(errors, doc["cls"], None)
            if isinstance(cls, type) and issubclass(cls, errors.WorkerError):
                raise cls(doc["msg"])
            raise errors.FatalError(f"model start-up failed: {doc['cls']}: {doc['msg']}")
        raise errors.FatalError(f"GPU process exited during start-up (exit code {self.gpu.exitcode})")

    def _start_intakes(self, decodes_on_device: bool) -> None:
        from worker.intake import process as intake_process

        s = self.settings
        for i, ((intake_end, _), seg) in enumerate(zip(self.links, self.segments), start=1):
            p = self.ctx.Process(target=intake_process.main, name=f"intake-{i}",
                                 args=(i, s, self.plan, intake_end, seg.name, s.ipc_slots, s.ipc_slot_bytes,
                                       decodes_on_device, self.board, self.run_dir, os.getpid(), self.hooks))
            p.start()
            intake_end.close()
            self.intake_procs.append(p)
        self._log.info("intakes started", pids=[p.pid for p in self.intake_procs],
                       decode_threads_each=s.decode_threads)

    async def _watch(self) -> int:
        finished: set[int] = set()
        while not self.stop_requested.is_set():
            if not self.gpu.is_alive():
                self._log.error("gpu process exited; stopping every intake (unfinished work stays uncommitted)",
                                exit_code=self.gpu.exitcode)
                return 1
            for i, p in enumerate(self.intake_procs, start=1):
                if i in finished or p.is_alive():
                    continue
                if p.exitcode == 0:
                    finished.add(i)  # its plan is complete (a replay)
                    continue
                self._log.error("intake exited; stopping the worker", intake=i, exit_code=p.exitcode)
                return 1
            if len(finished) == len(self.intake_procs):
                return 0
            await asyncio.sleep(POLL_S)
        return 0

    async def _stop_all(self, code: int) -> int:
        """Intakes drain first (SIGTERM), then the GPU process stops; returns the exit code."""
        s = self.settings
        loop = asyncio.get_running_loop()
        for p in self.intake_procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        # One deadline for all intakes (they drain at the same time), not one each: the pod's grace
        # period counts it once (docs/deploy.md).
        budget = s.drain_timeout_s + s.rebalance_timeout_s + 30.0
        deadline = time.monotonic() + budget
        for p in self.intake_procs:
            await loop.run_in_executor(None, p.join, max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                self._log.error("intake did not stop in time; killed", pid=p.pid, waited_s=budget)
                p.kill()
                await loop.run_in_executor(None, p.join, 5)
            if p.exitcode not in (0, None) and code == 0:
                code = 1
        if self.gpu is not None and self.gpu.is_alive() and not self.intake_procs:
            self.gpu.kill()  # stopped while loading models: nothing of value is in flight there
        if self.gpu is not None and self.gpu.is_alive():
            try:
                self.control.send_bytes(b"stop")
            except (OSError, ValueError):
                pass
            await loop.run_in_executor(None, self.gpu.join, GPU_STOP_TIMEOUT_S)
            if self.gpu.is_alive():
                self._log.error("gpu process did not stop in time; killed", pid=self.gpu.pid)
                self.gpu.kill()
                await loop.run_in_executor(None, self.gpu.join, 5)
        if self.gpu is not None and self.gpu.exitcode not in (0, None) and code == 0 and self.intake_procs:
            code = 1
        return code

    def _counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for path in Path(self.run_dir).glob("counts-*.json"):
            try:
                for name, n in json.loads(path.read_text()).items():
                    total[name] = total.get(name, 0) + int(n)
            except (OSError, ValueError):
                continue
        return total

    def _reports(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(Path(self.run_dir).glob("report-*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def _cleanup(self) -> None:
        for seg in self.segments:
            seg.close()
        for name in shm.owned_by(self.token):
            if self.run_id in name:
                shm.unlink(name)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- signals -------------------------------------------------------------------------
    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        if self.signals > 1:
            self._log.error("second signal: killing every process now, committing nothing more")
            for p in [*self.intake_procs, self.gpu]:
                if p is not None and p.is_alive():
                    p.kill()
            self._cleanup()
            os._exit(130)
        self._log.info("signal received; intakes drain, then the GPU process stops",
                       signal=signal.Signals(signum).name)
        self.stop_requested.set()

    def request_stop(self) -> None:
        self.stop_requested.set()


async def supervise(settings: Settings, plan: Any = None, intakes: int | None = None, hooks: Any = None,
                    engine_factory: Any = None) -> Outcome:
    return await Supervisor(settings, plan, intakes, hooks, engine_factory).run()
