"""`moss-edge check`: what TensorRT and ONNX Runtime targets would reject, found without them
(issue 15). Each known trap is planted in a small graph and must be reported for 10.3."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from moss_edge.cli import main
from moss_edge.quantize.artifact import quantize_artifact
from moss_edge.quantize.recipe import PRESETS, load_recipe
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.pipeline import Pipeline
from moss_edge.export.backend_check import check_artifact, check_graph
from moss_edge.export.backend_rules import RULES, TARGETS


def _graph(nodes, inits, opset=21, inputs=("x",), output="y", dtype=TensorProto.FLOAT):
    graph = helper.make_graph(nodes, "trap", [helper.make_tensor_value_info(i, dtype, [2, 4]) for i in inputs],
                              [helper.make_tensor_value_info(output, dtype, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _int4(name, dims, signed=True):
    nibbles = np.random.default_rng(0).integers(0, 256, int(np.prod(dims)) // 2, dtype=np.uint8)
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, dims, nibbles.tobytes(), raw=True)


def _int4_matmul(weight, scale, zero_point=None, opset=21, dtype=TensorProto.FLOAT, between=()):
    """x @ DequantizeLinear(weight, scale), x of `dtype`; `between`: nodes from the dequantized w to MatMul's "wb"."""
    inits = [weight, scale] + ([zero_point] if zero_point is not None else [])
    dq = helper.make_node("DequantizeLinear", [weight.name, scale.name] + ([zero_point.name] if zero_point else []),
                          ["w"], name="dq", axis=0, block_size=weight.dims[0] // scale.dims[0])
    b = "wb" if between else "w"
    return _graph([dq, *between, helper.make_node("MatMul", ["x", b], ["y"], name="mm")], inits, opset, dtype=dtype)


def _half(shape):
    return np.ones(shape, np.float16)


def _rules(model, target, tmp_path):
    return {(f.rule, f.verdict) for f in check_graph(model, "decoder", target, tmp_path)}


def test_scatternd_reduction_is_reported_for_10_3_only(tmp_path):
    scatter = helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="scatter", reduction="none")
    model = _graph([scatter], [numpy_helper.from_array(np.zeros((1, 1), np.int64), "idx"),
                               numpy_helper.from_array(np.zeros((1, 4), np.float32), "upd")])
    assert ("scatternd-reduction-attribute", "rejected") in _rules(model, "tensorrt-10.3", tmp_path)
    assert _rules(model, "tensorrt-10.16", tmp_path) == set()  # "none" is accepted there
    model.graph.node[0].attribute[0].s = b"add"
    assert ("scatternd-reduction", "rejected") in _rules(model, "tensorrt-10.16", tmp_path)


def test_int4_dequantize_traps(tmp_path):
    scale = numpy_helper.from_array(np.ones((1, 8), np.float32), "s")  # one block of 4 rows... per output column
    zero = helper.make_tensor("zp", TensorProto.INT4, [1, 8], bytes([0x11] * 4), raw=True)  # all ones
    assert ("dq-zero-point", "rejected") in _rules(_int4_matmul(_int4("w", [4, 8]), scale, zero), "tensorrt-10.3", tmp_path)
    assert ("dq-4bit-weight", "rejected") in _rules(_int4_matmul(_int4("w", [4, 8], signed=False), scale),
                                                    "tensorrt-10.3", tmp_path)
    # the passing form: signed, 2-D constant, blocks of 128 along one axis, no zero point, fp16
    # scales dequantizing into MatMul input B with fp16 activations
    good = _int4_matmul(_int4("w", [256, 8]), numpy_helper.from_array(_half((2, 8)), "s"), dtype=TensorProto.FLOAT16)
    assert _rules(good, "tensorrt-10.3", tmp_path) == set()
    odd = _int4_matmul(_int4("w", [256, 8]), numpy_helper.from_array(_half((8, 8)), "s"), dtype=TensorProto.FLOAT16)
    assert ("dq-4bit-block", "warning") in _rules(odd, "tensorrt-10.3", tmp_path)  # blocks of 32: undocumented


def test_int4_forms_tensorrt_would_not_fuse(tmp_path):
    """fp32 scales and activations (the weight may be held dequantized), scales of another type than the
    data (rejected on Orin), anything between the DequantizeLinear and MatMul B, odd N or partial blocks."""
    fp32 = _int4_matmul(_int4("w", [256, 8]), numpy_helper.from_array(np.ones((2, 8), np.float32), "s"))
    assert _rules(fp32, "tensorrt-10.3", tmp_path) == {("int4-fp32-activations", "warning")}
    finding = next(f for f in check_graph(fp32, "decoder", "tensorrt-10.3", tmp_path) if f.rule == "int4-fp32-activations")
    assert "may be held dequantized" in finding.reason
    mixed = _int4_matmul(_int4("w", [256, 8]), numpy_helper.from_array(_half((2, 8)), "s"))  # fp32 x, fp16 scales
    assert ("dq-mixed-types-orin", "rejected") in _rules(mixed, "tensorrt-10.3", tmp_path)
    assert ("dq-mixed-types", "warning") in _rules(mixed, "tensorrt-10.16", tmp_path)
    cast = helper.make_node("Cast", ["w"], ["wb"], name="cast", to=TensorProto.FLOAT16)
    through = _int4_matmul(_int4("w", [256, 8]), numpy_helper.from_array(_half((2, 8)), "s"),
                           dtype=TensorProto.FLOAT16, between=[cast])
    assert ("int4-into-matmul-b", "warning") in _rules(through, "tensorrt-10.3", tmp_path)
    odd_n = _int4_matmul(_int4("w", [256, 7]), numpy_helper.from_array(_half((2, 7)), "s"), dtype=TensorProto.FLOAT16)
    assert ("int4-weight-shape", "warning") in _rules(odd_n, "tensorrt-10.3", tmp_path)
    partial = _int4_matmul(_int4("w", [200, 8]), numpy_helper.from_array(_half((2, 8)), "s"), dtype=TensorProto.FLOAT16)
    next(a for a in partial.graph.node[0].attribute if a.name == "block_size").i = 128  # 200 rows: a partial block
    assert ("int4-weight-shape", "warning") in _rules(partial, "tensorrt-10.3", tmp_path)
    short = _int4_matmul(_int4("w", [64, 8]), numpy_helper.from_array(_half((1, 8)), "s"), dtype=TensorProto.FLOAT16)
    next(a for a in short.graph.node[0].attribute if a.name == "block_size").i = 128  # shorter than a block: as ModelOpt
    assert ("int4-weight-shape", "warning") not in _rules(short, "tensorrt-10.3", tmp_path)


def test_opset23_attention_needs_a_newer_tensorrt(tmp_path):
    attention = helper.make_node("Attention", ["x", "x", "x"], ["y"], name="attention")
    model = _graph([attention], [], opset=23)
    assert ("op-supported", "rejected") in _rules(model, "tensorrt-10.3", tmp_path)
    assert _rules(model, "tensorrt-10.16", tmp_path) == set()


def test_cumsum_layernorm_and_contrib_ops(tmp_path):
    axis = helper.make_node("ReduceMax", ["x"], ["axis"], keepdims=0)  # an axis computed at run time
    cumsum = helper.make_node("CumSum", ["x", "axis_i"], ["y"], name="cumsum")
    cast = helper.make_node("Cast", ["axis"], ["axis_i"], to=TensorProto.INT64)
    assert ("cumsum-axis-constant", "rejected") in _rules(_graph([axis, cast, cumsum], []), "tensorrt-10.3", tmp_path)
    norm = helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln")
    model = _graph([norm], [numpy_helper.from_array(np.ones(4, np.float32), "g")])
    assert ("layernorm-first-output", "rejected") in _rules(model, "tensorrt-10.3", tmp_path)
    gqa = helper.make_node("GroupQueryAttention", ["x"], ["y"], name="gqa", domain="com.microsoft")
    model = _graph([gqa], [])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert ("op-supported", "rejected") in _rules(model, "tensorrt-10.16", tmp_path)
    assert ("cuda-kernel", "elsewhere") in _rules(model, "ort-cuda", tmp_path)  # float32 GQA: CUDA takes fp16 only


def test_every_rule_names_its_source_and_a_known_target():
    assert all(r.source and set(r.targets) <= set(TARGETS) and r.verdict in ("rejected", "elsewhere", "warning")
               for r in RULES)


@pytest.fixture(scope="module")
def recipe_artifacts(synthetic_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipes")
    return {"fp32": synthetic_artifact,
            **{r: quantize_artifact(synthetic_artifact, out / r, PRESETS[r](), verify=False, log=lambda m: None).path
               for r in PRESETS}}


def test_check_on_each_recipe(recipe_artifacts):
    results = {r: check_artifact(a, json.loads((a / "manifest.json").read_text())) for r, a in recipe_artifacts.items()}
    assert all(r["passed"] for r in results["fp32"].values())
    gpu = ("int4-trt", "w8a8")  # fp16 graphs: ORT CPU has no fp16 kernels for them, ORT CUDA runs them
    assert all(results[r]["ort-cpu"]["passed"] == (r not in gpu) for r in results)
    assert all(results[r]["ort-cuda"]["passed"] for r in gpu)
    assert {f["rule"] for r in gpu for f in results[r]["ort-cpu"]["findings"]} == {"cpu-kernel"}
    # dynamic INT8 (the CPU recipes' encoder and adapter) has no TensorRT importer and no CUDA kernel,
    # and their INT8 embedding table is gathered before it is dequantized
    rejected = {f["op"] for f in results["int4"]["tensorrt-10.3"]["findings"] if f["verdict"] == "rejected"}
    assert {"DynamicQuantizeLinear", "MatMulInteger", "Gather"} <= rejected
    assert not results["int4"]["ort-cuda"]["passed"]
    for cpu_recipe in ("int8", "int4-awq"):
        assert not results[cpu_recipe]["tensorrt-10.3"]["passed"] and not results[cpu_recipe]["ort-cuda"]["passed"]
    # the TensorRT recipes pass JetPack 6's 10.3 with nothing outside TensorRT's documented modes
    for recipe in ("int4-trt", "w8a8"):
        for target in ("tensorrt-10.3", "tensorrt-10.16"):
            assert results[recipe][target]["passed"], (recipe, target)
            assert not [f for f in results[recipe][target]["findings"] if f["rule"] != "dq-4bit-block"]


def test_manifest_records_checks_backends_and_engine_plan(recipe_artifacts):
    manifests = {r: json.loads((a / "manifest.json").read_text()) for r, a in recipe_artifacts.items()}
    for recipe, m in manifests.items():
        fresh = check_artifact(recipe_artifacts[recipe], m)
        assert {t: r["passed"] for t, r in m["checks"].items()} == {t: r["passed"] for t, r in fresh.items()}
    assert manifests["int4"]["backends"] == ["cpu"] and "engine_plan" not in manifests["int4"]
    assert manifests["int4-trt"]["backends"] == ["cuda", "tensorrt"]
    inputs = {i["name"]: i["dtype"] for i in manifests["int4-trt"]["graphs"]["decoder"]["inputs"]}
    assert inputs["past_key_0"] == "float16" and inputs["audio_embeds"] == "float16"  # fp16 cache and activations
    kept = manifests["int4-trt"]["quantization"]["higher_precision"]["decoder"]
    assert [w["precision"] for w in kept.values()] == ["fp16"]  # the embedding table, and nothing else
    plan = manifests["int4-trt"]["engine_plan"]
    on_disk = sum((recipe_artifacts["int4-trt"] / f).stat().st_size  # decoder_cuda is ONNX Runtime's, not TensorRT's
                  for g in ("encoder", "adapter", "decoder") for f in manifests["int4-trt"]["graphs"][g]["files"])
    assert sum(plan["weights"].values()) == on_disk and plan["total"] > on_disk + plan["kv_cache"]
    d = manifests["int4-trt"]["model"]
    assert plan["kv_cache"] == 2 * 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_dim"] * 2 \
        * plan["limits"]["max_context"]


def test_fp16_cache_decoder_runs_with_its_cache_in_fp16(synthetic_artifact, upstream, tmp_path):
    """An fp32 decoder with its cache in fp16 at the graph's edges (kv_cache fp16 alone) runs on the CPU."""
    spec = tmp_path / "cache16.json"
    spec.write_text(json.dumps({"decoder": {"precision": "int4", "kv_cache": "fp16"}}))
    out = quantize_artifact(synthetic_artifact, tmp_path / "cache16", load_recipe(str(spec)), verify=False,
                            log=lambda m: None).path
    pipe = Pipeline.load(out, decoder="decoder")
    assert len(pipe.generate(upstream["audio"], "What is said?", max_new_tokens=4).tokens) <= 4
    assert pipe.decoder.past[0].data_type() == "tensor(float16)" and pipe.decoder.cache_dtype == np.float16


def test_gpu_artifact_is_refused_on_the_cpu_provider(recipe_artifacts):
    with pytest.raises(MossEdgeError, match="does not run on cpu; it runs on cuda, tensorrt"):
        Pipeline.load(recipe_artifacts["int4-trt"])


def test_engine_plan_for_ten_minutes_of_audio_at_4b_widths():
    from moss_edge.export.engine_plan import GIB, context_for_audio, jetson_limits, plan

    dims = {"hidden_size": 2560, "num_hidden_layers": 36, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 151936, "num_deepstack": 3, "num_taps": 3, "chunk_frames": 400, "conv_chunksize": 64,
            "audio_dim": 1280, "max_positions": 40960}
    io = [{"name": "past_key_0", "dtype": "float32"}, {"name": "audio_embeds", "dtype": "float32"}]
    manifest = {"model": dims, "graphs": {"decoder": {"inputs": io}},
                "config": {"language_config": {"num_attention_heads": 32, "intermediate_size": 9728},
                           "audio_config": {"downsample_hidden_size": 480, "encoder_ffn_dim": 5120}}}
    from moss_edge.runtime.graphs import Dims

    limits = jetson_limits(Dims(**dims))
    # 600 s: 7500 audio tokens, 300 time markers of 1-3 digits, the question and answer
    assert context_for_audio(600, Dims(**dims)) == 7500 + 847 + 512 <= limits.max_context
    # about 4.4 GiB of INT4 weights (the 4B int4-trt artifact's graphs)
    p = plan(manifest, {"encoder": int(0.35 * GIB), "adapter": int(0.1 * GIB), "decoder": int(3.0 * GIB)}, limits)
    assert p.kv_cache == 2 * 36 * 2 * 8 * 128 * 4 * limits.max_context  # fp32 past and present
    assert p.fits["agx-orin-64gb"]["fits"]
    small = plan(manifest, {"decoder": int(3.0 * GIB)}, limits)
    big = plan(manifest, {"decoder": int(9.0 * GIB)}, limits)  # an fp16-sized 4B decoder does not fit an Orin NX
    assert small.total < big.total and not big.fits["orin-nx-16gb"]["fits"]


def test_check_cli(recipe_artifacts, capsys):
    assert main(["check", str(recipe_artifacts["fp32"])]) == 0
    out = capsys.readouterr().out
    assert "tensorrt-10.3   PASS" in out and "orin-nx-16gb: fits" in out
    with pytest.raises(SystemExit) as failed:
        main(["check", str(recipe_artifacts["int4"]), "--target", "tensorrt-10.3", "--json"])
    assert failed.value.code == 1
    assert json.loads(capsys.readouterr().out)["checks"]["tensorrt-10.3"]["passed"] is False
    assert main(["check", str(recipe_artifacts["fp32"]), "--target", "tensorrt-9"]) == 2
