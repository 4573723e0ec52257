"""Long recordings on the CPU: first token and per-token decode against audio length, with the
KV cache in fp32 and in int8, against upstream-style PyTorch bf16 (ours: the `int4` preset, and
`int4-long`, the same with the KV cache in int8).

At 4B widths, for 30 s, 2 min and 10 min of audio: encode + adapter with the encoder at its full
32 layers (a checkpoint with one decoder layer), ours with one chunk per encoder run and with the
runtime's own choice; the decoder's prefill of the whole prompt and the decode per token at that
context (DECODE_STEPS greedy tokens after it), at two or more depths, extrapolated per layer
(least squares) to 36 layers; first token = encode + prefill. Rounds alternate the systems and
keep the fastest of each (shared machines add noise, never speed). Peak RSS: one fresh process
per system and depth, prompts in increasing length, extrapolated per layer like the prefill.

    python benchmarks/long_audio.py --workdir /tmp/long -o benchmarks/long-audio-4b.json
    python benchmarks/long_audio.py --summarize benchmarks/long-audio-4b.json   # the extrapolation and chart again
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moss_edge.bench import bench_audio, cpu_flags, directory_mib, peak_rss_mib
from prefill import at_full_depth, prompt_for, timed  # benchmarks/prefill.py: the same prompts and extrapolation

UPSTREAM, FP32_CACHE, INT8_CACHE = "upstream PyTorch bf16", "ours int4, fp32 KV cache", "ours int4, int8 KV cache"
SYSTEMS = (UPSTREAM, FP32_CACHE, INT8_CACHE)
RECIPES = {FP32_CACHE: "int4", INT8_CACHE: "int4-long"}  # presets, and the artifact folders' suffixes
ONE_CHUNK = "ours, one encoder chunk per run"
ENCODERS = (UPSTREAM, ONE_CHUNK, "ours, runtime's choice")
LENGTHS_S = (30, 120, 600)
DECODE_STEPS = 16
FULL_DECODER, FULL_ENCODER = 36, 32


def load(system: str, checkpoint: Path, artifact: Path, threads: int):
    if system == UPSTREAM:
        import torch

        from moss_edge.export.reference import ReferencePipeline

        torch.set_num_threads(threads)
        return ReferencePipeline.load(checkpoint, torch.bfloat16)
    from moss_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(artifact, threads=threads)
    if system == ONE_CHUNK:
        pipe.chunks_per_run = lambda chunks: 1
    return pipe


def measure_encoders(checkpoint: Path, artifact: Path, threads: int, rounds: int, lengths: list[int]) -> dict:
    """Encode + adapter seconds per encoder system and length, alternating."""
    models = {s: load(s, checkpoint, artifact, threads) for s in ENCODERS}
    out = {s: {} for s in ENCODERS}
    for seconds in lengths:
        wave = bench_audio(seconds)
        for m in models.values():
            m.encode([wave])  # the first run allocates and picks kernels
        for r in range(rounds):
            for s in ENCODERS if r % 2 == 0 else reversed(ENCODERS):
                elapsed = timed(lambda s=s: models[s].encode([wave]))[0]
                out[s][seconds] = min(out[s].get(seconds, elapsed), elapsed)
    return out


def decode_ms(model, logits: np.ndarray) -> float:
    token, start = int(np.argmax(logits)), time.perf_counter()
    for _ in range(DECODE_STEPS):
        token = int(np.argmax(model.step(token)))
    return (time.perf_counter() - start) * 1000 / DECODE_STEPS


def measure_depth(checkpoints: dict, artifacts: dict, threads: int, rounds: int, lengths: list[int]) -> dict:
    """Every system's prefill and decode at one depth, in this process: {system: {seconds: figures}}."""
    models = {s: load(s, checkpoints[s], artifacts[s], threads) for s in SYSTEMS}
    out = {s: {} for s in SYSTEMS}
    for seconds in lengths:
        wave = bench_audio(seconds)
        features, prompts = {}, {}
        for s, m in models.items():
            features[s] = m.encode([wave])
            prompts[s] = prompt_for(m, features[s])
            m.prefill(prompts[s], features[s])  # the first run allocates and picks kernels
            out[s][seconds] = {"positions": len(prompts[s])}
        for r in range(rounds if seconds < 600 else min(rounds, 2)):
            for s in SYSTEMS if r % 2 == 0 else reversed(SYSTEMS):
                elapsed, logits = timed(lambda s=s: models[s].prefill(prompts[s], features[s]))
                ms = decode_ms(models[s], logits)
                fig = out[s][seconds]
                fig["prefill_s"] = min(fig.get("prefill_s", elapsed), elapsed)
                fig["decode_ms_per_token"] = min(fig.get("decode_ms_per_token", ms), ms)
    return out


def memory_worker(system: str, checkpoint: str, artifact: str, threads: int, lengths: list[int]) -> dict:
    """In a fresh process: load, then each prompt in turn with its decode; the peak RSS up to each."""
    model = load(system, Path(checkpoint), Path(artifact), threads)
    peaks = {"loaded": peak_rss_mib()}
    for seconds in lengths:
        features = model.encode([bench_audio(seconds)])
        decode_ms(model, model.prefill(prompt_for(model, features), features))
        peaks[str(seconds)] = peak_rss_mib()
    return peaks


def peak_memory(system: str, checkpoint: Path, artifact: Path, threads: int, lengths: list[int]) -> dict:
    args = json.dumps([system, str(checkpoint), str(artifact), threads, lengths])
    out = subprocess.run([sys.executable, __file__, "--memory-worker", args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_at_full_depth(by_depth: dict[int, float]) -> tuple[float, bool]:
    """A peak RSS at full depth in MiB, extrapolated per layer; a peak that does not grow with depth
    (upstream's at 10 min, where the encoder's activations set it) is the largest measured instead:
    (MiB, extrapolated)."""
    full = at_full_depth(by_depth, FULL_DECODER)
    return (full, True) if full >= max(by_depth.values()) else (max(by_depth.values()), False)


def extrapolate(raw: dict) -> dict:
    """Full-depth figures per system and length from the raw figures (as the JSON holds them): the
    decoder's at 36 layers, the encoder's as measured at 32 (ours: the runtime's choice)."""
    measured, encode, memory = raw["measured"], raw["encode_s_at_32_layers"], raw["peak_rss_mib"]
    out = {}
    for s in SYSTEMS:
        out[s] = {}
        for seconds in raw["seconds"]:
            per = {int(d): measured[d][s][str(seconds)] for d in measured}
            peak, grows = peak_at_full_depth({int(d): memory[d][s][str(seconds)] for d in memory})
            fig = {"positions": next(iter(per.values()))["positions"],
                   "encode_s": encode[UPSTREAM if s == UPSTREAM else ENCODERS[2]][str(seconds)],
                   **{key: at_full_depth({d: f[key] for d, f in per.items()}, FULL_DECODER)
                      for key in ("prefill_s", "decode_ms_per_token")},
                   "peak_rss_gib": peak / 1024, "peak_rss_extrapolated": grows}
            fig["first_token_s"] = fig["encode_s"] + fig["prefill_s"]
            out[s][str(seconds)] = fig
    return out


def summarize(raw: dict, output: Path) -> dict:
    """The raw figures with their full-depth extrapolation and the issue's ratios, written to
    output (JSON) with its chart beside it (PNG)."""
    full = extrapolate(raw)
    longest, shortest = str(max(raw["seconds"])), str(min(raw["seconds"]))
    result = {**raw, "full_depth": full, "targets": {
        "int8 cache decode, longest over shortest": full[INT8_CACHE][longest]["decode_ms_per_token"]
        / full[INT8_CACHE][shortest]["decode_ms_per_token"],
        "int8 cache decode over upstream's, longest": full[INT8_CACHE][longest]["decode_ms_per_token"]
        / full[UPSTREAM][longest]["decode_ms_per_token"],
        "encode over upstream's, longest": raw["encode_s_at_32_layers"][ENCODERS[2]][longest]
        / raw["encode_s_at_32_layers"][UPSTREAM][longest],
        "peak RSS int8 over fp32 cache, longest": full[INT8_CACHE][longest]["peak_rss_gib"]
        / full[FP32_CACHE][longest]["peak_rss_gib"]}}
    output.write_text(json.dumps(result, indent=1))
    chart(full, raw["seconds"], f"4B widths, full depth extrapolated from {raw['depths']} layers, {raw['threads']} "
          f"threads [{raw['cpu_flags']}]", output.with_suffix(".png"))
    return result


def chart(full: dict, lengths: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [sec / 60 for sec in lengths]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in ((axes[0], "first_token_s", "first token (s)"),
                           (axes[1], "decode_ms_per_token", "decode at that context (ms/token)"),
                           (axes[2], "peak_rss_gib", "peak RSS (GiB)")):
        for s, color in zip(SYSTEMS, ("#888888", "#9cc3e6", "#2a7ab0")):
            values = [full[s][str(sec)][key] for sec in lengths]
            ax.plot(minutes, values, "o-", color=color, label=s)
            for x, v in zip(minutes, values):
                ax.annotate(f"{v:.3g}" if v < 100 else f"{v:,.0f}", (x, v), fontsize=7, textcoords="offset points", xytext=(0, 4))
        ax.set_xlabel("audio (min)")
        ax.set_title(label, fontsize=10)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(memory_worker(*json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":  # again from a JSON's raw figures, without measuring
        summarize(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[2]))
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

    def made(name: str, encoder_depth: int, decoder_depth: int, recipe_name: str) -> tuple[Path, Path]:
        checkpoint, artifact = work / f"{name}-checkpoint", work / f"{name}-{recipe_name}"
        if not checkpoint.exists():
            write_synthetic_checkpoint(checkpoint, preset("4b", encoder_depth, decoder_depth), dtype="bf16")
        if not artifact.exists():
            export_quantized(checkpoint, artifact, load_recipe(recipe_name), verify=False, log=lambda m: None)
        return checkpoint, artifact

    encoder_checkpoint, encoder_artifact = made("4b-encoder", FULL_ENCODER, 1, "int4")
    print(f"timing the encoders at {FULL_ENCODER} layers", flush=True)
    encode = measure_encoders(encoder_checkpoint, encoder_artifact, args.threads, args.rounds, args.seconds)
    measured, memory, sizes = {}, {}, {}
    for depth in args.depths:
        pairs = {s: made(f"4b-{depth}l", depth, depth, RECIPES.get(s, "int4")) for s in SYSTEMS}
        checkpoints, artifacts = {s: c for s, (c, _) in pairs.items()}, {s: a for s, (_, a) in pairs.items()}
        sizes[depth] = {s: directory_mib(artifacts[s]) for s in RECIPES}
        print(f"timing {depth} layers", flush=True)
        measured[depth] = measure_depth(checkpoints, artifacts, args.threads, args.rounds, args.seconds)
        memory[depth] = {s: peak_memory(s, checkpoints[s], artifacts[s], args.threads, args.seconds) for s in SYSTEMS}
    raw = json.loads(json.dumps({  # the form the JSON keeps (string keys), which summarize reads
        "cpu_flags": cpu_flags(), "threads": args.threads, "rounds": args.rounds, "depths": args.depths,
        "seconds": args.seconds, "widths": "MOSS-Audio-4B (hidden 2560, intermediate 9728, encoder d_model 1280)",
        "artifact_mib": sizes, "measured": measured, "encode_s_at_32_layers": encode, "peak_rss_mib": memory}))
    result = summarize(raw, Path(args.output))
    print(json.dumps({"full_depth": result["full_depth"], "targets": result["targets"]}, indent=1))

if __name__ == "__main__":
    main()
