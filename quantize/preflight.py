"""What an export straight to a recipe will need, estimated from the config before any work:
a run that cannot fit in memory or on disk says so at the start, not with an out-of-memory
kill or a full disk an hour in."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_edge.export.checkpoint import reference_bytes
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


def estimate(cfg, recipe: Recipe) -> Estimate:
    model = meta_model(cfg)
    artifact = sum(graph_bytes(model, recipe).values())
    largest = 4 * max(p.numel() for p in model.parameters())
    reference = reference_bytes(cfg, piecewise=True)
    # a weight being quantized takes about three times its fp32 size; the parity check one
    # decoder session, the encoder's and adapter's, and the reference's largest piece
    memory = reference + max(3 * largest, 2 * artifact)
    return Estimate(artifact, memory)


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
