"""Runs the whole bench in one process, in an order that keeps the measurements apart.

1. local broker (unless ``bootstrap_servers`` names one), images, the images decoded once;
2. decode capacity (1 and N threads, each decoder);
3. engine ceiling for every batch size of the run and the sweep, then the GPU thread alone;
4. the worker on a preloaded backlog (the headline number), then the broker's read capacity on the same
   topic, then the per-message baseline;
5. sweeps of max_batch_size and max_wait_ms (worker runs, preloaded);
6. the broker's own round trip (small records, no worker) at the rate of the 50% run, then rate-limited
   runs at fractions of the worker's measured peak; the 50% run's p99 against its bound
   (``round_trip.latency_bound``, in ``analysis``).

Each worker run builds its own runtime and engines through ``serve``, as a deployment would.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks import report
from benchmarks.baseline import baseline
from benchmarks.broker_capacity import broker_read_capacity
from benchmarks.ceiling import engine_ceiling, gpu_thread_ceiling
from benchmarks.corpus import bench_images, describe
from benchmarks.decode_capacity import decode_capacity, device_decode_capacity
from benchmarks.end_to_end import worker_run
from benchmarks.round_trip import BOUND_FRACTION, broker_round_trip
from worker.broker import LocalBroker
from worker.decode.message import decode_message, inspect_message
from worker.errors import ConfigError
from worker.models.spec import load_pipeline
from worker.settings import Settings

PARTITIONS_PER_INTAKE = 2


def parts_for(opts: BenchOptions, settings: Settings, replicas: int = 1) -> int:
    """Input partitions of a worker run: ``--partitions``, or (0) two per intake process of the run. A
    partition is read by one intake, so 8 partitions over 7 intakes leave one intake with twice the
    work and the run's tail on that one alone (H200, 2026-12-02: 1,700-1,900 images/s at 7 intakes, in
    runs with other confounds, against 3,514 at 4 on the same 8 partitions; docs/benchmarks.md)."""
    return opts.partitions or PARTITIONS_PER_INTAKE * (1 if replicas > 1 else settings.intakes) * replicas


PARTS = ("decode", "ceiling", "gpu_thread", "worker", "broker", "baseline", "sweeps", "rates", "round_trip")


@dataclass
class BenchOptions:
    pipeline: str  # the name given: demo, resnet50 or a path
    pipeline_path: Path
    count: int = 2000
    unique: int = 256
    seed: int = 0
    partitions: int = 0  # 0: per worker run, PARTITIONS_PER_INTAKE x its intake processes (see parts_for)
    baseline_count: int = 200
    sweep_batch: list[int] = field(default_factory=list)
    sweep_wait: list[float] = field(default_factory=list)
    sweep_count: int = 0  # 0: count
    rates: list[float] = field(default_factory=lambda: [0.5, 0.9])
    rate_seconds: float = 4.0
    decode_threads: list[int] = field(default_factory=list)  # empty: 1 and the worker's decode threads
    ceiling_seconds: float = 2.0
    sweep_intakes: list[int] = field(default_factory=list)
    sweep_replicas: list[int] = field(default_factory=list)
    skip: set[str] = field(default_factory=set)
    argv: list[str] = field(default_factory=list)
    broker: str = "tansu"  # started where bootstrap_servers is "local": tansu, or kafka (Apache Kafka)


KAFKA_INITIAL_REBALANCE_DELAY_MS = 3000  # Apache Kafka's default group.initial.rebalance.delay.ms


def start_broker(kind: str) -> Any:
    """The run's broker: the embedded tansu, or Apache Kafka (single node, KRaft) for a run whose latency
    must not be the local broker's (at ~200 MB/s of images tansu's own round trip reached 1.1 s at p99:
    docs/benchmarks.md, run 26). Kafka comes from the tests' module, so from a checkout only."""
    if kind == "kafka":
        from tests.kafka_broker import KafkaBroker

        if shutil.which("java") is None:  # (and mvn, until the jars are in the cache)
            raise ConfigError("--broker kafka needs java on PATH (docs/gpu.md: a Java runtime for a GPU machine)")
        # the PLAINTEXT listener is all a run uses; Kafka's own default initial rebalance delay (3 s), as a
        # real cluster runs: at 0 (the tests' setting) a new group's first member gets a generation alone and
        # each later intake of the pod forces a rebalance mid-run (run 27: K = 8 at 0.30x the ceiling)
        return KafkaBroker(tls=False, initial_rebalance_delay_ms=KAFKA_INITIAL_REBALANCE_DELAY_MS).start()
    return LocalBroker().start()


async def run_bench(opts: BenchOptions, settings: Settings, console: Console,
                    checkpoint: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every part in order; a part that fails is recorded under ``errors`` (with its traceback) and the
    others still run. ``checkpoint`` gets the result so far after each part (the CLI writes the JSON)."""
    say = lambda text: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")
    pipeline = load_pipeline(opts.pipeline_path)
    result: dict[str, Any] = {"bench": report.environment(opts, settings, pipeline), "errors": {}}

    async def part(name: str, run: Callable[[], Any]) -> Any:
        try:
            value = run()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:  # noqa: BLE001 - recorded, and the other parts still run
            result["errors"][name] = traceback.format_exc()
            console.print(f"[red]{name} failed: {type(exc).__name__}: {exc}[/red]")
            value = None
        if value is not None:
            result[name] = value
        if checkpoint is not None:
            result["analysis"] = report.analysis(result, settings)
            checkpoint(result)
        return value

    broker = None
    bootstrap = settings.bootstrap_servers
    if bootstrap in ("", "local"):
        broker = await asyncio.to_thread(start_broker, opts.broker)  # Kafka's readiness probe runs its own loop
        bootstrap = broker.bootstrap
        result["bench"]["broker"] = {"kind": opts.broker, "version": getattr(broker, "version", None),
                                     "java": shutil.which("java") if opts.broker == "kafka" else None,
                                     "initial_rebalance_delay_ms": getattr(broker, "initial_rebalance_delay_ms", None)}
        say(f"local broker ({opts.broker}) on {bootstrap}")
    pid = broker.pid if broker is not None else None
    try:
        say(f"generating {min(opts.unique, opts.count)} distinct 640x480 q90 JPEGs, {opts.count} messages")
        images = bench_images(opts.count, opts.unique, opts.seed)
        distinct = list(dict.fromkeys(images))  # keeps order, one per distinct object's value
        result["images"] = describe(images)
        reduced = settings.cpu_decode_reduced
        inputs = [decode_message(b, None, pipeline, settings.max_bytes, settings.max_pixels, reduced).inputs
                  for b in distinct]

        if "decode" not in opts.skip:
            threads = opts.decode_threads or [1, settings.decode_threads]
            say(f"decode capacity: threads {threads}, decoders cpu and cpu-reduced")
            await part("decode", lambda: decode_capacity(distinct, pipeline, settings, threads))
            if settings.decodes_on_gpu:
                say(f"decode capacity: nvImageCodec + resize kernel, batches of {settings.max_batch_size}")
                rows = await part("decode_gpu", lambda: device_decode_capacity(
                    distinct, pipeline, settings, settings.max_batch_size, opts.ceiling_seconds))
                if rows:
                    result.setdefault("decode", []).extend(result.pop("decode_gpu"))

        batch_sizes = sorted({1, settings.max_batch_size, *opts.sweep_batch})
        if "ceiling" not in opts.skip:
            say(f"engine ceiling: batch sizes {batch_sizes}")
            c = await part("ceiling", lambda: engine_ceiling(settings, pipeline, inputs, batch_sizes,
                                                             opts.ceiling_seconds))
            if c:
                result["bench"]["device"] = {k: c[k] for k in ("runtime", "device", "gpu_name")}
        if "gpu_thread" not in opts.skip:
            say(f"GPU thread alone: {opts.count} pre-decoded images")
            encoded = ([inspect_message(b, None, settings.max_bytes, settings.max_pixels) for b in distinct]
                       if settings.decodes_on_gpu else [])
            await part("gpu_thread", lambda: gpu_thread_ceiling(settings, pipeline, inputs, opts.count, encoded))
            if settings.decoder == "hybrid":
                say(f"GPU thread alone: {opts.count} rows decoded on the CPU, the GPU decoder running")
                await part("gpu_thread_rows", lambda: gpu_thread_ceiling(settings, pipeline, inputs, opts.count,
                                                                         encoded, rows=True))

        if "worker" not in opts.skip:
            say(f"worker, preloaded backlog of {opts.count}")
            run = await part("worker", lambda: worker_run(settings, bootstrap, images, distinct,
                                                          parts_for(opts, settings), "worker", broker_pid=pid))
            if run:
                say(f"  {run['images_per_s']:.0f} images/s, mean batch {run['mean_batch_size']:.1f}")
            if run and "broker" not in opts.skip:
                say("broker read capacity")
                await part("broker", lambda: broker_read_capacity(settings, bootstrap, run["input_topic"],
                                                                  len(images)))
        if "baseline" not in opts.skip and opts.baseline_count > 0:
            n = min(opts.baseline_count, opts.count)
            say(f"per-message baseline: {n} messages")
            await part("baseline", lambda: baseline(settings, pipeline, bootstrap, images[:n],
                                                        parts_for(opts, settings)))

        if "sweeps" not in opts.skip and (opts.sweep_batch or opts.sweep_wait):
            n = opts.sweep_count or opts.count
            sweeps: dict[str, list] = {"batch": [], "wait": []}
            result["sweeps"] = sweeps
            for kind, name, values, tag in (("batch", "max_batch_size", opts.sweep_batch, "b"),
                                            ("wait", "max_wait_ms", opts.sweep_wait, "w")):
                for v in values:
                    key = f"sweep_{kind}_{v:g}"
                    say(f"sweep: {name}={v:g} (max_batch_size={settings.max_batch_size}, "
                        f"max_wait_ms={settings.max_wait_ms:g} otherwise), {n} images")
                    run = await part(key, lambda name=name, v=v, tag=tag: worker_run(
                        settings.replace(**{name: v}), bootstrap, images[:n], distinct, parts_for(opts, settings),
                        f"{tag}{v:g}", broker_pid=pid))
                    if run:
                        sweeps[kind].append(result.pop(key))

        if "sweeps" not in opts.skip and (opts.sweep_intakes or opts.sweep_replicas):
            n = opts.sweep_count or opts.count
            result.setdefault("sweeps", {"batch": [], "wait": []}).update(intakes=[], replicas=[])
            for kind, values in (("intakes", opts.sweep_intakes), ("replicas", opts.sweep_replicas)):
                for v in values:
                    key = f"sweep_{kind}_{v}"
                    say(f"sweep: {v} {'intake processes' if kind == 'intakes' else 'independent workers'}, "
                        f"{n} images")
                    run_settings = settings.replace(intake_processes=v) if kind == "intakes" else settings
                    replicas = v if kind == "replicas" else 1
                    run = await part(key, lambda s=run_settings, r=replicas, tag=f"{kind[0]}{v}": worker_run(
                        s, bootstrap, images[:n], distinct, parts_for(opts, s, r), tag, broker_pid=pid, replicas=r))
                    if run:
                        say(f"  {run['images_per_s']:.0f} images/s, mean batch {run['mean_batch_size']:.1f}")
                        result["sweeps"][kind].append(result.pop(key))

        peak = (result.get("worker") or {}).get("images_per_s")
        if "rates" not in opts.skip and opts.rates and peak and "round_trip" not in opts.skip:
            fraction = BOUND_FRACTION if BOUND_FRACTION in opts.rates else opts.rates[0]
            rate = fraction * peak
            n = max(20, int(rate * opts.rate_seconds))
            say(f"broker round trip, no worker: {n} small records at {rate:.0f}/s ({fraction:.0%} of peak)")
            await part("round_trip", lambda: broker_round_trip(bootstrap, parts_for(opts, settings), rate, n))
            # The same at the images' mean size: how much of a rate run's latency outside the worker the
            # broker takes with records of this size (information only: the bound keeps the small records)
            size = sum(len(b) for b in distinct) // len(distinct) if distinct else 64
            say(f"broker round trip, no worker: {n} records of {size} B at {rate:.0f}/s")
            await part("round_trip_image_sized", lambda: broker_round_trip(
                bootstrap, parts_for(opts, settings), rate, n, payload_bytes=size))
        if "rates" not in opts.skip and opts.rates and peak:
            result["rates"] = []
            for fraction in opts.rates:
                rate = fraction * peak
                n = max(20, int(rate * opts.rate_seconds))
                say(f"rate-limited input: {fraction:.0%} of peak = {rate:.0f}/s, {n} messages")
                name = f"rate_{int(fraction * 100)}"
                run = await part(name, lambda rate=rate, n=n, name=name: worker_run(
                    settings, bootstrap, [], distinct, parts_for(opts, settings), name, rate=rate, rate_count=n,
                    broker_pid=pid))
                if run:
                    run = result.pop(name)
                    run["fraction_of_peak"] = fraction
                    result["rates"].append(run)
    finally:
        if broker is not None:
            broker.stop()
    result["analysis"] = report.analysis(result, settings)
    return result
