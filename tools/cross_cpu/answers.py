"""What artifacts answer on this machine, for comparing CPUs: for each artifact and clip, the
prompt's last-position logits on each way the CPU can run it (the portable decoder, the CPU
decoder, the INT8 prompt graph), the greedy tokens the runtime gives by default, and the
greedy tokens of a streamed request (open_stream, exact and causal). Needs the runtime only (no
torch, no onnx), so it runs on a device, under qemu, anywhere.

    python answers.py OUT.npz ARTIFACT... --clip A.flac --clip B.flac [--prompt TEXT] [--tokens 24] [--stream-on ARTIFACT]
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.audio import SAMPLE_RATE
from moss_edge.runtime.cpu import cpu_features, integer_dot_product
from moss_edge.runtime.pipeline import Pipeline, to_waveform

STREAM_PIECE_S = 0.5


def streamed(pipe: Pipeline, waveform: np.ndarray, prompt: str, tokens: int, exact: bool) -> list[int]:
    piece = int(STREAM_PIECE_S * SAMPLE_RATE)
    with pipe.open_stream(prompt, exact=exact) as live:
        for start in range(0, len(waveform), piece):
            live.feed(waveform[start:start + piece])
        return list(live.finish(max_new_tokens=tokens).tokens)


def answers(artifact: Path, clips: list[Path], text: str, tokens: int, stream: bool) -> dict[str, np.ndarray]:
    """stream: streamed requests too (exact and causal), on each clip."""
    out, settings = {}, {}
    loaded = Artifact.load(artifact)  # the manifest alone: each way below loads its own sessions
    manifest = loaded.manifest
    # every way the CPU can run the prompt: the portable decoder, the CPU decoder (contrib ops), and
    # that decoder with the INT8 prompt graph
    cpu_decoder = manifest.get("decoders", {}).get("cpu")
    ways = {"portable": ("decoder", "decoder")}
    if cpu_decoder:
        ways["cpu-decoder"] = (cpu_decoder, "decoder")
        if manifest.get("prefill", {}).get("cpu"):
            ways["int8-prompt"] = (cpu_decoder, "int8")
    ids = loaded.token_ids  # an artifact without a tokenizer is asked in token ids: a few text ids around the clip
    prompt = text if loaded.tokenizer_files else [1, 2, 3, ids.audio_start, ids.audio_end, 4, 5]
    for path, (decoder, prefill) in ways.items():
        if loaded.unsupported(decoder):  # an int8 KV cache on an older onnxruntime: the runtime falls back
            settings[path] = {"not run": loaded.unsupported(decoder)}
            continue
        pipe = Pipeline.load(artifact, threads=1, decoder=decoder, prefill=prefill)
        settings[path] = pipe.settings
        for clip in clips:
            waveform = to_waveform(clip)
            features = pipe.encode([waveform])
            out[f"logits/{path}/{clip.stem}"] = pipe.prefill(pipe.prompt_ids(prompt, features.clip_tokens), features)
    pipe = Pipeline.load(artifact, threads=1)  # the decoder and prompt path this CPU gets by default
    settings["default"] = pipe.settings
    for clip in clips:
        out[f"tokens/{clip.stem}"] = np.array(pipe.generate(clip, prompt, max_new_tokens=tokens).tokens, np.int64)
        if stream:
            waveform = to_waveform(clip)
            for exact in (True, False):
                key = f"stream_{'exact' if exact else 'causal'}/{clip.stem}"
                out[key] = np.array(streamed(pipe, waveform, prompt, tokens, exact), np.int64)
    out["settings"] = np.array(json.dumps(settings, default=str))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--clip", type=Path, action="append", required=True)
    ap.add_argument("--prompt", default="List the events with their start times.", help="for artifacts with a tokenizer")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--stream-on", type=Path, action="append", default=[],
                    help="also streamed requests (exact and causal) for this one of the artifacts")
    a = ap.parse_args()
    import onnxruntime

    result = {"machine": np.array(platform.machine()), "onnxruntime": np.array(onnxruntime.__version__),
              "features": np.array(" ".join(sorted(cpu_features()))),
              "integer_units": np.array(" ".join(integer_dot_product(cpu_features())))}
    for artifact in a.artifacts:
        for key, value in answers(artifact, a.clip, a.prompt, a.tokens, artifact in a.stream_on).items():
            result[f"{artifact.name}/{key}"] = value
    np.savez(a.out, **result)
    print(f"{a.out}: {len(a.artifacts)} artifact(s) x {len(a.clip)} clip(s) on {platform.machine()}, "
          f"onnxruntime {onnxruntime.__version__}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
