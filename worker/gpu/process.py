"""The GPU process: loads the models, runs the one GPU thread, and serves every intake's link.

Start-up: runtime, engines and decoder on the GPU thread (as in a single-process worker), then
``ready`` (with whether JPEGs are decoded on the device) on the control pipe; the supervisor starts
the intakes only then. A start-up failure is sent as ``error`` with its class and message, so
``worker run`` reports a bad model file exactly as before (exit 2, configuration error).

Running: a link per intake (worker.gpu.link); the main thread beats the status board and writes the
metrics snapshot. It stops on ``stop`` from the supervisor (after the intakes drained: the GPU thread
finishes what is queued), or when the GPU thread fails: every intake is told (they stop without
committing unfinished work) and the process exits 1. SIGINT/SIGTERM are ignored here: the supervisor
decides the order of shutdown, and a terminal's Ctrl-C reaches the whole process group.

With several GPUs (``gpu_devices``) the supervisor starts one of these per device, each with
``settings.gpu_device_index`` set to its device, its own board row, its own name (``gpu-<index>``: the
log's ``process`` and the metrics snapshot's) and a link to every intake: nothing is shared between
them but the intakes' rings, whose slots each belong to one request at a time.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from typing import Any

import orjson

from worker import log, stacks
from worker.ipc.board import Row
from worker.ipc.lifetime import die_with_parent
from worker.ipc.shm import Segment
from worker.metrics import Metrics, write_snapshot
from worker.settings import Settings

SNAPSHOT_EVERY_S = 2.0


def main(settings: Settings, links: list[tuple[Any, str]], control: Any, board: Any, run_dir: str,
         parent_pid: int, slot_bytes: int, engine_factory: Any = None, row: int = 0, name: str = "gpu") -> None:
    die_with_parent(parent_pid)
    stacks.install()  # the supervisor passes SIGUSR1 on only once this process catches it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.configure(settings.log_format, settings.log_level)
    log.bind_process(name)
    log.lock_lines(os.path.join(run_dir, log.LINE_LOCK_FILE))
    sys.exit(_run(settings, links, control, Row(board, row), run_dir, slot_bytes, engine_factory, name))


def _run(settings: Settings, links: list[tuple[Any, str]], control: Any, row: Row, run_dir: str,
         slot_bytes: int, engine_factory: Any = None, name: str = "gpu") -> int:
    from worker.engines import create_engine, create_runtime
    from worker.decode.nvimgcodec import decoder_factory
    from worker.gpu.thread import GpuThread
    from worker.gpu.link import IntakeLink
    from worker.service import pipeline_for, set_gil_switch_interval

    set_gil_switch_interval(settings)
    logger = log.get("gpu")
    metrics = Metrics()
    failed = threading.Event()
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        if not fatal:
            fatal.append(exc)
        failed.set()

    try:
        pipeline = pipeline_for(settings)
        runtime = create_runtime(settings)
        make = engine_factory or create_engine  # a picklable factory: tests wrap engines to inject faults
        engines = [make(spec, settings) for spec in pipeline.models]
        gpu = GpuThread.for_settings(settings, runtime, engines, decoder_factory(settings, pipeline),
                                     metrics=metrics, on_fatal=on_fatal)
        gpu.start_blocking()
    except BaseException as exc:  # noqa: BLE001 - reported to the supervisor, which exits with it
        control.send_bytes(b"error" + orjson.dumps({"cls": type(exc).__name__, "msg": str(exc)}))
        return 1
    gc.freeze()  # models and sessions live as long as the process (see worker.service)
    segments = [Segment.attach(name) for _, name in links]
    ends = [IntakeLink(i + 1, conn, seg, slot_bytes, pipeline.models, gpu, on_fatal)
            for i, ((conn, _), seg) in enumerate(zip(links, segments))]
    for end in ends:
        end.start()
    row.set(ready=True)
    row.beat()
    control.send_bytes(b"ready" + orjson.dumps({"decodes_on_device": gpu.decodes_on_device,
                                                "device": runtime.device_name}))
    snapshot = os.path.join(run_dir, f"metrics-{name}.prom")
    next_snapshot = 0.0
    code = 0
    while True:
        if failed.is_set():
            error = fatal[0] if fatal else RuntimeError("GPU thread failed")
            logger.error("gpu process failing: intakes stop without committing unfinished work",
                         error=f"{type(error).__name__}: {error}")
            for end in ends:
                end.send_fatal(f"{type(error).__name__}: {error}")
            code = 1
            break
        if control.poll(0.5):
            try:
                command = control.recv_bytes()
            except (EOFError, OSError):
                command = b"stop"  # the supervisor is gone
            if command == b"stop":
                break
        row.set(beat=gpu.heartbeat if gpu.alive() else 0.0)
        now = time.monotonic()
        if now >= next_snapshot:
            write_snapshot(metrics, snapshot)
            next_snapshot = now + SNAPSHOT_EVERY_S
    gpu.stop()
    for end in ends:
        end.close()
    write_snapshot(metrics, snapshot)
    logger.info("gpu process stopped", exit_code=code, batches=gpu.batches, images=gpu.images)
    return code
