"""Accuracy of the GPU graphs, measured on the CPU: the fp16 form that int4-trt writes against the
fp32 form it wrote before (INT4 weight-only, everything computed in fp32) and against fp16 alone
(no quantized weights), each compared with the fp32 PyTorch reference by `verify` (the fp16
graphs run as their emulated fp32 twins, every fp16 value rounded where it is made). For the
packaged sound-event model and the upstream-written test fixture; the packaged model's task
accuracy too. Then the fp16 encoder's headroom (65504 over its largest value on the bundled
recordings) for the packaged model and a 4B-width synthetic checkpoint (random weights, all 32
encoder layers).

    python benchmarks/fp16_graphs.py --workdir /tmp/fp16 -o benchmarks/fp16-graphs.json
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FP32_FORM = {"name": "int4-trt, fp32 form", "encoder": {"precision": "int4"}, "adapter": {"precision": "int4"},
             "decoder": {"precision": "int4", "method": "awq", "lm_head": "int4", "embedding": "fp16", "kv_cache": "fp16"}}
FP16_ONLY = {"name": "fp16", **{g: {"precision": "fp32", "dtype": "fp16"} for g in ("encoder", "adapter", "decoder")}}
FORMS = {"int4-trt (fp16 form)": "int4-trt", "int4-trt, fp32 form (before)": FP32_FORM, "fp16 weights, fp16 form": FP16_ONLY}


def parity(fp32: Path, out: Path, evaluate=None) -> dict:
    from moss_edge.export.verify import Verifier
    from moss_edge.quantize.artifact import quantize_artifact
    from moss_edge.quantize.recipe import load_recipe

    rows = {}
    for label, spec in FORMS.items():
        if isinstance(spec, dict):
            path = out / f"{spec['name'].replace(' ', '-').replace(',', '')}.json"
            path.write_text(json.dumps(spec))
            spec = str(path)
        name = label.split(" ")[0] + str(len(rows))
        result = quantize_artifact(fp32, out / name, load_recipe(spec), verify=Verifier(steps=32, evaluate=evaluate),
                                   log=lambda m: None)
        r = result.report
        rows[label] = {
            "passed": r["summary"]["passed"], "precision": r["summary"]["precision"],
            "cosine": {f"{g}.{o}": round(m["cosine"], 9) for g, outs in r["graphs"].items() for o, m in outs.items()},
            "kl_mean": r["summary"]["kl_mean"], "top1_agreement": r["summary"]["top1_agreement"],
            "greedy_match": r["summary"]["greedy_match"], "emulated": r.get("emulated", {}).get("graphs", []),
            "backends": result.manifest["backends"],
            **({"task_exact_match": r["task"]["artifact"]["exact_match"],
                "task_reference_exact_match": r["task"]["reference"]["exact_match"]} if "task" in r else {}),
            **({"fp16_headroom": result.manifest["quantization"]["fp16_headroom"]["encoder"]}
               if "fp16_headroom" in result.manifest["quantization"] else {}),
            "held_dequantized_gib": result.manifest["checks"].get("tensorrt-10.3", {}).get("held_dequantized_bytes", 0) / 2**30,
        }
        print(label, json.dumps(rows[label]), flush=True)
    return rows


def encoder_headroom_4b(work: Path) -> dict:
    """The fp16 encoder of a 4B-width synthetic checkpoint (all 32 encoder layers, one decoder layer)."""
    from moss_edge.export.synthetic import preset, write_synthetic_checkpoint
    from moss_edge.quantize.artifact import export_quantized
    from moss_edge.quantize.recipe import load_recipe

    checkpoint = write_synthetic_checkpoint(work / "4b-encoder", preset("4b", decoder_layers=1), dtype="bf16")
    spec = work / "fp16-encoder.json"
    spec.write_text(json.dumps({"name": "fp16-encoder", "encoder": {"precision": "int4", "dtype": "fp16"}}))
    result = export_quantized(checkpoint, work / "4b-fp16-encoder", load_recipe(str(spec)), verify=False, log=lambda m: None)
    return result.manifest["quantization"]["fp16_headroom"]["encoder"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tools" / "modelopt_int4"))
    from compare import FIXTURE, fixture_ids

    from moss_edge.bench import cpu_flags
    from moss_edge.demo import TRAINED
    from moss_edge.export.onnx_export import export_artifact
    from moss_edge.sound_events.evaluate import task_report

    args.workdir.mkdir(parents=True, exist_ok=True)
    quiet = lambda m: None  # noqa: E731
    result = {"cpu_flags": cpu_flags(), "how": __doc__.split("\n\n")[0].replace("\n", " ")}
    for model, checkpoint, ids, evaluate in (("packaged", TRAINED, None, task_report(48)),
                                             ("fixture", FIXTURE / "checkpoint", fixture_ids(), None)):
        work = args.workdir / model
        work.mkdir(exist_ok=True)
        fp32 = work / "fp32"
        if not fp32.exists():
            export_artifact(checkpoint, fp32, verify_steps=0, token_ids=ids, log=quiet)
        result[model] = parity(fp32, work, evaluate)
    result["encoder_headroom_4b_width"] = encoder_headroom_4b(args.workdir)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.output.with_suffix(".png"))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, model in zip(axes, ("packaged", "fixture")):
        rows = result[model]
        outputs = list(next(iter(rows.values()))["cosine"])
        for i, (label, row) in enumerate(rows.items()):
            values = [1 - row["cosine"].get(o, float("nan")) for o in outputs]
            ax.bar([j + 0.27 * i for j in range(len(outputs))], values, width=0.27, label=label)
        ax.set_xticks([j + 0.27 for j in range(len(outputs))], [o.replace(".", "\n") for o in outputs], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("1 - cosine against the fp32 PyTorch model")
        ax.set_title(f"{model} model")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"GPU graphs measured on the CPU (emulated fp16) [CPU: {result['cpu_flags']}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
