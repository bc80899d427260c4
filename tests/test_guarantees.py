"""The delivery guarantees at component level, with fakes where the fault-injection tests cannot aim.

- The GPU thread isolates a model failure to the one bad input of a batch, and fails a whole batch as
  retriable (stopping the thread) on a device error.
- The offset tracker's generations: work from an earlier ownership of a partition cannot touch a later one.
- The Worker, in process, with a fake consumer and producer: on revoke, in-flight work of the revoked
  partitions is waited for (bounded), cut, flushed and committed; a partition revoked and assigned back
  while old tasks still run gets a clean state; too-large DLQ records go without the value; a crashed
  stage exits non-zero; the publisher does not retry a record the broker can never take.
"""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from worker import log
from worker.app import Worker
from worker.engines.base import CpuRuntime
from worker.errors import DeviceError, FatalError, ModelRejectedInput
from worker.gpu.thread import GpuThread
from worker.gpu.requests import InferenceRequest, InferenceResult
from worker.policy.offsets import OffsetTracker
from worker.intake.publish import Publisher, RecordTooLarge
from worker.models import default_pipeline_path
from worker.models.spec import load_pipeline
from worker.samples import encode
from worker.settings import Settings

pytestmark = pytest.mark.timeout(60)
PIPELINE = load_pipeline(default_pipeline_path())


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    """Other tests configure structlog with their own captured stderr, closed once they end; a log call
    on a closed stream raises, in the GPU thread too. Log to this test's stream."""
    log.configure("json", "warning", stream=sys.stderr)


# --- GPU thread: isolation and device errors ------------------------------------------------------------
class PickyEngine:
    """Sums each image; raises on a batch holding an image whose bytes all equal ``bad`` (a model that
    chokes on one input), or DeviceError on ``device_bad``."""

    def __init__(self, spec, bad: int = 13, device_bad: int | None = None) -> None:
        self.spec = spec
        self.bad, self.device_bad = bad, device_bad
        self.batch_sizes: list[int] = []

    def activate(self, runtime, max_batch_size: int) -> None:
        pass

    def enqueue(self, batch: np.ndarray):
        self.batch_sizes.append(len(batch))
        flat = batch.reshape(len(batch), -1)
        if self.device_bad is not None and np.all(flat == self.device_bad, axis=1).any():
            raise DeviceError("CUDA error: an illegal memory access was encountered", "CUDA_ERROR_ILLEGAL_ADDRESS")
        if np.all(flat == self.bad, axis=1).any():
            raise ValueError("model cannot take this input")
        sums = flat.astype(np.int64).sum(axis=1)
        return lambda: {"sum": sums}

    def deactivate(self) -> None:
        pass


def _image(value: int, spec) -> np.ndarray:
    return np.full(spec.preprocess.hwc_shape, value, np.uint8)


async def _run_gpu(engine, values: list[int], on_fatal=None):
    spec = engine.spec
    gpu = GpuThread(CpuRuntime(), [engine], max_batch_size=len(values), max_wait_ms=2000, on_fatal=on_fatal,
                    warmup=False)
    await gpu.start()
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in values]
    for v, fut in zip(values, futures):
        gpu.submit(InferenceRequest([_image(v, spec)], fut, loop, {"value": v}))
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    return gpu, outcomes


async def test_model_failure_on_one_input_dead_letters_only_that_input():
    engine = PickyEngine(PIPELINE.models[0], bad=13)
    values = [1, 2, 3, 13, 5, 6, 7, 8]
    gpu, outcomes = await _run_gpu(engine, values)
    try:
        assert engine.batch_sizes[0] == len(values)  # one batch first, then one by one
        assert engine.batch_sizes[1:] == [1] * len(values)
        size = int(np.prod(PIPELINE.models[0].preprocess.hwc_shape))
        for v, out in zip(values, outcomes):
            if v == 13:
                assert isinstance(out, ModelRejectedInput) and out.reason == "model_error"
                assert "ValueError: model cannot take this input" in str(out)
            else:
                assert isinstance(out, InferenceResult), out
                assert int(out.outputs[0]["sum"]) == v * size  # each item's own output: no mix-up
                assert out.batch_size == 1
        assert gpu.alive()
    finally:
        gpu.stop()


async def test_device_error_fails_the_whole_batch_and_stops_the_thread():
    engine = PickyEngine(PIPELINE.models[0], device_bad=77)
    fatal: list[BaseException] = []
    gpu, outcomes = await _run_gpu(engine, [1, 77, 3], on_fatal=fatal.append)
    assert all(isinstance(o, DeviceError) for o in outcomes), outcomes  # retriable: never committed
    for _ in range(100):
        if not gpu.alive() and fatal:
            break
        await asyncio.sleep(0.02)
    assert not gpu.alive() and isinstance(fatal[0], DeviceError)
    with pytest.raises(FatalError):
        gpu.submit(InferenceRequest([_image(1, engine.spec)], asyncio.get_running_loop().create_future(),
                                    asyncio.get_running_loop()))


# --- offset tracker generations -------------------------------------------------------------------------
def test_finish_from_an_ended_ownership_cannot_touch_the_new_one():
    t, tp = OffsetTracker(), ("t", 0)
    old = t.start(tp, 10)
    t.start(tp, 11)
    t.forget(tp)  # revoked with 10 and 11 still running
    new = t.start(tp, 10)  # assigned back: the committed position is 10, so 10 comes again
    assert new != old
    assert t.finish(tp, 10, old) is False  # the old task's late finish
    assert t.committable(tp) == 10 and t.in_flight(tp) == 1
    assert t.finish(tp, 10, new) is True
    assert t.to_commit() == {tp: 11}


def test_start_refuses_offsets_in_flight_or_committed():
    t, tp = OffsetTracker(), ("t", 0)
    assert t.start(tp, 0) is not None
    assert t.start(tp, 0) is None
    t.finish(tp, 0)
    t.mark_committed(t.to_commit())
    assert t.start(tp, 0) is None
    assert t.start(tp, 1) is not None


# --- the Worker with a fake consumer and producer -----------------------------------------------------
TOPIC = "in"
TP0, TP1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
PNG = encode(np.full((64, 64, 3), 100, np.uint8), "png")


class FakeConsumer:
    def __init__(self) -> None:
        self.polls = 0
        self.queue: list = []
        self.assigned: set = set()
        self.paused: set = set()
        self.commits: list[dict] = []
        self.listener = None
        self.fail_getmany: BaseException | None = None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def subscribe(self, topics, listener) -> None:
        self.listener = listener

    def assignment(self) -> set:
        return set(self.assigned)

    def pause(self, *tps) -> None:
        self.paused |= set(tps)

    def resume(self, *tps) -> None:
        self.paused -= set(tps)

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        self.polls += 1
        if self.fail_getmany is not None:
            raise self.fail_getmany
        out: dict = {}
        keep = []
        for msg in self.queue:
            tp = TopicPartition(msg.topic, msg.partition)
            if tp in self.assigned and tp not in self.paused and sum(map(len, out.values())) < (max_records or 1e9):
                out.setdefault(tp, []).append(msg)
            else:
                keep.append(msg)
        self.queue = keep
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out

    async def commit(self, positions: dict) -> None:
        assert set(positions) <= self.assigned, "commit for a partition not assigned"
        self.commits.append(dict(positions))

    async def end_offsets(self, tps) -> dict:
        return {tp: 0 for tp in tps}

    async def topics(self) -> set:
        return {TOPIC}

    async def committed(self, tp):
        return None


class FakePublisher:
    def __init__(self, max_value: int = 1 << 30) -> None:
        self.sent: list[tuple[str, object]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.max_value = max_value

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def publish(self, topic: str, record) -> None:
        await self.gate.wait()
        if len(record.value) > self.max_value:
            raise RecordTooLarge(f"{len(record.value)} bytes")
        self.sent.append((topic, record))


class HeldGpu:
    """Holds every request until ``release()``; resolves with outputs shaped like the demo pipeline's."""

    decodes_on_device = False

    def __init__(self) -> None:
        self.held: list[InferenceRequest] = []

    async def put(self, req: InferenceRequest) -> None:
        self.submit(req)

    def submit(self, req: InferenceRequest) -> None:
        self.held.append(req)

    def release(self) -> None:
        outputs = [{"means": np.zeros(3, np.float32)},
                   {"thumbnail": np.zeros((8, 8), np.float32), "ahash": np.zeros(64, np.uint8)}]
        for req in self.held:
            if not req.future.done():
                req.future.set_result(InferenceResult(outputs, 0.0, 0.0, len(self.held)))
        self.held.clear()

    def stop(self) -> None:
        pass


def msg(partition: int, offset: int, value: bytes | None = PNG):
    return SimpleNamespace(topic=TOPIC, partition=partition, offset=offset, timestamp=0, key=b"k",
                           value=value, headers=[])


def make_worker(monkeypatch, **overrides):
    values = dict(input_topic=TOPIC, http_port=0, device="cpu", commit_interval_ms=50, rebalance_timeout_s=0.3,
                  drain_timeout_s=1.0, decode_workers=1)
    settings = Settings(**{**values, **overrides})
    gpu = HeldGpu()
    worker = Worker(settings, PIPELINE, gpu)
    consumer, publisher = FakeConsumer(), FakePublisher()

    def new_clients(self) -> None:
        self.consumer, self.publisher = consumer, publisher

    monkeypatch.setattr(Worker, "_new_clients", new_clients)
    return worker, consumer, publisher, gpu


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


async def run_with_two_partitions(worker, consumer) -> asyncio.Task:
    """Start ``worker.run()`` and give it partitions 0 and 1, as a group join would."""
    run = asyncio.create_task(worker.run())
    await until(lambda: consumer.listener is not None)
    consumer.assigned = {TP0, TP1}
    await consumer.listener.on_partitions_assigned({TP0, TP1})
    return run


async def test_revoke_cuts_late_work_and_a_reassigned_partition_starts_clean(monkeypatch):
    worker, consumer, publisher, gpu = make_worker(monkeypatch)
    run = await run_with_two_partitions(worker, consumer)
    consumer.queue = [msg(0, o) for o in range(4)] + [msg(1, o) for o in range(2)]
    await until(lambda: len(gpu.held) == 6)

    # Revoke with everything held in the GPU: the bounded wait ends, the work is cut, nothing committed.
    await consumer.listener.on_partitions_revoked({TP0, TP1})
    assert worker.tracker.in_flight() == 0 and not worker._tasks
    assert consumer.commits == []
    consumer.assigned = set()
    gpu.release()  # the old requests finish now, after the revoke: their tasks are gone
    await asyncio.sleep(0.1)
    assert publisher.sent == [], "a result for a revoked partition was published after the revoke"

    # Assigned back; the broker redelivers from the committed position (none: offset 0).
    consumer.assigned = {TP0}
    await consumer.listener.on_partitions_assigned({TP0})
    consumer.queue = [msg(0, o) for o in range(4)]
    await until(lambda: len(gpu.held) == 4)
    gpu.release()
    await until(lambda: len(publisher.sent) == 4)
    await until(lambda: consumer.commits and consumer.commits[-1] == {TP0: 4})
    assert all(TP1 not in c for c in consumer.commits)
    worker.request_stop()
    assert await run == 0


async def test_revoke_waits_for_in_flight_work_then_commits_it(monkeypatch):
    worker, consumer, publisher, gpu = make_worker(monkeypatch, commit_interval_ms=60_000)
    run = asyncio.create_task(worker.run())
    await until(lambda: consumer.listener is not None)
    consumer.assigned = {TP0}
    await consumer.listener.on_partitions_assigned({TP0})
    consumer.queue = [msg(0, o) for o in range(3)]
    await until(lambda: len(gpu.held) == 3)
    asyncio.get_running_loop().call_later(0.1, gpu.release)  # finishes within the revoke's wait
    await consumer.listener.on_partitions_revoked({TP0})
    assert len(publisher.sent) == 3
    assert consumer.commits == [{TP0: 3}]
    worker.request_stop()
    assert await run == 0


async def test_backpressure_pauses_keeps_polling_resumes_at_low_water_and_survives_a_rebalance(monkeypatch):
    worker, consumer, publisher, gpu = make_worker(monkeypatch, max_in_flight=4, resume_in_flight=2)
    run = await run_with_two_partitions(worker, consumer)
    consumer.queue = [msg(0, o) for o in range(10)] + [msg(1, o) for o in range(10)]
    await until(lambda: len(gpu.held) == 4)
    await until(lambda: consumer.paused == {TP0, TP1})
    polls = consumer.polls
    await asyncio.sleep(0.3)
    assert consumer.polls > polls, "getmany must go on while paused (group membership)"
    assert len(gpu.held) == 4 and worker.tracker.in_flight() == 4  # never past max_in_flight

    # A rebalance while paused: aiokafka forgets pauses; the worker applies them again.
    consumer.paused = set()
    await consumer.listener.on_partitions_revoked({TP0, TP1})  # cuts the 4 held (rebalance_timeout 0.3 s)
    gpu.held.clear()
    worker.backpressure.paused = True  # as if the revoke came while still at the high mark
    await consumer.listener.on_partitions_assigned({TP0, TP1})
    assert consumer.paused == {TP0, TP1}
    worker.backpressure.paused = False
    consumer.paused = set()

    # Low water: with everything released as it comes, the rest flows and the partitions end resumed.
    async def release_all() -> None:
        while True:
            gpu.release()
            await asyncio.sleep(0.02)
    releaser = asyncio.create_task(release_all())
    await until(lambda: not consumer.queue and worker.tracker.in_flight() == 0)
    releaser.cancel()
    assert not consumer.paused
    worker.request_stop()
    assert await run == 0


async def test_dlq_record_too_large_goes_without_the_value(monkeypatch):
    worker, consumer, publisher, gpu = make_worker(monkeypatch)
    publisher.max_value = 1000
    run = asyncio.create_task(worker.run())
    await until(lambda: consumer.listener is not None)
    consumer.assigned = {TP0}
    await consumer.listener.on_partitions_assigned({TP0})
    consumer.queue = [msg(0, 0, b"\x00" * 5000)]  # unknown format, and too big to resend whole
    await until(lambda: len(publisher.sent) == 1)
    topic, record = publisher.sent[0]
    h = dict(record.headers)
    assert topic == worker.settings.dlq_topic and record.value == b""
    assert h["error-reason"] == b"unsupported_image" and b"5000 bytes" in h["dlq-value-omitted"]
    await until(lambda: consumer.commits and consumer.commits[-1] == {TP0: 1})
    worker.request_stop()
    assert await run == 0


async def test_a_result_too_large_to_send_dead_letters_its_input(monkeypatch):
    worker, consumer, publisher, gpu = make_worker(monkeypatch)
    publisher.max_value = len(PNG) + 10  # the DLQ record (the PNG) fits; the JSON result does not
    run = asyncio.create_task(worker.run())
    await until(lambda: consumer.listener is not None)
    consumer.assigned = {TP0}
    await consumer.listener.on_partitions_assigned({TP0})
    consumer.queue = [msg(0, 0)]
    await until(lambda: len(gpu.held) == 1)
    gpu.release()
    await until(lambda: len(publisher.sent) == 1)
    topic, record = publisher.sent[0]
    assert topic == worker.settings.dlq_topic and record.value == PNG
    assert dict(record.headers)["error-reason"] == b"result_too_large"
    await until(lambda: consumer.commits and consumer.commits[-1] == {TP0: 1})
    worker.request_stop()
    assert await run == 0


async def test_a_crashed_stage_exits_non_zero(monkeypatch):
    worker, consumer, publisher, gpu = make_worker(monkeypatch)
    consumer.fail_getmany = RuntimeError("fetcher bug")
    assert await asyncio.wait_for(worker.run(), 10) == 1
    assert isinstance(worker._fatal, RuntimeError)


# --- the publisher ----------------------------------------------------------------------------------------
class FlakyProducer:
    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.sends = 0

    async def send(self, topic, value, key=None, headers=None):
        self.sends += 1
        if self.errors:
            raise self.errors.pop(0)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def test_publisher_retries_broker_trouble_with_backoff_but_not_an_oversized_record():
    from worker.intake.records import Record

    trouble: list[bool] = []
    producer = FlakyProducer([KafkaTimeoutError(), KafkaTimeoutError()])
    pub = Publisher(producer, 10, on_broker_trouble=trouble.append, backoff_s=(0.01, 0.05))
    await pub.publish("t", Record(b"v", None, []))
    assert producer.sends == 3 and trouble == [True, True, False]

    producer = FlakyProducer([MessageSizeTooLargeError("too big")])
    pub = Publisher(producer, 10, backoff_s=(0.01, 0.05))
    with pytest.raises(RecordTooLarge):
        await asyncio.wait_for(pub.publish("t", Record(b"v" * 10, None, [])), 2)
    assert producer.sends == 1
