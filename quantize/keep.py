"""Keep until pass: where the parity check fails, which weights to keep more precise, what each
costs, and what to advise when that cannot help. quantize/artifact.py runs the rounds.

A round reads the parity report, takes the first failing graph upstream first (encoder, adapter,
decoder: a graph's error reaches everything after it), and keeps its most error-sensitive
weights one step more precise: INT4 -> INT8 -> float on the CPU; on fp16 (GPU) graphs INT4 ->
fp16 directly, since TensorRT 10 quantizes INT8 only with its activations; a dynamic INT8
MatMul -> fp32.
"""

from dataclasses import dataclass

import numpy as np

from moss_edge.quantize.graph import WeightRule, weight_sensitivity
from moss_edge.quantize.plan import GraphPlan
from moss_edge.runtime.graphs import CUDA_DECODER, ORT_DECODER, PREFILL_DECODER
from moss_edge.runtime.parity import graph_failures

ORDER = ("encoder", "adapter", "decoder")
RECIPE_GRAPH = {"encoder": "encoder", "adapter": "adapter", "decoder": "decoder", ORT_DECODER: "decoder",
                CUDA_DECODER: "decoder", PREFILL_DECODER: "decoder"}


@dataclass(frozen=True)
class Step:
    """One weight kept one step more precise."""

    before: str  # int4, int8, int8-dynamic, w8a8
    after: str  # int8, fp16, fp32
    bytes_added: int


def failing_graphs(report: dict) -> list[str]:
    """The recipe graphs the report fails, upstream first. End-to-end failures (KL, top-1,
    greedy) count against the decoder when nothing upstream of it fails."""
    failing = {RECIPE_GRAPH[name] for name, outputs in report["graphs"].items()
               if graph_failures({name: outputs}, report["thresholds"])}
    if not failing and not report["summary"]["passed"]:
        failing = {"decoder"}
    return [g for g in ORDER if g in failing]


def figure(report: dict, graph: str) -> float:
    """The failing graph's figure: its worst output cosine against the reference (for the
    decoder, over every decoder graph the artifact has)."""
    return min(m["cosine"] for name, outputs in report["graphs"].items() if RECIPE_GRAPH[name] == graph
               for m in outputs.values())


def _bytes(count: int, precision: str, rule: WeightRule | None, columns: int) -> int:
    """A weight's bytes at precision (scales included)."""
    if precision in ("fp32", "fp16"):
        return count * (4 if precision == "fp32" else 2)
    if precision == "int8-dynamic":
        return count + columns * 5  # int8 data, fp32 scale and int8 zero point per column
    bits = 4 if precision == "int4" else 8
    blocks = 1 if rule is None or rule.per_channel else max(1, -(-count // columns // rule.block))
    return count * bits // 8 + blocks * columns * 4


def steps(plan: GraphPlan) -> dict[str, Step]:
    """Every weight of the graph that can go one step more precise, and to what."""
    recipe, out = plan.recipe, {}
    floating = "fp16" if recipe.dtype == "fp16" else "fp32"
    for name, (op, dims) in plan.weights.items():
        count, columns = int(np.prod(dims)), dims[-1]
        if recipe.precision == "int8-dynamic":
            if op == "MatMul" and len(dims) == 2:
                out[name] = Step("int8-dynamic", "fp32", _bytes(count, "fp32", None, columns)
                                 - _bytes(count, "int8-dynamic", None, columns))
            continue
        rule = plan.rules.get(name)
        if rule is None or rule.bits == 16:
            continue
        before = "w8a8" if rule.per_channel else f"int{rule.bits}"
        after = "int8" if rule.bits == 4 and floating == "fp32" else floating
        now = _bytes(count, "int8" if before == "w8a8" else before, rule, columns)
        then = _bytes(count, after, WeightRule(8, rule.block), columns)
        out[name] = Step(before, after, then - now)
    return out


def ranked(plan: GraphPlan, stats: dict | None) -> list[tuple[str, float]]:
    """The graph's promotable weights, most error-sensitive first: (weight, weighted error)."""
    weights = plan.weights
    rules = {n: plan.rules.get(n) or WeightRule(8, weights[n][1][0], per_channel=True) for n in steps(plan)}
    sensitivity = weight_sensitivity(plan.model, plan.read, rules, stats if plan.name == "decoder" else None)
    return sorted(sensitivity.items(), key=lambda item: item[1], reverse=True)


def more_precise_line(graph: str, precision: str, dtype: str) -> str | None:
    """The recipe-file change that keeps a whole graph one step more precise, or None when it is
    as precise as the recipe allows (fp32)."""
    if dtype == "fp16":
        return None if precision == "fp32" else f'"{graph}": {{"precision": "fp32", "dtype": "fp16"}} (fp16 weights)'
    after = {"int4": "int8", "int8": "fp32", "int8-dynamic": "fp32", "w8a8": "fp32"}.get(precision)
    return None if after is None else f'"{graph}": {{"precision": "{after}"}} in a recipe file (--recipe FILE)'


def advice(report: dict, recipe, keep_until_pass: bool, promoted: dict[str, dict] | None = None) -> str:
    """What to do about a failed parity check: for each failing graph, what fails and a step that
    helps there; --keep-until-pass only where it was not given and a graph has weights to promote."""
    graphs = failing_graphs(report)
    if not graphs:
        return "see the report (moss-edge verify ARTIFACT)"
    parts = []
    for graph in graphs:
        r = recipe.graphs[graph]
        shown = "; ".join(f for f in report["summary"]["failures"] if RECIPE_GRAPH.get(f.split(".")[0].split(":")[0]) == graph)
        head = f"the {graph} fails" + (f" ({shown})" if shown else "")
        line = more_precise_line(graph, r.precision, r.dtype)
        tried = len((promoted or {}).get(graph, {}))
        if line is None:
            parts.append(f"{head}, though the recipe keeps it {r.precision}: quantization is not the cause; check the "
                         "export (moss-edge verify on the fp32 artifact) and the reference")
        elif keep_until_pass and tried:
            parts.append(f"{head} with {tried} of its weights kept one step more precise; keep the whole graph more "
                         f"precise: {line}")
        else:
            parts.append(f"{head}: keep the whole graph more precise: {line}")
    if not keep_until_pass:
        parts.append("or try --keep-until-pass, which keeps the most error-sensitive weights of each failing graph one "
                     "step more precise, as few as pass")
    return "; ".join(parts)
