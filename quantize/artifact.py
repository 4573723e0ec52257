"""Quantize an fp32 artifact into a new artifact, graph by graph, following a recipe."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from moss_edge.calibration.activations import activation_ranges, decoder_input_stats
from moss_edge.calibration.dataset import build_samples, find_audio
from moss_edge.export.writer import check_output, graph_entry, staged_dir, write_manifest
from moss_edge.quantize.dynamic_int8 import quantize_dynamic_int8
from moss_edge.quantize.graph import WeightRule, quantize_weights, weight_sensitivity
from moss_edge.quantize.kernels import cpu_kernels
from moss_edge.quantize.plan import higher_precision_weights, weight_plan
from moss_edge.quantize.recipe import Recipe
from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.errors import MossEdgeError


def promote(plan: dict[str, WeightRule], names: list[str]) -> dict[str, WeightRule]:
    """The plan with `names` one step up: INT4 -> INT8, INT8 -> fp32 (dropped from the plan)."""
    out = dict(plan)
    for name in names:
        if out[name].bits == 4:
            out[name] = WeightRule(8, out[name].block, out[name].method)
        else:
            del out[name]
    return out


def quantize_artifact(src_dir: str | Path, out_dir: str | Path, recipe: Recipe, calibration: str | None = None,
                      cache_dir: Path | None = None, verify: Callable[[Path], dict] | None = None,
                      keep_until_pass: bool = False, log=print) -> Path:
    """fp32 artifact -> quantized artifact; `verify(tmp_dir)` returns a parity report that is
    written into the artifact before it is moved into place. With keep_until_pass, the decoder
    weights with the largest measured quantization error are kept one step more precise
    (1, 2, 4, ... of them) until the report passes."""
    src = Artifact.load(src_dir)
    out = Path(out_dir)
    check_output(out)
    not_fp32 = [g for g, e in src.manifest["graphs"].items() if e["precision"] != "fp32"]
    if not_fp32:
        raise MossEdgeError(f"{src.root} is already quantized ({', '.join(not_fp32)}); quantize the fp32 export")
    if src.failed_parity:
        log(f"warning: {src.root} failed its own parity check against the PyTorch model; its quantized "
            "version will fail too until the export is fixed")
    if keep_until_pass and verify is None:
        raise MossEdgeError("keeping layers until the parity check passes needs the parity check (drop --no-verify)")
    stats, ranges = None, {}
    if recipe.needs_calibration:
        samples = build_samples(find_audio(calibration), count=recipe.calibration_samples)
        log(f"calibration: {len(samples)} samples from {len({s.path for s in samples})} file(s)")
        decoder = recipe.graphs["decoder"]
        if decoder.method != "rtn" and decoder.precision in ("int4", "int8"):
            plan = weight_plan(src.graph_path("decoder"), decoder)
            stats = decoder_input_stats(src.root, list(plan), samples, cache_dir)
        for name, graph in recipe.graphs.items():
            if graph.precision == "w8a8":
                plan = weight_plan(src.graph_path(name), graph)
                ranges[name] = activation_ranges(src.root, name, list(plan), samples, graph.activations)
    with staged_dir(out) as tmp:
        manifest = json.loads(json.dumps(src.manifest))
        layers, formats = {}, {}
        for name, graph in recipe.graphs.items():
            source = src.graph_path(name)
            log(f"{name}: {graph.precision}" + (f" ({graph.method}, block {graph.block})" if graph.precision in ("int4", "int8") else ""))  # noqa: E501
            if graph.precision == "fp32":
                for f in src.manifest["graphs"][name]["files"]:
                    shutil.copy(src.root / f, tmp / f)
            elif graph.precision == "int8-dynamic":
                formats[name] = quantize_dynamic_int8(source, tmp / f"{name}.onnx")
            else:
                scales = {act: max(r, 1e-8) / 127 for act, r in ranges.get(name, {}).items()}
                layers[name] = quantize_weights(source, tmp / f"{name}.onnx", weight_plan(source, graph),
                                                stats if name == "decoder" else None, scales or None)
            manifest["graphs"][name] = graph_entry(tmp, name, graph.precision)
        for f in src.tokenizer_files:
            shutil.copy(src.file(f), tmp / f)
        manifest["backends"] = sorted(set(recipe.backends) & set(src.manifest.get("backends", recipe.backends)))
        manifest["unfinished"] = "quantize: not verified yet"
        manifest["quantization"] = {"recipe": recipe.to_dict(), "from": str(src.root.resolve()),
                                    "dynamic_int8": formats, "higher_precision": {}}
        for name, graph in recipe.graphs.items():
            manifest["quantization"]["higher_precision"][name] = higher_precision_weights(
                src.graph_path(name), tmp / f"{name}.onnx", graph)
        report = _check(tmp, manifest, recipe, layers, verify, log)
        decoder = recipe.graphs["decoder"]
        if keep_until_pass and not report["summary"]["passed"] and decoder.precision in ("int4", "int8"):
            source = src.graph_path("decoder")
            plan = weight_plan(source, decoder)
            sensitivity = weight_sensitivity(source, plan, stats)
            ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)
            count = 1
            while not report["summary"]["passed"] and count <= len(ranked):
                kept = ranked[:count]
                log(f"parity failed; keeping the {count} most sensitive decoder weight(s) one step more precise")
                for f in tmp.glob("decoder.onnx*"):
                    f.unlink()
                layers["decoder"] = quantize_weights(source, tmp / "decoder.onnx", promote(plan, kept), stats)
                manifest["graphs"]["decoder"] = graph_entry(tmp, "decoder", decoder.precision)
                manifest["quantization"]["kept_more_precise"] = {n: sensitivity[n] for n in kept}
                promoted = {n: f"--keep-until-pass: one step more precise (weighted error {sensitivity[n]:.2e})"
                            for n in kept}
                manifest["quantization"]["higher_precision"]["decoder"] = higher_precision_weights(
                    source, tmp / "decoder.onnx", decoder, promoted)
                report = _check(tmp, manifest, recipe, layers, verify, log)
                count *= 2
        del manifest["unfinished"]
        write_manifest(tmp, manifest)  # the last file written
    return out


def _check(tmp: Path, manifest: dict, recipe: Recipe, layers: dict, verify, log) -> dict | None:
    """Record kernels and sizes in the manifest, then run the parity check (if any) into it."""
    kernels = {g: cpu_kernels(tmp / f"{g}.onnx") for g, r in recipe.graphs.items() if r.precision != "fp32"}
    manifest["quantization"].update(weights=layers, ort_cpu_kernels=kernels,
                                    weight_bytes={g: weight_bytes(tmp / f"{g}.onnx") for g in layers})
    unfused = {g: k["dequantized_weights"] for g, k in kernels.items() if k["dequantized_weights"]}
    if unfused:
        log(f"warning: ONNX Runtime CPU left DequantizeLinear unfused in {unfused}: those weights run dequantized")
    manifest.pop("parity", None)  # a previous round's result does not describe these graphs
    manifest.pop("parity_report", None)
    write_manifest(tmp, manifest)
    if verify is None:
        return None
    report = verify(tmp)
    manifest["parity"] = report["summary"]
    (tmp / "parity.json").write_text(json.dumps(report, indent=2))
    manifest["parity_report"] = "parity.json"
    return report


def weight_bytes(graph_path: Path) -> dict:
    """Per bit width: bytes of the quantized weights (data + scales) and of the same weights in fp16."""
    model = onnx.load(str(graph_path), load_external_data=False)
    dims = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    out = {}
    for name, count in dims.items():
        for bits, suffix in ((4, "_q4"), (8, "_q8")):
            if name.endswith(suffix):
                scales = dims.get(name.removesuffix(suffix) + "_scale", 0)
                entry = out.setdefault(f"int{bits}", {"quantized_bytes": 0, "fp16_bytes": 0})
                entry["quantized_bytes"] += count * bits // 8 + scales * 4
                entry["fp16_bytes"] += 2 * count
    for entry in out.values():
        entry["ratio_to_fp16"] = entry["quantized_bytes"] / entry["fp16_bytes"]
    return out
