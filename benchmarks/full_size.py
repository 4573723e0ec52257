"""MOSS-Audio at full size on this machine, end to end, each step as a user runs it (the CLI):
synthetic checkpoint at the released config, export straight to a quantized artifact, verify
against the PyTorch model loaded piecewise, then load + a 30 s clip at full depth, and
upstream-style PyTorch bf16 on the same checkpoint. Per step: wall time, peak RSS (of that
process, from wait4) and peak disk use of the work folder. The CPU decoder of the same recipe
at 2, 4 and 8 layers gives the per-layer extrapolation the full-depth decoder is checked against
(alternating rounds in one process). Writes benchmarks/full-size-<preset>.json and .png.

    python benchmarks/full_size.py --preset 4b --workdir /big/disk/full
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from moss_edge.bench import BenchSettings, cpu_flags, directory_mib, fit_depths

# depths fitted for the per-layer extrapolation: with 2 and 4 alone, one noisy figure moved the
# 4B slope by half (0.99 against 2.2 ms per layer in two runs)
SHALLOW = (2, 4, 8)
CLI = [sys.executable, "-m", "moss_edge.cli"]


def run_step(name: str, cmd: list[str], workdir: Path, log: Path, ok: tuple[int, ...] = (0,)) -> dict:
    """Run one step; its wall time, peak RSS and the work folder's peak size while it ran. ok:
    the exit codes that are results (verify exits 1 when the parity check fails)."""
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    peak_disk, done = [directory_mib(workdir)], threading.Event()

    def watch_disk():
        while not done.wait(2.0):
            peak_disk[0] = max(peak_disk[0], directory_mib(workdir))

    watcher = threading.Thread(target=watch_disk, daemon=True)
    watcher.start()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    code = os.waitstatus_to_exitcode(status)
    if code not in ok:
        raise SystemExit(f"step {name} failed (exit {code}); see {log}")
    result = {"exit_code": code, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20,
              "peak_disk_gib": peak_disk[0] / 1024, "disk_after_gib": directory_mib(workdir) / 1024}
    print(f"[{name}] {wall:.0f} s, peak RSS {result['peak_rss_gib']:.2f} GiB, peak disk {result['peak_disk_gib']:.1f} GiB",
          flush=True)
    return result


def time_model(backend: str, path: Path, settings: BenchSettings, log: Path) -> dict:
    """bench's worker on an artifact ("ort") or a checkpoint ("torch-bf16"): load, encode the
    clip, prefill, decode, in its own process."""
    cmd = [sys.executable, "-m", "moss_edge.bench", backend, str(path), json.dumps(asdict(settings))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"timing {backend} on {path} failed; see {log}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def decoder_by_depth(artifacts: dict[int, Path], settings: BenchSettings, rounds: int = 4) -> dict[str, list[float]]:
    """{depth: [prefill s of 419 ids, decode ms per token]} of each artifact's CPU decoder, the
    rounds alternating between them (shared machines add noise, never speed)."""
    import numpy as np

    from moss_edge.bench import decoder_times, fastest_alternating
    from moss_edge.runtime.artifact import Artifact
    from moss_edge.runtime.decoders import decoder_runner
    from moss_edge.runtime.session import make_session

    ids = [int(i) for i in np.random.default_rng(0).integers(100, 1000, 419)]
    measures = {}
    for depth, path in artifacts.items():
        a = Artifact.load(path, check_hashes=False)
        graph = a.decoder_for("cpu")
        run = decoder_runner(graph, make_session(a.graph_path(graph), "cpu", settings.threads), a.dims)
        measures[depth] = partial(decoder_times, run, a.dims, ids, settings.decode_tokens)
    return {str(d): list(v) for d, v in fastest_alternating(measures, rounds).items()}


def graph_sizes(artifact: Path) -> dict[str, float]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return {name: sum((artifact / f).stat().st_size for f in g["files"]) / 2**20 for name, g in manifest["graphs"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["4b", "8b"], default="4b")
    parser.add_argument("--recipe", default="int4-awq")
    parser.add_argument("--workdir", type=Path, required=True, help="a folder on a disk with room for the checkpoint")
    parser.add_argument("--steps", type=int, default=16, help="decode steps in the parity check")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    work, logs = args.workdir, args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings()
    checkpoint, artifact = work / f"ckpt-{args.preset}", work / f"{args.preset}-{args.recipe}"
    # each step's figures are kept in the work folder, so an interrupted run goes on where it stopped
    state_file = work / f"state-{args.preset}-{args.recipe}.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}

    def once(key: str, measure):
        if key not in state:
            state[key] = measure()
            state_file.write_text(json.dumps(state, indent=2))
        return state[key]

    once("synthetic", lambda: run_step("synthetic", [*CLI, "synthetic", "-o", str(checkpoint), "--preset", args.preset],
                                       work, logs / "synthetic.log"))
    once("export_quantize", lambda: run_step(
        "export --recipe", [*CLI, "export", str(checkpoint), "-o", str(artifact), "--recipe", args.recipe, "--no-verify",
                            "--cache-dir", str(work / "cache")], work, logs / "export.log"))
    once("verify", lambda: run_step("verify", [*CLI, "verify", str(artifact), "--steps", str(args.steps),
                                               "--json", str(work / "parity.json")], work, logs / "verify.log", ok=(0, 1)))
    run = once("run", lambda: time_model("ort", artifact, settings, logs / "run.log"))
    # upstream-style PyTorch bf16 on the same checkpoint at full depth, in the same run
    torch_bf16 = once("torch_bf16", lambda: time_model("torch-bf16", checkpoint, settings, logs / "torch-bf16.log"))

    # the same recipe at a few depths, for the per-layer extrapolation
    shallow = {}
    for depth in SHALLOW:
        small = work / f"ckpt-{args.preset}-{depth}l"
        if not small.exists():
            subprocess.run([*CLI, "synthetic", "-o", str(small), "--preset", args.preset, "--encoder-layers", str(depth),
                            "--decoder-layers", str(depth)], check=True, capture_output=True)
        shallow[depth] = work / f"{args.preset}-{depth}l-{args.recipe}"
        if not shallow[depth].exists():
            subprocess.run([*CLI, "export", str(small), "-o", str(shallow[depth]), "--recipe", args.recipe, "--no-verify",
                            "--cache-dir", str(work / "cache")], check=True, capture_output=True)
    from moss_edge.export.synthetic import preset

    depth = preset(args.preset).language.num_hidden_layers
    # last: this process grows by the three decoders, and children started after it would inherit its peak RSS
    decoders = once("decoder_by_depth_" + "_".join(map(str, SHALLOW)),
                    lambda: decoder_by_depth({**shallow, depth: artifact}, settings))
    predicted = fit_depths({d: decoders[str(d)] for d in SHALLOW}, depth)

    on_disk = directory_mib(artifact)
    parity = json.loads((work / "parity.json").read_text())
    result = {
        "preset": args.preset, "recipe": args.recipe, "settings": asdict(settings), "cpu": cpu_flags(),
        "steps": {**{k: state[k] for k in ("synthetic", "export_quantize", "verify")},
                  "load_and_answer": {"peak_rss_gib": run["peak_rss_mib"] / 1024}},
        "artifact_mib": on_disk, "graph_mib": graph_sizes(artifact), "checkpoint_mib": directory_mib(checkpoint),
        "full_depth": run, "rss_over_disk": run["peak_rss_mib"] / on_disk, "torch_bf16_full_depth": torch_bf16,
        "over_torch_bf16": {k: run[k] / torch_bf16[k] for k in ("encoder_s", "prefill_ms", "time_to_first_token_s",
                                                                 "decode_ms_per_token")},
        "decoder_by_depth": decoders, "decoder_extrapolated_from_shallow_depths": predicted,
        "decode_measured_over_extrapolated": decoders[str(depth)][1] / predicted[f"decode_ms_at_{depth}"],
        "prefill_measured_over_extrapolated": decoders[str(depth)][0] / predicted[f"prefill_s_at_{depth}"],
        "parity": {k: parity["summary"][k] for k in ("passed", "precision", "worst_cosine", "prefill_logits_rel", "kl_mean",
                                                     "top1_agreement", "greedy_match", "failures")}
                  | {"reference": parity.get("reference"), "prompt_tokens": parity["prompt_tokens"],
                     "graphs": {g: {o: round(m["cosine"], 7) for o, m in outs.items()} for g, outs in parity["graphs"].items()}},
    }
    path = args.out / f"full-size-{args.preset}.json"
    path.write_text(json.dumps(result, indent=2))
    chart(result, depth, path.with_suffix(".png"))
    print(f"wrote {path}")


def chart(result: dict, depth: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    names = list(steps)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [steps[n]["peak_rss_gib"] for n in names], color="#4c72b0")
    ax1.axhline(result["artifact_mib"] / 1024, color="gray", linestyle="--", label="artifact on disk")
    ax1.set_ylabel("peak RSS (GiB)")
    ax1.set_title(f"MOSS-Audio-{result['preset'].upper()} {result['recipe']}: memory per step")
    ax1.tick_params(axis="x", rotation=20)
    ax1.legend()
    measured, predicted = result["decoder_by_depth"][str(depth)], result["decoder_extrapolated_from_shallow_depths"]
    labels = ["prefill 419 tokens (s)", "decode (ms/token / 10)"]
    x = range(len(labels))
    ax2.bar([i - 0.2 for i in x], [measured[0], measured[1] / 10], 0.4, label=f"{depth} layers, measured")
    ax2.bar([i + 0.2 for i in x], [predicted[f"prefill_s_at_{depth}"], predicted[f"decode_ms_at_{depth}"] / 10], 0.4,
            label="2/4/8 layers, extrapolated")
    ax2.set_xticks(list(x), labels)
    ax2.set_title(f"CPU decoder, {result['settings']['threads']} threads [{result['cpu']}]", fontsize=9)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
