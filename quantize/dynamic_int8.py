"""Dynamic INT8 (MatMulInteger with activations quantized at run time), accurate on every CPU.

ONNX Runtime runs u8 activations x s8 weights. x86 kernels without VNNI (AVX2, AVX-512 before
Cascade Lake) multiply with vpmaddubsw, which adds adjacent products in 16 bits and saturates:
with full-range weights one pair can reach 255 * (127 + 128) = 65025 > 32767. VNNI and ARM64
kernels accumulate in 32 bits, so the same artifact gave cosine 0.9999 on one machine and
0.96 on another. Weights in the 7-bit range [-64, 64] keep every pair within 255 * 128 = 32640,
so all kernels compute the same exact integer sums.

Measured (fixture and packaged model encoders, three real recordings, cosine vs fp32; AVX2
path run under qemu -cpu Haswell): full-range s8 0.9999 with VNNI / 0.963 on AVX2; 7-bit s8
0.99979 on both; u8 weights 0.99992 on both but 2.3x slower at 4B widths on VNNI x86
(u8 x u8 has no VNNI kernel). 7-bit s8 costs nothing in speed anywhere.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moss_edge.quantize.conv_im2col import convolutions_as_matmuls, im2col_pads
from moss_edge.quantize.graph import Rewrite, read_initializer, rewriting

INT16_MAX = 32767
FORMAT = {"activations": "uint8, per tensor, quantized at run time", "weights": "int8 in [-64, 64], per output channel",
          "why": "u8 x s8 pair sums stay within int16, so AVX2 kernels without VNNI do not saturate"}


def quantize_dynamic_int8(model: onnx.ModelProto, read: Callable[[TensorProto], np.ndarray], dst: Path,
                          keep: frozenset[str] = frozenset()) -> dict:
    """Write dst (+ dst.data) from the fp32 graph `model` (parsed without its weights; read gives
    each initializer's value, one at a time): every MatMul on a constant 2-D weight becomes
    dynamic INT8 with 7-bit weights per output channel (but the weights named in keep, which stay
    fp32), after the stem's convolutions become MatMuls. The nodes are the pattern ONNX Runtime
    fuses into DynamicQuantizeMatMul. Returns the format record for the manifest, with the worst
    pair sum measured on dst."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    rewritten = convolutions_as_matmuls(model, read)  # the stem's convolutions become INT8 MatMuls too
    activations: dict[str, tuple[str, str, str]] = {}  # MatMul input -> its quantized (x, scale, zero point)
    with rewriting(model, dst) as (rw, consumers):
        for columns, pad in im2col_pads(model).items():
            activations[columns] = quantized_before_im2col(rw, pad, columns)
        for init in model.graph.initializer:
            value = read(init)
            users = [u for u in consumers.get(init.name, []) if u.op_type == "MatMul" and u.input[1] == init.name]
            if len(init.dims) != 2 or not users or init.name in keep:
                rw.initializers.append(rw.writer.tensor(init.name, init.data_type, init.dims,
                                                        np.ascontiguousarray(value).tobytes()))
                continue
            q, scale = quantize_seven_bit(np.asarray(value, np.float32))
            rw.initializers += [rw.writer.tensor(f"{init.name}_quantized", TensorProto.INT8, q.shape, q.tobytes()),
                                rw.writer.tensor(f"{init.name}_scale", TensorProto.FLOAT, scale.shape, scale.tobytes()),
                                rw.writer.tensor(f"{init.name}_zero_point", TensorProto.INT8, scale.shape,
                                                 np.zeros(scale.shape, np.int8).tobytes())]
            for user in users:
                integer_matmul(rw, init.name, user, activations)
    worst = worst_pair_sum(dst)
    if worst > INT16_MAX:  # never ship a graph whose sums differ between CPUs
        raise RuntimeError(f"{dst}: u8 x s8 pair sums reach {worst} > {INT16_MAX}; the INT8 format is not CPU-independent")
    return {**FORMAT, "worst_u8s8_pair_sum": worst, "convolutions_as_matmuls": rewritten}


def quantize_seven_bit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> (q int8 in [-64, 64], scale [N]): symmetric, one scale per output column."""
    scale = (np.abs(w).max(axis=0) / 64).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    for c in range(0, w.shape[1], 8192):  # bounded temporaries for wide weights
        q[:, c:c + 8192] = np.clip(np.rint(w[:, c:c + 8192] / scale[c:c + 8192]), -64, 64)
    return q, scale


def quantized_before_im2col(rw: Rewrite, pad: onnx.NodeProto, columns: str) -> tuple[str, str, str]:
    """An im2col's columns are the padded input's values and zeros, and DynamicQuantizeLinear's
    range always takes in 0: quantizing the input and padding with its zero point gives the very
    integers that quantizing the columns gives, with a quarter of the bytes padded, sliced and
    concatenated (those copies were ~40% of the stem's time at 4B widths). The columns become
    uint8, the MatMul's quantized input."""
    x = pad.input[0]
    quantized, scale, zero_point = f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"
    rw.insert_before(pad, helper.make_node("DynamicQuantizeLinear", [x], [quantized, scale, zero_point],
                                           name=f"{x}_quantize"))
    pad.input[0] = quantized
    pad.input.append(zero_point)  # Pad's constant_value: the zero point stands for 0.0 exactly
    return columns, scale, zero_point


def integer_matmul(rw: Rewrite, weight: str, user: onnx.NodeProto, activations: dict) -> None:
    """MatMul(x, W) -> DynamicQuantizeLinear(x) (once per x), MatMulInteger, Cast, and the two
    scales multiplied in: y = float(x_q W_q) * (x_scale * w_scale)."""
    x = user.input[0]
    if x not in activations:
        activations[x] = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
        rw.insert_before(user, helper.make_node("DynamicQuantizeLinear", [x], list(activations[x]), name=f"{x}_quantize"))
    xq, xs, xz = activations[x]
    p = user.name or user.output[0]
    rw.insert_before(user,
                     helper.make_node("Mul", [xs, f"{weight}_scale"], [f"{p}_scale"], name=f"{p}_scale"),
                     helper.make_node("MatMulInteger", [xq, f"{weight}_quantized", xz, f"{weight}_zero_point"],
                                      [f"{p}_integer"], name=f"{p}_integer"),
                     helper.make_node("Cast", [f"{p}_integer"], [f"{p}_float"], name=f"{p}_cast", to=TensorProto.FLOAT),
                     helper.make_node("Mul", [f"{p}_float", f"{p}_scale"], list(user.output), name=f"{p}_rescale"))
    rw.removed.add(id(user))


INTEGER_MATMULS = ("MatMulInteger", "MatMulIntegerToFloat")  # the latter: the prompt graph's, scales applied inside
ZERO_POINT_INPUTS = {"MatMulInteger": (2, 3), "MatMulIntegerToFloat": (4, 5)}


def _integer_weights(model: onnx.ModelProto, root: Path):
    """(node index, node, weight [K, N]) of every integer MatMul whose second input is a constant."""
    inits = {i.name: i for i in model.graph.initializer}
    for index, node in enumerate(model.graph.node):
        if node.op_type in INTEGER_MATMULS and node.input[1] in inits:
            yield index, node, np.asarray(read_initializer(inits[node.input[1]], root))


def worst_pair_sum(graph: Path) -> int:
    """The largest 255 * (|w[2k, n]| + |w[2k+1, n]|) over the graph's s8 MatMulInteger weights:
    what a vpmaddubsw pair can reach. 0 when no weight is s8."""
    model = onnx.load(str(graph), load_external_data=False)
    worst = 0
    for _, _, w in _integer_weights(model, graph.parent):
        if w.dtype != np.int8:
            continue
        mag = np.abs(w.astype(np.int32))
        if mag.shape[0] % 2:
            mag = np.concatenate([mag, np.zeros((1, mag.shape[1]), np.int32)])
        worst = max(worst, 255 * int((mag[0::2] + mag[1::2]).max()))
    return worst


def emulate_pair_saturation(model: onnx.ModelProto, root: Path) -> onnx.ModelProto:
    """A copy of a dynamic-INT8 graph whose integer MatMuls compute what x86 kernels without
    VNNI compute: u8 x s8 products added in adjacent pairs, saturated to int16, then summed
    in int32 (zero points corrected afterwards, as the kernels do). Any machine then measures
    a format's accuracy on such CPUs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    replaced = {}
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("emu_zero", [0]), ("emu_one", [1]), ("emu_end", [1 << 62]), ("emu_step", [2]), ("emu_last", [-1]),
               ("emu_pairs", [-2]))]
    consts += [numpy_helper.from_array(np.int32(v), n) for n, v in (("emu_lo", -INT16_MAX - 1), ("emu_hi", INT16_MAX))]
    for index, node, w in _integer_weights(model, root):
        if w.dtype != np.int8:
            continue
        if w.shape[0] % 2:
            raise ValueError(f"{node.name}: odd input size {w.shape[0]}")
        p = node.output[0] + "_emu"
        w32 = w.astype(np.int32)
        consts += [numpy_helper.from_array(w32[0::2], f"{p}_w_even"), numpy_helper.from_array(w32[1::2], f"{p}_w_odd"),
                   numpy_helper.from_array(w32.sum(axis=0, dtype=np.int32), f"{p}_w_colsum"),
                   numpy_helper.from_array(np.int32(w.shape[0]), f"{p}_k")]
        a_at, b_at = ZERO_POINT_INPUTS[node.op_type]
        a, a_zp = node.input[0], node.input[a_at] if len(node.input) > a_at and node.input[a_at] else None
        b_zp = node.input[b_at] if len(node.input) > b_at and node.input[b_at] else None
        nodes = [helper.make_node("Cast", [a], [f"{p}_a"], to=TensorProto.INT32),
                 helper.make_node("Slice", [f"{p}_a", "emu_zero", "emu_end", "emu_last", "emu_step"], [f"{p}_a_even"]),
                 helper.make_node("Slice", [f"{p}_a", "emu_one", "emu_end", "emu_last", "emu_step"], [f"{p}_a_odd"]),
                 helper.make_node("Unsqueeze", [f"{p}_a_even", "emu_last"], [f"{p}_a_even3"]),
                 helper.make_node("Unsqueeze", [f"{p}_a_odd", "emu_last"], [f"{p}_a_odd3"]),
                 helper.make_node("Mul", [f"{p}_a_even3", f"{p}_w_even"], [f"{p}_even"]),
                 helper.make_node("Mul", [f"{p}_a_odd3", f"{p}_w_odd"], [f"{p}_odd"]),
                 helper.make_node("Add", [f"{p}_even", f"{p}_odd"], [f"{p}_pair"]),
                 helper.make_node("Clip", [f"{p}_pair", "emu_lo", "emu_hi"], [f"{p}_sat"]),
                 helper.make_node("ReduceSum", [f"{p}_sat", "emu_pairs"], [f"{p}_sum"], keepdims=0)]
        total = f"{p}_sum"
        if a_zp:  # - a_zp * sum_k w[k, n]
            nodes += [helper.make_node("Cast", [a_zp], [f"{p}_azp"], to=TensorProto.INT32),
                      helper.make_node("Mul", [f"{p}_azp", f"{p}_w_colsum"], [f"{p}_acorr"]),
                      helper.make_node("Sub", [total, f"{p}_acorr"], [f"{p}_t1"])]
            total = f"{p}_t1"
        if b_zp:  # - b_zp[n] * sum_k a[k] + K * a_zp * b_zp[n]
            nodes += [helper.make_node("Cast", [b_zp], [f"{p}_bzp"], to=TensorProto.INT32),
                      helper.make_node("ReduceSum", [f"{p}_a", "emu_last"], [f"{p}_arow"], keepdims=1),
                      helper.make_node("Mul", [f"{p}_arow", f"{p}_bzp"], [f"{p}_bcorr"]),
                      helper.make_node("Sub", [total, f"{p}_bcorr"], [f"{p}_t2"])]
            total = f"{p}_t2"
            if a_zp:
                nodes += [helper.make_node("Mul", [f"{p}_azp", f"{p}_bzp"], [f"{p}_zz"]),
                          helper.make_node("Mul", [f"{p}_zz", f"{p}_k"], [f"{p}_kzz"]),
                          helper.make_node("Add", [total, f"{p}_kzz"], [f"{p}_t3"])]
                total = f"{p}_t3"
        if node.op_type == "MatMulIntegerToFloat":  # float(sum) * a_scale * b_scale (+ bias)
            nodes += [helper.make_node("Cast", [total], [f"{p}_float"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"{p}_float", node.input[2]], [f"{p}_a_scaled"]),
                      helper.make_node("Mul", [f"{p}_a_scaled", node.input[3]], [f"{p}_scaled"])]
            total = f"{p}_scaled"
            if len(node.input) > 6 and node.input[6]:
                nodes.append(helper.make_node("Add", [total, node.input[6]], [f"{p}_biased"]))
                total = f"{p}_biased"
        nodes.append(helper.make_node("Identity", [total], [node.output[0]]))
        replaced[index] = nodes
    kept = []
    for index, node in enumerate(graph.node):  # copies: a cleared repeated field takes its nodes along
        kept += replaced.get(index, [onnx.NodeProto.FromString(node.SerializeToString())])
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(consts)
    return model
