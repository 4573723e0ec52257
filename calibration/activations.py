"""Activation statistics of the fp32 graphs on a calibration set, streamed and cached on disk.

For every MatMul whose weight will be quantized, per input channel: E[x^2] and E[|x|] over
the prompt tokens of each sample's prefill (audio embeddings, DeepStack and text included).
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from moss_edge import __version__
from moss_edge.calibration.dataset import CalibrationSample
from moss_edge.runtime.pipeline import Pipeline
from moss_edge.runtime.generation import place_audio
from moss_edge.runtime.prompt import TextTokenizer, TokenIds, chat_prompt_ids, expand_audio_spans
from moss_edge.runtime.graphs import decoder_feeds, empty_cache
from moss_edge.runtime.session import PROVIDERS, available_cores


def progress(items: list, label: str):
    """A plain progress line on stderr (no dependency), for long calibration runs."""
    import sys

    for i, item in enumerate(items, 1):
        print(f"\r{label}: {i}/{len(items)}", end="" if i < len(items) else "\n", file=sys.stderr, flush=True)
        yield item


def cache_key(artifact: Path, weights: list[str], samples: list[CalibrationSample]) -> str:
    manifest = json.loads((artifact / "manifest.json").read_text())
    key = {"decoder": manifest["graphs"]["decoder"]["files"], "weights": sorted(weights),
           "samples": [vars(s) for s in samples], "version": __version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def matmul_inputs(decoder: onnx.ModelProto, weights: Iterable[str]) -> list[str]:
    wanted = set(weights)
    names = []
    for node in decoder.graph.node:
        if node.op_type == "MatMul" and node.input[1] in wanted and node.input[0] not in names:
            names.append(node.input[0])
    return names


def tap_session(artifact: Path, graph: onnx.ModelProto, weights: Iterable[str]) -> tuple[list[str], ort.InferenceSession]:
    """A session of one of the artifact's fp32 graphs (parsed without its weights) that also
    returns the inputs of the MatMuls of `weights`; its external data read from the artifact's folder."""
    model = onnx.ModelProto.FromString(graph.SerializeToString())
    names = matmul_inputs(model, weights)
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(artifact))
    opts.intra_op_num_threads = available_cores()
    opts.log_severity_level = 3
    return names, ort.InferenceSession(model.SerializeToString(), opts, providers=PROVIDERS["cpu"])


def activation_ranges(artifact: Path, model: onnx.ModelProto, graph: str, weights: list[str], samples: list[CalibrationSample],
                      method: str = "percentile") -> dict[str, float]:
    """Per MatMul input of the encoder or adapter: the largest |x| ("minmax") or the largest
    per-sample 99.99th percentile of |x| ("percentile", robust to rare spikes)."""
    from moss_edge.runtime.audio import chunk_mels, log_mel

    pipe = Pipeline.load(artifact, check_hashes=False, with_decoder=False)
    names, session = tap_session(artifact, model, weights)
    ranges: dict[str, float] = {}
    for sample in progress(samples, f"calibrating {graph}"):
        wave = sample.waveform()
        if graph == "encoder":
            batch = chunk_mels([log_mel(wave)], pipe.dims.chunk_frames)
            feeds = {"mel": batch.mel, "frames": batch.frames}
        else:
            features = pipe.encode([wave])
            feeds = {"audio_tokens": features.tokens, "taps": features.taps}
        for name, x in zip(names, session.run(names, feeds)):
            x = np.abs(x)
            value = float(x.max() if method == "minmax" else np.percentile(x, 99.99))
            ranges[name] = max(ranges.get(name, 0.0), value)
    return ranges


def decoder_input_stats(artifact: Path, decoder: onnx.ModelProto, weights: list[str], samples: list[CalibrationSample],
                        cache_dir: Path | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{matmul input name: {"sq": E[x^2], "abs": E[|x|]}} from the artifact's fp32 decoder."""
    cache = cache_dir / f"decoder-stats-{cache_key(artifact, weights, samples)}.npz" if cache_dir else None
    if cache and cache.is_file():
        return _unpack(np.load(cache))
    pipe = Pipeline.load(artifact, check_hashes=False, with_decoder=False)
    names, session = tap_session(artifact, decoder, weights)
    sums = {n: [0.0, 0.0] for n in names}
    count = 0
    for sample in progress(samples, "calibrating decoder"):
        features = pipe.encode([sample.waveform()])
        prompt = sample.prompt if pipe.tokenizer else [pipe.ids.audio_start, pipe.ids.audio_end]
        ids = pipe.prompt_ids(prompt, features.clip_tokens)
        feeds = decoder_feeds(pipe.dims, np.array([ids], np.int64), 0, place_audio(ids, pipe.ids.audio_token, features.embeds)[None],
                              place_audio(ids, pipe.ids.audio_token, features.deepstack)[:, None],
                              [empty_cache(pipe.dims)] * (2 * pipe.dims.num_hidden_layers))
        outputs = session.run(names, feeds)
        for name, x in zip(names, outputs):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[name][0] = sums[name][0] + (x**2).sum(axis=0)
            sums[name][1] = sums[name][1] + np.abs(x).sum(axis=0)
        count += len(ids)
    stats = {n: {"sq": (s[0] / count).astype(np.float32), "abs": (s[1] / count).astype(np.float32)} for n, s in sums.items()}
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"{i}.sq": v["sq"] for i, v in enumerate(stats.values())},
                 **{f"{i}.abs": v["abs"] for i, v in enumerate(stats.values())}, names=np.array(list(stats)))
        tmp.rename(cache)
    return stats


def _unpack(data) -> dict[str, dict[str, np.ndarray]]:
    return {str(n): {"sq": data[f"{i}.sq"], "abs": data[f"{i}.abs"]} for i, n in enumerate(data["names"])}


def reference_input_stats(checkpoint: Path, ids: TokenIds, weights: list[str], decoder: onnx.ModelProto,
                          samples: list[CalibrationSample], model=None) -> dict[str, dict[str, np.ndarray]]:
    """The same statistics as decoder_input_stats, from the fp32 PyTorch model (by default run
    one layer at a time from the checkpoint's shards; or `model`, e.g. the verifier's): for an
    export straight to a recipe, where no fp32 graph exists, at any model size."""
    import torch

    from moss_edge.export.checkpoint import load_model
    from moss_edge.export.reference import ReferencePipeline

    model = model if model is not None else load_model(checkpoint, torch.float32, piecewise=True)
    wanted, hooks = set(weights), []
    sums: dict[str, list] = {}

    def accumulate(weight: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            entry = sums.setdefault(weight, [0.0, 0.0])
            entry[0] = entry[0] + (x**2).sum(0).numpy()
            entry[1] = entry[1] + x.abs().sum(0).numpy()
        return hook

    for name, module in model.language_model.named_modules():
        if f"model.language_model.{name}.weight_t" in wanted:  # the exported MatMul weight's name
            hooks.append(module.register_forward_pre_hook(accumulate(f"model.language_model.{name}.weight_t")))
    ref = ReferencePipeline(model, ids)
    tokenizer = TextTokenizer.from_dir(checkpoint) if (checkpoint / "tokenizer.json").is_file() else None
    count = 0
    try:
        for sample in progress(samples, "calibrating decoder (PyTorch reference)"):
            features = ref.encode([sample.waveform()])
            prompt = (chat_prompt_ids(tokenizer, sample.prompt, features.clip_tokens, ids) if tokenizer else
                      expand_audio_spans([ids.audio_start, ids.audio_end], features.clip_tokens, ids))
            ref.prefill(prompt, features)
            count += len(prompt)
    finally:
        for hook in hooks:
            hook.remove()
    by_weight = {w: {"sq": (s[0] / count).astype(np.float32), "abs": (s[1] / count).astype(np.float32)} for w, s in sums.items()}
    # keyed like decoder_input_stats: by the MatMul's input (q, k and v share theirs)
    return {node.input[0]: by_weight[node.input[1]] for node in decoder.graph.node
            if node.op_type == "MatMul" and node.input[1] in by_weight}
