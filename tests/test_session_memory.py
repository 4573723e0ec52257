"""The runtime's memory: ONNX Runtime repacks blocked INT4 weights at load time; the freed
originals must go back to the system, or a loaded artifact holds up to three copies (issue 14)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moss_edge.runtime import session

K = N = 4096
LAYERS = 12  # 12 x 8 MiB of INT4: matrices the size of a 4B layer's
BLOCK = 128

# a fresh process (the peak RSS is per process): load the graph, print the growth of the peak
LOAD = """
import json, sys
def kib(key): return int(open("/proc/self/status").read().split(key + ":")[1].split()[0])
import onnxruntime
from moss_edge.runtime.session import make_session
before = kib("VmRSS")
make_session(sys.argv[1], "cpu", 2)
print(json.dumps({"peak_growth": (kib("VmHWM") - before) * 1024}))
"""


def _int4_chain(path: Path) -> int:
    """LAYERS chained MatMuls on INT4 DequantizeLinear weights (as the decoders store them); the
    weight bytes written."""
    rng = np.random.default_rng(0)
    nodes, weights, x, data = [], [], "x", 0
    for i in range(LAYERS):
        nibbles = rng.integers(0, 256, K * N // 2, dtype=np.uint8)
        q = helper.make_tensor(f"w{i}", TensorProto.INT4, [K, N], nibbles.tobytes(), raw=True)
        scale = numpy_helper.from_array((rng.random((K // BLOCK, N)) * 0.01).astype(np.float32), f"s{i}")
        weights += [q, scale]
        data += nibbles.nbytes + scale.ByteSize()
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"wf{i}"], axis=0, block_size=BLOCK),
                  helper.make_node("MatMul", [x, f"wf{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "int4_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "s", N])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    return data


@pytest.mark.skipif(session._LIBC is None or not Path("/proc/self/status").exists(), reason="needs Linux with glibc")
def test_loading_int4_weights_peaks_near_their_size(tmp_path):
    path = tmp_path / "int4.onnx"
    data = _int4_chain(path)
    out = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
    # measured here: 1.35x (the repacked copy is made before the original is freed); 2.2x
    # without fixing glibc's threshold
    assert growth < 1.6 * data, f"loading {data / 2**20:.0f} MiB of INT4 weights peaked {growth / 2**20:.0f} MiB higher"
