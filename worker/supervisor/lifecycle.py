"""The Supervisor's life: start the GPU processes and the intakes, watch them, stop them (worker.supervisor
says in which order, and why)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker import errors, log, stacks
from worker.gpu.devices import GpuDevice, describe, parse, resolve, visible_cuda_devices
from worker.health import HealthServer
from worker.ipc import shm
from worker.ipc.board import new_board
from worker.settings import Settings
from worker.supervisor.health import ProcessHealth
from worker.supervisor.rundir import MergedMetrics, RunDir

GPU_STOP_TIMEOUT_S = 30.0
STACK_DUMP_S = 1.0  # how long before a kill a stuck child is asked for its stacks
POLL_S = 0.1


@dataclass
class Outcome:
    exit_code: int
    counts: dict[str, int] = field(default_factory=dict)
    intakes: int = 0
    device: str = ""
    reports: list[dict[str, Any]] = field(default_factory=list)  # the intakes' IntakeHooks.report


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
        self.rundir = RunDir()
        self.run_dir = self.rundir.path  # the children write their snapshots, counts and reports here
        self.devices = resolve(parse(settings.gpu_devices), settings.device, settings.gpu_device_index,
                               visible_cuda_devices)
        several = len(self.devices) > 1
        self.names = [d.label(several) for d in self.devices]
        self.board = new_board(self.ctx, len(self.devices) + self.k)
        self.health = ProcessHealth(self.board, self.k, len(self.devices))
        self.health.children_alive = self._children_alive
        self.metrics = MergedMetrics(self.run_dir, {n: {"gpu": str(d.index)} for n, d in zip(self.names, self.devices)}
                                     if several else None)
        self.gpus: list[Any] = []
        self.controls: list[Any] = []  # the supervisor's end of each GPU process's control pipe
        self.intake_procs: list[Any] = []
        self.segments: list[shm.Segment] = []
        self.stop_requested = asyncio.Event()
        self.signals = 0
        self._usr1: Any = None  # the SIGUSR1 handler stacks.install replaced, put back at the end
        self.device = ""
        self.final_metrics = b""
        self._log = log.get("supervisor")

    @property
    def gpu(self) -> Any:
        """The first GPU process (the only one unless gpu_devices gives several), or None before start."""
        return self.gpus[0] if self.gpus else None

    def _children_alive(self) -> bool:
        return bool(self.gpus) and all(p.is_alive() for p in [*self.gpus, *self.intake_procs])

    # --- the whole life --------------------------------------------------------------------
    async def run(self) -> Outcome:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        log.lock_lines(os.path.join(self.run_dir, log.LINE_LOCK_FILE))  # the pod's long lines, one at a time
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
            counts = self.rundir.counts()
            reports = self.rundir.reports()
            self.final_metrics = self.metrics.exposition()  # the children's last snapshots (the bench reads it)
            self._cleanup()
            log.lock_lines(None)
            if server is not None:
                await server.stop()
            self._remove_signals(loop)
        self._log.info("stopped", exit_code=code, intakes=self.k, **counts)
        return Outcome(code, counts, self.k, self.device, reports)

    async def _start_gpu(self) -> bool | None:
        """Start a GPU process per device and wait for all their models; None if a stop came first. Raises
        the first start-up error (a bad model file is a ConfigError, as in a single-process worker)."""
        s = self.settings
        size = s.ipc_slots * s.ipc_slot_bytes
        # One ring per intake, shared by every GPU process: a slot belongs to one request at a time.
        advice = (f"or lower intake_processes, ipc_slots or ipc_slot_bytes ({self.k} rings of {s.ipc_slots} x "
                  f"{s.ipc_slot_bytes} bytes; the chart sizes /dev/shm from them)")
        self.segments = [shm.Segment.create(shm.segment_name(f"{self.run_id}-ring{i + 1}", self.token), size, advice)
                         for i in range(self.k)]
        self.links = [[self.ctx.Pipe(duplex=True) for _ in range(self.k)] for _ in self.devices]  # [gpu][intake]
        from worker.gpu import process as gpu_process

        for g, (device, name) in enumerate(zip(self.devices, self.names)):
            control, gpu_control = self.ctx.Pipe(duplex=True)
            ends = [(gpu_end, seg.name) for (_, gpu_end), seg in zip(self.links[g], self.segments)]
            proc = self.ctx.Process(
                target=gpu_process.main, name=name,
                args=(self._gpu_settings(device), ends, gpu_control, self.board, self.run_dir, os.getpid(),
                      s.ipc_slot_bytes, self.engine_factory, g, name))
            proc.start()
            gpu_control.close()  # only the child holds its ends: their closing is how each side sees a death
            for _, gpu_end in self.links[g]:
                gpu_end.close()
            self.controls.append(control)
            self.gpus.append(proc)
            extra = {"gpu": name} if len(self.devices) > 1 else {}
            self._log.info("gpu process started; loading models", pid=proc.pid, intakes=self.k, **extra)
        infos = []
        for g, proc in enumerate(self.gpus):
            message = await self._await_ready(g)
            if message is None:
                return None
            infos.append(self._ready_info(g, message))
        self.device = ", ".join(info.get("device", "") for info in infos)
        on_device = [bool(info["decodes_on_device"]) for info in infos]
        if len(set(on_device)) > 1:
            # the intakes send one kind of request to every GPU: rows, which every GPU process takes
            self._log.warning("only some GPU processes decode JPEGs on the device; every intake decodes on the CPU",
                              decodes_on_device=dict(zip(self.names, on_device)))
        if len(self.devices) > 1:
            self._log.info("gpu processes ready", gpus=describe(self.devices), devices=self.device)
        return all(on_device)

    def _gpu_settings(self, device: GpuDevice) -> Settings:
        """A GPU process's settings: its own device index (the one-GPU worker's unchanged)."""
        if device.index == self.settings.gpu_device_index:
            return self.settings
        return self.settings.replace(gpu_device_index=device.index)

    async def _await_ready(self, g: int) -> bytes | None:
        """GPU process ``g``'s first control message (b"" if it died first); None if a stop came first."""
        loop = asyncio.get_running_loop()
        control, proc = self.controls[g], self.gpus[g]
        while True:
            if self.stop_requested.is_set():
                self._log.info("stop requested while the models load")
                return None
            if await loop.run_in_executor(None, control.poll, 0.2):
                try:
                    return control.recv_bytes()
                except (EOFError, OSError):
                    return b""
            if not proc.is_alive():
                return b""

    def _ready_info(self, g: int, message: bytes) -> dict[str, Any]:
        if message.startswith(b"ready"):
            return orjson.loads(message[5:])
        if message.startswith(b"error"):
            doc = orjson.loads(message[5:])
            cls = getattr(errors, doc["cls"], None)
            if isinstance(cls, type) and issubclass(cls, errors.WorkerError):
                raise cls(doc["msg"])
            raise errors.FatalError(f"model start-up failed{self._on(g)}: {doc['cls']}: {doc['msg']}")
        raise errors.FatalError(f"GPU process{self._on(g)} exited during start-up (exit code {self.gpus[g].exitcode})")

    def _on(self, g: int) -> str:
        """" on gpu-1" in messages when there are several GPU processes (with one, the message it always was)."""
        return f" {self.names[g]}" if len(self.devices) > 1 else ""

    def _start_intakes(self, decodes_on_device: bool) -> None:
        from worker.intake import process as intake_process

        s = self.settings
        gpus = tuple(str(d.index) for d in self.devices)
        for i, seg in enumerate(self.segments, start=1):
            conns = [self.links[g][i - 1][0] for g in range(len(self.devices))]
            p = self.ctx.Process(target=intake_process.main, name=f"intake-{i}",
                                 args=(i, s, self.plan, conns, seg.name, s.ipc_slots, s.ipc_slot_bytes,
                                       decodes_on_device, self.board, self.run_dir, os.getpid(), self.hooks, gpus))
            p.start()
            for conn in conns:
                conn.close()
            self.intake_procs.append(p)
        self._log.info("intakes started", pids=[p.pid for p in self.intake_procs],
                       decode_threads_each=s.decode_threads)

    async def _watch(self) -> int:
        finished: set[int] = set()
        while not self.stop_requested.is_set():
            for g, gpu in enumerate(self.gpus):
                if not gpu.is_alive():
                    extra = {"gpu": self.names[g]} if len(self.devices) > 1 else {}
                    self._log.error("gpu process exited; stopping every intake (unfinished work stays uncommitted)",
                                    exit_code=gpu.exitcode, **extra)
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
        for p in self.intake_procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        # One deadline for all intakes (they drain at the same time), not one each: the pod's grace
        # period counts it once (docs/deploy.md).
        await self._join_or_kill(self.intake_procs, s.drain_timeout_s + s.rebalance_timeout_s + 30.0, "intake")
        for p in self.intake_procs:
            if p.exitcode not in (0, None) and code == 0:
                code = 1
        for gpu in self.gpus:
            if gpu.is_alive() and not self.intake_procs:
                gpu.kill()  # stopped while loading models: nothing of value is in flight there
        for control, gpu in zip(self.controls, self.gpus):
            if gpu.is_alive():
                try:
                    control.send_bytes(b"stop")  # all at once: they finish their queues side by side
                except (OSError, ValueError):
                    pass
        await self._join_or_kill(self.gpus, GPU_STOP_TIMEOUT_S, "gpu process")
        for gpu in self.gpus:
            if gpu.exitcode not in (0, None) and code == 0 and self.intake_procs:
                code = 1
        return code

    async def _join_or_kill(self, procs: list[Any], budget: float, what: str) -> None:
        """Wait up to ``budget`` s for ``procs`` to exit, then kill those left (and wait 5 s more). A second
        before the end, each one still running is asked for its stacks (worker.stacks), so that the log
        says where it was stuck: within the budget, which the pod's grace period counts."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + budget
        for p in procs:
            await loop.run_in_executor(None, p.join, max(0.0, deadline - STACK_DUMP_S - time.monotonic()))
        stuck = [p for p in procs if p.is_alive()]
        dumped = [p for p in stuck if stacks.catches(p.pid)]
        for p in dumped:
            os.kill(p.pid, stacks.DUMP_SIGNAL)
        for p in stuck:
            await loop.run_in_executor(None, p.join, max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                self._log.error(f"{what} did not stop in time; killed", pid=p.pid, child=p.name, waited_s=budget,
                                stacks="logged just before" if p in dumped else "not asked (no handler yet)")
                p.kill()
                await loop.run_in_executor(None, p.join, 5)

    def _cleanup(self) -> None:
        for seg in self.segments:
            seg.close()
        for name in shm.owned_by(self.token):
            if self.run_id in name:
                shm.unlink(name)
        self.rundir.remove()

    # --- signals -------------------------------------------------------------------------
    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        try:  # SIGUSR1: this process's stacks, then each child's
            self._usr1 = stacks.install(
                lambda: [p.pid for p in [*self.gpus, *self.intake_procs] if p.pid and p.is_alive()])
        except ValueError:  # not the main thread (tests)
            self._usr1 = None

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        if self._usr1 is not None:  # an in-process supervisor (demo, bench) leaves the handler it found
            signal.signal(stacks.DUMP_SIGNAL, self._usr1)

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        if self.signals > 1:
            self._log.error("second signal: killing every process now, committing nothing more")
            for p in [*self.intake_procs, *self.gpus]:
                if p.is_alive():
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
