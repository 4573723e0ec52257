"""Weight-only quantization of an ONNX graph, streaming: one initializer in memory at a time.

A quantized MatMul weight becomes INT4/INT8 data, fp32 scales and a DequantizeLinear (opset
21, blocked along the input dimension) whose output keeps the weight's name, so consumers are
untouched. TensorRT runs the pattern as is; ONNX Runtime CPU fuses it into MatMulNBits at load.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moss_edge.quantize.weights import awq_quantize, dequantize_blocked, pack_int4, quantize_blocked, search_clip
from moss_edge.runtime.artifact import inside

NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
            TensorProto.INT32: np.int32, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
            TensorProto.BOOL: np.bool_}


@dataclass
class WeightRule:
    bits: int  # 4 or 8
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


def _quantized(name: str, w: np.ndarray, rule: WeightRule, stats: dict | None, axis: int, writer: ExternalWriter):
    """Initializers and nodes replacing weight `name`; axis is the input (blocked) dimension."""
    mat = w if axis == 0 else w.T  # quantize_blocked blocks along rows
    if rule.per_channel:
        rule = WeightRule(rule.bits, mat.shape[0], rule.method, True)
    input_scale = None
    if rule.method == "awq" and stats is not None:
        q, scale, input_scale = awq_quantize(mat, stats["sq"], stats["abs"], rule.bits, rule.block)
    elif rule.method in ("clip", "awq") and stats is not None:
        q, scale = quantize_blocked(mat, rule.bits, rule.block, search_clip(mat, stats["sq"], rule.bits, rule.block))
    else:
        q, scale = quantize_blocked(mat, rule.bits, rule.block)
    if axis == 1:
        q, scale = q.T, scale.T
    q = np.ascontiguousarray(q)
    if rule.per_channel:  # computed as one block of all rows; stored as a per-axis scale [N]
        scale = scale.reshape(-1)
    raw = pack_int4(q) if rule.bits == 4 else q.astype(np.int8).tobytes()
    data_type = TensorProto.INT4 if rule.bits == 4 else TensorProto.INT8
    inits = [writer.tensor(f"{name}_q{rule.bits}", data_type, q.shape, raw),
             writer.tensor(f"{name}_scale", TensorProto.FLOAT, scale.shape, np.ascontiguousarray(scale).tobytes())]
    blocking = {} if rule.per_channel else {"block_size": rule.block}
    node = helper.make_node("DequantizeLinear", [f"{name}_q{rule.bits}", f"{name}_scale"], [name],
                            name=f"{name}_dequantize", axis=1 - axis if rule.per_channel else axis, **blocking)
    return inits, node, input_scale


def quantize_weights(src: Path, dst: Path, plan: dict[str, WeightRule], stats: dict[str, dict] | None = None,
                     activation_scales: dict[str, float] | None = None) -> dict:
    """Write dst (+ dst.data) from src with the initializers in `plan` quantized.

    stats maps a MatMul input tensor name to {"sq": E[x^2], "abs": E[|x|]} per input channel,
    for the data-aware methods. activation_scales (W8A8) maps a MatMul input to the scale of a
    symmetric INT8 QuantizeLinear/DequantizeLinear pair put in front of the MatMul.
    Returns {initializer: {"bits", "block", "method", "awq"}}."""
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    writer = ExternalWriter(dst.parent / f"{dst.name}.data")
    new_inits, new_nodes, done = [], [], {}
    before: dict[int, list[onnx.NodeProto]] = {}  # nodes to insert just before a consumer
    removed: set[int] = set()
    try:
        for init in graph.initializer:
            value = read_initializer(init, src.parent)
            rule = plan.get(init.name)
            if rule is None:
                new_inits.append(writer.tensor(init.name, init.data_type, init.dims, np.ascontiguousarray(value).tobytes()))
                continue
            users = consumers.get(init.name, [])
            # MatMul(X, W[K, N]) blocks along K (axis 0); Gather(W[V, H], ids) along H (axis 1)
            axis = 1 if users and all(u.op_type == "Gather" for u in users) else 0
            matmul_input = next((u.input[0] for u in users if u.op_type == "MatMul"), None)
            layer_stats = stats.get(matmul_input) if stats and matmul_input else None
            inits, dq, input_scale = _quantized(init.name, np.asarray(value, np.float32), rule, layer_stats, axis, writer)
            new_inits += inits
            if axis == 1:  # a table: gather the quantized rows and their scales, dequantize only those
                for user in users:
                    ids = user.input[1]
                    before[id(user)] = [
                        helper.make_node("Gather", [inits[0].name, ids], [f"{user.name}_rows_q"], name=f"{user.name}_q"),
                        helper.make_node("Gather", [inits[1].name, ids], [f"{user.name}_rows_scale"], name=f"{user.name}_s"),
                        helper.make_node("DequantizeLinear", [f"{user.name}_rows_q", f"{user.name}_rows_scale"],
                                         list(user.output), name=f"{user.name}_dq", axis=-1, block_size=rule.block)]
                    removed.add(id(user))
            else:
                new_nodes.append(dq)
            if input_scale is not None:  # x @ W == (x / s) @ (s W): divide the input, once per consumer
                inv = writer.tensor(f"{init.name}_input_scale", TensorProto.FLOAT, input_scale.shape,
                                    (1.0 / input_scale).astype(np.float32).tobytes())
                new_inits.append(inv)
                for user in users:
                    scaled = f"{init.name}_scaled_input"
                    before.setdefault(id(user), []).append(
                        helper.make_node("Mul", [user.input[0], inv.name], [scaled], name=f"{init.name}_awq"))
                    user.input[0] = scaled
            for use, user in enumerate(users):  # a weight can feed several MatMuls (out_proj: taps and output)
                act = user.input[0]
                if user.op_type == "MatMul" and activation_scales and act in activation_scales:
                    scale = writer.tensor(f"{init.name}_act_scale{use}", TensorProto.FLOAT, [],
                                          np.float32(activation_scales[act]).tobytes())
                    zero = writer.tensor(f"{init.name}_act_zero{use}", TensorProto.INT8, [], np.int8(0).tobytes())
                    new_inits += [scale, zero]
                    q, dq = f"{init.name}_act_q{use}", f"{init.name}_act_dq{use}"
                    before.setdefault(id(user), []).extend([
                        helper.make_node("QuantizeLinear", [act, scale.name, zero.name], [q], name=q),
                        helper.make_node("DequantizeLinear", [q, scale.name, zero.name], [dq], name=dq)])
                    user.input[0] = dq
            done[init.name] = {"bits": rule.bits, "block": rule.block, "method": rule.method, "awq": input_scale is not None,
                               "activations": bool(activation_scales and any("_act_dq" in u.input[0] for u in users))}
    finally:
        writer.close()
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    nodes = list(new_nodes)  # DequantizeLinear depends on initializers only: first
    for node in graph.node:
        nodes += before.get(id(node), []) + ([] if id(node) in removed else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
    if writer.offset == 0:
        writer.path.unlink()
    return done


def weight_sensitivity(src: Path, plan: dict[str, WeightRule], stats: dict[str, dict] | None = None) -> dict[str, float]:
    """Relative output error of each planned MatMul weight under its rule (round to nearest):
    sum_k h_k |W_k - Q(W)_k|^2 / sum_k h_k |W_k|^2 with h = E[x^2] of the input when known."""
    model = onnx.load(str(src), load_external_data=False)
    inputs = {n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    out = {}
    for init in model.graph.initializer:
        rule = plan.get(init.name)
        if rule is None or init.name not in inputs:
            continue
        w = np.asarray(read_initializer(init, src.parent), np.float32)
        h = stats[inputs[init.name]]["sq"] if stats and inputs[init.name] in stats else np.ones(w.shape[0], np.float32)
        q, scale = quantize_blocked(w, rule.bits, rule.block)
        err = (h[:, None] * (w - dequantize_blocked(q, scale, rule.block)) ** 2).sum()
        out[init.name] = float(err / max((h[:, None] * w**2).sum(), 1e-30))
    return out
