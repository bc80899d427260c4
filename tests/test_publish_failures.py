"""Publish failures: retriable or permanent (issue 12b).

Retriable trouble (broker away, leader moving) is retried for as long as it lasts, and readiness turns
false once no record was acknowledged for the bound. Permanent refusals (invalid topic name, no
authorisation) and a topic that stays missing past the bound raise ``PublishFailed``: the worker stops
non-zero and commits nothing that was not acknowledged. At start-up the output and DLQ topics are
checked before anything is consumed.

On tansu (the test broker) a metadata request creates a missing topic with a legal name, so "missing"
is exercised with fakes; an invalid name is refused by the broker itself (InvalidTopicError).
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka import errors as E

import worker.intake.publish as publish
from tests.helpers import produce, read_all
from tests.procs import committed_offsets
from worker import log
from worker.app import Worker
from worker.broker import create_topics
from worker.engines import create_engine
from worker.engines.base import CpuRuntime
from worker.errors import FatalError, PublishFailed, UnwritableTopic
from worker.gpu.thread import GpuThread
from worker.intake import rdkafka_producer
from worker.intake.publish import Publisher, classify, topic_error, topic_name_problem
from worker.intake.rdkafka_producer import RdKafkaProducer
from worker.intake.records import Record
from worker.health import HealthState
from worker.models import default_pipeline_path
from worker.models.spec import load_pipeline
from worker.settings import Settings
from worker.samples import encode, synth_image

pytestmark = pytest.mark.timeout(120)
PIPELINE = load_pipeline(default_pipeline_path())
BAD = "bad topic!"


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    log.configure("json", "warning", stream=sys.stderr)


# --- classification -------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc, kind", [
    (E.KafkaTimeoutError(), "retriable"),  # batch expired: the broker is away
    (E.KafkaConnectionError(), "retriable"),
    (E.NotLeaderForPartitionError(), "retriable"),
    (E.RequestTimedOutError(), "retriable"),
    (E.NotEnoughReplicasError(), "retriable"),
    (E.UnknownError(), "retriable"),
    (E.KafkaError("something new"), "retriable"),  # unknown: retried, readiness shows the stall
    (E.UnknownTopicOrPartitionError(), "missing"),
    (E.TopicAuthorizationFailedError(), "permanent"),
    (E.ClusterAuthorizationFailedError(), "permanent"),
    (E.InvalidTopicError(), "permanent"),
    (E.SaslAuthenticationFailed(), "permanent"),
    (E.UnsupportedVersionError(), "permanent"),
    (E.InvalidRequestError(), "permanent"),  # a broker refusal aiokafka does not flag retriable
    (E.ProducerClosed(), "permanent"),
])
def test_classify(exc, kind):
    assert classify(exc) == kind


@pytest.mark.parametrize("name, ok", [("results", True), ("images.dlq", True), ("a_b-c.9", True),
                                      ("x" * 249, True), ("x" * 250, False), (BAD, False), ("", False),
                                      (".", False), ("..", False), ("caf\u00e9", False)])
def test_topic_name_rules(name, ok):
    assert (topic_name_problem(name) == "") is ok


# --- the publisher with a fake producer ------------------------------------------------------------------
class FlakyProducer:
    """``send`` raises the queued errors one per call (forever the last one if ``repeat``), then acks."""

    def __init__(self, errors: list[BaseException], repeat: bool = False) -> None:
        self.errors, self.repeat, self.sends = errors, repeat, 0

    async def send(self, topic, value, key=None, headers=None):
        self.sends += 1
        if self.errors:
            raise self.errors[0] if self.repeat else self.errors.pop(0)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


REC = Record(b"v", None, [])


async def test_a_permanent_refusal_is_fatal_at_once_and_names_the_topic():
    producer = FlakyProducer([E.TopicAuthorizationFailedError()], repeat=True)
    pub = Publisher(producer, 10, backoff_s=(0.01, 0.05))
    with pytest.raises(PublishFailed) as caught:
        await asyncio.wait_for(pub.publish("results", REC), 2)
    assert producer.sends == 1
    assert isinstance(caught.value, FatalError) and caught.value.topic == "results"
    assert "'results'" in str(caught.value) and "grant" in str(caught.value)


async def test_retriable_trouble_retries_and_marks_not_ready_after_the_bound_until_an_ack():
    trouble: list[bool] = []
    health = HealthState(models_ready=True, joined=True, broker_ok=True)
    producer = FlakyProducer([E.KafkaTimeoutError()] * 12)
    pub = Publisher(producer, 10, on_broker_trouble=trouble.append, backoff_s=(0.01, 0.02), stall_after_s=0.1,
                    on_stalled=health.publish_stalled)
    seen: list[bool] = []
    task = asyncio.create_task(pub.publish("results", REC))
    while not task.done():
        seen.append(health.readiness()[0])
        await asyncio.sleep(0.005)
    await task  # retried through every error: no raise
    assert producer.sends == 13 and trouble[-1] is False
    assert seen[0] is True and False in seen  # ready at first, not ready once the bound passed
    assert health.readiness() == (True, {"models_ready": True, "consumer_joined": True, "broker_reachable": True,
                                         "publishing": True})


async def test_a_short_blip_does_not_touch_readiness():
    stalled: list[bool] = []
    producer = FlakyProducer([E.KafkaTimeoutError()] * 2)
    pub = Publisher(producer, 10, backoff_s=(0.01, 0.02), stall_after_s=5.0, on_stalled=stalled.append)
    await pub.publish("results", REC)
    assert stalled == []


async def test_a_topic_that_stays_missing_past_the_bound_is_fatal(monkeypatch):
    asked: list[str] = []

    async def missing(producer, topic):
        asked.append(topic)
        return E.UnknownTopicOrPartitionError

    monkeypatch.setattr(publish, "topic_error", missing)
    producer = FlakyProducer([E.UnknownTopicOrPartitionError()], repeat=True)
    stalled: list[bool] = []
    pub = Publisher(producer, 10, backoff_s=(0.01, 0.02), stall_after_s=0.2, on_stalled=stalled.append)
    with pytest.raises(PublishFailed, match="'results': it does not exist") as caught:
        await asyncio.wait_for(pub.publish("results", REC), 5)
    assert producer.sends > 3  # retried until the bound, then given up on
    assert "create the topic" in str(caught.value)
    assert asked and set(asked) == {"results"}


async def test_an_unknown_topic_the_broker_calls_invalid_or_unauthorised_is_fatal_at_once(monkeypatch):
    for said in (E.InvalidTopicError, E.TopicAuthorizationFailedError):
        async def answer(producer, topic, said=said):
            return said

        monkeypatch.setattr(publish, "topic_error", answer)
        producer = FlakyProducer([E.UnknownTopicOrPartitionError()], repeat=True)
        pub = Publisher(producer, 10, backoff_s=(0.01, 0.02), stall_after_s=30)
        with pytest.raises(PublishFailed, match=said.__name__):
            await asyncio.wait_for(pub.publish("results", REC), 2)
        assert producer.sends == 1


async def test_a_topic_that_exists_again_after_an_unknown_topic_error_is_retried(monkeypatch):
    async def exists(producer, topic):
        return None  # a leader moving: the metadata has the topic again

    monkeypatch.setattr(publish, "topic_error", exists)
    producer = FlakyProducer([E.UnknownTopicOrPartitionError()] * 3)
    pub = Publisher(producer, 10, backoff_s=(0.01, 0.02), stall_after_s=30)
    await asyncio.wait_for(pub.publish("results", REC), 2)
    assert producer.sends == 4


# --- the real broker --------------------------------------------------------------------------------------
def _producer(kind: str, bootstrap: str):
    """The intake's producer of either library (kafka_producer), as Publisher gets it."""
    if kind == "librdkafka":
        return RdKafkaProducer(rdkafka_producer.config(Settings(bootstrap_servers=bootstrap), None))
    return AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=1000)


PRODUCERS = pytest.mark.parametrize("kind", ["aiokafka", "librdkafka"])


@PRODUCERS
async def test_what_tansu_answers_for_a_missing_and_an_invalid_topic(broker, topics, kind):
    producer = _producer(kind, broker.bootstrap)
    pub = Publisher(producer, 10)
    await pub.start()
    try:
        assert await topic_error(producer, topics["output"]) is None  # created by the metadata request
        assert await topic_error(producer, BAD) is E.InvalidTopicError
        assert await topic_error(producer, "x" * 300) is E.InvalidTopicError
        await pub.check_topics([topics["output"], topics["dlq"]])
        if kind == "aiokafka":  # the producer's own metadata has them: the first send waits for no lookup
            assert producer.client.cluster.partitions_for_topic(topics["dlq"])
        # the name check comes first; the broker's answer is what a legal name it refuses would get
        with pytest.raises(UnwritableTopic, match="'bad topic!' is not a valid topic name"):
            await pub.check_topics([topics["output"], BAD])
    finally:
        await pub.stop()


@PRODUCERS
async def test_publishing_to_an_invalid_topic_on_the_broker_fails_for_good(broker, kind):
    pub = Publisher(_producer(kind, broker.bootstrap), 10, backoff_s=(0.01, 0.02))
    await pub.start()
    try:
        with pytest.raises(PublishFailed, match="'bad topic!'"):
            await asyncio.wait_for(pub.publish(BAD, REC), 30)
    finally:
        await pub.stop()


def _pngs(n: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    return [encode(synth_image(rng, 64, 64, 3), "png") for _ in range(n)]


async def _run_worker(settings) -> tuple[Worker, int]:
    ref: list[Worker] = []
    engines = [create_engine(spec, settings) for spec in PIPELINE.models]
    gpu = GpuThread(CpuRuntime(), engines, settings.max_batch_size, settings.max_wait_ms,
                    on_fatal=lambda exc: ref[0].fail(exc) if ref else None)
    await gpu.start()
    worker = Worker(settings, PIPELINE, gpu)
    ref.append(worker)
    return worker, await asyncio.wait_for(worker.run(), 60)


@pytest.mark.parametrize("which", ["output_topic", "dlq_topic"])
async def test_a_worker_with_an_invalid_topic_stops_at_start_up_naming_it(settings, which):
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 1)])
    await produce(settings.bootstrap_servers, settings.input_topic, _pngs(5), 1)
    settings = settings.replace(**{which: BAD})
    worker, code = await _run_worker(settings)
    assert code == 1
    assert isinstance(worker._fatal, UnwritableTopic), worker._fatal
    assert "cannot write to topic 'bad topic!'" in str(worker._fatal)
    assert worker.counts["consumed"] == 0  # checked before consuming
    assert await committed_offsets(settings.bootstrap_servers, settings.group_id, settings.input_topic, 1) \
        == {0: None}


@PRODUCERS
async def test_a_worker_whose_output_topic_cannot_be_written_stops_and_commits_nothing(settings, monkeypatch, kind):
    """Past the start-up check (skipped here, as if the topic had gone bad since): every send fails, the
    first one found permanent stops the worker non-zero; nothing was acknowledged, nothing committed."""
    async def unchecked(self, topics, missing_for_s=None):
        return None

    real = AIOKafkaProducer
    monkeypatch.setattr(Publisher, "check_topics", unchecked)
    monkeypatch.setattr("worker.intake.clients.AIOKafkaProducer", lambda **kw: real(**{**kw, "request_timeout_ms": 1000}))
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 2), (settings.dlq_topic, 1)])
    await produce(settings.bootstrap_servers, settings.input_topic, _pngs(10), 2)
    settings = settings.replace(output_topic=BAD, kafka_producer=kind)
    worker, code = await _run_worker(settings)
    assert code == 1
    assert isinstance(worker._fatal, PublishFailed) and "'bad topic!'" in str(worker._fatal), worker._fatal
    assert worker.counts["consumed"] > 0 and worker.counts["published"] == 0
    assert await read_all(settings.bootstrap_servers, settings.dlq_topic, 1, timeout_s=1) == []
    assert await committed_offsets(settings.bootstrap_servers, settings.group_id, settings.input_topic, 2) \
        == {0: None, 1: None}
