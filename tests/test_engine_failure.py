"""Engine failures are not poison (issue 12a).

When a batch fails, the GPU thread retries it item by item. An input that fails alone goes to the DLQ
only while the engine demonstrably works (another item of the batch ran, or the warm-up's zero rows run);
an engine that fails a known-good input too, or every input of a batch, is an ``EngineFailure``: the
worker stops non-zero, nothing of the batch is dead-lettered or committed. A bug (``TypeError``, ...)
on the GPU thread is fatal as well.

The GPU thread with fake engines (host rows and rows decoded on the device), then whole workers on the
real broker with the demo pipeline's engines wrapped to fail.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from tests.helpers import read_all
from tests.procs import committed_offsets
from worker import log
from worker.app import Worker
from worker.broker import create_topics
from worker.engines import create_engine
from worker.engines.base import CpuRuntime
from worker.errors import EngineFailure, FatalError, ModelRejectedInput
from worker.gpu.thread import GpuThread
from worker.gpu.requests import InferenceRequest, InferenceResult
from worker.models import default_pipeline_path
from worker.models.spec import load_pipeline
from worker.samples import encode, synth_image

pytestmark = pytest.mark.timeout(120)
PIPELINE = load_pipeline(default_pipeline_path())
SPEC = PIPELINE.models[0]
ENGINE_DOWN = "execute_async_v3 returned false: no message"  # what TensorRT says when a run fails


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    log.configure("json", "warning", stream=sys.stderr)


class FakeEngine:
    """Sums each row. ``broken_after``: every call after that many raises (an engine that warmed up and
    then broke); ``bad``: a batch holding a row whose bytes all equal it raises (one input the model
    cannot take); ``nonzero_fails``: any row that is not all zeros raises; ``raises``: the class raised."""

    def __init__(self, spec=SPEC, broken_after: int | None = None, bad: int | None = None,
                 nonzero_fails: bool = False, raises: type[BaseException] = RuntimeError) -> None:
        self.spec = spec
        self.broken_after, self.bad, self.nonzero_fails, self.raises = broken_after, bad, nonzero_fails, raises
        self.batches: list[list[int]] = []  # per call, the first byte of each row

    def activate(self, runtime, max_batch_size: int) -> None:
        pass

    def enqueue(self, batch: np.ndarray):
        flat = batch.reshape(len(batch), -1)
        self.batches.append([int(row[0]) for row in flat])
        return self._run(flat)

    def _run(self, flat: np.ndarray):
        if self.broken_after is not None and len(self.batches) > self.broken_after:
            raise self.raises(ENGINE_DOWN)
        if self.bad is not None and np.all(flat == self.bad, axis=1).any():
            raise self.raises("model cannot take this input")
        if self.nonzero_fails and flat.any():
            raise self.raises("fails on every real input")
        sums = flat.astype(np.int64).sum(axis=1)
        return lambda: {"sum": sums}

    def deactivate(self) -> None:
        pass


def _image(value: int, spec=SPEC) -> np.ndarray:
    return np.full(spec.preprocess.hwc_shape, value, np.uint8)


async def _run(gpu: GpuThread, values: list[int], encoded: bool = False) -> list:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in values]
    for v, fut in zip(values, futures):
        if encoded:
            gpu.submit(InferenceRequest(None, fut, loop, {"value": v}, encoded=v))
        else:
            gpu.submit(InferenceRequest([_image(v)], fut, loop, {"value": v}))
    return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)


async def _stopped(gpu: GpuThread, fatal: list) -> None:
    for _ in range(200):
        if not gpu.alive() and fatal:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the GPU thread did not stop")


def _gpu(engine, batch: int, fatal: list, warmup: bool = True, wait_ms: float = 2000, **kw) -> GpuThread:
    """``wait_ms=0``: each request runs as a batch of one (no other item can vouch for the engine)."""
    return GpuThread(CpuRuntime(), [engine], max_batch_size=batch, max_wait_ms=wait_ms, on_fatal=fatal.append,
                     warmup=warmup, **kw)


# --- the GPU thread with fake engines -------------------------------------------------------------------
@pytest.mark.parametrize("values", [[1, 2, 3, 4], [7]], ids=["batch", "single"])
async def test_an_engine_broken_after_warm_up_is_an_engine_failure_not_poison(values):
    engine = FakeEngine(broken_after=2)  # warm-up runs 1 row and a full batch, then the engine breaks
    fatal: list = []
    gpu = _gpu(engine, 4, fatal, wait_ms=2000 if len(values) > 1 else 0)
    await gpu.start()
    try:
        outcomes = await _run(gpu, values)
        await _stopped(gpu, fatal)
    finally:
        gpu.stop()
    assert all(isinstance(o, EngineFailure) for o in outcomes), outcomes
    assert not any(isinstance(o, ModelRejectedInput) for o in outcomes)  # nothing to the DLQ
    assert isinstance(fatal[0], EngineFailure) and isinstance(gpu.fatal_error, EngineFailure)
    message = str(fatal[0])
    assert "known-good input" in message and ENGINE_DOWN in message, message
    # the batch, each item alone, then the canary: one zero row
    assert engine.batches[2] == values and engine.batches[-1] == [0]
    with pytest.raises(FatalError):
        gpu.submit(InferenceRequest([_image(1)], asyncio.get_running_loop().create_future(),
                                    asyncio.get_running_loop()))


async def test_every_input_of_a_batch_failing_alone_is_the_engines_fault_even_if_zero_rows_run():
    engine = FakeEngine(nonzero_fails=True)
    fatal: list = []
    gpu = _gpu(engine, 3, fatal)
    await gpu.start()
    try:
        outcomes = await _run(gpu, [5, 6, 7])
        await _stopped(gpu, fatal)
    finally:
        gpu.stop()
    assert all(isinstance(o, EngineFailure) for o in outcomes), outcomes
    assert "all 3 inputs of the batch failed alone" in str(fatal[0])


async def test_one_input_failing_alone_while_the_canary_runs_is_poison_and_the_thread_goes_on():
    engine = FakeEngine(bad=13)
    fatal: list = []
    gpu = _gpu(engine, 4, fatal, wait_ms=0)
    await gpu.start()
    try:
        (rejected,) = await _run(gpu, [13])
        (good,) = await _run(gpu, [2])
        assert gpu.alive() and not fatal
    finally:
        gpu.stop()
    assert isinstance(rejected, ModelRejectedInput) and rejected.reason == "model_error"
    assert isinstance(good, InferenceResult) and int(good.outputs[0]["sum"]) == 2 * _image(2).size
    assert engine.batches[2:5] == [[13], [13], [0]]  # the batch, the item alone, the canary (zero row)


async def test_one_poison_input_among_good_ones_needs_no_canary():
    engine = FakeEngine(bad=13)
    fatal: list = []
    gpu = _gpu(engine, 5, fatal, warmup=False)
    await gpu.start()
    try:
        outcomes = await _run(gpu, [1, 2, 13, 4, 5])
        assert gpu.alive() and not fatal
    finally:
        gpu.stop()
    assert [type(o).__name__ for o in outcomes] == ["InferenceResult"] * 2 + ["ModelRejectedInput"] + \
        ["InferenceResult"] * 2
    assert engine.batches == [[1, 2, 13, 4, 5], [1], [2], [13], [4], [5]]  # no zero-row canary


@pytest.mark.parametrize("bug", [TypeError, AttributeError, KeyError])
async def test_a_bug_on_the_gpu_thread_is_fatal_not_poison(bug):
    engine = FakeEngine(bad=13, raises=bug)
    fatal: list = []
    gpu = _gpu(engine, 3, fatal, warmup=False)
    await gpu.start()
    try:
        outcomes = await _run(gpu, [1, 13, 2])
        await _stopped(gpu, fatal)
    finally:
        gpu.stop()
    assert all(isinstance(o, FatalError) and not isinstance(o, ModelRejectedInput) for o in outcomes), outcomes
    assert "bug on the GPU thread" in str(fatal[0]) and bug.__name__ in str(fatal[0])
    assert engine.batches == [[1, 13, 2]]  # not retried item by item


# --- the same with images decoded on the device ---------------------------------------------------------
class ResidentEngine(FakeEngine):
    """As a real engine: ``enqueue`` copies host rows into the device input rows, ``enqueue_resident``
    runs on those rows (written there by the decoder)."""

    def __init__(self, max_batch: int, **kw) -> None:
        super().__init__(**kw)
        self.rows = np.zeros((max_batch, *self.spec.preprocess.hwc_shape), np.uint8)
        self.device_input = 0

    def enqueue(self, batch: np.ndarray):
        self.rows[:len(batch)] = batch
        return self.enqueue_resident(len(batch))

    def enqueue_resident(self, n: int):
        flat = self.rows[:n].reshape(n, -1)
        self.batches.append([int(row[0]) for row in flat])
        return self._run(flat)


class FillDecoder:
    """Writes each item's value into its row."""

    def __init__(self, engine: ResidentEngine) -> None:
        self.engine = engine

    def warm_up(self, batches: int = 1) -> None:
        pass

    def stage(self, items):
        return list(items)

    def write(self, staged):
        for i, value in enumerate(staged):
            self.engine.rows[i] = value
        return list(range(len(staged))), []

    def release(self, staged) -> None:
        pass

    def close(self) -> None:
        pass


async def test_device_decoded_path_broken_engine_is_fatal_and_a_lone_bad_input_is_poison():
    broken = ResidentEngine(4, broken_after=2)
    fatal: list = []
    gpu = _gpu(broken, 4, fatal, device_decoder=lambda runtime, engines, n: FillDecoder(broken))
    await gpu.start()
    try:
        assert gpu.decodes_on_device
        outcomes = await _run(gpu, [3, 4, 5], encoded=True)
        await _stopped(gpu, fatal)
    finally:
        gpu.stop()
    assert all(isinstance(o, EngineFailure) for o in outcomes), outcomes
    assert broken.batches[-1] == [0]  # the canary: the warm-up's zero row, through enqueue

    picky = ResidentEngine(4, bad=13)
    fatal = []
    gpu = _gpu(picky, 4, fatal, wait_ms=0, device_decoder=lambda runtime, engines, n: FillDecoder(picky))
    await gpu.start()
    try:
        (rejected,) = await _run(gpu, [13], encoded=True)
        (good,) = await _run(gpu, [6], encoded=True)
        assert gpu.alive() and not fatal
    finally:
        gpu.stop()
    assert isinstance(rejected, ModelRejectedInput)
    assert isinstance(good, InferenceResult) and int(good.outputs[0]["sum"]) == 6 * _image(6).size


# --- whole workers on the real broker -------------------------------------------------------------------
class Wrapped:
    """A real engine of the demo pipeline, made to fail: every run after ``broken_after`` runs, or a
    batch holding a row whose bytes all equal ``bad``."""

    def __init__(self, inner, broken_after: int | None = None, bad: int | None = None) -> None:
        self._inner, self.spec = inner, inner.spec
        self.broken_after, self.bad, self.calls = broken_after, bad, 0

    def activate(self, runtime, max_batch_size: int) -> None:
        self._inner.activate(runtime, max_batch_size)

    def enqueue(self, batch: np.ndarray):
        self.calls += 1
        if self.broken_after is not None and self.calls > self.broken_after:
            raise RuntimeError(ENGINE_DOWN)
        if self.bad is not None and np.all(batch.reshape(len(batch), -1) == self.bad, axis=1).any():
            raise ValueError("model cannot take this input")
        return self._inner.enqueue(batch)

    def deactivate(self) -> None:
        self._inner.deactivate()


async def _serve(settings, engines, done) -> tuple[Worker, int]:
    """A worker with these engines on the CPU runtime, until it stops by itself or ``done(worker)``."""
    ref: list[Worker] = []
    gpu = GpuThread(CpuRuntime(), engines, settings.max_batch_size, settings.max_wait_ms,
                    on_fatal=lambda exc: ref[0].fail(exc) if ref else None)
    await gpu.start()
    worker = Worker(settings, PIPELINE, gpu)
    ref.append(worker)
    run = asyncio.create_task(worker.run())
    while not run.done() and not done(worker):
        await asyncio.sleep(0.05)
    worker.request_stop()
    return worker, await asyncio.wait_for(run, 60)


def _pngs(n: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    return [encode(synth_image(rng, 64, 64, 3), "png") for _ in range(n)]


async def test_a_worker_whose_engine_breaks_after_warm_up_exits_non_zero_dead_letters_and_commits_nothing(
        settings):
    from tests.helpers import produce

    partitions = 2
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, partitions),
                                                     (settings.output_topic, 1), (settings.dlq_topic, 1)])
    await produce(settings.bootstrap_servers, settings.input_topic, _pngs(20), partitions)
    # warm-up runs two batches (1 row, max_batch_size rows) per engine; the engine fails from then on
    engines = [Wrapped(create_engine(spec, settings), broken_after=2) for spec in PIPELINE.models]
    worker, code = await _serve(settings, engines, lambda w: False)

    assert code == 1 and worker.exit_code == 1
    assert isinstance(worker._fatal, EngineFailure), worker._fatal
    assert worker.counts["dead_lettered"] == 0 and worker.counts["published"] == 0
    assert worker.counts["consumed"] > 0
    dlq, out = await asyncio.gather(read_all(settings.bootstrap_servers, settings.dlq_topic, 1, timeout_s=2),
                                    read_all(settings.bootstrap_servers, settings.output_topic, 1, timeout_s=2))
    assert dlq == [] and out == []
    committed = await committed_offsets(settings.bootstrap_servers, settings.group_id, settings.input_topic,
                                        partitions)
    assert committed == {p: None for p in range(partitions)}, committed


async def test_a_worker_dead_letters_only_the_one_input_its_model_rejects(settings):
    from tests.helpers import headers_of, produce, source_of

    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 1), (settings.output_topic, 1),
                                                     (settings.dlq_topic, 1)])
    values = _pngs(30)
    values[11] = encode(np.full((64, 64, 3), 13, np.uint8), "png")  # every pre-processed byte is 13
    coords = await produce(settings.bootstrap_servers, settings.input_topic, values, 1)
    engines = [Wrapped(create_engine(spec, settings), bad=13) for spec in PIPELINE.models]
    settings = settings.replace(max_wait_ms=50.0)
    worker, code = await _serve(settings, engines,  # the stop commits what is finished
                                lambda w: w.counts["published"] + w.counts["dead_lettered"] >= len(values))
    assert code == 0, worker._fatal
    dlq = await read_all(settings.bootstrap_servers, settings.dlq_topic, 1, timeout_s=10, settle_s=0.5)
    out = await read_all(settings.bootstrap_servers, settings.output_topic, 29, timeout_s=10, settle_s=0.5)
    assert [source_of(r) for r in dlq] == [coords[11]]
    assert headers_of(dlq[0])["error-reason"] == "model_error"
    assert sorted(source_of(r) for r in out) == sorted(c for i, c in enumerate(coords) if i != 11)
    committed = await committed_offsets(settings.bootstrap_servers, settings.group_id, settings.input_topic, 1)
    assert committed == {0: len(values)}
