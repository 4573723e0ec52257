"""Convolutions rewritten as one MatMul each, so that dynamic INT8 covers the encoder's stem.

The encoder's stem (three 3x3 stride-2 convolutions, 480 channels at 4B widths) costs more than
its transformer layers once those are INT8: ~1.1 s of a 1.3 s encode of 30 s of audio at 2
encoder layers. Dynamic INT8 (MatMulInteger) has no convolution. Written as im2col (the nine
shifted, strided views of the padded input side by side, channels last) times the weight
reshaped to [9 * C_in, C_out], the same convolution is a MatMul that becomes INT8 like the rest:
measured on conv2 alone (8 chunks), 0.51 s against 0.90 s for the fp32 Conv, cosine 0.99978.
dynamic_int8.py then builds the views from the quantized input (im2col_pads finds them).
"""

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _rewritable(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> bool:
    """A 2-D 3x3 convolution, stride 2, padding 1, no groups or dilation, more than one input channel."""
    w = weights.get(node.input[1]) if len(node.input) > 1 else None
    return (node.op_type == "Conv" and w is not None and w.ndim == 4 and w.shape[1] > 1 and w.shape[2:] == (3, 3)
            and list(_attr(node, "strides", [1, 1])) == [2, 2] and list(_attr(node, "pads", [0] * 4)) == [1, 1, 1, 1]
            and _attr(node, "group", 1) == 1 and list(_attr(node, "dilations", [1, 1])) == [1, 1]
            and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


def _im2col_nodes(node: onnx.NodeProto, w: np.ndarray) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    p = node.name or node.output[0]
    const = lambda name, v: numpy_helper.from_array(np.asarray(v), f"{p}_{name}")  # noqa: E731
    column_weight = np.concatenate([w[:, :, dy, dx].T for dy in range(3) for dx in range(3)], axis=0)  # [9 Ci, Co]
    inits = [const("pads", np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64)), const("one", np.array([1], np.int64)),
             const("two", np.array([2], np.int64)), const("three", np.array([3], np.int64)),
             const("axes", np.array([1, 2], np.int64)), const("steps", np.array([2, 2], np.int64)),
             numpy_helper.from_array(np.ascontiguousarray(column_weight, np.float32), f"{node.input[1]}_im2col")]
    x, n = node.input[0], lambda s: f"{p}_{s}"  # noqa: E731
    nodes = [helper.make_node("Transpose", [x], [n("nhwc")], perm=[0, 2, 3, 1]),
             helper.make_node("Pad", [n("nhwc"), n("pads")], [n("padded")]),
             # output rows Ho = ceil(H / 2): view (dy, dx) takes rows dy, dy + 2, ... up to dy + 2 Ho - 2
             helper.make_node("Shape", [n("nhwc")], [n("shape")]),
             helper.make_node("Slice", [n("shape"), n("one"), n("three")], [n("hw")]),
             helper.make_node("Add", [n("hw"), n("one")], [n("hw1")]),
             helper.make_node("Div", [n("hw1"), n("two")], [n("out_hw")]),
             helper.make_node("Mul", [n("out_hw"), n("two")], [n("span")]),
             helper.make_node("Sub", [n("span"), n("one")], [n("last")])]
    views = []
    for dy in range(3):
        for dx in range(3):
            inits.append(const(f"start{dy}{dx}", np.array([dy, dx], np.int64)))
            nodes += [helper.make_node("Add", [n("last"), n(f"start{dy}{dx}")], [n(f"end{dy}{dx}")]),
                      helper.make_node("Slice", [n("padded"), n(f"start{dy}{dx}"), n(f"end{dy}{dx}"), n("axes"), n("steps")],
                                       [n(f"view{dy}{dx}")])]
            views.append(n(f"view{dy}{dx}"))
    nodes += [helper.make_node("Concat", views, [n("columns")], axis=-1),
              helper.make_node("MatMul", [n("columns"), f"{node.input[1]}_im2col"], [n("matmul")])]
    out = n("matmul")
    if len(node.input) > 2 and node.input[2]:
        nodes.append(helper.make_node("Add", [out, node.input[2]], [n("biased")]))
        out = n("biased")
    nodes.append(helper.make_node("Transpose", [out], list(node.output), perm=[0, 3, 1, 2]))
    return nodes, inits


def im2col_pads(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """{columns tensor: the Pad its nine views are sliced from} for each im2col in the graph."""
    made_by = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for node in model.graph.node:
        views = [made_by.get(i) for i in node.input]
        if node.op_type != "Concat" or len(views) != 9 or any(v is None or v.op_type != "Slice" for v in views):
            continue
        sliced = {v.input[0] for v in views}
        pad = made_by.get(sliced.pop()) if len(sliced) == 1 else None
        if pad is not None and pad.op_type == "Pad":
            found[node.output[0]] = pad
    return found


def convolutions_as_matmuls(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array) -> int:
    """Rewrite, in place, every convolution the stem has (see _rewritable) as im2col + MatMul;
    read gives a weight's value (by default the model holds them). The column weights (a few MB)
    go into the graph. Returns how many were rewritten."""
    graph = model.graph
    weights = {i.name: np.asarray(read(i)) for i in graph.initializer if len(i.dims) == 4}
    nodes, rewritten = [], set()
    for node in graph.node:
        if _rewritable(node, weights):
            new_nodes, inits = _im2col_nodes(node, weights[node.input[1]])
            nodes += new_nodes
            graph.initializer.extend(inits)
            rewritten.add(node.input[1])
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {i for node in graph.node for i in node.input}
    keep = [i for i in graph.initializer if i.name not in rewritten or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(rewritten)
