"""TensorRT engine (TensorRT 10/11, name-based IO API), on the GPU thread's stream and context.

``tensorrt`` is imported lazily, inside ``activate``; where only the lean runtime is installed,
``tensorrt_lean`` deserializes prebuilt plans (it has no builder).

Where the engine comes from:

- ``.engine`` / ``.plan`` / ``.trt``: a prebuilt plan, deserialized as is. Plans only load on the
  TensorRT version and GPU model they were built for; ``deserialize_cuda_engine`` then returns None and
  start-up stops with the versions and GPU named. A plan whose input is uint8 N x H x W x C takes the
  batch directly; one that takes the normalised float tensor (N x C x H x W or N x H x W x C) gets
  ``preprocessing_only_model`` run in front of it by ONNX Runtime's CUDA provider, on the same stream,
  IO-bound from our uint8 buffer straight into the TensorRT input buffer.
- ``.onnx`` with the full ``tensorrt`` package (built by worker.engines.tensorrt_build): the model is
  wrapped with ``with_device_preprocessing``
  (so the engine itself takes uint8 NHWC and normalises on the device), built with one optimisation
  profile (1, opt, max_batch_size) on the batch dimension, and cached under ``engine_cache_dir`` keyed
  by the wrapped ONNX's hash, TensorRT version, GPU name, compute capability and the profile. The next
  start loads the cached plan instead of building (minutes for large models). A builder workspace
  limit (``trt_workspace_bytes``) is part of that key. TensorRT's timing cache (the measured speed of
  each kernel tactic) is kept beside the engines, keyed by TensorRT version, GPU name and compute
  capability only: it is valid for every model on that GPU, so a second model or a rebuild skips the
  measurements it shares with earlier builds.

Precision: TensorRT 10 builds a weakly typed network and ``fp16: true`` (a pipeline key) sets
``BuilderFlag.FP16``. TensorRT 11 only builds strongly typed networks: the ONNX model's own types are
the precision, and ``BuilderFlag.FP16`` is gone. There ``fp16: true`` converts the ONNX model to
float16 first (onnxconverter-common, the ``tensorrt-fp16`` extra; inputs and outputs stay float32),
and refuses with a ConfigError where that package is missing.

Per batch: copy the uint8 batch into our input buffer (async, our stream), ``set_input_shape`` when
the batch size changed, ``execute_async_v3(stream)``, copy outputs into pinned host arrays (async). The
GPU thread synchronises once. Addresses are set once at activation: our buffers never move.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker import log
from worker.engines.base import HOST_SETS, Collector, DeviceRuntime, Outputs
from worker.engines.tensorrt_build import (
    EngineBuilder,
    default_cache_dir,
    dims,
    engine_cache_key,
    timing_cache_key,
    trt_major,
)
from worker.errors import ConfigError, DeviceError, EngineLoadError
from worker.models.spec import ModelSpec

if TYPE_CHECKING:
    from worker.settings import Settings

# the cache keys and the builder (worker.engines.tensorrt_build) stay importable from here
__all__ = ["PLAN_SUFFIXES", "EngineBuilder", "TensorRTEngine", "default_cache_dir", "dims", "engine_cache_key",
           "import_tensorrt", "timing_cache_key", "trt_dtype", "trt_major"]

_log = log.get(__name__)
PLAN_SUFFIXES = (".engine", ".plan", ".trt")
# TensorRT DataType member names -> NumPy
_TRT_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
              "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


def import_tensorrt() -> tuple[Any, bool]:
    """(module, has_builder): ``tensorrt``, else the lean runtime ``tensorrt_lean`` (no builder)."""
    try:
        import tensorrt as trt

        return trt, hasattr(trt, "Builder")
    except ImportError:
        pass
    try:
        import tensorrt_lean as trt  # type: ignore[import-not-found]

        return trt, False
    except ImportError:
        raise ConfigError("backend=tensorrt, but neither tensorrt nor tensorrt_lean is importable; install "
                          "the tensorrt extra (pip install 'gpu-kafka-worker[tensorrt]') or use "
                          "backend=onnxruntime") from None


def trt_dtype(dtype: Any, what: str) -> np.dtype:
    name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    if name not in _TRT_TYPES:
        raise ConfigError(f"{what} has TensorRT type {name}, which this worker cannot feed or return")
    return np.dtype(_TRT_TYPES[name])


def _make_logger(trt: Any) -> tuple[Any, list[str]]:
    """A TensorRT logger, and the list of the errors it logs (start-up errors quote them).

    The list lives outside the logger: TensorRT's own ``trt.Logger`` (a pybind11 class) takes no new
    attributes, so only a Python subclass of ``trt.ILogger`` could carry it.
    """
    errors: list[str] = []
    try:
        class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    errors.append(msg)
                    _log.error("tensorrt", message=msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    _log.warning("tensorrt", message=msg)

        return _Logger(), errors
    except Exception:  # noqa: BLE001 - a build whose ILogger cannot be subclassed still has Logger
        return trt.Logger(trt.Logger.WARNING), errors  # it prints; errors stays empty


class TensorRTEngine:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.output_names: list[str] = []
        self.input_name = ""
        self.source = ""  # "plan", "cache" or "build"
        self.cache_path: Path | None = None
        self._rt: Any = None
        self._trt: Any = None
        self._logger: Any = None
        self._errors: list[str] = []  # what TensorRT's logger reported as errors
        self.timing_cache_path: Path | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._pre: Any = None  # ONNX Runtime pre-processing in front of a float-input plan
        self._buffers: list[Any] = []
        self._u8: Any = None  # our uint8 batch buffer (the engine input itself, or the pre-processing input)
        self._outputs: list[tuple[str, Any, list[np.ndarray]]] = []  # name, device buffer, host sets
        self._turns = itertools.cycle(range(HOST_SETS))  # which host set a batch's outputs are copied into
        self._in_tail: tuple[int, ...] = ()
        self._min_rows = 1
        self._fixed = 0
        self._rows = 0  # batch size the context's input shape is set to
        self._max_batch = 0

    # --- life cycle ------------------------------------------------------------------------
    def activate(self, runtime: DeviceRuntime, max_batch_size: int) -> None:
        if runtime.kind != "cuda":
            raise ConfigError(f"model {self.spec.name}: backend=tensorrt needs a CUDA device; this runtime is "
                              f"{runtime.kind}. Use backend=onnxruntime on machines without a GPU")
        from worker.models.bundled import resolve_model_path

        self._rt, self._max_batch = runtime, max_batch_size
        trt, has_builder = import_tensorrt()
        self._logger, self._errors = _make_logger(trt)
        self._trt = trt
        major = trt_major(trt)
        if major < 10:
            raise ConfigError(f"TensorRT {trt.__version__} is too old: this worker uses the name-based API of "
                              f"TensorRT 10 or newer")
        path = resolve_model_path(self.spec.path)
        try:
            if path.suffix in PLAN_SUFFIXES:
                plan, self.source = path.read_bytes(), "plan"
            elif path.suffix == ".onnx":
                if not has_builder:
                    raise ConfigError(f"model {self.spec.name}: {path} is ONNX, but only the lean TensorRT runtime "
                                      f"is installed (no builder); install the full tensorrt package or give a "
                                      f"prebuilt .engine/.plan file")
                plan = self._build_or_load(path, runtime, max_batch_size)
            else:
                raise ConfigError(f"model {self.spec.name}: backend=tensorrt takes .onnx or "
                                  f"{'/'.join(PLAN_SUFFIXES)} files, not {path.name}")
        except OSError as exc:
            raise EngineLoadError(f"model {self.spec.name}: cannot read {path}: {exc.strerror}") from None
        try:
            self._load(plan, path, runtime, max_batch_size)
        except BaseException:
            self.deactivate()
            raise
        _log.info("engine_active", model=self.spec.name, backend="tensorrt", tensorrt=trt.__version__,
                  source=self.source, input=self.input_name, outputs=self.output_names,
                  device_preprocessing="onnxruntime" if self._pre is not None else "in engine",
                  max_batch_size=max_batch_size)

    def deactivate(self) -> None:
        """Reverse order: execution context, engine, TensorRT runtime, pre-processing session, buffers."""
        self._context = None
        self._engine = None
        self._runtime = None
        if self._pre is not None:
            self._pre.close()
            self._pre = None
        for buf in self._buffers:
            with contextlib.suppress(DeviceError):
                self._rt.free(buf)
        self._buffers.clear()
        self._outputs.clear()

    # --- loading ---------------------------------------------------------------------------
    def _load(self, plan: bytes, path: Path, rt: Any, max_batch: int) -> None:
        trt = self._trt
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            said = "; ".join(self._errors[-3:]) or "no message"
            raise EngineLoadError(
                f"model {self.spec.name}: TensorRT {trt.__version__} cannot load {path.name} on {rt.device_name} "
                f"(compute capability {'%d.%d' % tuple(rt.compute_capability)}). A plan only loads on the "
                f"TensorRT version and GPU model it was built with: rebuild it here (trtexec --onnx=model.onnx "
                f"--saveEngine={path.name}) or point the pipeline at the .onnx file so the worker builds and "
                f"caches one. TensorRT said: {said}")
        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            (inputs if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        if len(inputs) != 1:
            raise ConfigError(f"model {self.spec.name}: the engine has inputs {inputs}; this worker feeds "
                              f"engines with exactly one image input")
        self.input_name = name_in = inputs[0]
        wanted = [o.name for o in self.spec.outputs]
        missing = [o for o in wanted if o not in outputs]
        if missing:
            raise ConfigError(f"model {self.spec.name}: outputs {missing} are not in the engine (it has {outputs})")
        self.output_names = wanted or outputs
        in_shape = dims(self._engine.get_tensor_shape(name_in))
        in_dtype = trt_dtype(self._engine.get_tensor_dtype(name_in), f"engine input {name_in}")
        rows = self._batch_rows(name_in, in_shape, max_batch)
        self._in_tail = in_shape[1:]
        pre = self.spec.preprocess
        in_buf = rt.device_buffer(rows * math.prod(self._in_tail) * in_dtype.itemsize,
                                  f"{self.spec.name} engine input {name_in}")
        self._buffers.append(in_buf)
        if in_dtype == np.uint8 and self._in_tail == pre.hwc_shape:
            self._u8 = in_buf
        elif in_dtype == np.dtype(pre.dtype) and self._in_tail == pre.model_input_shape:
            self._u8 = rt.device_buffer(rows * math.prod(pre.hwc_shape), f"{self.spec.name} uint8 batch")
            self._buffers.append(self._u8)
            from worker.engines.onnxruntime import DevicePreprocessor

            self._pre = DevicePreprocessor(self.spec, self.settings, rt, self._u8.ptr, in_buf.ptr)
        else:
            raise ConfigError(
                f"model {self.spec.name}: engine input {name_in} is {in_dtype} {list(in_shape)}; the pipeline "
                f"gives uint8 [N, {', '.join(map(str, pre.hwc_shape))}] or, normalised, {pre.dtype} "
                f"[N, {', '.join(map(str, pre.model_input_shape))}]. Fix preprocess (size, color, layout, dtype)")
        ctx = self._engine.create_execution_context()
        if ctx is None:
            said = "; ".join(self._errors[-3:]) or "no message"
            raise DeviceError(f"model {self.spec.name}: TensorRT could not create an execution context on "
                              f"{rt.device_name} (usually out of device memory): {said}",
                              cuda_error="CUDA_ERROR_OUT_OF_MEMORY" if "memory" in said.lower() else "")
        self._context = ctx
        self._set_rows(rows)  # largest shape: output shapes are then the largest they get
        if not self._context.set_tensor_address(name_in, in_buf.ptr):
            raise EngineLoadError(f"model {self.spec.name}: TensorRT refused the input address")
        for name in outputs:  # every output needs an address, also those we do not return
            shape = dims(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ConfigError(f"model {self.spec.name}: output {name} has data-dependent shape {list(shape)}; "
                                  f"this worker needs output shapes fixed by the batch size")
            dtype = trt_dtype(self._engine.get_tensor_dtype(name), f"engine output {name}")
            dev = rt.device_buffer(max(math.prod(shape), 1) * dtype.itemsize, f"{self.spec.name} output {name}")
            self._buffers.append(dev)
            if not self._context.set_tensor_address(name, dev.ptr):
                raise EngineLoadError(f"model {self.spec.name}: TensorRT refused the address of output {name}")
            if name in self.output_names:
                self._outputs.append((name, dev, [rt.host_buffer(shape, dtype) for _ in range(HOST_SETS)]))

    def _batch_rows(self, name: str, shape: tuple[int, ...], max_batch: int) -> int:
        """Rows to allocate; records the profile's minimum batch (smaller batches are padded)."""
        if shape[0] >= 0:
            if max_batch > shape[0]:
                raise ConfigError(f"model {self.spec.name}: the engine takes batches of exactly {shape[0]}; "
                                  f"set max_batch_size <= {shape[0]}")
            self._fixed = shape[0]
            return shape[0]
        lo, _opt, hi = (dims(s) for s in self._engine.get_tensor_profile_shape(name, 0))
        if hi[0] < max_batch:
            raise ConfigError(f"model {self.spec.name}: the engine's optimisation profile allows batches up to "
                              f"{hi[0]}, but max_batch_size={max_batch}; rebuild the engine with a larger "
                              f"profile or lower max_batch_size")
        self._min_rows = max(lo[0], 1)
        return max(max_batch, self._min_rows)

    def _set_rows(self, rows: int) -> None:
        if rows != self._rows and not self._fixed:
            if not self._context.set_input_shape(self.input_name, (rows, *self._in_tail)):
                said = "; ".join(self._errors[-2:])
                raise RuntimeError(f"model {self.spec.name}: TensorRT refused input shape "
                                   f"{[rows, *self._in_tail]}: {said}")
        self._rows = rows

    def _build_or_load(self, onnx_path: Path, rt: Any, max_batch: int) -> bytes:
        builder = EngineBuilder(self.spec, self.settings, self._trt, self._logger, self._errors)
        try:
            return builder.build_or_load(onnx_path, rt, max_batch)
        finally:  # also after a failed build: where it was going
            self.source, self.cache_path = builder.source, builder.cache_path
            self.timing_cache_path = builder.timing_path

    # --- inference -------------------------------------------------------------------------
    def enqueue(self, batch: np.ndarray) -> Collector:
        n = batch.shape[0]
        if batch.dtype != np.uint8 or tuple(batch.shape[1:]) != self.spec.preprocess.hwc_shape:
            raise ValueError(f"model {self.spec.name}: batch must be uint8 N x "
                             f"{'x'.join(map(str, self.spec.preprocess.hwc_shape))}, got {batch.dtype} {batch.shape}")
        self._check_rows(n)  # before the copy: more rows would write past the device buffer
        self._rt.to_device(self._u8.ptr, batch, f"batch of {self.spec.name}")
        return self.enqueue_resident(n)

    def _check_rows(self, n: int) -> None:
        if not 1 <= n <= self._max_batch:
            raise ValueError(f"model {self.spec.name}: batch of {n} outside 1..{self._max_batch}")

    @property
    def device_input(self) -> int:
        """Device address of the uint8 N x H x W x C rows the engine (or its pre-processing) reads."""
        return self._u8.ptr

    def enqueue_resident(self, n: int) -> Collector:
        """Run on the first ``n`` rows already at ``device_input`` (GPU decoding wrote them there)."""
        from worker.engines.cuda import device_error

        self._check_rows(n)
        rows = self._fixed or max(n, self._min_rows)
        rt = self._rt
        if self._pre is not None:
            self._pre.run(rows)
        self._set_rows(rows)
        if not self._context.execute_async_v3(rt.stream_handle):
            said = "; ".join(self._errors[-2:]) or "no message"
            exc = RuntimeError(f"execute_async_v3 returned false: {said}")
            from worker.engines.cuda import cuda_error_name

            if cuda_error_name(said):
                raise device_error(exc, f"running model {self.spec.name}", rt.device_name)
            raise exc
        turn = next(self._turns)
        views: Outputs = {}
        for name, dev, hosts in self._outputs:
            host = hosts[turn]
            rt.to_host(host[:rows], dev.ptr, f"output {name} of {self.spec.name}")
            views[name] = host[:n]
        return lambda: views
