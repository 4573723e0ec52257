"""Long audio prompts on the CPU: the INT8 prompt graph, the INT4 token graph and upstream-style
PyTorch bf16, prefilling the same prompts in one run.

At 4B widths, for 30 s, 2 min and 10 min of audio: the decoder's prefill of the whole prompt
(its logits are the first answer) at two or more depths (synthetic checkpoints, the encoder as
deep as the decoder), extrapolated per layer (least squares) to 36 layers, with 16 decode steps
after the 30 s prompt; encode + adapter with the encoder at its full 32 layers (a checkpoint
with one decoder layer: the encoder's cost per layer is too small against this machine's noise
to extrapolate); first token = encode + prefill. Rounds alternate the systems and keep the
fastest of each (shared machines add noise, never speed). Peak RSS comes from one fresh process
per system and depth, prompts in increasing length, so each figure is the peak up to and
including that prompt, extrapolated per layer like the prefill.

    python benchmarks/prefill.py --workdir /tmp/prefill -o benchmarks/prefill-4b.json
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moss_edge.bench import BenchSettings, bench_audio, bench_prompt, cpu_flags, directory_mib, peak_rss_mib

SYSTEMS = ("upstream PyTorch bf16", "ours, INT4 prompt path", "ours, INT8 prompt path")
PREFILL = {"ours, INT4 prompt path": "decoder", "ours, INT8 prompt path": "int8"}
LENGTHS_S = (30, 120, 600)
DECODE_STEPS = 16
FULL_DECODER, FULL_ENCODER = 36, 32


def load(system: str, checkpoint: Path, artifact: Path, threads: int):
    if system.startswith("upstream"):
        import torch

        from moss_edge.export.reference import ReferencePipeline

        torch.set_num_threads(threads)
        return ReferencePipeline.load(checkpoint, torch.bfloat16)
    from moss_edge.runtime.pipeline import Pipeline

    return Pipeline.load(artifact, threads=threads, prefill=PREFILL[system])


def prompt_for(model, features) -> list[int]:
    from moss_edge.runtime.prompt import expand_audio_spans

    return expand_audio_spans(bench_prompt(model.ids, BenchSettings()), features.clip_tokens, model.ids)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure_encoders(checkpoint: Path, artifact: Path, threads: int, rounds: int, lengths: list[int]) -> dict:
    """Encode + adapter seconds per system and length, alternating (ours: one encoder, both paths)."""
    models = {s: load(s, checkpoint, artifact, threads) for s in SYSTEMS[:2]}
    out = {s: {} for s in SYSTEMS[:2]}
    for seconds in lengths:
        wave = bench_audio(seconds)
        for m in models.values():
            m.encode([wave])  # the first run allocates and picks kernels
        for r in range(rounds):
            for s in SYSTEMS[:2] if r % 2 == 0 else reversed(SYSTEMS[:2]):
                elapsed = timed(lambda s=s: models[s].encode([wave]))[0]
                out[s][seconds] = min(out[s].get(seconds, elapsed), elapsed)
    return {SYSTEMS[0]: out[SYSTEMS[0]], SYSTEMS[1]: out[SYSTEMS[1]], SYSTEMS[2]: out[SYSTEMS[1]]}


def measure_depth(checkpoint: Path, artifact: Path, threads: int, rounds: int, lengths: list[int]) -> dict:
    """Every system's prefill at one depth, in this process: {system: {seconds: figures}}."""
    models = {s: load(s, checkpoint, artifact, threads) for s in SYSTEMS}
    out = {s: {} for s in SYSTEMS}
    for seconds in lengths:
        wave = bench_audio(seconds)
        features, prompts = {}, {}
        for s, m in models.items():
            features[s] = m.encode([wave])
            prompts[s] = prompt_for(m, features[s])
            m.prefill(prompts[s], features[s])  # the first run allocates and picks kernels
            out[s][seconds] = {}
        for r in range(rounds if seconds < 600 else min(rounds, 2)):  # 10 min: INT4 prompts take a minute a layer
            for s in SYSTEMS if r % 2 == 0 else reversed(SYSTEMS):
                elapsed, logits = timed(lambda s=s: models[s].prefill(prompts[s], features[s]))
                fig = out[s][seconds]
                fig["prefill_s"] = min(fig.get("prefill_s", elapsed), elapsed)
                if seconds == lengths[0]:
                    token, start = int(np.argmax(logits)), time.perf_counter()
                    for _ in range(DECODE_STEPS):
                        token = int(np.argmax(models[s].step(token)))
                    ms = (time.perf_counter() - start) * 1000 / DECODE_STEPS
                    fig["decode_ms_per_token"] = min(fig.get("decode_ms_per_token", ms), ms)
        for s in SYSTEMS:
            out[s][seconds]["positions"] = len(prompts[s])
    return out


def memory_worker(system: str, checkpoint: str, artifact: str, threads: int, lengths: list[int]) -> dict:
    """In a fresh process: load, then each prompt in turn; the peak RSS up to each."""
    model = load(system, Path(checkpoint), Path(artifact), threads)
    peaks = {"loaded": peak_rss_mib()}
    for seconds in lengths:
        features = model.encode([bench_audio(seconds)])
        model.prefill(prompt_for(model, features), features)
        peaks[str(seconds)] = peak_rss_mib()
    return peaks


def peak_memory(system: str, checkpoint: Path, artifact: Path, threads: int, lengths: list[int]) -> dict:
    args = json.dumps([system, str(checkpoint), str(artifact), threads, lengths])
    out = subprocess.run([sys.executable, __file__, "--memory-worker", args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def at_full_depth(by_depth: dict[int, float], full: int) -> float:
    depths = sorted(by_depth)
    slope, fixed = np.polyfit(depths, [by_depth[d] for d in depths], 1)
    return float(fixed + full * slope)


def extrapolate(measured: dict, encode: dict, memory: dict, lengths: list[int]) -> dict:
    """Full-depth figures per system and length: the decoder's at 36 layers, the encoder's as measured at 32."""
    out = {}
    for s in SYSTEMS:
        out[s] = {}
        for seconds in lengths:
            per = {d: measured[d][s][seconds] for d in measured}
            fig = {"positions": next(iter(per.values()))["positions"], "encode_s": encode[s][seconds],
                   "prefill_s": at_full_depth({d: f["prefill_s"] for d, f in per.items()}, FULL_DECODER),
                   "peak_rss_gib": at_full_depth({d: memory[d][s][str(seconds)] for d in memory}, FULL_DECODER) / 1024}
            fig["first_token_s"] = fig["encode_s"] + fig["prefill_s"]
            if "decode_ms_per_token" in next(iter(per.values())):
                fig["decode_ms_per_token"] = at_full_depth({d: f["decode_ms_per_token"] for d, f in per.items()},
                                                           FULL_DECODER)
            out[s][seconds] = fig
    return out


def chart(full: dict, lengths: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(SYSTEMS)
    for ax, key, label in ((axes[0], "first_token_s", "first token (s)"), (axes[1], "prefill_s", "prefill (s)"),
                           (axes[2], "peak_rss_gib", "peak RSS (GiB)")):
        for i, s in enumerate(SYSTEMS):
            values = [full[s][sec][key] for sec in lengths]
            bars = ax.bar(np.arange(len(lengths)) + i * width, values, width, label=s,
                          color=("#888888", "#9cc3e6", "#2a7ab0")[i])
            ax.bar_label(bars, [f"{v:.3g}" for v in values], fontsize=7)
        ax.set_xticks(np.arange(len(lengths)) + width, [f"{sec // 60} min" if sec >= 60 else f"{sec} s" for sec in lengths])
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(memory_worker(*json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="where the synthetic checkpoints and artifacts are made")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seconds", type=int, nargs="+", default=list(LENGTHS_S))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    from moss_edge.export.synthetic import preset, write_synthetic_checkpoint
    from moss_edge.quantize.artifact import export_quantized
    from moss_edge.quantize.recipe import load_recipe

    work = Path(args.workdir)
    measured, memory, sizes = {}, {}, {}
    encoder_checkpoint, encoder_artifact = work / "4b-encoder-checkpoint", work / "4b-encoder-int4"
    if not encoder_checkpoint.exists():
        write_synthetic_checkpoint(encoder_checkpoint, preset("4b", FULL_ENCODER, 1), dtype="bf16")
    if not encoder_artifact.exists():
        export_quantized(encoder_checkpoint, encoder_artifact, load_recipe("int4"), verify=False, log=lambda m: None)
    print(f"timing the encoders at {FULL_ENCODER} layers", flush=True)
    encode = measure_encoders(encoder_checkpoint, encoder_artifact, args.threads, args.rounds, args.seconds)
    for depth in args.depths:
        checkpoint, artifact = work / f"4b-{depth}l-checkpoint", work / f"4b-{depth}l-int4"
        if not checkpoint.exists():
            write_synthetic_checkpoint(checkpoint, preset("4b", depth, depth), dtype="bf16")
        if not artifact.exists():
            export_quantized(checkpoint, artifact, load_recipe("int4"), verify=False, log=lambda m: None)
        sizes[depth] = {"artifact_mib": directory_mib(artifact),
                        "prompt_graph_mib": sum(f.stat().st_size for f in artifact.glob("decoder_prefill.onnx*")) / 2**20}
        print(f"timing {depth} layers", flush=True)
        measured[depth] = measure_depth(checkpoint, artifact, args.threads, args.rounds, args.seconds)
        memory[depth] = {s: peak_memory(s, checkpoint, artifact, args.threads, args.seconds) for s in SYSTEMS}
    full = extrapolate(measured, encode, memory, args.seconds)
    result = {"cpu_flags": cpu_flags(), "threads": args.threads, "rounds": args.rounds, "depths": args.depths,
              "widths": "MOSS-Audio-4B (hidden 2560, intermediate 9728, encoder d_model 1280)",
              "artifact_sizes": sizes, "measured": measured, "encode_s_at_32_layers": encode, "peak_rss_mib": memory,
              "full_depth": full,
              "artifact_gib_at_36": at_full_depth({d: v["artifact_mib"] for d, v in sizes.items()}, FULL_DECODER) / 1024,
              "int8_over_upstream_first_token": {sec: full[SYSTEMS[2]][sec]["first_token_s"] / full[SYSTEMS[0]][sec]["first_token_s"]
                                                 for sec in args.seconds},
              "int8_over_int4_prefill": {sec: full[SYSTEMS[2]][sec]["prefill_s"] / full[SYSTEMS[1]][sec]["prefill_s"]
                                         for sec in args.seconds}}
    out = Path(args.output)
    out.write_text(json.dumps(result, indent=1))
    chart(full, args.seconds, f"4B widths, full depth extrapolated from {args.depths} layers, {args.threads} threads "
          f"[{result['cpu_flags']}]", out.with_suffix(".png"))
    print(json.dumps({s: full[s] for s in SYSTEMS}, indent=1))


if __name__ == "__main__":
    main()
