"""The DequantizeLinear -> MatMul pattern of an INT4 weight-only ONNX model, as plain data, so that
graphs from different quantizers (ours, NVIDIA ModelOpt's: tools/modelopt_int4/) can be compared
node for node. Needs only onnx + numpy.

    python -m moss_edge.export.int4_pattern MODEL.onnx --source NAME --out FILE.json
"""

import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

INT4_TYPES = {TensorProto.INT4, TensorProto.UINT4}
# Nodes that only re-type or re-shape a dequantized weight on its way to a MatMul: followed.
PASS_THROUGH = {"Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
SUMMARY_FIELDS = ("weight_dtype", "scale_dtype", "scale_layout", "axis", "block_size", "zero_point",
                  "dq_output_dtype", "consumer", "nodes_between", "matmul_a_dtype")


def _dtype(elem_type: int | None) -> str | None:
    return None if not elem_type else TensorProto.DataType.Name(elem_type)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _scale_layout(w_dims, s_dims, axis, block, labels) -> str:
    """Scale shape in terms of the weight's dims, e.g. "[K/block, N]" (blocked along K)."""
    if len(s_dims) == 0:
        return "scalar"
    if len(s_dims) == 1 and len(w_dims) > 1:  # per-axis: one scale per slice of `axis`
        return f"[{labels[axis % len(w_dims)]}]"
    parts = []
    for i, (w, s) in enumerate(zip(w_dims, s_dims)):
        blocked = block and i == axis % len(w_dims) and s == -(-w // block)
        parts.append(labels[i] if s == w else f"{labels[i]}/block" if blocked else str(s))
    return f"[{', '.join(parts)}]"


def int4_matmul_pattern(model: onnx.ModelProto, base_dir: str = "") -> dict:
    """One dict per DequantizeLinear whose input 0 is an INT4/UINT4 initializer, plus a summary of
    the distinct values of SUMMARY_FIELDS. `model` may be loaded without external data (dims and
    dtypes are in the protos); base_dir is where its external data lives, read for zero points only."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    producers = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
        for name in n.output:
            producers[name] = n
    types = {t.name: t.type.tensor_type.elem_type for t in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    inferred = None  # shape inference only if some MatMul A dtype is unknown, and only once

    def a_dtype(name: str) -> str | None:
        nonlocal inferred
        if types.get(name):
            return _dtype(types[name])
        if name in producers and producers[name].op_type == "Cast":
            return _dtype(_attr(producers[name], "to"))
        if inferred is None:
            vi = onnx.shape_inference.infer_shapes(model).graph.value_info
            inferred = {t.name: t.type.tensor_type.elem_type for t in vi}
        return _dtype(inferred.get(name))

    def chains(name: str, path: list[str]) -> list[tuple[list[str], onnx.NodeProto | None, int]]:
        """Every route from tensor `name` through PASS_THROUGH nodes to its final consumer."""
        out = []
        for n, i in consumers.get(name, []):
            if n.op_type in PASS_THROUGH:
                step = {"Cast": f"(to={_dtype(_attr(n, 'to'))})", "Transpose": f"(perm={_attr(n, 'perm')})"}
                out += chains(n.output[0], path + [n.op_type + step.get(n.op_type, "")])
            else:
                out.append((path, n, i))
        return out or [(path, None, -1)]  # dangling, or a graph output

    nodes = []
    for dq in (n for n in g.node if n.op_type == "DequantizeLinear"):
        w = inits.get(dq.input[0])
        if w is None or w.data_type not in INT4_TYPES:
            continue
        scale = inits.get(dq.input[1])  # a scale computed at run time has no static dims
        s_type = scale.data_type if scale is not None else types.get(dq.input[1])
        s_dims = list(scale.dims) if scale is not None else None
        zp_name = dq.input[2] if len(dq.input) > 2 else ""
        if not zp_name:
            zero_point = "absent"
        elif zp_name in inits:
            zp = numpy_helper.to_array(inits[zp_name], base_dir).astype(np.int32)
            zero_point = f"{_dtype(inits[zp_name].data_type)} {'all zero' if not zp.any() else 'nonzero'}"
        else:
            zero_point = f"computed ({zp_name})"
        axis, block = _attr(dq, "axis"), _attr(dq, "block_size")
        out_dtype = _attr(dq, "output_dtype", 0) or s_type  # opset 23 may set it; else the scale's

        routes = chains(dq.output[0], [])
        described, a_types = [], set()
        for path, n, i in routes:
            end = "graph output" if n is None else (
                f"{n.op_type} input {'AB'[i] if n.op_type in ('MatMul', 'Gemm') and i < 2 else i}")
            described.append(" -> ".join(path + [end]) + ("" if path else " directly"))
            if n is not None and n.op_type in ("MatMul", "Gemm") and i == 1:
                a_types.add(a_dtype(n.input[0]))
        # Dim names: the weight is [K, N] as MatMul's B unless a 2-D transpose (or Gemm transB)
        # comes between, as in column-major layouts.
        path, n, _ = routes[0]
        flips = sum("Transpose" in p for p in path) + bool(n is not None and _attr(n, "transB", 0))
        labels = (["N", "K"] if flips % 2 else ["K", "N"]) if len(w.dims) == 2 else \
            [f"d{i}" for i in range(len(w.dims))]
        nodes.append({
            "weight": w.name, "dq_node": dq.name, "matmul_node": None if n is None else n.name,
            "weight_dtype": _dtype(w.data_type), "weight_dims": list(w.dims),
            "scale_dtype": _dtype(s_type), "scale_dims": s_dims,
            "scale_layout": None if s_dims is None else _scale_layout(
                list(w.dims), s_dims, 1 if axis is None else axis, block or 0, labels),
            "axis": axis, "block_size": block, "zero_point": zero_point,
            "dq_output_dtype": _dtype(out_dtype),
            "consumer": " | ".join(sorted(described)),
            "nodes_between": any(path for path, _, _ in routes),
            "matmul_a_dtype": " | ".join(sorted(map(str, a_types))) if a_types else None,
        })
    summary = {f: sorted({n[f] for n in nodes}, key=str) for f in SUMMARY_FIELDS}
    summary["int4_weights"] = [len(nodes)]
    return {"nodes": nodes, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Describe the INT4 DequantizeLinear/MatMul pattern of a model.")
    ap.add_argument("model", help="ONNX model (external data is not loaded, except zero points)")
    ap.add_argument("--source", required=True, help="who made it, e.g. modelopt or moss_edge")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)

    model = onnx.load(args.model, load_external_data=False)
    pattern = int4_matmul_pattern(model, os.path.dirname(os.path.abspath(args.model)))
    result = {"source": args.source, "model": os.path.basename(args.model),
              "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
              "ops": sorted({n.op_type for n in model.graph.node}), **pattern}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    print(json.dumps({k: result[k] for k in ("source", "model", "opset", "ops", "summary")}, indent=1))


if __name__ == "__main__":
    main()
