"""Parity on the device: every verified artifact carries the PyTorch model's answers
(reference.npz), and `verify` holds the artifact to them with neither torch nor onnx imported,
with the same figures as the PyTorch-based check; planted faults fail it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from moss_edge import bundled_audio
from moss_edge.cli import main
from moss_edge.export.verify import Verifier
from moss_edge.quantize.artifact import quantize_artifact
from moss_edge.quantize.recipe import load_recipe
from moss_edge.runtime.artifact import sha256_file
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.parity import RECORDING, Recording
from moss_edge.runtime.pipeline import Pipeline

# Runs the CLI with torch and onnx made unimportable, and fails if either got imported anyway.
RUNTIME_ONLY = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnx_ir", "onnxscript"):
            raise ImportError(name + " is not installed in this runtime-only test")
sys.meta_path.insert(0, Blocked())
from moss_edge import bundled_audio
from moss_edge.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
sys.exit(code if not leaked else f"imported {leaked}")
"""


def _runtime_only(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNTIME_ONLY, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The packaged model exported (verified: it records the answers) and quantized INT4 AWQ,
    verified (the PyTorch model's answers again) and unverified (the export's, copied)."""
    from moss_edge.demo import TRAINED
    from moss_edge.export.onnx_export import export_artifact

    root = tmp_path_factory.mktemp("recorded")
    fp32 = export_artifact(TRAINED, root / "fp32", verify_steps=8, log=lambda m: None)
    verified = quantize_artifact(fp32, root / "int4", load_recipe("int4-awq"), verify=Verifier(steps=16), log=lambda m: None)
    unverified = quantize_artifact(fp32, root / "int4-unverified", load_recipe("int4-awq"), verify=False, log=lambda m: None)
    return {"fp32": fp32, "int4": verified, "unverified": unverified.path}


def _copy(artifact: Path, dst: Path) -> Path:
    shutil.copytree(artifact, dst)
    return dst


def _rehash(artifact: Path, file: str) -> None:
    """Record `file`'s new sha256 wherever the manifest names it (a fault that passes the hash check)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    digest = sha256_file(artifact / file)
    for entry in manifest["graphs"].values():
        if file in entry["files"]:
            entry["files"][file] = digest
    if manifest.get("reference", {}).get("file") == file:
        manifest["reference"]["sha256"] = digest
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_artifacts_carry_the_models_answers(recorded):
    manifest = recorded["int4"].manifest
    entry = manifest["reference"]
    assert entry["file"] == RECORDING and entry["source_sha256"] == manifest["source"]["sha256"]
    assert entry["steps"] == 16 and entry["top_k"] == manifest["model"]["vocab_size"]  # the whole distribution here
    rec = Recording.load(recorded["int4"].path / RECORDING)
    assert rec.steps == 16 and rec.top_ids.shape == (16, 64) and np.all(np.diff(rec.top_logits, axis=1) <= 0)
    assert entry["bytes"] < 2 << 20  # the packaged model's clip, features and logits: under 2 MB
    # quantized without a check: the source's recording (the PyTorch model's, made by export), as it was
    unverified = json.loads((recorded["unverified"] / "manifest.json").read_text())["reference"]
    assert unverified == json.loads((recorded["fp32"] / "manifest.json").read_text())["reference"]


def test_verify_without_torch_gives_the_pytorch_figures(recorded, tmp_path):
    out = _runtime_only("verify", str(recorded["int4"].path), "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    report, pytorch = json.loads((tmp_path / "r.json").read_text()), recorded["int4"].report
    assert report["reference"].startswith("recorded answers") and pytorch["reference"].startswith("fp32 PyTorch")
    assert report["graphs"].keys() == pytorch["graphs"].keys()
    for graph, outputs in report["graphs"].items():
        for name, figures in outputs.items():
            for key in ("max_abs", "rel", "cosine"):
                assert abs(figures[key] - pytorch["graphs"][graph][name][key]) <= 1e-6, (graph, name, key)
    for name, figures in report["end_to_end_by_decoder"].items():
        for key in ("kl_mean", "kl_max", "greedy_match", "top1_decided"):
            assert abs(figures[key] - pytorch["end_to_end_by_decoder"][name][key]) <= 1e-6, (name, key)


def test_a_weight_scaled_tenfold_fails_it(recorded, tmp_path):
    faulty = _copy(recorded["int4"].path, tmp_path / "faulty")
    decoder = onnx.load(str(faulty / "decoder.onnx"), load_external_data=False)
    scale = next(t for t in decoder.graph.initializer if t.name.endswith("layers.0.mlp.down_proj.weight_t_scale"))
    info = {e.key: e.value for e in scale.external_data}
    with open(faulty / info["location"], "r+b") as f:
        f.seek(int(info["offset"]))
        values = np.frombuffer(f.read(int(info["length"])), np.float32) * 10
        f.seek(int(info["offset"]))
        f.write(values.tobytes())
    _rehash(faulty, info["location"])
    out = _runtime_only("verify", str(faulty))
    assert out.returncode == 1 and "FAILED" in out.stdout, out.stdout + out.stderr


def test_another_artifacts_recording_is_refused(recorded, fixture_artifact, tmp_path):
    swapped = _copy(recorded["int4"].path, tmp_path / "swapped")
    other = tmp_path / "other.npz"
    Recording.load(recorded["int4"].path / RECORDING).save(other)
    rec = Recording.load(other)
    rec.source_sha256 = json.loads((fixture_artifact / "manifest.json").read_text())["source"]["sha256"]
    rec.save(swapped / RECORDING)
    out = _runtime_only("verify", str(swapped))  # the manifest's hash no longer matches: refused at load
    assert out.returncode == 2 and "does not match its sha256" in out.stderr, out.stdout + out.stderr
    _rehash(swapped, RECORDING)
    out = _runtime_only("verify", str(swapped))  # hashed again: the recording names another checkpoint
    assert out.returncode == 2 and "come from another checkpoint" in out.stderr, out.stdout + out.stderr


def test_pipeline_check_at_start_up(recorded, packaged_artifacts):
    pipe = Pipeline.load(recorded["int4"].path)
    report = pipe.check()
    assert report["summary"]["passed"] and report["summary"]["decoder"] == pipe.decoder_graph
    assert list(report["end_to_end_by_decoder"]) == [pipe.decoder_graph]  # the pipeline as loaded, nothing else
    assert len(pipe.generate(bundled_audio(), "What happens?", max_new_tokens=2).tokens) <= 2  # it serves on
    with pytest.raises(MossEdgeError, match="carries no recorded reference answers"):
        Pipeline.load(packaged_artifacts["int4"]).check()


def test_serve_refuses_an_artifact_that_fails_its_check(recorded, tmp_path, monkeypatch):
    pytest.importorskip("pytriton", reason="the serve extra is not installed")
    import moss_edge.serve

    started = []
    monkeypatch.setattr(moss_edge.serve, "serve", lambda *a, **k: started.append(a))
    faulty = _copy(recorded["int4"].path, tmp_path / "faulty")
    rec = Recording.load(faulty / RECORDING)
    rec.prefill_logits = -rec.prefill_logits  # answers the artifact cannot give
    rec.top_ids = rec.top_ids[:, ::-1].copy()
    rec.save(faulty / RECORDING)
    _rehash(faulty, RECORDING)
    assert main(["serve", str(faulty), "--check"]) == 2 and not started
    assert main(["serve", str(recorded["int4"].path), "--check"]) == 0 and len(started) == 1
