"""The wrapped model on uint8 input == normalize() followed by the original model (ONNX Runtime, CPU)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.errors import ConfigError
from worker.models.graph import INPUT_NAME, PREPROCESS_OUTPUT, preprocessing_only_model, with_device_preprocessing
from worker.models.preprocess import normalize
from worker.models.spec import Preprocess

RNG = np.random.default_rng(3)
ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def passthrough_model(pre: Preprocess, name: str = "x", batch: int | str = "n", opset: int = 13) -> onnx.ModelProto:
    """The model's input comes straight back out (and a Relu of it), so nothing hides an error."""
    elem = ELEM[pre.dtype]
    x = helper.make_tensor_value_info(name, elem, [batch, *pre.model_input_shape])
    shape = [batch, *pre.model_input_shape]
    if pre.dtype == "uint8":  # as a uint8 model does: cast its input first (TensorRT takes nothing else)
        same = helper.make_tensor_value_info("same", TensorProto.FLOAT, shape)
        graph = helper.make_graph([helper.make_node("Cast", [name], ["same"], to=TensorProto.FLOAT)],
                                  "passthrough", [x], [same])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    outs = [helper.make_tensor_value_info("same", elem, shape)]
    nodes = [helper.make_node("Identity", [name], ["same"])]
    if pre.dtype != "uint8":
        outs.append(helper.make_tensor_value_info("relu", elem, shape))
        nodes.append(helper.make_node("Relu", [name], ["relu"]))
    graph = helper.make_graph(nodes, "passthrough", [x], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def conv_model(pre: Preprocess) -> onnx.ModelProto:
    c = pre.channels
    w = numpy_helper.from_array(RNG.standard_normal((4, c, 3, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *pre.model_input_shape])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, pre.height, pre.width])
    graph = helper.make_graph([helper.make_node("Conv", ["pixels", "w"], ["y"], pads=[1, 1, 1, 1])],
                              "conv", [x], [y], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CASES = [
    dict(color=color, layout=layout, dtype=dtype, **norm)
    for color in ("rgb", "bgr", "gray")
    for layout in ("nchw", "nhwc")
    for dtype in ("float32", "float16")
    for norm in ({}, {"scale": 1 / 255}, {"mean": (127.5,), "std": (64.0,)},
                 {"scale": 1 / 255, "mean": (0.485, 0.456, 0.406)[: 1 if color == "gray" else 3],
                  "std": (0.229, 0.224, 0.225)[: 1 if color == "gray" else 3]})
] + [dict(color=c, layout=lay, dtype="uint8") for c in ("rgb", "gray") for lay in ("nchw", "nhwc")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_wrapped_model_equals_normalize_then_model(case):
    pre = Preprocess(width=6, height=5, **case)
    original = passthrough_model(pre)
    wrapped = with_device_preprocessing(original, pre)
    assert [i.name for i in wrapped.graph.input] == [INPUT_NAME]
    assert wrapped.opset_import == original.opset_import and wrapped.ir_version == original.ir_version
    batch = RNG.integers(0, 256, (3, *pre.hwc_shape), dtype=np.uint8)
    got = session(wrapped).run(None, {INPUT_NAME: batch})
    want = session(original).run(None, {"x": normalize(batch, pre)})
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-6, atol=0)
    only = session(preprocessing_only_model(pre)).run([PREPROCESS_OUTPUT], {INPUT_NAME: batch})[0]
    assert only.dtype == np.dtype(pre.dtype)
    np.testing.assert_allclose(only.astype(np.float64), normalize(batch, pre).astype(np.float64), rtol=1e-6, atol=0)


def test_identity_steps_are_left_out():
    pre = Preprocess(width=4, height=4, layout="nhwc")  # float32, scale 1, no mean/std: only the Cast
    ops = [n.op_type for n in with_device_preprocessing(passthrough_model(pre), pre).graph.node]
    assert ops[:1] == ["Cast"] and "Mul" not in ops and "Transpose" not in ops
    pre = Preprocess(width=4, height=4, layout="nchw", scale=0.5, mean=(1.0,), std=(2.0,), dtype="float16")
    ops = [n.op_type for n in preprocessing_only_model(pre).graph.node]
    assert ops == ["Cast", "Transpose", "Mul", "Sub", "Div", "Cast"]


def test_real_ops_downstream():
    pre = Preprocess(width=16, height=12, scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    original = conv_model(pre)
    batch = RNG.integers(0, 256, (2, *pre.hwc_shape), dtype=np.uint8)
    got = session(with_device_preprocessing(original, pre)).run(None, {INPUT_NAME: batch})[0]
    want = session(original).run(None, {"pixels": normalize(batch, pre)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_batch_dimension_is_kept():
    pre = Preprocess(width=4, height=4)
    dims = with_device_preprocessing(passthrough_model(pre, batch="n"), pre).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "n" and [d.dim_value for d in dims[1:]] == [4, 4, 3]
    dims = with_device_preprocessing(passthrough_model(pre, batch=2), pre).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2


def two_input_model(pre: Preprocess, legacy_weights: bool = False) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", *pre.model_input_shape])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", *pre.model_input_shape])
    inits = [numpy_helper.from_array(np.array([2.0], np.float32), "k")] if legacy_weights else []
    graph = helper.make_graph([helper.make_node("Mul", ["image", "k"], ["y"])], "two", [x, k], [y],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_input_selection():
    pre = Preprocess(width=4, height=4)
    model = two_input_model(pre)
    with pytest.raises(ConfigError, match=r"2 inputs \['image', 'k'\]; set input_name"):
        with_device_preprocessing(model, pre)
    with pytest.raises(ConfigError, match=r"no input 'pixels'; its inputs are \['image', 'k'\]"):
        with_device_preprocessing(model, pre, "pixels")
    wrapped = with_device_preprocessing(model, pre, "image")
    assert [i.name for i in wrapped.graph.input] == [INPUT_NAME, "k"]
    batch = RNG.integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
    y = session(wrapped).run(None, {INPUT_NAME: batch, "k": np.array([3.0], np.float32)})[0]
    assert np.array_equal(y, normalize(batch, pre) * np.float32(3.0))
    # Old exporters list weights as inputs too: those are not candidates for the image.
    legacy = with_device_preprocessing(two_input_model(pre, legacy_weights=True), pre)
    assert session(legacy).run(None, {INPUT_NAME: batch})[0].shape == (1, 3, 4, 4)


def test_mismatches_are_config_errors():
    pre = Preprocess(width=4, height=4)
    with pytest.raises(ConfigError, match="is float16 but preprocess.dtype=float32"):
        with_device_preprocessing(passthrough_model(Preprocess(width=4, height=4, dtype="float16")), pre)
    with pytest.raises(ConfigError, match=r"shape \['n', 4, 4, 3\]; preprocess gives \[N, 3, 4, 4\]"):
        with_device_preprocessing(passthrough_model(Preprocess(width=4, height=4, layout="nhwc")), pre)
    with pytest.raises(ConfigError, match="opset 6"):
        with_device_preprocessing(passthrough_model(pre, opset=6), pre)
    wrapped = with_device_preprocessing(passthrough_model(pre), pre)
    with pytest.raises(ConfigError, match="already has a tensor named 'image_u8'"):
        with_device_preprocessing(wrapped, Preprocess(width=4, height=4, dtype="uint8", layout="nhwc"), INPUT_NAME)


# --- TensorRT's rule: uint8 only as a graph input or output --------------------------------------

def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every tensor's type after ONNX shape inference (strict: an op that cannot type its output fails)."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)) for t in g.initializer})
    untyped = [o for n in g.node for o in n.output if o not in types]
    assert not untyped, f"shape inference left {untyped} untyped"
    return types


def shape_of(t: onnx.TypeProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.tensor_type.shape.dim]


@pytest.mark.parametrize("batch", ["n", 3], ids=["dynamic-batch", "fixed-batch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_wrapped_graph_has_no_uint8_tensor_but_the_input(case, batch):
    pre = Preprocess(width=6, height=5, **case)
    wrapped = with_device_preprocessing(passthrough_model(pre, batch=batch), pre)
    types = inferred_types(wrapped)
    uint8 = sorted(n for n, t in types.items() if t.tensor_type.elem_type == TensorProto.UINT8)
    assert uint8 == [INPUT_NAME]
    assert shape_of(types[INPUT_NAME]) == [batch, 5, 6, pre.channels]
    # The model's outputs keep the model's own types and shapes: nothing downstream changed.
    for out in wrapped.graph.output:
        assert shape_of(types[out.name]) == [batch, *pre.model_input_shape]
        want = TensorProto.FLOAT if pre.dtype == "uint8" else ELEM[pre.dtype]
        assert types[out.name].tensor_type.elem_type == want
    # The first node reads image_u8 and is a Cast (or, for uint8 NHWC, the model's own first node).
    readers = [n.op_type for n in wrapped.graph.node if INPUT_NAME in n.input]
    assert readers == ["Cast"]


def test_uint8_nhwc_model_is_fed_directly():
    pre = Preprocess(width=4, height=3, layout="nhwc", dtype="uint8")
    model = passthrough_model(pre)
    wrapped = with_device_preprocessing(model, pre)
    assert [n.op_type for n in wrapped.graph.node] == ["Cast"]  # the model's own node, nothing added
    batch = RNG.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    assert np.array_equal(session(wrapped).run(None, {INPUT_NAME: batch})[0], batch.astype(np.float32))


def test_uint8_nchw_model_with_other_readers_keeps_a_uint8_transpose():
    """Not rewired (its first node is no Cast): ONNX Runtime runs it; the uint8 tensor is named here."""
    pre = Preprocess(width=4, height=3, layout="nchw", dtype="uint8")
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", 3, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, ["n", 3, 4, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1, 3, 2])],
                                                "t", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    wrapped = with_device_preprocessing(model, pre)
    types = inferred_types(wrapped)
    assert sorted(n for n, t in types.items() if t.tensor_type.elem_type == TensorProto.UINT8) == [INPUT_NAME, "x", "y"]
    batch = RNG.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    got = session(wrapped).run(None, {INPUT_NAME: batch})[0]
    assert np.array_equal(got, batch.transpose(0, 3, 2, 1))


def test_uint8_input_read_in_a_subgraph_is_renamed_there_too():
    pre = Preprocess(width=2, height=2, layout="nhwc", dtype="uint8")
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", 2, 2, 3])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 2, 3])
    branch = helper.make_graph([helper.make_node("Cast", ["x"], ["b"], to=TensorProto.FLOAT)], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 2, 2, 3])])
    node = helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch)
    model = helper.make_model(helper.make_graph([node], "sub", [x, flag], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    wrapped = with_device_preprocessing(model, pre, "x")
    batch = RNG.integers(0, 256, (1, 2, 2, 3), dtype=np.uint8)
    got = session(wrapped).run(None, {INPUT_NAME: batch, "flag": np.array(True)})[0]
    assert np.array_equal(got, batch.astype(np.float32))
