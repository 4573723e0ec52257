"""Write a tiny fp16 two-MatMul ONNX model: a stand-in for our decoder when checking the ModelOpt chain.

    x [batch, seq, 256] fp16 -> MatMul W1 [256, 512] -> Sigmoid -> MatMul W2 [512, 256] -> y fp16

Usage: python tools/modelopt_int4/tiny_fp16_model.py OUT.onnx   (needs only onnx + numpy; opset 21)
"""

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((256, 512)) / 16).astype(np.float16)  # [K, N], as our exporter writes
    w2 = (rng.standard_normal((512, 256)) / 16).astype(np.float16)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/layers.0/fc1/MatMul"),
        helper.make_node("Sigmoid", ["h"], ["a"], name="/layers.0/act/Sigmoid"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="/layers.0/fc2/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "seq", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", 256])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    # IR 10 is what opset 21 came with: readable by every onnxruntime we use (>= 1.20)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    onnx.save(build(), sys.argv[1])
    print(f"wrote {sys.argv[1]}")
