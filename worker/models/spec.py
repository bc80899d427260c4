"""Model and pipeline specs: what each model expects as input and what to do with its outputs.

A pipeline file (YAML) lists one or more models; every message runs through all of them and its
result holds each model's outputs. Example::

    models:
      - name: resnet50
        version: "2026-11-01"
        path: /models/resnet50.onnx        # .onnx (ONNX Runtime, or TensorRT built from it) or .engine/.plan
        backend: onnxruntime               # or tensorrt
        preprocess:
          width: 224
          height: 224
          resize: letterbox                # or stretch
          color: rgb                       # rgb, bgr or gray
          layout: nchw                     # nchw or nhwc
          dtype: float32                   # float32, float16 or uint8
          scale: 0.00392156862745098       # x * scale, then (x - mean) / std per channel
          mean: [0.485, 0.456, 0.406]
          std: [0.229, 0.224, 0.225]
        outputs:
          - {name: logits, kind: topk, k: 5, labels: /models/imagenet.txt, softmax: true}

``path`` may be ``bundled:<name>`` for the models that ship with the package (worker.models.bundled).
Relative paths are read relative to the pipeline file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

RESIZE_MODES = ("stretch", "letterbox")
COLORS = ("rgb", "bgr", "gray")
LAYOUTS = ("nchw", "nhwc")
DTYPES = ("uint8", "float32", "float16")
BACKENDS = ("onnxruntime", "tensorrt")
OUTPUT_KINDS = ("raw", "topk")


def _check(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what}={value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes the model's input tensor.

    The CPU side (decode stage) does resize and colour order and keeps uint8 HWC; the device side
    (inside the engine) does layout, dtype and normalisation on whole batches.
    """

    width: int
    height: int
    resize: str = "stretch"
    color: str = "rgb"
    layout: str = "nchw"
    dtype: str = "float32"
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    pad_value: int = 0

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ConfigError(f"preprocess size must be positive, got {self.width}x{self.height}")
        _check(self.resize, RESIZE_MODES, "preprocess.resize")
        _check(self.color, COLORS, "preprocess.color")
        _check(self.layout, LAYOUTS, "preprocess.layout")
        _check(self.dtype, DTYPES, "preprocess.dtype")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values and len(values) not in (1, self.channels):
                raise ConfigError(f"preprocess.{name} has {len(values)} values; "
                                  f"expected 1 or {self.channels} for color={self.color}")
        if any(s == 0 for s in self.std):
            raise ConfigError("preprocess.std must not contain 0")
        if self.dtype == "uint8" and (self.scale != 1.0 or self.mean or self.std):
            raise ConfigError("preprocess.dtype=uint8 cannot be combined with scale/mean/std")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def hwc_shape(self) -> tuple[int, int, int]:
        """Shape of one pre-processed image as it travels to the GPU thread (uint8)."""
        return (self.height, self.width, self.channels)

    @property
    def model_input_shape(self) -> tuple[int, int, int]:
        """Shape of one image as the model sees it (without the batch dimension)."""
        h, w, c = self.hwc_shape
        return (c, h, w) if self.layout == "nchw" else (h, w, c)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str = "raw"
    k: int = 5
    labels: tuple[str, ...] = ()
    softmax: bool = False

    def __post_init__(self) -> None:
        _check(self.kind, OUTPUT_KINDS, f"outputs[{self.name}].kind")
        if self.k < 1:
            raise ConfigError(f"outputs[{self.name}].k must be >= 1, got {self.k}")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    preprocess: Preprocess
    version: str = "1"
    backend: str = "onnxruntime"
    input_name: str = ""  # empty: the model's only input
    outputs: tuple[OutputSpec, ...] = ()  # empty: every output, raw
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("every model needs a name")
        _check(self.backend, BACKENDS, f"models[{self.name}].backend")


@dataclass(frozen=True)
class PipelineSpec:
    models: tuple[ModelSpec, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError(f"pipeline {self.source or '(inline)'} lists no models")
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"pipeline {self.source}: duplicate model names {sorted(dup)}")

    @property
    def label(self) -> str:
        return "+".join(f"{m.name}@{m.version}" for m in self.models)


def _read_labels(value: Any, base: Path) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    path = Path(value)
    path = path if path.is_absolute() else base / path
    try:
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as exc:
        raise ConfigError(f"labels file {path}: {exc.strerror}") from None


def model_from_dict(raw: dict[str, Any], base: Path) -> ModelSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"each entry under models must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    name = str(raw.pop("name", ""))
    try:
        pre_raw = dict(raw.pop("preprocess"))
    except KeyError:
        raise ConfigError(f"model {name!r} has no preprocess section") from None
    for key in ("mean", "std"):
        if key in pre_raw:
            value = pre_raw[key]
            pre_raw[key] = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
    try:
        pre = Preprocess(**pre_raw)
        outputs = tuple(
            OutputSpec(**{**o, "labels": _read_labels(o.get("labels"), base)}) for o in raw.pop("outputs", []) or []
        )
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: {exc}") from None
    path = str(raw.pop("path", ""))
    if not path:
        raise ConfigError(f"model {name!r} has no path")
    if not path.startswith("bundled:") and not Path(path).is_absolute():
        path = str(base / path)
    known = {"version", "backend", "input_name"}
    extra = {k: raw.pop(k) for k in list(raw) if k not in known}
    return ModelSpec(name=name, path=path, preprocess=pre, outputs=outputs,
                     version=str(raw.get("version", "1")), backend=str(raw.get("backend", "onnxruntime")),
                     input_name=str(raw.get("input_name", "")), extra=extra)


def load_pipeline(path: str | Path) -> PipelineSpec:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"pipeline file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"pipeline file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError(f"pipeline file {path} must be a mapping with a 'models' list")
    models = tuple(model_from_dict(m, path.parent) for m in data["models"])
    return PipelineSpec(models=models, source=str(path))
