"""Weight-only quantization of an ONNX graph, streaming: one initializer in memory at a time.

A quantized MatMul weight becomes INT4/INT8 data, fp32 scales and a DequantizeLinear (opset
21, blocked along the input dimension) whose output keeps the weight's name, so consumers are
untouched. TensorRT runs the pattern as is; ONNX Runtime CPU fuses it into MatMulNBits at load.
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moss_edge.quantize.half import HalfPlan, to_half
from moss_edge.quantize.weights import awq_quantize, dequantize_blocked, pack_int4, quantize_blocked, search_clip
from moss_edge.runtime.artifact import inside

NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
            TensorProto.INT32: np.int32, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
            TensorProto.BOOL: np.bool_}


@dataclass
class WeightRule:
    bits: int  # 4 or 8; 16 for an embedding table stored in fp16
    block: int  # rows per scale along the input dimension
    method: str = "rtn"  # "rtn", "clip" (activation-weighted clipping) or "awq"
    per_channel: bool = False  # one scale per output column (the INT8 layout TensorRT takes for W8A8)


def read_initializer(init: TensorProto, root: Path) -> np.ndarray:
    """An initializer's value; external data is memory-mapped, not read."""
    if init.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    info = {e.key: e.value for e in init.external_data}
    location = inside(root, info.get("location", ""))
    dtype = NP_TYPES[init.data_type]
    count = int(np.prod(init.dims)) if init.dims else 1
    return np.memmap(location, dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(init.dims) if init.dims else ()) if count else np.zeros(init.dims, dtype)


class ExternalWriter:
    """Appends tensors to one external-data file and returns protos that point into it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, data_type: int, dims, raw: bytes) -> TensorProto:
        proto = TensorProto(name=name, data_type=data_type, dims=list(dims))
        if len(raw) < 1024:  # small tensors stay inside the graph file
            proto.raw_data = raw
            return proto
        pad = (-self.offset) % 64  # aligned, so the file can be memory-mapped efficiently
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(raw)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            proto.external_data.add(key=key, value=value)
        self.offset += len(raw)
        return proto

    def close(self) -> None:
        self.file.close()


def _quantized(name: str, w: np.ndarray, rule: WeightRule, stats: dict | None, axis: int, writer: ExternalWriter,
               scale_type: int = TensorProto.FLOAT):
    """Initializers and nodes replacing weight `name`; axis is the input (blocked) dimension.
    scale_type: the scales' type, which is also the dequantized weight's (fp16 in an fp16 graph)."""
    mat = w if axis == 0 else w.T  # quantize_blocked blocks along rows
    if rule.per_channel:
        rule = WeightRule(rule.bits, mat.shape[0], rule.method, True)
    input_scale, stored = None, NP_TYPES[scale_type]
    if rule.method == "awq" and stats is not None:
        q, scale, input_scale = awq_quantize(mat, stats["sq"], stats["abs"], rule.bits, rule.block, stored)
    elif rule.method in ("clip", "awq") and stats is not None:
        clip = search_clip(mat, stats["sq"], rule.bits, rule.block, stored)
        q, scale = quantize_blocked(mat, rule.bits, rule.block, clip, stored)
    else:
        q, scale = quantize_blocked(mat, rule.bits, rule.block, scale_dtype=stored)
    if axis == 1:
        q, scale = q.T, scale.T
    q = np.ascontiguousarray(q)
    if rule.per_channel:  # computed as one block of all rows; stored as a per-axis scale [N]
        scale = scale.reshape(-1)
    raw = pack_int4(q) if rule.bits == 4 else q.astype(np.int8).tobytes()
    data_type = TensorProto.INT4 if rule.bits == 4 else TensorProto.INT8
    inits = [writer.tensor(f"{name}_q{rule.bits}", data_type, q.shape, raw),
             writer.tensor(f"{name}_scale", scale_type, scale.shape,
                           np.ascontiguousarray(scale, NP_TYPES[scale_type]).tobytes())]
    blocking = {} if rule.per_channel else {"block_size": rule.block}
    node = helper.make_node("DequantizeLinear", [f"{name}_q{rule.bits}", f"{name}_scale"], [name],
                            name=f"{name}_dequantize", axis=1 - axis if rule.per_channel else axis, **blocking)
    return inits, node, input_scale


@dataclass
class Rewrite:
    """The edits of one pass over a graph's initializers, applied to the graph at the end."""

    writer: ExternalWriter
    initializers: list = field(default_factory=list)
    dequantize: list = field(default_factory=list)  # weight DequantizeLinear nodes: first in the graph
    before: dict = field(default_factory=dict)  # id(node) -> nodes inserted just before it
    removed: set = field(default_factory=set)  # id(node) of nodes replaced

    def insert_before(self, node: onnx.NodeProto, *nodes: onnx.NodeProto) -> None:
        self.before.setdefault(id(node), []).extend(nodes)

    def apply(self, graph: onnx.GraphProto) -> None:
        del graph.initializer[:]
        graph.initializer.extend(self.initializers)
        nodes = list(self.dequantize)  # they depend on initializers only
        for node in graph.node:
            nodes += self.before.get(id(node), []) + ([] if id(node) in self.removed else [node])
        del graph.node[:]
        graph.node.extend(nodes)


@contextmanager
def rewriting(model: onnx.ModelProto, dst: Path, half: HalfPlan | None = None):
    """Rewrite `model` (changed in place) into dst and dst.data: yields the Rewrite and each
    tensor's consuming nodes; on success the edits are applied (then the fp16 form, given its
    plan) and dst is written (dst.data only if a tensor went into it)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    rw = Rewrite(ExternalWriter(dst.parent / f"{dst.name}.data"))
    try:
        yield rw, consumers
    finally:
        rw.writer.close()
    rw.apply(model.graph)
    if half is not None:
        to_half(model, half)
    onnx.save(model, str(dst))
    if rw.writer.offset == 0:
        rw.writer.path.unlink()


# One rewrite per scheme. Each gets the quantized initializers [data, scale] of weight `name`.

def dequantized_weight(rw: Rewrite, dq: onnx.NodeProto) -> None:
    """MatMul weight: a DequantizeLinear whose output keeps the weight's name."""
    rw.dequantize.append(dq)


def gathered_table(rw: Rewrite, users: list[onnx.NodeProto], inits: list[TensorProto], block: int) -> None:
    """Embedding table: gather the quantized rows and their scales, dequantize only those."""
    for user in users:
        ids = user.input[1]
        rw.insert_before(user,
                         helper.make_node("Gather", [inits[0].name, ids], [f"{user.name}_rows_q"], name=f"{user.name}_q"),
                         helper.make_node("Gather", [inits[1].name, ids], [f"{user.name}_rows_scale"], name=f"{user.name}_s"),
                         helper.make_node("DequantizeLinear", [f"{user.name}_rows_q", f"{user.name}_rows_scale"],
                                          list(user.output), name=f"{user.name}_dq", axis=-1, block_size=block))
        rw.removed.add(id(user))


def half_table(rw: Rewrite, name: str, users: list[onnx.NodeProto], value: np.ndarray, fp16_graph: bool) -> None:
    """Embedding table in fp16 (TensorRT gathers no INT8 table): gather the rows, cast them to
    fp32 unless the graph computes in fp16."""
    rw.initializers.append(rw.writer.tensor(name, TensorProto.FLOAT16, value.shape,
                                            np.ascontiguousarray(value, np.float16).tobytes()))
    if fp16_graph:
        return
    for user in users:
        rw.insert_before(user, helper.make_node("Gather", [name, user.input[1]], [f"{user.name}_rows_fp16"],
                                                name=f"{user.name}_fp16"),
                         helper.make_node("Cast", [f"{user.name}_rows_fp16"], list(user.output),
                                          name=f"{user.name}_cast", to=TensorProto.FLOAT))
        rw.removed.add(id(user))


def scaled_inputs(rw: Rewrite, name: str, users: list[onnx.NodeProto], input_scale: np.ndarray, float_type: int) -> None:
    """AWQ: x @ W == (x / s) @ (s W): divide the input, once per consumer."""
    inv = rw.writer.tensor(f"{name}_input_scale", float_type, input_scale.shape,
                           (1.0 / input_scale).astype(NP_TYPES[float_type]).tobytes())
    rw.initializers.append(inv)
    for user in users:
        scaled = f"{name}_scaled_input"
        rw.insert_before(user, helper.make_node("Mul", [user.input[0], inv.name], [scaled], name=f"{name}_awq"))
        user.input[0] = scaled


def quantized_activations(rw: Rewrite, name: str, users: list[onnx.NodeProto], scales: dict[str, float],
                          float_type: int) -> bool:
    """W8A8: a symmetric INT8 QuantizeLinear/DequantizeLinear pair in front of each MatMul whose
    input has a calibrated scale (a weight can feed several MatMuls: out_proj, taps and output)."""
    done = False
    for use, user in enumerate(users):
        act = user.input[0]
        if user.op_type != "MatMul" or act not in scales:
            continue
        scale = rw.writer.tensor(f"{name}_act_scale{use}", float_type, [], NP_TYPES[float_type](scales[act]).tobytes())
        zero = rw.writer.tensor(f"{name}_act_zero{use}", TensorProto.INT8, [], np.int8(0).tobytes())
        rw.initializers += [scale, zero]
        q, dq = f"{name}_act_q{use}", f"{name}_act_dq{use}"
        rw.insert_before(user, helper.make_node("QuantizeLinear", [act, scale.name, zero.name], [q], name=q),
                         helper.make_node("DequantizeLinear", [q, scale.name, zero.name], [dq], name=dq))
        user.input[0] = dq
        done = True
    return done


def quantize_weights(model: onnx.ModelProto, read: Callable[[TensorProto], np.ndarray], dst: Path,
                     plan: dict[str, WeightRule], stats: dict[str, dict] | None = None,
                     activation_scales: dict[str, float] | None = None, half: HalfPlan | None = None) -> dict:
    """Write dst (+ dst.data) from the fp32 graph `model` (parsed without external data; read
    gives each initializer's value; the proto is not changed) with the initializers in `plan`
    quantized. An empty plan writes the graph with every weight as it is.

    stats maps a MatMul input tensor name to {"sq": E[x^2], "abs": E[|x|]} per input channel,
    for the data-aware methods. activation_scales (W8A8) maps a MatMul input to the scale of its
    INT8 activations. half (the fp16 form's plan, made on `model`): the graph is written in fp16,
    its float initializers, scales included, in fp16 unless the plan keeps them fp32.
    Returns {initializer: {"bits", "block", "method", "awq", "activations"}}."""
    model, done = onnx.ModelProto.FromString(model.SerializeToString()), {}
    float_type = TensorProto.FLOAT if half is None else TensorProto.FLOAT16
    with rewriting(model, dst, half) as (rw, consumers):
        for init in model.graph.initializer:
            value = read(init)
            rule = plan.get(init.name)
            if rule is None:
                data_type = init.data_type
                if half is not None and data_type == TensorProto.FLOAT and init.name not in half.fp32_initializers:
                    data_type = TensorProto.FLOAT16
                rw.initializers.append(rw.writer.tensor(init.name, data_type, init.dims,
                                                        np.ascontiguousarray(value, NP_TYPES[data_type]).tobytes()))
                continue
            users = consumers.get(init.name, [])
            if rule.bits == 16:
                half_table(rw, init.name, users, np.asarray(value, np.float32), half is not None)
                done[init.name] = {"bits": 16, "block": None, "method": "fp16", "awq": False, "activations": False}
                continue
            # MatMul(X, W[K, N]) blocks along K (axis 0); Gather(W[V, H], ids) along H (axis 1)
            table = bool(users) and all(u.op_type == "Gather" for u in users)
            matmul_input = next((u.input[0] for u in users if u.op_type == "MatMul"), None)
            layer_stats = stats.get(matmul_input) if stats and matmul_input else None
            inits, dq, input_scale = _quantized(init.name, np.asarray(value, np.float32), rule, layer_stats,
                                                1 if table else 0, rw.writer, float_type)
            rw.initializers += inits
            if table:
                gathered_table(rw, users, inits, rule.block)
            else:
                dequantized_weight(rw, dq)
            if input_scale is not None:
                scaled_inputs(rw, init.name, users, input_scale, float_type)
            activations = (quantized_activations(rw, init.name, users, activation_scales, float_type)
                           if activation_scales else False)
            done[init.name] = {"bits": rule.bits, "block": rule.block, "method": rule.method,
                               "awq": input_scale is not None, "activations": activations}
    return done


def half_precision_cache(path: Path) -> None:
    """The portable decoder with its KV cache in fp16 at the graph's edges (past inputs cast up,
    present outputs cast down; the weights' file is untouched): half the cache memory on a GPU,
    where past and present both live. Cached values round once, when they are made."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    casts = {"past_": [], "present_": []}
    for value in [*g.input, *g.output]:
        prefix = next((p for p in casts if value.name.startswith(p)), None)
        if prefix is None:
            continue
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
        inner = f"{value.name}_fp32"
        for node in g.node:  # the graph computes in fp32 under the new name
            node.input[:] = [inner if i == value.name else i for i in node.input]
            node.output[:] = [inner if o == value.name else o for o in node.output]
        ends = [value.name, inner] if prefix == "past_" else [inner, value.name]
        casts[prefix].append(helper.make_node("Cast", ends[:1], ends[1:], name=f"{value.name}_cast",
                                              to=TensorProto.FLOAT if prefix == "past_" else TensorProto.FLOAT16))
    nodes = casts["past_"] + list(g.node) + casts["present_"]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(path))


def weight_sensitivity(model: onnx.ModelProto, read: Callable[[TensorProto], np.ndarray], plan: dict[str, WeightRule],
                       stats: dict[str, dict] | None = None) -> dict[str, float]:
    """Relative output error of each planned MatMul weight under its rule (round to nearest):
    sum_k h_k |W_k - Q(W)_k|^2 / sum_k h_k |W_k|^2 with h = E[x^2] of the input when known."""
    inputs = {n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    out = {}
    for init in model.graph.initializer:
        rule = plan.get(init.name)
        if rule is None or init.name not in inputs:
            continue
        w = np.asarray(read(init), np.float32)
        h = stats[inputs[init.name]]["sq"] if stats and inputs[init.name] in stats else np.ones(w.shape[0], np.float32)
        q, scale = quantize_blocked(w, rule.bits, rule.block)
        err = (h[:, None] * (w - dequantize_blocked(q, scale, rule.block)) ** 2).sum()
        out[init.name] = float(err / max((h[:, None] * w**2).sum(), 1e-30))
    return out
