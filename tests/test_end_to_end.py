"""The whole path on the real broker: Kafka → decode → GPU thread (CPU here) → Kafka."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from tests.helpers import check_demo_result, headers_of, kafka_clients, produce, read_all, result_doc, source_of
from tests.kafka_broker import both_brokers
from worker.broker import create_topics
from worker.samples import encode, synth_image
from worker.service import serve


def lossless_images(n: int, seed: int = 1) -> tuple[list[bytes], list[np.ndarray]]:
    """64x64 images in lossless formats, so the test knows every decoded pixel without the worker."""
    rng = np.random.default_rng(seed)
    formats = ("png", "bmp", "tiff", "webp")
    blobs, pixels = [], []
    for i in range(n):
        fmt = formats[i % len(formats)]
        channels = (1, 3, 4)[i % 3] if fmt != "bmp" else (1, 3)[i % 2]
        img = synth_image(rng, 64, 64, channels)
        blobs.append(encode(img, fmt))
        pixels.append(img)
    return blobs, pixels


async def run_until(settings, expected: dict[str, int], timeout_s: float = 180.0, settle_s: float = 1.0):
    """Run a worker until each topic in ``expected`` holds that many records (plus ``settle_s`` to
    catch extras); returns (records per topic, the worker, its exit code)."""
    workers: list = []
    task = asyncio.create_task(serve(settings, worker_out=workers))
    try:
        records = await asyncio.gather(*(read_all(settings.bootstrap_servers, t, n, timeout_s, settle_s)
                                         for t, n in expected.items()))
    finally:
        if workers:
            workers[0].request_stop()
        code = await task
    return records, workers[0], code


@both_brokers
@pytest.mark.parametrize("kafka_consumer", ["aiokafka", "librdkafka"])
async def test_500_images_over_4_partitions_each_result_matches_its_own_image(settings, kafka_consumer):
    settings = dataclasses.replace(settings, **kafka_clients(kafka_consumer))
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 4), (settings.output_topic, 4),
                                                    (settings.dlq_topic, 1)])
    blobs, pixels = lossless_images(500)
    corr = [[("correlation-id", f"c-{i}".encode())] for i in range(500)]
    coords = await produce(settings.bootstrap_servers, settings.input_topic, blobs, 4, headers=corr)
    by_coord = {c: i for i, c in enumerate(coords)}

    (records,), worker, code = await run_until(settings, {settings.output_topic: 500})
    assert code == 0

    assert len(records) == 500, f"expected exactly 500 results, got {len(records)}"
    seen = set()
    for rec in records:
        coord = source_of(rec)
        assert coord not in seen, f"duplicate result for {coord}"
        seen.add(coord)
        i = by_coord[coord]
        doc = result_doc(rec)
        assert rec.key == f"k{i}".encode()
        assert headers_of(rec)["correlation-id"] == f"c-{i}" == doc["correlation_id"]
        assert doc["source"] == {"topic": settings.input_topic, "partition": coord[0], "offset": coord[1],
                                 "timestamp": doc["source"]["timestamp"]}
        assert set(doc["timings_ms"]) == {"decode", "queue", "inference", "end_to_end"}
        check_demo_result(doc, pixels[i])
    assert seen == set(coords)
    # Under load (500 queued messages) the GPU thread forms batches larger than one.
    assert max(result_doc(r)["batch_size"] for r in records) > 1
    assert worker.counts == {"consumed": 500, "published": 500, "dead_lettered": 0, "failed": 0}


@both_brokers
@pytest.mark.parametrize("kafka_consumer", ["aiokafka", "librdkafka"])
async def test_poison_goes_to_dlq_with_reason_and_the_rest_is_processed(settings, kafka_consumer):
    settings = dataclasses.replace(settings, **kafka_clients(kafka_consumer))
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 2), (settings.output_topic, 2),
                                                    (settings.dlq_topic, 1)])
    blobs, pixels = lossless_images(6)
    bad = [b"", b"not an image at all", blobs[0][:40], b'{"image": 12}']
    values = blobs + bad
    coords = await produce(settings.bootstrap_servers, settings.input_topic, values, 2)
    (results, dlq), worker, code = await run_until(settings, {settings.output_topic: 6, settings.dlq_topic: 4})
    assert code == 0
    assert len(results) == 6 and len(dlq) == 4
    reasons = {source_of(r): headers_of(r)["error-reason"] for r in dlq}
    expected = {coords[6]: "empty_value", coords[7]: "unsupported_image", coords[8]: "undecodable_image",
                coords[9]: "malformed_envelope"}
    assert reasons == expected
    for rec in dlq:
        h = headers_of(rec)
        i = coords.index(source_of(rec))
        assert rec.value == values[i] and rec.key == f"k{i}".encode()
        assert h["error-message"] and h["error-class"] and h["worker-version"]
        assert h["source-topic"] == settings.input_topic
    for rec in results:
        check_demo_result(result_doc(rec), pixels[coords.index(source_of(rec))])
