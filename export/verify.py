"""Parity of an artifact with the PyTorch reference: the reference's answers are recorded
(runtime/parity.py's Recording, kept in the artifact by export and quantize) and the artifact is
held to them by the same code that checks it on a device without PyTorch."""

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from moss_edge import bundled_audio
from moss_edge.export.checkpoint import checkpoint_hash, load_model, reference_bytes, reference_whole
from moss_edge.export.config import load_config
from moss_edge.export.model import MossAudio
from moss_edge.export.reference import ReferencePipeline
from moss_edge.quantize.half_emulation import cpu_view
from moss_edge.runtime.artifact import Artifact, fp16_graphs
from moss_edge.runtime.audio import load_audio
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import PREFILL_DECODER
from moss_edge.runtime.parity import RECORDING, Recording, check_pipeline
from moss_edge.runtime.pipeline import ParityWarning, Pipeline
from moss_edge.runtime.prompt import TextTokenizer, prompt_ids
from moss_edge.runtime.session import available_memory


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
    if reference_whole(cfg, on_disk, available):
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
        self._recording: Recording | None = None  # the reference's answers, made once

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

    def recording(self, artifact_dir: str | Path) -> Recording:
        """The reference's answers on this verifier's clips, for the artifact's token ids and
        tokenizer: made by the PyTorch model once, then reused (keep-until-pass rounds)."""
        self.check(artifact_dir)
        if self._recording is None:
            self._recording = record(self._model, artifact_dir, self.audio, steps=self.steps)
        return self._recording

    def __call__(self, artifact_dir: str | Path) -> dict:
        recording = self.recording(artifact_dir)
        return verify_artifact(artifact_dir, self._model, provider=self.provider, evaluate=self.evaluate,
                               recording=recording)


def record(reference: MossAudio, artifact_dir: str | Path, audio: list[str] | None = None,
           prompt: str | list[int] | None = None, steps: int = 16) -> Recording:
    """What the fp32 PyTorch model answers on the clips (default: the bundled held-out clip),
    with the artifact's token ids and tokenizer: encoder and adapter outputs, the prompt's
    logits, and `steps` greedy steps with their logits."""
    artifact = Artifact.load(artifact_dir, check_hashes=False, unfinished_ok=True)
    tokenizer = TextTokenizer.from_dir(artifact.root) if artifact.tokenizer_files else None
    ids = artifact.token_ids  # the ids the artifact was exported with
    ref = ReferencePipeline(reference, ids)
    audio = audio or [bundled_audio()]
    waveforms = [load_audio(a) for a in audio]
    if prompt is None:
        prompt = "Describe the audio." if tokenizer else [ids.audio_start, ids.audio_end] * len(audio)
    features = ref.encode(waveforms)
    prompt = prompt_ids(prompt, features.clip_tokens, tokenizer, ids, artifact.dims.vocab_size)
    logits = ref.prefill(prompt, features)
    tokens, all_logits = [], [logits]
    for i in range(steps):
        tokens.append(int(logits.argmax()))
        if i + 1 < steps:
            all_logits.append(logits := ref.step(tokens[-1]))
    return Recording.from_logits(artifact.manifest["source"]["sha256"], [Path(a).name for a in audio], waveforms,
                                 prompt, features, all_logits, tokens)


def verify_artifact(artifact_dir: str | Path, reference: MossAudio | str | Path, audio: list[str] | None = None,
                    prompt: str | list[int] | None = None, steps: int = 16, provider: str = "cpu",
                    evaluate: Callable[[Pipeline, MossAudio], dict | None] | None = None,
                    recording: Recording | None = None) -> dict:
    """Compare an artifact with the fp32 PyTorch model; returns the report (see
    runtime/parity.py). recording: the model's answers when already made (else made here).
    evaluate(pipe, reference) may add a task report (reported, not gated), e.g. the sound-event
    model's accuracy (`moss_edge.sound_events.evaluate.task_report`)."""
    if not isinstance(reference, MossAudio):
        check_reference(artifact_dir, reference)
        reference = reference_model(reference, artifact_dir)
    recording = recording or record(reference, artifact_dir, audio, prompt, steps)
    with emulated_on_cpu(artifact_dir, provider) as path:
        with warnings.catch_warnings():  # checking again an artifact that failed: the report says so itself
            warnings.simplefilter("ignore", ParityWarning)
            # export/quantize verify before finishing; the decoders are loaded one at a time
            pipe = Pipeline.load(path, provider, unfinished_ok=True, with_decoder=False)
        report = check_pipeline(pipe, recording)
        report["artifact"] = str(artifact_dir)  # not the emulated view's folder
        report["reference"] = "fp32 PyTorch, " + ("one piece at a time from the shards" if getattr(reference, "piecewise", False)
                                                  else "whole model in memory")
        mark_emulated(report, pipe.artifact.manifest, provider)
        if evaluate:
            add_task(report, pipe, reference, evaluate)
    return report


def emulated_on_cpu(artifact_dir: str | Path, provider: str):
    """The artifact as the CPU provider can run it: fp16 graphs, which it has no kernels for, as
    their fp32 twins with every value rounded to fp16 where it is made (quantize/half_emulation.py)."""
    return cpu_view(Path(artifact_dir)) if provider == "cpu" else nullcontext(Path(artifact_dir))


def mark_emulated(report: dict, manifest: dict, provider: str) -> None:
    emulated = fp16_graphs(manifest)
    if provider == "cpu" and emulated:
        report["emulated"] = {"graphs": emulated, "how": "fp16 graphs run on fp32 kernels, each fp16 value "
                              "rounded to fp16 where it is made (no fp16 kernels on this provider)"}


def add_task(report: dict, pipe: Pipeline, reference: MossAudio, evaluate) -> None:
    """The task report (reported, not gated: on a few hundred examples a point or two is sampling
    noise), for each prompt path when the artifact has the INT8 prompt graph."""
    task = evaluate(pipe.using_decoder(pipe.decoder_graph, pipe.prefill_path), reference)
    if not task:
        return
    report["task"] = task
    if PREFILL_DECODER in report["graphs"]:  # the other prompt path too: which one runs depends on the CPU
        other = "decoder" if pipe.prefill_path == "int8" else "int8"
        task["artifact_by_prefill"] = {pipe.prefill_path: task["artifact"],
                                       other: evaluate(pipe.using_decoder(pipe.decoder_graph, other), reference)["artifact"]}
    report["summary"].update(task_exact_match=task["artifact"]["exact_match"],
                             task_reference_exact_match=task["reference"]["exact_match"],
                             event_list_exact_match=task["artifact"]["event_list_exact_match"])


def keep_recording(folder: Path, recording: Recording, manifest: dict) -> None:
    """Store the reference's answers in the artifact being written (runtime/parity.py checks
    against them on a device) and name them in its manifest."""
    path = folder / RECORDING
    recording.save(path)
    manifest["reference"] = recording.manifest_entry(path)
