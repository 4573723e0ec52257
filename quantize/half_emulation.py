"""Running an fp16 graph where no fp16 kernels exist (ONNX Runtime's x86 CPU provider has none
for MatMul, Add, Mul, Softmax...): the same graph on fp32 kernels, each fp16 value rounded to
fp16 where it is made.

Every node computes in fp32 from inputs that are exactly the fp16 values the fp16 graph would
hold, and its output is rounded to fp16 (a Cast to fp16 and back) before anything reads it: what
a GPU's fp16 kernels do when they accumulate in fp32 and store fp16, up to summation order.
Overflow shows as it would on the device (a value past 65504 becomes inf). With `peaks`, the
graph also outputs each rounded tensor's largest magnitude before rounding, for the fp16
headroom of each block.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from moss_edge.runtime.artifact import fp16_graphs, sha256_file

PEAK_PREFIX = "peak:"
FP16_MAX = 65504.0


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type. ONNX's inference does not know ONNX Runtime's contrib ops
    (MatMulNBits, GroupQueryAttention, the layer norms) nor, so, anything after them: those
    outputs take their node's first input's type, which holds for every such node in our graphs."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]  # inferred anew: a graph retyped after export may carry stale ones
    g = onnx.shape_inference.infer_shapes(bare).graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for node in g.node:
        for o in node.output:
            if o and o not in types and node.input and node.input[0] in types:
                types[o] = types[node.input[0]]
    return types


def emulated(model: onnx.ModelProto, peaks: bool = False) -> onnx.ModelProto:
    """The fp32 twin of the fp16 graph `model` (parsed without its weights; not changed): the
    same inputs and outputs in fp32, the same initializers (fp16 ones cast up once, which ONNX
    Runtime folds at load). A quantized weight's scales are made to depend on an input, so that
    ONNX Runtime dequantizes each weight when it runs instead of folding every weight into an
    fp32 copy at load (a 4B decoder would hold 15 GB)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    types = tensor_types(model)
    half = {name for name, t in types.items() if t == TensorProto.FLOAT16}
    front, nodes, peak_outputs = [], [], []
    scales = {n.input[1] for n in g.node if n.op_type == "DequantizeLinear"} & half
    if scales:  # 1.0, known only at run time: the size of the first input is never negative
        size = f"{g.input[0].name}:size"
        front += [helper.make_node("Size", [g.input[0].name], [size], name=size),
                  helper.make_node("GreaterOrEqual", [size, "run_time_zero"], ["run_time_true"], name="run_time_true"),
                  helper.make_node("Cast", ["run_time_true"], ["run_time_one"], name="run_time_one", to=TensorProto.FLOAT)]
        g.initializer.append(helper.make_tensor("run_time_zero", TensorProto.INT64, [], [0]))

    def rounding(source: str, name: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Cast", [source], [f"{name}:fp16"], name=f"{name}:round", to=TensorProto.FLOAT16),
                helper.make_node("Cast", [f"{name}:fp16"], [name], name=f"{name}:back", to=TensorProto.FLOAT)]

    for t in g.initializer:
        if t.name in half:  # the stored fp16 values, exactly, in fp32
            original = t.name
            t.name = f"{original}:stored"
            if original in scales:
                front += [helper.make_node("Cast", [t.name], [f"{original}:up"], name=f"{original}:up", to=TensorProto.FLOAT),
                          helper.make_node("Mul", [f"{original}:up", "run_time_one"], [original], name=f"{original}:late")]
            else:
                front.append(helper.make_node("Cast", [t.name], [original], name=f"{original}:up", to=TensorProto.FLOAT))
    for v in g.input:
        if v.name in half:  # whatever is fed is first rounded as the fp16 input would be
            v.type.tensor_type.elem_type = TensorProto.FLOAT
            front += rounding(v.name, f"{v.name}:rounded")
    fed = {v.name: f"{v.name}:rounded" for v in g.input if v.name in half}
    for node in g.node:
        node.input[:] = [fed.get(i, i) for i in node.input]
        outputs = [o for o in node.output if o in half]
        if node.op_type == "Cast" and outputs:  # already rounds; then read back in fp32
            node.output[0] = f"{outputs[0]}:fp16"
            nodes += [node, helper.make_node("Cast", [node.output[0]], [outputs[0]], name=f"{outputs[0]}:back",
                                             to=TensorProto.FLOAT)]
            continue
        nodes.append(node)
        for o in outputs:
            exact = f"{o}:fp32"
            node.output[:] = [exact if x == o else x for x in node.output]
            nodes += rounding(exact, o)
            if peaks:
                peak = f"{PEAK_PREFIX}{o}"
                nodes += [helper.make_node("Abs", [exact], [f"{exact}:abs"], name=f"{exact}:abs"),
                          helper.make_node("ReduceMax", [f"{exact}:abs"], [peak], name=peak, keepdims=0)]
                peak_outputs.append(helper.make_tensor_value_info(peak, TensorProto.FLOAT, []))
    for v in g.output:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    g.output.extend(peak_outputs)
    del g.node[:]
    g.node.extend(front + nodes)
    del g.value_info[:]
    return model


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the weights are not copied: the view reads the artifact's own files
    except OSError:
        shutil.copy(src, dst)


@contextmanager
def cpu_view(root: Path) -> Iterator[Path]:
    """root itself when ONNX Runtime's CPU provider runs all its graphs; else a folder beside it
    that reads as the same artifact with each fp16 graph replaced by its emulated fp32 twin
    (weights hard-linked, or copied where links cannot be made), removed afterwards."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    graphs = fp16_graphs(manifest)
    if not graphs:
        yield root
        return
    # named like a staging folder (with this process's id), so that the next export or quantize
    # there removes one a killed run left; in the system's temp folder where root's is read-only
    prefix = f".{root.name}.staging-{os.getpid()}-emulated-"
    try:
        view = Path(tempfile.mkdtemp(prefix=prefix, dir=root.parent))
    except OSError:
        view = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        replaced = {manifest["graphs"][g]["file"]: g for g in graphs}
        for f in root.iterdir():
            if f.is_file() and f.name not in replaced and f.name != "manifest.json":
                _link_or_copy(f, view / f.name)
        hashes = {}
        for file, graph in replaced.items():
            onnx.save(emulated(onnx.load(str(root / file), load_external_data=False)), str(view / file))
            hashes[file] = sha256_file(view / file)
        for entry in manifest["graphs"].values():
            entry["files"] = {f: hashes.get(f, h) for f, h in entry["files"].items()}
        manifest["backends"] = sorted({*manifest.get("backends", []), "cpu"})
        (view / "manifest.json").write_text(json.dumps(manifest, indent=2))
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


BUNDLED_RECORDINGS = ("speech_en_10s.flac", "speech_zh_4s.flac", "dialogue_zh_12s.flac", "speech_ko_18s.flac")


def encoder_headroom(graph: Path, chunk_frames: int) -> dict:
    """The fp16 encoder's largest value per layer on the bundled recordings (its emulated twin,
    before each value is rounded), and fp16's headroom over the largest (65504 / largest).
    Layers are told apart by their two LayerNormalizations; the stem counts with layer 0, the
    final norm and projection with the last layer."""
    import numpy as np
    import onnxruntime as ort

    from moss_edge import bundled_audio
    from moss_edge.runtime.audio import chunk_mels, load_audio, log_mel

    model = emulated(onnx.load(str(graph), load_external_data=False), peaks=True)
    norms, seen = {}, 0
    for node in model.graph.node:
        seen += node.op_type == "LayerNormalization"
        norms.update({o: seen for o in node.output})
    layers = max(1, (seen - 1) // 2)  # two per layer, and the final one
    peaks_path = graph.parent / f".{graph.stem}.peaks.onnx"  # beside its weights; removed after the run
    try:
        onnx.save(model, str(peaks_path))
        session = ort.InferenceSession(str(peaks_path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs() if o.name.startswith(PEAK_PREFIX)]
        largest = np.zeros(layers)
        for clip in BUNDLED_RECORDINGS:
            batch = chunk_mels([log_mel(load_audio(bundled_audio(clip)))], chunk_frames)
            for name, value in zip(names, session.run(names, {"mel": batch.mel, "frames": batch.frames})):
                layer = min(max(norms[name.removeprefix(PEAK_PREFIX)] - 1, 0) // 2, layers - 1)
                largest[layer] = max(largest[layer], float(value))
    finally:
        peaks_path.unlink(missing_ok=True)
    worst = float(largest.max())
    return {"audio": list(BUNDLED_RECORDINGS), "largest": worst, "headroom": FP16_MAX / worst if worst else None,
            "largest_per_layer": [round(float(v), 3) for v in largest]}
