"""Bundled models equal their NumPy definitions; the cache writes once; the pipelines load and agree."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from worker.errors import ConfigError
from worker.models import bundled, default_pipeline_path, resnet50_fp16_pipeline_path, resnet50_pipeline_path
from worker.models.graph import INPUT_NAME, with_device_preprocessing
from worker.models.postprocess import postprocess
from worker.models.preprocess import normalize, prepare
from worker.models.spec import load_pipeline
from worker.samples import synth_image

RNG = np.random.default_rng(11)


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKER_MODEL_CACHE", str(tmp_path / "models"))
    return tmp_path / "models"


def session(model_or_path) -> ort.InferenceSession:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def test_channel_means_equals_numpy():
    x = RNG.uniform(-100, 300, (5, 3, 64, 64)).astype(np.float32)
    (means,) = session(bundled.bundled_path("channel_means")).run(["means"], {"input": x})
    assert means.shape == (5, 3) and means.dtype == np.float32
    np.testing.assert_allclose(means, bundled.channel_means_reference(x), rtol=1e-5)


def test_gray_thumbnail_is_exact_on_integer_input():
    x = RNG.integers(0, 256, (6, 1, 64, 64)).astype(np.float32)
    x[1] = 42.0  # flat image: every thumbnail value ties with the mean, so no bit is set
    x[2, 0, :32] = 0.0  # half dark, half bright: thumbnail values tie exactly within each half
    x[2, 0, 32:] = 255.0
    thumb, ahash = session(bundled.bundled_path("gray_thumbnail")).run(["thumbnail", "ahash"], {"input": x})
    want = bundled.gray_thumbnail_reference(x)
    assert thumb.dtype == np.float32 and ahash.dtype == np.uint8 and ahash.shape == (6, 64)
    assert np.array_equal(thumb, want["thumbnail"])
    assert np.array_equal(ahash, want["ahash"])
    assert ahash[1].sum() == 0 and ahash[2].tolist() == [0] * 32 + [1] * 32


@pytest.mark.parametrize("name", ["channel_means", "gray_thumbnail"])
def test_generation_is_deterministic_and_valid(name):
    model = bundled.build(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.SerializeToString() == bundled.build(name).SerializeToString()


def test_cache_writes_once_atomically(model_cache):
    path = bundled.bundled_path("channel_means")
    assert path.parent == model_cache and path.name.startswith("channel_means-") and path.suffix == ".onnx"
    stamp = path.stat().st_mtime_ns
    bundled._paths.clear()  # a new process: finds the file, does not rewrite it
    assert bundled.bundled_path("channel_means") == path and path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in model_cache.iterdir()) == [path.name]  # no temporary files left
    assert onnx.load(str(path)).SerializeToString() == bundled.build("channel_means").SerializeToString()


def test_cache_dir_unwritable_says_what_to_do(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("WORKER_MODEL_CACHE", str(blocker / "models"))
    with pytest.raises(ConfigError, match="set WORKER_MODEL_CACHE to a writable directory"):
        bundled.bundled_path("gray_thumbnail")


def test_resolve_model_path(tmp_path):
    assert bundled.resolve_model_path("bundled:gray_thumbnail") == bundled.bundled_path("gray_thumbnail")
    with pytest.raises(ConfigError, match="unknown bundled model 'nope'; available: channel_means, gray_thumbnail"):
        bundled.resolve_model_path("bundled:nope")
    with pytest.raises(ConfigError, match="does not exist.*bundled: channel_means"):
        bundled.resolve_model_path(str(tmp_path / "missing.onnx"))
    real = tmp_path / "m.onnx"
    real.write_bytes(b"x")
    assert bundled.resolve_model_path(str(real)) == real


def test_demo_pipeline_end_to_end_matches_the_definitions():
    """decode output -> prepare -> device pre-processing + model -> postprocess == NumPy definitions."""
    pipeline = load_pipeline(default_pipeline_path())
    assert [(m.name, m.version) for m in pipeline.models] == [("channel_means", "1"), ("gray_thumbnail", "1")]
    images = [RNG.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 64, 3), (120, 90, 3), (50, 70)]]
    for spec in pipeline.models:
        pre = spec.preprocess
        model = onnx.load(str(bundled.resolve_model_path(spec.path)))
        run = session(with_device_preprocessing(model, pre, spec.input_name))
        batch = np.stack([prepare(img, pre) for img in images])
        outputs = run.run(None, {INPUT_NAME: batch})
        names = [o.name for o in run.get_outputs()]
        x = normalize(batch, pre)
        want = (bundled.channel_means_reference(x) if spec.name == "channel_means"
                else bundled.gray_thumbnail_reference(x))
        for i in range(len(images)):
            result = postprocess({n: o[i] for n, o in zip(names, outputs)}, spec)
            if spec.name == "channel_means":
                np.testing.assert_allclose(result["means"]["data"], want[i], rtol=1e-5)
                if i == 0:  # 64x64 already, so not resampled: means[0] is the red channel (BGR index 2)
                    assert result["means"]["data"] == pytest.approx(
                        images[0].reshape(-1, 3).mean(axis=0)[::-1].tolist(), rel=1e-5)
            else:
                assert result["thumbnail"]["data"] == want["thumbnail"][i].tolist()
                assert result["ahash"] == {"shape": [64], "dtype": "uint8", "data": want["ahash"][i].tolist()}
    # the gray model sees OpenCV's gray conversion of the BGR image
    gray = prepare(images[1], pipeline.models[1].preprocess)[..., 0]
    assert np.array_equal(gray, cv2.resize(cv2.cvtColor(images[1], cv2.COLOR_BGR2GRAY), (64, 64),
                                           interpolation=cv2.INTER_AREA))


def test_resnet50_flops_and_pipeline_file():
    assert 8.0e9 < bundled.resnet50_flops() < 8.4e9  # 2 x ~4.1e9 multiply-adds
    (spec,) = load_pipeline(resnet50_pipeline_path()).models
    assert spec.path == "bundled:resnet50" and spec.outputs[0].kind == "topk" and spec.outputs[0].softmax
    assert spec.preprocess.model_input_shape == (3, 224, 224)


def test_resnet50_builds_and_runs():
    path = bundled.bundled_path("resnet50")
    model = onnx.load(str(path))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 25.4e6 < params < 25.7e6
    x = RNG.standard_normal((2, 3, 224, 224), dtype=np.float32)
    (logits,) = session(path).run(["logits"], {"input": x})
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    assert not np.allclose(logits[0], logits[1])  # the images differ, so must their logits


def test_resnet50_fp16_is_float16_and_agrees_with_resnet50_on_images():
    """The fp16 pipeline (float16 input and weights) runs on ONNX Runtime and gives the float32 model's
    top-5 on realistic images, through the same device pre-processing and post-processing."""
    model = onnx.load(str(bundled.bundled_path("resnet50_fp16")))
    onnx.checker.check_model(model)
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    (spec32,) = load_pipeline(resnet50_pipeline_path()).models
    (spec16,) = load_pipeline(resnet50_fp16_pipeline_path()).models
    assert spec16.path == "bundled:resnet50_fp16" and spec16.preprocess.dtype == "float16"
    rng = np.random.default_rng(5)
    images = [synth_image(rng, w, h, 3) for w, h in [(640, 480), (320, 240), (224, 224)]]
    tops = []
    for spec in (spec32, spec16):
        run = session(with_device_preprocessing(onnx.load(str(bundled.resolve_model_path(spec.path))),
                                                spec.preprocess, spec.input_name))
        batch = np.stack([prepare(img, spec.preprocess) for img in images])
        (logits,) = run.run(["logits"], {INPUT_NAME: batch})
        assert logits.dtype == np.float32 and np.isfinite(logits).all()
        tops.append([postprocess({"logits": row}, spec)["logits"] for row in logits])
    for top32, top16 in zip(*tops):
        assert len(top32) == len(top16) == 5
        assert top16[0]["index"] == top32[0]["index"]
        assert {e["index"] for e in top16} == {e["index"] for e in top32}
        by_index = {e["index"]: e["score"] for e in top32}
        for e in top16:  # float16 weights and activations: scores within a few thousandths
            assert e["score"] == pytest.approx(by_index[e["index"]], abs=5e-3)
