"""Time from the end of the audio to the first token: a 60 s clip fed as a live source
(Pipeline.open_stream, 0.1 s blocks) against the offline path (encode + prefill after the clip
ends), alternating rounds in one process, on one artifact at full depth.

    python benchmarks/streaming_input.py ARTIFACT [--rounds 2]   # writes benchmarks/streaming-input.json + .png

Feeding runs as fast as the chunks are processed; the per-chunk work is timed too, since a live
source needs it below the chunk's 4 s of audio (real-time factor < 1).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from moss_edge import bundled_audio
from moss_edge.runtime.audio import SAMPLE_RATE, load_audio
from moss_edge.runtime.pipeline import Pipeline

CLIP_SECONDS = 60
QUESTION = "What is said, and when?"


def sixty_seconds() -> np.ndarray:
    """The bundled recordings, one after another, to 60 s."""
    names = ["speech_ko_18s.flac", "dialogue_zh_12s.flac", "speech_en_10s.flac", "speech_zh_4s.flac"]
    waves = [load_audio(bundled_audio(n)) for n in names]
    clip = np.concatenate(waves * 2)[: CLIP_SECONDS * SAMPLE_RATE]
    assert len(clip) == CLIP_SECONDS * SAMPLE_RATE
    return clip


def offline(pipe: Pipeline, clip: np.ndarray) -> dict:
    r = pipe.generate(clip, QUESTION, max_new_tokens=1)
    return {"end_of_audio_to_first_token_s": r.timings["encode_s"] + r.timings["prefill_s"], "prompt_tokens": r.prompt_tokens}


def streamed(pipe: Pipeline, clip: np.ndarray) -> dict:
    block = SAMPLE_RATE // 10
    chunk_work = []
    with pipe.open_stream(QUESTION) as live:
        for start in range(0, len(clip), block):
            chunks = len(live.chunks)
            t = time.perf_counter()
            live.feed(clip[start : start + block])
            if len(live.chunks) > chunks:
                chunk_work.append(time.perf_counter() - t)
        r = live.finish(max_new_tokens=1)
    chunk_seconds = pipe.dims.chunk_frames / 100
    return {"end_of_audio_to_first_token_s": r.timings["end_of_audio_to_first_token_s"], "prompt_tokens": r.prompt_tokens,
            "chunk_work_s": float(np.median(chunk_work)), "chunk_real_time_factor": float(max(chunk_work) / chunk_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "streaming-input.json")
    args = parser.parse_args()
    pipe = Pipeline.load(args.artifact, threads=args.threads, check_hashes=False)
    clip = sixty_seconds()
    rounds = {"offline": [], "streamed": []}
    for _ in range(args.rounds):  # alternating: the machine's noise falls on both
        rounds["offline"].append(offline(pipe, clip))
        rounds["streamed"].append(streamed(pipe, clip))
    best = {k: min(v, key=lambda r: r["end_of_audio_to_first_token_s"]) for k, v in rounds.items()}
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split()
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    result = {"artifact": str(args.artifact), "model": manifest["model"],
              "precisions": {g: e["precision"] for g, e in manifest["graphs"].items()},
              "cpu": " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "asimd") if f in flags),
              "threads": args.threads, "clip_seconds": CLIP_SECONDS, "rounds": rounds, "best": best,
              "streamed_over_offline": best["streamed"]["end_of_audio_to_first_token_s"]
              / best["offline"]["end_of_audio_to_first_token_s"]}
    args.out.write_text(json.dumps(result, indent=2))
    chart(result, args.out.with_suffix(".png"))
    print(json.dumps(best, indent=2))


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["offline", "streamed"]
    values = [result["best"][n]["end_of_audio_to_first_token_s"] for n in names]
    ax.bar(names, values, color=["#999999", "#3b7dd8"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f} s", ha="center", va="bottom")
    m = result["model"]
    ax.set_ylabel("end of audio -> first token (s)")
    ax.set_title(f"{result['clip_seconds']} s clip, {m['num_hidden_layers']} decoder layers x {m['hidden_size']}, "
                 f"{result['threads']} threads [{result['cpu']}]", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
