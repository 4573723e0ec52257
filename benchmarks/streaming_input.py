"""Time from the end of the audio to the first token at 4B widths: a 60 s clip fed as a live
source (Pipeline.open_stream, 0.1 s blocks) against the offline path (encode + prefill after
the clip ends), alternating rounds in one process, on the INT4 AWQ artifact with its encoder at
full depth (32 layers: one chunk's encode is too cheap per layer to extrapolate through this
machine's noise) and its decoder at several depths, extrapolated per layer to 36 as `moss-edge
bench` does. The prompt is bench's: the audio, then 16 text ids (the 419-token bar
at 30 s). Also timed: the same 16 ids put before the audio, which leaves only audio_eos after it.

    python benchmarks/streaming_input.py --workdir /big/disk/stream [--depths 4 6 8] [--rounds 6]
    # writes benchmarks/streaming-input.json + .png; the work folder holds ~8 GB of checkpoints

The per-chunk work while the audio arrives is timed too: a live source needs it below the
chunk's 4 s of audio (real-time factor < 1).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moss_edge import bundled_audio
from moss_edge.bench import BenchSettings, bench_prompt, cpu_flags, streamed_wait
from moss_edge.export.synthetic import preset
from moss_edge.runtime.audio import SAMPLE_RATE, load_audio
from moss_edge.runtime.pipeline import Pipeline

CLIP_SECONDS = 60
CLI = [sys.executable, "-m", "moss_edge.cli"]
SYSTEMS = ("offline", "streamed", "streamed, text first")


def sixty_seconds() -> np.ndarray:
    """The bundled recordings, one after another, to 60 s."""
    names = ["speech_ko_18s.flac", "dialogue_zh_12s.flac", "speech_en_10s.flac", "speech_zh_4s.flac"]
    clip = np.concatenate([load_audio(bundled_audio(n)) for n in names] * 2)[: CLIP_SECONDS * SAMPLE_RATE]
    assert len(clip) == CLIP_SECONDS * SAMPLE_RATE
    return clip


def artifact_at(depth: int, workdir: Path) -> Path:
    """The synthetic 4B checkpoint, its encoder whole and its decoder at `depth` layers, exported to INT4 AWQ."""
    checkpoint, artifact = workdir / f"ckpt-4b-{depth}l", workdir / f"4b-{depth}l-int4-awq"
    if not checkpoint.exists():
        subprocess.run([*CLI, "synthetic", "-o", str(checkpoint), "--preset", "4b", "--decoder-layers", str(depth)],
                       check=True, capture_output=True)
    if not artifact.exists():
        subprocess.run([*CLI, "export", str(checkpoint), "-o", str(artifact), "--recipe", "int4-awq", "--no-verify",
                        "--cache-dir", str(workdir / "cache")], check=True, capture_output=True)
    return artifact


def offline(pipe: Pipeline, clip: np.ndarray, prompt: list[int]) -> dict:
    """The wait and its parts when the clip is encoded and prefilled after it ends."""
    t = pipe.generate(clip, prompt, max_new_tokens=1).timings
    return {"wait_s": t["encode_s"] + t["prefill_s"], "encode_s": t["encode_s"], "prefill_s": t["prefill_s"]}


def streamed(pipe: Pipeline, clip: np.ndarray, prompt: list[int]) -> dict:
    """The same, with the clip fed as a live source."""
    t = streamed_wait(pipe, clip, prompt)
    return {"wait_s": t["streamed_end_of_audio_to_first_token_s"], "encode_s": t["streamed_encode_s"],
            "prefill_s": t["streamed_prefill_s"]}


def chunk_work(pipe: Pipeline, clip: np.ndarray, prompt: list[int]) -> dict:
    """Median encoder and decoder seconds per 4 s chunk while the clip arrives."""
    block, work = SAMPLE_RATE // 10, []
    with pipe.open_stream(prompt) as live:
        for start in range(0, len(clip), block):
            before, spent = len(live.chunks), dict(live.spent)
            live.feed(clip[start : start + block])
            if len(live.chunks) > before:
                work.append({k: live.spent[k] - spent[k] for k in spent})
    return {f"chunk_{k}": float(np.median([w[k] for w in work])) for k in ("encode_s", "prefill_s")}


def measure(artifact: Path, rounds: int, threads: int) -> dict:
    """Per system, the fastest of the rounds for each figure on its own (the wait and its parts:
    the machine's noise only ever adds)."""
    pipe = Pipeline.load(artifact, threads=threads, check_hashes=False)
    clip, after = sixty_seconds(), bench_prompt(pipe.ids, BenchSettings())
    first = after[2:] + after[:2]  # the text ids, then the audio span
    runs = {"offline": lambda: offline(pipe, clip, after), "streamed": lambda: streamed(pipe, clip, after),
            "streamed, text first": lambda: streamed(pipe, clip, first)}
    best = {}
    for r in range(rounds):  # alternating: the noise falls on all of them
        for name in (SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]):
            t = runs[name]()
            best[name] = {k: min(v, best.get(name, t)[k]) for k, v in t.items()}
    best["chunk_work"] = chunk_work(pipe, clip, after)
    return best


def extrapolate(by_depth: dict[int, dict], decoder_layers: int) -> dict:
    """Each decoder part to the decoder's depth (least squares over the depths measured); the
    encoder's parts (measured at full depth) and what is neither (mel, sampling) as measured."""
    depths = sorted(by_depth)

    def at(key: str, field: str, full: int) -> float:
        slope, fixed = np.polyfit(depths, [by_depth[d][key][field] for d in depths], 1)
        return float(fixed + slope * full)

    def measured(key: str, field: str) -> float:
        return float(np.median([by_depth[d][key][field] for d in depths]))

    out = {}
    for name in SYSTEMS:
        encode, prefill = measured(name, "encode_s"), at(name, "prefill_s", decoder_layers)
        rest = float(np.median([r[name]["wait_s"] - r[name]["encode_s"] - r[name]["prefill_s"] for r in by_depth.values()]))
        out[name] = {"end_of_audio_to_first_token_s": encode + prefill + rest, "encode_s": encode, "prefill_s": prefill,
                     "prefill_s_per_layer": float(np.polyfit(depths, [by_depth[d][name]["prefill_s"]
                                                                      for d in depths], 1)[0])}
    work = measured("chunk_work", "chunk_encode_s") + at("chunk_work", "chunk_prefill_s", decoder_layers)
    out["chunk_work_s"], out["chunk_real_time_factor"] = work, work / 4.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "streaming-input.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    artifacts = {d: artifact_at(d, args.workdir) for d in sorted(args.depths)}
    by_depth = {}
    for depth, artifact in artifacts.items():
        print(f"timing {artifact.name}", flush=True)
        by_depth[depth] = measure(artifact, args.rounds, args.threads)
    full = preset("4b")
    result = {"model": "MOSS-Audio-4B widths (synthetic), INT4 AWQ", "clip_seconds": CLIP_SECONDS,
              "cpu": cpu_flags(), "threads": args.threads, "rounds": args.rounds, "measured": by_depth,
              "full_depth": {"encoder_layers": full.audio.encoder_layers, "decoder_layers": full.language.num_hidden_layers},
              "extrapolated": extrapolate(by_depth, full.language.num_hidden_layers),
              "date": time.strftime("%Y-%m-%d")}
    args.out.write_text(json.dumps(result, indent=2))
    chart(result, args.out.with_suffix(".png"))
    print(json.dumps(result["extrapolated"], indent=2))


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    full = result["extrapolated"]
    limit = 3.0  # seconds shown: the offline bar runs off the chart, its figure is written beside it
    encode = [min(full[n]["encode_s"], limit) for n in SYSTEMS]
    prefill = [min(full[n]["prefill_s"], limit - e) for n, e in zip(SYSTEMS, encode)]
    ax.barh(SYSTEMS, encode, color="#7aa6e0", label="encoder + adapter")
    ax.barh(SYSTEMS, prefill, left=encode, color="#3b5d99", label="decoder prefill")
    for i, n in enumerate(SYSTEMS):
        v = full[n]["end_of_audio_to_first_token_s"]
        ax.text(min(v, limit), i, f" {v:.2f} s" + (" (off the chart)" if v > limit else ""), va="center", fontsize=8)
    ax.axvline(1.5, color="#c0392b", linestyle="--", label="target 1.5 s")
    ax.set_xlim(0, limit * 1.3)
    ax.set_xlabel("end of audio -> first token (s)")
    d = result["full_depth"]
    ax.set_title(f"{result['clip_seconds']} s clip, 4B widths at {d['encoder_layers']}+{d['decoder_layers']} layers "
                 f"(decoder extrapolated from {', '.join(map(str, result['measured']))}), INT4 AWQ\n"
                 f"{result['threads']} threads [{result['cpu']}]", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
