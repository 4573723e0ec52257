import json
import numpy as np
import onnx
import pytest

from moss_edge.calibration.activations import decoder_input_stats
from moss_edge.calibration.dataset import build_samples, find_audio
from moss_edge.export.verify import Verifier, verify_artifact
from moss_edge.sound_events.evaluate import task_report
from moss_edge.quantize.artifact import quantize_artifact
from moss_edge.quantize.plan import plan_graph
from moss_edge.quantize.recipe import load_recipe
from moss_edge.quantize.weights import (_weighted_error, awq_quantize, dequantize_blocked, pack_int4,
                                        quantize_blocked)
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.pipeline import Pipeline

# The tiny model's widths (64, 96, 128) need blocks of 32; real widths use the presets' 128.
INT4 = {"encoder": {"precision": "int8-dynamic"}, "decoder": {"precision": "int4", "block": 32, "method": "rtn"}}


def test_blocked_rounding_error_and_range():
    w = np.random.default_rng(0).normal(size=(256, 48)).astype(np.float32)
    q, scale = quantize_blocked(w, 4, 64)
    assert q.min() >= -8 and q.max() <= 7 and scale.shape == (4, 48)
    err = np.abs(dequantize_blocked(q, scale, 64) - w).reshape(4, 64, 48)
    assert np.all(err <= scale[:, None, :] / 2 + 1e-6)


def test_pack_int4_layout():
    assert pack_int4(np.array([1, -1, 7, -8], np.int8)) == bytes([0xF1, 0x87])


def test_awq_beats_round_to_nearest_with_outlier_channels():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(256, 64)).astype(np.float32)
    mean_abs = np.where(np.arange(256) % 17 == 0, 20.0, 0.5).astype(np.float32)  # a few loud channels
    h = mean_abs**2
    q, scale = quantize_blocked(w, 4, 64)
    rtn = _weighted_error(w, dequantize_blocked(q, scale, 64), h, 64).sum()
    q, scale, s = awq_quantize(w, h, mean_abs, 4, 64)
    deq = dequantize_blocked(q, scale, 64) / (s[:, None] if s is not None else 1)
    assert _weighted_error(w, deq, h, 64).sum() < 0.8 * rtn


@pytest.fixture(scope="module")
def recipe_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    files = {}
    for name, method in (("int4-rtn", "rtn"), ("int4-awq", "awq")):
        spec = json.loads(json.dumps(INT4))
        spec["decoder"]["method"] = method
        spec["name"] = name
        (root / f"{name}.json").write_text(json.dumps(spec))
        files[name] = str(root / f"{name}.json")
    return files


@pytest.fixture(scope="module")
def quantized(synthetic_artifact, synthetic_checkpoint, recipe_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    verify = lambda d: verify_artifact(d, synthetic_checkpoint, steps=32, evaluate=task_report(4))  # noqa: E731
    out = {}
    for name, spec in (("int8", "int8"), ("int4-rtn", recipe_files["int4-rtn"]), ("int4-awq", recipe_files["int4-awq"])):
        out[name] = quantize_artifact(synthetic_artifact, root / name, load_recipe(spec), cache_dir=root / "cache",
                                      verify=verify, log=lambda m: None).path
    return out


def test_quantized_artifacts_pass_verification(quantized):
    for name, path in quantized.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["parity"]["passed"], (name, manifest["parity"])
        assert manifest["parity"]["worst_cosine"] > 0.97
        assert (path / "parity.json").is_file()
        assert "task_exact_match" not in manifest["parity"]  # not the sound-event model: no task accuracy
    awq = json.loads((quantized["int4-awq"] / "manifest.json").read_text())["parity"]
    rtn = json.loads((quantized["int4-rtn"] / "manifest.json").read_text())["parity"]
    assert awq["kl_mean"] < rtn["kl_mean"]  # calibration helps


def test_ort_runs_quantized_kernels(quantized):
    kernels = json.loads((quantized["int4-rtn"] / "manifest.json").read_text())["quantization"]["ort_cpu_kernels"]
    assert kernels["decoder"]["MatMulNBits"] > 0
    assert kernels["decoder"]["dequantized_weights"] == 0 and kernels["decoder"]["fp32_weight_matmuls"] == 0
    assert kernels["encoder"]["MatMulInteger"] > 0 and kernels["encoder"]["fp32_weight_matmuls"] == 0


def test_int4_size(synthetic_artifact, tmp_path):
    # blocks of 128 rows (the presets): INT4 data + one fp32 scale per block
    out = quantize_artifact(synthetic_artifact, tmp_path / "int4", load_recipe("int4"), verify=False, log=lambda m: None).path
    sizes = json.loads((out / "manifest.json").read_text())["quantization"]["weight_bytes"]
    assert 0.25 < sizes["decoder"]["int4"]["ratio_to_fp16"] <= 0.30


def test_quantized_artifact_runs_and_refuses_other_backends(quantized, upstream):
    pipe = Pipeline.load(quantized["int4-awq"])
    assert len(pipe.generate(upstream["audio"], "What is said?", max_new_tokens=8).tokens) <= 8
    with pytest.raises(MossEdgeError, match="does not run on tensorrt"):
        Pipeline.load(quantized["int4-awq"], provider="tensorrt")


def test_calibration_selection_is_deterministic(tmp_path):
    files = find_audio(None)
    assert len(files) == 3 and all(f.suffix == ".flac" for f in files)
    a, b = build_samples(files, 8, seed=3), build_samples(files, 8, seed=3)
    assert a == b and a != build_samples(files, 8, seed=4)
    assert len({s.prompt for s in a}) == 6 and all(0 < s.seconds <= 20 for s in a)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(f) for f in files[:2]))
    assert find_audio(listing) == files[:2]
    assert find_audio(str(files[0].parent / "*.flac")) == sorted(files + [files[0].parent / "speech_en_10s.flac"])


def test_activation_stats_are_cached(synthetic_artifact, tmp_path):
    recipe = load_recipe("int4-awq").graphs["decoder"]
    recipe.block = 32
    plan = plan_graph(synthetic_artifact / "decoder.onnx", "decoder", recipe)
    samples = build_samples(find_audio(None), 2)
    first = decoder_input_stats(synthetic_artifact, plan.model, list(plan.rules), samples, tmp_path)
    assert len(list(tmp_path.glob("decoder-stats-*.npz"))) == 1
    again = decoder_input_stats(synthetic_artifact, plan.model, list(plan.rules), samples, tmp_path)
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[k]["sq"], again[k]["sq"]) for k in first)
    assert all((v["sq"] >= v["abs"] ** 2 - 1e-5).all() for v in first.values())  # E[x^2] >= E[|x|]^2


def test_bad_inputs_leave_nothing_behind(synthetic_artifact, recipe_files, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MossEdgeError, match="no audio files"):
        quantize_artifact(synthetic_artifact, out, load_recipe(recipe_files["int4-awq"]), calibration=str(empty), verify=False)
    (empty / "broken.wav").write_text("not audio")
    with pytest.raises(MossEdgeError, match="not readable audio"):
        quantize_artifact(synthetic_artifact, out, load_recipe(recipe_files["int4-awq"]), calibration=str(empty), verify=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"decoder": {"precision": "int4"}, "vision_tower": {"precision": "int8"}}))
    with pytest.raises(MossEdgeError, match="vision_tower"):
        load_recipe(str(bad))
    bad.write_text(json.dumps({"decoder": {"precision": "int3"}}))
    with pytest.raises(MossEdgeError, match="int3"):
        load_recipe(str(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "empty"]  # no output, no temp dirs


def test_quantizing_twice_is_refused(quantized, tmp_path):
    with pytest.raises(MossEdgeError, match="already quantized"):
        quantize_artifact(quantized["int8"], tmp_path / "again", load_recipe("int8"))
    assert not (tmp_path / "again").exists()


def test_fixture_quantized_int8_and_int4(fixture_artifact, upstream, tmp_path):
    # Blocks of 16: at 32 the fixture's INT4 prefill logits sit at cosine 0.98005 (VNNI) / 0.97993
    # (AVX2) against the 0.98 gate, a margin smaller than the two CPUs' kernel difference.
    int4 = tmp_path / "int4-b16.json"
    int4.write_text(json.dumps({**INT4, "decoder": {**INT4["decoder"], "block": 16}}))
    for name, spec in (("int8", "int8"), ("int4", str(int4))):
        out = quantize_artifact(fixture_artifact, tmp_path / name, load_recipe(spec),
                                verify=Verifier(steps=32), log=lambda m: None)
        # the default reference: the checkpoint the artifact records, checked, loaded once
        assert out.report["summary"] == out.manifest["parity"] and out.passed, out.manifest["parity"]
        assert json.loads((out.path / "manifest.json").read_text()) == out.manifest
        out = out.path
        tokens = Pipeline.load(out).generate(upstream["audio"], [upstream["ids"].audio_start, upstream["ids"].audio_end],
                                             max_new_tokens=8).tokens
        assert len(tokens) <= 8


def test_w8a8_static_qdq_for_tensorrt(synthetic_artifact, synthetic_checkpoint, tmp_path):
    spec = tmp_path / "w8a8.json"
    spec.write_text(json.dumps({"encoder": {"precision": "w8a8"}, "adapter": {"precision": "w8a8", "activations": "minmax"},
                                "decoder": {"precision": "int4", "block": 32, "embedding": "fp16"},
                                "calibration_samples": 3}))
    out = quantize_artifact(synthetic_artifact, tmp_path / "w8a8", load_recipe(str(spec)),
                            verify=lambda d: verify_artifact(d, synthetic_checkpoint, steps=16), log=lambda m: None).path
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"], manifest["parity"]
    assert manifest["backends"] == ["cpu", "cuda", "tensorrt"]
    import onnx

    encoder = onnx.load(str(out / "encoder.onnx"))
    quantize_nodes = [n for n in encoder.graph.node if n.op_type == "QuantizeLinear"]
    weight_dq = [n for n in encoder.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_q8")]
    weights = {n.output[0] for n in weight_dq}
    quantized_matmuls = [n for n in encoder.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert quantize_nodes and len(quantized_matmuls) == len(quantize_nodes)  # one activation Q per MatMul
    assert all({a.name for a in n.attribute} == {"axis"} for n in weight_dq)  # per-channel, not blocked
    scales = [i for i in encoder.graph.initializer if "_act_scale" in i.name]
    assert scales and all(onnx.numpy_helper.to_array(i) > 0 for i in scales)


def test_stem_convolutions_become_one_exact_matmul_each():
    """im2col + MatMul computes the same convolution (odd and even sizes, as chunk tails have);
    convolutions of another shape are left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from moss_edge.quantize.conv_im2col import convolutions_as_matmuls

    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((7, 5, 3, 3)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
               "w1": rng.standard_normal((5, 1, 3, 3)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x1", "w1"], ["x"], strides=[2, 2], pads=[1, 1, 1, 1], name="first"),  # one channel in
         helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], name="stem")],
        "g", [helper.make_tensor_value_info("x1", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert convolutions_as_matmuls(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node].count("Conv") == 1 and "w" not in {i.name for i in rewritten.graph.initializer}
    run = lambda m, x: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x1": x})[0]  # noqa: E731
    for shape in ((2, 1, 26, 18), (1, 1, 25, 13), (3, 1, 8, 7)):
        x = rng.standard_normal(shape).astype(np.float32)
        want, got = run(model, x), run(rewritten, x)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4 * np.abs(want).max()
