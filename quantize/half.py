"""The fp16 form of a graph, as NVIDIA's GPU toolchains take it: activations, weights, scales and
the KV cache in fp16; fp32 kept where fp16 loses.

Kept in fp32:
- RMSNorm's statistics: the input is cast up, normalised (mean of squares, rsqrt) and cast back
  down before the weight multiplies it (the Qwen3 reference does the same in bf16);
- softmax, with the mask added to the scores in fp32 (a mask of -3.4e38 is -inf in fp16);
- whatever depends on no activation: the rotary cos/sin tables, the causal and padding masks
  (computed in fp32 from positions and lengths, cast once where they meet the activations);
- the logits (the graph output is fp32).

Every other floating-point tensor is fp16. A node computes in one type; a Cast is inserted
where a tensor meets a node of the other type (once per tensor and type). The encoder's
residual stream is clamped to +-ENCODER_CLAMP after each residual add: Whisper-style encoders
can outgrow fp16 in late layers, and a clamp that never binds costs nothing.
"""

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from moss_edge.quantize.half_emulation import tensor_types

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
ENCODER_CLAMP = 64000.0  # below fp16's largest (65504), so the clamped stream still has room for one more add
FP32_OUTPUTS = ("logits",)
SHAPE_ONLY = ("Shape", "Size")  # read a tensor's shape, never its values: no Cast in front of them


@dataclass
class HalfPlan:
    """Which nodes compute in fp32 and which initializers stay fp32, decided on the fp32 graph."""

    fp32_nodes: set[str]  # node names (every node of our graphs has a unique name)
    fp32_initializers: set[str]
    residual_adds: list[str] = field(default_factory=list)  # encoder: where the residual stream is clamped


def _named(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name: the plan refers to nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_half_{i}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type, as the graph has them in fp32 (float initializers already
    written in fp16 are read as fp32 here, so that the inference sees a consistent graph)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            t.data_type = TensorProto.FLOAT
            t.ClearField("raw_data")  # only the type and dims matter here
    return tensor_types(model)


def _activations(model: onnx.ModelProto, types: dict[str, int]) -> set[str]:
    """Names of the tensors that carry the model's activations: derived from a float graph input,
    a weight (a float initializer that a MatMul, Gemm or Conv multiplies by or a Gather reads rows
    of) or a dequantized weight. A shape read off an activation is not one, so masks and positions
    built from shapes and tables (the encoder's sinusoids) stay constant-derived."""
    g = model.graph
    floats = {t.name for t in g.initializer if t.data_type in FLOATS}
    weights = {n.input[0 if n.op_type == "Gather" else 1] for n in g.node
               if n.op_type in ("MatMul", "Gemm", "Conv", "Gather")} & floats
    live = {v.name for v in g.input if types.get(v.name) in FLOATS}
    initializers = {t.name for t in g.initializer}
    for node in g.node:
        if node.op_type in SHAPE_ONLY:
            continue
        dequantizes_weight = node.op_type == "DequantizeLinear" and node.input[0] in initializers
        if dequantizes_weight or any(i in live or i in weights for i in node.input):
            live.update(node.output)
    return live


def half_plan(model: onnx.ModelProto, clamp_residual: bool = False) -> HalfPlan:
    """The plan for the fp32 graph `model` (parsed without its weights; names its nodes)."""
    _named(model)
    g = model.graph
    types = _tensor_types(model)
    live = _activations(model, types)
    made_by = {o: n for n in g.node for o in n.output}
    read_by: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            read_by.setdefault(i, []).append(n)
    fp32 = {n.name for n in g.node if not any(o in live for o in n.output)}  # constant-derived
    for node in g.node:
        if node.op_type == "Softmax":
            fp32.add(node.name)
            scores = made_by.get(node.input[0])
            if scores is not None and scores.op_type == "Add" and any(i not in live for i in scores.input):
                fp32.add(scores.name)  # the mask is added in fp32
        elif node.op_type == "ReduceMean":
            fp32 |= _rms_statistics(node, made_by, read_by)
    residual = []
    if clamp_residual:
        residual = [n.name for n in g.node if n.op_type == "Add" and len(n.input) == 2
                    and all(i in live and i in made_by for i in n.input) and n.name not in fp32]
    initializer_use = {t.name: [r.name in fp32 for r in read_by.get(t.name, [])] for t in g.initializer}
    kept = {name for name, uses in initializer_use.items() if uses and all(uses)}
    return HalfPlan(fp32, kept, residual)


def _rms_statistics(mean: onnx.NodeProto, made_by: dict, read_by: dict) -> set[str]:
    """The nodes of x * rsqrt(mean(x^2) + eps) around one ReduceMean, when it is one: the square,
    the mean, the rsqrt chain and the multiply by x (not the weight's multiply after it)."""
    square = made_by.get(mean.input[0])
    if square is None or square.op_type not in ("Pow", "Mul"):
        return set()
    x = square.input[0]
    if square.op_type == "Mul" and square.input[1] != x:
        return set()
    nodes, current = {square.name, mean.name}, mean
    while True:
        users = read_by.get(current.output[0], [])
        if len(users) != 1:
            return set()
        user = users[0]
        if user.op_type == "Mul" and x in user.input:
            return nodes | {user.name}
        if user.op_type not in ("Add", "Sqrt", "Reciprocal", "Div"):
            return set()
        nodes.add(user.name)
        current = user


def to_half(model: onnx.ModelProto, plan: HalfPlan) -> None:
    """Retype `model` (changed in place: the plan's graph after its weights were written, the
    initializers already in the types the plan gave them) to the fp16 form, with Casts where a
    tensor meets a node of the other type."""
    g = model.graph
    _named(model)
    types = _tensor_types(model)
    dtype: dict[str, int] = {}  # the new type of every float tensor
    for t in g.initializer:
        if t.data_type in FLOATS:
            dtype[t.name] = t.data_type
    for v in g.input:
        if types.get(v.name) in FLOATS:
            v.type.tensor_type.elem_type = dtype[v.name] = TensorProto.FLOAT16
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            casts[name, to] = f"{name}_as_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[name, to]], name=f"{casts[name, to]}_cast", to=to))
        return casts[name, to]

    for node in g.node:
        want = TensorProto.FLOAT if node.name in plan.fp32_nodes else TensorProto.FLOAT16
        if node.op_type not in SHAPE_ONLY + ("Cast",):
            node.input[:] = [cast(i, want) if dtype.get(i, want) != want else i for i in node.input]
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i in FLOATS:
                to.i = want
        nodes.append(node)
        for o in node.output:
            if types.get(o) in FLOATS:
                dtype[o] = want
        if node.name in plan.residual_adds:
            nodes.append(_clamp(node, g))
    for v in g.output:
        if types.get(v.name) not in FLOATS:
            continue
        want = TensorProto.FLOAT if v.name in FP32_OUTPUTS else TensorProto.FLOAT16
        if dtype[v.name] != want:  # the producer writes under another name; the output is its Cast
            inner = f"{v.name}_{'fp16' if want == TensorProto.FLOAT else 'fp32'}"
            for n in nodes:
                n.input[:] = [inner if i == v.name else i for i in n.input]
                n.output[:] = [inner if o == v.name else o for o in n.output]
            nodes.append(helper.make_node("Cast", [inner], [v.name], name=f"{v.name}_cast", to=want))
        v.type.tensor_type.elem_type = want
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # the fp32 types no longer hold; nothing downstream needs them


def _clamp(add: onnx.NodeProto, g: onnx.GraphProto) -> onnx.NodeProto:
    """Clip the add's output to +-ENCODER_CLAMP under its own name (its readers are unchanged)."""
    raw = add.output[0]
    add.output[0] = f"{raw}_unclamped"
    for name, value in ((f"{add.name}_clamp_low", -ENCODER_CLAMP), (f"{add.name}_clamp_high", ENCODER_CLAMP)):
        g.initializer.append(helper.make_tensor(name, TensorProto.FLOAT16, [], np.array([value], np.float16).tobytes(),
                                                raw=True))
    return helper.make_node("Clip", [add.output[0], f"{add.name}_clamp_low", f"{add.name}_clamp_high"], [raw],
                            name=f"{add.name}_clamp")
