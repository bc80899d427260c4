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
