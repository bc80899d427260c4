"""Compressed record batches (issue 12): every Kafka codec read and written, on the real broker.

Inputs come from aiokafka and from librdkafka (confluent-kafka: the client under most non-Python
producers), each batching several records; the tansu broker stores a batch as it came, so the worker's
consumer decompresses exactly what the producer compressed (checked below by hiding the codec from a
plain consumer). A missing codec library is a start-up ``ConfigError`` that names it, never a crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import codec as aiokafka_codec
from aiokafka.errors import UnsupportedCodecError

from tests.helpers import check_demo_result, kafka_clients, result_doc, source_of
from tests.kafka_broker import both_brokers
from tests.test_end_to_end import run_until
from worker import codecs
from worker.broker import create_topics
from worker.errors import ConfigError
from worker.samples import encode, synth_image
from worker.service import serve
from worker.settings import Settings

CODECS = codecs.CODECS
PARTITIONS = 2
PER_PRODUCER = 6


def images(n: int, seed: int) -> tuple[list[bytes], list[np.ndarray]]:
    """64x64 PNGs (lossless: the test knows every decoded pixel)."""
    rng = np.random.default_rng(seed)
    pixels = [synth_image(rng, 64, 64, 3) for _ in range(n)]
    return [encode(p, "png") for p in pixels], pixels


async def produce_aiokafka(bootstrap: str, topic: str, values: list[bytes], codec: str) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50,
                                compression_type=codecs.producer_compression(codec))
    await producer.start()
    try:
        futs = [await producer.send(topic, v, key=f"a{i}".encode(), partition=i % PARTITIONS)
                for i, v in enumerate(values)]
        return [(m.partition, m.offset) for m in await asyncio.gather(*futs)]
    finally:
        await producer.stop()


def produce_librdkafka(bootstrap: str, topic: str, values: list[bytes], codec: str) -> list[tuple[int, int]]:
    import confluent_kafka

    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "compression.type": codec,
                                         "linger.ms": 50, "acks": "all", "log_level": 3})
    out: dict[int, tuple[int, int]] = {}
    errors: list = []

    def delivered(i: int):
        def cb(err, msg) -> None:
            if err is not None:
                errors.append((i, err))
            else:
                out[i] = (msg.partition(), msg.offset())
        return cb

    for i, v in enumerate(values):
        producer.produce(topic, v, key=f"r{i}".encode(), partition=i % PARTITIONS, on_delivery=delivered(i))
    left = producer.flush(30)
    assert not errors and left == 0, f"librdkafka {codec}: delivery failed: {errors}, {left} left"
    return [out[i] for i in range(len(values))]


@contextlib.contextmanager
def codec_hidden(codec: str):
    """As if the library of ``codec`` were not installed: aiokafka's has_<codec>() says False."""
    name = f"has_{codec}"
    real = getattr(aiokafka_codec, name)
    setattr(aiokafka_codec, name, lambda: False)
    try:
        yield
    finally:
        setattr(aiokafka_codec, name, real)


async def assert_stored_compressed(bootstrap: str, topic: str, codec: str) -> None:
    """A consumer without ``codec`` cannot read ``topic``: its batches really are ``codec``-compressed."""
    with codec_hidden(codec):
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        try:
            with pytest.raises(UnsupportedCodecError, match=codec):
                for _ in range(50):
                    await consumer.getmany(timeout_ms=200)
        finally:
            await consumer.stop()


@both_brokers
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("kafka_consumer", ["aiokafka", "librdkafka"])
async def test_every_codec_in_from_aiokafka_and_librdkafka_and_out(settings, codec, kafka_consumer):
    """Input batches of ``codec`` from both clients → one result per input offset, read by either of the
    intake's consumers (kafka_consumer); results written with output_compression=``codec`` and read back."""
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, PARTITIONS),
                                                    (settings.output_topic, PARTITIONS), (settings.dlq_topic, 1)])
    blobs_a, pixels_a = images(PER_PRODUCER, seed=1)
    blobs_r, pixels_r = images(PER_PRODUCER, seed=2)
    coords_a = await produce_aiokafka(settings.bootstrap_servers, settings.input_topic, blobs_a, codec)
    coords_r = await asyncio.to_thread(produce_librdkafka, settings.bootstrap_servers, settings.input_topic,
                                       blobs_r, codec)
    pixels = dict(zip(coords_a + coords_r, pixels_a + pixels_r))
    keys = dict(zip(coords_a + coords_r, [f"a{i}".encode() for i in range(PER_PRODUCER)]
                    + [f"r{i}".encode() for i in range(PER_PRODUCER)]))
    assert len(pixels) == 2 * PER_PRODUCER, "the broker gave two records the same offset"
    if codec != "none":
        await assert_stored_compressed(settings.bootstrap_servers, settings.input_topic, codec)

    (records,), worker, code = await run_until(settings.replace(output_compression=codec, **kafka_clients(kafka_consumer)),
                                               {settings.output_topic: len(pixels)}, timeout_s=120.0)
    assert code == 0
    by_source: dict[tuple[int, int], list] = {}
    for rec in records:
        by_source.setdefault(source_of(rec), []).append(rec)
    assert sorted(by_source) == sorted(pixels), f"results for {sorted(by_source)}, inputs at {sorted(pixels)}"
    for coord, recs in by_source.items():
        assert len(recs) == 1, f"{len(recs)} results for input {coord}"
        doc = result_doc(recs[0])
        assert (doc["source"]["partition"], doc["source"]["offset"]) == coord
        assert recs[0].key == keys[coord]
        check_demo_result(doc, pixels[coord])
    assert worker.counts == {"consumed": len(pixels), "published": len(pixels), "dead_lettered": 0, "failed": 0}
    if codec != "none":
        await assert_stored_compressed(settings.bootstrap_servers, settings.output_topic, codec)


# --- start-up check and the runtime error ----------------------------------------------------

def test_start_up_check_passes_with_every_codec_installed():
    assert codecs.check_codecs() == ["gzip", "snappy", "lz4", "zstd"]


def test_start_up_check_names_the_missing_codec_and_what_to_install():
    def missing(_payload: bytes) -> bytes:
        raise NotImplementedError("Snappy codec is not available")

    table = codecs.aiokafka_codecs()
    table["snappy"] = (missing, missing)
    table["zstd"] = (lambda b: b, lambda b: b[:-1])  # a broken library: the round trip changes the bytes
    with pytest.raises(ConfigError) as info:
        codecs.check_codecs(table)
    msg = str(info.value)
    assert "snappy (NotImplementedError: Snappy codec is not available; needs cramjam)" in msg
    assert "zstd (round trip changed the bytes; needs cramjam)" in msg
    assert "gzip (" not in msg and "lz4 (" not in msg
    assert "pip install 'cramjam>=2.8.0'" in msg


async def test_serve_refuses_to_start_without_cramjam(settings, monkeypatch):
    """The real start-up path: aiokafka without cramjam → ConfigError before any client starts."""
    monkeypatch.setattr(aiokafka_codec, "cramjam", None)
    with pytest.raises(ConfigError, match=r"snappy .*lz4 .*zstd .*pip install 'cramjam"):
        await serve(settings)


async def test_undecompressable_batch_at_run_time_exits_1_saying_what_to_install(settings, monkeypatch):
    """Past the check (here: skipped), a batch the consumer cannot decompress stops the worker with exit
    1 and an error that names the codec and the package, leaving the offset uncommitted."""
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 1), (settings.output_topic, 1),
                                                    (settings.dlq_topic, 1)])
    blobs, _ = images(3, seed=3)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=50,
                                compression_type="snappy")
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(settings.input_topic, b, partition=0) for b in blobs])
    finally:
        await producer.stop()
    monkeypatch.setattr("worker.service.check_codecs", lambda: None)
    workers: list = []
    with codec_hidden("snappy"):
        code = await asyncio.wait_for(serve(settings, worker_out=workers), timeout=120)
    assert code == 1
    fatal = workers[0]._fatal
    assert isinstance(fatal, ConfigError) and isinstance(fatal.__cause__, UnsupportedCodecError)
    assert "snappy" in str(fatal) and "pip install 'cramjam" in str(fatal)
    assert workers[0].counts["consumed"] == 0


def test_explain_leaves_other_errors_alone():
    exc = RuntimeError("boom")
    assert codecs.explain(exc) is exc


def test_output_compression_setting():
    assert Settings().output_compression == "none"
    assert codecs.producer_compression("none") is None
    assert codecs.producer_compression("zstd") == "zstd"
    field = next(f for f in dataclasses.fields(Settings) if f.name == "output_compression")
    assert field.metadata["choices"] == codecs.CODECS
    with pytest.raises(ConfigError, match="output_compression='brotli' is not one of none, gzip"):
        Settings(output_compression="brotli")
