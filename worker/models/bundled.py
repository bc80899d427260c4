"""Models that ship with the package, generated with onnx.helper at first use.

Each output is an exact, documented function of the input, so tests (and ``worker demo``) can check
every result to the element and catch batch mix-ups. Inputs are float32 NCHW with a symbolic batch N.

``channel_means``  input ``input`` [N, 3, 64, 64] -> ``means`` [N, 3] float32::

    means[n, c] = mean over h, w of input[n, c, h, w]                       (ReduceMean)

``gray_thumbnail``  input ``input`` [N, 1, 64, 64] -> ``thumbnail`` [N, 64] float32, ``ahash`` [N, 64] uint8::

    thumbnail[n, 8 * i + j] = mean of input[n, 0, 8i:8i+8, 8j:8j+8]          (AveragePool 8x8, stride 8)
    ahash[n, k] = 1 if thumbnail[n, k] > mean(thumbnail[n, :]) else 0      (average hash bits)

  For integer-valued input (the demo pipeline feeds raw 0..255 gray values) both are exact in float32:
  every partial sum is a multiple of 1/64 below 2**24 / 64, and dividing by 64 is exact. So ties
  (thumbnail == mean) compare equal on every backend and give 0.

``resnet50``  input ``input`` [N, 3, 224, 224] -> ``logits`` [N, 1000] float32: the ResNet-50 v1.5 shape
  (conv1 7x7/2 64, maxpool 3x3/2, bottleneck stages [3, 4, 6, 3] of widths 64/128/256/512 x4, stride on
  the 3x3 conv, BatchNorm folded into conv biases, global average pool, Gemm to 1000), with random
  weights (numpy Generator seed 0, He-normal, the last conv of each residual branch scaled by 0.2 so
  activations stay in range without BatchNorm). A load-test model: its logits mean nothing, but its cost
  is real (``resnet50_flops()``) and its output is deterministic. About 100 MB, so never committed.

``resnet50_fp16``  input ``input`` [N, 3, 224, 224] float16 -> ``logits`` [N, 1000] float32: the same
  graph and the same weights as ``resnet50`` (drawn in float32 from the same seed, then rounded to
  float16), every tensor float16 up to a final Cast of the logits to float32 (1000 numbers an image: the
  post-processing and every engine's output buffers stay float32). The fp16 row of the bench: on a GPU
  its ceiling is higher (tensor cores, half the bytes). ResNet-50 with these weights keeps activations
  well inside float16's range; its top-5 agrees with ``resnet50``'s (tests/test_bundled_models.py).

Files are written to ``$WORKER_MODEL_CACHE`` (default ``~/.cache/gpu-worker/models``) as
``<name>-<hash>.onnx``. The hash covers this module's source, so editing a generator writes a new file
rather than reusing a stale one; writes go through a temporary file and ``os.replace`` so that two
processes starting together never read a half-written model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from worker.errors import ConfigError

OPSET = 17
IR_VERSION = 8
RESNET50_RESIDUAL_GAIN = 0.2
_STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))  # (blocks, width, first stride)

_lock = threading.Lock()
_paths: dict[str, Path] = {}


# --- exact references (NumPy) --------------------------------------------------------------------

def channel_means_reference(x: np.ndarray) -> np.ndarray:
    """``means`` of channel_means for a float [N, 3, 64, 64] batch (float64 maths, float32 result)."""
    return x.astype(np.float64).mean(axis=(2, 3)).astype(np.float32)


def gray_thumbnail_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """``thumbnail`` and ``ahash`` of gray_thumbnail for a float [N, 1, 64, 64] batch."""
    n = x.shape[0]
    thumb = x.astype(np.float64).reshape(n, 8, 8, 8, 8).mean(axis=(2, 4)).reshape(n, 64)
    ahash = (thumb > thumb.mean(axis=1, keepdims=True)).astype(np.uint8)
    return {"thumbnail": thumb.astype(np.float32), "ahash": ahash}


# --- generators ----------------------------------------------------------------------------------

def _model(nodes, name, inputs, outputs, inits=()):
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="gpu-kafka-worker",
                             doc_string=f"{name}: bundled model of gpu-kafka-worker; its exact function is "
                                        f"documented in worker/models/bundled.py")


def _channel_means():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])
    y = helper.make_tensor_value_info("means", TensorProto.FLOAT, ["batch", 3])
    node = helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0)
    return _model([node], "channel_means", [x], [y])


def _gray_thumbnail():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 64, 64])
    thumb = helper.make_tensor_value_info("thumbnail", TensorProto.FLOAT, ["batch", 64])
    ahash = helper.make_tensor_value_info("ahash", TensorProto.UINT8, ["batch", 64])
    nodes = [
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["thumbnail"], axis=1),
        helper.make_node("ReduceMean", ["thumbnail"], ["thumb_mean"], axes=[1], keepdims=1),
        helper.make_node("Greater", ["thumbnail", "thumb_mean"], ["above"]),
        helper.make_node("Cast", ["above"], ["ahash"], to=TensorProto.UINT8),
    ]
    return _model(nodes, "gray_thumbnail", [x], [thumb, ahash])


class _ResNetBuilder:
    """Emits ResNet-50 nodes; with ``rng=None`` it only counts multiply-adds (no weights drawn).

    Weights are always drawn in float32 (so both dtypes get the same values) and stored as ``dtype``.
    """

    def __init__(self, rng: np.random.Generator | None, dtype: type = np.float32) -> None:
        self.rng, self.nodes, self.inits, self.macs, self.dtype = rng, [], [], 0, dtype

    def _weight(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(array.astype(self.dtype), name))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int, hw: int,
             relu: bool = True, gain: float = 1.0) -> tuple[str, int]:
        from onnx import helper

        pad = k // 2
        out_hw = (hw + 2 * pad - k) // stride + 1
        self.macs += cout * out_hw * out_hw * cin * k * k
        if self.rng is not None:
            std = gain * np.sqrt(2.0 / (cin * k * k))  # He-normal keeps the second moment through Relu
            w = (self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(std))
            b = self.rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01)
            self.nodes.append(helper.make_node(
                "Conv", [x, self._weight(f"{name}.w", w), self._weight(f"{name}.b", b)], [name],
                kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, name=name))
            if relu:
                self.nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"]))
        return (f"{name}.relu" if relu else name), out_hw

    def bottleneck(self, x: str, name: str, cin: int, width: int, stride: int, hw: int) -> tuple[str, int]:
        from onnx import helper

        y, out_hw = self.conv(x, f"{name}.conv1", cin, width, 1, 1, hw)
        y, out_hw = self.conv(y, f"{name}.conv2", width, width, 3, stride, out_hw)
        y, out_hw = self.conv(y, f"{name}.conv3", width, width * 4, 1, 1, out_hw, relu=False,
                              gain=RESNET50_RESIDUAL_GAIN)
        shortcut = x
        if stride != 1 or cin != width * 4:
            shortcut, _ = self.conv(x, f"{name}.down", cin, width * 4, 1, stride, hw, relu=False)
        if self.rng is not None:
            self.nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.add"]))
            self.nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"]))
        return f"{name}.out", out_hw

    def build(self) -> None:
        from onnx import helper

        x, hw = self.conv("input", "conv1", 3, 64, 7, 2, 224)
        if self.rng is not None:
            self.nodes.append(helper.make_node("MaxPool", [x], ["pool1"], kernel_shape=[3, 3],
                                               strides=[2, 2], pads=[1, 1, 1, 1]))
        x, hw, cin = "pool1", (hw + 2 - 3) // 2 + 1, 64
        for s, (blocks, width, stride) in enumerate(_STAGES, start=1):
            for b in range(blocks):
                x, hw = self.bottleneck(x, f"layer{s}.{b}", cin, width, stride if b == 0 else 1, hw)
                cin = width * 4
        self.macs += cin * 1000
        if self.rng is not None:
            w = self.rng.standard_normal((1000, cin), dtype=np.float32) * np.float32(np.sqrt(1.0 / cin))
            self.nodes += [
                helper.make_node("GlobalAveragePool", [x], ["gap"]),
                helper.make_node("Flatten", ["gap"], ["features"], axis=1),
                helper.make_node("Gemm", ["features", self._weight("fc.w", w),
                                          self._weight("fc.b", np.zeros(1000, np.float32))],
                                 ["logits"], transB=1),
            ]


def _resnet50():
    from onnx import TensorProto, helper

    builder = _ResNetBuilder(np.random.default_rng(0))
    builder.build()
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])
    return _model(builder.nodes, "resnet50", [x], [y], builder.inits)


def _resnet50_fp16():
    from onnx import TensorProto, helper

    builder = _ResNetBuilder(np.random.default_rng(0), np.float16)
    builder.build()
    for node in builder.nodes:  # the Gemm's output becomes the float16 logits, cast to float32 below
        node.output[:] = ["logits_fp16" if o == "logits" else o for o in node.output]
    builder.nodes.append(helper.make_node("Cast", ["logits_fp16"], ["logits"], to=TensorProto.FLOAT))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["batch", 3, 224, 224])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])
    return _model(builder.nodes, "resnet50_fp16", [x], [y], builder.inits)


def resnet50_flops() -> int:
    """Floating-point operations of one resnet50 image: counted multiply-adds x 2 (about 8.2e9).

    The "4.1 GFLOPs" usually quoted for ResNet-50 is this count of multiply-adds, not x 2.
    """
    builder = _ResNetBuilder(None)
    builder.build()
    return 2 * builder.macs


GENERATORS: dict[str, Callable] = {
    "channel_means": _channel_means,
    "gray_thumbnail": _gray_thumbnail,
    "resnet50": _resnet50,
    "resnet50_fp16": _resnet50_fp16,
}


# --- cache ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("WORKER_MODEL_CACHE") or Path.home() / ".cache" / "gpu-worker" / "models")


def _generator_hash(name: str) -> str:
    return hashlib.sha256(Path(__file__).read_bytes() + name.encode()).hexdigest()[:16]


def build(name: str):
    """The ModelProto of a bundled model (in memory, not cached)."""
    try:
        return GENERATORS[name]()
    except KeyError:
        raise ConfigError(f"unknown bundled model {name!r}; available: {', '.join(GENERATORS)}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def bundled_path(name: str) -> Path:
    """Path of the bundled model's .onnx file, generating it on first use."""
    if name not in GENERATORS:
        raise ConfigError(f"unknown bundled model {name!r}; available: {', '.join(GENERATORS)}")
    with _lock:  # one generator run per process even if several threads ask at once
        directory = cache_dir()
        path = directory / f"{name}-{_generator_hash(name)}.onnx"
        if _paths.get(name) == path and path.is_file():
            return path
        if not path.is_file():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                _write_atomic(path, build(name).SerializeToString())
            except OSError as exc:
                raise ConfigError(f"cannot write bundled model {name!r} to {directory}: {exc.strerror}; "
                                  f"set WORKER_MODEL_CACHE to a writable directory") from None
        _paths[name] = path
        return path


def resolve_model_path(spec_path: str) -> Path:
    """A pipeline's ``path`` as a file: ``bundled:<name>`` (generated if missing) or a plain path."""
    if spec_path.startswith("bundled:"):
        return bundled_path(spec_path.removeprefix("bundled:"))
    path = Path(spec_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist; point the pipeline's path at an .onnx, "
                          f".engine or .plan file, or use bundled:<name> "
                          f"(bundled: {', '.join(GENERATORS)})")
    return path
