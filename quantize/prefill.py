"""The prompt graph (decoder_prefill.onnx): the decoder's layers on the CPU's integer GEMM.

A prompt of hundreds or thousands of positions is compute-bound, and ONNX Runtime's u8 x s8
GEMM runs on the CPU's matrix or dot-product units (AMX tiles, AVX-512/AVX VNNI, ARM64 dot
products): at 4B widths, one [419, 2560] x [2560, 9728] product took 10 ms there against 54 ms
for the INT4 MatMulNBits that decodes one token at a time at memory speed. So the artifact
carries each layer weight twice: INT4 for tokens, INT8 for prompts, both sessions writing the
same KV cache buffers.

The INT8 weights are quantized from the source weights (not from the INT4 ones: that would add
the INT4 error to the INT8 one), 7-bit per output column as every dynamic INT8 weight here is,
so CPUs without VNNI compute the same integers. Made instead inside the graph from the INT4
weights at each prompt (DequantizeLinear then QuantizeLinear), one such weight took 550 ms:
at 4B, over a minute per prompt.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from moss_edge.export.config import LanguageConfig
from moss_edge.export.ort_decoder import LAYER, build_ort_decoder
from moss_edge.quantize.dynamic_int8 import INT16_MAX, quantize_seven_bit, worst_pair_sum
from moss_edge.quantize.graph import ExternalWriter
from moss_edge.quantize.plan import GraphPlan
from moss_edge.runtime.graphs import PREFILL_DECODER, Dims

LAYER_MATMULS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FORMAT = {"activations": "uint8 per row (position), symmetric around 128, quantized at run time",
          "weights": "int8 in [-64, 64], per output channel, from the source weights",
          "runs": "prompts of at least MIN_PROMPT_POSITIONS positions (runtime/decoders.py); decoder_ort runs the tokens"}


def write_prefill_decoder(folder: Path, plan: GraphPlan, portable: onnx.ModelProto, d: Dims, lang: LanguageConfig,
                          audio_token: int) -> tuple[onnx.ModelProto, dict]:
    """folder/decoder_prefill.onnx (+ .data) beside the written decoder `portable`: its layer
    weights in INT8, read one at a time from the plan's source; weights the recipe keeps more
    precise stay on the decoder's path. Returns the graph and its format record."""
    sources = {i.name: i for i in plan.model.graph.initializer}
    data = folder / f"{PREFILL_DECODER}.onnx.data"
    writer = ExternalWriter(data)
    integer_weights, protos, left = {}, [], []
    try:
        for i in range(d.num_hidden_layers):
            for matmul in LAYER_MATMULS:
                name = f"{LAYER.format(i)}{matmul}.weight_t"
                if any(k in name for k in plan.recipe.keep):
                    left.append(name)
                    continue
                q, scale = quantize_seven_bit(np.asarray(plan.read(sources[name]), np.float32))
                protos += [writer.tensor(f"{name}_i8", TensorProto.INT8, q.shape, q.tobytes()),
                           writer.tensor(f"{name}_i8_scale", TensorProto.FLOAT, scale.shape, scale.tobytes())]
                integer_weights[name] = (f"{name}_i8", f"{name}_i8_scale")
    finally:
        writer.close()
    model = build_ort_decoder(portable, d, lang, audio_token, integer_weights)
    model.graph.initializer.extend(protos)
    path = folder / f"{PREFILL_DECODER}.onnx"
    onnx.save(model, str(path))
    worst = worst_pair_sum(path)
    if worst > INT16_MAX:  # as for every dynamic INT8 graph: never ship sums that differ between CPUs
        raise RuntimeError(f"{path}: u8 x s8 pair sums reach {worst} > {INT16_MAX}")
    return model, {**FORMAT, "int8_weights": len(integer_weights), "kept_on_decoder_path": left,
                   "worst_u8s8_pair_sum": worst}
