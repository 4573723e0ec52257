"""Parity gates that mean what they say, and no weight left at higher precision without a word.

Each test plants one failure (a NaN weight, steps that are all near-ties, a failed gate, a
small-vocabulary checkpoint without processor_config.json, weights whose input size is not a
multiple of the block) and checks that it is reported."""

import json
import shutil
import warnings

import onnx
import pytest
from safetensors.torch import load_file, save_file

from moss_edge.cli import main
from moss_edge.commands import _print_summary
from moss_edge.export.verify import Verifier
from moss_edge.runtime.parity import THRESHOLDS, decode_figures, gate, report_markdown
from moss_edge.quantize.artifact import quantize_artifact
from moss_edge.quantize.plan import FLOAT_TYPES
from moss_edge.quantize.recipe import PRESETS
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.pipeline import ParityWarning, Pipeline


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_small_vocab_checkpoint_without_processor_config(upstream, tmp_path, capsys):
    out = tmp_path / "fixture"
    assert main(["export", str(upstream["checkpoint"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "outside the vocabulary of 1024" in err and "--audio-token-id" in err and "--audio-end-id" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    ids = upstream["ids"]
    assert main(["export", str(upstream["checkpoint"]), "-o", str(out), "--steps", "8",
                 "--audio-token-id", str(ids.audio_token), "--audio-start-id", str(ids.audio_start),
                 "--audio-end-id", str(ids.audio_end)]) == 0
    manifest = _manifest(out)
    assert manifest["parity"]["passed"]
    assert (manifest["token_ids"]["audio_token"], manifest["token_ids"]["audio_start"]) == (ids.audio_token, ids.audio_start)
    assert main(["export", str(upstream["checkpoint"]), "-o", str(tmp_path / "x"), "--digit-ids", "1,2,3"]) == 2
    assert "ten ids" in capsys.readouterr().err


@pytest.fixture(scope="module")
def nan_checkpoint(synthetic_checkpoint, tmp_path_factory):
    """The synthetic checkpoint with one NaN in a decoder weight."""
    root = tmp_path_factory.mktemp("nan") / "ckpt"
    shutil.copytree(synthetic_checkpoint, root)
    for shard in root.glob("*.safetensors"):
        tensors = load_file(str(shard))
        name = next((n for n in tensors if "layers.1.mlp.down_proj.weight" in n and "language_model" in n), None)
        if name:
            tensors[name][3, 5] = float("nan")
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return root
    raise AssertionError("no decoder down_proj weight in the synthetic checkpoint")


def test_nan_weight_fails_every_gate(nan_checkpoint, synthetic_checkpoint, tmp_path, capsys):
    fp32 = tmp_path / "fp32"
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(nan_checkpoint), "-o", str(fp32), "--steps", "4"])
    assert exit_.value.code == 1
    out = capsys.readouterr()
    assert "parity FAILED" in out.out and "NaN" in out.out and "FAILED its parity check" in out.err
    parity = _manifest(fp32)["parity"]
    assert not parity["passed"] and any("NaN or infinite" in f for f in parity["failures"])

    main(["info", str(fp32)])
    assert capsys.readouterr().out.startswith("FAILED")
    with pytest.warns(ParityWarning, match="FAILED its parity check"):
        Pipeline.load(fp32)

    int4 = tmp_path / "int4"
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(fp32), "-o", str(int4), "--recipe", "int4", "--steps", "4", "--task-examples", "0",
              "--cache-dir", str(tmp_path / "cache")])
    assert exit_.value.code == 1
    out = capsys.readouterr()
    assert "--keep-until-pass" in out.err and "kept: encoder:" in out.out
    assert not _manifest(int4)["parity"]["passed"]

    # against a checkpoint it was not exported from: said up front, not failed inside ONNX Runtime
    assert main(["verify", str(int4), "--reference", str(synthetic_checkpoint)]) == 2
    assert "is not the checkpoint" in capsys.readouterr().err
    # without --reference, the checkpoint the manifest records: found, compared, and failed again
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(int4), "--steps", "4", "--task-examples", "0"])
    assert exit_.value.code == 1 and "NaN or infinite" in capsys.readouterr().out
    # from Python as from the CLI, a wrong reference is refused before any quantization work
    with pytest.raises(MossEdgeError, match="is not the checkpoint"):
        quantize_artifact(fp32, tmp_path / "again", PRESETS["int4"](), verify=Verifier(synthetic_checkpoint))
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again.*"))


def test_steps_that_are_all_near_ties_report_no_top1():
    steps = [{"step": i, "kl": 1e-4, "max_abs": 0.5, "top1_agree": i % 2 == 0, "near_tie": True} for i in range(8)]
    figures = decode_figures(steps, [1] * 8, [1] * 8)
    assert figures["top1_agreement"] is None and figures["top1_decided"] == 0
    finite = {"max_abs": 0.0, "rel": 0.0, "cosine": 1.0, "finite": True}
    graphs = {"decoder": {"prefill_logits": finite}}
    assert gate(graphs, figures, THRESHOLDS["int4"]) == []  # the KL and greedy gates still stand
    report = {"artifact": "a", "audio": ["x.flac"], "prompt_tokens": 9, "graphs": graphs, "end_to_end": figures,
              "summary": {"passed": True, "precision": "int4", "steps": 8, "failures": []}}
    assert "n/a (all 8 steps were near-ties)" in report_markdown(report)
    # one decided step that disagrees is measured, and fails
    steps[0].update(near_tie=False, top1_agree=False)
    figures = decode_figures(steps, [1] * 8, [1] * 8)
    assert figures["top1_agreement"] == 0.0 and any("top-1" in f for f in gate(graphs, figures, THRESHOLDS["int4"]))
    nan_graph = {"decoder": {"prefill_logits": {**finite, "cosine": float("nan"), "finite": False}}}
    assert any("NaN" in f for f in gate(nan_graph, decode_figures(steps, [1], [1]), THRESHOLDS["fp32"]))


def test_print_summary_with_no_top1(capsys):
    _print_summary({"passed": True, "precision": "int4", "steps": 8, "worst_cosine": 0.99, "prefill_logits_rel": 0.1,
                    "kl_mean": 1e-3, "top1_agreement": None, "top1_decided": 0, "greedy_match": 1.0, "failures": []})
    assert "top-1 n/a (all 8 steps were near-ties)" in capsys.readouterr().out


def _weights(graph):
    """Initializers used as MatMul/Gemm/Conv weights or Gather tables, with their dtype."""
    model = onnx.load(str(graph), load_external_data=False)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    used = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1}
    used |= {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    return {name: inits[name] for name in used if name in inits}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_lists_each_weight_kept_more_precise(fixture_artifact, preset, tmp_path):
    """The fixture's widths (hidden 64, vocab 1024) are not multiples of the presets' block of
    128: every decoder weight is still quantized, and whatever stays in floating point anywhere
    is listed with a reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = quantize_artifact(fixture_artifact, tmp_path / preset, PRESETS[preset](), cache_dir=tmp_path / "cache",
                                verify=False, log=lambda m: None).path
    listed = _manifest(out)["quantization"]["higher_precision"]
    for graph in ("encoder", "adapter", "decoder"):
        before = _weights(fixture_artifact / f"{graph}.onnx")
        after = _weights(out / f"{graph}.onnx")
        still_float = {n for n in before if after.get(n) in FLOAT_TYPES}
        assert still_float <= set(listed[graph]), (graph, still_float - set(listed[graph]))
        assert all(w["reason"] for w in listed[graph].values())
    recipe = PRESETS[preset]()
    # nothing skipped for its shape; the TensorRT recipes keep the embedding table in fp16, and say so
    kept = [(w["precision"], w["reason"]) for w in listed["decoder"].values()]
    assert kept == ([("fp16", "the recipe's embedding precision is fp16")] if recipe.graphs["decoder"].embedding == "fp16"
                    else [])
    if recipe.graphs["encoder"].precision != "fp32":
        assert {w["reason"].split(":")[0] for w in listed["encoder"].values()} == {"Conv weight"}
    if recipe.graphs["adapter"].precision == "fp32":
        assert all(w["reason"] == "the recipe keeps this graph fp32" for w in listed["adapter"].values())


def test_keep_pattern_is_listed(fixture_artifact, tmp_path):
    recipe = PRESETS["int4"]()
    recipe.graphs["decoder"].keep = ["layers.0."]
    out = quantize_artifact(fixture_artifact, tmp_path / "kept", recipe, verify=False, log=lambda m: None).path
    listed = _manifest(out)["quantization"]["higher_precision"]["decoder"]
    assert listed and all("layers.0." in n and "'layers.0.'" in w["reason"] for n, w in listed.items())
    assert sum(w["parameters"] for w in listed.values()) > 0
