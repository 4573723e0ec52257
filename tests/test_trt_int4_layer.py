"""benchmarks/trt_int4_layer.py without TensorRT: its graphs, verdict, report and exits."""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trt_int4_layer.py"
K, N, BLOCK = 256, 512, 128


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("trt_int4_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inits(model):
    return {t.name: t for t in model.graph.initializer}


def _reference_w(bench):
    q, scale = bench.quantized_weight(K, N, BLOCK)
    return q, scale, q.astype(np.float64) * np.repeat(scale.astype(np.float64), BLOCK, axis=0)


def test_graphs_are_valid_with_the_right_dtypes(bench):
    dtypes = {"int4-fp16": TensorProto.FLOAT16, "int4-fp32": TensorProto.FLOAT, "fp16-dense": TensorProto.FLOAT16}
    for variant, elem in dtypes.items():
        model = bench.layer_graph(variant, K, N, BLOCK)
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 21 and model.ir_version == 10
        assert model.graph.input[0].type.tensor_type.elem_type == elem
        assert model.graph.output[0].type.tensor_type.elem_type == elem
        inits, ops = _inits(model), [n.op_type for n in model.graph.node]
        if variant == "fp16-dense":
            assert ops == ["MatMul"] and inits["w"].data_type == TensorProto.FLOAT16
        else:
            assert ops == ["DequantizeLinear", "MatMul"]
            assert inits["w_q"].data_type == TensorProto.INT4 and list(inits["w_q"].dims) == [K, N]
            assert inits["w_scale"].data_type == elem and list(inits["w_scale"].dims) == [K // BLOCK, N]
            dq = model.graph.node[0]
            assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": BLOCK}
            assert model.graph.node[1].input[1] == dq.output[0]  # DQ feeds MatMul's B directly


def test_int4_weights_round_trip(bench):
    q, scale, _ = _reference_w(bench)
    assert q.min() >= -8 and q.max() <= 7 and q.min() < -4 and q.max() > 4  # the range is used
    inits = _inits(bench.layer_graph("int4-fp32", K, N, BLOCK))
    np.testing.assert_array_equal(numpy_helper.to_array(inits["w_q"]).astype(np.int8), q)
    np.testing.assert_array_equal(numpy_helper.to_array(inits["w_scale"]), scale)


def test_fp32_graph_runs_on_onnxruntime(bench):
    _, _, w = _reference_w(bench)
    model = bench.layer_graph("int4-fp32", K, N, BLOCK)
    np.testing.assert_allclose(bench.dequantized_weight(model), w, rtol=1e-12)
    x = np.random.default_rng(3).standard_normal((1, 5, K)).astype(np.float32)
    # the graph as ONNX defines it: ORT's fusion into MatMulNBits may quantize x to int8 (~1e-2 off)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ w
    assert y.shape == (1, 5, N) and y.dtype == np.float32
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


def test_dense_baseline_holds_the_same_weights(bench):
    _, _, w = _reference_w(bench)
    dense = bench.dequantized_weight(bench.layer_graph("fp16-dense", K, N, BLOCK))
    np.testing.assert_allclose(dense, w, rtol=1e-3, atol=1e-6)  # w rounded to fp16


def test_verdict(bench):
    k, n, block = 4096, 12288, 128
    sizes = bench.weight_bytes(k, n, block)
    assert sizes == {"int4_bytes": k * n // 2 + 32 * n * 2, "fp16_bytes": 2 * k * n}
    assert bench.verdict(int(sizes["int4_bytes"] * 1.05), k, n, block) == "weights kept INT4 (fused)"
    assert bench.verdict(int(sizes["fp16_bytes"] * 0.39), k, n, block) == "weights kept INT4 (fused)"
    assert bench.verdict(int(sizes["fp16_bytes"] * 0.41), k, n, block).startswith("weights held dequantized")
    assert bench.verdict(int(sizes["fp16_bytes"] * 1.02), k, n, block) == "weights held dequantized (fp16)"
    assert bench.verdict(int(sizes["fp16_bytes"] * 2.01), k, n, block) == "weights held dequantized (fp32)"


def test_without_tensorrt_exits_2_and_writes_the_graphs(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    out = tmp_path / "result.json"
    code = bench.main(["--k", str(K), "--n", str(N), "--graphs-dir", str(tmp_path / "g"), "--out", str(out)])
    assert code == 2
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("TensorRT is not installed (pip install tensorrt-cu12, or JetPack's python3-libnvinfer)")
    assert printed.endswith(f"the graphs were written to {tmp_path / 'g'}") and "\n" not in printed
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        f"layer-{v}-{K}x{N}.onnx" for v in ("fp16-dense", "int4-fp16", "int4-fp32")]
    onnx.checker.check_model(str(tmp_path / "g" / f"layer-int4-fp16-{K}x{N}.onnx"))
    assert not out.exists()
    assert bench.main(["--k", str(K), "--n", str(N)]) == 2
    assert "pass --graphs-dir DIR" in capsys.readouterr().out


def test_tensorrt_without_a_gpu_exits_2(bench, monkeypatch, capsys):
    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2)

        def __init__(self):
            pass

    def builder(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")  # what CUDA init failure gives

    fake = types.SimpleNamespace(__version__="10.3.0", ILogger=ILogger, Builder=builder)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert bench.main(["--k", str(K), "--n", str(N)]) == 2
    printed = capsys.readouterr().out
    assert printed.startswith("no CUDA GPU usable by TensorRT 10.3.0") and "nullptr" in printed


def test_report_lines(bench):
    sizes = bench.weight_bytes(4096, 12288, 128)
    results = [
        {"variant": "int4-fp16", **sizes, "engine_bytes": 26_500_000, "verdict": "weights kept INT4 (fused)",
         "latency_ms": 0.05, "max_rel_err": 2e-3, "kernels": ["Gemm matmul: sm87_int4_gemm_kernel"]},
        {"variant": "int4-fp32", **sizes, "engine_bytes": None, "error": "build failed: DQ data and scale types differ"},
        {"variant": "fp16-dense", **sizes, "engine_bytes": 101_000_000, "verdict": "weights held dequantized (fp16)",
         "latency_ms": 0.2, "max_rel_err": 1e-3, "kernels": ["Gemm matmul: sm87_xmma_gemm_f16"]},
    ]
    lines = bench.report_lines(results)
    assert lines[0].split()[:4] == ["variant", "engine", "MB", "/INT4"]
    assert lines[1].split() == ["int4-fp16", "26.5", f"{26.5e6 / sizes['int4_bytes']:.2f}",
                                f"{26.5e6 / sizes['fp16_bytes']:.2f}", "weights", "kept", "INT4", "(fused)",
                                "0.050", "0.25x", "2.0e-03"]
    assert lines[2].split() == ["int4-fp32", "-", "-", "-", "build", "failed"]
    assert lines[3].split()[-3:] == ["0.200", "1.00x", "1.0e-03"]
    assert lines[4:] == ["int4-fp16: Gemm matmul: sm87_int4_gemm_kernel",
                         "int4-fp32: build failed: DQ data and scale types differ",
                         "fp16-dense: Gemm matmul: sm87_xmma_gemm_f16"]


def test_gemm_tactics(bench):
    info = {"Layers": [{"Name": "x_reformat", "LayerType": "Reformat", "TacticName": "copy"},
                       {"Name": "matmul", "LayerType": "Gemm", "TacticName": "sm87_xmma_gemm_int4_f16"},
                       "dequantize + matmul"]}  # names only, when profiling verbosity is not detailed
    assert bench.gemm_tactics(info) == ["Gemm matmul: sm87_xmma_gemm_int4_f16", "dequantize + matmul"]
