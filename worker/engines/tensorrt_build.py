"""Building a TensorRT engine from an ONNX model, and the caches that spare the next start the build.

The model is wrapped with ``with_device_preprocessing`` (the engine takes uint8 NHWC), built with one
optimisation profile on the batch dimension, and cached under ``engine_cache_dir`` keyed by the wrapped
ONNX's hash, TensorRT version, GPU name, compute capability, profile and build flags. TensorRT's timing
cache is kept beside the engines, keyed by TensorRT version and GPU only (worker.engines.tensorrt says
more). ``tensorrt`` itself is never imported here: the engine passes its module in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker import log
from worker.errors import ConfigError, EngineLoadError
from worker.models.spec import ModelSpec

if TYPE_CHECKING:
    from worker.settings import Settings

_log = log.get("worker.engines.tensorrt")  # the engine's logger name, as before the split


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def engine_cache_key(onnx_bytes: bytes, trt_version: str, gpu_name: str, compute_capability: tuple[int, int],
                     profile: tuple[int, int, int], flags: tuple[str, ...] = ()) -> str:
    """What a cached plan depends on: the (wrapped) ONNX, TensorRT, the GPU model and the profile."""
    h = hashlib.sha256(onnx_bytes)
    for part in (trt_version, gpu_name, "%d.%d" % compute_capability, "x".join(map(str, profile)), *flags):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:32]


def default_cache_dir(settings: Settings) -> Path:
    return Path(settings.engine_cache_dir or Path.home() / ".cache" / "gpu-worker" / "engines").expanduser()


def timing_cache_key(trt_version: str, gpu_name: str, compute_capability: tuple[int, int]) -> str:
    """What a timing cache depends on: TensorRT and the GPU model (not the network: it is shared)."""
    return engine_cache_key(b"timing-cache", trt_version, gpu_name, compute_capability, (0, 0, 0))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".writing-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a concurrent start never reads half a file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _to_float16(model: Any, name: str) -> Any:
    """The ONNX model in float16 with float32 inputs and outputs (TensorRT 11's way to fp16)."""
    try:
        from onnxconverter_common import float16  # type: ignore[import-not-found, import-untyped]
    except ImportError:
        raise ConfigError(
            f"model {name}: fp16: true on TensorRT 11 means a float16 ONNX model (TensorRT 11 builds strongly "
            f"typed networks only; BuilderFlag.FP16 is gone). Install the converter (pip install "
            f"'gpu-kafka-worker[tensorrt-fp16]'), or convert the model yourself (ModelOpt AutoCast, "
            f"onnxconverter-common) and drop fp16: true") from None
    # The converter names the Casts it adds after the nodes they feed: unnamed nodes would give two
    # Casts the same name, which ONNX Runtime and TensorRT refuse.
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(c for c in (f"{node.op_type}_{i}", *(f"{node.op_type}_{i}_{k}" for k in range(1, 999)))
                             if c not in taken)
            taken.add(node.name)
    try:
        return float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # noqa: BLE001 - the converter raises what its passes raise
        raise ConfigError(f"model {name}: converting the ONNX model to float16 for TensorRT 11 failed: {exc}; "
                          f"convert it yourself (ModelOpt AutoCast) and drop fp16: true") from exc


class EngineBuilder:
    """Builds (or finds in the cache) the plan of one ONNX model; TensorRT's errors reach ``errors`` through
    the engine's logger. ``source`` says which: "cache" or "build"."""

    def __init__(self, spec: ModelSpec, settings: Settings, trt: Any, logger: Any, errors: list[str]) -> None:
        self.spec = spec
        self.settings = settings
        self.trt = trt
        self.logger = logger
        self.errors = errors
        self.source = ""
        self.cache_path: Path | None = None
        self.timing_path: Path | None = None

    def build_or_load(self, onnx_path: Path, rt: Any, max_batch: int) -> bytes:
        """The plan of the ONNX model wrapped with device pre-processing: from the cache, else built (and cached)."""
        import onnx

        from worker.models.graph import with_device_preprocessing

        trt = self.trt
        try:
            model = onnx.load(str(onnx_path))
        except Exception as exc:  # onnx raises DecodeError, OSError, ... depending on what is wrong
            raise EngineLoadError(f"model {self.spec.name}: cannot read ONNX file {onnx_path}: {exc}") from exc
        fp16 = bool(self.spec.extra.get("fp16"))
        if fp16 and trt_major(trt) >= 11:
            model = _to_float16(model, self.spec.name)
        wrapped = with_device_preprocessing(model, self.spec.preprocess, self.spec.input_name)
        onnx_bytes = wrapped.SerializeToString()
        first = wrapped.graph.input[0].type.tensor_type.shape.dim[0]
        if first.HasField("dim_value") and first.dim_value > 0:  # a fixed batch: no profile to choose
            fixed = first.dim_value
            if max_batch > fixed:
                raise ConfigError(f"model {self.spec.name}: the ONNX model takes batches of exactly {fixed}; "
                                  f"set max_batch_size <= {fixed}")
            profile = (fixed, fixed, fixed)
        else:
            opt = int(self.spec.extra.get("opt_batch", max_batch))
            profile = (1, min(max(opt, 1), max_batch), max_batch)
        workspace = self.settings.trt_workspace_bytes
        if workspace < 0:
            raise ConfigError(f"trt_workspace_bytes={workspace}: give a size in bytes, or 0 for TensorRT's default")
        flags = (("fp16",) if fp16 else ()) + ((f"workspace={workspace}",) if workspace else ())
        gpu = getattr(rt, "gpu_name", rt.device_name)
        cc = tuple(rt.compute_capability)
        key = engine_cache_key(onnx_bytes, str(trt.__version__), gpu, cc, profile, flags)
        cache_dir = default_cache_dir(self.settings)
        self.cache_path = cache_dir / f"{self.spec.name}-{key}.engine"
        self.timing_path = cache_dir / f"timing-{timing_cache_key(str(trt.__version__), gpu, cc)}.cache"
        if self.cache_path.is_file():
            self.source = "cache"
            _log.info("tensorrt_engine_cache_hit", model=self.spec.name, path=str(self.cache_path))
            return self.cache_path.read_bytes()
        self.source = "build"
        started = time.monotonic()
        plan = self._build(onnx_bytes, profile, fp16, workspace)
        seconds = time.monotonic() - started
        _write_atomic(self.cache_path, plan)
        _log.info("tensorrt_engine_built", model=self.spec.name, seconds=round(seconds, 1), profile=profile,
                  tensorrt=str(trt.__version__), gpu=gpu, path=str(self.cache_path), bytes=len(plan))
        return plan

    def _parse_errors(self, parser: Any) -> str:
        said = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node()
            where = f"node {node}: " if node >= 0 else ""
            said.append(f"{where}{err.desc()} ({getattr(err.code(), 'name', err.code())})")
        return "; ".join(said) or "; ".join(self.errors[-3:]) or "no message"

    def _build(self, onnx_bytes: bytes, profile: tuple[int, int, int], fp16: bool, workspace: int) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        # Flags 0: explicit batch, the only mode since TensorRT 10; weakly typed on 10 (so that
        # BuilderFlag.FP16 may pick float16 kernels), strongly typed on 11 (its only mode).
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            raise EngineLoadError(f"model {self.spec.name}: TensorRT's ONNX parser refused the model (wrapped with "
                                  f"device pre-processing): {self._parse_errors(parser)}")
        config = builder.create_builder_config()
        if fp16 and trt_major(trt) < 11:
            config.set_flag(trt.BuilderFlag.FP16)
        if workspace:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        self._use_timing_cache(config)
        inp = network.get_input(0)
        shape = dims(inp.shape)
        if shape[0] < 0:  # a dynamic batch needs a profile; a fixed one must not be given another
            tail = shape[1:]
            opt_profile = builder.create_optimization_profile()
            opt_profile.set_shape(inp.name, (profile[0], *tail), (profile[1], *tail), (profile[2], *tail))
            config.add_optimization_profile(opt_profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            said = "; ".join(self.errors[-3:]) or "no message"
            raise EngineLoadError(f"model {self.spec.name}: TensorRT could not build an engine: {said}")
        self._save_timing_cache(config)
        return bytes(plan)

    def _use_timing_cache(self, config: Any) -> None:
        """Start the build from the timing cache on disk; a missing or unusable one starts empty."""
        path, data = self.timing_path, b""
        if path is not None and path.is_file():
            try:
                data = path.read_bytes()
            except OSError as exc:
                _log.warning("tensorrt_timing_cache_unreadable", path=str(path), error=exc.strerror)
        cache = config.create_timing_cache(data) if data else None
        if cache is None or not config.set_timing_cache(cache, False):
            if data:
                _log.warning("tensorrt_timing_cache_ignored", path=str(path),
                             reason="; ".join(self.errors[-2:]) or "TensorRT refused it")
            config.set_timing_cache(config.create_timing_cache(b""), False)
        elif data:
            _log.info("tensorrt_timing_cache_loaded", path=str(path), bytes=len(data))

    def _save_timing_cache(self, config: Any) -> None:
        if self.timing_path is None:
            return
        cache = config.get_timing_cache()
        if cache is None:
            return
        try:
            _write_atomic(self.timing_path, bytes(cache.serialize()))
        except OSError as exc:  # only speed is lost: the engine itself is built
            _log.warning("tensorrt_timing_cache_not_saved", path=str(self.timing_path), error=exc.strerror)
