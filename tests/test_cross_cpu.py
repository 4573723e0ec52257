"""Artifacts made here, answered where users run them: on the oldest onnxruntime the package
declares (a virtual environment with only the runtime), and on ARM64 (an aarch64 Python under
user-mode qemu, on the Cortex-A76 feature set of a Jetson Orin or a Raspberry Pi 5 and on a
Neoverse-V1's, an AWS Graviton3: i8mm and SVE). Both environments are made by tools/cross_cpu/runtime_env.py (.ci/run
makes them); each test skips only where its environment or qemu-aarch64 is absent."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from moss_edge import bundled_audio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "cross_cpu"))
import runtime_env  # noqa: E402

ANSWERS = REPO / "tools" / "cross_cpu" / "answers.py"
FLOOR, AARCH64 = REPO / ".ort-floor-venv", REPO / ".aarch64-env"
CLIP = bundled_audio("speech_zh_4s.flac")


def _made(env: Path) -> bool:
    return (env / "env.json").is_file()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The packaged model exported with its recorded reference answers, quantized int4-awq, and
    int4-long (its KV cache in int8; the streams run on it)."""
    from moss_edge.demo import TRAINED
    from moss_edge.export.onnx_export import export_artifact
    from moss_edge.quantize.artifact import quantize_artifact
    from moss_edge.quantize.recipe import load_recipe

    root = tmp_path_factory.mktemp("xcpu")
    fp32 = export_artifact(TRAINED, root / "fp32", verify_steps=4, log=lambda m: None)
    int4 = quantize_artifact(fp32, root / "int4", load_recipe("int4-awq"), log=lambda m: None).path
    long = quantize_artifact(fp32, root / "int4-long", load_recipe("int4-long"), log=lambda m: None).path
    return {"fp32": fp32, "int4": int4, "int4-long": long}


def _answers(run, out: Path, artifacts: list[Path]) -> dict:
    done = run([str(ANSWERS), str(out), *map(str, artifacts), f"--clip={CLIP}", "--tokens=12", f"--stream-on={artifacts[-1]}"])
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def here(recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("here") / "answers.npz"
    run = lambda args: subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)  # noqa: E731
    return _answers(run, out, list(recorded.values()))


def _default_decoder(answers: dict, artifact: str) -> str:
    return json.loads(str(answers[f"{artifact}/settings"]))["default"]["decoder"]


def _same_answers(here: dict, there: dict) -> int:
    """Tokens equal everywhere; prompt logits exact for fp32 (float summation order only) and
    within what dynamic INT8's rounding flips give for the quantized artifact. A way of running
    the prompt that the onnxruntime there cannot run (an int8 KV cache needs 1.27) is absent
    there, and its default path is then the portable decoder: compared where both ran the same.
    How many answers were compared."""
    compared = 0
    for key, value in here.items():
        artifact = key.split("/")[0]
        if key not in there:
            way = key.split("/")[2]
            assert "not run" in json.loads(str(there[f"{artifact}/settings"]))[way], key
            continue
        if key.split("/")[1:2] in (["tokens"], ["stream_exact"], ["stream_causal"]) and \
                _default_decoder(here, artifact) != _default_decoder(there, artifact):
            assert _default_decoder(there, artifact) == "decoder", key  # the fallback
            continue
        if key.split("/")[1:2] in (["tokens"], ["stream_exact"], ["stream_causal"]):
            assert np.array_equal(value, there[key]), (key, value, there[key])
            compared += 1
        elif "/logits/" in key:
            a, b = value.astype(np.float64).ravel(), there[key].astype(np.float64).ravel()
            cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            if key.startswith("fp32/"):
                assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), key
            else:
                assert cosine > 0.999, (key, cosine)
            compared += 1
    return compared


@pytest.mark.skipif(not _made(FLOOR), reason=f"no {FLOOR.name}: python tools/cross_cpu/runtime_env.py venv {FLOOR.name} "
                                             "--onnxruntime 1.20.1")
def test_artifacts_answer_alike_on_the_oldest_onnxruntime_declared(recorded, here, tmp_path):
    floor = json.loads((FLOOR / "env.json").read_text())["onnxruntime"]
    declared = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                    if d.startswith("onnxruntime"))
    lowest = declared.split(">=")[1].split(",")[0]
    assert floor == lowest or floor.startswith(lowest + "."), (declared, floor)  # the floor tested is the one declared
    there = _answers(lambda args: runtime_env.run(FLOOR, None, args, capture_output=True, text=True, timeout=600),
                     tmp_path / "floor.npz", list(recorded.values()))
    assert str(there["onnxruntime"]) == floor
    # fp32: 2 prompt ways + tokens; int4: 3 ways + tokens (every graph loaded); int4-long: the
    # portable way (its int8 cache needs onnxruntime 1.27: the other ways and the streams are not run)
    assert _same_answers(here, there) >= 8


aarch64 = pytest.mark.skipif(not _made(AARCH64),
                             reason=f"no {AARCH64.name}: python tools/cross_cpu/runtime_env.py aarch64 {AARCH64.name}")


@aarch64
@pytest.mark.parametrize("cpu", ["cortex-a76", "neoverse-v1"])
def test_artifacts_made_on_x86_answer_alike_on_aarch64(recorded, here, cpu, tmp_path):
    there = _answers(lambda args: runtime_env.run(AARCH64, cpu, args, capture_output=True, text=True, timeout=1200),
                     tmp_path / f"{cpu}.npz", list(recorded.values()))
    assert str(there["machine"]) == "aarch64"
    features = set(str(there["features"]).split())
    assert "asimddp" in features and (("i8mm" in features and "sve" in features) == (cpu == "neoverse-v1"))
    # fp32: 2 prompt ways + tokens; int4 and int4-long: 3 ways + tokens each; int4-long's 2 streams
    assert _same_answers(here, there) >= 13


@aarch64
def test_the_device_commands_on_aarch64_without_torch_or_onnx(recorded, tmp_path):
    """docs/jetson.md's steps on the device: info, verify (the recorded answers), run, run
    --stream-input; the environment has neither torch nor onnx, and nothing tries to import them."""
    script = f"""
import builtins, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("torch", "onnx"):
        raise AssertionError(f"the device runtime imported {{name}}")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
from moss_edge.cli import main
art = {str(recorded['int4'])!r}
for argv in (["info", art], ["verify", art], ["run", art, "--audio", {str(CLIP)!r}, "--prompt", "How many events are there?"],
             ["run", art, "--audio", {str(CLIP)!r}, "--prompt", "How many events are there?", "--stream-input"]):
    print("$", " ".join(argv[:1]), flush=True)
    code = main(argv)
    assert code in (0, None), (argv, code)
"""
    done = runtime_env.run(AARCH64, "cortex-a76", ["-c", script], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("$ ") == 4 and "passed" in done.stdout.lower()  # verify's summary


def test_every_graph_is_within_the_ir_version_the_oldest_onnxruntime_reads(recorded):
    """onnxruntime 1.20 reads ONNX IR versions up to 10: no graph of an artifact may need more."""
    import onnx

    for artifact in recorded.values():
        for path in sorted(artifact.glob("*.onnx")):
            assert onnx.load(str(path), load_external_data=False).ir_version <= 10, path.name
