"""Quantization recipes: what each graph becomes. Named presets or a JSON file."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moss_edge.runtime.graphs import GRAPHS
from moss_edge.runtime.errors import MossEdgeError

PRECISIONS = ("fp32", "int8", "int8-dynamic", "int4", "w8a8")
METHODS = ("rtn", "clip", "awq")
TABLE_PRECISIONS = ("fp32", "int8", "int4")
EMBEDDING_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class GraphRecipe:
    precision: str = "fp32"
    method: str = "rtn"  # weight-only int8/int4: rtn, clip (activation-weighted) or awq
    block: int = 128  # input rows per scale (TensorRT takes 64 or 128 for INT4)
    lm_head: str = "int8"  # decoder only
    embedding: str = "int8"  # decoder only
    dtype: str = "fp32"  # activations: fp32 (ONNX Runtime CPU) or fp16 (GPUs: TensorRT, ONNX Runtime CUDA; quantize/half.py)
    # decoder only: fp16 keeps the portable decoder's cache in fp16 (halves it on a GPU); int8 keeps
    # the CPU decoders' cache (decoder_ort, decoder_prefill) in int8 with calibrated scales
    # (quantize/kv_cache.py), the portable decoder's in fp32
    kv_cache: str = "fp32"
    prefill: str = "none"  # decoder only: "int8" adds the prompt graph on the CPU's integer GEMM (quantize/prefill.py)
    keep: list[str] = field(default_factory=list)  # weight-name fragments kept in fp32
    activations: str = "percentile"  # w8a8 activation ranges: percentile (99.99th) or minmax

    def check(self, graph: str) -> None:
        if not isinstance(self.keep, list) or not all(isinstance(k, str) and k for k in self.keep):
            raise MossEdgeError(f"{graph}: keep must be a list of weight-name fragments, e.g. [\"layers.0.\"]; "
                                f"got {self.keep!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int):
            raise MossEdgeError(f"{graph}: block must be a number (16, 32, 64, 128 or 256), got {self.block!r}")
        if self.precision not in PRECISIONS:
            raise MossEdgeError(f"{graph}: precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.method not in METHODS:
            raise MossEdgeError(f"{graph}: method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.block not in (16, 32, 64, 128, 256):
            raise MossEdgeError(f"{graph}: block {self.block} must be a power of two from 16 to 256")
        if self.lm_head not in TABLE_PRECISIONS:
            raise MossEdgeError(f"{graph}: lm_head {self.lm_head!r} is not one of {', '.join(TABLE_PRECISIONS)}")
        # rows are gathered before dequantizing (int4 Gather is not portable); TensorRT gathers no
        # INT8 table at all, and takes fp16
        if self.embedding not in EMBEDDING_PRECISIONS:
            raise MossEdgeError(f"{graph}: embedding {self.embedding!r} must be one of {', '.join(EMBEDDING_PRECISIONS)}")
        if self.dtype not in ("fp32", "fp16"):
            raise MossEdgeError(f"{graph}: dtype {self.dtype!r} must be fp32 (CPU) or fp16 (GPU)")
        if self.dtype == "fp16" and self.precision == "int8-dynamic":
            raise MossEdgeError(f"{graph}: dynamic INT8 is a CPU format and computes in fp32; use int4, int8 or w8a8 "
                                "with dtype fp16")
        if self.dtype == "fp16" and graph == "decoder" and (self.kv_cache != "fp16" or self.embedding == "fp32"
                                                            or self.prefill != "none"):
            raise MossEdgeError("decoder: an fp16 decoder keeps its KV cache in fp16 (kv_cache fp16), its table in "
                                "fp16 or int8 (not fp32), and has no CPU prompt graph (prefill none)")
        if self.kv_cache not in ("fp32", "fp16", "int8"):
            raise MossEdgeError(f"{graph}: kv_cache {self.kv_cache!r} must be fp32, fp16 or int8")
        if self.kv_cache != "fp32" and graph != "decoder":
            raise MossEdgeError(f"{graph}: kv_cache is a decoder setting")
        if self.kv_cache == "int8" and self.precision == "int8-dynamic":  # (an fp16 decoder is refused above)
            raise MossEdgeError(f"{graph}: kv_cache int8 is the cache of the CPU decoder built from ONNX Runtime's "
                                "GroupQueryAttention, which a weight-only decoder has (fp32, int8 or int4)")
        if self.prefill not in ("none", "int8"):
            raise MossEdgeError(f"{graph}: prefill {self.prefill!r} must be none or int8")
        if self.prefill != "none" and (graph != "decoder" or self.precision not in ("int4", "int8")):
            raise MossEdgeError(f"{graph}: prefill int8 is a setting of an int4 or int8 decoder")
        if self.activations not in ("percentile", "minmax"):
            raise MossEdgeError(f"{graph}: activations {self.activations!r} must be percentile or minmax")
        if self.precision == "w8a8" and graph == "decoder":
            raise MossEdgeError("decoder: w8a8 is for the encoder and adapter; the decoder takes int8 or int4 weights")
        if self.method != "rtn" and graph != "decoder":
            raise MossEdgeError(f"{graph}: data-aware methods are for the decoder; use rtn")


@dataclass
class Recipe:
    name: str
    graphs: dict[str, GraphRecipe]
    calibration_samples: int = 12

    def to_dict(self) -> dict:
        return {"name": self.name, "calibration_samples": self.calibration_samples,
                **{g: asdict(r) for g, r in self.graphs.items()}}

    @property
    def needs_calibration(self) -> bool:
        return any((g.method != "rtn" and g.precision in ("int4", "int8")) or g.precision == "w8a8"
                   or g.kv_cache == "int8" for g in self.graphs.values())


def _preset(name: str, encoder: str, adapter: str, decoder: GraphRecipe) -> Recipe:
    return Recipe(name, {"encoder": GraphRecipe(encoder), "adapter": GraphRecipe(adapter), "decoder": decoder})


PRESETS = {
    # ORT CPU: dynamic INT8 encoder/adapter, INT8 weight-only decoder
    "int8": lambda: _preset("int8", "int8-dynamic", "int8-dynamic", GraphRecipe("int8", block=128)),
    # ORT CPU: INT4 decoder (round to nearest), tables INT8. The adapter is dynamic INT8 too: at
    # 4B widths 0.19 s instead of 0.64 s for 30 s of audio, and the packaged model's held-out
    # answers are the same as with the fp32 adapter (docs/quantization.md, the int8 row). Prompts run on INT8
    # copies of the layer weights (the CPU's integer GEMM; docs/quantization.md, "Prompts on the integer GEMM").
    "int4": lambda: _preset("int4", "int8-dynamic", "int8-dynamic", GraphRecipe("int4", block=128, prefill="int8")),
    # the same with activation-aware scaling and clipping from the calibration set
    "int4-awq": lambda: _preset("int4-awq", "int8-dynamic", "int8-dynamic",
                                GraphRecipe("int4", method="awq", block=128, prefill="int8")),
    # long recordings: int4 with the CPU decoders' KV cache in int8 (quantize/kv_cache.py). At
    # 10 min of audio it decodes 1.75x faster and peaks 1.9 GiB lower than int4; at 30 s it decodes
    # slower, and it needs onnxruntime 1.27 (docs/performance.md, "Long recordings")
    "int4-long": lambda: _preset("int4-long", "int8-dynamic", "int8-dynamic",
                                 GraphRecipe("int4", block=128, prefill="int8", kv_cache="int8")),
    # Jetson / TensorRT and ONNX Runtime CUDA, in the form NVIDIA's toolchains take: fp16
    # activations, every weight INT4 weight-only blocked by 128 with fp16 scales (TensorRT 10
    # quantizes INT8 only with its activations), the embedding table and KV cache fp16
    # (TensorRT gathers no quantized table); docs/jetson.md, "GPU graphs"
    "int4-trt": lambda: _gpu_preset("int4-trt", "int4"),
    # TensorRT INT8 tensor cores: encoder and adapter with calibrated INT8 activations (static QDQ)
    "w8a8": lambda: _gpu_preset("w8a8", "w8a8"),
}


def _gpu_preset(name: str, audio_precision: str) -> Recipe:
    return Recipe(name, {g: GraphRecipe(audio_precision, dtype="fp16") for g in ("encoder", "adapter")}
                  | {"decoder": GraphRecipe("int4", method="awq", block=128, lm_head="int4", embedding="fp16",
                                            kv_cache="fp16", dtype="fp16")})


def load_recipe(spec: str) -> Recipe:
    """A preset name, or a JSON file {"name": ..., "encoder": {...}, "adapter": {...}, "decoder": {...}}
    (graphs left out stay fp32)."""
    if spec in PRESETS:
        recipe = PRESETS[spec]()
    else:
        path = Path(spec)
        if not path.is_file():
            raise MossEdgeError(f"recipe {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MossEdgeError(f"recipe file {path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise MossEdgeError(f"recipe {path} must be a JSON object {{\"decoder\": {{...}}, ...}}, not a "
                                f"{type(raw).__name__}")
        unknown = set(raw) - set(GRAPHS) - {"name", "calibration_samples"}
        if unknown:
            raise MossEdgeError(f"recipe {path} names graph(s) {', '.join(sorted(unknown))} that do not exist; "
                                f"the graphs are {', '.join(GRAPHS)}")
        graphs = {}
        for g in GRAPHS:
            spec = raw.get(g, {})
            if not isinstance(spec, dict):
                raise MossEdgeError(f"recipe {path}, {g}: must be an object such as {{\"precision\": \"int4\"}}, "
                                    f"not {spec!r}")
            unknown = set(spec) - set(GraphRecipe.__dataclass_fields__)
            if unknown:
                raise MossEdgeError(f"recipe {path}, {g}: unknown key(s) {', '.join(sorted(unknown))}; a graph takes "
                                    f"{', '.join(GraphRecipe.__dataclass_fields__)}")
            if spec.get("dtype") == "fp16" and g == "decoder":
                spec = {"kv_cache": "fp16", **spec}  # an fp16 decoder's cache is fp16 unless the file says otherwise
            graphs[g] = GraphRecipe(**spec)
        samples = raw.get("calibration_samples", 12)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise MossEdgeError(f"recipe {path}: calibration_samples must be a whole number >= 1, got {samples!r}")
        recipe = Recipe(str(raw.get("name", path.stem)), graphs, samples)
    for graph, r in recipe.graphs.items():
        r.check(graph)
    return recipe
