"""The GPU process's decode thread (``gpu_decode_thread``): the next full batch's ``stage`` runs there while the
GPU thread launches the current one; the GPU thread still writes every batch, runs the engines and releases.
CPU runtime with a fake decoder here (the real nvImageCodec path runs in tests/gpu and the bench)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from tests.test_device_decode import PIPELINE, FillDecoder, ResidentEngine
from worker.engines.base import CpuRuntime
from worker.errors import DeviceError
from worker.gpu.requests import InferenceRequest
from worker.gpu.thread import GpuThread
from worker.metrics import Metrics


class HelperRuntime(CpuRuntime):
    """The CPU runtime, recording on which thread its context was made current and left, and when it stopped."""

    def __init__(self, fail_helper: bool = False) -> None:
        self.events: list[tuple[str, str]] = []
        self.fail_helper = fail_helper

    @contextlib.contextmanager
    def helper_context(self):
        if self.fail_helper:
            raise DeviceError("cuCtxPushCurrent failed: invalid context", cuda_error="CUDA_ERROR_INVALID_CONTEXT")
        self.events.append(("enter", threading.current_thread().name))
        try:
            yield
        finally:
            self.events.append(("exit", threading.current_thread().name))

    def stop(self) -> None:
        self.events.append(("stop", threading.current_thread().name))


class ThreadedFillDecoder(FillDecoder):
    """FillDecoder recording the thread of every call; ``fail_on_decode_thread`` stages that raise there."""

    def __init__(self, engine: ResidentEngine, fail_on_decode_thread: int = 0) -> None:
        super().__init__(engine)
        self.threads: list[tuple[str, tuple, str]] = []
        self.reserved: list[tuple[str, int]] = []  # (thread, batches the engine had queued by then)
        self.fail_on_decode_thread = fail_on_decode_thread

    def reserve(self) -> None:
        self.reserved.append((threading.current_thread().name, len(self.engine.batch_sizes)))

    def stage(self, items):
        name = threading.current_thread().name
        self.threads.append(("stage", tuple(items), name))
        if name == "gpu-decode" and self.fail_on_decode_thread:
            self.fail_on_decode_thread -= 1
            raise RuntimeError("nvImageCodec: decoding failed")
        return super().stage(items)

    def write(self, staged):
        self.threads.append(("write", tuple(staged), threading.current_thread().name))
        return super().write(staged)


async def _run(gpu: GpuThread, values: list[int]) -> list:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in values]
    for v, fut in zip(values, futures):  # queued before the thread starts: full batches waiting
        gpu.submit(InferenceRequest(None, fut, loop, {"value": v}, encoded=v))
    await gpu.start()
    try:
        return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 20)
    finally:
        gpu.stop()


def _sums(engine: ResidentEngine, values: list[int]) -> list[int]:
    return [v * int(np.prod(engine.spec.preprocess.hwc_shape)) for v in values]


@pytest.mark.parametrize("decode_thread", [True, False])
async def test_the_next_batches_are_staged_on_the_decode_thread_and_written_on_the_gpu_thread(decode_thread):
    engine = ResidentEngine(PIPELINE.models[0], 4)
    decoder = ThreadedFillDecoder(engine)
    runtime = HelperRuntime()
    gpu = GpuThread(runtime, [engine], max_batch_size=4, max_wait_ms=2000, warmup=False, batches_in_flight=2,
                    device_decoder=lambda rt, engines, max_batch: decoder, decode_thread=decode_thread)
    values = list(range(20, 36))  # 13 would be a model error, 99 a rejected image (FillDecoder)
    outcomes = await _run(gpu, values)
    assert [int(o.outputs[0]["sum"]) for o in outcomes] == _sums(engine, values)
    batches = [tuple(values[i:i + 4]) for i in range(0, 16, 4)]
    stages = [(items, name) for what, items, name in decoder.threads if what == "stage"]
    # the first batch is decoded when it runs (nothing ran before it); the next ones while the one before ran
    helper = "gpu-decode" if decode_thread else "gpu"
    assert stages == [(batches[0], "gpu")] + [(b, helper) for b in batches[1:]]
    assert {name for what, _, name in decoder.threads if what == "write"} == {"gpu"}
    # one job at a time: batch k is staged only after batch k-1 was written (its rows and decode event)
    order = [(what, items) for what, items, _ in decoder.threads]
    for k in range(1, 4):
        assert order.index(("write", batches[k - 1])) < order.index(("stage", batches[k]))
    assert sorted(s for what, s in decoder.events if what == "release") == batches  # every batch released
    if decode_thread:
        # each job submitted on the GPU thread (buffers reserved there) once the batch before was written and
        # before its models were queued: the decode then overlaps that enqueue and the wait for the device
        assert decoder.reserved == [("gpu", 0), ("gpu", 1), ("gpu", 2)]
        # the context made current on the decode thread, and left there before the runtime stopped
        assert runtime.events == [("enter", "gpu-decode"), ("exit", "gpu-decode"), ("stop", "gpu")]
    else:
        assert decoder.reserved == [] and runtime.events == [("stop", "gpu")]


async def test_a_batch_the_decode_thread_fails_is_decoded_again_on_the_gpu_thread():
    engine = ResidentEngine(PIPELINE.models[0], 4)
    decoder = ThreadedFillDecoder(engine, fail_on_decode_thread=1)
    metrics = Metrics()
    gpu = GpuThread(HelperRuntime(), [engine], max_batch_size=4, max_wait_ms=2000, warmup=False,
                    batches_in_flight=2, metrics=metrics,
                    device_decoder=lambda rt, engines, max_batch: decoder, decode_thread=True)
    values = list(range(1, 13))
    outcomes = await _run(gpu, values)
    assert [int(o.outputs[0]["sum"]) for o in outcomes] == _sums(engine, values)
    stages = [(items, name) for what, items, name in decoder.threads if what == "stage"]
    assert stages == [((1, 2, 3, 4), "gpu"), ((5, 6, 7, 8), "gpu-decode"), ((5, 6, 7, 8), "gpu"),
                      ((9, 10, 11, 12), "gpu-decode")]
    phases = {ph: metrics.registry.get_sample_value("worker_gpu_phase_seconds_total", {"phase": ph})
              for ph in ("decode_thread", "decode_wait")}
    assert all(v is not None and v >= 0 for v in phases.values()), phases


async def test_a_decode_thread_that_cannot_take_the_context_fails_start_up_and_the_runtime_stops():
    engine = ResidentEngine(PIPELINE.models[0], 4)
    runtime = HelperRuntime(fail_helper=True)
    gpu = GpuThread(runtime, [engine], max_batch_size=4, max_wait_ms=2000, warmup=False, batches_in_flight=2,
                    device_decoder=lambda rt, engines, max_batch: ThreadedFillDecoder(engine), decode_thread=True)
    with pytest.raises(DeviceError, match="invalid context"):
        await gpu.start()
    assert runtime.events == [("stop", "gpu")]
    assert not gpu.alive()


def test_one_stage_at_a_time_when_the_gpu_thread_decodes_while_the_decode_thread_does():
    """A batch the GPU thread decodes itself (items retried one by one after a model error) while the decode
    thread has a job: nvImageCodec's decoder is never called from both at once (the decoder's staging lock)."""
    import time

    from tests.test_device_decode import _encoded, _fake_decoder
    from worker.samples import encode

    dec, _, _ = _fake_decoder()
    inside, overlaps = [], []
    real = dec._decoder.decode

    def decode(streams, images=None, params=None, cuda_stream=0):
        if inside:
            overlaps.append(threading.current_thread().name)
        inside.append(1)
        time.sleep(0.01)  # long enough for the other thread to arrive while this call runs
        inside.pop()
        return real(streams, images=images, params=params, cuda_stream=cuda_stream)

    dec._decoder = SimpleNamespace(decode=decode)
    jpeg = _encoded(encode(np.zeros((20, 30, 3), np.uint8), "jpeg"))
    threads = [threading.Thread(target=lambda: [dec.stage([jpeg]) for _ in range(10)]) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert overlaps == []
