"""The paths that make full-size models fit (issue 14), run here at test sizes: the reference
model one layer at a time, export straight to a quantized artifact, memory checks up front."""

import json

import numpy as np
import pytest
import torch

from moss_edge.export import verify
from moss_edge.export.checkpoint import load_model, read_token_ids, reference_bytes
from moss_edge.export.config import load_config
from moss_edge.export.reference import ReferencePipeline
from moss_edge.quantize.artifact import export_quantized, quantize_artifact
from moss_edge.quantize.recipe import load_recipe
from moss_edge.runtime.audio import load_audio
from moss_edge.runtime.errors import MossEdgeError


def _run(ref: ReferencePipeline, wave: np.ndarray):
    features = ref.encode([wave])
    prompt = [ref.ids.audio_start, *[ref.ids.audio_token] * len(features.embeds), ref.ids.audio_end]
    prefill = ref.prefill(prompt, features)
    return features, prefill, ref.step(int(np.argmax(prefill))), ref.step(3)


def test_piecewise_reference_equals_the_whole_model_and_holds_no_layer(synthetic_checkpoint, upstream):
    ids = read_token_ids(synthetic_checkpoint)
    wave = load_audio(upstream["audio"])
    whole = _run(ReferencePipeline(load_model(synthetic_checkpoint, torch.float32), ids), wave)
    model = load_model(synthetic_checkpoint, torch.float32, piecewise=True)
    pieces = _run(ReferencePipeline(model, ids), wave)
    for a, b in zip([*whole[0].__dict__.values()][:4] + list(whole[1:]), [*pieces[0].__dict__.values()][:4] + list(pieces[1:])):
        np.testing.assert_array_equal(a, b)
    # between calls all but the encoder stem and the norms is unloaded
    for module in (model.language_model.layers, model.audio_encoder.layers, model.audio_adapter, model.lm_head,
                   model.language_model.embed_tokens, model.deepstack_audio_merger_list):
        assert all(p.is_meta for p in module.parameters())
    assert not model.audio_encoder.conv1.weight.is_meta and not model.language_model.norm.weight.is_meta
    cfg = load_config(synthetic_checkpoint)
    assert reference_bytes(cfg, piecewise=True) < reference_bytes(cfg, piecewise=False)


def test_export_with_a_recipe_writes_what_export_then_quantize_writes(upstream, fixture_artifact, tmp_path):
    """INT4 RTN (no calibration): the same bytes either way; no fp32 graph and no traced-graphs
    folder is left behind; the manifest names the checkpoint as the source."""
    recipe = load_recipe("int4")
    direct = export_quantized(upstream["checkpoint"], tmp_path / "direct", recipe, token_ids=upstream["ids"],
                              verify=False, log=lambda m: None)
    two_step = quantize_artifact(fixture_artifact, tmp_path / "two-step", recipe, verify=False, log=lambda m: None)
    for f in ("decoder.onnx", "decoder.onnx.data", "decoder_ort.onnx", "encoder.onnx"):
        assert (direct.path / f).read_bytes() == (two_step.path / f).read_bytes(), f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct", "two-step"]
    assert "weights-in-checkpoint" not in {p.name for p in direct.path.iterdir()}
    manifest = json.loads((direct.path / "manifest.json").read_text())
    assert "weights_in_checkpoint" not in manifest and "unfinished" not in manifest
    assert manifest["quantization"]["from"] == str(upstream["checkpoint"].resolve())
    assert manifest["decoders"] == {"cpu": "decoder_ort"}
    assert {g: e["precision"] for g, e in manifest["graphs"].items()} == \
        {g: e["precision"] for g, e in two_step.manifest["graphs"].items()}


def test_export_with_awq_calibrates_on_the_reference_and_passes_parity(synthetic_checkpoint, tmp_path):
    """AWQ statistics from the PyTorch model run layer by layer: the artifact passes the INT4 gate
    against a piecewise reference, and the report says which reference it was."""
    result = export_quantized(synthetic_checkpoint, tmp_path / "awq", load_recipe("int4-awq"),
                              verify=verify.Verifier(steps=8), log=lambda m: None)
    assert result.passed, result.report["summary"]["failures"]
    weights = result.manifest["quantization"]["weights"]["decoder"]
    assert any(w["awq"] for w in weights.values())  # the statistics reached the quantizer
    assert result.report["reference"].startswith("fp32 PyTorch")


def test_a_recipe_that_needs_fp32_graphs_is_refused_before_any_work(synthetic_checkpoint, tmp_path):
    with pytest.raises(MossEdgeError, match="export the fp32 artifact first"):
        export_quantized(synthetic_checkpoint, tmp_path / "w8a8", load_recipe("w8a8"), log=lambda m: None)
    assert not list(tmp_path.iterdir())


def test_reference_is_loaded_piecewise_when_memory_is_short_and_refused_when_even_that_does_not_fit(
        synthetic_artifact, synthetic_checkpoint, monkeypatch):
    cfg = load_config(synthetic_checkpoint)
    on_disk = sum(p.stat().st_size for p in synthetic_artifact.iterdir())
    whole, pieces = reference_bytes(cfg, False), reference_bytes(cfg, True)
    monkeypatch.setattr(verify, "available_memory", lambda: int(1.5 * (whole + on_disk)))
    assert verify.reference_model(synthetic_checkpoint, synthetic_artifact).piecewise
    monkeypatch.setattr(verify, "available_memory", lambda: 4 * (whole + on_disk))
    assert not verify.reference_model(synthetic_checkpoint, synthetic_artifact).piecewise
    monkeypatch.setattr(verify, "available_memory", lambda: (pieces + on_disk) // 2)
    with pytest.raises(MossEdgeError, match="GiB is available"):
        verify.reference_model(synthetic_checkpoint, synthetic_artifact)


def test_an_export_that_cannot_fit_is_refused_before_any_work(synthetic_checkpoint, tmp_path, monkeypatch):
    from moss_edge.quantize import preflight

    recipe = load_recipe("int4-awq")
    e = preflight.estimate(load_config(synthetic_checkpoint), recipe)
    assert 0 < e.artifact_bytes < e.memory_bytes
    monkeypatch.setattr(preflight, "available_memory", lambda: e.memory_bytes // 2)
    with pytest.raises(MossEdgeError, match="GiB of memory"):
        export_quantized(synthetic_checkpoint, tmp_path / "a", recipe, log=lambda m: None)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: type("Usage", (), {"free": e.artifact_bytes // 2})())
    with pytest.raises(MossEdgeError, match="GiB free"):
        export_quantized(synthetic_checkpoint, tmp_path / "b", recipe, log=lambda m: None)
    assert not list(tmp_path.iterdir())


def test_cli_export_with_a_recipe(upstream, tmp_path):
    from moss_edge.cli import main

    out = tmp_path / "int4"
    ids = upstream["ids"]
    assert main(["export", str(upstream["checkpoint"]), "-o", str(out), "--recipe", "int4", "--no-verify",
                 "--audio-token-id", str(ids.audio_token), "--audio-start-id", str(ids.audio_start),
                 "--audio-end-id", str(ids.audio_end)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["decoder"]["precision"] == "int4" and manifest["quantization"]["recipe"]["name"] == "int4"


def test_checkpoint_hashes_are_remembered_until_a_file_changes(synthetic_checkpoint, tmp_path, monkeypatch):
    import shutil

    from moss_edge.export import checkpoint

    monkeypatch.setenv("MOSS_EDGE_CACHE", str(tmp_path / "cache"))
    copy = shutil.copytree(synthetic_checkpoint, tmp_path / "ckpt")
    first = checkpoint.checkpoint_hash(copy)
    reads = []
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: reads.append(p) or "x")
    assert checkpoint.checkpoint_hash(copy) == first and not reads  # nothing read again
    config = copy / "config.json"
    config.write_text(config.read_text() + " ")
    assert checkpoint.checkpoint_hash(copy) != first and reads == [config]  # only the changed file


def test_the_memory_estimate_covers_what_was_measured():
    """benchmarks/memory_estimate.py measured `export --recipe` at 4B widths: every peak is at or
    below the preflight estimate for the same config and available memory, and within 25% of it."""
    import json
    from pathlib import Path

    from moss_edge.export.synthetic import preset
    from moss_edge.quantize.preflight import estimate

    measured = json.loads((Path(__file__).parents[1] / "benchmarks" / "memory-estimate.json").read_text())
    full = [r for r in measured["full_depth"] if "measured" in r]
    assert len(measured["rows"]) == 9 and full
    for row in measured["rows"] + full:
        cfg = preset("4b", encoder_layers=row.get("layers"), decoder_layers=row.get("layers"))
        e = estimate(cfg, load_recipe(row["preset"]), measured["available_bytes"]).memory_bytes
        assert row["measured"] <= e <= 1.25 * row["measured"], row
