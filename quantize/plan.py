"""Which weights of a graph a recipe quantizes, and why every other weight stays more precise."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from moss_edge.export.onnx_export import IN_CHECKPOINT, CheckpointWeights
from moss_edge.quantize.graph import WeightRule, read_initializer
from moss_edge.quantize.recipe import GraphRecipe

BITS = {"int4": 4, "int8": 8, "w8a8": 8, "fp16": 16}  # 16: a half-precision table, no scales
FLOAT_TYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}


def _weights(model: onnx.ModelProto) -> dict[str, tuple[str, list[int]]]:
    """Initializers used as a weight (MatMul/Gemm/Conv right-hand side, Gather table): op and dims."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1 and node.input[1] in dims:
            out.setdefault(node.input[1], (node.op_type, dims[node.input[1]]))
        elif node.op_type == "Gather" and node.input[0] in dims:
            out.setdefault(node.input[0], (node.op_type, dims[node.input[0]]))
    return out


def weight_precision(name: str, op: str, dims: list[int], recipe: GraphRecipe) -> tuple[str, str]:
    """(precision, reason) for one weight under a weight-only or W8A8 recipe; reason is empty
    when the weight is quantized. The one place these decisions are made."""
    if recipe.precision == "fp32":
        return "fp32", "the recipe keeps this graph fp32"
    if op == "Gather":
        precision, why = recipe.embedding, "the recipe's embedding precision"
    elif "lm_head" in name:
        precision, why = recipe.lm_head, "the recipe's lm_head precision"
    elif op == "MatMul":
        precision, why = recipe.precision, ""
    else:
        return "fp32", f"{op} weight: {recipe.precision} quantizes MatMul weights and tables only"
    if len(dims) != 2:
        return "fp32", f"{len(dims)}-D {op} weight: only 2-D weights are quantized"
    pattern = next((k for k in recipe.keep if k in name), None)
    if pattern is not None:
        return "fp32", f"the recipe keeps weights matching {pattern!r}"
    if precision in ("fp32", "fp16"):
        return precision, f"{why} is {precision}"
    if precision == "int4" and recipe.dtype == "fp16" and op == "MatMul":
        k, n = dims
        if n % 2 or gpu_block(k, recipe.block) is None:
            return "fp16", (f"[{k}, {n}]: the GPU INT4 kernels (TensorRT, ONNX Runtime CUDA) take N even and K a "
                            f"multiple of the block (64 or {recipe.block})")
    return precision, ""


def gpu_block(k: int, block: int) -> int | None:
    """The INT4 block for a weight of k rows on a GPU: the recipe's; 64 (TensorRT's other block size)
    where k is a multiple of 64 but not of it; None where it is neither. A weight shorter than one
    block is one partial block, as ModelOpt writes it."""
    if k <= block or k % block == 0:
        return block
    return 64 if block > 64 and k % 64 == 0 else None


@dataclass
class GraphPlan:
    """One graph of the fp32 artifact, parsed once (without its weights), and the rule of each
    weight the recipe quantizes."""

    name: str
    path: Path
    recipe: GraphRecipe
    model: onnx.ModelProto
    rules: dict[str, WeightRule]
    read: Callable[[onnx.TensorProto], np.ndarray]  # an initializer's value, wherever it is stored

    @property
    def in_checkpoint(self) -> bool:
        """Whether the graph's weights are still in the checkpoint (an export for a recipe)."""
        return any(e.value == IN_CHECKPOINT for i in self.model.graph.initializer for e in i.external_data)

    @property
    def weights(self) -> dict[str, tuple[str, list[int]]]:
        return _weights(self.model)


def weight_reader(root: Path, checkpoint: Path | None) -> Callable[[onnx.TensorProto], np.ndarray]:
    """Reads an initializer of a graph in `root`: from its file, or from the checkpoint's shards
    when the graph left it there."""
    weights = CheckpointWeights(checkpoint) if checkpoint is not None else None

    def read(init: onnx.TensorProto) -> np.ndarray:
        if any(e.value == IN_CHECKPOINT for e in init.external_data):
            return weights.array(init.name)
        return read_initializer(init, root)
    return read


def plan_graph(path: Path, name: str, recipe: GraphRecipe, checkpoint: Path | None = None) -> GraphPlan:
    """Every weight the recipe quantizes (2-D MatMul weights, Gather tables) with its rule.
    checkpoint: where the weights are when the graph left them in it."""
    model = onnx.load(str(path), load_external_data=False)
    rules = {}
    for weight, (op, dims) in _weights(model).items():
        precision, _ = weight_precision(weight, op, dims, recipe)
        # a MatMul weight kept fp16 stays a plain initializer (an fp16 graph stores it in fp16)
        if precision == "fp32" or (precision == "fp16" and op == "MatMul") or recipe.precision == "int8-dynamic":
            continue
        table = "lm_head" in weight or op == "Gather"
        block = gpu_block(dims[0], recipe.block) if recipe.dtype == "fp16" and op == "MatMul" else recipe.block
        rules[weight] = WeightRule(BITS[precision], block or recipe.block, "rtn" if table else recipe.method,
                                   per_channel=precision == "w8a8")
    return GraphPlan(name, path, recipe, model, rules, weight_reader(path.parent, checkpoint))


def higher_precision_weights(plan: GraphPlan, written: onnx.ModelProto,
                             promoted: dict[str, str] | None = None) -> dict[str, dict]:
    """Every weight of the fp32 graph that the written graph keeps in floating point, with its
    reason, and every weight `promoted` names (weight -> reason) at the precision it got:
    nothing stays more precise without a word."""
    before = plan.weights
    floats = {i.name: FLOAT_TYPES[i.data_type] for i in written.graph.initializer if i.data_type in FLOAT_TYPES}
    out = {}
    for name, (op, dims) in before.items():
        if name not in floats:
            continue
        if plan.recipe.precision == "int8-dynamic":
            reason = ("Conv weight: dynamic INT8 quantizes MatMul weights only" if op == "Conv" else
                      "not a 2-D MatMul weight: dynamic INT8 quantizes those only")
        else:
            reason = weight_precision(name, op, dims, plan.recipe)[1] or "not quantized (no rule matched)"
        out[name] = {"precision": floats[name], "reason": reason, "parameters": int(np.prod(dims))}
    for name, reason in (promoted or {}).items():
        out[name] = {"precision": floats.get(name, "int8"), "reason": reason,
                     "parameters": int(np.prod(before[name][1]))}
    return out
