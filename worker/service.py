"""Builds a running worker from settings: pipeline, device runtime, engines, GPU thread, HTTP probes.

Shared by `worker run`, `worker replay`, `worker demo` and the bench (benchmarks/), so every mode runs the
same pipeline code.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path

from worker import log
from worker.app import Worker
from worker.codecs import check_codecs
from worker.engines import create_engine, create_runtime
from worker.decode.nvimgcodec import decoder_factory
from worker.intake.consume import Plan
from worker.intake.socket_reads import widen_socket_reads
from worker.gpu.thread import GpuThread
from worker.errors import ConfigError
from worker.health import HealthServer, HealthState
from worker.metrics import Metrics
from worker.models.spec import PipelineSpec, load_pipeline
from worker.settings import Settings


# Pipelines bundled with the worker, by name: `--pipeline demo` means the same in run, replay, demo and the bench.
BUNDLED_PIPELINES = {"demo": "default_pipeline_path", "resnet50": "resnet50_pipeline_path",
                     "resnet50_fp16": "resnet50_fp16_pipeline_path"}


def pipeline_path(name: str) -> Path:
    """A bundled pipeline's name (empty: demo) or a pipeline file, as the file's path."""
    from worker import models

    name = name or "demo"
    if name in BUNDLED_PIPELINES:
        return getattr(models, BUNDLED_PIPELINES[name])()
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"pipeline {name!r} is neither a bundled pipeline ({', '.join(BUNDLED_PIPELINES)}) "
                          f"nor a pipeline file")
    return path


def pipeline_for(settings: Settings) -> PipelineSpec:
    return load_pipeline(pipeline_path(settings.pipeline))


def tune_process(settings: Settings) -> None:
    """Per-process knobs of an intake (or a single-process worker): socket reads, GIL switch interval."""
    if settings.socket_read_bytes:
        widen_socket_reads(settings.socket_read_bytes, max(settings.fetch_max_bytes, settings.socket_read_bytes))
    set_gil_switch_interval(settings)


def set_gil_switch_interval(settings: Settings) -> None:
    """``gil_switch_interval_ms`` for this process (every process of the worker: in the GPU process the GPU
    thread wins the GIL back, after each CUDA call, from the links' receive and reply threads)."""
    if settings.gil_switch_interval_ms > 0:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)


async def serve(settings: Settings, plan: Plan | None = None, metrics: Metrics | None = None,
                worker_out: list | None = None) -> int:
    """Run a worker until it stops; returns the process exit code.

    ``worker_out``, if given, receives the Worker object (tests and the demo read its counters).
    """
    logger = log.get("service")
    logger.info("starting", settings=settings.masked())
    check_codecs()  # every Kafka codec must decompress before a consumer meets a compressed batch
    tune_process(settings)
    pipeline = pipeline_for(settings)
    metrics = metrics or Metrics()
    health = HealthState()
    # cuInit can take seconds: keep it off the event loop (it creates no context on that thread)
    runtime = await asyncio.get_running_loop().run_in_executor(None, create_runtime, settings)
    engines = [create_engine(spec, settings) for spec in pipeline.models]
    worker_ref: list[Worker] = []
    gpu = GpuThread.for_settings(settings, runtime, engines, decoder_factory(settings, pipeline), metrics=metrics,
                                 on_fatal=lambda exc: worker_ref[0].fail(exc) if worker_ref else None)
    health.gpu_heartbeat = lambda: gpu.heartbeat
    health.gpu_alive = gpu.alive
    server = HealthServer(health, metrics, settings.http_port) if settings.http_port else None
    if server is not None:
        port = await server.start()
        logger.info("http listening", port=port, paths=["/healthz", "/readyz", "/metrics"])
    try:
        await gpu.start()  # raises a clear error if a model or engine cannot load
        # Everything alive now (modules, models, sessions) lives as long as the process: out of the
        # collector's reach, so full collections stop walking it while holding the GIL (bench on an
        # H100: gen2 pauses up to 177 ms before).
        gc.freeze()
        health.models_ready = True
        worker = Worker(settings, pipeline, gpu, metrics=metrics, plan=plan, health=health)
        worker_ref.append(worker)
        if worker_out is not None:
            worker_out.append(worker)
        return await worker.run()
    finally:
        if not worker_ref:
            gpu.stop()
        if server is not None:
            await server.stop()
