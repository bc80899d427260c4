"""Two batches in flight on the GPU thread (``gpu_batches_in_flight=2``): the next full batch is queued on
the device before the thread waits for the current one.

The runtime here is the CPU one with a device's timing imitated where it matters: ``LazyEngine`` reads its
host rows only when the batch is waited for (as a queued host-to-device copy reads pinned memory when the
stream gets to it), so a host buffer reused too early gives wrong sums; ``RecordingRuntime`` logs which
batch was queued and which waited for, in order, and can fail a wait as a device error would.
"""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from tests.test_engine_failure import SPEC, _image
from worker import log
from worker.engines.base import CpuRuntime
from worker.errors import ConfigError, DeviceError, ModelRejectedInput
from worker.gpu.requests import InferenceRequest, InferenceResult
from worker.gpu.thread import GpuThread, batches_in_flight
from worker.settings import Settings

pytestmark = pytest.mark.timeout(60)
SIZE = int(np.prod(SPEC.preprocess.hwc_shape))


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    log.configure("json", "warning", stream=sys.stderr)


class RecordingRuntime(CpuRuntime):
    """Batch events are numbers 1, 2, ...; ``fail_wait``: waiting for that batch raises a device error."""

    def __init__(self, fail_wait: int = 0) -> None:
        self.log: list[tuple[str, int]] = []
        self.fail_wait = fail_wait
        self._done = 0

    def batch_done(self) -> int:
        self._done += 1
        self.log.append(("queued", self._done))
        return self._done

    def wait_batch(self, done: object) -> None:
        assert isinstance(done, int)
        self.log.append(("waited", done))
        if done == self.fail_wait:
            raise DeviceError("device failure (CUDA_ERROR_ILLEGAL_ADDRESS): an illegal memory access",
                              cuda_error="CUDA_ERROR_ILLEGAL_ADDRESS")


class LazyEngine:
    """Sums each row, reading the rows only when collected (after the batch was waited for); a row of
    13s is an input the model refuses, raised when queued (as ONNX Runtime checks at Run)."""

    def __init__(self) -> None:
        self.spec = SPEC
        self.batches: list[int] = []

    def activate(self, runtime, max_batch_size: int) -> None:
        pass

    def enqueue(self, batch: np.ndarray):
        flat = batch.reshape(len(batch), -1)  # a view of the thread's host rows: not copied here
        if np.all(flat == 13, axis=1).any():
            raise ValueError("model cannot take this input")
        self.batches.append(len(batch))
        return lambda: {"sum": flat.astype(np.int64).sum(axis=1)}

    def deactivate(self) -> None:
        pass


async def _run(gpu: GpuThread, values: list[int]) -> list:
    """Every request queued before the thread starts: full batches waiting, as under load."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in values]
    for v, fut in zip(values, futures):
        gpu.submit(InferenceRequest([_image(v)], fut, loop, {"value": v}))
    await gpu.start()
    try:
        return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 20)
    finally:
        gpu.stop()


@pytest.mark.parametrize("depth", [1, 2])
async def test_the_next_batch_is_queued_before_the_current_one_is_waited_for(depth):
    runtime, engine = RecordingRuntime(), LazyEngine()
    gpu = GpuThread(runtime, [engine], max_batch_size=4, max_wait_ms=2000, warmup=False, batches_in_flight=depth)
    values = list(range(1, 13))
    outcomes = await _run(gpu, values)
    # exact results although the next batch's rows were written while this one was still unread
    assert [int(o.outputs[0]["sum"]) for o in outcomes] == [v * SIZE for v in values]
    assert engine.batches == [4, 4, 4]
    if depth == 1:
        assert runtime.log == [("queued", 1), ("waited", 1), ("queued", 2), ("waited", 2),
                               ("queued", 3), ("waited", 3)]
    else:
        assert runtime.log == [("queued", 1), ("queued", 2), ("waited", 1), ("queued", 3), ("waited", 2),
                               ("waited", 3)]


async def test_with_nothing_waiting_behind_it_a_batch_is_finished_at_once():
    """Two in flight only when the next batch is already there: a lone batch is not held back."""
    runtime, engine = RecordingRuntime(), LazyEngine()
    gpu = GpuThread(runtime, [engine], max_batch_size=4, max_wait_ms=1, warmup=False, batches_in_flight=2)
    await gpu.start()
    try:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        gpu.submit(InferenceRequest([_image(5)], fut, loop, {}))
        result = await asyncio.wait_for(fut, 10)
    finally:
        gpu.stop()
    assert isinstance(result, InferenceResult) and int(result.outputs[0]["sum"]) == 5 * SIZE
    assert runtime.log == [("queued", 1), ("waited", 1)]


async def test_a_device_error_under_the_first_batch_fails_both_in_flight_and_what_waits():
    runtime, engine = RecordingRuntime(fail_wait=1), LazyEngine()
    fatal: list = []
    gpu = GpuThread(runtime, [engine], max_batch_size=4, max_wait_ms=2000, warmup=False, batches_in_flight=2,
                    on_fatal=fatal.append)
    outcomes = await _run(gpu, list(range(1, 13)))
    # batch 1 failed on the device, batch 2 was queued behind it, batch 3 was taken to follow: none has a
    # result, each a retriable error (nothing committed), and the thread is down
    assert all(isinstance(o, DeviceError) for o in outcomes[:4]), outcomes
    assert not any(isinstance(o, InferenceResult) for o in outcomes), outcomes
    assert fatal and isinstance(fatal[0], DeviceError) and not gpu.alive()
    assert runtime.log[:3] == [("queued", 1), ("queued", 2), ("waited", 1)]


async def test_a_model_error_in_the_second_batch_leaves_the_first_ones_results_and_isolates_the_input():
    runtime, engine = RecordingRuntime(), LazyEngine()
    gpu = GpuThread(runtime, [engine], max_batch_size=4, max_wait_ms=2000, warmup=False, batches_in_flight=2)
    values = [1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 10, 11]
    outcomes = await _run(gpu, values)
    for v, out in zip(values, outcomes):
        if v == 13:
            assert isinstance(out, ModelRejectedInput), out
        else:
            assert isinstance(out, InferenceResult) and int(out.outputs[0]["sum"]) == v * SIZE, (v, out)
    # batch 1 finished before batch 2's items were run one by one (nothing else in flight then)
    assert engine.batches[:1] == [4] and engine.batches[1:4] == [1, 1, 1]


def test_the_setting_is_one_or_two_and_the_cpu_runtime_uses_one():
    assert Settings().gpu_batches_in_flight == 2
    with pytest.raises(ConfigError, match=r"gpu_batches_in_flight must be 1\.\.2, got 3"):
        Settings(gpu_batches_in_flight=3)
    assert batches_in_flight(2, CpuRuntime()) == 1
    assert batches_in_flight(2, RecordingRuntime()) == 1  # kind "cpu"

    class Cuda:
        kind = "cuda"

    assert batches_in_flight(2, Cuda()) == 2 and batches_in_flight(1, Cuda()) == 1
    with pytest.raises(ConfigError):
        GpuThread(CpuRuntime(), [LazyEngine()], 4, 1, batches_in_flight=3)


async def test_a_batch_queued_behind_another_counts_only_its_own_time():
    """worker_inference_seconds and each result's inference_s: from launch, or from when the batch before
    finished if it was queued behind it. The fake device takes 10 ms a batch (the clock moves only while
    the thread waits for a batch), so each of the three batches took 10 ms, not the 20 ms a batch queued
    behind another spends between its launch and its end."""
    now = [0.0]

    class TimedRuntime(RecordingRuntime):
        def wait_batch(self, done: object) -> None:
            super().wait_batch(done)
            now[0] += 0.010

    gpu = GpuThread(TimedRuntime(), [LazyEngine()], max_batch_size=4, max_wait_ms=2000, warmup=False,
                    batches_in_flight=2, clock=lambda: now[0])
    outcomes = await _run(gpu, list(range(1, 13)))
    assert [round(o.inference_s, 6) for o in outcomes] == [0.010] * 12


def test_batch_decoded_labels_where_a_batch_was_decoded():
    from worker.gpu.thread import batch_decoded

    card = SimpleNamespace(encoded=b"jpeg")
    row = SimpleNamespace(encoded=None)
    assert batch_decoded([card, card]) == "card"
    assert batch_decoded([row]) == "rows"
    assert batch_decoded([row, card]) == "mixed"
