"""What an export straight to a recipe will need, estimated from the config before any work:
a run that cannot fit in memory or on disk says so at the start, not with an out-of-memory
kill or a full disk an hour in."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_edge.export.checkpoint import reference_bytes, reference_whole
from moss_edge.export.model import MossAudio
from moss_edge.quantize.recipe import GraphRecipe, Recipe
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import PREFILL_DECODER
from moss_edge.runtime.session import available_memory

BYTES_PER_PARAMETER = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int8-dynamic": 1.0, "w8a8": 1.0, "int4": 0.5}


@dataclass
class Estimate:
    artifact_bytes: int  # the quantized artifact on disk (nothing else is written)
    memory_bytes: int  # peak RSS of the export

    def lines(self) -> str:
        return f"estimated: artifact {self.artifact_bytes / 2**30:.1f} GiB, peak memory {self.memory_bytes / 2**30:.1f} GiB"


def _bytes(parameters: int, recipe: GraphRecipe, precision: str | None = None) -> int:
    precision = precision or recipe.precision
    scales = 4 / recipe.block if precision in ("int8", "int4") else 0.0
    return int(parameters * (BYTES_PER_PARAMETER[precision] + scales))


def meta_model(cfg) -> MossAudio:
    """The model's structure and sizes, no memory behind them."""
    with torch.device("meta"):
        return MossAudio(cfg)


def graph_bytes(model: MossAudio, recipe: Recipe) -> dict[str, int]:
    """Each graph's bytes on disk under the recipe, from a (meta) model's parameter counts."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    lm, decoder = model.language_model, recipe.graphs["decoder"]
    sizes = {"encoder": _bytes(count(model.audio_encoder), recipe.graphs["encoder"]),
             "adapter": _bytes(count(model.audio_adapter) + count(model.deepstack_audio_merger_list), recipe.graphs["adapter"]),
             "decoder": _bytes(count(lm.layers), decoder) + _bytes(lm.embed_tokens.weight.numel(), decoder, decoder.embedding)
                        + _bytes(model.lm_head.weight.numel(), decoder, decoder.lm_head)}
    if decoder.prefill == "int8":  # the prompt graph's INT8 copy of the layers
        sizes[PREFILL_DECODER] = _bytes(count(lm.layers), decoder, "int8-dynamic")
    return sizes


# The interpreter with torch, onnx and ONNX Runtime loaded, before any weight
BASE_BYTES = int(1.0 * 2**30)
# ONNX Runtime's sessions hold each graph's weights and the copies it prepacks for its kernels
SESSION_FACTOR = 1.1


def estimate(cfg, recipe: Recipe, available: int | None = None) -> Estimate:
    """The artifact's size, and the peak memory of the whole command (benchmarks/memory_estimate.py
    holds it to measured peaks): the fp32 reference verify loads first (whole or piecewise, as it
    will choose with `available` bytes) and keeps through calibration, quantization and the check,
    plus the larger of quantizing (the largest weight read and held in fp32 with its quantized
    copy) and checking (every graph's session at once; fp16 graphs as their emulated fp32 twins,
    which hold fp16 tables in fp32 and dequantize one weight at a time)."""
    model = meta_model(cfg)
    sizes = graph_bytes(model, recipe)
    artifact = sum(sizes.values())
    available = available_memory() if available is None else available
    reference = reference_bytes(cfg, piecewise=not reference_whole(cfg, artifact, available))
    largest = 4 * max(p.numel() for p in model.parameters())
    quantizing = 2 * largest
    checking = int(SESSION_FACTOR * artifact)
    if any(g.dtype == "fp16" for g in recipe.graphs.values()):
        # the emulated twins: fp16 tables cast up to fp32 once, and one quantized weight at a time
        # dequantized, rounded to fp16 and read back in fp32 (1.5x its fp32 bytes at once)
        decoder = recipe.graphs["decoder"]
        table = model.language_model.embed_tokens.weight.numel() if decoder.dtype == "fp16" and decoder.embedding == "fp16" else 0
        checking += 4 * table + 3 * largest // 2
    return Estimate(artifact, BASE_BYTES + reference + max(quantizing, checking))


def check_fits(cfg, recipe: Recipe, out: Path, log) -> Estimate:
    """Refuse, before any work, an export the disk or memory of this machine cannot hold."""
    e = estimate(cfg, recipe)
    log(e.lines())
    free = shutil.disk_usage(out.parent).free
    if e.artifact_bytes > free:
        raise MossEdgeError(f"{out.parent} has {free / 2**30:.1f} GiB free; this export needs about "
                            f"{e.artifact_bytes / 2**30:.1f} GiB there. Free space or write elsewhere")
    available = available_memory()
    if e.memory_bytes > available:
        raise MossEdgeError(f"this export needs about {e.memory_bytes / 2**30:.1f} GiB of memory and "
                            f"{available / 2**30:.1f} GiB is available; close other programs or use a larger machine")
    return e
