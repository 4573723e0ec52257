"""Quantize an fp32 artifact into a new artifact, graph by graph, following a recipe.

Named steps, in order: plan (each source graph parsed once; what is quantized, and why every
other weight is not), calibrate, write the graphs, record (the manifest), verify. With
keep_until_pass, the last three repeat with the most error-sensitive weights of the graph that
fails one step more precise until the parity check passes (quantize/keep.py).
"""

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from moss_edge.calibration.activations import activation_ranges, decoder_input_stats, reference_input_stats
from moss_edge.calibration.dataset import build_samples, find_audio
from moss_edge.export.backend_check import deployment_entries
from moss_edge.export.card import write_card
from moss_edge.export.config import load_config, parse_config
from moss_edge.export.ort_decoder import write_cuda_decoder, write_ort_decoder
from moss_edge.export.writer import check_output, graph_entry, staged_dir, write_manifest
from moss_edge.quantize.dynamic_int8 import quantize_dynamic_int8
from moss_edge.quantize.half import ENCODER_CLAMP, half_plan
from moss_edge.quantize.half_emulation import encoder_headroom
from moss_edge.quantize.graph import WeightRule, half_precision_cache, quantize_weights
from moss_edge.quantize.keep import failing_graphs, figure, ranked, steps
from moss_edge.quantize.kernels import cpu_kernels
from moss_edge.quantize.kv_cache import FORMAT, cache_ranges, int8_cache
from moss_edge.quantize.plan import GraphPlan, higher_precision_weights, plan_graph
from moss_edge.quantize.preflight import check_fits
from moss_edge.quantize.prefill import write_prefill_decoder
from moss_edge.quantize.recipe import Recipe
from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import CUDA_DECODER, ORT_DECODER, PREFILL_DECODER
from moss_edge.runtime.prompt import TextTokenizer


@dataclass
class Calibration:
    decoder_stats: dict | None = None  # MatMul input -> {"sq": E[x^2], "abs": E[|x|]} (data-aware INT4/INT8)
    activation_scales: dict[str, dict[str, float]] = field(default_factory=dict)  # W8A8: graph -> input -> scale
    samples: list = field(default_factory=list)  # the calibration set (an int8 KV cache's scales are taken on it)


@dataclass
class WrittenGraph:
    precision: str
    proto: onnx.ModelProto  # the written graph, parsed once, without its weights
    weights: dict = field(default_factory=dict)  # weight-only: initializer -> rule applied
    dynamic_int8: dict | None = None  # the dynamic INT8 format record
    promoted: dict[str, float] = field(default_factory=dict)  # weight kept one step more precise -> its weighted error
    ort_variant: onnx.ModelProto | None = None  # the decoder's contrib-op twin (decoder_ort.onnx, or decoder_cuda.onnx)
    ort_provider: str = "cpu"  # the provider that runs it
    kv_cache: dict | None = None  # an int8 cache's format record (quantize/kv_cache.py)
    prefill: tuple[onnx.ModelProto, dict] | None = None  # the prompt graph (decoder_prefill.onnx) and its format
    fp16_headroom: dict | None = None  # an fp16 encoder's largest values on the bundled recordings


@dataclass
class QuantizeResult:
    path: Path
    manifest: dict
    report: dict | None  # the parity report; None when not verified

    @property
    def passed(self) -> bool:
        return self.report is None or self.report["summary"]["passed"]


def plan(src: Artifact, recipe: Recipe) -> dict[str, GraphPlan]:
    checkpoint = Path(src.manifest["source"]["checkpoint"]) if src.manifest.get("weights_in_checkpoint") else None
    return {name: plan_graph(src.graph_path(name), name, graph, checkpoint) for name, graph in recipe.graphs.items()}


def calibrate(src: Artifact, recipe: Recipe, plans: dict[str, GraphPlan], calibration: str | None,
              cache_dir: Path | None, log, reference=None) -> Calibration:
    """Decoder input statistics (AWQ, clipping) and activation scales (W8A8) from real audio, and
    the samples (an int8 KV cache is calibrated on them once its decoder is written).
    reference: the fp32 PyTorch model when one is loaded already (the verifier's)."""
    if not recipe.needs_calibration:
        return Calibration()
    samples = build_samples(find_audio(calibration), count=recipe.calibration_samples)
    log(f"calibration: {len(samples)} samples from {len({s.path for s in samples})} file(s)")
    decoder, stats = plans["decoder"], None
    if decoder.recipe.method != "rtn" and decoder.recipe.precision in ("int4", "int8"):
        if decoder.in_checkpoint:
            stats = reference_input_stats(Path(src.manifest["source"]["checkpoint"]), src.token_ids, list(decoder.rules),
                                          decoder.model, samples, reference)
        else:
            stats = decoder_input_stats(src.root, decoder.model, list(decoder.rules), samples, cache_dir)
    scales = {}
    for name, p in plans.items():
        if p.recipe.precision == "w8a8":
            ranges = activation_ranges(src.root, p.model, name, list(p.rules), samples, p.recipe.activations)
            scales[name] = {act: max(r, 1e-8) / 127 for act, r in ranges.items()}
    return Calibration(stats, scales, samples)


def write_graph(src: Artifact, tmp: Path, p: GraphPlan, calibration: Calibration,
                promoted: dict[str, float] | None = None) -> WrittenGraph:
    """One graph of the new artifact; promoted weights (name -> weighted error) go one step more precise."""
    dst, precision = tmp / f"{p.name}.onnx", p.recipe.precision
    for old in tmp.glob(f"{p.name}*.onnx*"):  # an earlier keep-until-pass round (decoder_ort.onnx with the decoder)
        old.unlink()
    written = WrittenGraph(precision, onnx.ModelProto(), promoted=dict(promoted or {}))
    half = half_plan(p.model, clamp_residual=p.name == "encoder") if p.recipe.dtype == "fp16" else None
    if precision == "fp32" and (p.in_checkpoint or half is not None):
        quantize_weights(p.model, p.read, dst, {}, half=half)  # the weights as they are (or in fp16), read once
    elif precision == "fp32":
        for f in src.manifest["graphs"][p.name]["files"]:
            shutil.copy(src.root / f, tmp / f)
    elif precision == "int8-dynamic":
        written.dynamic_int8 = quantize_dynamic_int8(p.model, p.read, dst, frozenset(written.promoted))
    else:
        rules = promote(p.rules, list(written.promoted), p.recipe.dtype)
        written.weights = quantize_weights(p.model, p.read, dst, rules,
                                           calibration.decoder_stats if p.name == "decoder" else None,
                                           calibration.activation_scales.get(p.name), half)
    if p.name == "decoder" and p.recipe.kv_cache == "fp16" and half is None:
        half_precision_cache(dst)
    written.proto = onnx.load(str(dst), load_external_data=False)
    if p.name == "encoder" and half is not None:  # how close it comes to fp16's largest value
        written.fp16_headroom = encoder_headroom(dst, src.dims.chunk_frames) | {"clamp": ENCODER_CLAMP}
    language = parse_config(src.manifest["config"]).language
    if p.name == "decoder" and half is not None:
        written.ort_variant = write_cuda_decoder(tmp, written.proto, src.dims, language, src.token_ids.audio_token)
        written.ort_provider = "cuda"
    elif p.name == "decoder":
        written.ort_variant = write_ort_decoder(tmp, written.proto, src.dims, language, src.token_ids.audio_token)
        if p.recipe.prefill == "int8" and written.ort_variant is not None:
            written.prefill = write_prefill_decoder(tmp, p, written.proto, src.dims, language, src.token_ids.audio_token)
        if p.recipe.kv_cache == "int8" and written.ort_variant is not None:
            written.kv_cache = write_int8_cache(src, tmp, written, calibration.samples)
    return written


def write_int8_cache(src: Artifact, tmp: Path, written: WrittenGraph, samples: list) -> dict:
    """The CPU decoders just written (decoder_ort, and the prompt graph if any) with an int8 KV
    cache, its scales calibrated on `samples` through decoder_ort as written; the format record."""
    tokenizer = TextTokenizer.from_dir(src.root) if src.tokenizer_files else None
    keys, values = cache_ranges(tmp, src.dims, src.token_ids, tokenizer, samples)
    for name, model in ((ORT_DECODER, written.ort_variant), (PREFILL_DECODER, written.prefill and written.prefill[0])):
        if model is not None:
            int8_cache(model, src.dims, keys, values, prompt_graph=name == PREFILL_DECODER)
            onnx.save(model, str(tmp / f"{name}.onnx"))
    return {**FORMAT, "calibration_samples": len(samples),
            "largest_key": float(keys.max()), "largest_value": float(values.max())}


def promote(rules: dict[str, WeightRule], names: list[str], dtype: str) -> dict[str, WeightRule]:
    """The rules with `names` one step up (quantize/keep.py, steps): INT4 -> INT8 in an fp32
    graph, else to the graph's float type (dropped from the rules)."""
    out = dict(rules)
    for name in names:
        if out[name].bits == 4 and dtype == "fp32":
            out[name] = WeightRule(8, out[name].block, out[name].method)
        else:
            del out[name]
    return out


def record(src: Artifact, tmp: Path, recipe: Recipe, plans: dict[str, GraphPlan], written: dict[str, WrittenGraph],
           log) -> dict:
    """The new artifact's manifest, from the source's and what was written; written once,
    marked unfinished until the artifact is verified."""
    manifest = json.loads(json.dumps(src.manifest))
    for key in ("parity", "parity_report", "weights_in_checkpoint", "reference"):  # the source's, not these graphs'
        manifest.pop(key, None)
    hashed = {}  # decoder and decoder_ort share decoder.onnx.data: hashed once
    manifest["graphs"] = {name: graph_entry(tmp, name, w.precision, w.proto, hashed) for name, w in written.items()}
    manifest.pop("decoders", None)
    manifest.pop("prefill", None)
    decoder = written["decoder"]
    if decoder.ort_variant is not None:
        name = {"cpu": ORT_DECODER, "cuda": CUDA_DECODER}[decoder.ort_provider]
        manifest["graphs"][name] = graph_entry(tmp, name, decoder.precision, decoder.ort_variant, hashed)
        manifest["decoders"] = {decoder.ort_provider: name}
    if written["decoder"].prefill is not None:
        manifest["graphs"][PREFILL_DECODER] = graph_entry(tmp, PREFILL_DECODER, "int8-dynamic", written["decoder"].prefill[0],
                                                          hashed)
        manifest["prefill"] = {"cpu": PREFILL_DECODER}
    if decoder.kv_cache:  # older onnxruntime releases refuse the int8 cache: the runtime checks this first
        for name in (ORT_DECODER, PREFILL_DECODER):
            if name in manifest["graphs"]:
                manifest["graphs"][name]["onnxruntime"] = decoder.kv_cache["onnxruntime"]
    manifest.pop("engine_plan", None)
    manifest.update(deployment_entries(tmp, manifest))
    kernels = {name: cpu_kernels(tmp / f"{name}.onnx") for name, e in manifest["graphs"].items()
               if e["precision"] != "fp32" and recipe.graphs.get(name, recipe.graphs["decoder"]).dtype == "fp32"}
    unfused = {g: k["dequantized_weights"] for g, k in kernels.items() if k["dequantized_weights"]}
    if unfused:
        log(f"warning: ONNX Runtime CPU left DequantizeLinear unfused in {unfused}: those weights run dequantized")
    quantized = {name: w for name, w in written.items() if w.precision not in ("fp32", "int8-dynamic")}
    manifest["quantization"] = {
        "recipe": recipe.to_dict(),
        "from": src.manifest["source"]["checkpoint"] if src.manifest.get("weights_in_checkpoint") else str(src.root.resolve()),
        "dynamic_int8": {name: w.dynamic_int8 for name, w in written.items() if w.dynamic_int8},
        **({"prefill": written["decoder"].prefill[1]} if written["decoder"].prefill else {}),
        **({"kv_cache": written["decoder"].kv_cache} if written["decoder"].kv_cache else {}),
        "higher_precision": {name: higher_precision_weights(plans[name], w.proto, {
            n: f"--keep-until-pass: one step more precise (weighted error {e:.2e})" for n, e in w.promoted.items()})
            for name, w in written.items()},
        "weights": {name: w.weights for name, w in quantized.items()}, "ort_cpu_kernels": kernels,
        "weight_bytes": {name: weight_bytes(w.proto) for name, w in quantized.items()}}
    if written["encoder"].fp16_headroom:
        manifest["quantization"]["fp16_headroom"] = {"encoder": written["encoder"].fp16_headroom}
    promoted = {}
    for name, w in written.items():
        if w.promoted:
            step = steps(plans[name])
            promoted[name] = {n: {**vars(step[n]), "weighted_error": e} for n, e in w.promoted.items()}
    if promoted:
        manifest["quantization"]["promoted"] = promoted
    manifest["unfinished"] = "quantize: not verified yet"
    write_manifest(tmp, manifest)
    return manifest


def keep_more_precise_until_pass(src: Artifact, tmp: Path, recipe: Recipe, plans: dict[str, GraphPlan],
                                 calibration: Calibration, written: dict[str, WrittenGraph], verify, report: dict,
                                 log) -> tuple[dict, dict, list[dict]]:
    """Rounds of quantize/keep.py: in the first graph that fails, keep its most error-sensitive
    weights one step more precise, 1, 1, 2, 4, ... more of them, until the check passes. A graph
    is done when it has nothing left to promote or three rounds in a row bring no new best figure;
    the next failing graph goes on. Returns the last manifest and report, and the rounds (what
    each promoted and the graph's figure before and after)."""
    manifest, rounds, done, best, stale = None, [], set(), {}, {}
    order = {}  # graph -> its weights ranked once (the ranking reads and quantizes every weight)
    while not report["summary"]["passed"]:
        graphs = failing_graphs(report)
        graph = next((g for g in graphs if g not in done and steps(plans[g])), None)
        if graph is None:
            log(f"parity fails in {', '.join(graphs) or 'the end-to-end figures'}, where keeping weights one step "
                "more precise has nothing left to try")
            break
        promoted = written[graph].promoted
        if graph not in order:
            order[graph] = ranked(plans[graph], calibration.decoder_stats)
        left = [(n, e) for n, e in order[graph] if n not in promoted]
        if not left:
            log(f"the {graph} still fails with all {len(promoted)} of its weights one step more precise")
            done.add(graph)
            continue
        take = left[:max(1, len(promoted))]
        before = figure(report, graph)
        best.setdefault(graph, before)
        log(f"parity fails in the {graph} (worst cosine {before:.6f}); keeping {len(take)} more of its weights one "
            "step more precise")
        written[graph] = write_graph(src, tmp, plans[graph], calibration, {**promoted, **dict(take)})
        manifest = record(src, tmp, recipe, plans, written, log)
        report = verify(tmp)
        after = figure(report, graph)
        rounds.append({"graph": graph, "weights": [n for n, _ in take], "worst_cosine_before": before,
                       "worst_cosine_after": after, "passed": report["summary"]["passed"]})
        stale[graph] = 0 if after > best[graph] else stale.get(graph, 0) + 1
        best[graph] = max(best[graph], after)
        if stale[graph] >= 3:
            log(f"three rounds in the {graph} brought its worst cosine no higher than {best[graph]:.6f}; "
                "stopping there")
            done.add(graph)
    return manifest, report, rounds


def quantize_artifact(src_dir: str | Path, out_dir: str | Path, recipe: Recipe, calibration: str | None = None,
                      cache_dir: Path | None = None, verify=True, keep_until_pass: bool = False,
                      log=print) -> QuantizeResult:
    """fp32 artifact -> quantized artifact, verified against the PyTorch reference before it is
    moved into place. verify: True for the default Verifier (the checkpoint the artifact came
    from, the bundled held-out clip), a configured `moss_edge.export.verify.Verifier`, or False."""
    src = Artifact.load(src_dir)
    out = Path(out_dir)
    check_output(out)
    not_fp32 = [g for g, e in src.manifest["graphs"].items() if e["precision"] != "fp32"]
    if not_fp32:
        raise MossEdgeError(f"{src.root} is already quantized ({', '.join(not_fp32)}); quantize the fp32 export")
    if src.failed_parity:
        log(f"warning: {src.root} failed its own parity check against the PyTorch model; its quantized "
            "version will fail too until the export is fixed")
    if keep_until_pass and not verify:
        raise MossEdgeError("keeping layers until the parity check passes needs the parity check (drop --no-verify)")
    if verify:
        from moss_edge.export.verify import Verifier

        verify = Verifier() if verify is True else verify
        if isinstance(verify, Verifier):
            verify.check(src.root)  # a wrong or missing reference fails now, not after the work
    plans = plan(src, recipe)
    calib = calibrate(src, recipe, plans, calibration, cache_dir, log, getattr(verify, "model", None))
    with staged_dir(out) as tmp:
        written = {}
        for name, p in plans.items():
            r = p.recipe
            log(f"{name}: {r.precision}" + (f" ({r.method}, block {r.block})" if r.precision in ("int4", "int8") else ""))
            written[name] = write_graph(src, tmp, p, calib)
        for f in src.tokenizer_files:
            shutil.copy(src.file(f), tmp / f)
        manifest = record(src, tmp, recipe, plans, written, log)
        report = verify(tmp) if verify else None
        if keep_until_pass and not report["summary"]["passed"]:
            kept, report, rounds = keep_more_precise_until_pass(src, tmp, recipe, plans, calib, written, verify, report, log)
            manifest = kept or manifest
            manifest["quantization"]["keep_until_pass"] = rounds
        keep_reference(src, tmp, verify, manifest)
        if report is not None:
            report["artifact"] = str(out)  # checked in the staging folder, reported where it will live
            manifest["parity"] = report["summary"]
            (tmp / "parity.json").write_text(json.dumps(report, indent=2))
            manifest["parity_report"] = "parity.json"
        del manifest["unfinished"]
        write_card(tmp, manifest, report, str(out))
        write_manifest(tmp, manifest)  # the last file written
    return QuantizeResult(out, manifest, report)


def keep_reference(src: Artifact, tmp: Path, verify, manifest: dict) -> None:
    """The PyTorch model's recorded answers in the new artifact: the verifier's, or, unverified,
    the source artifact's (the model's too, never the fp32 artifact's), so that every precision
    is checked against the model itself."""
    if hasattr(verify, "recording"):
        from moss_edge.export.verify import keep_recording

        keep_recording(tmp, verify.recording(tmp), manifest)
    elif "reference" in src.manifest:
        entry = src.manifest["reference"]
        shutil.copy(src.file(entry["file"]), tmp / entry["file"])
        manifest["reference"] = dict(entry)


def export_quantized(checkpoint_dir: str | Path, out_dir: str | Path, recipe: Recipe, opset: int = 21,
                     token_ids=None, log=print, **options) -> QuantizeResult:
    """Checkpoint -> quantized artifact with no fp32 artifact in between: the graphs are traced
    with their weights left in the checkpoint, and the quantizer reads each weight from the shards,
    quantizes it and writes it (calibration runs the PyTorch model one layer at a time). options:
    those of quantize_artifact."""
    from moss_edge.export.onnx_export import export_artifact

    out = Path(out_dir)
    check_output(out)
    if any(g.precision == "w8a8" for g in recipe.graphs.values()):
        raise MossEdgeError(f"recipe {recipe.name} calibrates activation scales on fp32 graphs: export the fp32 "
                            "artifact first (moss-edge export without --recipe), then quantize it")
    check_fits(load_config(checkpoint_dir), recipe, out, log)
    # the traced graphs (a few MB), named like a staging folder so that a killed run's are removed by the next
    graphs = out.parent / f".{out.name}.staging-{os.getpid()}-graphs"
    try:
        export_artifact(checkpoint_dir, graphs, opset, token_ids=token_ids, log=log, in_checkpoint=True)
        return quantize_artifact(graphs, out, recipe, log=log, **options)
    finally:
        shutil.rmtree(graphs, ignore_errors=True)


def weight_bytes(model: onnx.ModelProto) -> dict:
    """Per bit width: bytes of the quantized weights (data + scales) and of the same weights in fp16."""
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
