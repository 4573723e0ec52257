"""Quantize an fp32 artifact into a new artifact, graph by graph, following a recipe."""

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from moss_edge.calibration.activations import decoder_input_stats
from moss_edge.calibration.dataset import build_samples, find_audio
from moss_edge.quantize.kernels import cpu_kernels
from moss_edge.quantize.graph import WeightRule, quantize_weights
from moss_edge.quantize.recipe import GraphRecipe, Recipe
from moss_edge.runtime.artifact import Artifact, graph_entry, write_artifact
from moss_edge.runtime.errors import MossEdgeError


def weight_plan(graph_path: Path, recipe: GraphRecipe) -> dict[str, WeightRule]:
    """Every 2-D weight of a MatMul (and the embedding table of a Gather) with its rule."""
    model = onnx.load(str(graph_path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    bits = {"int4": 4, "int8": 8}
    plan = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(dims.get(node.input[1], [])) == 2:
            name, rows = node.input[1], dims[node.input[1]][0]
            precision = recipe.lm_head if "lm_head" in name else recipe.precision
        elif node.op_type == "Gather" and len(dims.get(node.input[0], [])) == 2:
            name, rows = node.input[0], dims[node.input[0]][1]
            precision = recipe.embedding
        else:
            continue
        if precision == "fp32" or any(k in name for k in recipe.keep) or rows % recipe.block:
            continue
        plan[name] = WeightRule(bits[precision], recipe.block, recipe.method)
    return plan


def _int8_dynamic(src: Path, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its "run pre-processing" advice is for CNNs

    big = sum(f.stat().st_size for f in src.parent.glob(f"{src.name}*")) > 1 << 30
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     use_external_data_format=big, extra_options={"MatMulConstBOnly": True})


def quantize_artifact(src_dir: str | Path, out_dir: str | Path, recipe: Recipe, calibration: str | None = None,
                      cache_dir: Path | None = None, verify: Callable[[Path], dict] | None = None,
                      log=print) -> Path:
    """fp32 artifact -> quantized artifact; `verify(tmp_dir)` returns a parity report that is
    written into the artifact before it is moved into place."""
    src = Artifact.load(src_dir)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    not_fp32 = [g for g, e in src.manifest["graphs"].items() if e["precision"] != "fp32"]
    if not_fp32:
        raise MossEdgeError(f"{src.root} is already quantized ({', '.join(not_fp32)}); quantize the fp32 export")
    stats = None
    if recipe.needs_calibration:
        samples = build_samples(find_audio(calibration), count=recipe.calibration_samples)
        log(f"calibration: {len(samples)} samples from {len({s.path for s in samples})} file(s)")
        plan = weight_plan(src.graph_path("decoder"), recipe.graphs["decoder"])
        stats = decoder_input_stats(src.root, list(plan), samples, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = json.loads(json.dumps(src.manifest))
        layers = {}
        for name, graph in recipe.graphs.items():
            source = src.graph_path(name)
            target = tmp / f"{name}.onnx"
            log(f"{name}: {graph.precision}" + (f" ({graph.method}, block {graph.block})" if graph.precision in ("int4", "int8") else ""))
            if graph.precision == "fp32":
                for f in src.manifest["graphs"][name]["files"]:
                    shutil.copy(src.root / f, tmp / f)
            elif graph.precision == "int8-dynamic":
                _int8_dynamic(source, target)
            else:
                plan = weight_plan(source, graph)
                layers[name] = quantize_weights(source, target, plan, stats if name == "decoder" else None)
            manifest["graphs"][name] = graph_entry(tmp, name, graph.precision)
        for f in src.manifest.get("tokenizer_files", []):
            shutil.copy(src.root / f, tmp / f)
        manifest["backends"] = recipe.backends
        kernels = {g: cpu_kernels(tmp / f"{g}.onnx") for g, r in recipe.graphs.items() if r.precision != "fp32"}
        manifest["quantization"] = {"recipe": recipe.to_dict(), "from": str(src.root.resolve()), "weights": layers,
                                    "ort_cpu_kernels": kernels,
                                    "weight_bytes": {g: weight_bytes(tmp / f"{g}.onnx") for g in layers}}
        unfused = {g: k["dequantized_weights"] for g, k in kernels.items() if k["dequantized_weights"]}
        if unfused:
            log(f"warning: ONNX Runtime CPU left DequantizeLinear unfused in {unfused}: those weights run dequantized")
        manifest.pop("parity_report", None)
        manifest.pop("parity", None)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if verify is not None:
            report = verify(tmp)
            manifest["parity"] = report["summary"]
            (tmp / "parity.json").write_text(json.dumps(report, indent=2))
            manifest["parity_report"] = "parity.json"
        return write_artifact(tmp, out, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weight_bytes(graph_path: Path) -> dict:
    """Bytes of the quantized weights (data + scales) and of the same weights in fp16."""
    model = onnx.load(str(graph_path), load_external_data=False)
    sizes = {TensorProto.INT4: 0.5, TensorProto.INT8: 1, TensorProto.FLOAT: 4}
    quantized = fp16 = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        if init.name.endswith(("_q4", "_q8")):
            quantized += count * sizes[init.data_type]
            fp16 += 2 * count
        elif init.name.endswith("_scale"):
            quantized += count * 4
    return {"quantized_bytes": int(quantized), "fp16_bytes": int(fp16),
            "ratio_to_fp16": quantized / fp16 if fp16 else None}
