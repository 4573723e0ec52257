"""The int8 KV cache against the fp32 one at long context: teacher-forced logits over the last
64 positions of a long prompt, the same artifact recipe with either cache.

The prompt (the audio, then 64 text ids) minus its last 64 positions is prefilled (through the
prompt path the CPU takes by default), then each of the last 64 runs alone, as a decode step
does, and its logits are compared: cosine, KL(fp32 cache || int8 cache), top-1.

    python benchmarks/kv_cache_parity.py PAIR_NAME:FP32_CACHE_ARTIFACT:INT8_CACHE_ARTIFACT:SECONDS ... -o benchmarks/kv-cache-parity.json
"""

import argparse
import json
from pathlib import Path

import numpy as np

from moss_edge.bench import bench_audio, cpu_flags
from moss_edge.runtime.pipeline import Pipeline

LAST = 64


def last_logits(pipe: Pipeline, seconds: float) -> np.ndarray:
    """Logits at each of the prompt's last LAST positions (text after the audio), [LAST, vocab]."""
    features = pipe.encode([bench_audio(seconds)])
    special = {pipe.ids.audio_token, pipe.ids.audio_start, pipe.ids.audio_end}
    text = [t for t in range(pipe.dims.vocab_size) if t not in special]  # a small model's vocabulary is small
    ids = pipe.prompt_ids([pipe.ids.audio_start, pipe.ids.audio_end] + [text[(100 + i) % len(text)] for i in range(LAST)],
                          features.clip_tokens)
    pipe.prefill(ids[:-LAST], features)
    return np.array([pipe.step(token) for token in ids[-LAST:]])


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    cosine = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    log_p = ref - ref.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    log_q = got - got.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(1)
    return {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="NAME:FP32_CACHE_ARTIFACT:INT8_CACHE_ARTIFACT:SECONDS")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    results = {}
    for pair in args.pairs:
        name, fp32, int8, seconds = pair.split(":")
        logits = {}
        for cache, path in (("fp32", fp32), ("int8", int8)):
            pipe = Pipeline.load(path, threads=args.threads)
            logits[cache] = last_logits(pipe, float(seconds))
            positions = pipe.decoder.length
            del pipe
        results[f"{name}, {seconds} s"] = {"positions": positions, **compare(logits["fp32"], logits["int8"])}
        print(name, seconds, results[f"{name}, {seconds} s"], flush=True)
    Path(args.output).write_text(json.dumps({"cpu_flags": cpu_flags(), "last_positions": LAST, "results": results}, indent=1))


if __name__ == "__main__":
    main()
