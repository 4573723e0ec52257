"""Parity of an artifact with the PyTorch model, on any provider, without PyTorch.

What the fp32 PyTorch model answered on the held-out clip(s) is a `Recording`, kept in the
artifact (reference.npz): the clips, the prompt ids, the encoder's and adapter's outputs, the
last prompt position's logits, each decode step's top-k logits with the log-sum-exp of all of
them, and the greedy ids. `check_pipeline` runs an artifact's graphs on a provider and holds
them to a recording with the gates of export/quantize/verify; export/verify.py makes recordings
from the PyTorch model (and checks through here too, so both ways give the same figures).

Per step, the reference's distribution is its top TOP_K tokens and the rest as one bucket: the
KL divergence over that (a lower bound on the full one; exact when the vocabulary has at most
TOP_K tokens), the largest logit error over the top tokens, top-1 agreement off near-ties.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moss_edge.runtime.artifact import Artifact, fp16_graphs, sha256_file
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.generation import generate_tokens
from moss_edge.runtime.graphs import CUDA_DECODER, ORT_DECODER, PREFILL_DECODER
from moss_edge.runtime.inference import AudioFeatures
from moss_edge.runtime.sampling import SamplingOptions
from moss_edge.runtime.session import run_typed

RECORDING = "reference.npz"
TOP_K = 256
# Per precision: worst graph-output cosine, relative error (fp32 only), mean KL of the next-token
# distributions, top-1 agreement off near-ties, greedy prefix match.
THRESHOLDS = {
    "fp32": {"cosine": 0.99999, "rel": 1e-3, "kl_mean": 1e-5, "top1": 1.0, "greedy": 1.0},
    "fp16": {"cosine": 0.999, "rel": None, "kl_mean": 1e-3, "top1": 0.95, "greedy": 0.5},
    "int8": {"cosine": 0.99, "rel": None, "kl_mean": 0.05, "top1": 0.9, "greedy": 0.25},
    "int4": {"cosine": 0.98, "rel": None, "kl_mean": 0.1, "top1": 0.8, "greedy": 0.1},
}
ORDER = ["fp32", "fp16", "int8", "int4"]
PROMPT_PATHS = {"int8": "INT8 prompt graph", "decoder": "prompts on the token graph"}


@dataclass
class Recording:
    """The fp32 PyTorch model's answers on the held-out clip(s), and where they came from."""

    source_sha256: str  # the checkpoint's
    audio: list[str]  # the clips' file names
    waveforms: list[np.ndarray]  # 16 kHz, as checked
    prompt_ids: list[int]
    features: AudioFeatures  # encoder and adapter outputs
    prefill_logits: np.ndarray  # [vocab], the last prompt position's
    top_ids: np.ndarray  # [steps, k] each step's top tokens, best first (step 0: after the prompt)
    top_logits: np.ndarray  # [steps, k]
    lse: np.ndarray  # [steps] log-sum-exp of each step's logits
    greedy: list[int]  # the reference's greedy tokens (teacher forcing feeds these)

    @classmethod
    def from_logits(cls, source_sha256: str, audio: list[str], waveforms: list[np.ndarray], prompt_ids: list[int],
                    features: AudioFeatures, logits: list[np.ndarray], greedy: list[int]) -> "Recording":
        full = np.asarray(logits, np.float64)
        k = min(TOP_K, full.shape[1])
        top = np.argsort(-full, axis=1, kind="stable")[:, :k]
        peak = full.max(axis=1)
        lse = peak + np.log(np.exp(full - peak[:, None]).sum(axis=1))
        return cls(source_sha256, audio, waveforms, list(prompt_ids), features, np.asarray(logits[0], np.float32),
                   top.astype(np.int32), np.take_along_axis(full, top, axis=1).astype(np.float32), lse, list(greedy))

    @property
    def steps(self) -> int:
        return len(self.greedy)

    def save(self, path: Path) -> None:
        f = self.features
        np.savez_compressed(path, source_sha256=self.source_sha256, audio=np.array(self.audio),
                            waveform_lengths=np.array([len(w) for w in self.waveforms]),
                            waveforms=np.concatenate(self.waveforms).astype(np.float32),
                            prompt_ids=np.array(self.prompt_ids, np.int64), tokens=f.tokens, taps=f.taps, embeds=f.embeds,
                            deepstack=f.deepstack, clip_tokens=np.array(f.clip_tokens, np.int64),
                            prefill_logits=self.prefill_logits, top_ids=self.top_ids, top_logits=self.top_logits,
                            lse=self.lse, greedy=np.array(self.greedy, np.int64))

    @classmethod
    def load(cls, path: Path) -> "Recording":
        try:
            z = np.load(path, allow_pickle=False)
            bounds = np.cumsum(z["waveform_lengths"])[:-1]
            features = AudioFeatures(z["tokens"], z["taps"], z["embeds"], z["deepstack"], z["clip_tokens"].tolist())
            return cls(str(z["source_sha256"]), z["audio"].tolist(), np.split(z["waveforms"], bounds),
                       z["prompt_ids"].tolist(), features, z["prefill_logits"], z["top_ids"], z["top_logits"], z["lse"],
                       z["greedy"].tolist())
        except (OSError, KeyError, ValueError) as err:
            raise MossEdgeError(f"{path} is not a readable recording of reference answers ({err}); export or quantize "
                                "the artifact again") from None

    def manifest_entry(self, path: Path) -> dict:
        return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                "source_sha256": self.source_sha256, "audio": self.audio, "prompt_tokens": len(self.prompt_ids),
                "steps": self.steps, "top_k": int(self.top_ids.shape[1])}


def recorded(artifact: Artifact) -> Recording:
    """The artifact's recording (its sha256 already checked with the other files at load),
    refused when it was made from another checkpoint than the artifact."""
    entry = artifact.manifest.get("reference")
    if not entry:
        raise MossEdgeError(f"{artifact.root} carries no recorded reference answers (made before they were kept); "
                            "verify it against its checkpoint with --reference CKPT, or export/quantize it again")
    recording = Recording.load(artifact.file(entry["file"]))
    if recording.source_sha256 != artifact.manifest["source"]["sha256"]:
        raise MossEdgeError(f"{artifact.root}'s recorded answers come from another checkpoint (sha256 "
                            f"{recording.source_sha256[:16]}..., the artifact's is {artifact.manifest['source']['sha256'][:16]}...): "
                            "they cannot check this artifact; export or quantize it again")
    return recording


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


def step_figures(rec: Recording, step: int, logits: np.ndarray) -> dict:
    """KL (reference's top tokens + the rest as one bucket), largest error over the top tokens,
    top-1 agreement and whether the reference's top two are a near-tie at that error."""
    ids, ref = rec.top_ids[step], rec.top_logits[step].astype(np.float64)
    a = np.asarray(logits, np.float64)
    peak = a.max()
    lq = a[ids] - (peak + np.log(np.exp(a - peak).sum()))
    lp = ref - rec.lse[step]
    p = np.exp(lp)
    kl = float(np.sum(p * (lp - lq)))
    if len(ids) < len(a):  # the tokens past the top k, as one bucket
        p_rest, q_rest = 1.0 - p.sum(), 1.0 - np.exp(lq).sum()
        if p_rest > 1e-12 and q_rest > 1e-12:
            kl += float(p_rest * (np.log(p_rest) - np.log(q_rest)))
    err = float(np.abs(a[ids] - ref).max())
    return {"step": step, "kl": kl, "max_abs": err, "top1_agree": bool(np.argmax(a) == ids[0]),
            "near_tie": bool(len(ref) > 1 and ref[0] - ref[1] < 2 * err)}


def decode_steps(runner, rec: Recording, features: AudioFeatures) -> tuple[list[dict], dict]:
    """Teacher-forced on the reference's tokens from the artifact's own audio features, then
    free-running greedy: the per-step figures and the end-to-end ones."""
    per_step = []
    logits = runner.prefill(rec.prompt_ids, features)
    for i in range(rec.steps):
        per_step.append(step_figures(rec, i, logits))
        if i + 1 < rec.steps:
            logits = runner.step(rec.greedy[i])
    tokens = list(generate_tokens(runner, rec.prompt_ids, features, SamplingOptions(max_new_tokens=rec.steps), stop_ids=[]))
    return per_step, decode_figures(per_step, rec.greedy, tokens)


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
    return graph_failures(graphs, limits) + _end_to_end_failures(end_to_end, limits)


def graph_failures(graphs: dict, limits: dict) -> list[str]:
    """What fails the thresholds among the graphs' outputs (graph -> output -> figures)."""
    failures = []
    for graph, outputs in graphs.items():
        for name, m in outputs.items():
            if not m["finite"]:
                failures.append(f"{graph}.{name} has NaN or infinite values")
            elif not m["cosine"] >= limits["cosine"]:
                failures.append(f"{graph}.{name} cosine {m['cosine']:.6f} < {limits['cosine']}")
            elif limits["rel"] is not None and not m["rel"] <= limits["rel"]:
                failures.append(f"{graph}.{name} relative error {m['rel']:.2e} > {limits['rel']}")
    return failures


def _end_to_end_failures(end_to_end: dict, limits: dict) -> list[str]:
    failures = []
    if not end_to_end["kl_mean"] <= limits["kl_mean"]:
        failures.append(f"mean KL {end_to_end['kl_mean']:.2e} > {limits['kl_mean']}")
    if end_to_end["top1_decided"] and not end_to_end["top1_agreement"] >= limits["top1"]:
        failures.append(f"top-1 agreement {end_to_end['top1_agreement']:.3f} < {limits['top1']}")
    if not end_to_end["greedy_match"] >= limits["greedy"] and not end_to_end["diverged_at_near_tie"]:
        failures.append(f"greedy match {end_to_end['greedy_match']:.3f} < {limits['greedy']}")
    return failures


def precision_class(manifest: dict) -> str:
    """The gates an artifact is held to: its least precise graph's (an fp32-weight graph that
    computes in fp16 counts as fp16)."""
    classes = {"int8-dynamic": "int8", "w8a8": "int8"}
    half = set(fp16_graphs(manifest))
    return max((classes.get(g["precision"], "fp16" if name in half and g["precision"] == "fp32" else g["precision"])
                for name, g in manifest["graphs"].items()), key=ORDER.index)


def decoders_to_check(pipe) -> list[tuple[str, str, str]]:
    """(graph, prompt path, provider) of every decoder to check: on the CPU, all the artifact has
    (and decoder_ort with the INT8 prompt graph); on a GPU, the provider's own, the portable one,
    decoder_cuda on CUDA, and the CPU graphs on the CPU where the artifact runs there too."""
    m, provider = pipe.artifact.manifest, pipe.provider
    out = [(pipe.decoder_graph, "decoder", provider)]
    for name in ("decoder", ORT_DECODER, CUDA_DECODER):
        if name not in m["graphs"] or name == pipe.decoder_graph or pipe.artifact.unsupported(name):
            continue  # a graph this onnxruntime cannot run (the Pipeline says so when it loads) is not checked here
        if provider == "cpu" or name == "decoder" or (name == CUDA_DECODER and provider == "cuda"):
            out.append((name, "decoder", provider))
        elif name == ORT_DECODER and "cpu" in m.get("backends", []):
            out.append((name, "decoder", "cpu"))
    if m.get("prefill", {}).get("cpu") == PREFILL_DECODER and (ORT_DECODER, "decoder", "cpu") in out:
        out.append((PREFILL_DECODER, "int8", "cpu"))
    return out


def check_pipeline(pipe, rec: Recording, decoders: list[tuple[str, str, str]] | None = None,
                   itself: bool = False) -> dict:
    """Run `pipe`'s artifact on its provider against the recording: per graph, per decoder
    (default: decoders_to_check), end to end; the report verify prints and gates. itself: only
    `pipe` as it is loaded (its decoder and prompt path), with no second copy of a decoder."""
    from moss_edge.runtime.pipeline import ParityWarning, Pipeline

    art_audio = pipe._encode_waveforms(rec.waveforms)
    ref_audio = rec.features
    embeds, deepstack = run_typed(pipe.adapter, {"audio_tokens": ref_audio.tokens, "taps": ref_audio.taps})
    graphs = {
        "encoder": {"audio_tokens": compare(art_audio.tokens, ref_audio.tokens), "taps": compare(art_audio.taps, ref_audio.taps)},
        "adapter": {"audio_embeds": compare(embeds, ref_audio.embeds), "deepstack_embeds": compare(deepstack, ref_audio.deepstack)},
    }
    per_decoder, hosts = {}, {pipe.provider: pipe}
    if itself:
        graphs[pipe.decoder_graph] = {"prefill_logits": compare(pipe.prefill(rec.prompt_ids, ref_audio), rec.prefill_logits)}
        per_decoder[pipe.decoder_graph] = decode_steps(pipe, rec, art_audio)
    for name, path, provider in [] if itself else decoders or decoders_to_check(pipe):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ParityWarning)
            if provider not in hosts:
                hosts[provider] = Pipeline(pipe.artifact, provider, with_decoder=False)
            # one decoder's weights in memory at a time (at 4B each holds ~2 GB)
            runner = hosts[provider].using_decoder(ORT_DECODER if name == PREFILL_DECODER else name, path)
        graphs[name] = {"prefill_logits": compare(runner.prefill(rec.prompt_ids, ref_audio), rec.prefill_logits)}
        per_decoder[name] = decode_steps(runner, rec, art_audio)
        del runner
    main = next(iter(per_decoder))
    precision = precision_class(pipe.artifact.manifest)
    limits = THRESHOLDS[precision]
    per_step, end_to_end = per_decoder[main]
    failures = gate(graphs, end_to_end, limits)
    for name, (_, figures) in per_decoder.items():
        if name != main:
            failures += [f"{name}: {f}" for f in gate({}, figures, limits)]
    cosines = [m["cosine"] for o in graphs.values() for m in o.values()]
    summary = {"passed": not failures, "precision": precision, "steps": rec.steps,
               "decoder": main, "provider": pipe.provider,
               "worst_cosine": float("nan") if any(np.isnan(cosines)) else min(cosines),
               "prefill_logits_rel": graphs[main]["prefill_logits"]["rel"],
               "kl_mean": end_to_end["kl_mean"], "top1_agreement": end_to_end["top1_agreement"],
               "top1_decided": end_to_end["top1_decided"],
               "greedy_match": end_to_end["greedy_match"], "failures": failures}
    return {"artifact": str(pipe.artifact.root), "audio": rec.audio, "prompt_tokens": len(rec.prompt_ids),
            "graphs": graphs, "steps": per_step, "end_to_end": end_to_end,
            "end_to_end_by_decoder": {name: figures for name, (_, figures) in per_decoder.items()},
            "thresholds": limits, "summary": summary}


def check_recorded(artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None) -> dict:
    """The artifact on `provider` against the answers it carries: verify without PyTorch."""
    from moss_edge.runtime.pipeline import ParityWarning, Pipeline

    with warnings.catch_warnings():  # checking again an artifact that failed: the report says so itself
        warnings.simplefilter("ignore", ParityWarning)
        pipe = Pipeline.load(artifact_dir, provider, threads, unfinished_ok=True, with_decoder=False)
    rec = recorded(pipe.artifact)
    report = check_pipeline(pipe, rec)
    entry = pipe.artifact.manifest["reference"]
    report["reference"] = (f"recorded answers of the fp32 PyTorch model ({entry['file']}, checkpoint sha256 "
                           f"{rec.source_sha256[:16]}...)")
    return report


def top1_text(agreement: float | None, decided: int, steps: int) -> str:
    if agreement is None:
        return f"n/a (all {steps} steps were near-ties)"
    return f"{agreement:.3f} ({decided} of {steps} steps decided)"


def report_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Parity report: {report['artifact']}", "",
             f"**{'PASSED' if s['passed'] else 'FAILED'}** at {s['precision']} thresholds "
             f"({report['prompt_tokens']} prompt tokens, {s['steps']} steps, audio: {', '.join(Path(a).name for a in report['audio'])})",
             "", f"Reference: {report.get('reference', 'fp32 PyTorch')}.", "",
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

