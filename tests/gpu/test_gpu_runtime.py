"""The GPU runtime on a real NVIDIA GPU: CudaRuntime, ONNX Runtime's CUDA provider, TensorRT where installed.

Run on a GPU machine with pycuda and onnxruntime-gpu installed::

    python -m pytest -m gpu tests/gpu -q -s -rA

Everything here is skipped, with the reason, where pycuda cannot initialise a device or onnxruntime
has no CUDA provider. Long runs and exit checks run in subprocesses, so that "context stack was not
empty" and crash dumps at interpreter exit are seen. Numbers are printed (-s), never asserted on time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _why_no_gpu() -> str:
    from worker.engines import cuda_unusable

    why = cuda_unusable(0)
    if why:
        return why
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime is not importable ({exc})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime has no CUDA provider ({ort.get_available_providers()}); install onnxruntime-gpu"
    return ""


WHY_NOT = _why_no_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(WHY_NOT), reason=f"needs an NVIDIA GPU: {WHY_NOT}")]

from worker.engines import create_engine, create_runtime  # noqa: E402
from worker.engines.base import CpuRuntime  # noqa: E402
from worker.errors import DeviceError  # noqa: E402
from worker.models.spec import ModelSpec, Preprocess  # noqa: E402
from worker.settings import Settings  # noqa: E402

RGB64 = Preprocess(width=64, height=64, layout="nchw", dtype="float32", scale=1.0)
GRAY64 = Preprocess(width=64, height=64, color="gray", layout="nchw", dtype="float32", scale=1.0)
IMAGENET = Preprocess(width=224, height=224, layout="nchw", dtype="float32", scale=1 / 255,
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def conv_model(path: Path) -> str:
    """A small convolutional model (cuDNN on the GPU): Conv 3->16 3x3, Relu, Conv 16->8 3x3/2, GAP, Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", rng.normal(0, 0.05, (16, 3, 3, 3))), ("b1", rng.normal(0, 0.1, 16)),
        ("w2", rng.normal(0, 0.1, (8, 16, 3, 3))), ("b2", rng.normal(0, 0.1, 8)),
        ("w3", rng.normal(0, 0.3, (8, 10))), ("b3", rng.normal(0, 0.1, 10))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["scores"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return str(path)


def pipeline(tmp_path: Path) -> list[ModelSpec]:
    return [
        ModelSpec(name="channel_means", path="bundled:channel_means", preprocess=RGB64),
        ModelSpec(name="gray_thumbnail", path="bundled:gray_thumbnail", preprocess=GRAY64),
        # use_tf32=0: float32 convolutions, so the result is comparable with the CPU to 1e-4
        ModelSpec(name="conv", path=conv_model(tmp_path / "conv.onnx"), preprocess=Preprocess(
            width=64, height=64, layout="nchw", dtype="float32", scale=1 / 255, mean=(0.5,), std=(0.25,)),
            extra={"cuda_provider_options": {"use_tf32": 0}}),
    ]


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64), want.astype(np.float64)
    assert np.isfinite(got).all()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def on_own_thread(fn):
    """Run ``fn`` on a fresh thread (a GPU thread of its own) and return or raise what it did."""
    from benchmarks.own_thread import on_own_thread as run

    return run(fn, "gpu-test")


def run_script(tmp_path: Path, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WORKER_MODEL_CACHE": os.environ.get(
        "WORKER_MODEL_CACHE", str(tmp_path / "models"))}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    print(f"\n--- {script.name}: exit {out.returncode}\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-4000:]}")
    return out


def assert_clean_exit(out: subprocess.CompletedProcess, code: int = 0) -> None:
    assert out.returncode == code, out.stderr[-3000:]
    for bad in ("context stack", "PyCUDA ERROR", "PyCUDA WARNING", "Segmentation fault", "core dumped"):
        assert bad not in out.stderr, f"{bad!r} at exit:\n{out.stderr[-3000:]}"


# --- 1. ONNX Runtime CUDA == CPU, every batch size, through the real GPU thread ---------------------

@pytest.mark.parametrize("shapes", ["max", "pow2"])  # pow2: a session per bucket (1, 2, 4, 8) on the one stream
def test_onnxruntime_cuda_equals_cpu_for_every_batch_size_through_the_gpu_thread(tmp_path, shapes):
    from worker.gpu.thread import GpuThread
    from worker.gpu.requests import InferenceRequest

    max_batch = 8
    specs = pipeline(tmp_path)
    settings = Settings(device="cuda", max_batch_size=max_batch, ort_batch_shapes=shapes)
    cpu = [create_engine(s, Settings(device="cpu")) for s in specs]
    for e in cpu:
        e.activate(CpuRuntime(), max_batch)
    rng = np.random.default_rng(2026)
    groups = [[[rng.integers(0, 256, size=s.preprocess.hwc_shape, dtype=np.uint8) for s in specs]
               for _ in range(n)] for n in range(1, max_batch + 1)]

    async def main():
        runtime = create_runtime(settings)
        assert runtime.kind == "cuda"
        thread = GpuThread(runtime, [create_engine(s, settings) for s in specs], max_batch, max_wait_ms=200)
        await thread.start()
        loop = asyncio.get_running_loop()
        results = []
        try:
            for group in groups:
                futures = []
                for inputs in group:
                    fut = loop.create_future()
                    thread.submit(InferenceRequest(inputs=inputs, future=fut, loop=loop))
                    futures.append(fut)
                results.append(await asyncio.gather(*futures))
        finally:
            await loop.run_in_executor(None, thread.stop)
        return runtime.device_name, results

    device, results = asyncio.run(main())
    print(f"\ndevice: {device}\n{'n':>3} {'batch':>5} " + " ".join(f"{s.name:>16}" for s in specs))
    worst = 0.0
    for n, (group, got) in enumerate(zip(groups, results, strict=True), start=1):
        errors = []
        for m, engine in enumerate(cpu):
            batch = np.stack([inputs[m] for inputs in group])
            ref = engine.enqueue(batch)()
            err = 0.0
            for name, want in ref.items():
                gpu = np.stack([r.outputs[m][name] for r in got])
                if want.dtype == np.uint8:
                    np.testing.assert_array_equal(gpu, want, err_msg=f"{specs[m].name}.{name} n={n}")
                else:
                    err = max(err, rel_error(gpu, want))
            errors.append(err)
        worst = max(worst, *errors)
        print(f"{n:>3} {got[0].batch_size:>5} " + " ".join(f"{e:>16.2e}" for e in errors))
        assert all(r.batch_size == n for r in got), "each group ran as one batch"
    assert worst < 1e-4


# --- 2. one synchronisation per batch, and a heavy model against the CPU --------------------------

def test_resnet50_on_cuda_matches_cpu_and_enqueue_does_not_wait_for_the_gpu():
    spec = ModelSpec(name="resnet50", path="bundled:resnet50", preprocess=IMAGENET,
                     extra={"cuda_provider_options": {"use_tf32": 0}})
    cpu = create_engine(spec, Settings(device="cpu"))
    cpu.activate(CpuRuntime(), 4)
    rng = np.random.default_rng(7)
    batches = [rng.integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8) for n in (1, 2, 3, 4)]
    big = rng.integers(0, 256, size=(32, 224, 224, 3), dtype=np.uint8)

    def gpu_work():
        runtime = create_runtime(Settings(device="cuda"))
        runtime.start()
        engine = create_engine(spec, Settings(device="cuda"))
        try:
            engine.activate(runtime, 32)
            outs = []
            for batch in batches:
                collect = engine.enqueue(batch)
                runtime.synchronize()
                outs.append({k: v.copy() for k, v in collect().items()})
            pinned = runtime.host_buffer(big.shape, np.uint8)
            pinned[:] = big
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                collect = engine.enqueue(pinned)
                t1 = time.perf_counter()
                runtime.synchronize()
                t2 = time.perf_counter()
                collect()
                times.append((t1 - t0, t2 - t1))
            return runtime.device_name, outs, times
        finally:
            engine.deactivate()
            runtime.stop()

    device, outs, times = on_own_thread(gpu_work)
    errors = [rel_error(o["logits"], cpu.enqueue(b)()["logits"]) for o, b in zip(outs, batches, strict=True)]
    enqueue_ms = np.median([t[0] for t in times[1:]]) * 1000
    sync_ms = np.median([t[1] for t in times[1:]]) * 1000
    print(f"\ndevice: {device}\nresnet50 rel. error vs CPU, batch 1..4: {['%.2e' % e for e in errors]}\n"
          f"batch 32: enqueue returned after {enqueue_ms:.2f} ms, synchronize waited {sync_ms:.2f} ms more "
          f"(median of 5): the host does not wait for the GPU inside enqueue")
    assert max(errors) < 1e-4


# --- 3. 10 000 batches, two ONNX Runtime sessions (+ TensorRT if importable), clean exit ------------

LONG_RUN = """
import asyncio, sys, time
import numpy as np
from worker import log
log.configure("console", "warning")  # not one line per batch
from worker.engines import create_engine, create_runtime
from worker.gpu.thread import GpuThread
from worker.gpu.requests import InferenceRequest
from worker.metrics import Metrics
from worker.models.bundled import channel_means_reference, gray_thumbnail_reference
from worker.models.spec import ModelSpec, Preprocess
from worker.settings import Settings

BATCHES = 10_000
rgb = Preprocess(width=64, height=64, layout="nchw", dtype="float32", scale=1.0)
gray = Preprocess(width=64, height=64, color="gray", layout="nchw", dtype="float32", scale=1.0)
specs = [ModelSpec(name="channel_means", path="bundled:channel_means", preprocess=rgb),
         ModelSpec(name="gray_thumbnail", path="bundled:gray_thumbnail", preprocess=gray)]
try:
    import tensorrt
    specs.append(ModelSpec(name="channel_means_trt", path="bundled:channel_means", preprocess=rgb,
                           backend="tensorrt"))
    print("tensorrt", tensorrt.__version__, "importable: a TensorRT engine joins the pipeline")
except ImportError:
    print("tensorrt not importable: two ONNX Runtime sessions only")
settings = Settings(device="cuda", max_batch_size=16, max_wait_ms=1.0)

async def main():
    runtime = create_runtime(settings)
    # metrics: the GPU thread then measures device memory after every batch, on its own thread
    thread = GpuThread(runtime, [create_engine(s, settings) for s in specs], 16, max_wait_ms=1.0,
                       metrics=Metrics())
    await thread.start()
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(11)
    checked = wrong = 0
    mem_start = None
    t0 = time.monotonic()
    try:
        while thread.batches < BATCHES:
            n = int(rng.integers(1, 17))
            rgb_in = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
            gray_in = rng.integers(0, 256, size=(n, 64, 64, 1), dtype=np.uint8)
            futures = []
            for i in range(n):
                fut = loop.create_future()
                inputs = [rgb_in[i], gray_in[i]] + ([rgb_in[i]] if len(specs) == 3 else [])
                thread.submit(InferenceRequest(inputs=inputs, future=fut, loop=loop))
                futures.append(fut)
            results = await asyncio.gather(*futures)
            if mem_start is None:
                mem_start = runtime.memory_in_use()
            if thread.batches % 50 < 2 or thread.batches >= BATCHES - 2:   # check a sample to the element
                x = rgb_in.transpose(0, 3, 1, 2).astype(np.float32)
                g = gray_in.transpose(0, 3, 1, 2).astype(np.float32)
                means, thumb = channel_means_reference(x), gray_thumbnail_reference(g)
                for i, r in enumerate(results):
                    checked += 1
                    ok = (np.allclose(r.outputs[0]["means"], means[i], rtol=1e-6)
                          and np.allclose(r.outputs[1]["thumbnail"], thumb["thumbnail"][i], rtol=1e-6)
                          and np.array_equal(r.outputs[1]["ahash"], thumb["ahash"][i])
                          and (len(specs) == 2 or np.allclose(r.outputs[2]["means"], means[i], rtol=1e-5)))
                    wrong += not ok
        mem_end = runtime.memory_in_use()
    finally:
        await loop.run_in_executor(None, thread.stop)
    seconds = time.monotonic() - t0
    print(f"device={runtime.device_name} batches={thread.batches} images={thread.images} "
          f"seconds={seconds:.1f} checked={checked} wrong={wrong} fatal={thread.fatal_error!r} "
          f"device_mem_mib_after_first_batch={mem_start >> 20} at_end={mem_end >> 20}")
    return 0 if (wrong == 0 and thread.fatal_error is None and thread.batches >= BATCHES) else 1

sys.exit(asyncio.run(main()))
"""


def test_10000_batches_alternating_sessions_without_cuda_errors_and_a_clean_exit(tmp_path):
    out = run_script(tmp_path, LONG_RUN)
    assert_clean_exit(out)
    assert "wrong=0" in out.stdout and "fatal=None" in out.stdout


# --- 4. a deliberate out-of-memory is a clear error ----------------------------------------------

OOM = """
import asyncio, sys
from worker import log
log.configure("console", "warning")
from worker.engines import create_engine, create_runtime
from worker.errors import DeviceError
from worker.gpu.thread import GpuThread
from worker.models.spec import ModelSpec, Preprocess
from worker.settings import Settings

# 16 million 64x64 RGB images: a 196 GB input buffer, more than any single GPU has.
settings = Settings(device="cuda", max_batch_size=16_000_000)
spec = ModelSpec(name="channel_means", path="bundled:channel_means",
                 preprocess=Preprocess(width=64, height=64, layout="nchw", dtype="float32"))

async def main():
    thread = GpuThread(create_runtime(settings), [create_engine(spec, settings)], settings.max_batch_size, 5.0)
    try:
        await thread.start()
    except DeviceError as exc:
        print(f"cuda_error={exc.cuda_error}")
        print(f"message={exc}")
        return 3
    return 0

sys.exit(asyncio.run(main()))
"""


def test_out_of_memory_at_start_is_a_clear_device_error_not_a_crash(tmp_path):
    out = run_script(tmp_path, OOM)
    assert_clean_exit(out, code=3)
    assert "cuda_error=CUDA_ERROR_OUT_OF_MEMORY" in out.stdout
    assert "lower max_batch_size" in out.stdout
    assert "Traceback" not in out.stderr


# --- 5. the classic wrong set-up fails; ours does not ----------------------------------------------

SETUP = """
import sys
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from worker.engines.onnxruntime import load_cuda_libraries

WRONG = sys.argv[1] == "wrong"
load_cuda_libraries()
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
model = helper.make_model(helper.make_graph(
    [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "m", [x], [y]),
    opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
batch = np.random.default_rng(0).random((8, 3, 64, 64), dtype=np.float32)
want = batch.mean(axis=(2, 3))

if WRONG:
    import pycuda.autoinit  # a context of its own (make_context), current on this thread
    import pycuda.driver as cuda
    stream = cuda.Stream()
    alloc = cuda.mem_alloc
    htod, dtoh = cuda.memcpy_htod_async, cuda.memcpy_dtoh_async
    host = cuda.pagelocked_empty((8, 3), np.float32)
    sync = stream.synchronize
    handle = stream.handle
else:
    from worker.engines.cuda import CudaRuntime
    rt = CudaRuntime(0)
    rt.start()
    import pycuda.driver as cuda
    stream = rt.stream
    alloc = cuda.mem_alloc
    htod, dtoh = cuda.memcpy_htod_async, cuda.memcpy_dtoh_async
    host = rt.host_buffer((8, 3), np.float32)
    sync = rt.synchronize
    handle = rt.stream_handle

try:
    sess = ort.InferenceSession(model.SerializeToString(), providers=[
        ("CUDAExecutionProvider", {"device_id": "0", "user_compute_stream": str(handle),
                                   "has_user_compute_stream": "1"})])
    d_in, d_out = alloc(batch.nbytes), alloc(host.nbytes)
    htod(d_in, batch, stream)
    binding = sess.io_binding()
    binding.bind_input("x", "cuda", 0, np.float32, batch.shape, int(d_in))
    binding.bind_output("y", "cuda", 0, np.float32, host.shape, int(d_out))
    opts = ort.RunOptions()
    opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
    for _ in range(3):
        sess.run_with_iobinding(binding, opts)
    dtoh(host, d_out, stream)
    sync()
    err = float(np.abs(host - want).max())
    print("RESULT=" + ("correct" if err < 1e-5 else f"wrong max_abs_error={err:.3g}"))
except Exception as exc:
    print("RESULT=error " + " ".join(str(exc).split())[:400])
finally:
    if not WRONG:  # drop every CUDA object before the context goes, as the GPU thread does
        for name in ("binding", "sess", "d_in", "d_out", "stream"):
            globals().pop(name, None)
        rt.stop()
"""


def test_the_classic_make_context_setup_fails_where_the_primary_context_passes(tmp_path):
    ours = run_script(tmp_path, SETUP.replace("sys.argv[1]", "'ours'"))
    assert_clean_exit(ours)
    assert "RESULT=correct" in ours.stdout
    wrong = run_script(tmp_path, SETUP.replace("sys.argv[1]", "'wrong'"))
    result = next((line for line in wrong.stdout.splitlines() if line.startswith("RESULT=")), "RESULT=crash")
    print(f"\nwith pycuda.autoinit's context: {result} (exit {wrong.returncode})")
    if result == "RESULT=correct" and wrong.returncode == 0:
        pytest.skip("not reproduced on this card/driver/ONNX Runtime: ORT ran correctly on a stream and "
                    "buffers of a make_context context (see docs/cuda-contexts.md)")
    assert result != "RESULT=correct" or wrong.returncode != 0


# --- 6. device pre-processing into a buffer someone else owns (the float-input TensorRT path) ------

def test_device_preprocessor_writes_the_normalised_tensor_into_a_foreign_buffer():
    from worker.engines.onnxruntime import DevicePreprocessor

    spec = ModelSpec(name="pre", path="unused", preprocess=IMAGENET)
    batch = np.random.default_rng(4).integers(0, 256, size=(5, 224, 224, 3), dtype=np.uint8)
    want = ((batch.astype(np.float32) * np.float32(1 / 255) - np.array(IMAGENET.mean, np.float32))
            / np.array(IMAGENET.std, np.float32)).transpose(0, 3, 1, 2)

    def gpu_work():
        runtime = create_runtime(Settings(device="cuda"))
        runtime.start()
        try:
            src = runtime.device_buffer(8 * 224 * 224 * 3, "uint8 batch")
            dst = runtime.device_buffer(8 * 3 * 224 * 224 * 4, "model input")
            pre = DevicePreprocessor(spec, Settings(device="cuda"), runtime, src.ptr, dst.ptr)
            host = runtime.host_buffer((5, 3, 224, 224), np.float32)
            runtime.to_device(src.ptr, batch)
            pre.run(5)
            runtime.to_host(host, dst.ptr)
            runtime.synchronize()
            pre.close()
            return host.copy()
        finally:
            runtime.stop()

    got = on_own_thread(gpu_work)
    assert rel_error(got, want) < 1e-6


# --- 7. the other shapes of model: arena off, an output of unknown size, a fixed batch -------------

def test_arena_off_symbolic_output_and_fixed_batch_models_on_cuda_equal_cpu(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def save(name, nodes, inputs, outputs):
        model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        return str(tmp_path / f"{name}.onnx")

    flat = save("flat", [helper.make_node("Flatten", ["x"], ["flat"], axis=1)],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
                [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", "K"])])  # K unknown up front
    fixed = save("fixed", [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0)],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 64, 64])],
                 [helper.make_tensor_value_info("m", TensorProto.FLOAT, [4, 3])])
    cases = [(ModelSpec(name="flat", path=flat, preprocess=RGB64), Settings(device="cuda")),
             (ModelSpec(name="fixed", path=fixed, preprocess=RGB64), Settings(device="cuda")),
             (ModelSpec(name="means_no_arena", path="bundled:channel_means", preprocess=RGB64),
              Settings(device="cuda", ort_arena=False))]
    rng = np.random.default_rng(8)
    batches = [rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8) for n in (1, 3, 4, 2)]

    def gpu_work():
        runtime = create_runtime(Settings(device="cuda"))
        runtime.start()
        got = {}
        try:
            for spec, settings in cases:
                engine = create_engine(spec, settings)
                engine.activate(runtime, 4)
                got[spec.name] = []
                for batch in batches:
                    collect = engine.enqueue(batch)
                    runtime.synchronize()
                    got[spec.name].append({k: v.copy() for k, v in collect().items()})
                engine.deactivate()
        finally:
            runtime.stop()
        return got

    got = on_own_thread(gpu_work)
    for spec, _ in cases:
        cpu = create_engine(spec, Settings(device="cpu"))
        cpu.activate(CpuRuntime(), 4)
        for batch, out in zip(batches, got[spec.name], strict=True):
            for name, want in cpu.enqueue(batch)().items():
                assert out[name].shape == want.shape
                assert rel_error(out[name], want) < 1e-6, (spec.name, name, len(batch))
        print(f"{spec.name}: equal to the CPU for batches {[len(b) for b in batches]}")


# --- 8. a CUDA error inside a batch fails it as retriable, named, and stops the thread -------------

ILLEGAL = """
import asyncio, sys
import numpy as np
from worker import log
log.configure("console", "warning")
from worker.engines import create_engine, create_runtime
from worker.errors import DeviceError
from worker.gpu.thread import GpuThread
from worker.gpu.requests import InferenceRequest
from worker.models.spec import ModelSpec, Preprocess
from worker.settings import Settings

settings = Settings(device="cuda", max_batch_size=4)
spec = ModelSpec(name="channel_means", path="bundled:channel_means",
                 preprocess=Preprocess(width=64, height=64, layout="nchw", dtype="float32"))
engine = create_engine(spec, settings)
fatal = []

async def main():
    thread = GpuThread(create_runtime(settings), [engine], 4, 5.0, on_fatal=fatal.append)
    await thread.start()
    binding = engine._cuda.binding
    real_bind = binding.bind_input
    # Point the model at an address far past our buffer: its first kernel reads unmapped memory.
    binding.bind_input = lambda name, dev, i, t, shape, ptr: real_bind(name, dev, i, t, shape, ptr + (1 << 40))
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    thread.submit(InferenceRequest(inputs=[np.ones((64, 64, 3), np.uint8)], future=fut, loop=loop))
    try:
        await fut
        print("no error")
    except DeviceError as exc:
        print(f"cuda_error={exc.cuda_error} retriable={exc.retriable}")
        print(f"message={exc}")
    await loop.run_in_executor(None, thread.stop, 60)
    print(f"fatal={type(fatal[0]).__name__ if fatal else None} thread_alive={thread.alive()}")
    return 4

sys.exit(asyncio.run(main()))
"""


def test_illegal_address_in_a_batch_is_a_named_retriable_device_error(tmp_path):
    out = run_script(tmp_path, ILLEGAL, timeout=180)
    assert "cuda_error=CUDA_ERROR_ILLEGAL_ADDRESS retriable=True" in out.stdout
    assert "fatal=DeviceError thread_alive=False" in out.stdout
    assert out.returncode != 0


# --- 9. TensorRT, where it is installed ------------------------------------------------------------

def test_tensorrt_engine_built_from_onnx_matches_the_reference_and_is_cached(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this GPU machine")
    from worker.models.bundled import channel_means_reference

    spec = ModelSpec(name="channel_means", path="bundled:channel_means", preprocess=RGB64, backend="tensorrt")
    settings = Settings(device="cuda", engine_cache_dir=str(tmp_path / "engines"))
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8) for n in range(1, 9)]

    timing_caches = []

    def gpu_work():
        runtime = create_runtime(settings)
        runtime.start()
        sources, outs = [], []
        try:
            for _ in range(2):
                engine = create_engine(spec, settings)
                engine.activate(runtime, 8)
                sources.append(engine.source)
                timing_caches.append(engine.timing_cache_path)
                for batch in batches:
                    collect = engine.enqueue(batch)
                    runtime.synchronize()
                    outs.append(collect()["means"].copy())
                engine.deactivate()
        finally:
            runtime.stop()
        return sources, outs

    sources, outs = on_own_thread(gpu_work)
    print(f"\ntensorrt {trt.__version__}: first start {sources[0]}, second start {sources[1]}")
    assert sources == ["build", "cache"]
    # The build saved TensorRT's timing cache beside the engine (both under engine_cache_dir).
    assert timing_caches[0] is not None and timing_caches[0].is_file()
    assert timing_caches[0].parent == tmp_path / "engines"
    for batch, got in zip(batches * 2, outs, strict=True):
        np.testing.assert_allclose(got, channel_means_reference(batch.transpose(0, 3, 1, 2).astype(np.float32)),
                                   rtol=1e-5)


def test_device_error_type_is_retriable():
    assert DeviceError("x", cuda_error="CUDA_ERROR_OUT_OF_MEMORY").retriable


def _current_context() -> int:
    """cuCtxGetCurrent on the calling thread, asked of libcuda itself (not pycuda's own bookkeeping)."""
    import ctypes

    ctx = ctypes.c_void_p()
    assert ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(ctx)) == 0
    return ctx.value or 0


def test_helper_context_makes_the_gpu_threads_primary_context_current_on_the_decode_thread_only():
    """The decode thread (gpu_decode_thread) runs in the GPU thread's context, the primary one, not a
    context of its own; before and after its block it has none; the GPU thread itself may not call it."""
    import threading

    from worker.engines.cuda import CudaRuntime

    rt = CudaRuntime(0)
    rt.start()
    seen: dict[str, int] = {}
    try:
        main = _current_context()

        def helper() -> None:
            seen["before"] = _current_context()
            with rt.helper_context():
                seen["inside"] = _current_context()
            seen["after"] = _current_context()

        thread = threading.Thread(target=helper)
        thread.start()
        thread.join(30)
        with pytest.raises(RuntimeError, match="not the GPU thread"):
            with rt.helper_context():
                pass
        assert _current_context() == main  # the refused call left the GPU thread's stack as it was
    finally:
        rt.stop()
    assert main != 0
    assert seen == {"before": 0, "inside": main, "after": 0}
