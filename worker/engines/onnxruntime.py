"""ONNX Runtime engine: the model with its pre-processing folded into the graph, on CPU or CUDA.

The model file is wrapped with ``with_device_preprocessing`` so that the session's one input is the
uint8 N x H x W x C batch the GPU thread assembles; layout, dtype and normalisation run inside the
graph (on the device, on a CUDA runtime). Outputs are named as in the original model.

On a ``CpuRuntime`` the session uses the CPU provider and ``enqueue`` runs synchronously. On a
``CudaRuntime`` see ``_CudaBinding``: IO binding to device buffers we own, ORT running on our stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from worker import log
from worker.engines.base import Collector, DeviceRuntime, Outputs
from worker.errors import ConfigError, EngineLoadError
from worker.models.spec import ModelSpec

_log = log.get(__name__)


def load_wrapped_model(spec: ModelSpec) -> tuple[Any, list[str]]:
    """The spec's ONNX model with device pre-processing, and the original model's output names."""
    import onnx

    from worker.models.bundled import resolve_model_path
    from worker.models.graph import with_device_preprocessing

    path = resolve_model_path(spec.path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ... depending on what is wrong
        raise EngineLoadError(f"model {spec.name}: cannot read ONNX file {path}: {exc}") from exc
    names = [o.name for o in model.graph.output]
    wanted = [o.name for o in spec.outputs]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ConfigError(f"model {spec.name}: outputs {missing} are not in {path} (it has {names})")
    wrapped = with_device_preprocessing(model, spec.preprocess, spec.input_name)
    return wrapped, (wanted or names)


def session_options(log_severity: int = 3) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = log_severity
    return opts


class OnnxRuntimeEngine:
    """One ONNX model on the runtime's device (CPU provider, or CUDA provider on our stream)."""

    def __init__(self, spec: ModelSpec, settings: Any) -> None:
        self.spec = spec
        self.settings = settings
        self.output_names: list[str] = []
        self.input_name = ""
        self._session: Any = None
        self._cuda: Any = None  # _CudaBinding on a CUDA runtime
        self._max_batch = 0

    # --- life cycle ------------------------------------------------------------------------
    def activate(self, runtime: DeviceRuntime, max_batch_size: int) -> None:
        import onnxruntime as ort

        model, self.output_names = load_wrapped_model(self.spec)
        self._max_batch = max_batch_size
        if runtime.kind == "cuda":
            self._cuda = _CudaBinding(self.spec, self.settings, runtime, model, self.output_names,
                                     max_batch_size)
            self._session = self._cuda.session
            self.input_name = self._cuda.input_name
        else:
            try:
                self._session = ort.InferenceSession(model.SerializeToString(), session_options(),
                                                     providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise EngineLoadError(f"model {self.spec.name}: ONNX Runtime cannot load it: {exc}") from exc
            self.input_name = self._session.get_inputs()[0].name
        _log.info("engine_active", model=self.spec.name, backend="onnxruntime", device=runtime.kind,
                  providers=self._session.get_providers(), max_batch_size=max_batch_size,
                  outputs=self.output_names)

    def enqueue(self, batch: np.ndarray) -> Collector:
        self._check_batch(batch)
        if self._cuda is not None:
            return self._cuda.enqueue(batch)
        values = self._session.run(self.output_names, {self.input_name: batch})
        outputs: Outputs = dict(zip(self.output_names, values, strict=True))
        return lambda: outputs

    def deactivate(self) -> None:
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
        self._session = None

    # --- helpers ---------------------------------------------------------------------------
    def _check_batch(self, batch: np.ndarray) -> None:
        expect = self.spec.preprocess.hwc_shape
        if batch.dtype != np.uint8 or batch.ndim != 4 or tuple(batch.shape[1:]) != expect:
            raise ValueError(f"model {self.spec.name}: batch must be uint8 N x {'x'.join(map(str, expect))}, "
                             f"got {batch.dtype} {tuple(batch.shape)}")
        if not 1 <= batch.shape[0] <= self._max_batch:
            raise ValueError(f"model {self.spec.name}: batch of {batch.shape[0]} outside 1..{self._max_batch}")
