"""TensorRT engine and CudaRuntime logic, without a GPU: test doubles of ``pycuda.driver`` and ``tensorrt``.

The doubles (tests/trt_double.py) keep real semantics where it matters, refusals included:

- fake pycuda: "device memory" is host memory (numpy arrays) addressed by pointer; copies and kernels
  are queued on the stream and run only at its synchronisation, in order; pinned buffers are tracked,
  errors carry pycuda's message format ("cuMemAlloc failed: out of memory"), every call is logged;
- fake tensorrt, as TensorRT 10 or as TensorRT 11 (every engine test runs against both): the parser
  refuses uint8 intermediate tensors and reports through ``num_errors``/``get_error``; the builder needs
  a profile for a dynamic batch and refuses one for a fixed batch that disagrees; each major has its own
  enums (no ``BuilderFlag.FP16`` on 11); ``Logger`` takes no new attributes; the runtime refuses plans
  of another TensorRT version or compute capability (returning None, as the real one does); and
  ``execute_async_v3`` runs the plan's ONNX on ONNX Runtime's CPU provider at the stream's
  synchronisation, reading and writing the addresses it was given.

So these tests check what the engine does with shapes, profiles, addresses, the stream and TensorRT's
API, and that the numbers come out right, but not TensorRT or CUDA themselves: tests/gpu does that on a
GPU with TensorRT (not yet run: docs/gpu.md).
"""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("worker.models.graph")
pytest.importorskip("worker.models.bundled")

from onnx import TensorProto, helper  # noqa: E402
from trt_double import FakeCuda, FakeTRT, plan_bytes  # noqa: E402

from worker.engines import create_runtime  # noqa: E402
from worker.engines.cuda import CudaRuntime, cuda_error_name  # noqa: E402
from worker.engines.tensorrt import TensorRTEngine, engine_cache_key, timing_cache_key  # noqa: E402
from worker.errors import ConfigError, DeviceError, EngineLoadError  # noqa: E402
from worker.models.spec import ModelSpec, OutputSpec, Preprocess  # noqa: E402
from worker.settings import Settings  # noqa: E402

PRE = Preprocess(width=5, height=4, layout="nchw", dtype="float32", scale=1 / 255,
                 mean=(0.5, 0.25, 0.125), std=(0.5, 0.25, 2.0))


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    cuda = FakeCuda()
    pkg = types.ModuleType("pycuda")
    pkg.driver = cuda
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    return cuda


# --- CudaRuntime ------------------------------------------------------------------------------------

def test_runtime_takes_the_primary_context_once_and_releases_it_in_reverse(fake_cuda):
    rt = CudaRuntime(0)
    rt.start()
    assert fake_cuda.names()[:4] == ["init", "retain_primary_context", "push", "stream"]
    assert rt.stream_handle == 0x5150 and rt.gpu_name == "Fake H100" and rt.compute_capability == (9, 0)
    buf = rt.device_buffer(1000, "x")
    rt.host_buffer((4, 3), np.float32)
    assert rt.memory_in_use() == 1000 and rt.buffers_in_use() == 1000
    rt.stop()
    tail = fake_cuda.names()[-5:]
    assert tail == ["synchronize", "free", "free_pinned", "pop", "detach"]
    assert fake_cuda.calls[-4] == ("free", buf.ptr)
    rt.stop()  # idempotent
    assert fake_cuda.names().count("detach") == 1


def test_runtime_refuses_other_threads(fake_cuda):
    rt = CudaRuntime(0)
    rt.start()
    errors = []
    rt.device_buffer(500)
    assert rt.memory_in_use() == 500
    seen = []

    def other():
        errors.append(pytest.raises(RuntimeError, rt.synchronize))
        seen.append(rt.memory_in_use())  # probes on other threads get the last measurement

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert "thread other than the GPU thread" in str(errors[0].value)
    assert seen == [500]
    rt.stop()


def test_out_of_memory_is_a_device_error_with_the_cuda_name(fake_cuda):
    fake_cuda.total = 10_000
    rt = CudaRuntime(0)
    rt.start()
    with pytest.raises(DeviceError) as info:
        rt.device_buffer(80 * 2**30, "model input (huge batch)")
    assert info.value.cuda_error == "CUDA_ERROR_OUT_OF_MEMORY"
    assert "81920.0 MiB for model input (huge batch)" in str(info.value)
    assert "lower max_batch_size" in str(info.value)
    rt.stop()


def test_stream_failure_is_a_device_error_with_the_cuda_name(fake_cuda):
    rt = CudaRuntime(0)
    rt.start()
    fake_cuda.fail_sync = "an illegal memory access was encountered"
    with pytest.raises(DeviceError) as info:
        rt.synchronize()
    assert info.value.cuda_error == "CUDA_ERROR_ILLEGAL_ADDRESS"
    fake_cuda.fail_sync = ""
    rt.stop()


def test_unpinned_sources_go_through_a_pinned_staging_buffer(fake_cuda):
    rt = CudaRuntime(0)
    rt.start()
    dst = rt.device_buffer(12)
    pinned = rt.host_buffer((2, 6), np.uint8)
    rt.to_device(dst.ptr, pinned[:1])
    rt.to_device(dst.ptr, np.arange(12, dtype=np.uint8))  # ordinary numpy memory
    copies = [c for c in fake_cuda.calls if c[0] == "htod"]
    assert [c[3] for c in copies] == [True, True]
    assert not fake_cuda.memory[dst.ptr].any()  # queued, not run: the stream has not been synchronised
    rt.synchronize()
    assert list(fake_cuda.memory[dst.ptr]) == list(range(12))
    rt.stop()


@pytest.mark.parametrize("text, name", [
    ("cuMemAlloc failed: out of memory", "CUDA_ERROR_OUT_OF_MEMORY"),
    ("cuLaunchKernel failed: unspecified launch failure", "CUDA_ERROR_LAUNCH_FAILED"),
    ("cuStreamSynchronize failed: an illegal memory access was encountered", "CUDA_ERROR_ILLEGAL_ADDRESS"),
    ("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc", "cudaErrorMemoryAllocation"),
    ("CUDA failure 400: invalid resource handle ; GPU=0", "cudaErrorInvalidResourceHandle"),
    ("CUDA error cudaErrorIllegalAddress:an illegal memory access was encountered", "cudaErrorIllegalAddress"),
    ("Failed to allocate memory for requested buffer of size 123", "cudaErrorMemoryAllocation"),
    ("shape mismatch in node Add", ""),
])
def test_cuda_error_names(text, name):
    assert cuda_error_name(text) == name


def test_create_runtime_picks_cuda_when_a_device_exists(fake_cuda):
    assert isinstance(create_runtime(Settings(device="auto")), CudaRuntime)
    with pytest.raises(ConfigError, match="gpu_device_index=3 but the CUDA driver sees 1 device"):
        create_runtime(Settings(device="cuda", gpu_device_index=3))
    fake_cuda.devices = 0
    with pytest.raises(ConfigError, match="sees no device"):
        create_runtime(Settings(device="cuda"))
    assert create_runtime(Settings(device="auto")).kind == "cpu"
    assert "retain_primary_context" not in fake_cuda.names()  # probing takes no context


# --- fake tensorrt: every test that takes fake_trt runs against a TensorRT-10-like and an 11-like one

@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def fake_trt(request, monkeypatch) -> FakeTRT:
    trt = FakeTRT(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


# --- models and helpers ---------------------------------------------------------------------------

def means_model(path, batch="N", input_type=TensorProto.FLOAT) -> str:
    x = helper.make_tensor_value_info("pixels", input_type, [batch, 3, PRE.height, PRE.width])
    means = helper.make_tensor_value_info("means", TensorProto.FLOAT, [batch, 3])
    maxes = helper.make_tensor_value_info("maxes", TensorProto.FLOAT, [batch, 3])
    nodes = [helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[2, 3], keepdims=0),
             helper.make_node("ReduceMax", ["pixels"], ["maxes"], axes=[2, 3], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "means_maxes", [x], [means, maxes]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


def reference(batch: np.ndarray) -> dict[str, np.ndarray]:
    x = (batch.astype(np.float64) * PRE.scale - np.array(PRE.mean)) / np.array(PRE.std)
    return {"means": x.mean(axis=(1, 2)), "maxes": x.max(axis=(1, 2))}


def settings(tmp_path, **kw) -> Settings:
    return Settings(device="cuda", engine_cache_dir=str(tmp_path / "engines"), **kw)


def run_batches(rt, engine, sizes, seed=0):
    rng = np.random.default_rng(seed)
    for n in sizes:
        batch = rng.integers(0, 256, size=(n, *PRE.hwc_shape), dtype=np.uint8)
        collector = engine.enqueue(batch)
        rt.synchronize()
        out = collector()
        for name, want in reference(batch).items():
            assert out[name].shape == (n, 3)
            np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-5)


# --- TensorRT engine ------------------------------------------------------------------------------

def test_builds_from_onnx_with_a_batch_profile_and_runs_on_our_stream_and_buffers(tmp_path, fake_cuda, fake_trt):
    spec = ModelSpec(name="mm", path=means_model(tmp_path / "mm.onnx"), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 4)
    assert engine.source == "build" and fake_trt.builds == 1
    assert fake_trt.profiles == [((1, 4, 5, 3), (4, 4, 5, 3), (4, 4, 5, 3))]  # uint8 NHWC: pre-processing is inside
    assert engine.cache_path.is_file() and engine.cache_path.parent == tmp_path / "engines"
    ctx = fake_trt.contexts[0]
    addresses = {name: ptr for op, name, ptr in [c for c in ctx.calls if c[0] == "set_tensor_address"]}
    assert set(addresses) == {"image_u8", "means", "maxes"}
    assert all(ptr in fake_cuda.memory for ptr in addresses.values())  # our own allocations
    run_batches(rt, engine, [1, 2, 3, 4, 4, 1])
    executes = [c for c in ctx.calls if c[0] == "execute_async_v3"]
    assert executes and all(c[1] == rt.stream_handle == 0x5150 for c in executes)
    shapes = [c[2][0] for c in ctx.calls if c[0] == "set_input_shape"]
    assert shapes == [4, 1, 2, 3, 4, 1]  # set at activation (largest), then only when the size changes
    copies = [c for c in fake_cuda.calls if c[0] in ("htod", "dtoh")]
    assert all(c[3] for c in copies), "every host side of a copy is pinned"
    engine.deactivate()
    assert fake_cuda.memory == {}  # every device buffer freed
    rt.stop()
    assert fake_cuda.names()[-2:] == ["pop", "detach"]


def test_the_cached_engine_is_reused_on_the_next_start(tmp_path, fake_cuda, fake_trt):
    spec = ModelSpec(name="mm", path=means_model(tmp_path / "mm.onnx"), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    first = TensorRTEngine(spec, settings(tmp_path))
    first.activate(rt, 4)
    first.deactivate()
    second = TensorRTEngine(spec, settings(tmp_path))
    second.activate(rt, 4)
    assert second.source == "cache" and second.cache_path == first.cache_path and fake_trt.builds == 1
    run_batches(rt, second, [3])
    second.deactivate()
    third = TensorRTEngine(spec, settings(tmp_path))  # another profile is another engine
    third.activate(rt, 2)
    assert third.source == "build" and third.cache_path != first.cache_path and fake_trt.builds == 2
    third.deactivate()
    rt.stop()


def test_cache_key_covers_onnx_tensorrt_gpu_and_profile():
    base = engine_cache_key(b"onnx", "10.9.0", "NVIDIA H100", (9, 0), (1, 32, 32))
    assert base == engine_cache_key(b"onnx", "10.9.0", "NVIDIA H100", (9, 0), (1, 32, 32))
    others = [engine_cache_key(b"onnx2", "10.9.0", "NVIDIA H100", (9, 0), (1, 32, 32)),
              engine_cache_key(b"onnx", "10.10.0", "NVIDIA H100", (9, 0), (1, 32, 32)),
              engine_cache_key(b"onnx", "10.9.0", "NVIDIA A100", (8, 0), (1, 32, 32)),
              engine_cache_key(b"onnx", "10.9.0", "NVIDIA H100", (9, 0), (1, 16, 32)),
              engine_cache_key(b"onnx", "10.9.0", "NVIDIA H100", (9, 0), (1, 32, 32), ("fp16",))]
    assert len({base, *others}) == 6


@pytest.mark.parametrize("built_with, built_on, said", [
    ("10.3.0.26", (9, 0), "expecting library version {version} got 10.3.0.26"),
    ("", (8, 6), "incompatible device"),
])
def test_a_plan_from_another_tensorrt_or_gpu_stops_start_up_clearly(tmp_path, fake_cuda, fake_trt,
                                                                    built_with, built_on, said):
    built_with = built_with or fake_trt.__version__
    said = said.format(version=fake_trt.__version__)
    plan = tmp_path / "model.plan"
    plan.write_bytes(plan_bytes(built_with, built_on, {"name": "x", "shape": [-1, 4, 5, 3], "dtype": "UINT8"},
                                [], [1, 4, 8], onnx.load(means_model(tmp_path / "m.onnx")).SerializeToString()))
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(ModelSpec(name="old", path=str(plan), preprocess=PRE, backend="tensorrt"),
                            settings(tmp_path))
    with pytest.raises(EngineLoadError) as info:
        engine.activate(rt, 4)
    text = str(info.value)
    assert f"TensorRT {fake_trt.__version__} cannot load model.plan on Fake H100" in text
    assert "compute capability 9.0" in text and "rebuild it here" in text and said in text
    assert fake_cuda.memory == {}
    rt.stop()


def wrapped_plan(tmp_path, profile=(1, 4, 8), batch=-1, float_input=False):
    """A prebuilt plan: uint8 NHWC in (wrapped) or the normalised float NCHW tensor in (not wrapped)."""
    from worker.models.graph import with_device_preprocessing

    model = onnx.load(means_model(tmp_path / "m.onnx", batch="N" if batch < 0 else batch))
    if float_input:
        inp = {"name": "pixels", "shape": [batch, 3, 4, 5], "dtype": "FLOAT"}
    else:
        model = with_device_preprocessing(model, PRE)
        inp = {"name": "image_u8", "shape": [batch, 4, 5, 3], "dtype": "UINT8"}
    outputs = [{"name": n, "shape": [batch, 3], "dtype": "FLOAT"} for n in ("means", "maxes")]
    path = tmp_path / "model.engine"
    version = sys.modules["tensorrt"].__version__ if sys.modules.get("tensorrt") else "10.9.0.34"
    path.write_bytes(plan_bytes(version, (9, 0), inp, outputs, list(profile), model.SerializeToString()))
    return str(path)


def test_prebuilt_plan_with_uint8_input_pads_batches_below_the_profile_minimum(tmp_path, fake_cuda, fake_trt):
    spec = ModelSpec(name="p", path=wrapped_plan(tmp_path, profile=(2, 4, 8)), preprocess=PRE,
                     backend="tensorrt", outputs=(OutputSpec(name="means"), OutputSpec(name="maxes")))
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 6)
    assert engine.source == "plan" and fake_trt.builds == 0
    run_batches(rt, engine, [1, 6, 2])
    shapes = [c[2][0] for c in fake_trt.contexts[0].calls if c[0] == "set_input_shape"]
    assert shapes == [6, 2, 6, 2]  # 1 image runs as 2 rows (profile minimum), the result keeps 1
    engine.deactivate()
    rt.stop()


def test_prebuilt_plan_with_float_input_normalises_on_the_device_with_onnxruntime(tmp_path, fake_cuda,
                                                                                  fake_trt, monkeypatch):
    """The ORT CUDA session is replaced by a CPU one that reads/writes the same (host) addresses."""
    import worker.engines.onnxruntime as ort_engine

    sessions = []

    class CpuBinding:
        def __init__(self, inner):
            self.inner = inner

        def bind_input(self, name, device, device_id, dtype, shape, ptr):
            assert device == "cuda" and ptr in fake_cuda.memory
            self.inner.bind_input(name, "cpu", 0, dtype, shape, ptr)

        def bind_output(self, name, device, device_id, dtype, shape, ptr):
            assert device == "cuda" and ptr in fake_cuda.memory
            self.inner.bind_output(name, "cpu", 0, dtype, shape, ptr)

    def fake_cuda_session(model_bytes, spec, settings_, runtime, what=""):
        sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        sessions.append(sess)
        real_binding = sess.io_binding
        sess.io_binding = lambda: CpuBinding(real_binding())
        return sess

    monkeypatch.setattr(ort_engine, "cuda_session", fake_cuda_session)
    # ONNX Runtime on our stream: its kernels run when the stream does (at the synchronisation).
    monkeypatch.setattr(ort_engine, "run_bound", lambda s, b, o, what, rt: fake_cuda.enqueue(
        rt.stream_handle, "onnxruntime", lambda: s.run_with_iobinding(b.inner, o)))
    spec = ModelSpec(name="f", path=wrapped_plan(tmp_path, float_input=True), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 4)
    assert len(sessions) == 1 and [i.name for i in sessions[0].get_inputs()] == ["image_u8"]
    run_batches(rt, engine, [1, 4, 3])
    engine.deactivate()
    assert fake_cuda.memory == {}
    rt.stop()


def test_profile_smaller_than_max_batch_size_is_a_config_error(tmp_path, fake_cuda, fake_trt):
    spec = ModelSpec(name="p", path=wrapped_plan(tmp_path, profile=(1, 4, 8)), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    with pytest.raises(ConfigError, match="allows batches up to 8, but max_batch_size=16"):
        TensorRTEngine(spec, settings(tmp_path)).activate(rt, 16)
    assert fake_cuda.memory == {}
    rt.stop()


def test_wrong_input_shape_for_the_pipeline_is_a_config_error(tmp_path, fake_cuda, fake_trt):
    other = Preprocess(width=8, height=8, layout="nchw", dtype="float32")
    spec = ModelSpec(name="p", path=wrapped_plan(tmp_path), preprocess=other, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    with pytest.raises(ConfigError, match=r"engine input image_u8 is uint8 \[-1, 4, 5, 3\]"):
        TensorRTEngine(spec, settings(tmp_path)).activate(rt, 4)
    rt.stop()


def test_lean_runtime_loads_plans_but_cannot_build(tmp_path, fake_cuda, monkeypatch):
    lean = FakeTRT(builder=False, name="tensorrt_lean")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_lean", lean)
    rt = CudaRuntime(0)
    rt.start()
    onnx_spec = ModelSpec(name="o", path=means_model(tmp_path / "o.onnx"), preprocess=PRE, backend="tensorrt")
    with pytest.raises(ConfigError, match="only the lean TensorRT runtime"):
        TensorRTEngine(onnx_spec, settings(tmp_path)).activate(rt, 4)
    engine = TensorRTEngine(ModelSpec(name="p", path=wrapped_plan(tmp_path), preprocess=PRE, backend="tensorrt"),
                            settings(tmp_path))
    engine.activate(rt, 4)
    run_batches(rt, engine, [2])
    engine.deactivate()
    rt.stop()


def test_no_tensorrt_at_all_says_what_to_install(tmp_path, fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    rt = CudaRuntime(0)
    rt.start()
    spec = ModelSpec(name="o", path=means_model(tmp_path / "o.onnx"), preprocess=PRE, backend="tensorrt")
    with pytest.raises(ConfigError, match=r"neither tensorrt nor tensorrt_lean is importable"):
        TensorRTEngine(spec, settings(tmp_path)).activate(rt, 4)
    rt.stop()


def test_tensorrt_needs_a_cuda_runtime(tmp_path, fake_trt):
    from worker.engines.base import CpuRuntime

    spec = ModelSpec(name="o", path=means_model(tmp_path / "o.onnx"), preprocess=PRE, backend="tensorrt")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        TensorRTEngine(spec, settings(tmp_path)).activate(CpuRuntime(), 4)


def test_importing_the_engines_needs_no_gpu_packages():
    import subprocess

    code = ("import sys; sys.modules['pycuda'] = None; sys.modules['tensorrt'] = None; "
            "import worker, worker.engines, worker.engines.cuda, worker.engines.tensorrt, "
            "worker.engines.onnxruntime; print('ok')")
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "ok"


# --- what real TensorRT refuses, and the paths the old double never took ------------------------------

def layout_model(path, pre: Preprocess, batch="N") -> str:
    """pre.dtype, pre.layout input -> per-channel means and maxes as float32 [N, C]."""
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}[pre.dtype]
    x = helper.make_tensor_value_info("pixels", elem, [batch, *pre.model_input_shape])
    axes = [2, 3] if pre.layout == "nchw" else [1, 2]
    nodes = [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["means"], axes=axes, keepdims=0),
             helper.make_node("ReduceMax", ["f"], ["maxes"], axes=axes, keepdims=0)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, pre.channels]) for n in ("means", "maxes")]
    model = helper.make_model(helper.make_graph(nodes, "layout", [x], outs), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


def numpy_reference(batch: np.ndarray, pre: Preprocess) -> dict[str, np.ndarray]:
    """Written out here, not worker.models.preprocess: N H W C uint8 -> what the model sees, reduced."""
    x = batch.astype(np.float64)
    if pre.dtype != "uint8":
        x = x * pre.scale
        if pre.mean:
            x = x - np.array(pre.mean)
        if pre.std:
            x = x / np.array(pre.std)
        x = x.astype(np.dtype(pre.dtype)).astype(np.float64)
    return {"means": x.mean(axis=(1, 2)), "maxes": x.max(axis=(1, 2))}


def check_batches(rt, engine, pre, sizes, rtol=1e-5, seed=0):
    rng = np.random.default_rng(seed)
    for n in sizes:
        batch = rng.integers(0, 256, size=(n, *pre.hwc_shape), dtype=np.uint8)
        collector = engine.enqueue(batch)
        rt.synchronize()
        out = collector()
        for name, want in numpy_reference(batch, pre).items():
            assert out[name].shape == (n, pre.channels)
            np.testing.assert_allclose(out[name], want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("batch", ["N", 4], ids=["dynamic-batch", "fixed-batch"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_every_wrapped_variant_passes_the_parser_builds_and_runs(tmp_path, fake_cuda, fake_trt, layout, dtype,
                                                                 batch):
    norm = {} if dtype == "uint8" else {"scale": 1 / 255, "mean": (0.5, 0.25, 0.125), "std": (0.5, 0.25, 2.0)}
    pre = Preprocess(width=5, height=4, layout=layout, dtype=dtype, **norm)
    spec = ModelSpec(name="v", path=layout_model(tmp_path / "v.onnx", pre, batch), preprocess=pre,
                     backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 4)
    assert engine.source == "build" and fake_trt.builds == 1
    check_batches(rt, engine, pre, [1, 3, 4, 2], rtol=1e-3 if dtype == "float16" else 1e-5)
    shapes = [c for c in fake_trt.contexts[0].calls if c[0] == "set_input_shape"]
    if batch == 4:  # a fixed batch: no profile, no shape to set, smaller batches padded to 4
        assert fake_trt.profiles == [((4, 4, 5, 3),) * 3] and shapes == []
        assert fake_trt.configs[0].profiles == []
    else:
        assert [c[2][0] for c in shapes] == [4, 1, 3, 4, 2]
    engine.deactivate()
    rt.stop()


def test_a_uint8_intermediate_is_refused_by_the_parser_with_its_words(tmp_path, fake_cuda, fake_trt):
    """What the old wrapper did (Transpose on uint8 before the Cast) and what real TensorRT said to it."""
    pre = Preprocess(width=5, height=4, layout="nchw", dtype="uint8")
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 3, 5, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1, 3, 2])],
                                                "t", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "t.onnx"))
    spec = ModelSpec(name="t", path=str(tmp_path / "t.onnx"), preprocess=pre, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    with pytest.raises(EngineLoadError) as info:
        TensorRTEngine(spec, settings(tmp_path)).activate(rt, 4)
    text = str(info.value)
    assert "TensorRT's ONNX parser refused the model" in text
    assert "node 0: TensorRT does not support UINT8 types for intermediate tensors" in text
    assert "(UNSUPPORTED_NODE)" in text and "ParserError object" not in text
    assert fake_trt.builds == 0 and fake_cuda.memory == {}
    rt.stop()


def test_fixed_batch_plan_pads_small_batches_and_never_sets_a_shape(tmp_path, fake_cuda, fake_trt):
    spec = ModelSpec(name="f", path=wrapped_plan(tmp_path, batch=4), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    with pytest.raises(ConfigError, match="batches of exactly 4; set max_batch_size <= 4"):
        TensorRTEngine(spec, settings(tmp_path)).activate(rt, 6)
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 4)
    run_batches(rt, engine, [1, 4, 3])
    ctx = fake_trt.contexts[-1]
    assert [c for c in ctx.calls if c[0] == "set_input_shape"] == [] and ctx.runs == 3
    engine.deactivate()
    rt.stop()


def test_fixed_batch_onnx_larger_than_max_batch_size_is_refused_before_building(tmp_path, fake_cuda, fake_trt):
    spec = ModelSpec(name="f", path=means_model(tmp_path / "f.onnx", batch=2), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    with pytest.raises(ConfigError, match="the ONNX model takes batches of exactly 2; set max_batch_size <= 2"):
        TensorRTEngine(spec, settings(tmp_path)).activate(rt, 4)
    assert fake_trt.builds == 0
    rt.stop()


def test_results_exist_only_after_the_stream_is_synchronised(tmp_path, fake_cuda, fake_trt):
    spec = ModelSpec(name="mm", path=means_model(tmp_path / "mm.onnx"), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 4)
    batch = np.full((2, *PRE.hwc_shape), 255, np.uint8)
    collector = engine.enqueue(batch)
    assert [w for w, _ in fake_cuda.queue] == ["htod", "execute_async_v3", "dtoh", "dtoh"]
    early = {k: v.copy() for k, v in collector().items()}
    assert not early["means"].any()  # nothing has run yet: reading before synchronize reads garbage
    rt.synchronize()
    np.testing.assert_allclose(collector()["maxes"], reference(batch)["maxes"], rtol=1e-6)
    engine.deactivate()
    rt.stop()


def test_two_batches_in_flight_each_waited_for_by_its_own_event(tmp_path, fake_cuda, fake_trt):
    """The GPU thread queues the next batch before waiting for the current one: each batch's outputs land
    in their own host set, and waiting for the first batch's event runs the first batch only."""
    spec = ModelSpec(name="mm", path=means_model(tmp_path / "mm.onnx"), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 4)
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 256, size=(n, *PRE.hwc_shape), dtype=np.uint8) for n in (3, 2, 4)]
    pending = []
    for batch in batches[:2]:
        pending.append((batch, engine.enqueue(batch), rt.batch_done()))
    first, collector, done = pending.pop(0)
    rt.wait_batch(done)
    assert [w for w, _ in fake_cuda.queue] == ["htod", "execute_async_v3", "dtoh", "dtoh", "event"]
    np.testing.assert_allclose(collector()["means"], reference(first)["means"], rtol=1e-5, atol=1e-5)
    pending.append((batches[2], engine.enqueue(batches[2]), rt.batch_done()))  # into the first one's set
    for batch, collector, done in pending:
        rt.wait_batch(done)
        np.testing.assert_allclose(collector()["maxes"], reference(batch)["maxes"], rtol=1e-5, atol=1e-5)
    assert not fake_cuda.queue
    engine.deactivate()
    rt.stop()


def test_fp16_the_way_each_major_intends(tmp_path, fake_cuda, fake_trt):
    pytest.importorskip("onnxconverter_common")
    spec = ModelSpec(name="h", path=means_model(tmp_path / "h.onnx"), preprocess=PRE, backend="tensorrt",
                     extra={"fp16": True})
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 4)
    config = fake_trt.configs[0]
    built = onnx.load_from_string(fake_trt.networks[0].onnx_bytes)
    halves = [t.name for t in built.graph.initializer if t.data_type == TensorProto.FLOAT16]
    halves += [n.name for n in built.graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)]
    if fake_trt.major >= 11:  # strongly typed: the model itself is float16, no flag exists
        assert config.flags == [] and halves
    else:  # weakly typed: the model stays float32, the flag lets TensorRT choose float16 kernels
        assert config.flags == ["FP16"] and not halves
    assert [i.type.tensor_type.elem_type for i in built.graph.input] == [TensorProto.UINT8]
    assert {o.type.tensor_type.elem_type for o in built.graph.output} == {TensorProto.FLOAT}
    run_batches_fp16 = [1, 4]
    rng = np.random.default_rng(2)
    for n in run_batches_fp16:
        batch = rng.integers(0, 256, size=(n, *PRE.hwc_shape), dtype=np.uint8)
        collector = engine.enqueue(batch)
        rt.synchronize()
        np.testing.assert_allclose(collector()["means"], reference(batch)["means"], rtol=2e-3, atol=2e-3)
    engine.deactivate()
    rt.stop()


def test_fp16_on_tensorrt_11_without_the_converter_is_a_config_error(tmp_path, fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT(11))
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)
    spec = ModelSpec(name="h", path=means_model(tmp_path / "h.onnx"), preprocess=PRE, backend="tensorrt",
                     extra={"fp16": True})
    rt = CudaRuntime(0)
    rt.start()
    with pytest.raises(ConfigError, match=r"strongly typed networks only; BuilderFlag.FP16 is gone\). Install"):
        TensorRTEngine(spec, settings(tmp_path)).activate(rt, 4)
    rt.stop()


def test_the_doubles_expose_only_their_majors_enums():
    ten, eleven = FakeTRT(10), FakeTRT(11)
    assert ten.BuilderFlag.FP16 and ten.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    for missing in ("FP16", "INT8", "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS"):
        assert not hasattr(eleven.BuilderFlag, missing)
    assert not hasattr(eleven.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    logger = ten.Logger(ten.Logger.WARNING)
    with pytest.raises(AttributeError):
        logger.errors = []  # what the old fallback did: a pybind11 class takes no new attributes

    class Forgot(ten.ILogger):
        def __init__(self):
            pass  # no ILogger.__init__(self)

        def log(self, severity, msg):
            pass

    with pytest.raises(TypeError, match="must be called"):
        ten.Runtime(Forgot())


def test_a_logger_that_cannot_be_subclassed_falls_back_to_trt_logger(tmp_path, fake_cuda, monkeypatch):
    trt = FakeTRT(10, subclassable_logger=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    spec = ModelSpec(name="mm", path=means_model(tmp_path / "mm.onnx"), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    engine = TensorRTEngine(spec, settings(tmp_path))
    engine.activate(rt, 4)
    run_batches(rt, engine, [2])
    engine.deactivate()
    rt.stop()


def test_timing_cache_is_kept_beside_the_engines_and_reused(tmp_path, fake_cuda, fake_trt):
    rt = CudaRuntime(0)
    rt.start()
    first = TensorRTEngine(ModelSpec(name="a", path=means_model(tmp_path / "a.onnx"), preprocess=PRE,
                                     backend="tensorrt"), settings(tmp_path))
    first.activate(rt, 4)
    path = first.timing_cache_path
    assert path.parent == first.cache_path.parent and path.is_file()
    assert path.name == f"timing-{timing_cache_key(fake_trt.__version__, 'Fake H100', (9, 0))}.cache"
    saved = path.read_bytes()
    first.deactivate()
    second = TensorRTEngine(ModelSpec(name="b", path=means_model(tmp_path / "b.onnx"), preprocess=PRE,
                                      backend="tensorrt"), settings(tmp_path))
    second.activate(rt, 2)  # another profile: another build, from the same timing cache
    assert second.source == "build" and second.timing_cache_path == path
    assert fake_trt.configs[1].timing_cache.serialize() == path.read_bytes()
    assert saved  # the second build started from what the first saved:
    assert set(fake_trt.configs[1].timing_cache.entries) >= set(json_entries(saved))
    second.deactivate()
    path.write_bytes(b"not a timing cache")  # unusable: ignored, the build goes on and rewrites it
    third = TensorRTEngine(ModelSpec(name="c", path=means_model(tmp_path / "c.onnx"), preprocess=PRE,
                                     backend="tensorrt"), settings(tmp_path))
    third.activate(rt, 3)
    assert third.source == "build" and json_entries(path.read_bytes())
    third.deactivate()
    rt.stop()


def json_entries(data: bytes) -> list:
    import json

    return json.loads(data)["entries"]


def test_timing_cache_key_covers_tensorrt_and_gpu_only():
    base = timing_cache_key("10.9.0", "NVIDIA H100", (9, 0))
    assert base == timing_cache_key("10.9.0", "NVIDIA H100", (9, 0))
    assert len({base, timing_cache_key("10.10.0", "NVIDIA H100", (9, 0)),
                timing_cache_key("10.9.0", "NVIDIA H200", (9, 0)),
                timing_cache_key("10.9.0", "NVIDIA H100", (8, 9))}) == 4


def test_workspace_limit_reaches_the_builder_and_the_cache_key(tmp_path, fake_cuda, fake_trt):
    spec = ModelSpec(name="mm", path=means_model(tmp_path / "mm.onnx"), preprocess=PRE, backend="tensorrt")
    rt = CudaRuntime(0)
    rt.start()
    plain = TensorRTEngine(spec, settings(tmp_path))
    plain.activate(rt, 4)
    plain.deactivate()
    limited = TensorRTEngine(spec, settings(tmp_path, trt_workspace_bytes=1 << 28))
    limited.activate(rt, 4)
    assert fake_trt.configs[0].pools == {} and fake_trt.configs[1].pools == {"WORKSPACE": 1 << 28}
    assert limited.source == "build" and limited.cache_path != plain.cache_path
    assert limited.timing_cache_path == plain.timing_cache_path
    limited.deactivate()
    with pytest.raises(ConfigError, match="trt_workspace_bytes=-1"):
        TensorRTEngine(spec, settings(tmp_path, trt_workspace_bytes=-1)).activate(rt, 4)
    rt.stop()
