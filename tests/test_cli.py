"""The command line as a user drives it: subprocesses, exit codes, messages without tracebacks."""

import json
import shutil
import subprocess
import sys

import pytest

from moss_edge import bundled_audio


def moss(*args, check=False):
    out = subprocess.run([sys.executable, "-m", "moss_edge.cli", *map(str, args)], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(out.stderr)
    return out


def test_help_has_examples():
    out = moss("--help", check=True)
    for command in ("export", "quantize", "verify", "run", "bench", "demo", "info"):
        assert command in out.stdout
    assert "example" in moss("run", "--help", check=True).stdout


def test_run_info_and_verify(synthetic_artifact, synthetic_checkpoint, tmp_path):
    out = moss("run", synthetic_artifact, "--audio", bundled_audio(), "--prompt", "What is said?",
               "--max-new-tokens", "6", "--json", check=True)
    result = json.loads(out.stdout)
    assert len(result["tokens"]) <= 6 and result["timings"]["encode_s"] > 0
    sessions = result["settings"]["sessions"]  # what ran, recorded: providers, options, threads
    assert set(sessions) == {"encoder", "adapter", result["settings"]["decoder"]}
    assert all(s["providers"] == ["CPUExecutionProvider"] and s["intra_op_threads"] >= 1 for s in sessions.values())
    info = moss("info", synthetic_artifact, check=True).stdout
    assert "decoder" in info and "fp32" in info and "parity passed" in info
    report = tmp_path / "parity.json"
    out = moss("verify", synthetic_artifact, "--reference", synthetic_checkpoint, "--steps", "4", "--json", report,
               "--markdown", tmp_path / "parity.md", check=True)
    assert "PASSED" in out.stdout and json.loads(report.read_text())["summary"]["passed"]


def test_bad_audio_path(synthetic_artifact):
    out = moss("run", synthetic_artifact, "--audio", "/no/such/clip.wav", "--prompt", "hi")
    assert out.returncode == 2 and "audio file not found: /no/such/clip.wav" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_artifact():
    out = moss("run", "/no/such/artifact", "--audio", bundled_audio(), "--prompt", "hi")
    assert out.returncode == 2 and "artifact not found" in out.stderr and "Traceback" not in out.stderr


def test_corrupted_manifest(synthetic_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(synthetic_artifact, art)
    (art / "manifest.json").write_text('{"format": "moss-edge-artifact", "format_')
    out = moss("info", art)
    assert out.returncode == 2 and "corrupted" in out.stderr and "Traceback" not in out.stderr


def test_export_refuses_to_overwrite(synthetic_checkpoint, synthetic_artifact):
    out = moss("export", synthetic_checkpoint, "-o", synthetic_artifact)
    assert out.returncode == 2 and "already exists" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["quantize", "ART", "-o", "OUT", "--recipe", "int5"], "neither a preset"),
    (["run", "ART", "--audio", "A", "--prompt-ids", "1,x"], "integers"),
])
def test_bad_arguments(synthetic_artifact, tmp_path, args, message):
    args = [a.replace("ART", str(synthetic_artifact)).replace("OUT", str(tmp_path / "o")).replace("A", bundled_audio())
            if a in ("ART", "OUT", "A") else a for a in args]
    out = moss(*args)
    assert out.returncode == 2 and message in out.stderr


def test_one_name_per_idea_and_the_version(synthetic_checkpoint, tmp_path):
    """--steps is the parity check's decode steps in export, quantize and verify; --no-verify skips it."""
    assert moss("--version", check=True).stdout.strip().startswith("moss-edge ")
    for command in ("export", "quantize", "verify"):
        assert "--steps" in moss(command, "--help", check=True).stdout
    out = moss("export", synthetic_checkpoint, "-o", tmp_path / "x", "--steps", "0")
    assert out.returncode == 2 and "--no-verify skips the check" in out.stderr and not (tmp_path / "x").exists()
    out = moss("export", synthetic_checkpoint, "-o", tmp_path / "x", "--verify-steps", "4")
    assert out.returncode == 2 and "unrecognized arguments: --verify-steps" in out.stderr


def test_export_and_quantize_write_the_artifact_card(synthetic_artifact, tmp_path):
    card = (synthetic_artifact / "README.md").read_text()  # export, verified
    assert "## Parity with the fp32 PyTorch model" in card and "| encoder | audio_tokens |" in card
    assert "moss-edge verify synthetic --provider cpu" in card and "Runs on: cpu" in card
    out = moss("quantize", synthetic_artifact, "-o", tmp_path / "int4-trt", "--recipe", "int4-trt", "--no-verify", check=True)
    card = (tmp_path / "int4-trt" / "README.md").read_text()
    assert out.returncode == 0 and "recipe `int4-trt`" in card and "## Jetson memory plan" in card
    assert "tensorrt-10.3   PASS" in card and "--provider tensorrt" in card
