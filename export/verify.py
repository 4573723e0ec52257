"""Parity of an artifact with the PyTorch reference: per graph, per decode step, end to end."""

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from moss_edge import bundled_audio
from moss_edge.export.checkpoint import checkpoint_hash, load_model, reference_bytes
from moss_edge.export.config import load_config
from moss_edge.export.model import MossAudio
from moss_edge.export.reference import ReferencePipeline
from moss_edge.quantize.half_emulation import cpu_view, fp16_graphs
from moss_edge.runtime.audio import load_audio
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.generation import generate_tokens
from moss_edge.runtime.graphs import CUDA_DECODER, ORT_DECODER, PREFILL_DECODER
from moss_edge.runtime.inference import AudioFeatures
from moss_edge.runtime.pipeline import ParityWarning, Pipeline
from moss_edge.runtime.session import available_memory, run_typed
from moss_edge.runtime.sampling import SamplingOptions

# Per precision: worst graph-output cosine, relative error (fp32 only), mean / max KL of the
# next-token distributions, top-1 agreement off near-ties, greedy prefix match.
THRESHOLDS = {
    "fp32": {"cosine": 0.99999, "rel": 1e-3, "kl_mean": 1e-5, "top1": 1.0, "greedy": 1.0},
    "fp16": {"cosine": 0.999, "rel": None, "kl_mean": 1e-3, "top1": 0.95, "greedy": 0.5},
    "int8": {"cosine": 0.99, "rel": None, "kl_mean": 0.05, "top1": 0.9, "greedy": 0.25},
    "int4": {"cosine": 0.98, "rel": None, "kl_mean": 0.1, "top1": 0.8, "greedy": 0.1},
}
ORDER = ["fp32", "fp16", "int8", "int4"]
PROMPT_PATHS = {"int8": "INT8 prompt graph", "decoder": "prompts on the token graph"}


def compare(x: np.ndarray, ref: np.ndarray) -> dict:
    """max-abs and relative error, cosine, and whether both sides are finite (a NaN or Inf
    anywhere makes the figures NaN, which no threshold passes)."""
    x, ref = np.asarray(x, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    finite = bool(np.isfinite(x).all() and np.isfinite(ref).all())
    if not finite:
        return {"max_abs": float("nan"), "rel": float("nan"), "cosine": float("nan"), "finite": False}
    max_abs = float(np.abs(x - ref).max()) if x.size else 0.0
    denom = float(np.linalg.norm(x) * np.linalg.norm(ref))
    return {"max_abs": max_abs, "rel": max_abs / max(float(np.abs(ref).max()), 1e-30),
            "cosine": float(x @ ref / denom) if denom else 1.0, "finite": True}


def check_reference(artifact_dir: str | Path, reference: str | Path) -> None:
    """Refuse a reference checkpoint other than the one the artifact was exported from: the
    comparison would fail for the wrong reason, or inside ONNX Runtime on mismatched shapes."""
    from moss_edge.runtime.artifact import Artifact

    source = Artifact.load(artifact_dir, check_hashes=False, unfinished_ok=True).manifest["source"]
    if not Path(reference).is_dir():
        raise MossEdgeError(f"reference checkpoint {reference} not found; pass the checkpoint folder the artifact "
                            f"was exported from ({source['checkpoint']})")
    if checkpoint_hash(reference) != source["sha256"]:
        raise MossEdgeError(f"{reference} is not the checkpoint {artifact_dir} was exported from (its sha256 differs "
                            f"from the manifest's {source['sha256'][:16]}..., recorded from {source['checkpoint']}); "
                            "verify against that checkpoint")


def reference_model(checkpoint: str | Path, artifact_dir: str | Path) -> MossAudio:
    """The fp32 reference, whole when it takes less than half the available memory with the
    artifact (room for the graphs' sessions), else piecewise (one layer at a time from the
    shards); refused before loading when not even that fits."""
    from moss_edge.runtime.artifact import Artifact

    cfg = load_config(checkpoint)
    artifact = Artifact.load(artifact_dir, check_hashes=False, unfinished_ok=True)
    on_disk = sum((artifact.root / f).stat().st_size for g in artifact.manifest["graphs"].values() for f in set(g["files"]))
    available = available_memory()
    if reference_bytes(cfg, piecewise=False) + on_disk < 0.5 * available:
        return load_model(checkpoint, torch.float32)
    need = reference_bytes(cfg, piecewise=True) + on_disk
    if need > 0.9 * available:
        raise MossEdgeError(f"verifying {artifact_dir} needs about {need / 2**30:.1f} GiB (the artifact, and the fp32 "
                            f"reference one layer at a time); {available / 2**30:.1f} GiB is available. Free memory or "
                            "verify on a larger machine")
    return load_model(checkpoint, torch.float32, piecewise=True)


class Verifier:
    """The parity check, set up once and used by every caller (the CLI's verify, export and
    quantize, the demo, Python code): verifier(artifact_dir) returns the report.

    reference: the checkpoint folder (None: the one the artifact was exported from) or a loaded
    fp32 MossAudio; audio: clips to check on (default: the bundled clip that calibration never
    uses); evaluate: an optional task report (see verify_artifact). The reference is loaded once
    and kept, so keep-until-pass rounds do not read and hash the checkpoint again."""

    def __init__(self, reference: MossAudio | str | Path | None = None, audio: list[str] | None = None,
                 steps: int = 32, provider: str = "cpu", evaluate: Callable | None = None):
        self.reference, self.audio, self.steps, self.provider, self.evaluate = reference, audio, steps, provider, evaluate
        self._model: MossAudio | None = reference if isinstance(reference, MossAudio) else None
        self._source: str | None = None  # sha256 of the checkpoint _model was loaded from

    def check(self, artifact_dir: str | Path) -> None:
        """Refuse a wrong or missing reference now, before any quantization work; loads it once."""
        from moss_edge.runtime.artifact import Artifact

        source = Artifact.load(artifact_dir, check_hashes=False, unfinished_ok=True).manifest["source"]
        if self._model is None:
            checkpoint = self.reference or source["checkpoint"]
            check_reference(artifact_dir, checkpoint)
            self._model, self._source = reference_model(checkpoint, artifact_dir), source["sha256"]
        elif self._source is not None and source["sha256"] != self._source:
            raise MossEdgeError(f"{artifact_dir} was exported from another checkpoint than the one this verifier "
                                "loaded; use one Verifier per source checkpoint")

    @property
    def model(self) -> MossAudio | None:
        """The reference, once `check` has loaded it."""
        return self._model

    def __call__(self, artifact_dir: str | Path) -> dict:
        self.check(artifact_dir)
        return verify_artifact(artifact_dir, self._model, audio=self.audio, steps=self.steps, provider=self.provider,
                               evaluate=self.evaluate)


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    def log_softmax(z):
        z = np.asarray(z, np.float64) - np.max(z)
        return z - np.log(np.exp(z).sum())
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def _reference_steps(ref: ReferencePipeline, prompt: list[int], audio: AudioFeatures, steps: int):
    """Greedy tokens of the reference (no stop ids) and its logits before each of them."""
    logits = ref.prefill(prompt, audio)
    tokens, all_logits = [], [logits]
    for i in range(steps):
        tokens.append(int(np.argmax(logits)))
        if i + 1 < steps:
            all_logits.append(logits := ref.step(tokens[-1]))
    return tokens, all_logits


def verify_artifact(artifact_dir: str | Path, reference: MossAudio | str | Path, audio: list[str] | None = None,
                    prompt: str | list[int] | None = None, steps: int = 16, provider: str = "cpu",
                    evaluate: Callable[[Pipeline, MossAudio], dict | None] | None = None) -> dict:
    """Compare an artifact with the fp32 PyTorch model; returns the report (see `summary`).
    evaluate(pipe, reference) may add a task report (reported, not gated), e.g. the sound-event
    model's accuracy (`moss_edge.sound_events.evaluate.task_report`)."""
    if not isinstance(reference, MossAudio):
        check_reference(artifact_dir, reference)
        reference = reference_model(reference, artifact_dir)
    # fp16 graphs on the CPU provider, which has no fp16 kernels for them: their fp32 twins, each
    # value rounded to fp16 where it is made (quantize/half_emulation.py)
    with cpu_view(artifact_dir) if provider == "cpu" else nullcontext(Path(artifact_dir)) as path:
        report = _verify(path, reference, audio, prompt, steps, provider, evaluate)
        report["artifact"] = str(artifact_dir)
        emulated = fp16_graphs(report.pop("manifest"))
        if provider == "cpu" and emulated:
            report["emulated"] = {"graphs": emulated, "how": "fp16 graphs run on fp32 kernels, each fp16 value "
                                  "rounded to fp16 where it is made (no fp16 kernels on this provider)"}
    return report


def _verify(artifact_dir: Path, reference: MossAudio, audio, prompt, steps: int, provider: str, evaluate) -> dict:
    with warnings.catch_warnings():  # checking again an artifact that failed: the report says so itself
        warnings.simplefilter("ignore", ParityWarning)
        # export/quantize verify before finishing; the decoders are loaded one at a time below
        pipe = Pipeline.load(artifact_dir, provider, unfinished_ok=True, with_decoder=False)
    ref = ReferencePipeline(reference, pipe.ids)  # the ids the artifact was exported with
    audio = audio or [bundled_audio()]
    waveforms = [load_audio(a) for a in audio]
    if prompt is None:
        prompt = "Describe the audio." if pipe.tokenizer else [pipe.ids.audio_start, pipe.ids.audio_end] * len(audio)
    ref_audio = ref.encode(waveforms)
    art_audio = pipe.encode(waveforms)
    prompt_ids = pipe.prompt_ids(prompt, art_audio.clip_tokens)

    adapter_embeds, adapter_deepstack = run_typed(pipe.adapter, {"audio_tokens": ref_audio.tokens, "taps": ref_audio.taps})
    graphs = {
        "encoder": {"audio_tokens": compare(art_audio.tokens, ref_audio.tokens), "taps": compare(art_audio.taps, ref_audio.taps)},
        "adapter": {"audio_embeds": compare(adapter_embeds, ref_audio.embeds),
                    "deepstack_embeds": compare(adapter_deepstack, ref_audio.deepstack)},
    }
    ref_tokens, ref_logits = _reference_steps(ref, prompt_ids, ref_audio, steps)
    # Every decoder graph the artifact has: the provider's own, then the others (on CPU), one
    # loaded at a time (at 4B each holds ~2 GB of weights).
    # and the prompt graph (decoder_prefill, prompts on the integer GEMM) with decoder_ort's tokens
    per_decoder = {}
    names = [pipe.decoder_graph, *(n for n in ("decoder", ORT_DECODER, CUDA_DECODER)
                                   if n in pipe.artifact.manifest["graphs"] and n != pipe.decoder_graph)]
    if pipe.artifact.manifest.get("prefill", {}).get("cpu") == PREFILL_DECODER and ORT_DECODER in names:
        names.append(PREFILL_DECODER)
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ParityWarning)
            host = pipe if provider == "cpu" or name == pipe.decoder_graph else Pipeline(pipe.artifact, "cpu", with_decoder=False)
            runner = (host.using_decoder(ORT_DECODER, prefill="int8") if name == PREFILL_DECODER
                      else host.using_decoder(name))
        graphs[name] = {"prefill_logits": compare(runner.prefill(prompt_ids, ref_audio), ref_logits[0])}
        per_decoder[name] = _decode_steps(runner, prompt_ids, art_audio, ref_tokens, ref_logits, steps)
        del runner
    classes = {"int8-dynamic": "int8", "w8a8": "int8"}
    half = set(fp16_graphs(pipe.artifact.manifest))  # an fp32-weight graph computing in fp16 is held to fp16's gates
    precision = max((classes.get(g["precision"], "fp16" if name in half and g["precision"] == "fp32" else g["precision"])
                     for name, g in pipe.artifact.manifest["graphs"].items()),
                    key=ORDER.index)
    limits = THRESHOLDS[precision]
    per_step, end_to_end = per_decoder[pipe.decoder_graph]
    failures = gate(graphs, end_to_end, limits)
    for name, (_, figures) in per_decoder.items():
        if name != pipe.decoder_graph:
            failures += [f"{name}: {f}" for f in gate({}, figures, limits)]
    cosines = [m["cosine"] for o in graphs.values() for m in o.values()]
    summary = {"passed": not failures, "precision": precision, "steps": steps, "decoder": pipe.decoder_graph,
               "worst_cosine": float("nan") if any(np.isnan(cosines)) else min(cosines),
               "prefill_logits_rel": graphs[pipe.decoder_graph]["prefill_logits"]["rel"],
               "kl_mean": end_to_end["kl_mean"], "top1_agreement": end_to_end["top1_agreement"],
               "top1_decided": end_to_end["top1_decided"],
               "greedy_match": end_to_end["greedy_match"], "failures": failures}
    report = {"artifact": str(artifact_dir), "manifest": pipe.artifact.manifest, "audio": [str(a) for a in audio],
              "prompt_tokens": len(prompt_ids),
              "reference": "fp32 PyTorch, " + ("one piece at a time from the shards" if getattr(reference, "piecewise", False)
                                                else "whole model in memory"),
              "graphs": graphs, "steps": per_step, "end_to_end": end_to_end,
              "end_to_end_by_decoder": {name: figures for name, (_, figures) in per_decoder.items()},
              "thresholds": limits, "summary": summary}
    task = evaluate(pipe.using_decoder(pipe.decoder_graph, pipe.prefill_path), reference) if evaluate else None
    if task:  # reported, not gated: on a few hundred examples a point or two is sampling noise
        report["task"] = task
        if PREFILL_DECODER in names:  # the other prompt path too: which one runs depends on the CPU
            other = "decoder" if pipe.prefill_path == "int8" else "int8"
            task["artifact_by_prefill"] = {
                pipe.prefill_path: task["artifact"],
                other: evaluate(pipe.using_decoder(pipe.decoder_graph, other), reference)["artifact"]}
        summary.update(task_exact_match=task["artifact"]["exact_match"], task_reference_exact_match=task["reference"]["exact_match"],
                       event_list_exact_match=task["artifact"]["event_list_exact_match"])
    return report


def _decode_steps(pipe: Pipeline, prompt_ids: list[int], audio: AudioFeatures, ref_tokens: list[int],
                  ref_logits: list[np.ndarray], steps: int) -> tuple[list[dict], dict]:
    """Teacher-forced on the reference tokens, from the artifact's own audio features, then
    free-running greedy: the per-step figures and the end-to-end ones."""
    per_step = []
    art_logits = pipe.prefill(prompt_ids, audio)
    for i, ref_step in enumerate(ref_logits):
        top2 = np.sort(ref_step)[-2:]
        err = float(np.abs(art_logits - ref_step).max())
        per_step.append({"step": i, "kl": kl_divergence(ref_step, art_logits), "max_abs": err,
                         "top1_agree": bool(np.argmax(art_logits) == np.argmax(ref_step)),
                         "near_tie": bool(top2[1] - top2[0] < 2 * err)})
        if i + 1 < len(ref_logits):
            art_logits = pipe.step(ref_tokens[i])
    art_tokens = list(generate_tokens(pipe, prompt_ids, audio, SamplingOptions(max_new_tokens=steps), stop_ids=[]))
    return per_step, decode_figures(per_step, ref_tokens, art_tokens)


def decode_figures(per_step: list[dict], ref_tokens: list[int], art_tokens: list[int]) -> dict:
    """End-to-end figures from the teacher-forced steps and the two free-running greedy runs."""
    decided = [s for s in per_step if not s["near_tie"]]
    prefix = next((i for i, (a, b) in enumerate(zip(art_tokens, ref_tokens)) if a != b), len(ref_tokens))
    return {
        "kl_mean": float(np.mean([s["kl"] for s in per_step])), "kl_max": float(max(s["kl"] for s in per_step)),
        # None when every step was a near-tie: nothing was measured, so nothing is claimed
        "top1_agreement": (sum(s["top1_agree"] for s in decided) / len(decided)) if decided else None,
        "top1_decided": len(decided), "near_ties": len(per_step) - len(decided),
        "greedy_match": prefix / len(ref_tokens), "greedy_reference": ref_tokens, "greedy_artifact": art_tokens,
        # Free-running greedy decoding diverges for good at the first differing token; a divergence
        # at a near-tie of the reference is a coin flip, not an accuracy failure.
        "diverged_at_near_tie": prefix < len(per_step) and per_step[prefix]["near_tie"],
    }


def gate(graphs: dict, end_to_end: dict, limits: dict) -> list[str]:
    """What fails the thresholds. Each test reads "not (value within limit)", so NaN fails it;
    a figure with nothing measured behind it (top-1 when all steps were near-ties) is not gated."""
    failures = []
    for graph, outputs in graphs.items():
        for name, m in outputs.items():
            if not m["finite"]:
                failures.append(f"{graph}.{name} has NaN or infinite values")
            elif not m["cosine"] >= limits["cosine"]:
                failures.append(f"{graph}.{name} cosine {m['cosine']:.6f} < {limits['cosine']}")
            elif limits["rel"] is not None and not m["rel"] <= limits["rel"]:
                failures.append(f"{graph}.{name} relative error {m['rel']:.2e} > {limits['rel']}")
    if not end_to_end["kl_mean"] <= limits["kl_mean"]:
        failures.append(f"mean KL {end_to_end['kl_mean']:.2e} > {limits['kl_mean']}")
    if end_to_end["top1_decided"] and not end_to_end["top1_agreement"] >= limits["top1"]:
        failures.append(f"top-1 agreement {end_to_end['top1_agreement']:.3f} < {limits['top1']}")
    if not end_to_end["greedy_match"] >= limits["greedy"] and not end_to_end["diverged_at_near_tie"]:
        failures.append(f"greedy match {end_to_end['greedy_match']:.3f} < {limits['greedy']}")
    return failures


def top1_text(agreement: float | None, decided: int, steps: int) -> str:
    if agreement is None:
        return f"n/a (all {steps} steps were near-ties)"
    return f"{agreement:.3f} ({decided} of {steps} steps decided)"


def report_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Parity report: {report['artifact']}", "",
             f"**{'PASSED' if s['passed'] else 'FAILED'}** at {s['precision']} thresholds "
             f"({report['prompt_tokens']} prompt tokens, {s['steps']} steps, audio: {', '.join(Path(a).name for a in report['audio'])})", "",
             "| graph | output | max abs | relative | cosine |", "|---|---|---|---|---|"]
    for graph, outputs in report["graphs"].items():
        for name, m in outputs.items():
            lines.append(f"| {graph} | {name} | {m['max_abs']:.3e} | {m['rel']:.3e} | {m['cosine']:.7f} |")
    e = report["end_to_end"]
    lines += ["", f"| end to end ({s.get('decoder', 'decoder')}) | value |", "|---|---|",
              f"| mean KL / max KL | {e['kl_mean']:.3e} / {e['kl_max']:.3e} |",
              f"| top-1 agreement (off near-ties) | {top1_text(e['top1_agreement'], e['top1_decided'], s['steps'])} |",
              f"| greedy prefix match | {e['greedy_match']:.3f}"
              f"{' (diverged at a near-tie)' if e.get('diverged_at_near_tie') else ''} |"]
    for name, other in report.get("end_to_end_by_decoder", {}).items():
        if name != s.get("decoder", "decoder"):
            label = f"{name} prompts, {ORT_DECODER} tokens" if name == PREFILL_DECODER else name
            lines.append(f"| {label}: mean KL / top-1 / greedy | {other['kl_mean']:.3e} / "
                         f"{top1_text(other['top1_agreement'], other['top1_decided'], s['steps'])} / {other['greedy_match']:.3f} |")
    if "task" in report:
        t = report["task"]
        lines += ["", f"Task accuracy (sound events, {t['n']} held-out examples, exact match):", "",
                  "| model | overall | " + " | ".join(t["reference"]["per_task"]) + " |",
                  "|---|---|" + "---|" * len(t["reference"]["per_task"])]
        rows = [("reference", t["reference"])] + ([(f"artifact, {PROMPT_PATHS[path]}", r) for path, r in
                                                   t["artifact_by_prefill"].items()]
                                                  if "artifact_by_prefill" in t else [("artifact", t["artifact"])])
        for name, r in rows:
            lines.append(f"| {name} | {r['exact_match']:.3f} | " + " | ".join(f"{v:.3f}" for v in r["per_task"].values()) + " |")
    if s["failures"]:
        lines += ["", "Failures:", *[f"- {f}" for f in s["failures"]]]
    return "\n".join(lines) + "\n"
