"""The decoder again, for ONNX Runtime's CPU provider: the same weights, run by its contrib ops.

GroupQueryAttention keeps the KV cache in one buffer per layer that is both past and present
(nothing is concatenated or copied per step) and applies the rotary embedding itself;
SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization are the RMSNorms. The
graph is built beside the portable decoder (decoder.onnx, which TensorRT takes) and reads the
same initializers: their protos are copied, so weights stored as external data are shared on
disk, and the nodes that make each weight or the token embedding from them (the quantized
formats' DequantizeLinear and table gathers) are copied as they are.

decoder_ort.onnx  input_ids [1, seq], audio_embeds [1, seq, H], deepstack_embeds [K, 1, seq, H],
                  past_key_i / past_value_i [1, kv, capacity, hd] (a buffer: valid up to the
                  cached length; fp32, or int8 once quantize/kv_cache.py has made it so),
                  seqlens_k [1] int32 (cached + seq - 1), total_sequence_length [] int32 (cached + seq)
                  -> logits [1, vocab], present_key_i / present_value_i (the same buffers, written
                  in place when bound to the same memory)
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moss_edge.export.config import LanguageConfig
from moss_edge.runtime.graphs import CUDA_DECODER, ORT_DECODER, Dims, cache_names

MS = "com.microsoft"
LAYER = "model.language_model.layers.{}."


def write_ort_decoder(folder: Path, portable: onnx.ModelProto, d: Dims, lang: LanguageConfig,
                      audio_token: int) -> onnx.ModelProto | None:
    """folder/decoder_ort.onnx beside the portable decoder, for weight-only decoders (fp32, INT8,
    INT4 through DequantizeLinear); None for one that quantizes activations (dynamic INT8) and
    for head sizes GroupQueryAttention does not take (multiples of 16 only; Qwen3 has 128)."""
    if d.head_dim % 16 or any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger")
                              for n in portable.graph.node):
        return None
    model = build_ort_decoder(portable, d, lang, audio_token)
    onnx.save(model, str(folder / f"{ORT_DECODER}.onnx"))
    return model


def _producers(graph: onnx.GraphProto, wanted: list[str]) -> list[onnx.NodeProto]:
    """The nodes of graph that compute the tensors `wanted`, in graph order."""
    made_by = {out: node for node in graph.node for out in node.output}
    needed, stack = set(), list(wanted)
    while stack:
        node = made_by.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    return [n for n in graph.node if id(n) in needed]


def _rope_caches(d: Dims, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / theta ** (np.arange(0, d.head_dim, 2, dtype=np.float64) / d.head_dim)
    angles = np.arange(d.max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[TensorProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        self.count += 1
        names = [f"{op_type.lower()}_{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{op_type}_{self.count}", domain=domain, **attrs))
        return names

    def const(self, name: str, value: np.ndarray) -> str:
        self.consts.append(numpy_helper.from_array(value, name))
        return name


def write_cuda_decoder(folder: Path, portable: onnx.ModelProto, d: Dims, lang: LanguageConfig,
                       audio_token: int) -> onnx.ModelProto | None:
    """folder/decoder_cuda.onnx (+ .data) beside the fp16 portable decoder: the same builder in
    fp16, its INT4 weights repacked for MatMulNBits (ONNX Runtime CUDA has no DequantizeLinear ->
    MatMul fusion, and its GroupQueryAttention takes fp16 only). None where GQA does not fit."""
    from moss_edge.quantize.graph import ExternalWriter

    if d.head_dim % 16:
        return None
    path = folder / f"{CUDA_DECODER}.onnx"
    writer = ExternalWriter(folder / f"{path.name}.data")
    try:
        packed, tensors = {}, []
        inits = {t.name: t for t in portable.graph.initializer}
        for node in portable.graph.node:
            data = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            if data is None or data.data_type != TensorProto.INT4 or len(data.dims) != 2:
                continue
            block = next(a.i for a in node.attribute if a.name == "block_size")
            q = numpy_helper.to_array(data, str(folder)).astype(np.int8)
            scale = np.asarray(numpy_helper.to_array(inits[node.input[1]], str(folder)), np.float16)
            blob, scales = nbits_layout(q, scale, block)
            weight = node.output[0]
            tensors += [writer.tensor(f"{weight}_nbits", TensorProto.UINT8, blob.shape, blob.tobytes()),
                        writer.tensor(f"{weight}_nbits_scale", TensorProto.FLOAT16, scales.shape, scales.tobytes())]
            packed[weight] = (f"{weight}_nbits", f"{weight}_nbits_scale", *data.dims, block)
    finally:
        writer.close()
    model = build_ort_decoder(portable, d, lang, audio_token, nbits_weights=packed)
    model.graph.initializer.extend(tensors)
    onnx.save(model, str(path))
    return model


def nbits_layout(q: np.ndarray, scale: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric INT4 weight q [K, N] with scales [K/block, N] in MatMulNBits' layout: per
    output column, each block's values as unsigned nibbles (q + 8: the default zero point is 8),
    [N, blocks, block/2] bytes, and the scales [N, blocks]."""
    k, n = q.shape
    blocks = -(-k // block)
    u = np.full((n, blocks * block), 8, np.uint8)  # rows past K (the last block's padding) are zeros
    u[:, :k] = (q.T + 8).astype(np.uint8)
    u = u.reshape(n, blocks, block // 2, 2)
    return np.ascontiguousarray(u[..., 0] | (u[..., 1] << 4)), np.ascontiguousarray(scale.T)


def build_ort_decoder(portable: onnx.ModelProto, d: Dims, lang: LanguageConfig, audio_token: int,
                      integer_weights: dict[str, tuple[str, str]] | None = None,
                      nbits_weights: dict[str, tuple[str, str, int, int, int]] | None = None) -> onnx.ModelProto:
    """The contrib-op decoder reading the weights of `portable` (parsed without external data).

    integer_weights (layer weight -> its INT8 [K, N] and per-column scale initializers) makes the
    prompt graph instead (decoder_prefill): the same inputs and outputs, those layer MatMuls on
    ONNX Runtime's integer GEMM with activations quantized per row at run time, the others (the
    lm_head, weights a recipe keeps more precise) as in `portable`.

    nbits_weights (weight -> its MatMulNBits blob and scales, K, N, block) makes the GPU decoder
    (decoder_cuda) from an fp16 `portable`: fp16 inputs, cache and activations, those weights
    run by MatMulNBits, the logits cast to fp32."""
    half = nbits_weights is not None
    float_type = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    rms_eps = lang.rms_norm_eps
    g = portable.graph
    audio_where = next(n for n in g.node if n.op_type == "Where" and "audio_embeds" in n.input)
    token_embedding = audio_where.input[2]
    layer_weights = [[f"{LAYER.format(i)}{w}" for w in (
        "input_layernorm.weight", "self_attn.q_proj.weight_t", "self_attn.k_proj.weight_t", "self_attn.v_proj.weight_t",
        "self_attn.q_norm.weight", "self_attn.k_norm.weight", "self_attn.o_proj.weight_t",
        "post_attention_layernorm.weight", "mlp.gate_proj.weight_t", "mlp.up_proj.weight_t", "mlp.down_proj.weight_t")]
        for i in range(d.num_hidden_layers)]
    final_norm, lm_head = "model.language_model.norm.weight", "model.lm_head.weight_t"
    integer_weights = integer_weights or {}

    b = _Builder()
    initializers = {t.name for t in g.initializer}
    quantized_rows: dict[str, tuple[str, str]] = {}  # activation -> (its uint8 rows, their scales): once per input

    def matmul(x: str, w: str) -> str:
        """x @ w; AWQ stores w scaled by s per input channel and divides x by s first."""
        if w in integer_weights:
            return integer_matmul(x, *integer_weights[w])
        if f"{w}_input_scale" in initializers:
            x = b.op("Mul", [x, f"{w}_input_scale"])[0]
        if w in (nbits_weights or {}):
            blob, scales, k, n, block = nbits_weights[w]
            return b.op("MatMulNBits", [x, blob, scales], domain=MS, K=k, N=n, bits=4, block_size=block)[0]
        return b.op("MatMul", [x, w])[0]

    def integer_matmul(x: str, wq: str, w_scale: str) -> str:
        """x @ w as u8 x s8 -> int32, rescaled: each row of x (a position) gets its own scale,
        so one position with outlying activations does not cost every other one its precision.
        The rows are symmetric around the zero point 128, within [1, 255]: with 7-bit weights no
        u8 x s8 pair sum leaves int16, so CPUs without VNNI compute the same integers."""
        if x not in quantized_rows:
            peak = b.op("ReduceMax", [b.op("Abs", [x])[0], axis_last], keepdims=1)[0]
            scale = b.op("Div", [b.op("Max", [peak, tiny])[0], int8_range])[0]
            rows = b.op("QuantizeLinear", [b.op("Div", [x, scale])[0], unit_scale, centre])[0]
            quantized_rows[x] = rows, scale
        rows, scale = quantized_rows[x]
        # the column scales are applied inside the GEMM's output loop; the row scales after it
        product = b.op("MatMulIntegerToFloat", [rows, wq, unit_scale, w_scale, centre], domain=MS)[0]
        return b.op("Mul", [product, scale])[0]

    cos, sin = _rope_caches(d, lang.rope_theta)  # computed in fp32 (float64 here), stored in the graph's type once
    b.const("rope_cos", cos.astype(np.float16) if half else cos)
    b.const("rope_sin", sin.astype(np.float16) if half else sin)
    audio_id = b.const("audio_token_id", np.array(audio_token, np.int64))
    axis_last = b.const("axis_last", np.array([-1], np.int64))
    heads_shape = b.const("q_heads_shape", np.array([0, 0, -1, d.head_dim], np.int64))
    flat_shape = b.const("flat_shape", np.array([0, 0, -1], np.int64))
    last_index = b.const("last_position", np.array(-1, np.int64))
    last_span = b.const("last_span", np.array([-1], np.int64))

    def last_position(t: str) -> str:
        """[1, seq, n] -> [1, 1, n]: still 3-D, so that ONNX Runtime does not turn a 2-D MatMul
        and the residual Add after it into a Gemm, which takes no INT4 weights (MatMulNBits)."""
        return b.op("Gather", [t, last_span], axis=1)[0]

    if integer_weights:
        tiny = b.const("row_scale_floor", np.array(1e-30, np.float32))
        int8_range = b.const("int8_range", np.array(127, np.float32))
        unit_scale = b.const("unit_scale", np.array(1, np.float32))
        centre = b.const("row_zero_point", np.array(128, np.uint8))
    is_audio = b.op("Unsqueeze", [b.op("Equal", ["input_ids", audio_id])[0], axis_last])[0]
    x = b.op("Where", [is_audio, "audio_embeds", token_embedding])[0]
    for i, (w_in, wq, wk, wv, wqn, wkn, wo, w_post, wg, wu, wd) in enumerate(layer_weights):
        h = b.op("SimplifiedLayerNormalization", [x, w_in], axis=-1, epsilon=rms_eps)[0]

        def head_norm(t: str, w: str) -> str:  # RMSNorm over each head's dims, as Qwen3 does before rotary
            per_head = b.op("Reshape", [t, heads_shape])[0]
            normed = b.op("SimplifiedLayerNormalization", [per_head, w], axis=-1, epsilon=rms_eps)[0]
            return b.op("Reshape", [normed, flat_shape])[0]

        q = head_norm(matmul(h, wq), wqn)
        k = head_norm(matmul(h, wk), wkn)
        v = matmul(h, wv)
        past_k, past_v = cache_names(d, "past")[2 * i : 2 * i + 2]
        present_k, present_v = cache_names(d, "present")[2 * i : 2 * i + 2]
        b.nodes.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, past_k, past_v, "seqlens_k", "total_sequence_length", "rope_cos", "rope_sin"],
            [f"attention_{i}", present_k, present_v], name=f"GroupQueryAttention_{i}", domain=MS,
            num_heads=lang.num_attention_heads, kv_num_heads=d.num_key_value_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(d.head_dim) ** -0.5))
        attention, final = f"attention_{i}", i == d.num_hidden_layers - 1
        if final:  # past the last layer's attention only the last position counts: its logits are the output
            x, attention = last_position(x), last_position(attention)
        x = b.op("Add", [x, matmul(attention, wo)])[0]
        h = b.op("SimplifiedLayerNormalization", [x, w_post], axis=-1, epsilon=rms_eps)[0]
        gate = matmul(h, wg)
        silu = b.op("Mul", [gate, b.op("Sigmoid", [gate])[0]])[0]
        x = b.op("Add", [x, matmul(b.op("Mul", [silu, matmul(h, wu)])[0], wd)])[0]
        if i < d.num_deepstack:
            index = b.const(f"deepstack_index_{i}", np.array(i, np.int64))
            injected = b.op("Gather", ["deepstack_embeds", index], axis=0)[0]
            x = b.op("Add", [x, last_position(injected) if final else injected])[0]
    last = b.op("Gather", [x, last_index], axis=1)[0]  # [1, 1, H] -> [1, H]
    normed = b.op("SimplifiedLayerNormalization", [last, final_norm], axis=-1, epsilon=rms_eps)[0]
    b.nodes.append(helper.make_node("Cast" if half else "Identity", [matmul(normed, lm_head)], ["logits"], name="logits",
                                    **({"to": TensorProto.FLOAT} if half else {})))

    h, kv = d.hidden_size, d.num_key_value_heads
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
              helper.make_tensor_value_info("audio_embeds", float_type, [1, "seq", h]),
              helper.make_tensor_value_info("deepstack_embeds", float_type, [d.num_deepstack, 1, "seq", h]),
              *[helper.make_tensor_value_info(n, float_type, [1, kv, "capacity", d.head_dim])
                for n in cache_names(d, "past")],
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, d.vocab_size]),
               *[helper.make_tensor_value_info(n, float_type, [1, kv, "capacity", d.head_dim])
                 for n in cache_names(d, "present")]]
    # the nodes that make the weights used (DequantizeLinear, the table's gather), copied as they are
    made_here = {o for n in b.nodes for o in n.output}
    copied = _producers(g, sorted({i for n in b.nodes for i in n.input} - made_here))
    used = {i for n in [*copied, *b.nodes] for i in n.input}
    name = "moss_audio_decoder_prefill" if integer_weights else "moss_audio_decoder_cuda" if half else "moss_audio_decoder_ort"
    graph = helper.make_graph([*copied, *b.nodes], name,
                              inputs, outputs, [t for t in g.initializer if t.name in used] + b.consts)
    opsets = [helper.make_opsetid("", max(o.version for o in portable.opset_import if o.domain in ("", "ai.onnx"))),
              helper.make_opsetid(MS, 1)]
    # the portable graph's IR version, not onnx's newest: onnxruntime reads IR versions up to the one
    # of its own release (1.20: 10), and these graphs need nothing newer than the opset they import
    return helper.make_model(graph, opset_imports=opsets, producer_name="moss-audio-edge", ir_version=portable.ir_version)
