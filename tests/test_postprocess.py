"""postprocess(): raw outputs as JSON-ready lists, top-k with softmax and labels, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from worker.errors import ConfigError
from worker.models.postprocess import postprocess, postprocess_batch, softmax
from worker.models.spec import ModelSpec, OutputSpec, Preprocess

PRE = Preprocess(width=4, height=4)


def spec(*outputs: OutputSpec) -> ModelSpec:
    return ModelSpec(name="m", path="bundled:channel_means", preprocess=PRE, outputs=outputs)


def test_every_output_raw_when_none_listed():
    outputs = {"means": np.array([1.5, 2.0, 3.25], np.float32),
               "bits": np.array([[0, 1], [1, 0]], np.uint8),
               "half": np.array([0.5, -2.0], np.float16),
               "flag": np.array(True)}
    result = postprocess(outputs, spec())
    assert list(result) == ["means", "bits", "half", "flag"]
    assert result["means"] == {"shape": [3], "dtype": "float32", "data": [1.5, 2.0, 3.25]}
    assert result["bits"] == {"shape": [2, 2], "dtype": "uint8", "data": [[0, 1], [1, 0]]}
    assert result["half"] == {"shape": [2], "dtype": "float16", "data": [0.5, -2.0]}
    assert result["flag"] == {"shape": [], "dtype": "bool", "data": True}
    assert type(result["half"]["data"][0]) is float and type(result["bits"]["data"][0][0]) is int
    json.dumps(result)  # no NumPy types left


def test_only_listed_outputs_in_listed_order():
    outputs = {"a": np.zeros(2, np.float32), "b": np.ones(1, np.float32)}
    assert list(postprocess(outputs, spec(OutputSpec("b"), OutputSpec("a")))) == ["b", "a"]
    assert list(postprocess(outputs, spec(OutputSpec("b")))) == ["b"]


def test_topk_sorted_with_labels():
    logits = np.array([0.1, 3.0, -1.0, 2.0, 3.0], np.float32)
    out = OutputSpec("logits", kind="topk", k=3, labels=("cat", "dog", "eel", "fox"))
    result = postprocess({"logits": logits}, spec(out))["logits"]
    # equal scores keep index order; index 4 has no label, so no label key
    assert result == [{"index": 1, "score": 3.0, "label": "dog"}, {"index": 4, "score": 3.0},
                      {"index": 3, "score": 2.0, "label": "fox"}]
    json.dumps(result)


def test_topk_softmax_is_stable_and_matches_definition():
    logits = np.array([1000.0, 999.0, 998.0, -1000.0], np.float32)  # naive exp overflows
    result = postprocess({"y": logits}, spec(OutputSpec("y", kind="topk", k=10, softmax=True)))["y"]
    assert [r["index"] for r in result] == [0, 1, 2, 3]  # k larger than the output: all of it
    e = np.exp(np.array([0.0, -1.0, -2.0, -2000.0]))
    np.testing.assert_allclose([r["score"] for r in result], e / e.sum(), rtol=1e-12)
    assert sum(r["score"] for r in result) == pytest.approx(1.0)
    np.testing.assert_allclose(softmax(np.array([1.0, 2.0])), [1 / (1 + np.e), np.e / (1 + np.e)])


def test_topk_flattens_and_handles_float16():
    y = np.array([[1, 5], [3, 2]], np.float16)
    result = postprocess({"y": y}, spec(OutputSpec("y", kind="topk", k=2)))["y"]
    assert result == [{"index": 1, "score": 5.0}, {"index": 2, "score": 3.0}]
    assert all(type(r["score"]) is float for r in result)


def test_unknown_output_names_the_real_ones():
    with pytest.raises(ConfigError, match=r"model 'm' has no output 'logits'; its outputs are \['means'\]"):
        postprocess({"means": np.zeros(3, np.float32)}, spec(OutputSpec("logits", kind="topk")))


def test_non_finite_values_become_null_and_are_counted():
    import json

    from worker.models.postprocess import raw

    out = raw(np.array([1.0, np.nan, np.inf, -2.0], np.float32))
    assert out["data"] == [1.0, None, None, -2.0] and out["non_finite"] == 2
    json.dumps(out, allow_nan=False)  # strict JSON


@pytest.mark.parametrize("soft", [False, True])
def test_batch_postprocess_equals_per_image_postprocess(soft):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 8, (7, 1000)).astype(np.float32)
    logits[2, 10:20] = 5.0  # ties: index order
    logits[3, 4] = np.nan  # a broken model: null score, same in both paths
    logits[4] = 1e4  # huge logits: max-subtracted softmax, no overflow
    embed = rng.normal(size=(7, 2, 3)).astype(np.float16)
    spec = ModelSpec(name="m", path="x", preprocess=Preprocess(width=8, height=8), outputs=(
        OutputSpec(name="logits", kind="topk", k=5, softmax=soft, labels=tuple(f"c{i}" for i in range(12))),
        OutputSpec(name="embed")))
    batch = postprocess_batch({"logits": logits, "embed": embed}, spec)
    assert len(batch) == 7
    for j in range(7):
        one = postprocess({"logits": logits[j], "embed": embed[j]}, spec)
        # the same JSON, to the bit (floats compared through their repr)
        assert json.dumps(batch[j], sort_keys=True) == json.dumps(one, sort_keys=True)
    with pytest.raises(ConfigError, match="has no output 'logits'"):
        postprocess_batch({"embed": embed}, spec)


def test_top_indices_equal_a_full_stable_sort_on_ties_nan_and_inf():
    from worker.models.postprocess import _top_indices

    rng = np.random.default_rng(1)
    for _ in range(300):
        n, m, k = int(rng.integers(1, 20)), int(rng.integers(1, 50)), int(rng.integers(0, 8))
        x = rng.integers(-3, 4, size=(n, m)).astype(np.float64)  # few distinct values: ties everywhere
        if rng.random() < 0.3:
            x[rng.integers(n), rng.integers(m)] = np.nan
        if rng.random() < 0.2:
            x[rng.integers(n), rng.integers(m)] = np.inf
        np.testing.assert_array_equal(_top_indices(x, k), np.argsort(-x, axis=1, kind="stable")[:, :k])
