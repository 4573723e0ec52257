"""Our INT4 GPU decoder against NVIDIA ModelOpt's INT4 quantizer, node for node, on the test
fixture's checkpoint (the upstream-written tiny model): one command, run with the project's venv,

    .venv/bin/python tools/modelopt_int4/compare.py

1. exports the fixture to an fp32 artifact and writes its fp16 decoder with fp16 weights
   (the graph a user would hand to ModelOpt);
2. quantizes that decoder with ModelOpt (run.sh: its own environment, INT4 rtn_dq on the CPU);
3. quantizes the fixture with our int4-trt recipe;
4. records both patterns (export/int4_pattern.py) under tests/fixtures/modelopt-int4/ and prints
   each per-node difference. tests/test_gpu_graphs.py holds our graph to the recorded ModelOpt one.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-moss-audio"
OUT = ROOT / "tests" / "fixtures" / "modelopt-int4"
FP16_WEIGHTS = {"name": "fp16-decoder", "decoder": {"precision": "fp32", "dtype": "fp16"}}


def fixture_ids():
    from moss_edge.runtime.prompt import TokenIds

    ids = json.loads((FIXTURE / "reference.json").read_text())["ids"]
    return TokenIds(audio_token=ids["audio_token_id"], audio_start=ids["audio_start_id"],
                    audio_end=ids["audio_end_id"], stop=[1003])


def main() -> int:
    from moss_edge.export.int4_pattern import int4_matmul_pattern
    from moss_edge.export.onnx_export import export_artifact
    from moss_edge.quantize.artifact import quantize_artifact
    from moss_edge.quantize.recipe import load_recipe

    quiet = lambda m: None  # noqa: E731
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_artifact(FIXTURE / "checkpoint", tmp / "fp32", verify_steps=0, token_ids=fixture_ids(), log=quiet)
        (tmp / "fp16.json").write_text(json.dumps(FP16_WEIGHTS))
        fp16 = quantize_artifact(fp32, tmp / "fp16", load_recipe(str(tmp / "fp16.json")), verify=False, log=quiet).path
        subprocess.run([str(ROOT / "tools" / "modelopt_int4" / "run.sh"), str(fp16 / "decoder.onnx"),
                        str(OUT / "modelopt.json"), "--no-check"], check=True)  # no fp16 CPU kernels to run it on
        ours = quantize_artifact(fp32, tmp / "int4-trt", load_recipe("int4-trt"), verify=False, log=quiet).path
        pattern = int4_matmul_pattern(onnx.load(str(ours / "decoder.onnx"), load_external_data=False), str(ours))
        (OUT / "moss_edge.json").write_text(json.dumps({"source": "moss_edge int4-trt", **pattern}, indent=1) + "\n")
    theirs = json.loads((OUT / "modelopt.json").read_text())
    differences = compare(pattern["nodes"], theirs["nodes"])
    print("\n".join(differences) or "the same DequantizeLinear -> MatMul pattern on every INT4 weight")
    return 0


def compare(ours: list[dict], theirs: list[dict]) -> list[str]:
    """One line per MatMul whose INT4 weight differs in a pattern field, or is quantized by one side only."""
    from moss_edge.export.int4_pattern import SUMMARY_FIELDS

    mine, other = {n["matmul_node"]: n for n in ours}, {n["matmul_node"]: n for n in theirs}
    lines = [f"{m}: INT4 in {'ours' if m in mine else 'ModelOpt'}'s only" for m in sorted(set(mine) ^ set(other))]
    for m in sorted(set(mine) & set(other)):
        lines += [f"{m}: {f} ours {mine[m][f]!r}, ModelOpt {other[m][f]!r}" for f in SUMMARY_FIELDS
                  if mine[m][f] != other[m][f]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
