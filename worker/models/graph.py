"""Put the normalisation step inside the model, so that images travel to the device as uint8.

``with_device_preprocessing`` returns a copy of a model whose only image input is ``image_u8``
(uint8, [N, H, W, C]) followed by the nodes of worker.models.preprocess.normalize::

    image_u8 -> Cast float32 -> Transpose (nchw only) -> Mul scale -> Sub mean -> Div std
             -> Cast float16 (float16 models only) -> the model's original input

Steps that would do nothing (scale 1, no mean, no std, nhwc layout) are left out. The Cast comes first
because TensorRT's ONNX parser takes uint8 only as a network input or output: a node that outputs a
uint8 tensor anywhere else is refused ("TensorRT does not support UINT8 types for intermediate
tensors"), so nothing may run on the uint8 image before it is cast. (The Transpose used to come first,
on uint8, to move a quarter of the bytes; TensorRT folds it into the next layer's input format anyway.)
The Transpose stays right after the Cast, where it was relative to the element-wise steps: moved to the
end (after the float16 Cast, to move fewer bytes), ONNX Runtime's CPU results for one image alone and
the same image in a batch differed in the last bit (tests/test_engine_onnxruntime.py), presumably
because its optimiser rearranges the transposes around the model's first ops. The constants are float32 and the steps are not folded into one
multiply-add, so the result matches the NumPy reference to the bit (TensorRT fuses the element-wise
chain into one kernel anyway).

Models that take uint8 themselves get no pre-processing nodes in front of their uint8 input at all:

- nhwc: the model's input is renamed ``image_u8``;
- nchw: each of the input's consumers must be a Cast (what a model does with uint8 first, in
  practice); the Cast then reads ``image_u8`` (NHWC) and a Transpose after it restores NCHW. A uint8
  NCHW model whose input feeds anything else gets a uint8 Transpose: ONNX Runtime runs it, TensorRT
  refuses it (and would refuse such a model's own uint8 intermediates too).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.errors import ConfigError
from worker.models.spec import Preprocess

INPUT_NAME = "image_u8"
PREPROCESS_OUTPUT = "preprocessed"
OPSET = 17
IR_VERSION = 8  # what opset 17 needs; onnxruntime 1.20 reads up to IR 10
# Every op used here has had these attributes and broadcasting since opset 7.
MIN_MODEL_OPSET = 7

_ELEM_TYPES = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _preprocess_nodes(pre: Preprocess, src: str, dst: str, taken: set[str]
                      ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (and their constant initializers) from uint8 NHWC ``src`` to the model's tensor ``dst``.

    For float models the first node is the Cast, so that ``src`` is the only uint8 tensor.
    """
    steps: list[tuple[str, dict, np.ndarray | None]] = []
    transpose = ("Transpose", {"perm": [0, 3, 1, 2]}, None)
    if pre.dtype != "uint8":
        steps.append(("Cast", {"to": TensorProto.FLOAT}, None))
        if pre.layout == "nchw":
            steps.append(transpose)
        # After the Transpose the channel axis is 1: constants of shape [C, 1, 1] broadcast over H, W.
        const_shape = (-1, 1, 1) if pre.layout == "nchw" else (-1,)
        if pre.scale != 1.0:
            steps.append(("Mul", {}, np.asarray([pre.scale], dtype=np.float32)))
        if pre.mean:
            steps.append(("Sub", {}, np.asarray(pre.mean, dtype=np.float32).reshape(const_shape)))
        if pre.std:
            steps.append(("Div", {}, np.asarray(pre.std, dtype=np.float32).reshape(const_shape)))
        if pre.dtype == "float16":
            steps.append(("Cast", {"to": TensorProto.FLOAT16}, None))
    elif pre.layout == "nchw":
        steps.append(transpose)
    if not steps:  # uint8 NHWC: only the name changes
        steps.append(("Identity", {}, None))

    nodes, inits = [], []
    current = src
    for i, (op, attrs, const) in enumerate(steps):
        out = dst if i == len(steps) - 1 else _unique(f"{INPUT_NAME}/{op.lower()}", taken)
        inputs = [current]
        if const is not None:
            cname = _unique(f"{INPUT_NAME}/{op.lower()}_const", taken)
            inits.append(numpy_helper.from_array(const, cname))
            inputs.append(cname)
        nodes.append(helper.make_node(op, inputs, [out], name=_unique(f"{INPUT_NAME}/{op}", taken), **attrs))
        current = out
    return nodes, inits


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of the graph and of its subgraphs (If/Loop/Scan bodies can read outer tensors)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for sub in _subgraphs(node):
            nodes.extend(_all_nodes(sub))
    return nodes


def _feed_uint8_model(graph: onnx.GraphProto, name: str, pre: Preprocess, taken: set[str]) -> bool:
    """Rewire a uint8 model so that ``image_u8`` feeds it with no uint8 node in between.

    Returns False where that cannot be done (the caller then puts the plain nodes in front).
    """
    if name in {o.name for o in graph.output}:
        return False  # a uint8 graph output is allowed: the plain Identity/Transpose is fine
    readers = [n for n in _all_nodes(graph) if name in n.input]
    if pre.layout == "nhwc":
        for node in readers:
            node.input[:] = [INPUT_NAME if i == name else i for i in node.input]
        return True
    top = [i for i, n in enumerate(graph.node) if name in n.input]
    casts = [graph.node[i] for i in top]
    if not top or len(top) != len(readers) or not all(
            n.op_type == "Cast" and list(n.input) == [name]
            and next((a.i for a in n.attribute if a.name == "to"), 0) != TensorProto.UINT8 for n in casts):
        return False
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        if i in top:  # Cast(NCHW) == Transpose(Cast(NHWC)): cast first, then restore the layout
            nhwc = _unique(f"{INPUT_NAME}/cast_nhwc", taken)
            wanted = node.output[0]
            node.input[0], node.output[0] = INPUT_NAME, nhwc
            nodes.append(helper.make_node("Transpose", [nhwc], [wanted], perm=[0, 3, 1, 2],
                                          name=_unique(f"{INPUT_NAME}/Transpose", taken)))
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _image_input(pre: Preprocess, batch_dim: int | str = "batch") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch_dim, *pre.hwc_shape])


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Models exported with IR < 4 also list their weights as inputs; those are not fed by the caller.
    weights = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in weights]


def _pick_input(model: onnx.ModelProto, input_name: str) -> onnx.ValueInfoProto:
    inputs = _graph_inputs(model.graph)
    names = [i.name for i in inputs]
    if input_name:
        for value in inputs:
            if value.name == input_name:
                return value
        raise ConfigError(f"model {model.graph.name!r} has no input {input_name!r}; its inputs are "
                          f"{names}. Fix input_name in the pipeline file.")
    if len(inputs) != 1:
        raise ConfigError(f"model {model.graph.name!r} has {len(inputs)} inputs {names}; set input_name "
                          f"in the pipeline file to the one that takes the image")
    return inputs[0]


def _check_input_type(value: onnx.ValueInfoProto, pre: Preprocess) -> int | str:
    """Refuse a model whose input cannot take this preprocess; return its batch dimension."""
    tensor = value.type.tensor_type
    if tensor.elem_type != _ELEM_TYPES[pre.dtype]:
        actual = helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else "unknown"
        raise ConfigError(f"model input {value.name!r} is {actual} but preprocess.dtype={pre.dtype}; "
                          f"set preprocess.dtype to the model's input type")
    if not tensor.HasField("shape"):
        return "batch"
    dims = tensor.shape.dim
    expected = pre.model_input_shape
    wanted = f"[N, {', '.join(map(str, expected))}] ({pre.layout}, color={pre.color})"
    if len(dims) != 4:
        raise ConfigError(f"model input {value.name!r} has rank {len(dims)}; preprocess gives {wanted}")
    for dim, size in zip(dims[1:], expected):
        if dim.HasField("dim_value") and dim.dim_value != size:
            got = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise ConfigError(f"model input {value.name!r} has shape {got}; preprocess gives {wanted}. "
                              f"Fix preprocess width/height/color/layout to match the model")
    # A model built for a fixed batch keeps it (the engine must then send batches of that size);
    # otherwise the batch stays symbolic.
    first = dims[0]
    return first.dim_value if first.HasField("dim_value") else (first.dim_param or "batch")


def with_device_preprocessing(model: onnx.ModelProto, pre: Preprocess, input_name: str = "") -> onnx.ModelProto:
    """A copy of ``model`` that takes uint8 NHWC images as ``image_u8`` and normalises them itself."""
    target = _pick_input(model, input_name)
    batch_dim = _check_input_type(target, pre)
    opsets = {o.domain: o.version for o in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset is not None and opset < MIN_MODEL_OPSET:
        raise ConfigError(f"model {model.graph.name!r} uses opset {opset}; device pre-processing needs "
                          f"opset >= {MIN_MODEL_OPSET}. Re-export or convert the model (onnx.version_converter)")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    taken |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    if INPUT_NAME in taken:
        raise ConfigError(f"model {model.graph.name!r} already has a tensor named {INPUT_NAME!r}; "
                          f"was it wrapped with device pre-processing already? Pass the original model")
    rewired = pre.dtype == "uint8" and _feed_uint8_model(graph, target.name, pre, taken)
    nodes, inits = ([], []) if rewired else _preprocess_nodes(pre, INPUT_NAME, target.name, taken)
    if opset is None:  # a model of custom-domain ops only: the added standard ops need an import
        out.opset_import.append(helper.make_opsetid("", OPSET))

    # The old input becomes an inner tensor (unless it was rewired away); keeping its type as value_info
    # keeps shape information for ONNX Runtime's and TensorRT's shape inference.
    kept = [i for i in graph.input if i.name != target.name]
    del graph.input[:]
    graph.input.extend([_image_input(pre, batch_dim), *kept])
    if not rewired:
        graph.value_info.append(target)
    graph.initializer.extend(inits)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)  # graph nodes must stay topologically sorted
    return out


def preprocessing_only_model(pre: Preprocess) -> onnx.ModelProto:
    """uint8 [N, H, W, C] ``image_u8`` -> normalised ``preprocessed`` tensor, nothing else.

    For engines that cannot be re-wrapped (prebuilt TensorRT plans): run this in front of them.
    """
    taken = {INPUT_NAME, PREPROCESS_OUTPUT}
    nodes, inits = _preprocess_nodes(pre, INPUT_NAME, PREPROCESS_OUTPUT, taken)
    output = helper.make_tensor_value_info(PREPROCESS_OUTPUT, _ELEM_TYPES[pre.dtype],
                                           ["batch", *pre.model_input_shape])
    graph = helper.make_graph(nodes, "preprocess", [_image_input(pre)], [output], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="gpu-kafka-worker")
