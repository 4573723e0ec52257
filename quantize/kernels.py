"""What ONNX Runtime CPU actually runs after its load-time fusions."""

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

from moss_edge.runtime.session import PROVIDERS


def cpu_kernels(graph: Path) -> dict:
    """Op counts of the graph as ORT CPU optimizes it at load: quantized weights should show up
    as MatMulNBits (or MatMulInteger for dynamic INT8), not as whole weights dequantized at run
    time (a DequantizeLinear on gathered embedding rows is intended and not counted)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        opts.log_severity_level = 3
        ort.InferenceSession(str(graph), opts, providers=PROVIDERS["cpu"])
        model = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    inits = {i.name for i in model.graph.initializer}
    weight_dq = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    float_weights = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    float_matmuls = sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in float_weights)
    integer = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")  # MatMulInteger as fused, or not
    return {"MatMulNBits": ops.get("MatMulNBits", 0), "MatMulInteger": sum(ops.get(op, 0) for op in integer),
            "GatherBlockQuantized": ops.get("GatherBlockQuantized", 0),
            "dequantized_weights": weight_dq, "fp32_weight_matmuls": float_matmuls}
