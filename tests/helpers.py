"""Test helpers: produce to and read back from the real broker, and the models' exact references."""

from __future__ import annotations

import asyncio
import json
import time

import cv2
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from worker.models.bundled import channel_means_reference, gray_thumbnail_reference


async def produce(bootstrap: str, topic: str, values: list[bytes], partitions: int,
                  headers: list | None = None) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=50_000_000)
    await producer.start()
    try:
        futs = [await producer.send(topic, v, key=f"k{i}".encode(), partition=i % partitions,
                                    headers=headers[i] if headers else None)
                for i, v in enumerate(values)]
        return [(m.partition, m.offset) for m in await asyncio.gather(*futs)]
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 120.0,
                   settle_s: float = 0.0) -> list:
    """Read ``topic`` from the start until ``expected`` records (then ``settle_s`` more, to catch extras)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def headers_of(record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def source_of(record) -> tuple[int, int]:
    h = headers_of(record)
    return int(h["source-partition"]), int(h["source-offset"])


def demo_reference(image: np.ndarray) -> dict:
    """What the demo pipeline must output for a 64x64 decoded image (BGR, BGRA or gray), computed
    without the worker: channel means in RGB order, and the thumbnail/hash of the gray image."""
    if image.ndim == 2:
        bgr = np.repeat(image[:, :, None], 3, axis=2)
        gray = image
    else:
        bgr = image[:, :, :3]
        gray = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2GRAY)  # OpenCV's BT.601 weights
    rgb = bgr[:, :, ::-1].astype(np.float32).transpose(2, 0, 1)[None]
    means = channel_means_reference(rgb)[0]
    thumb = gray_thumbnail_reference(gray.astype(np.float32)[None, None])
    return {"means": means, "thumbnail": thumb["thumbnail"][0], "ahash": thumb["ahash"][0]}


def check_demo_result(doc: dict, image: np.ndarray) -> None:
    ref = demo_reference(image)
    means = np.array(doc["models"]["channel_means"]["outputs"]["means"]["data"], np.float32)
    np.testing.assert_allclose(means, ref["means"], rtol=1e-5)
    thumb = doc["models"]["gray_thumbnail"]["outputs"]
    np.testing.assert_allclose(np.array(thumb["thumbnail"]["data"], np.float32), ref["thumbnail"], rtol=1e-6)
    np.testing.assert_array_equal(np.array(thumb["ahash"]["data"], np.uint8), ref["ahash"])


def result_doc(record) -> dict:
    return json.loads(record.value)


def exif_rotated_jpeg() -> bytes:
    """A JPEG stored 40 wide and 20 high with EXIF orientation 6 (rotate 90 degrees clockwise to display):
    upright it is 20 wide and 40 high; columns are a ramp, so a wrong rotation shows."""
    import io

    from PIL import Image

    img = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1)), "L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def kafka_clients(name: str) -> dict[str, str]:
    """The intake's Kafka clients for a test run with each library ("aiokafka", "librdkafka"): its
    consumer and its producer both on that one (kafka_consumer, kafka_producer)."""
    return {"kafka_consumer": name, "kafka_producer": name}
