"""TensorRT engine and CudaRuntime logic, without a GPU: test doubles of ``pycuda.driver`` and ``tensorrt``.

The doubles keep real semantics where it matters:

- fake pycuda: "device memory" is host memory (numpy arrays) addressed by pointer, copies really copy
  (ctypes.memmove), pinned buffers are tracked, errors carry pycuda's message format
  ("cuMemAlloc failed: out of memory"), and every call is logged in order;
- fake tensorrt: the builder parses the ONNX it is given and serialises a "plan" holding it, the
  runtime refuses plans of another TensorRT version or compute capability (returning None, as the real
  one does), and ``execute_async_v3`` reads the input at the address it was given, runs the ONNX on
  ONNX Runtime's CPU provider and writes the outputs to the given addresses.

So these tests check what the engine does with shapes, profiles, addresses and the stream, and that the
numbers come out right, but not TensorRT or CUDA themselves: tests/gpu does that on a GPU.
"""

from __future__ import annotations

import ctypes
import json
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

from worker.engines import create_runtime  # noqa: E402
from worker.engines.cuda import CudaRuntime, cuda_error_name  # noqa: E402
from worker.engines.tensorrt import TensorRTEngine, engine_cache_key  # noqa: E402
from worker.errors import ConfigError, DeviceError, EngineLoadError  # noqa: E402
from worker.models.spec import ModelSpec, OutputSpec, Preprocess  # noqa: E402
from worker.settings import Settings  # noqa: E402

PRE = Preprocess(width=5, height=4, layout="nchw", dtype="float32", scale=1 / 255,
                 mean=(0.5, 0.25, 0.125), std=(0.5, 0.25, 2.0))


# --- fake pycuda.driver ---------------------------------------------------------------------------

class FakeCuda(types.ModuleType):
    """The part of pycuda.driver that CudaRuntime uses."""

    def __init__(self, total: int = 1 << 30, devices: int = 1) -> None:
        super().__init__("pycuda.driver")
        self.calls: list[tuple] = []
        self.total, self.used, self.devices = total, 0, devices
        self.memory: dict[int, np.ndarray] = {}  # device allocations: pointer -> backing array
        self.pinned: dict[int, int] = {}  # pinned allocations: pointer -> nbytes
        self.fail_sync: str = ""
        fake = self

        class Error(Exception):
            pass

        class MemoryError(Error):  # noqa: A001 - pycuda's name
            pass

        class LaunchError(Error):
            pass

        class Context:
            @staticmethod
            def pop():
                fake.calls.append(("pop",))

            def push(self):
                fake.calls.append(("push",))

            def detach(self):
                fake.calls.append(("detach",))

        class Device:
            def __init__(self, index):
                self.index = index

            @staticmethod
            def count():
                return fake.devices

            def retain_primary_context(self):
                fake.calls.append(("retain_primary_context", self.index))
                return Context()

            def make_context(self, flags=0):
                raise AssertionError("CudaRuntime must never call make_context")

            def name(self):
                return "Fake H100"

            def compute_capability(self):
                return (9, 0)

        class Stream:
            handle = 0x5150

            def __init__(self, flags=0):
                fake.calls.append(("stream",))

            def synchronize(self):
                fake.calls.append(("synchronize",))
                if fake.fail_sync:
                    raise LaunchError(f"cuStreamSynchronize failed: {fake.fail_sync}")

        class Allocation:
            def __init__(self, nbytes):
                self.array = np.zeros(nbytes, np.uint8)
                self.ptr, self.nbytes = self.array.ctypes.data, nbytes

            def __int__(self):
                return self.ptr

            def free(self):
                fake.calls.append(("free", self.ptr))
                fake.memory.pop(self.ptr)
                fake.used -= self.nbytes

        class HostAllocation(bytearray):
            def free(self):
                fake.calls.append(("free_pinned",))

        self.Error, self.MemoryError, self.LaunchError = Error, MemoryError, LaunchError
        self.Context, self.Device, self.Stream = Context, Device, Stream
        self._Allocation, self._HostAllocation = Allocation, HostAllocation

    def init(self, flags=0):
        self.calls.append(("init",))

    def mem_get_info(self):
        return self.total - self.used, self.total

    def mem_alloc(self, nbytes):
        if self.used + nbytes > self.total:
            raise self.MemoryError("cuMemAlloc failed: out of memory")
        alloc = self._Allocation(nbytes)
        self.used += nbytes
        self.memory[alloc.ptr] = alloc.array
        self.calls.append(("mem_alloc", nbytes))
        return alloc

    def pagelocked_empty(self, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        holder = self._HostAllocation(max(nbytes, 1))
        arr = np.ndarray(shape, dtype, buffer=holder)
        self.pinned[arr.ctypes.data] = nbytes
        return arr

    def _is_pinned(self, arr):
        start = arr.ctypes.data
        return any(p <= start and start + arr.nbytes <= p + n for p, n in self.pinned.items())

    def _check_device(self, ptr, nbytes):
        assert any(p <= ptr and ptr + nbytes <= p + a.nbytes for p, a in self.memory.items()), \
            "copy outside our device allocations"

    def memcpy_htod_async(self, dst, src, stream=None):
        assert stream is not None, "copies must go to our stream, not the default one"
        self._check_device(int(dst), src.nbytes)
        self.calls.append(("htod", int(dst), src.nbytes, self._is_pinned(src)))
        ctypes.memmove(int(dst), src.ctypes.data, src.nbytes)

    def memcpy_dtoh_async(self, dst, src, stream=None):
        assert stream is not None, "copies must go to our stream, not the default one"
        self._check_device(int(src), dst.nbytes)
        self.calls.append(("dtoh", int(src), dst.nbytes, self._is_pinned(dst)))
        ctypes.memmove(dst.ctypes.data, int(src), dst.nbytes)

    def names(self):
        return [c[0] for c in self.calls]


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


# --- fake tensorrt --------------------------------------------------------------------------------

class _Enum:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"DataType.{self.name}"


class FakeTRT(types.ModuleType):
    """The name-based TensorRT 10 API surface that TensorRTEngine uses."""

    def __init__(self, version: str = "10.9.0.34", cc: tuple[int, int] = (9, 0), builder: bool = True,
                 name: str = "tensorrt") -> None:
        super().__init__(name)
        self.__version__, self.cc = version, cc
        self.builds, self.contexts, self.profiles = 0, [], []
        trt = self

        class TensorIOMode:
            INPUT, OUTPUT, NONE = "INPUT", "OUTPUT", "NONE"

        class DataType:
            FLOAT, HALF, UINT8, INT32 = _Enum("FLOAT"), _Enum("HALF"), _Enum("UINT8"), _Enum("INT32")

        class ILogger:
            class Severity:
                INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self):
                pass

        class Logger(ILogger):
            WARNING = 2

            def __init__(self, level=2):
                pass

            def log(self, severity, msg):
                pass

        self.TensorIOMode, self.DataType, self.ILogger, self.Logger = TensorIOMode, DataType, ILogger, Logger

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, plan):
                header, _, onnx_bytes = bytes(plan).partition(b"\n")
                meta = json.loads(header)
                if meta["version"] != trt.__version__:
                    self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 6: "
                                    f"The engine plan file is not compatible with this version of TensorRT, "
                                    f"expecting library version {trt.__version__} got {meta['version']}")
                    return None
                if tuple(meta["cc"]) != trt.cc:
                    self.logger.log(ILogger.Severity.ERROR, "The engine plan file is generated on an "
                                    f"incompatible device, expecting compute {trt.cc} got {meta['cc']}")
                    return None
                return FakeEngine(trt, meta, onnx_bytes)

        self.Runtime = Runtime
        if builder:
            self.Builder, self.OnnxParser = FakeBuilder, FakeParser
            self.BuilderFlag = types.SimpleNamespace(FP16="FP16")


def plan_bytes(trt_version, cc, inp, outputs, profile, onnx_bytes):
    header = {"version": trt_version, "cc": list(cc), "input": inp, "outputs": outputs, "profile": profile}
    return json.dumps(header).encode() + b"\n" + onnx_bytes


class FakeEngine:
    def __init__(self, trt, meta, onnx_bytes):
        self.trt, self.meta = trt, meta
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.names = [meta["input"]["name"], *[o["name"] for o in meta["outputs"]]]

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == self.names[0] else self.trt.TensorIOMode.OUTPUT

    def _tensor(self, name):
        return self.meta["input"] if name == self.names[0] else next(o for o in self.meta["outputs"]
                                                                      if o["name"] == name)

    def get_tensor_shape(self, name):
        return tuple(self._tensor(name)["shape"])

    def get_tensor_dtype(self, name):
        return getattr(self.trt.DataType, self._tensor(name)["dtype"])

    def get_tensor_profile_shape(self, name, profile_index):
        assert name == self.names[0] and profile_index == 0
        tail = self.meta["input"]["shape"][1:]
        return tuple((b, *tail) for b in self.meta["profile"])

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.trt.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.calls = engine, {}, {}, []

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        lo, hi = self.engine.meta["profile"][0], self.engine.meta["profile"][2]
        self.shapes[name] = tuple(shape)
        return lo <= shape[0] <= hi

    def get_tensor_shape(self, name):
        rows = self.shapes[self.engine.names[0]][0]
        return (rows, *self.engine.get_tensor_shape(name)[1:])

    def set_tensor_address(self, name, ptr):
        self.calls.append(("set_tensor_address", name, ptr))
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute_async_v3", stream_handle))
        meta = self.engine.meta
        shape = self.shapes[meta["input"]["name"]]
        dtype = np.dtype({"UINT8": np.uint8, "FLOAT": np.float32}[meta["input"]["dtype"]])
        x = np.empty(shape, dtype)
        ctypes.memmove(x.ctypes.data, self.addresses[meta["input"]["name"]], x.nbytes)
        feed_name = self.engine.session.get_inputs()[0].name
        for name, value in zip([o.name for o in self.engine.session.get_outputs()],
                               self.engine.session.run(None, {feed_name: x}), strict=True):
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


class FakeNetwork:
    def __init__(self):
        self.onnx_bytes, self.inputs, self.outputs = b"", [], []

    def get_input(self, i):
        return self.inputs[i]


class FakeParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse(self, data):
        model = onnx.load_from_string(data)
        self.network.onnx_bytes = data

        def shape(v):
            return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)

        self.network.inputs = [types.SimpleNamespace(name=i.name, shape=shape(i)) for i in model.graph.input]
        self.network.outputs = [types.SimpleNamespace(name=o.name, shape=shape(o)) for o in model.graph.output]
        return True

    @property
    def num_errors(self):
        return len(self.errors)


class FakeBuilder:
    trt: FakeTRT

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        assert flags == 0
        return FakeNetwork()

    def create_optimization_profile(self):
        profile = types.SimpleNamespace(shapes={})
        profile.set_shape = lambda name, lo, opt, hi: profile.shapes.__setitem__(name, (lo, opt, hi))
        return profile

    def build_serialized_network(self, network, config):
        trt = sys.modules["tensorrt"]
        trt.builds += 1
        (name, (lo, opt, hi)), = config.profiles[0].shapes.items()
        trt.profiles.append((lo, opt, hi))
        inp = network.inputs[0]
        outputs = [{"name": o.name, "shape": list(o.shape), "dtype": "FLOAT"} for o in network.outputs]
        return plan_bytes(trt.__version__, trt.cc, {"name": inp.name, "shape": list(inp.shape), "dtype": "UINT8"},
                          outputs, [lo[0], opt[0], hi[0]], network.onnx_bytes)


def _config_factory():
    config = types.SimpleNamespace(profiles=[], flags=[])
    config.add_optimization_profile = lambda p: config.profiles.append(p) or 0
    config.set_flag = lambda f: config.flags.append(f)
    return config


FakeBuilder.create_builder_config = lambda self: _config_factory()


@pytest.fixture
def fake_trt(monkeypatch) -> FakeTRT:
    trt = FakeTRT()
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
    ("10.3.0.26", (9, 0), "expecting library version 10.9.0.34 got 10.3.0.26"),
    ("10.9.0.34", (8, 6), "incompatible device"),
])
def test_a_plan_from_another_tensorrt_or_gpu_stops_start_up_clearly(tmp_path, fake_cuda, fake_trt,
                                                                    built_with, built_on, said):
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
    assert "TensorRT 10.9.0.34 cannot load model.plan on Fake H100" in text
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
    path.write_bytes(plan_bytes("10.9.0.34", (9, 0), inp, outputs, list(profile), model.SerializeToString()))
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
    monkeypatch.setattr(ort_engine, "run_bound", lambda s, b, o, what, rt: s.run_with_iobinding(b.inner, o))
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
