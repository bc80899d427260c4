"""Test doubles of ``pycuda.driver`` and ``tensorrt`` (10 and 11), for tests/test_engine_tensorrt.py.

TensorRT cannot be installed here, so these imitate its behaviour, refusals included, as read from
TensorRT's documentation and the onnx-tensorrt parser's sources (checked with ``search``):

- a stream runs nothing until it is synchronised: copies and ``execute_async_v3`` are queued on it and
  run, in order, in ``Stream.synchronize`` (so host reads before the synchronisation see stale data);
- the ONNX parser refuses a node that outputs a uint8 tensor that is not a graph output
  (onnx-tensorrt ``ModelImporter.cpp``: "TensorRT does not support UINT8 types for intermediate
  tensors"), returns False, and reports through ``num_errors`` / ``get_error(i)`` objects that have
  ``desc()``, ``code()`` and ``node()`` (and no useful ``str``);
- each major exposes its own enums: 10 has ``BuilderFlag.FP16`` and ``NetworkDefinitionCreationFlag.
  EXPLICIT_BATCH`` (deprecated, ignored); 11 has neither (strongly typed networks only);
- ``Logger`` is a closed class (pybind11): no new attributes; a Python ``ILogger`` subclass must call
  ``ILogger.__init__``;
- the builder needs an optimisation profile for a dynamic input and refuses one that disagrees with a
  fixed input; a strongly typed network refuses precision flags;
- the runtime refuses plans of another TensorRT version or compute capability (returns None, logs);
- the execution context refuses shapes outside the profile, runs only with every address and dynamic
  shape given, and reports fixed shapes without ``set_input_shape``;
- the timing cache is bytes tied to the TensorRT version and GPU; ``set_timing_cache`` refuses a
  mismatch unless told to ignore it.

"Device memory" is host memory; the engine runs its ONNX on ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

NP_TYPES = {"UINT8": np.uint8, "FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}
ONNX_TO_TRT = {TensorProto.UINT8: "UINT8", TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF",
               TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL"}


# --- fake pycuda.driver ---------------------------------------------------------------------------

class FakeCuda(types.ModuleType):
    """The part of pycuda.driver that CudaRuntime uses. Work queued on a stream runs at its synchronize."""

    def __init__(self, total: int = 1 << 30, devices: int = 1) -> None:
        super().__init__("pycuda.driver")
        self.calls: list[tuple] = []
        self.total, self.used, self.devices = total, 0, devices
        self.memory: dict[int, np.ndarray] = {}  # device allocations: pointer -> backing array
        self.pinned: dict[int, int] = {}  # pinned allocations: pointer -> nbytes
        self.fail_sync: str = ""
        self.queue: list = []  # (what, run) queued on the stream, not yet run
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
                queued, fake.queue = fake.queue, []
                for _what, run in queued:
                    run()
                if fake.fail_sync:
                    raise LaunchError(f"cuStreamSynchronize failed: {fake.fail_sync}")

        class Event:
            """``record`` marks the stream's queue; ``synchronize`` runs the queue up to the mark."""

            def __init__(self, flags=0):
                self.recorded = False

            def record(self, stream):
                self.recorded = True
                fake.enqueue(stream.handle, "event", lambda: None)
                self.mark = fake.queue[-1]

            def synchronize(self):
                assert self.recorded, "an event waited for before it was recorded"
                fake.calls.append(("event_synchronize",))
                while self.mark in fake.queue:
                    _what, run = fake.queue.pop(0)
                    run()
                if fake.fail_sync:
                    raise LaunchError(f"cuEventSynchronize failed: {fake.fail_sync}")

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
        self.Context, self.Device, self.Stream, self.Event = Context, Device, Stream, Event
        self.event_flags = types.SimpleNamespace(DISABLE_TIMING=2)
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
        self.enqueue(stream.handle, "htod", lambda: ctypes.memmove(int(dst), src.ctypes.data, src.nbytes))

    def memcpy_dtoh_async(self, dst, src, stream=None):
        assert stream is not None, "copies must go to our stream, not the default one"
        self._check_device(int(src), dst.nbytes)
        self.calls.append(("dtoh", int(src), dst.nbytes, self._is_pinned(dst)))
        self.enqueue(stream.handle, "dtoh", lambda: ctypes.memmove(dst.ctypes.data, int(src), dst.nbytes))

    def enqueue(self, stream_handle, what, run):
        """Work for our stream (copies, TensorRT, ONNX Runtime): it runs at the stream's synchronize."""
        assert stream_handle == self.Stream.handle, f"{what} on stream {stream_handle:#x}, not ours"
        self.queue.append((what, run))

    def names(self):
        return [c[0] for c in self.calls]



# --- fake tensorrt --------------------------------------------------------------------------------

class _Enum:
    """A pybind11 enum member: ``.name``, ``int()``, equality by identity."""

    def __init__(self, owner, name, value):
        self.owner, self.name, self.value = owner, name, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"<{self.owner}.{self.name}: {self.value}>"


def _enum(owner, *names):
    """An enum class exposing exactly ``names`` (a missing member is an AttributeError, as in TensorRT)."""
    return type(owner, (), {n: _Enum(owner, n, i) for i, n in enumerate(names)})


VERSIONS = {10: "10.9.0.34", 11: "11.1.0.6"}


class ParserError:
    """onnx-tensorrt's ``IParserError`` as Python sees it: methods, no informative ``str``."""

    def __init__(self, code, desc, node):
        self._code, self._desc, self._node = code, desc, node

    def code(self):
        return self._code

    def desc(self):
        return self._desc

    def node(self):
        return self._node

    def __repr__(self):
        return f"<tensorrt.tensorrt.ParserError object at {id(self):#x}>"

    __str__ = __repr__


class FakeTRT(types.ModuleType):
    """The name-based TensorRT API surface of one major (10 or 11) that TensorRTEngine may use."""

    def __init__(self, major: int = 10, version: str = "", cc: tuple[int, int] = (9, 0), builder: bool = True,
                 name: str = "tensorrt", subclassable_logger: bool = True) -> None:
        super().__init__(name)
        self.major = major
        self.__version__, self.cc = version or VERSIONS[major], cc
        self.builds, self.contexts, self.profiles, self.configs, self.networks = 0, [], [], [], []
        self.logged: list[tuple] = []  # (severity, message) of everything logged through our classes
        trt = self

        self.TensorIOMode = _enum("TensorIOMode", "NONE", "INPUT", "OUTPUT")
        self.DataType = _enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16",
                              "INT64", "INT4", *(("FP4",) if major >= 11 else ()))
        self.MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM",
                                    "DLA_GLOBAL_DRAM", "TACTIC_DRAM", "TACTIC_SHARED_MEMORY")
        self.ErrorCode = _enum("ErrorCode", "SUCCESS", "INTERNAL_ERROR", "MEM_ALLOC_FAILED",
                               "MODEL_DESERIALIZE_FAILED", "INVALID_VALUE", "INVALID_GRAPH", "INVALID_NODE",
                               "UNSUPPORTED_GRAPH", "UNSUPPORTED_NODE", "UNSUPPORTED_NODE_ATTR",
                               "UNSUPPORTED_NODE_INPUT", "UNSUPPORTED_NODE_DATATYPE",
                               "UNSUPPORTED_NODE_DYNAMIC", "UNSUPPORTED_NODE_SHAPE", "REFIT_FAILED")
        if major >= 11:  # strongly typed only: the precision flags and EXPLICIT_BATCH are gone
            self.BuilderFlag = _enum("BuilderFlag", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                                     "SPARSE_WEIGHTS", "SAFETY_SCOPE", "DEBUG", "STRIP_PLAN", "REFIT_IDENTICAL",
                                     "WEIGHT_STREAMING", "EDITABLE_TIMING_CACHE")
            self.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", "_RESERVED", "STRONGLY_TYPED")
        else:
            self.BuilderFlag = _enum("BuilderFlag", "FP16", "BF16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT",
                                     "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE",
                                     "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                                     "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE",
                                     "EXCLUDE_LEAN_RUNTIME", "FP8", "ERROR_ON_TIMING_CACHE_MISS", "INT4",
                                     "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING")
            self.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH",
                                                       "STRONGLY_TYPED")

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (_Enum("Severity", n, i) for i, n in enumerate(
                ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")))

        class ILogger:
            __slots__ = ("_initialised",)

            def __init_subclass__(cls, **kw):
                if not subclassable_logger and cls.__name__ != "Logger":
                    raise TypeError("this TensorRT build cannot subclass ILogger")
                super().__init_subclass__(**kw)

            def __init__(self):
                self._initialised = True

        ILogger.Severity = Severity

        class Logger(ILogger):
            """trt.Logger: prints, keeps nothing, and (a pybind11 class) takes no new attributes."""
            __slots__ = ("min_severity",)
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity.INTERNAL_ERROR, Severity.ERROR,
                                                             Severity.WARNING, Severity.INFO, Severity.VERBOSE)

            def __init__(self, min_severity=Severity.WARNING):
                ILogger.__init__(self)
                self.min_severity = min_severity

            def log(self, severity, msg):
                pass

        self.ILogger, self.Logger = ILogger, Logger

        def checked(logger):
            if not isinstance(logger, ILogger) or not getattr(logger, "_initialised", False):
                raise TypeError("tensorrt.ILogger.__init__() must be called when overriding __init__")
            return logger

        def log(logger, severity, msg):
            trt.logged.append((severity.name, msg))
            logger.log(severity, msg)

        self._checked, self._log = checked, log

        class Runtime:
            def __init__(self, logger):
                self.logger = checked(logger)

            def deserialize_cuda_engine(self, plan):
                header, _, onnx_bytes = bytes(plan).partition(b"\n")
                meta = json.loads(header)
                if meta["version"] != trt.__version__:
                    log(self.logger, Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 6: The engine "
                        f"plan file is not compatible with this version of TensorRT, expecting library version "
                        f"{trt.__version__} got {meta['version']}")
                    return None
                if tuple(meta["cc"]) != trt.cc:
                    log(self.logger, Severity.ERROR, "The engine plan file is generated on an "
                        f"incompatible device, expecting compute {trt.cc} got {meta['cc']}")
                    return None
                return FakeEngine(trt, meta, onnx_bytes, self.logger)

        self.Runtime = Runtime
        if builder:
            self.Builder = lambda logger: FakeBuilder(trt, checked(logger))
            self.OnnxParser = lambda network, logger: FakeParser(trt, network, checked(logger))


def plan_bytes(trt_version, cc, inp, outputs, profile, onnx_bytes, **extra):
    header = {"version": trt_version, "cc": list(cc), "input": inp, "outputs": outputs, "profile": profile, **extra}
    return json.dumps(header).encode() + b"\n" + onnx_bytes


class FakeEngine:
    def __init__(self, trt, meta, onnx_bytes, logger):
        self.trt, self.meta, self.logger = trt, meta, logger
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.names = [meta["input"]["name"], *[o["name"] for o in meta["outputs"]]]

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        if name not in self.names:
            return self.trt.TensorIOMode.NONE
        return self.trt.TensorIOMode.INPUT if name == self.names[0] else self.trt.TensorIOMode.OUTPUT

    def _tensor(self, name):
        return self.meta["input"] if name == self.names[0] else next(o for o in self.meta["outputs"]
                                                                      if o["name"] == name)

    def get_tensor_shape(self, name):
        return tuple(self._tensor(name)["shape"])

    def get_tensor_dtype(self, name):
        return getattr(self.trt.DataType, self._tensor(name)["dtype"])

    def get_tensor_profile_shape(self, name, profile_index):
        assert self.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT and profile_index == 0
        shape = self.meta["input"]["shape"]
        if shape[0] >= 0:
            return (tuple(shape),) * 3
        return tuple((b, *shape[1:]) for b in self.meta["profile"])

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.trt.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.calls = engine, {}, {}, []
        self.runs = 0  # executions that have actually run (at a stream synchronize)

    def _error(self, msg):
        trt = self.engine.trt
        trt._log(self.engine.logger, trt.ILogger.Severity.ERROR, msg)
        return False

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        meta = self.engine.meta
        if name != meta["input"]["name"]:
            return self._error(f"IExecutionContext::setInputShape: Error Code 3: {name} is not an input")
        static = meta["input"]["shape"]
        if len(shape) != len(static) or any(s >= 0 and s != d for s, d in zip(static, shape)):
            return self._error(f"IExecutionContext::setInputShape: Error Code 3: shape {tuple(shape)} does not "
                               f"match the engine's {tuple(static)}")
        if static[0] < 0:
            lo, _opt, hi = meta["profile"]
            if not lo <= shape[0] <= hi:
                return self._error(f"IExecutionContext::setInputShape: Error Code 3: batch {shape[0]} outside "
                                   f"the profile [{lo}, {hi}]")
        self.shapes[name] = tuple(shape)
        return True

    def _input_shape(self):
        meta = self.engine.meta
        return self.shapes.get(meta["input"]["name"], tuple(meta["input"]["shape"]))

    def get_tensor_shape(self, name):
        shape = list(self.engine.get_tensor_shape(name))
        if name == self.engine.names[0]:
            return self._input_shape()
        rows = self._input_shape()[0]  # -1 while a dynamic input shape is unset
        return (rows if shape[0] < 0 else shape[0], *shape[1:])

    def set_tensor_address(self, name, ptr):
        self.calls.append(("set_tensor_address", name, ptr))
        if name not in self.engine.names:
            return self._error(f"IExecutionContext::setTensorAddress: Error Code 3: no tensor {name}")
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute_async_v3", stream_handle))
        meta = self.engine.meta
        missing = [n for n in self.engine.names if n not in self.addresses]
        shape = self._input_shape()
        if missing or any(d < 0 for d in shape):
            return self._error(f"IExecutionContext::enqueueV3: Error Code 3: addresses of {missing} or the input "
                               f"shape {shape} not set")
        addresses = dict(self.addresses)  # what is set now is what this launch uses
        dtype = np.dtype(NP_TYPES[meta["input"]["dtype"]])
        session = self.engine.session

        def run():
            x = np.empty(shape, dtype)
            ctypes.memmove(x.ctypes.data, addresses[meta["input"]["name"]], x.nbytes)
            names = [o.name for o in session.get_outputs()]
            for name, value in zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True):
                value = np.ascontiguousarray(value)
                ctypes.memmove(addresses[name], value.ctypes.data, value.nbytes)
            self.runs += 1

        sys.modules["pycuda.driver"].enqueue(stream_handle, "execute_async_v3", run)
        return True


class FakeTensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, shape, dtype


class FakeNetwork:
    def __init__(self, strongly_typed):
        self.strongly_typed = strongly_typed
        self.onnx_bytes, self.inputs, self.outputs = b"", [], []

    @property
    def num_inputs(self):
        return len(self.inputs)

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


def _shape(v):
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)


class FakeParser:
    def __init__(self, trt, network, logger):
        self.trt, self.network, self.logger, self.errors = trt, network, logger, []

    def parse(self, data):
        trt = self.trt
        model = onnx.load_from_string(bytes(data))
        inferred = onnx.shape_inference.infer_shapes(model)
        g = inferred.graph
        types_ = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
        outputs = {o.name for o in g.output}
        for idx, node in enumerate(g.node):  # onnx-tensorrt ModelImporter: UINT8 only as graph I/O
            for out in node.output:
                if types_.get(out) == TensorProto.UINT8 and out not in outputs and node.op_type != "Constant":
                    desc = ("TensorRT does not support UINT8 types for intermediate tensors. For UINT8 "
                            "quantization, the kIMPORT_UINT8_QUANTIZATION flag must be set. (DLA version >= "
                            "3.16 only)")
                    self.errors.append(ParserError(trt.ErrorCode.UNSUPPORTED_NODE, desc, idx))
                    trt._log(self.logger, trt.ILogger.Severity.ERROR,
                             f"ModelImporter.cpp:949: While parsing node number {idx} [{node.op_type} -> "
                             f"\"{out}\"]: {desc}")
                    return False
        self.network.onnx_bytes = bytes(data)
        weights = {t.name for t in g.initializer}
        self.network.inputs = [FakeTensor(i.name, _shape(i), ONNX_TO_TRT[i.type.tensor_type.elem_type])
                               for i in g.input if i.name not in weights]
        self.network.outputs = [FakeTensor(o.name, _shape(o), ONNX_TO_TRT[o.type.tensor_type.elem_type])
                                for o in g.output]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]

    def clear_errors(self):
        self.errors.clear()


class FakeTimingCache:
    def __init__(self, version, cc, entries):
        self.version, self.cc, self.entries = version, list(cc), set(entries)

    def serialize(self):
        return json.dumps({"timing": self.version, "cc": self.cc, "entries": sorted(self.entries)}).encode()


class FakeConfig:
    def __init__(self, trt):
        self.trt, self.profiles, self.flags, self.pools, self.timing_cache = trt, [], [], {}, None
        trt.configs.append(self)

    def _member(self, enum_cls, value, what):
        assert any(value is getattr(enum_cls, n, None) for n in vars(enum_cls)), f"{what}: {value!r} is no member"

    def set_flag(self, flag):
        self._member(self.trt.BuilderFlag, flag, "set_flag")
        self.flags.append(flag.name)

    def set_memory_pool_limit(self, pool, size):
        self._member(self.trt.MemoryPoolType, pool, "set_memory_pool_limit")
        assert isinstance(size, int) and size >= 0
        self.pools[pool.name] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        data = bytes(data)
        if not data:
            return FakeTimingCache(self.trt.__version__, self.trt.cc, ())
        try:
            raw = json.loads(data)
            return FakeTimingCache(raw["timing"], raw["cc"], raw["entries"])
        except (ValueError, KeyError, TypeError):
            self.trt.logged.append(("ERROR", "ITimingCache: the serialized timing cache is corrupt"))
            return None

    def set_timing_cache(self, cache, ignore_mismatch):
        if (cache.version, tuple(cache.cc)) != (self.trt.__version__, self.trt.cc) and not ignore_mismatch:
            self.trt.logged.append(("ERROR", "IBuilderConfig::setTimingCache: the timing cache was built by "
                                             "another TensorRT or device"))
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return self.timing_cache


class FakeBuilder:
    def __init__(self, trt, logger):
        self.trt, self.logger = trt, logger

    def create_network(self, flags=0):
        flag_enum = self.trt.NetworkDefinitionCreationFlag
        known = 0
        for name in vars(flag_enum):
            if not name.startswith("__"):
                known |= 1 << int(getattr(flag_enum, name))
        assert isinstance(flags, int) and flags & ~known == 0, f"unknown network creation flags {flags:#x}"
        strongly = self.trt.major >= 11 or bool(flags & (1 << int(flag_enum.STRONGLY_TYPED)))
        network = FakeNetwork(strongly)
        self.trt.networks.append(network)
        return network

    def create_builder_config(self):
        return FakeConfig(self.trt)

    def create_optimization_profile(self):
        profile = types.SimpleNamespace(shapes={})

        def set_shape(name, lo, opt, hi):
            profile.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        profile.set_shape = set_shape
        return profile

    def _fail(self, msg):
        self.trt._log(self.logger, self.trt.ILogger.Severity.ERROR, msg)
        return None

    def build_serialized_network(self, network, config):
        trt = self.trt
        if network.strongly_typed and {"FP16", "BF16", "INT8", "FP8", "INT4"} & set(config.flags):
            return self._fail("IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error (precision flags "
                              "cannot be set on a strongly typed network)")
        inp = network.inputs[0]
        shapes = [p.shapes[inp.name] for p in config.profiles if inp.name in p.shapes]
        if inp.shape[0] < 0:
            if not shapes:
                return self._fail("Error Code 4: API Usage Error (Network has dynamic or shape inputs, but no "
                                  "optimization profile has been defined.)")
            lo, opt, hi = shapes[0]
            tail = tuple(inp.shape[1:])
            if not (lo[1:] == opt[1:] == hi[1:] == tail and 1 <= lo[0] <= opt[0] <= hi[0]):
                return self._fail(f"Error Code 4: invalid optimization profile {shapes[0]} for {inp.shape}")
            batches = [lo[0], opt[0], hi[0]]
        else:
            if any(s != tuple(inp.shape) for prof in shapes for s in prof):
                return self._fail(f"Error Code 4: optimization profile {shapes[0]} does not match the fixed "
                                  f"input shape {inp.shape}")
            batches = [inp.shape[0]] * 3
        trt.builds += 1
        trt.profiles.append(tuple((b, *inp.shape[1:]) for b in batches))
        if config.timing_cache is not None:  # one "tactic" measured per network: reused next time
            config.timing_cache.entries.add(str(len(network.onnx_bytes)))
        outputs = [{"name": o.name, "shape": list(o.shape), "dtype": o.dtype} for o in network.outputs]
        return plan_bytes(trt.__version__, trt.cc, {"name": inp.name, "shape": list(inp.shape), "dtype": inp.dtype},
                          outputs, batches, network.onnx_bytes, flags=config.flags, pools=config.pools,
                          strongly_typed=network.strongly_typed)
