"""What each target takes, as data: the ops its ONNX parser or execution provider has, and one
row per further rule, each with its source. backend_check.py walks graphs against this table.

Verdicts: "rejected" (the parser or provider refuses the graph), "elsewhere" (ONNX Runtime runs
the node on the CPU instead, with copies either side), "warning" (builds, but outside what the
target documents)."""

from dataclasses import dataclass

ONNX_TRT_10_1_DOCS = "onnx-tensorrt release/10.1-GA docs/operators.md"
ONNX_TRT_10_15_DOCS = "onnx-tensorrt 10.15 docs/operators.md"
TRT_QUANT_DOCS = ("TensorRT 10 developer guide, 'Working with Quantized Types' (INT4 weight-only: 2-D constant "
                  "weights, one blocked axis, block size from the scale's shape; NvInfer.h IDequantizeLayer)")
ORT_CUDA_KERNELS = "onnxruntime docs/OperatorKernels.md, CUDAExecutionProvider section"

# ops the parser imports (rows marked Y), TensorRT 10.0-10.13; JetPack 6 ships 10.3. The parser
# imports by op type at any opset >= 7, so an op's absence, not the opset number, is what rejects.
TRT_10_1_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split())
# added by 10.15 (opset 23's fused attention and norms; Attention itself since 10.14)
TRT_10_15_OPS = TRT_10_1_OPS | {"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter", "BlackmanWindow",
                                "HammingWindow", "HannWindow", "STFT"}
# tensor types TensorRT 10 takes (UINT8 only at the network's edges); anything else is rejected
TRT_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT32", "INT64", "INT8", "INT4", "UINT8", "BOOL",
                       "FLOAT8E4M3FN"})


@dataclass(frozen=True)
class Target:
    name: str
    provider: str  # the runtime's provider this target decides ("cpu", "cuda", "tensorrt")
    ops: frozenset | None  # the parser's op types (TensorRT); None: ONNX Runtime kernels decide
    ops_source: str
    trt_version: tuple[int, int] | None = None


TARGETS = {
    "tensorrt-10.3": Target("tensorrt-10.3", "tensorrt", TRT_10_1_OPS, ONNX_TRT_10_1_DOCS, (10, 3)),
    "tensorrt-10.16": Target("tensorrt-10.16", "tensorrt", TRT_10_15_OPS, ONNX_TRT_10_15_DOCS, (10, 16)),
    "ort-cuda": Target("ort-cuda", "cuda", None, ORT_CUDA_KERNELS),
    "ort-cpu": Target("ort-cpu", "cpu", None, "the installed onnxruntime's kernel registry (get_all_opkernel_def)"),
}

# ONNX Runtime CUDA: ops in our graphs with no CUDA kernel for the types we use; they run on the CPU
ORT_CUDA_ELSEWHERE = {
    "DynamicQuantizeLinear": "no CUDA kernel (CPU only)",
    "DynamicQuantizeMatMul": "no CUDA kernel (CPU only)",
    "MatMulIntegerToFloat": "no CUDA kernel (CPU only)",
    "MatMulInteger": "the CUDA kernel takes int8 x int8 only; dynamic INT8 feeds uint8 activations",
}
# ...and the float types of the CUDA kernels of the ops our graphs use (their main type
# constraint: MatMulNBits' A, DequantizeLinear's scales), from ORT_CUDA_KERNELS at
# onnxruntime commit 001d12d2623fd411ce0f83d05abb5e82304a3389; a node given another type runs on the CPU
_ALL = {"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"}
_NO_BF16 = {"FLOAT", "FLOAT16", "DOUBLE"}
ORT_CUDA_TYPES = {
    **{op: _ALL for op in ("Add", "Mul", "Sub", "Div", "Neg", "Sigmoid", "MatMul", "Gather", "Where", "Unsqueeze",
                           "Reshape", "Identity", "Concat", "Slice", "Transpose", "Expand", "Softmax",
                           "LayerNormalization", "Conv", "Gelu", "Erf", "Pow", "Sqrt", "Squeeze", "Split",
                           "SimplifiedLayerNormalization")},
    **{op: _NO_BF16 for op in ("Equal", "Clip", "ReduceMean", "Reciprocal", "Cos", "Sin", "LessOrEqual", "Less",
                               "Floor")},
    "Range": {"FLOAT", "DOUBLE"}, "DequantizeLinear": {"FLOAT", "FLOAT16"},
    **{op: {"FLOAT", "FLOAT16", "BFLOAT16"} for op in ("MatMulNBits", "SkipSimplifiedLayerNormalization",
                                                        "RotaryEmbedding")},
    "GroupQueryAttention": {"FLOAT16", "BFLOAT16"},
}
EDGE_LLM_INT4 = ("TensorRT Edge-LLM linear layers and ModelOpt's ONNX INT4 export: fp16 activations, INT4 weight [K, N] "
                 "with fp16 scales [K/block, N] into DequantizeLinear -> MatMul input B, deployed with "
                 "`trtexec --fp16 --int4`; TensorRT's ONNX parser gives a DequantizeLinear the type of its scales")


@dataclass(frozen=True)
class Rule:
    """A constraint beyond the op's presence: `check` (in backend_check.CHECKS) names the test
    that returns why a node breaks it, or None."""

    id: str
    targets: tuple[str, ...]
    op: str
    check: str
    verdict: str
    source: str


TRT = ("tensorrt-10.3", "tensorrt-10.16")
RULES = (
    Rule("scatternd-reduction-attribute", ("tensorrt-10.3",), "ScatterND", "has_reduction_attribute", "rejected",
         "onnx-tensorrt 10.1 operators.md: 'reduction is not supported' (any value, even the exporter's "
         "reduction=\"none\"; accepted from 10.9)"),
    Rule("scatternd-reduction", ("tensorrt-10.16",), "ScatterND", "reduces", "rejected",
         "onnx-tensorrt 10.15 operators.md: reduction other than none is not supported"),
    Rule("cumsum-axis-constant", TRT, "CumSum", "axis_not_constant", "rejected",
         "onnx-tensorrt operators.md: CumSum axis must be an initializer / build-time constant"),
    Rule("layernorm-first-output", TRT, "LayerNormalization", "uses_extra_outputs", "rejected",
         "onnx-tensorrt operators.md: LayerNormalization, only the first output Y is supported"),
    Rule("gelu-approximate", TRT, "Gelu", "gelu_approximation_unknown", "rejected",
         "onnx-tensorrt Gelu importer: approximate must be none or tanh"),
    Rule("gather-quantized-table", TRT, "Gather", "gathers_quantized_table", "rejected",
         "onnx-tensorrt operators.md: Gather takes FP32, FP16, BF16, INT32, INT64, BOOL; INT8/INT4 are quantized types, "
         "reachable only through DequantizeLinear of a constant"),
    Rule("dq-zero-point", TRT, "DequantizeLinear", "nonzero_zero_point", "rejected",
         "onnx-tensorrt operators.md: DequantizeLinear x_zero_point must be zero"),
    Rule("dq-4bit-weight", TRT, "DequantizeLinear", "int4_weight_unsupported", "rejected", TRT_QUANT_DOCS),
    Rule("dq-4bit-block", TRT, "DequantizeLinear", "int4_block_undocumented", "warning",
         TRT_QUANT_DOCS + "; documented block sizes 64 and 128"),
    Rule("int4-fp32-activations", TRT, "DequantizeLinear", "int4_in_fp32", "warning",
         EDGE_LLM_INT4 + ": fp32 scales make an fp32 weight and an fp32 GEMM, with no fused INT4 kernel documented "
         "for it (the engine may hold the weight dequantized)"),
    Rule("dq-mixed-types-orin", ("tensorrt-10.3",), "DequantizeLinear", "scale_type_differs", "rejected",
         "NVIDIA/TensorRT issue 4832: on Orin (SM 8.7) the builder rejects a DequantizeLinear whose scales' type "
         "differs from the data it multiplies (fp32 data, fp16 scales)"),
    Rule("dq-mixed-types", ("tensorrt-10.16",), "DequantizeLinear", "scale_type_differs", "warning",
         "NVIDIA/TensorRT issue 4832: builds on newer GPUs, rejected on Orin"),
    Rule("int4-into-matmul-b", TRT, "DequantizeLinear", "int4_not_matmul_b", "warning", EDGE_LLM_INT4),
    Rule("int4-weight-shape", TRT, "DequantizeLinear", "int4_shape_unfused", "warning",
         EDGE_LLM_INT4 + "; their INT4 kernels take N even and K a multiple of the block"),
    Rule("dq-int8-weight-only", TRT, "DequantizeLinear", "int8_weight_only", "warning",
         "TensorRT 10.11 developer guide, 'Working with Quantized Types': 'TensorRT quantizes activations and "
         "weights for INT8, FP8, and FP4. Weight-only quantization is supported for INT4': an INT8 weight without "
         "a quantized activation is outside it (the engine may keep it dequantized, in fp32)"),
)
