"""Kafka → decode → GPU (CUDA runtime, ONNX Runtime CUDA provider) → Kafka, with the local broker,
on a real NVIDIA GPU: N images in, N correct results out, each checked to the element."""

from __future__ import annotations

import pytest

from tests.gpu.test_gpu_runtime import WHY_NOT
from tests.helpers import check_demo_result, produce, result_doc, source_of
from tests.test_end_to_end import lossless_images, run_until
from worker.broker import create_topics
from worker.choices import KafkaConsumer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(WHY_NOT), reason=f"needs an NVIDIA GPU: {WHY_NOT}")]


@pytest.mark.parametrize("consumer", list(KafkaConsumer), ids=lambda c: c.value)
async def test_kafka_gpu_kafka_n_in_n_correct_out(settings, consumer):
    n = 1000
    settings = settings.replace(device="cuda", max_batch_size=64, decode_workers=8, kafka_consumer=consumer)
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 4), (settings.output_topic, 4),
                                                    (settings.dlq_topic, 1)])
    blobs, pixels = lossless_images(n, seed=7)
    coords = await produce(settings.bootstrap_servers, settings.input_topic, blobs, 4)
    (records,), worker, code = await run_until(settings, {settings.output_topic: n})
    assert code == 0
    assert worker.gpu.runtime.kind == "cuda", worker.gpu.runtime.device_name
    assert len(records) == n
    index = {c: i for i, c in enumerate(coords)}
    assert {source_of(r) for r in records} == set(coords)
    for rec in records:
        check_demo_result(result_doc(rec), pixels[index[source_of(rec)]])
    sizes = [result_doc(r)["batch_size"] for r in records]
    print(f"\n{n} results on {worker.gpu.runtime.device_name} ({consumer.value} consumer): max batch {max(sizes)}, "
          f"mean batch {sum(sizes) / len(sizes):.1f}, batches {worker.gpu.batches}")
