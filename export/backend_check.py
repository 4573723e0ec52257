"""Which targets can take an artifact, checked where it is made, without them: every node of the
graphs a target loads, against backend_rules.py (the ops its parser or provider has, and the
rules beyond that), with the reason and the source of each finding. Needs onnx (the export
extra), so it lives here, not in the device runtime."""

import functools
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from moss_edge.export.engine_plan import artifact_plan
from moss_edge.export.backend_rules import ORT_CUDA_ELSEWHERE, ORT_CUDA_TYPES, RULES, TARGETS, TRT_TYPES, Target
from moss_edge.quantize.half_emulation import tensor_types
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import Dims
from moss_edge.runtime.session import ShapeLimits, profile_sizes


@dataclass
class Finding:
    graph: str
    node: str
    op: str
    rule: str
    verdict: str  # rejected | elsewhere | warning
    reason: str
    source: str


class GraphFacts:
    """What the rules ask about a graph: its constants, who reads each tensor, its opsets."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path):
        g = model.graph
        self.base_dir = base_dir
        self.constants = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = n.attribute[0].t
        self.made_by = {out: n for n in g.node for out in n.output}
        self.read_by = defaultdict(list)
        for n in g.node:
            for name in n.input:
                self.read_by[name].append(n)
        self.opsets = {(o.domain or ""): o.version for o in model.opset_import}
        self.types = tensor_types(model)

    def value(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.constants[name], str(self.base_dir))


def _attr(node: onnx.NodeProto, name: str):
    found = [a for a in node.attribute if a.name == name]
    return onnx.helper.get_attribute_value(found[0]) if found else None


def has_reduction_attribute(node, facts):
    r = _attr(node, "reduction")
    return None if r is None else f"reduction={r.decode()!r} is set (drop the attribute: 'none' is the default)"


def reduces(node, facts):
    r = _attr(node, "reduction")
    return None if r in (None, b"none") else f"reduction={r.decode()!r}"


def axis_not_constant(node, facts):
    return None if node.input[1] in facts.constants else f"axis {node.input[1]!r} is computed at run time"


def uses_extra_outputs(node, facts):
    extra = [o for o in node.output[1:] if o]
    return f"outputs {extra} are used (only Y is)" if extra else None


def gelu_approximation_unknown(node, facts):
    a = _attr(node, "approximate")
    return None if a in (None, b"none", b"tanh") else f"approximate={a.decode()!r}"


def gathers_quantized_table(node, facts):
    table = facts.constants.get(node.input[0])
    quantized = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)
    if table is None or table.data_type not in quantized:
        return None
    return f"gathers rows of the {TensorProto.DataType.Name(table.data_type)} table {node.input[0]!r} before dequantizing"


def nonzero_zero_point(node, facts):
    if len(node.input) < 3 or not node.input[2]:
        return None
    if node.input[2] not in facts.constants:
        return "the zero point is computed at run time"
    return "a non-zero zero point" if np.any(facts.value(node.input[2]).astype(np.int64) != 0) else None


def _four_bit(node, facts) -> TensorProto | None:
    weight = facts.constants.get(node.input[0])
    if weight is not None and weight.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return weight
    return None


def _blocked_axes(weight: TensorProto, scale: TensorProto) -> list[tuple[int, int]]:
    """[(axis, block size)] of the axes the scale covers in blocks of more than one element."""
    if len(scale.dims) != len(weight.dims):
        return []
    return [(a, -(-w // s)) for a, (w, s) in enumerate(zip(weight.dims, scale.dims)) if s not in (1, w)]


def int4_weight_unsupported(node, facts):
    weight = _four_bit(node, facts)
    if weight is None:
        return None
    if weight.data_type == TensorProto.UINT4:
        return "UINT4 weights (TensorRT takes INT4)"
    if len(weight.dims) != 2:
        return f"a {len(weight.dims)}-D weight (INT4 needs 2-D)"
    scale = facts.constants.get(node.input[1])
    if scale is None:
        return "the scale is computed at run time (INT4 needs a constant scale)"
    if len(_blocked_axes(weight, scale)) > 1:
        return "blocks along two axes (INT4 takes one blocked axis)"
    return None


def int4_block_undocumented(node, facts):
    weight, scale = _four_bit(node, facts), facts.constants.get(node.input[1])
    if weight is None or scale is None:
        return None
    sizes = [b for _, b in _blocked_axes(weight, scale) if b not in (64, 128)]
    return f"block size {sizes[0]}" if sizes else None


def _matmul_a_type(node, facts) -> int | None:
    """The type of the data a weight's DequantizeLinear output multiplies (its MatMul's input A)."""
    users = [u for u in facts.read_by[node.output[0]] if u.op_type == "MatMul" and u.input[1] == node.output[0]]
    return facts.types.get(users[0].input[0]) if users else None


def int4_in_fp32(node, facts):
    weight, scale = _four_bit(node, facts), facts.constants.get(node.input[1])
    if weight is None or scale is None or scale.data_type != TensorProto.FLOAT:
        return None
    return (f"fp32 scales: {node.input[0]!r} becomes an fp32 weight; weights may be held dequantized: "
            f"{4 * int(np.prod(weight.dims)) / 2**20:.1f} MiB instead of {int(np.prod(weight.dims)) / 2**21:.1f} MiB")


def scale_type_differs(node, facts):
    scale, data = facts.constants.get(node.input[1]), _matmul_a_type(node, facts)
    if scale is None or data is None or scale.data_type == data:
        return None
    return (f"{TensorProto.DataType.Name(scale.data_type)} scales dequantize a weight that multiplies "
            f"{TensorProto.DataType.Name(data)} data")


def int4_not_matmul_b(node, facts):
    if _four_bit(node, facts) is None:
        return None
    other = [f"{u.op_type} input {list(u.input).index(node.output[0])}" for u in facts.read_by[node.output[0]]
             if u is not node and not (u.op_type == "MatMul" and u.input[1] == node.output[0])]
    return f"the dequantized weight feeds {', '.join(other)}, not MatMul input B directly" if other else None


def int4_shape_unfused(node, facts):
    weight, scale = _four_bit(node, facts), facts.constants.get(node.input[1])
    if weight is None or scale is None or len(weight.dims) != 2:
        return None
    k, n = weight.dims
    block = _attr(node, "block_size") or k
    # a weight shorter than one block is one partial block, as ModelOpt writes it too
    problems = ([f"N = {n} is odd"] if n % 2 else []) + ([f"K = {k} is not a multiple of the block {block}"]
                                                       if k > block and k % block else [])
    return "; ".join(problems) or None


def int8_weight_only(node, facts):
    weight = facts.constants.get(node.input[0])
    if weight is None or weight.data_type != TensorProto.INT8:
        return None
    for user in facts.read_by[node.output[0]]:
        if user.op_type in ("MatMul", "Gemm"):
            other = [i for i in user.input[:2] if i != node.output[0]]
            made = facts.made_by.get(other[0]) if other else None
            if made is None or made.op_type != "DequantizeLinear":
                return f"INT8 weight {node.input[0]!r} with float activations"
    return None


CHECKS = {f.__name__: f for f in (has_reduction_attribute, reduces, axis_not_constant, uses_extra_outputs,
                                  gelu_approximation_unknown, gathers_quantized_table, nonzero_zero_point,
                                  int4_weight_unsupported, int4_block_undocumented, int8_weight_only, int4_in_fp32,
                                  scale_type_differs, int4_not_matmul_b, int4_shape_unfused)}


@functools.cache
def _cpu_kernels() -> dict[tuple[str, str], list[tuple[int, int, bool]]]:
    """(domain, op) -> [(first opset, last opset, takes fp16)] of the installed CPU provider."""
    import onnxruntime.capi.onnxruntime_pybind11_state as state

    kernels = defaultdict(list)
    for d in state.get_all_opkernel_def():
        if d.provider == "CPUExecutionProvider":
            domain = "" if d.domain in ("", "ai.onnx") else d.domain
            half = any("tensor(float16)" in types for types in d.type_constraints.values())
            kernels[(domain, d.op_name)].append((*d.version_range, half))
    return kernels


def _half_input(node, facts) -> bool:
    """Whether the node computes on fp16 data (a Cast reads anything; a DequantizeLinear's type is its scales')."""
    if node.op_type in ("Cast", "Shape", "Size"):
        return False
    read = node.input[1:2] if node.op_type == "DequantizeLinear" else node.input
    return any(facts.types.get(i) == TensorProto.FLOAT16 for i in read)


def _op_findings(graph: str, node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Finding]:
    name, domain = node.name or node.output[0], node.domain or ""
    if target.ops is not None:  # TensorRT's parser: ONNX-domain ops it has importers for
        if domain not in ("", "ai.onnx") or node.op_type not in target.ops:
            why = f"no importer for {domain + '.' if domain else ''}{node.op_type} in TensorRT {target.trt_version[0]}.{target.trt_version[1]}"
            return [Finding(graph, name, node.op_type, "op-supported", "rejected", why, target.ops_source)]
    elif target.name == "ort-cuda" and node.op_type in ORT_CUDA_ELSEWHERE:
        return [Finding(graph, name, node.op_type, "cuda-kernel", "elsewhere", ORT_CUDA_ELSEWHERE[node.op_type],
                        target.ops_source)]
    elif target.name == "ort-cuda" and node.op_type in ORT_CUDA_TYPES:
        data = node.input[1] if node.op_type == "DequantizeLinear" else node.input[0]
        got = facts.types.get(data)
        if got in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE) \
                and TensorProto.DataType.Name(got) not in ORT_CUDA_TYPES[node.op_type]:
            return [Finding(graph, name, node.op_type, "cuda-kernel", "elsewhere",
                            f"the CUDA kernel takes {', '.join(sorted(ORT_CUDA_TYPES[node.op_type]))}; this graph gives "
                            f"it {TensorProto.DataType.Name(got)}", target.ops_source)]
    elif target.name == "ort-cpu":
        version = facts.opsets.get(domain, facts.opsets.get("ai.onnx", 0))
        kernels = [k for k in _cpu_kernels().get((domain, node.op_type), []) if k[0] <= version <= k[1]]
        if not kernels:
            return [Finding(graph, name, node.op_type, "cpu-kernel", "rejected",
                            f"no CPU kernel for {node.op_type} at opset {version} in this onnxruntime", target.ops_source)]
        if _half_input(node, facts) and not any(k[2] for k in kernels):
            return [Finding(graph, name, node.op_type, "cpu-kernel", "rejected",
                            f"no fp16 CPU kernel for {node.op_type} in this onnxruntime (an fp16 graph is for GPUs)",
                            target.ops_source)]
    return []


def _type_findings(graph: str, model: onnx.ModelProto, target: Target) -> list[Finding]:
    if target.ops is None:
        return []
    typed = [(t.name, t.data_type) for t in model.graph.initializer]
    typed += [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]
    return [Finding(graph, name, "(tensor)", "tensor-type", "rejected",
                    f"{TensorProto.DataType.Name(dtype)} tensors are not a TensorRT type", target.ops_source)
            for name, dtype in typed if TensorProto.DataType.Name(dtype) not in TRT_TYPES]


def _profile_findings(graph: str, model: onnx.ModelProto, dims: Dims | None, target: Target) -> list[Finding]:
    """TensorRT builds for shape ranges given up front: every dynamic input axis needs one."""
    if target.ops is None or dims is None or graph not in ("encoder", "adapter", "decoder"):
        return []
    sizes = profile_sizes(graph, dims, ShapeLimits())[2]
    missing = []
    for value in model.graph.input:
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and d.dim_param not in sizes:
                missing.append(f"{value.name}[{axis}] ({d.dim_param or 'unnamed'})")
    return [Finding(graph, "(inputs)", "(profile)", "dynamic-axis-profile", "rejected",
                    f"dynamic axes without a min/opt/max profile: {', '.join(missing)}",
                    "TensorRT: every dynamic input dimension needs an optimization profile")] if missing else []


def check_graph(model: onnx.ModelProto, graph: str, target_name: str, base_dir: Path,
                dims: Dims | None = None, facts: GraphFacts | None = None) -> list[Finding]:
    """Findings for one graph (parsed without its external data; the rules read small constants).
    facts: the graph's, when already gathered (every target asks the same questions of it)."""
    target = TARGETS[target_name]
    facts = facts or GraphFacts(model, base_dir)
    findings = [*_type_findings(graph, model, target), *_profile_findings(graph, model, dims, target)]
    rules = [r for r in RULES if target.name in r.targets]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        findings += _op_findings(graph, node, facts, target)
        for rule in rules:
            if rule.op == node.op_type:
                reason = CHECKS[rule.check](node, facts)
                if reason:
                    findings.append(Finding(graph, node.name or node.output[0], node.op_type, rule.id, rule.verdict,
                                            reason, rule.source))
    return findings


def held_dequantized_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the INT4 weights whose fp32 scales make them fp32 tensors in TensorRT, at fp32:
    what an engine holds if it keeps them dequantized (the int4-fp32-activations rule)."""
    consts = {t.name: t for t in model.graph.initializer}
    return sum(4 * int(np.prod(consts[n.input[0]].dims)) for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in consts and n.input[1] in consts
               and consts[n.input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4)
               and consts[n.input[1]].data_type == TensorProto.FLOAT)


def check_artifact(root: Path, manifest: dict, target_names: list[str] | None = None) -> dict:
    """{target: {"passed", "graphs": {graph: counts per verdict}, "findings": [...]}} for the
    graphs each target loads (encoder, adapter, and the decoder and prompt graph the manifest
    gives its provider)."""
    unknown = [t for t in target_names or [] if t not in TARGETS]
    if unknown:
        raise MossEdgeError(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    dims = Dims.from_manifest(manifest["model"])
    models = {}
    result = {}
    for name in target_names or list(TARGETS):
        target = TARGETS[name]
        decoder = manifest.get("decoders", {}).get(target.provider, "decoder")
        prompt = [manifest["prefill"][target.provider]] if target.provider in manifest.get("prefill", {}) else []
        findings, counts = [], {}
        for graph in ("encoder", "adapter", decoder, *prompt):
            if graph not in models:
                model = onnx.load(str(root / f"{graph}.onnx"), load_external_data=False)
                models[graph] = model, GraphFacts(model, root)
            found = check_graph(models[graph][0], graph, name, root, dims, models[graph][1])
            counts[graph] = {v: sum(f.verdict == v for f in found) for v in ("rejected", "elsewhere", "warning")}
            findings += found
        result[name] = {"passed": not any(f.verdict in ("rejected", "elsewhere") for f in findings),
                        "graphs": counts, "findings": [asdict(f) for f in findings]}
        if target.ops is not None:
            result[name]["held_dequantized_bytes"] = sum(held_dequantized_bytes(models[g][0]) for g in counts)
    return result


def recorded_checks(root: Path, manifest: dict) -> dict:
    """What export and quantize write in the manifest: per target, passed or not, and the
    findings counted per graph and per rule (`moss-edge check --json` lists each one)."""
    return {name: {"passed": r["passed"], "graphs": r["graphs"],
                   "rules": dict(Counter(f"{f['verdict']} {f['rule']}" for f in r["findings"])),
                   **({"held_dequantized_bytes": r["held_dequantized_bytes"]} if "held_dequantized_bytes" in r else {})}
            for name, r in check_artifact(root, manifest).items()}


def backends_from_checks(checks: dict) -> list[str]:
    """The runtime's providers whose target passed (TensorRT: either version)."""
    return sorted({TARGETS[name].provider for name, r in checks.items() if r["passed"]})


def deployment_entries(root: Path, manifest: dict) -> dict:
    """The manifest's "checks", "backends" (the runtime refuses other providers) and, for an
    artifact TensorRT takes, "engine_plan" (its memory on a Jetson and the profiles the runtime
    builds engines with); export and quantize write them."""
    checks = recorded_checks(root, manifest)
    out = {"checks": checks, "backends": backends_from_checks(checks)}
    if "tensorrt" in out["backends"]:
        out["engine_plan"] = asdict(artifact_plan(root, manifest))
    return out


def summary_lines(checks: dict, limit: int = 12) -> list[str]:
    """Per target: passed or not, counts per graph, then its findings, one line per graph, op
    and rule (the first node's reason, and how many more)."""
    lines = []
    for name, r in checks.items():
        counts = "; ".join(f"{g} " + ", ".join(f"{n} {v}" for v, n in c.items() if n) if any(c.values()) else f"{g} ok"
                           for g, c in r["graphs"].items())
        lines.append(f"{name:<15} {'PASS' if r['passed'] else 'FAIL'}  {counts}")
        if r.get("held_dequantized_bytes"):
            lines.append(f"    weights may be held dequantized: {r['held_dequantized_bytes'] / 2**30:.2f} GiB in fp32 "
                         "(INT4 weights with fp32 scales; quantize with --recipe int4-trt for fp16 graphs)")
        grouped = defaultdict(list)
        for f in r["findings"]:
            grouped[(f["graph"], f["op"], f["rule"], f["verdict"])].append(f)
        for (graph, op, rule, verdict), found in list(grouped.items())[:limit]:
            where = found[0]["node"] + (f" and {len(found) - 1} more" if len(found) > 1 else "")
            lines.append(f"    {verdict:<9} {graph}: {op} ({where}): {found[0]['reason']} [{rule}; {found[0]['source']}]")
        if len(grouped) > limit:
            lines.append(f"    ... {len(grouped) - limit} more kinds of finding (--json lists all)")
    return lines
