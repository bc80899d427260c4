"""`worker demo`: the whole system on one laptop, no GPU needed.

Starts the local broker, creates the topics, writes N generated sample images (varied sizes, formats
and modes), runs the worker with the bundled pipeline, reads every result back, checks that each input
offset got exactly one result or DLQ record and that every result's values are the bundled models'
reference on that input alone, and prints a summary table with the real total time.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker import log
from worker.broker import LocalBroker, create_topics
from worker.samples import sample_images
from worker.supervisor import Supervisor
from worker.settings import Settings


@dataclass
class Collected:
    results: dict[tuple[int, int], dict] = field(default_factory=dict)  # (partition, offset) -> result
    dlq: dict[tuple[int, int], dict] = field(default_factory=dict)
    duplicates: int = 0
    first_at: float = 0.0  # monotonic time the first record arrived
    last_at: float = 0.0

    def rate(self) -> float:
        n = len(self.results) + len(self.dlq)
        span = self.last_at - self.first_at
        return (n - 1) / span if n > 1 and span > 0 else 0.0


async def produce(settings: Settings, images: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    """Write the images round-robin over the input topic's partitions; returns their coordinates."""
    producer = AIOKafkaProducer(acks="all", max_request_size=settings.producer_max_request_size,
                                **settings.kafka_common())
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(settings.input_topic))
        acks = [await producer.send(settings.input_topic, data, key=name.encode(),
                                    partition=partitions[i % len(partitions)],
                                    headers=[("correlation-id", f"demo-{i}".encode())])
                for i, (name, data) in enumerate(images)]
        metas = await asyncio.gather(*acks)
        return [(m.partition, m.offset) for m in metas]
    finally:
        await producer.stop()


async def collect(settings: Settings, expected: int, progress=None, task=None,
                  timeout_s: float = 300.0) -> Collected:
    """Read the output and DLQ topics until ``expected`` distinct inputs are accounted for."""
    consumer = AIOKafkaConsumer(settings.output_topic, settings.dlq_topic, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                **settings.kafka_common())
    await consumer.start()
    out = Collected()
    deadline = time.monotonic() + timeout_s
    try:
        while len(out.results) + len(out.dlq) < expected and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for rec in records:
                    headers = {k: v.decode() for k, v in rec.headers}
                    key = (int(headers["source-partition"]), int(headers["source-offset"]))
                    if tp.topic == settings.dlq_topic:
                        target, doc = out.dlq, headers
                    else:
                        target, doc = out.results, json.loads(rec.value)
                    if key in out.results or key in out.dlq:
                        out.duplicates += 1
                    target[key] = doc
                    out.last_at = time.monotonic()
                    out.first_at = out.first_at or out.last_at
            if progress is not None:
                progress.update(task, completed=len(out.results) + len(out.dlq))
    finally:
        await consumer.stop()
    return out


def verify(collected: Collected, images: list[tuple[str, bytes]], coords: list[tuple[int, int]],
           settings: Settings) -> tuple[int, list[str]]:
    """Every result against the bundled models applied to that input alone, without ONNX Runtime: the
    input decoded by the CPU path into each model's rows, then the models' reference functions (NumPy,
    float64) on those rows. Exact with the CPU decoders (the worker decoded the same rows); with
    decoder=nvimgcodec or hybrid JPEGs were decoded on the GPU (within 1-2 levels of OpenCV), so values are
    compared to 2 levels and the hash bits are not. Returns (results checked, problems)."""
    from worker.decode.message import decode_message
    from worker.models.bundled import channel_means_reference, gray_thumbnail_reference
    from worker.service import pipeline_for

    pipeline = pipeline_for(settings)
    if [m.name for m in pipeline.models] != ["channel_means", "gray_thumbnail"]:
        return 0, []  # another pipeline: no reference to check against
    on_gpu = settings.decodes_on_gpu
    # decoder=hybrid: each image was decoded either on the card (full size, resized there) or by an intake's
    # decode thread (cpu-reduced); a result is right if it matches the reference of either path.
    modes = [True] if settings.decoder == "cpu-reduced" else [False, True] if settings.decoder == "hybrid" else [False]
    problems: list[str] = []
    checked = 0
    for (name, data), coord in zip(images, coords):
        doc = collected.results.get(coord)
        if doc is None:
            continue
        outputs = doc["models"]
        got_means = np.array(outputs["channel_means"]["outputs"]["means"]["data"], np.float32)
        got_thumb = np.array(outputs["gray_thumbnail"]["outputs"]["thumbnail"]["data"], np.float32)
        got_hash = np.array(outputs["gray_thumbnail"]["outputs"]["ahash"]["data"], np.uint8)
        tolerance = 2.0 if on_gpu else 1e-3
        wanted = []
        for reduced in modes:
            rgb, gray = decode_message(data, None, pipeline, settings.max_bytes, settings.max_pixels, reduced).inputs
            means = channel_means_reference(rgb.astype(np.float32).transpose(2, 0, 1)[None])[0]
            thumb = gray_thumbnail_reference(gray[..., 0].astype(np.float32)[None, None])
            wanted.append(means)
            if (np.allclose(got_means, means, rtol=0, atol=tolerance)
                    and np.allclose(got_thumb, thumb["thumbnail"][0], rtol=0, atol=tolerance)
                    and (on_gpu or np.array_equal(got_hash, thumb["ahash"][0]))):
                break
        else:
            problems.append(f"{name} at {coord}: means {got_means} vs {' or '.join(map(str, wanted))}")
        checked += 1
    return checked, problems


def summary_table(collected: Collected, elapsed_s: float) -> Table:
    e2e = np.array([r["timings_ms"]["end_to_end"] for r in collected.results.values()] or [0.0])
    batches = [r["batch_size"] for r in collected.results.values()] or [0]
    table = Table(title="worker demo")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("results", f"{len(collected.results)}"),
        ("dead-lettered", f"{len(collected.dlq)}"),
        ("duplicates", f"{collected.duplicates}"),
        ("throughput (first to last result)", f"{collected.rate():.1f} msg/s"),
        ("wall time (with start-up)", f"{elapsed_s:.1f} s"),
        ("end-to-end p50", f"{np.percentile(e2e, 50):.1f} ms"),
        ("end-to-end p95", f"{np.percentile(e2e, 95):.1f} ms"),
        ("end-to-end p99", f"{np.percentile(e2e, 99):.1f} ms"),
        ("mean batch size", f"{np.mean(batches):.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


async def run_demo(count: int, settings: Settings, partitions: int = 4, seed: int = 0,
                   console: Console | None = None) -> int:
    console = console or Console(stderr=False)
    demo_started = time.monotonic()
    broker = None
    if settings.bootstrap_servers in ("", "local"):
        broker = LocalBroker().start()
        settings = settings.replace(bootstrap_servers=broker.bootstrap)
        console.print(f"local broker (tansu) on {broker.bootstrap}")
    try:
        await create_topics(settings.bootstrap_servers, [(settings.input_topic, partitions),
                                                        (settings.output_topic, partitions),
                                                        (settings.dlq_topic, 1)])
        t = time.monotonic()
        with console.status(f"generating {count} sample images"):
            images = sample_images(count, seed=seed)
        console.print(f"generated {len(images)} sample images in {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        with console.status(f"writing them to {settings.input_topic}"):
            coords = await produce(settings, images)
        console.print(f"wrote {len(images)} sample images to {settings.input_topic} ({partitions} partitions) "
                      f"in {time.monotonic() - t:.1f} s; starting the worker (models load first)")
        started = time.monotonic()
        supervisor = Supervisor(settings)  # the process model of `worker run`: K intakes, one GPU process
        worker_task = asyncio.create_task(supervisor.run())
        with Progress(TextColumn("results"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            task = progress.add_task("results", total=count)
            collect_task = asyncio.create_task(collect(settings, count, progress, task))
            done, _ = await asyncio.wait({worker_task, collect_task}, return_when=asyncio.FIRST_COMPLETED)
            if worker_task in done:  # the worker stopped early: report why instead of waiting
                collect_task.cancel()
                code = worker_task.result().exit_code
                console.print(f"[red]worker stopped early with exit code {code}[/red]")
                return code or 1
            collected = collect_task.result()
        elapsed = time.monotonic() - started
        supervisor.request_stop()
        code = (await worker_task).exit_code
        console.print(summary_table(collected, elapsed))
        t = time.monotonic()
        with console.status("checking every result against the bundled models' references"):
            checked, problems = verify(collected, images, coords, settings)
        if checked:
            console.print(f"values: {checked - len(problems)} of {checked} results equal the bundled models' "
                          f"reference on their own input (checked in {time.monotonic() - t:.1f} s)")
        missing = set(coords) - set(collected.results) - set(collected.dlq)
        total = time.monotonic() - demo_started
        if missing or code != 0 or problems:
            for problem in problems[:5]:
                console.print(f"[red]wrong values: {problem}[/red]")
            console.print(f"[red]FAILED: {len(missing)} inputs without a result, {len(problems)} with wrong "
                          f"values; worker exit code {code} ({total:.1f} s in all)[/red]")
            return 1
        console.print(f"[green]OK: {count} inputs, {len(collected.results)} results, "
                      f"{len(collected.dlq)} dead-lettered, {total:.1f} s in all[/green]")
        return 0
    finally:
        if broker is not None:
            broker.stop()


def main(count: int, settings: Settings, partitions: int, seed: int) -> int:
    log.configure(settings.log_format, settings.log_level)
    return asyncio.run(run_demo(count, settings, partitions, seed))
