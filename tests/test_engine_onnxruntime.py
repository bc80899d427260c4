"""The ONNX Runtime engine on the CPU provider, and the engine/runtime factory, on tiny exact models."""

from __future__ import annotations

import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
graph = pytest.importorskip("worker.models.graph", reason="worker.models.graph (device pre-processing) not there yet")
pytest.importorskip("worker.models.bundled", reason="worker.models.bundled (model paths) not there yet")

from onnx import TensorProto, helper  # noqa: E402

from worker.engines import CpuRuntime, create_engine, create_runtime  # noqa: E402
from worker.errors import ConfigError  # noqa: E402
from worker.models.spec import ModelSpec, OutputSpec, Preprocess  # noqa: E402
from worker.settings import Settings  # noqa: E402

PRE = Preprocess(width=5, height=4, layout="nchw", dtype="float32", scale=1 / 255,
                 mean=(0.5, 0.25, 0.125), std=(0.5, 0.25, 2.0))


def means_and_maxes_model(path) -> str:
    """N x 3 x H x W float32 -> per-channel means and maxes (N x 3 each): exact, checkable functions."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, PRE.height, PRE.width])
    means = helper.make_tensor_value_info("means", TensorProto.FLOAT, ["N", 3])
    maxes = helper.make_tensor_value_info("maxes", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[2, 3], keepdims=0),
             helper.make_node("ReduceMax", ["pixels"], ["maxes"], axes=[2, 3], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "means_maxes", [x], [means, maxes]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def reference(batch: np.ndarray) -> dict[str, np.ndarray]:
    x = batch.astype(np.float64) * PRE.scale
    x = (x - np.array(PRE.mean)) / np.array(PRE.std)  # N H W C
    return {"means": x.mean(axis=(1, 2)), "maxes": x.max(axis=(1, 2))}


@pytest.fixture
def spec(tmp_path) -> ModelSpec:
    return ModelSpec(name="mm", path=means_and_maxes_model(tmp_path / "mm.onnx"), preprocess=PRE)


def active(spec: ModelSpec, max_batch: int = 4):
    settings = Settings(device="cpu")
    runtime = create_runtime(settings)
    runtime.start()
    engine = create_engine(spec, settings)
    engine.activate(runtime, max_batch)
    return runtime, engine


def test_cpu_engine_outputs_match_reference_for_every_batch_size(spec):
    runtime, engine = active(spec)
    rng = np.random.default_rng(7)
    try:
        for n in range(1, 5):
            batch = rng.integers(0, 256, size=(n, *PRE.hwc_shape), dtype=np.uint8)
            collector = engine.enqueue(batch)
            runtime.synchronize()
            out = collector()
            assert sorted(out) == ["maxes", "means"]
            for name, want in reference(batch).items():
                assert out[name].shape == (n, 3)
                np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-5)
    finally:
        engine.deactivate()
        runtime.stop()


def test_each_image_alone_gives_the_same_result_as_in_a_batch(spec):
    runtime, engine = active(spec)
    rng = np.random.default_rng(11)
    batch = rng.integers(0, 256, size=(4, *PRE.hwc_shape), dtype=np.uint8)
    together = engine.enqueue(batch)()
    for i in range(4):
        alone = engine.enqueue(batch[i:i + 1].copy())()
        np.testing.assert_array_equal(alone["means"][0], together["means"][i])
    engine.deactivate()


def test_outputs_listed_in_the_spec_are_the_only_ones_returned(tmp_path):
    spec = ModelSpec(name="mm", path=means_and_maxes_model(tmp_path / "mm.onnx"), preprocess=PRE,
                     outputs=(OutputSpec(name="maxes"),))
    _, engine = active(spec)
    out = engine.enqueue(np.zeros((2, *PRE.hwc_shape), np.uint8))()
    assert list(out) == ["maxes"]


def test_an_output_missing_from_the_model_is_a_config_error(tmp_path):
    spec = ModelSpec(name="mm", path=means_and_maxes_model(tmp_path / "mm.onnx"), preprocess=PRE,
                     outputs=(OutputSpec(name="logits"),))
    with pytest.raises(ConfigError, match="logits"):
        active(spec)


def test_wrong_batch_shape_or_size_is_refused(spec):
    _, engine = active(spec, max_batch=2)
    with pytest.raises(ValueError, match="uint8"):
        engine.enqueue(np.zeros((1, 5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="outside 1..2"):
        engine.enqueue(np.zeros((3, *PRE.hwc_shape), np.uint8))


def test_unreadable_model_file_stops_start_up(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="bad.onnx"):
        active(ModelSpec(name="bad", path=str(bad), preprocess=PRE))


def test_factory_cpu_and_auto_without_pycuda_give_the_cpu_runtime(monkeypatch):
    assert isinstance(create_runtime(Settings(device="cpu")), CpuRuntime)
    monkeypatch.setitem(sys.modules, "pycuda", None)  # import pycuda -> ImportError
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    assert isinstance(create_runtime(Settings(device="auto")), CpuRuntime)
    with pytest.raises(ConfigError, match="device=cuda but CUDA is not usable: pycuda is not importable"):
        create_runtime(Settings(device="cuda"))


def test_factory_refuses_tensorrt_on_cpu(spec):
    trt_spec = ModelSpec(name="t", path=spec.path, preprocess=PRE, backend="tensorrt")
    with pytest.raises(ConfigError, match="backend=tensorrt needs"):
        create_engine(trt_spec, Settings(device="cpu"))


# --- the CUDA path, with a stand-in device ------------------------------------------------------
# FakeCudaRuntime's "device memory" is host memory; host-to-device copies happen when queued (they
# precede the model on the stream), device-to-host copies only at synchronize(), as on a real stream.
# The session is ONNX Runtime's CPU provider behind the CUDA-provider interface: IO binding to "cuda"
# pointers is rebound to the same pointers on "cpu". This checks our binding, shapes, copies and run
# options; tests/gpu checks the CUDA provider itself.

import ctypes  # noqa: E402

from worker.engines.cuda import DeviceBuffer  # noqa: E402


class FakeCudaRuntime:
    kind = "cuda"
    device_index = 0
    stream_handle = 0xBEEF
    device_name = gpu_name = "Fake GPU"
    compute_capability = (9, 0)

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.pending: list[tuple[np.ndarray, int]] = []
        self.htod = 0

    def device_buffer(self, nbytes: int, label: str = "") -> DeviceBuffer:
        arr = np.full(max(nbytes, 1), 0xAB, np.uint8)  # poison: unwritten outputs show
        self.memory[arr.ctypes.data] = arr
        return DeviceBuffer(arr.ctypes.data, nbytes, label, arr)

    def free(self, buf: DeviceBuffer) -> None:
        del self.memory[buf.ptr]

    def host_buffer(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def to_device(self, dst: int, src: np.ndarray, what: str = "") -> None:
        self.htod += 1
        ctypes.memmove(dst, np.ascontiguousarray(src).ctypes.data, src.nbytes)

    def to_host(self, dst: np.ndarray, src: int, what: str = "") -> None:
        # in stream order: the device bytes as they are now (the fake runs kernels at once), landing in
        # ``dst`` only at synchronize
        data = np.empty(dst.nbytes, np.uint8)
        ctypes.memmove(data.ctypes.data, src, dst.nbytes)
        self.pending.append((dst, data))

    def synchronize(self) -> None:
        for dst, data in self.pending:
            ctypes.memmove(dst.ctypes.data, data.ctypes.data, dst.nbytes)
        self.pending.clear()


@pytest.fixture
def cuda_as_cpu(monkeypatch):
    """onnxruntime.InferenceSession that accepts the CUDA provider options and runs on the CPU."""
    import onnxruntime as ort

    real = ort.InferenceSession
    made: list = []

    class Binding:
        def __init__(self, inner):
            self.inner = inner
            self.shape = None  # the input shape last bound

        def bind_input(self, name, device, device_id, dtype, shape, ptr):
            assert device == "cuda"
            self.shape = tuple(shape)
            self.inner.bind_input(name, "cpu", 0, dtype, shape, ptr)

        def bind_output(self, name, device="cpu", device_id=0, dtype=None, shape=None, ptr=None):
            assert device == "cuda"
            if ptr is None:
                self.inner.bind_output(name, "cpu")
            else:
                self.inner.bind_output(name, "cpu", 0, dtype, shape, ptr)

        def get_outputs(self):
            return self.inner.get_outputs()

    class Session:
        def __init__(self, model_bytes, options, providers):
            self.providers = providers
            self.runs: list = []
            self.shapes: set = set()  # input shapes it ran at
            self._s = real(model_bytes, options, providers=["CPUExecutionProvider"])
            made.append(self)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_inputs(self):
            return self._s.get_inputs()

        def get_outputs(self):
            return self._s.get_outputs()

        def io_binding(self):
            return Binding(self._s.io_binding())

        def run(self, names, feed):
            return self._s.run(names, feed)

        def run_with_iobinding(self, binding, options):
            self.runs.append(options)
            self.shapes.add(binding.shape)
            self._s.run_with_iobinding(binding.inner, options)

    monkeypatch.setattr(ort, "InferenceSession", Session)
    return made


def test_cuda_path_binds_our_buffers_on_our_stream_and_copies_back_only_at_sync(spec, cuda_as_cpu):
    runtime = FakeCudaRuntime()
    engine = create_engine(spec, Settings(device="cuda", ort_cudnn_search="EXHAUSTIVE"))
    engine.activate(runtime, 4)
    (session,) = cuda_as_cpu
    name, options = session.providers[0]
    assert name == "CUDAExecutionProvider"
    assert options["user_compute_stream"] == str(0xBEEF) and options["has_user_compute_stream"] == "1"
    assert options["device_id"] == "0" and options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    rng = np.random.default_rng(3)
    for n in (1, 4, 2, 3):
        batch = rng.integers(0, 256, size=(n, *PRE.hwc_shape), dtype=np.uint8)
        collector = engine.enqueue(batch)
        assert runtime.pending, "outputs are copied back asynchronously"
        runtime.synchronize()
        out = collector()
        for key, want in reference(batch).items():
            np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-5)
    assert runtime.htod == 4
    assert all(o.get_run_config_entry("disable_synchronize_execution_providers") == "1" for o in session.runs)
    buffers = len(runtime.memory)
    assert buffers == 3  # input + two outputs, sized once for max_batch_size
    # two batches queued before one synchronisation (the GPU thread's batches in flight): each collector
    # reads its own host outputs, the second batch's copies do not overwrite the first's
    batches = [rng.integers(0, 256, size=(n, *PRE.hwc_shape), dtype=np.uint8) for n in (3, 2)]
    collectors = [engine.enqueue(b) for b in batches]
    runtime.synchronize()
    for batch, collector in zip(batches, collectors):
        for key, want in reference(batch).items():
            np.testing.assert_allclose(collector()[key], want, rtol=1e-5, atol=1e-5)
    engine.deactivate()
    assert runtime.memory == {}


@pytest.mark.parametrize("shapes, sessions", [("max", {(4,)}), ("pow2", {(1,), (2,), (4,)})])
def test_cuda_path_runs_each_bucket_on_a_session_that_never_changes_shape(spec, cuda_as_cpu, shapes, sessions):
    """ONNX Runtime re-prepares a session whenever its input shape changes: pow2 gives every bucket a session
    of its own, so no session ever sees two shapes, and a batch of 3 runs at 4 rows on its bucket's session."""
    runtime = FakeCudaRuntime()
    engine = create_engine(spec, Settings(device="cuda", ort_batch_shapes=shapes))
    engine.activate(runtime, 4)
    assert {tuple(s[0] for s in made.shapes) for made in cuda_as_cpu} == sessions  # each: one batch size
    rng = np.random.default_rng(5)
    for n in (3, 1, 4, 2, 1, 3):
        batch = rng.integers(0, 256, size=(n, *PRE.hwc_shape), dtype=np.uint8)
        collector = engine.enqueue(batch)
        runtime.synchronize()
        for key, want in reference(batch).items():
            np.testing.assert_allclose(collector()[key], want, rtol=1e-5, atol=1e-5)
    assert all(len(made.shapes) == 1 for made in cuda_as_cpu)
    assert len(runtime.memory) == 3  # one input and two output buffers, shared by every session
    engine.deactivate()
    assert runtime.memory == {}


def test_cuda_path_without_arena_shrinks_it_after_each_run(spec, cuda_as_cpu):
    runtime = FakeCudaRuntime()
    engine = create_engine(spec, Settings(device="cuda", ort_arena=False))
    engine.activate(runtime, 2)
    options = engine._cuda.run_options
    assert options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "gpu:0"
    engine.deactivate()


def test_cuda_path_outputs_with_symbolic_shape_are_allocated_by_onnxruntime(tmp_path, cuda_as_cpu):
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, PRE.height, PRE.width])
    flat = helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", "K"])  # K: not known up front
    model = helper.make_model(helper.make_graph([helper.make_node("Flatten", ["pixels"], ["flat"], axis=1)],
                                                "flat", [x], [flat]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "flat.onnx"))
    spec = ModelSpec(name="flat", path=str(tmp_path / "flat.onnx"), preprocess=PRE)
    runtime = FakeCudaRuntime()
    engine = create_engine(spec, Settings(device="cuda"))
    engine.activate(runtime, 3)
    batch = np.random.default_rng(5).integers(0, 256, size=(2, *PRE.hwc_shape), dtype=np.uint8)
    collector = engine.enqueue(batch)
    runtime.synchronize()
    got = collector()["flat"]
    want = ((batch * PRE.scale - np.array(PRE.mean)) / np.array(PRE.std)).transpose(0, 3, 1, 2).reshape(2, -1)
    assert got.shape == (2, 60)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    engine.deactivate()


def test_fixed_batch_models_get_padded_batches(tmp_path, cuda_as_cpu):
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [4, 3, PRE.height, PRE.width])
    means = helper.make_tensor_value_info("means", TensorProto.FLOAT, [4, 3])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[2, 3], keepdims=0)], "fixed", [x], [means]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    spec = ModelSpec(name="fixed", path=str(tmp_path / "fixed.onnx"), preprocess=PRE)
    batch = np.random.default_rng(9).integers(0, 256, size=(3, *PRE.hwc_shape), dtype=np.uint8)
    for settings in (Settings(device="cpu"), Settings(device="cuda")):
        runtime = FakeCudaRuntime() if settings.device == "cuda" else CpuRuntime()
        engine = create_engine(spec, settings)
        engine.activate(runtime, 4)
        collector = engine.enqueue(batch)
        runtime.synchronize()
        np.testing.assert_allclose(collector()["means"], reference(batch)["means"], rtol=1e-5, atol=1e-5)
        engine.deactivate()
        with pytest.raises(ConfigError, match="takes batches of exactly 4"):
            create_engine(spec, settings).activate(runtime, 8)


def test_model_may_add_cuda_provider_options_but_not_the_stream(spec):
    from worker.engines.onnxruntime import cuda_provider_options

    runtime = FakeCudaRuntime()
    extra = ModelSpec(name="m", path=spec.path, preprocess=PRE,
                      extra={"cuda_provider_options": {"use_tf32": 0, "enable_cuda_graph": False}})
    options = cuda_provider_options(Settings(device="cuda"), runtime, extra)
    assert options["use_tf32"] == "0" and options["enable_cuda_graph"] == "0"
    assert options["user_compute_stream"] == str(0xBEEF)
    bad = ModelSpec(name="m", path=spec.path, preprocess=PRE,
                    extra={"cuda_provider_options": {"user_compute_stream": "0"}})
    with pytest.raises(ConfigError, match="may not set"):
        cuda_provider_options(Settings(device="cuda"), runtime, bad)
