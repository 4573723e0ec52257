"""GPU artifacts in the form NVIDIA's toolchains take: fp16 activations with fp32 kept where fp16
loses, INT4 weight-only with fp16 scales straight into MatMul B (as ModelOpt writes it), the
ONNX Runtime CUDA decoder, and their parity measured on this CPU through the emulated twins."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moss_edge.export.backend_check import check_artifact
from moss_edge.export.int4_pattern import int4_matmul_pattern
from moss_edge.export.ort_decoder import nbits_layout
from moss_edge.quantize.artifact import quantize_artifact
from moss_edge.quantize.graph import pack_int4
from moss_edge.quantize.half_emulation import emulated, tensor_types
from moss_edge.quantize.plan import gpu_block, plan_graph
from moss_edge.quantize.recipe import GraphRecipe, load_recipe
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import CUDA_DECODER, graph_spec, mismatches
from moss_edge.runtime.session import run_typed

ROOT = Path(__file__).resolve().parents[1]
F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
MODELOPT = ROOT / "tests" / "fixtures" / "modelopt-int4"


def _load(artifact, graph):
    return onnx.load(str(artifact / f"{graph}.onnx"), load_external_data=False)


@pytest.fixture(scope="module")
def gpu_artifact(synthetic_artifact, tmp_path_factory):
    return quantize_artifact(synthetic_artifact, tmp_path_factory.mktemp("gpu") / "int4-trt", load_recipe("int4-trt"),
                             verify=False, log=lambda m: None).path


@pytest.fixture(scope="module")
def verified_packaged(packaged_artifacts, tmp_path_factory):
    """The packaged model quantized with int4-trt, parity-checked (on this CPU: emulated)."""
    return quantize_artifact(packaged_artifacts["fp32"], tmp_path_factory.mktemp("gpu") / "packaged-int4-trt",
                             load_recipe("int4-trt"), log=lambda m: None)


def test_emulation_rounds_every_value_to_fp16_where_it_is_made():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(16, 8)).astype(np.float16), np.float16([65504] * 8)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", F16, [2, 16])], [helper.make_tensor_value_info("y", F16, [2, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = emulated(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), peaks=True)
    assert model.graph.input[0].type.tensor_type.elem_type == F32
    session = ort.InferenceSession(model.SerializeToString())
    x = rng.normal(size=(2, 16)).astype(np.float32) * 40
    y, *peaks = session.run(None, {"x": x})
    x16 = x.astype(np.float16).astype(np.float32)  # the fp16 input
    h = (x16 @ w.astype(np.float32)).astype(np.float16).astype(np.float32)
    want = (h + b.astype(np.float32)).astype(np.float16).astype(np.float32)  # past 65504: inf, as on the device
    assert np.isinf(want).any() and np.array_equal(np.isinf(y), np.isinf(want))
    finite = np.isfinite(want)
    assert np.abs(y[finite] - want[finite]).max() <= np.spacing(np.abs(want[finite]).astype(np.float16)).max()
    assert max(peaks) > 65504  # the largest value before rounding: the headroom measure


def test_fp16_form_keeps_fp32_where_fp16_loses(gpu_artifact):
    manifest = json.loads((gpu_artifact / "manifest.json").read_text())
    decoder = _load(gpu_artifact, "decoder")
    types = tensor_types(decoder)
    io = {v.name: v.type.tensor_type.elem_type for v in [*decoder.graph.input, *decoder.graph.output]}
    assert io["logits"] == F32 and {io[n] for n in io if n.startswith(("past_", "present_", "audio_", "deepstack_"))} == {F16}
    nodes = decoder.graph.node
    assert not [n for n in nodes if n.op_type == "Cast" and (n.input[0].startswith("past_") or n.output[0].startswith("present_"))]
    table = next(n for n in nodes if n.op_type == "Gather" and types.get(n.input[0]) == F16)
    assert not [n for n in nodes if table.output[0] in n.input and n.op_type == "Cast"]  # the rows are used as fp16
    for op in ("ReduceMean", "Softmax", "Cos", "Sin", "Sqrt"):  # RMSNorm statistics, softmax, rotary tables
        assert {types[n.output[0]] for n in nodes if n.op_type == op} == {F32}, op
    assert {types[n.input[0]] for n in nodes if n.op_type == "MatMul"} == {F16}
    pattern = int4_matmul_pattern(decoder)["summary"]
    assert pattern["scale_dtype"] == ["FLOAT16"] and pattern["consumer"] == ["MatMul input B directly"]
    assert pattern["matmul_a_dtype"] == ["FLOAT16"] and pattern["zero_point"] == ["absent"]
    encoder = _load(gpu_artifact, "encoder")
    layers = manifest["config"]["audio_config"]["encoder_layers"]
    assert sum(n.op_type == "Clip" for n in encoder.graph.node) == 2 * layers  # each residual add clamped
    headroom = manifest["quantization"]["fp16_headroom"]["encoder"]
    assert len(headroom["largest_per_layer"]) == layers and headroom["headroom"] > 1
    checks = check_artifact(gpu_artifact, manifest, ["tensorrt-10.3", "ort-cuda"])
    assert checks["tensorrt-10.3"]["held_dequantized_bytes"] == 0
    assert not {f["rule"] for f in checks["tensorrt-10.3"]["findings"]} - {"dq-4bit-block"}
    assert checks["ort-cuda"]["passed"] and not checks["ort-cuda"]["findings"]


def test_the_fp32_form_is_flagged_for_tensorrt(synthetic_artifact, tmp_path):
    spec = tmp_path / "fp32-form.json"  # INT4 weight-only computed in fp32: what int4-trt was before
    spec.write_text(json.dumps({"encoder": {"precision": "int4"}, "adapter": {"precision": "int4"},
                                "decoder": {"precision": "int4", "lm_head": "int4", "embedding": "fp16", "kv_cache": "fp16"}}))
    out = quantize_artifact(synthetic_artifact, tmp_path / "fp32-form", load_recipe(str(spec)), verify=False,
                            log=lambda m: None).path
    manifest = json.loads((out / "manifest.json").read_text())
    checks = check_artifact(out, manifest, ["tensorrt-10.3"])["tensorrt-10.3"]
    held = [f for f in checks["findings"] if f["rule"] == "int4-fp32-activations"]
    assert held and all("may be held dequantized" in f["reason"] for f in held)
    int4 = sum(int(np.prod(t.dims)) for g in ("encoder", "adapter", "decoder") for t in _load(out, g).graph.initializer
               if t.data_type == TensorProto.INT4)
    assert checks["held_dequantized_bytes"] == 4 * int4  # every INT4 weight, at fp32
    assert manifest["engine_plan"]["weights"]["decoder"] > (out / "decoder.onnx.data").stat().st_size


def test_cuda_decoder_contract_kernels_and_weights(verified_packaged):
    gpu_artifact = verified_packaged.path  # its head size takes GroupQueryAttention (the synthetic model's does not)
    manifest = json.loads((gpu_artifact / "manifest.json").read_text())
    assert manifest["decoders"] == {"cuda": CUDA_DECODER}
    model = _load(gpu_artifact, CUDA_DECODER)
    dims = {k: int(v) for k, v in manifest["model"].items()}
    from moss_edge.runtime.graphs import Dims

    d = Dims(**dims)
    shapes = {v.name: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert mismatches(graph_spec(CUDA_DECODER, d), shapes) == []
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert types["logits"] == F32 and types["audio_embeds"] == types["past_key_0"] == types["present_value_0"] == F16
    ops = [n.op_type for n in model.graph.node]
    int4 = [t for t in _load(gpu_artifact, "decoder").graph.initializer if t.data_type == TensorProto.INT4]
    assert ops.count("MatMulNBits") == len(int4) and ops.count("GroupQueryAttention") == d.num_hidden_layers
    assert "DequantizeLinear" not in ops or all(  # only the tables' and weights not in INT4
        n.input[0] not in {t.name for t in int4} for n in model.graph.node if n.op_type == "DequantizeLinear")
    scales = [t for t in model.graph.initializer if t.name.endswith("_nbits_scale")]
    assert scales and {t.data_type for t in scales} == {F16}


def test_nbits_layout_computes_the_dequantized_matmul():
    rng = np.random.default_rng(1)
    k, n, block = 256, 6, 128
    q = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, size=(k // block, n)).astype(np.float16)
    packed = helper.make_tensor("q", TensorProto.INT4, [k, n], pack_int4(q), raw=True)
    assert np.array_equal(numpy_helper.to_array(packed).astype(np.int8), q)
    blob, scales = nbits_layout(q, scale, block)
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                          block_size=block)], "g",
        [helper.make_tensor_value_info("x", F32, [1, k])], [helper.make_tensor_value_info("y", F32, [1, n])],
        [numpy_helper.from_array(blob, "b"), numpy_helper.from_array(scales.astype(np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.normal(size=(1, k)).astype(np.float32)
    weight = q.astype(np.float32) * np.repeat(scale.astype(np.float32), block, axis=0)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.allclose(y, x @ weight, rtol=1e-4, atol=1e-4)


def test_int4_pattern_matches_modelopt_node_for_node(fixture_artifact, tmp_path):
    """tools/modelopt_int4/compare.py ran ModelOpt's INT4 quantizer on the fixture's fp16 decoder and
    recorded its pattern; our int4-trt decoder must match it on every INT4 weight."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", ROOT / "tools" / "modelopt_int4" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    out = quantize_artifact(fixture_artifact, tmp_path / "int4-trt", load_recipe("int4-trt"), verify=False,
                            log=lambda m: None).path
    ours = int4_matmul_pattern(_load(out, "decoder"))["nodes"]
    modelopt = json.loads((MODELOPT / "modelopt.json").read_text())
    assert modelopt["source"] == "modelopt" and len(modelopt["nodes"]) == len(ours) > 0
    assert compare.compare(ours, modelopt["nodes"]) == []
    assert ours == json.loads((MODELOPT / "moss_edge.json").read_text())["nodes"]  # what was recorded beside it


def test_fp16_artifact_passes_its_parity_gate_through_emulation(verified_packaged):
    report = verified_packaged.report
    assert report["summary"]["passed"], report["summary"]["failures"]
    assert report["emulated"]["graphs"] == ["encoder", "adapter", "decoder", CUDA_DECODER]
    assert {"decoder", CUDA_DECODER} <= set(report["end_to_end_by_decoder"])
    assert report["graphs"][CUDA_DECODER]["prefill_logits"]["cosine"] >= 0.98


def test_recipe_rules_for_fp16_graphs(tmp_path, synthetic_artifact):
    with pytest.raises(MossEdgeError, match="dynamic INT8 is a CPU format"):
        GraphRecipe("int8-dynamic", dtype="fp16").check("encoder")
    with pytest.raises(MossEdgeError, match="KV cache in fp16"):
        GraphRecipe("int4", dtype="fp16", embedding="fp16").check("decoder")
    spec = tmp_path / "r.json"
    spec.write_text(json.dumps({"decoder": {"precision": "int4", "dtype": "fp16", "embedding": "fp16"}}))
    assert load_recipe(str(spec)).graphs["decoder"].kv_cache == "fp16"  # an fp16 decoder's cache is fp16
    # an odd N does not go to INT4 on a GPU: kept fp16, with the reason
    from moss_edge.quantize.plan import weight_precision

    recipe = GraphRecipe("int4", dtype="fp16", kv_cache="fp16", embedding="fp16")
    assert weight_precision("w", "MatMul", [256, 7], recipe)[0] == "fp16"
    assert weight_precision("w", "MatMul", [256, 8], recipe) == ("int4", "")
    assert weight_precision("w", "MatMul", [192, 8], recipe) == ("int4", "")  # blocks of 64
    assert weight_precision("w", "MatMul", [160, 8], recipe)[0] == "fp16"  # neither 64 nor 128 divides it
    assert (gpu_block(192, 128), gpu_block(64, 128), gpu_block(160, 128)) == (64, 128, None)
    assert weight_precision("w", "MatMul", [256, 7], GraphRecipe("int4"))[0] == "int4"  # the CPU takes it
    plan = plan_graph(synthetic_artifact / "decoder.onnx", "decoder", recipe)
    assert plan.rules


def test_run_typed_feeds_the_declared_types():
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", F16, [3])], [helper.make_tensor_value_info("y", F16, [3])])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    (y,) = run_typed(session, {"x": np.array([1.0001, 2.0, 70000.0], np.float32)})
    assert y.dtype == np.float32 and y[0] == 1.0 and np.isinf(y[2])
