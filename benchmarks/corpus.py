"""The bench's inputs: realistic JPEGs, fresh topics per measured run, and the preloading producer.

Images are 640x480 colour JPEGs at quality 90 made by ``worker.samples.synth_image`` (gradients, shapes,
sensor-like noise: about 75 KB each, decode cost close to a photograph's). ``unique`` distinct images are
generated and cycled up to ``count``: generating is slower than decoding, and the worker keeps no cache,
so repeating content changes nothing it measures.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaProducer

from worker.broker import create_topics
from worker.samples import encode, synth_image

WIDTH, HEIGHT, QUALITY = 640, 480, 90


def bench_images(count: int, unique: int = 256, seed: int = 0, width: int = WIDTH, height: int = HEIGHT,
                 quality: int = QUALITY, threads: int = 0) -> list[bytes]:
    """``count`` encoded JPEGs (``unique`` distinct ones, cycled), deterministic for a seed."""
    unique = max(1, min(unique, count))

    def one(i: int) -> bytes:
        rng = np.random.default_rng([seed, i])
        return encode(synth_image(rng, width, height, 3), "jpeg", quality)

    with ThreadPoolExecutor(threads or None) as pool:
        distinct = list(pool.map(one, range(unique)))
    return [distinct[i % unique] for i in range(count)]


def describe(images: list[bytes]) -> dict:
    sizes = np.array([len(b) for b in images])
    return {"count": len(images), "distinct": len({id(b) for b in images}), "format": "jpeg",
            "width": WIDTH, "height": HEIGHT, "quality": QUALITY,
            "mean_bytes": int(sizes.mean()) if len(sizes) else 0, "total_bytes": int(sizes.sum())}


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    group: str

    @classmethod
    def fresh(cls, label: str) -> Topics:
        tag = f"{label}-{uuid.uuid4().hex[:6]}"
        return cls(f"bench-{tag}-images", f"bench-{tag}-results", f"bench-{tag}-dlq", f"bench-{tag}")

    async def create(self, bootstrap: str, partitions: int) -> None:
        await create_topics(bootstrap, [(self.input, partitions), (self.output, partitions), (self.dlq, 1)])


async def preload(bootstrap: str, topic: str, images: list[bytes], partitions: int,
                  max_pending: int = 512) -> float:
    """Write every image (key = its index, round-robin over partitions); returns seconds taken."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_request_size=10_485_760, max_batch_size=1 << 20)
    await producer.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        pending: list[asyncio.Future] = []
        for i, data in enumerate(images):
            pending.append(await producer.send(topic, data, key=str(i).encode(), partition=i % partitions))
            if len(pending) >= max_pending:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return loop.time() - started
