"""Artifacts made here (x86-64), answered on other CPUs: the packaged model and the upstream
fixture, each recipe (fp32, int8, int4, int4-awq, int4-trt), run by tools/cross_cpu/answers.py
on this machine, on x86-64 AVX2 without VNNI (qemu-x86_64 -cpu Haswell) and on aarch64
(tools/cross_cpu/runtime_env.py: -cpu cortex-a76, the Jetson Orin / Raspberry Pi 5 feature set;
neoverse-v1, a Graviton3's: i8mm, SVE; max: SVE2 and SME too). Per recipe and CPU: are the
greedy tokens (default path; streamed exact and causal on int4) the same as here, and the prompt
logits' cosine and max relative difference to this machine's on each way the CPU runs the prompt.
int4-trt's fp16 graphs run as their emulated fp32 twins (no fp16 CPU kernels; made here with
onnx, as verify runs them).

    python benchmarks/cross_cpu.py --workdir /tmp/xcpu --aarch64 .aarch64-env -o benchmarks/cross-cpu.json [--resume]

Wall times under emulation are not performance figures and are not recorded.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "cross_cpu"))
import runtime_env  # noqa: E402

RECIPES = ("fp32", "int8", "int4", "int4-awq", "int4-trt")
CLIPS = ("speech_en_10s.flac", "speech_zh_4s.flac", "heldout")
AARCH64 = ("cortex-a76", "neoverse-v1", "max")


def make_artifacts(workdir: Path) -> dict[str, Path]:
    """model/recipe -> a runnable folder (int4-trt: its emulated CPU view, made once and kept)."""
    from moss_edge.demo import TRAINED
    from moss_edge.export.onnx_export import export_artifact
    from moss_edge.quantize.artifact import quantize_artifact
    from moss_edge.quantize.half_emulation import cpu_view
    from moss_edge.quantize.recipe import load_recipe
    from moss_edge.runtime.prompt import TokenIds

    fixture = REPO / "tests" / "fixtures" / "tiny-moss-audio"
    ref = json.loads((fixture / "reference.json").read_text())
    fixture_ids = TokenIds(audio_token=ref["ids"]["audio_token_id"], audio_start=ref["ids"]["audio_start_id"],
                           audio_end=ref["ids"]["audio_end_id"], stop=[1003])
    made = {}
    for model, checkpoint, ids in (("packaged", TRAINED, None), ("fixture", fixture / "checkpoint", fixture_ids)):
        fp32 = workdir / model / "fp32"
        if not (fp32 / "manifest.json").is_file():
            export_artifact(checkpoint, fp32, verify_steps=0, token_ids=ids, log=lambda m: None)
        made[f"{model}/fp32"] = fp32
        for recipe in RECIPES[1:]:
            out = workdir / model / recipe
            if not (out / "manifest.json").is_file():
                quantize_artifact(fp32, out, load_recipe(recipe), verify=False, log=lambda m: None)
            if recipe == "int4-trt":
                view = workdir / model / "int4-trt-emulated"
                if not (view / "manifest.json").is_file():
                    with cpu_view(out) as tmp:
                        shutil.copytree(tmp, view)
                out = view
            made[f"{model}/{recipe}"] = out
    return made


def clips(workdir: Path) -> list[Path]:
    """The bundled recordings and a held-out sound-event clip (seed 1234, as the task's held-out set)."""
    import soundfile as sf

    from moss_edge import bundled_audio
    from moss_edge.runtime.audio import SAMPLE_RATE
    from moss_edge.sound_events.task import make_clip

    paths = []
    for name in CLIPS:
        if name == "heldout":
            path = workdir / "heldout.wav"
            if not path.is_file():
                sf.write(path, make_clip(np.random.default_rng(1234))[0], SAMPLE_RATE)
            paths.append(path)
        else:
            paths.append(Path(bundled_audio(name)))
    return paths


def answer(run, out: Path, artifacts: list[Path], clip_paths: list[Path]) -> dict:
    """answers.py's arrays (streamed requests on the int4 artifact); run(args) runs a Python of the
    CPU compared with args."""
    args = [str(REPO / "tools" / "cross_cpu" / "answers.py"), str(out), *map(str, artifacts),
            *[f"--clip={c}" for c in clip_paths], *[f"--stream-on={a}" for a in artifacts if a.name == "int4"]]
    done = run(args)
    if done.returncode != 0:
        raise RuntimeError(f"answers.py failed:\n{done.stderr[-3000:]}")
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def compare(here: dict, there: dict, name: str) -> dict:
    """One artifact's answers on another CPU against this machine's, on the clips it answered."""
    keys = [k[len(name) + 1:] for k in there if k.startswith(name + "/") and k != f"{name}/settings"]
    tokens = [k for k in keys if k.split("/")[0] in ("tokens", "stream_exact", "stream_causal")]
    logits = [k for k in keys if k.startswith("logits/")]
    mismatched = [k for k in tokens if not np.array_equal(here[f"{name}/{k}"], there[f"{name}/{k}"])]
    cosines, rel = {}, {}
    for k in logits:
        a, b = here[f"{name}/{k}"].ravel().astype(np.float64), there[f"{name}/{k}"].ravel().astype(np.float64)
        path = k.split("/")[1]
        cosines[path] = min(cosines.get(path, 1.0), float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        rel[path] = max(rel.get(path, 0.0), float(np.abs(a - b).max() / np.abs(a).max()))
    settings = json.loads(str(there[f"{name}/settings"]))
    return {"tokens_identical": not mismatched, "mismatched": mismatched, "token_sequences": len(tokens),
            "clips": sorted({k.split("/")[-1] for k in keys}),
            "logit_cosine": cosines, "logit_max_rel_diff": rel, "default_prefill": settings["default"]["prefill"]}


def main() -> int:
    from moss_edge.bench import cpu_flags

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--aarch64", type=Path, required=True, help="an environment made by tools/cross_cpu/runtime_env.py make")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--resume", action="store_true", help="keep the answers an earlier run left in --workdir")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    artifacts = make_artifacts(a.workdir)
    clip_paths = clips(a.workdir)
    names = list(artifacts)
    folders = [artifacts[n] for n in names]
    env = a.aarch64.resolve()

    def host(*qemu):
        return lambda args: subprocess.run([*qemu, sys.executable, *args], capture_output=True, text=True, timeout=3600)

    # (Python runner, clips): whole-system x86 emulation and SVE emulation run one to two orders of
    # magnitude slower than the cortex-a76 model here, so those answer the held-out clip only
    runners = {"x86-64 (this machine)": (host(), clip_paths),
               "x86-64 AVX2 (qemu Haswell)": (host(shutil.which("qemu-x86_64"), "-cpu", "Haswell"), clip_paths[-1:])}
    for cpu in AARCH64:
        runners[f"aarch64 {cpu}"] = (lambda args, cpu=cpu: runtime_env.run(env, cpu, args, capture_output=True, text=True,
                                                                            timeout=3600),
                                     clip_paths if cpu == "cortex-a76" else clip_paths[-1:])
    results, machines = {}, {}
    for n, (label, (run, clips_here)) in enumerate(runners.items()):
        got = {}
        for model in ("packaged", "fixture"):  # answers.py keys by folder name (the recipe): one model per run
            chosen = [f for name, f in zip(names, folders) if name.startswith(model + "/")]
            out = a.workdir / f"answers-{n}-{model}.npz"
            if a.resume and out.is_file():
                with np.load(out) as f:
                    got[model] = {k: f[k] for k in f.files}
            else:
                got[model] = answer(run, out, chosen, clips_here)
        results[label] = got
        print(f"{label}: answered", file=sys.stderr, flush=True)
        machines[label] = {k: str(got["packaged"][k]) for k in ("machine", "onnxruntime", "features", "integer_units")}
    here = results["x86-64 (this machine)"]
    table = {}
    for label, got in results.items():
        for name in names:
            model, recipe = name.split("/")
            folder = artifacts[name].name
            table.setdefault(name, {})[label] = compare(here[model], got[model], folder)
    report = {"cpu_here": cpu_flags(), "machines": machines, "clips": [c.name for c in clip_paths],
              "recipes": list(RECIPES), "results": table}
    a.output.write_text(json.dumps(report, indent=1) + "\n")
    chart(report, a.output.with_suffix(".png"))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    """The table: per artifact and CPU, tokens identical (sequences compared) and the prompt
    logits' worst cosine / largest relative difference to this machine over the ways compared."""
    cpus = [c for c in report["machines"] if c != "x86-64 (this machine)"]
    lines = ["| model / recipe | " + " | ".join(cpus) + " |", "|---|" + "---|" * len(cpus)]
    for name, by_cpu in report["results"].items():
        cells = []
        for cpu in cpus:
            r = by_cpu.get(cpu)
            if r is None:
                cells.append("not run")
                continue
            same = "same" if r["tokens_identical"] else f"**{len(r['mismatched'])} of {r['token_sequences']} differ**"
            cells.append(f"{same} ({r['token_sequences']}); {min(r['logit_cosine'].values()):.6f} / "
                         f"{max(r['logit_max_rel_diff'].values()):.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["results"])
    cpus = list(report["machines"])
    cell = {(i, j): report["results"][r].get(c) for i, r in enumerate(rows) for j, c in enumerate(cpus)}
    shade = np.array([[0.5 if cell[i, j] is None else float(cell[i, j]["tokens_identical"]) for j in range(len(cpus))]
                      for i in range(len(rows))])
    fig, ax = plt.subplots(figsize=(2.2 * len(cpus) + 3, 0.42 * len(rows) + 1.6))
    ax.imshow(shade, cmap="RdYlGn", vmin=-0.5, vmax=1.5, aspect="auto")
    for (i, j), r in cell.items():
        text = "not run" if r is None else \
            f"{'same' if r['tokens_identical'] else 'DIFFER'}\ncos {min(r['logit_cosine'].values()):.6f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cpus)), cpus, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(f"greedy tokens and prompt-logit cosine to x86-64 [{report['cpu_here']}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
