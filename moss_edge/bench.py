"""Speed and memory of the PyTorch reference and of artifacts, measured in one run.

Each backend runs in its own process so that its peak RSS is its own. At real widths with a
few layers, results at two depths give a per-layer cost that is extrapolated to full depth.
"""

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moss_edge import bundled_audio
from moss_edge.runtime.audio import SAMPLE_RATE
from moss_edge.runtime.cpu import cpu_features


@dataclass
class BenchSettings:
    audio_seconds: float = 30.0
    decode_tokens: int = 32
    threads: int = 2
    text_tokens: int = 16  # 30 s of audio (403 ids with markers) + 16 = the 419-token bar


def bench_audio(seconds: float) -> np.ndarray:
    """The bundled recording repeated to the wanted length, 16 kHz."""
    from moss_edge.runtime.audio import load_audio

    wave = load_audio(bundled_audio())
    return np.tile(wave, int(np.ceil(seconds * SAMPLE_RATE / len(wave))))[: int(seconds * SAMPLE_RATE)]


def bench_prompt(ids, settings: BenchSettings) -> list[int]:
    """An audio span and a fixed number of ordinary text ids (the same for every tokenizer)."""
    return [ids.audio_start, ids.audio_end] + [100 + i for i in range(settings.text_tokens)]


def _best_of(runs: int, fn):
    """Fastest of several runs, and the last result: shared machines add noise, never speed."""
    best = None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def _measure(encode, prefill, step, n_chunks: int, settings: BenchSettings) -> dict:
    # the first encode and prefill after loading (first runs allocate and pick kernels) are a
    # user's first answer; the best of the runs after them are the steady figures
    cold_s, _ = _best_of(1, lambda: prefill(encode()))
    encoder_s, features = _best_of(3, encode)
    prefill_s, logits = _best_of(2, lambda: prefill(features))
    step(int(np.argmax(logits)))
    start = time.perf_counter()
    for _ in range(settings.decode_tokens):
        logits = step(int(np.argmax(logits)))
    decode_s = time.perf_counter() - start
    return {"encoder_ms_per_chunk": encoder_s * 1000 / n_chunks, "encoder_s": encoder_s,
            "prefill_ms": prefill_s * 1000, "decode_ms_per_token": decode_s * 1000 / settings.decode_tokens,
            "decode_tokens_per_s": settings.decode_tokens / decode_s, "time_to_first_token_s": encoder_s + prefill_s,
            "encoder_real_time_factor": encoder_s / settings.audio_seconds, "first_answer_after_load_s": cold_s}


def streamed_wait(pipe, wave: np.ndarray, prompt: list[int]) -> dict:
    """Seconds from the end of the audio to the first token when the clip arrives in 0.1 s blocks
    and each chunk is encoded and prefilled as it completes; and the encoder's and the decoder's
    part of them."""
    block = SAMPLE_RATE // 10
    with pipe.open_stream(prompt) as live:
        for start in range(0, len(wave), block):
            live.feed(wave[start : start + block])
        t = live.finish(max_new_tokens=1).timings
    return {"streamed_end_of_audio_to_first_token_s": t["end_of_audio_to_first_token_s"],
            "streamed_encode_s": t["end_of_audio_encode_s"], "streamed_prefill_s": t["end_of_audio_prefill_s"]}


def worker(backend: str, path: str, settings: BenchSettings) -> dict:
    """Run in a child process: time one backend (torch-bf16, torch-fp32 or an ONNX Runtime
    artifact) on the bench audio and prompt, through the Inference interface."""
    from moss_edge.runtime.audio import chunk_mels, log_mel
    from moss_edge.runtime.prompt import expand_audio_spans

    wave = bench_audio(settings.audio_seconds)
    if backend.startswith("torch"):
        import torch

        from moss_edge.export.reference import ReferencePipeline

        torch.set_num_threads(settings.threads)
        start = time.perf_counter()
        model = ReferencePipeline.load(path, torch.bfloat16 if backend == "torch-bf16" else torch.float32)
    else:
        from moss_edge.runtime.pipeline import Pipeline

        start = time.perf_counter()
        model = Pipeline.load(path, threads=settings.threads)
    load_s = time.perf_counter() - start
    state = {}

    def prefill(features):
        state["ids"] = expand_audio_spans(bench_prompt(model.ids, settings), features.clip_tokens, model.ids)
        return model.prefill(state["ids"], features)

    n_chunks = len(chunk_mels([log_mel(wave)], model.dims.chunk_frames).frames)
    result = _measure(lambda: model.encode([wave]), prefill, model.step, n_chunks, settings)
    if not backend.startswith("torch"):  # the same clip fed as a live source (Pipeline.open_stream)
        result.update(min((streamed_wait(model, wave, bench_prompt(model.ids, settings)) for _ in range(2)),
                          key=lambda r: r["streamed_end_of_audio_to_first_token_s"]))
    result["prompt_tokens"], result["load_s"] = len(state["ids"]), load_s
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def decoder_times(run, dims, ids: list[int], steps: int) -> tuple[float, float]:
    """A decoder runner's (prefill seconds for ids, with zero audio rows; decode ms per token
    for `steps` greedy steps after them)."""
    start = time.perf_counter()
    logits = run.prefill(ids, np.zeros((len(ids), dims.hidden_size), np.float32),
                         np.zeros((dims.num_deepstack, len(ids), dims.hidden_size), np.float32))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        logits = run.step(int(np.argmax(logits)))
    return prefill, (time.perf_counter() - start) * 1000 / steps


def fastest_alternating(measures: dict, rounds: int) -> dict:
    """{system: measure() -> (prefill, decode)} -> {system: fastest (prefill, decode)}: a warm-up
    run each, then rounds in alternating order (shared machines add noise, never speed)."""
    for measure in measures.values():
        measure()
    best = {key: (float("inf"), float("inf")) for key in measures}
    for r in range(rounds):
        for key in (list(measures) if r % 2 == 0 else list(reversed(measures))):
            prefill, decode = measures[key]()
            best[key] = (min(best[key][0], prefill), min(best[key][1], decode))
    return best


def fit_depths(by_depth: dict[int, tuple[float, float]], full_depth: int) -> dict:
    """{depth: (prefill s, decode ms)} -> per-layer costs (least squares) and the full-depth figures."""
    depths = sorted(by_depth)
    prefill, decode = (np.array([by_depth[d][k] for d in depths]) for k in (0, 1))
    (p_layer, p_fixed), (s_layer, s_fixed) = np.polyfit(depths, prefill, 1), np.polyfit(depths, decode, 1)
    return {"measured": {str(d): {"prefill_s": float(p), "decode_ms": float(s)} for d, p, s in zip(depths, prefill, decode)},
            "prefill_s_per_layer": float(p_layer), "decode_ms_per_layer": float(s_layer),
            f"prefill_s_at_{full_depth}": float(p_fixed + full_depth * p_layer),
            f"decode_ms_at_{full_depth}": float(s_fixed + full_depth * s_layer)}


def cpu_flags() -> str:
    """The SIMD features that decide which kernels run (x86 'flags', ARM64 'Features'), for
    the records every benchmark writes beside its figures."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimd", "asimddp", "i8mm", "sve")
    present = cpu_features()
    return " ".join(f for f in wanted if f in present)


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM starts afresh at exec, unlike ru_maxrss, which Linux
    carries over from the parent that spawned the worker."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(backend: str, path: Path, settings: BenchSettings) -> dict:
    cmd = [sys.executable, "-m", "moss_edge.bench", backend, str(path), json.dumps(asdict(settings))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {backend} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def directory_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def extrapolate(by_depth: dict[int, dict], full_encoder: int, full_decoder: int) -> dict:
    """Linear in depth: value(L) = fixed + L * per_layer, from two depths."""
    (l1, r1), (l2, r2) = sorted(by_depth.items())[:2]
    out = {}
    for key, full in (("encoder_ms_per_chunk", full_encoder), ("encoder_s", full_encoder), ("prefill_ms", full_decoder),
                      ("decode_ms_per_token", full_decoder), ("streamed_encode_s", full_encoder),
                      ("streamed_prefill_s", full_decoder)):
        if key not in r1:
            continue
        per_layer = (r2[key] - r1[key]) / (l2 - l1)
        out[key] = r1[key] + (full - l1) * per_layer
        out[f"{key}_per_layer"] = per_layer
    out["time_to_first_token_s"] = out["encoder_s"] + out["prefill_ms"] / 1000
    if "streamed_encode_s" in out:  # the wait's encoder and decoder parts, each to its own depth
        out["streamed_end_of_audio_to_first_token_s"] = (r1["streamed_end_of_audio_to_first_token_s"]
                                                         + out["streamed_encode_s"] - r1["streamed_encode_s"]
                                                         + out["streamed_prefill_s"] - r1["streamed_prefill_s"])
    out["decode_tokens_per_s"] = 1000 / out["decode_ms_per_token"]
    return out


def run_bench(preset: str, depths: list[int], workdir: Path, settings: BenchSettings, recipes: list[str] = (),
              opset: int = 21, log=print) -> dict:
    """Synthetic checkpoints at the preset's widths and each depth, their fp32 artifacts, and
    every backend timed on each (each artifact verified against the PyTorch model as it is made,
    its parity recorded beside its timings); then the extrapolation to full depth and the ratios."""
    from moss_edge.export.onnx_export import export_artifact
    from moss_edge.quantize.artifact import quantize_artifact
    from moss_edge.quantize.recipe import load_recipe
    from moss_edge.export.synthetic import preset as make_preset
    from moss_edge.export.synthetic import write_synthetic_checkpoint

    full = make_preset(preset)
    runs: dict[str, dict[int, dict]] = {}
    sizes: dict[str, dict[int, float]] = {}
    parity: dict[str, dict[int, dict]] = {}
    for depth in depths:
        checkpoint = workdir / f"{preset}-{depth}l-checkpoint"
        if not checkpoint.exists():
            log(f"writing a synthetic {preset} checkpoint with {depth} encoder and decoder layers")
            write_synthetic_checkpoint(checkpoint, make_preset(preset, depth, depth), dtype="bf16")
        artifact = workdir / f"{preset}-{depth}l-fp32-opset{opset}"
        if not artifact.exists():
            log(f"exporting {checkpoint.name}")
            export_artifact(checkpoint, artifact, opset=opset, log=lambda m: None)
        variants = [("torch-bf16", checkpoint), ("torch-fp32", checkpoint), ("ort-fp32", artifact)]
        for recipe in recipes:
            quantized = workdir / f"{preset}-{depth}l-{recipe}-opset{opset}"
            if not quantized.exists():
                log(f"quantizing {artifact.name} with {recipe}")
                quantize_artifact(artifact, quantized, load_recipe(recipe), cache_dir=workdir / "cache", log=lambda m: None)
            variants.append((f"ort-{recipe}", quantized))
        for backend, path in variants:
            log(f"timing {backend} at {depth} layers")
            runs.setdefault(backend, {})[depth] = run_worker("ort" if backend.startswith("ort") else backend, path, settings)
            sizes.setdefault(backend, {})[depth] = directory_mib(path)
            if backend.startswith("ort"):  # what was timed was also checked against the PyTorch model
                parity.setdefault(backend, {})[depth] = json.loads((path / "manifest.json").read_text())["parity"]
    result = {"preset": preset, "depths": depths, "opset": opset, "settings": asdict(settings), "runs": runs,
              "size_mib": sizes, "parity": parity}
    if len(depths) >= 2:
        result["extrapolated"] = {b: extrapolate(r, full.audio.encoder_layers, full.language.num_hidden_layers)
                                  for b, r in runs.items()}
        base = result["extrapolated"]["torch-bf16"]
        result["speedup_vs_torch_bf16"] = {
            b: {k: base[k] / v[k] for k in ("encoder_s", "prefill_ms", "decode_ms_per_token")}
            for b, v in result["extrapolated"].items()}
    return result


if __name__ == "__main__":
    backend, path, settings = sys.argv[1], sys.argv[2], BenchSettings(**json.loads(sys.argv[3]))
    print(json.dumps(worker(backend, path, settings)))
