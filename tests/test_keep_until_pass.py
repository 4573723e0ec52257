"""--keep-until-pass spends precision in the graph that fails its parity gate: a failure planted
in each graph (a stand-in verifier that reads what the written manifest promoted) is met by
promoting that graph's weights and no other's; rounds that cannot help stop; the advice names
the failing graph and a recipe change; and the case the flag used to miss (a random-weight
checkpoint whose encoder fails under int4-trt) passes for real."""

import json

import onnx
import pytest

from moss_edge.cli import main
from moss_edge.quantize.artifact import quantize_artifact
from moss_edge.quantize.keep import advice
from moss_edge.quantize.recipe import PRESETS, load_recipe
from moss_edge.runtime.parity import THRESHOLDS

OUTPUTS = {"encoder": ("audio_tokens", "taps"), "adapter": ("audio_embeds", "deepstack_embeds"),
           "decoder": ("prefill_logits",)}


def _metric(cosine):
    return {"max_abs": 0.0, "cosine": cosine, "rel": 0.0, "finite": True}


def planted(graph: str, needed: int, gain: float = 0.01, calls: list | None = None):
    """A verifier whose `graph` fails (cosine 0.95) until `needed` of its weights are promoted,
    rising by `gain` per promoted weight; every other graph passes."""
    def verify(tmp):
        promoted = json.loads((tmp / "manifest.json").read_text())["quantization"].get("promoted", {})
        count = len(promoted.get(graph, {}))
        if calls is not None:
            calls.append({g: len(w) for g, w in promoted.items()})
        cosine = 0.999 if count >= needed else 0.95 + gain * count
        graphs = {g: {o: _metric(cosine if g == graph else 0.999) for o in outs} for g, outs in OUTPUTS.items()}
        failures = [f"{graph}.{OUTPUTS[graph][0]} cosine {cosine:.6f} < 0.98"] if cosine < 0.98 else []
        end_to_end = {"kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0, "top1_decided": 4, "greedy_match": 1.0}
        return {"artifact": str(tmp), "audio": [], "prompt_tokens": 0, "graphs": graphs, "end_to_end": end_to_end,
                "thresholds": THRESHOLDS["int4"],
                "summary": {"passed": not failures, "failures": failures, "precision": "int4", "steps": 4,
                            "worst_cosine": cosine, "prefill_logits_rel": 0.0, **end_to_end}}
    return verify


@pytest.mark.parametrize("graph, recipe", [("encoder", "int4"), ("adapter", "int4-trt"), ("decoder", "int4")])
def test_a_failure_in_one_graph_promotes_that_graphs_weights(synthetic_artifact, graph, recipe, tmp_path):
    calls = []
    result = quantize_artifact(synthetic_artifact, tmp_path / "out", PRESETS[recipe](), verify=planted(graph, 2, calls=calls),
                               keep_until_pass=True, log=lambda m: None)
    assert result.passed and calls == [{}, {graph: 1}, {graph: 2}]  # 1, then 1 more
    quantization = result.manifest["quantization"]
    promoted = quantization["promoted"]
    assert list(promoted) == [graph] and len(promoted[graph]) == 2
    rounds = quantization["keep_until_pass"]
    assert [r["graph"] for r in rounds] == [graph, graph] and rounds[-1]["passed"]
    assert all(r["worst_cosine_after"] > r["worst_cosine_before"] for r in rounds)
    step = next(iter(promoted[graph].values()))
    written = onnx.load(str(result.path / f"{graph}.onnx"), load_external_data=False)
    names = {i.name for i in written.graph.initializer}
    if PRESETS[recipe]().graphs[graph].precision == "int8-dynamic":  # the encoder of int4: a dynamic INT8 MatMul -> fp32
        assert (step["before"], step["after"]) == ("int8-dynamic", "fp32")
        assert all(n in names and f"{n}_quantized" not in names for n in promoted[graph])
    elif recipe == "int4-trt":  # GPU graphs: INT4 -> fp16 (no INT8 weight-only GEMM in TensorRT 10)
        assert (step["before"], step["after"]) == ("int4", "fp16")
        assert all(n in names for n in promoted[graph])
    else:  # CPU INT4 -> INT8
        assert (step["before"], step["after"]) == ("int4", "int8")
        assert all(quantization["weights"][graph][n]["bits"] == 8 for n in promoted[graph])
    assert all(w["bytes_added"] > 0 for w in promoted[graph].values())
    # the most sensitive first: the promoted weights' weighted errors are the graph's largest
    errors = [w["weighted_error"] for w in promoted[graph].values()]
    assert errors == sorted(errors, reverse=True)


def test_rounds_that_cannot_help_stop_and_the_advice_names_the_graph(synthetic_artifact, tmp_path):
    calls = []
    recipe = PRESETS["int4"]()
    never = planted("decoder", 10**6, gain=0.0, calls=calls)
    result = quantize_artifact(synthetic_artifact, tmp_path / "out", recipe, verify=never, keep_until_pass=True,
                               log=lambda m: None)
    assert not result.passed
    rounds = result.manifest["quantization"]["keep_until_pass"]
    assert len(rounds) == 3 and {r["graph"] for r in rounds} == {"decoder"}  # three rounds without a new best
    assert [len(r["weights"]) for r in rounds] == [1, 1, 2]
    said = advice(result.report, recipe, keep_until_pass=True, promoted=result.manifest["quantization"]["promoted"])
    assert said.startswith("the decoder fails") and '"decoder": {"precision": "int8"}' in said
    assert "--keep-until-pass" not in said  # not suggested again
    fresh = advice(result.report, recipe, keep_until_pass=False)
    assert "try --keep-until-pass" in fresh


def test_a_failure_where_the_recipe_quantizes_nothing_is_not_blamed_on_quantization(synthetic_artifact, tmp_path):
    calls = []
    recipe = PRESETS["int4"]()  # the adapter is dynamic INT8 there; keep it fp32 and plant the failure in it
    recipe.graphs["adapter"] = type(recipe.graphs["adapter"])("fp32")
    result = quantize_artifact(synthetic_artifact, tmp_path / "out", recipe, verify=planted("adapter", 1, calls=calls),
                               keep_until_pass=True, log=lambda m: None)
    assert not result.passed and len(calls) == 1 and result.manifest["quantization"]["keep_until_pass"] == []
    said = advice(result.report, recipe, keep_until_pass=True)
    assert said.startswith("the adapter fails") and "quantization is not the cause" in said


def test_the_random_weight_encoder_under_int4_trt_passes_with_encoder_weights_kept(synthetic_checkpoint, tmp_path, capsys):
    """The reported case: an int4-trt export of a random-weight checkpoint fails on the encoder;
    --keep-until-pass keeps encoder weights in fp16 (not decoder weights) until it passes."""
    out = tmp_path / "trt"
    code = main(["export", str(synthetic_checkpoint), "-o", str(out), "--recipe", "int4-trt", "--steps", "8",
                 "--keep-until-pass"])
    printed = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    rounds = manifest["quantization"]["keep_until_pass"]
    assert rounds and rounds[0]["graph"] == "encoder"
    assert all(w["after"] == "fp16" for w in manifest["quantization"]["promoted"]["encoder"].values())
    assert "promoted: encoder:" in printed.out
    if code == 0:
        assert manifest["parity"]["passed"]
    else:  # it may stop short of passing; then it says which graph and what recipe change
        assert '"precision": "fp32", "dtype": "fp16"' in printed.err
    assert main(["info", str(out)]) == 0
    assert "promoted  encoder:" in capsys.readouterr().out


def test_presets_that_pass_promote_nothing(packaged_artifacts, tmp_path):
    """The packaged model's int4 preset passes its check: --keep-until-pass changes nothing."""
    plain = quantize_artifact(packaged_artifacts["fp32"], tmp_path / "plain", load_recipe("int4"), log=lambda m: None)
    kept = quantize_artifact(packaged_artifacts["fp32"], tmp_path / "kept", load_recipe("int4"), keep_until_pass=True,
                             log=lambda m: None)
    assert plain.passed and kept.passed
    assert kept.manifest["quantization"].get("keep_until_pass") is None and "promoted" not in kept.manifest["quantization"]
    assert {n: e["files"] for n, e in plain.manifest["graphs"].items()} == \
        {n: e["files"] for n, e in kept.manifest["graphs"].items()}
