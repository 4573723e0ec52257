"""`moss-edge triton-repo`: an artifact as a Triton model repository, for fleets that run their
own Triton Inference Server (on Jetson too):

  moss_encoder, moss_adapter, moss_decoder  ONNX Runtime backend models: the artifact's graphs
      (the portable decoder), on the CPU or the GPU, TensorRT as the GPU accelerator where the
      manifest's checks say TensorRT takes them, with the engine plan's shape profiles
  moss_audio  Python backend: audio + prompt + options -> text, the inputs and outputs of
      `moss-edge serve`. It builds the prompt and runs the decode loop (runtime/graph_pipeline.py)
      and calls the three graphs as BLS requests: a KV cache round trip through Triton per token,
      which is the price of keeping the graphs in Triton's own ONNX Runtime backend.

The Python backend needs moss-audio-edge installed in Triton's Python (runtime dependencies
only: no torch).
"""

import json
import shutil
from pathlib import Path

from moss_edge.export.writer import staged_dir
from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import GRAPHS
from moss_edge.runtime.session import TRT_WORKSPACE, ShapeLimits, trt_profiles
from moss_edge.serve import MODEL, python_model_config

MODELS = {"encoder": "moss_encoder", "adapter": "moss_adapter", "decoder": "moss_decoder"}
BLS_MODEL = MODEL
TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
MODEL_PY = Path(__file__).parent / "triton_bls_model.py"


def _tensor(t: dict) -> str:
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in t["shape"])
    return f'  {{ name: "{t["name"]}" data_type: {TYPES[t["dtype"]]} dims: [ {dims} ] }}'


def _parameter(key: str, value) -> str:
    return f'        parameters {{ key: "{key}" value: "{value}" }}'


def graph_config(graph: str, entry: dict, gpu: bool, instances: int, profiles: dict | None, trt_cache: Path) -> str:
    """config.pbtxt of one graph model (ONNX Runtime backend, no batching: the batch axis is the graphs' own)."""
    lines = [f'name: "{MODELS[graph]}"', 'backend: "onnxruntime"', f'default_model_filename: "{graph}.onnx"',
             "max_batch_size: 0",
             "input [", ",\n".join(_tensor(t) for t in entry["inputs"]), "]",
             "output [", ",\n".join(_tensor(t) for t in entry["outputs"]), "]",
             f"instance_group [ {{ count: {instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]"]
    if gpu and profiles is not None:
        params = [_parameter("precision_mode", "FP32"), _parameter("max_workspace_size_bytes", TRT_WORKSPACE),
                  _parameter("trt_engine_cache_enable", "1"), _parameter("trt_engine_cache_path", trt_cache / graph),
                  *[_parameter(k, v) for k, v in profiles.items()]]
        lines += ["optimization { execution_accelerators {", "  gpu_execution_accelerator : [ {",
                  '        name : "tensorrt"', *params, "  } ]", "} }"]
    return "\n".join(lines) + "\n"


def write_repository(artifact_dir: Path, out: Path, gpu: bool = False, instances: int = 1,
                     trt_cache: Path | None = None) -> Path:
    """The repository at out (staged: complete or absent). gpu: the graph models run on the GPU,
    with TensorRT where the artifact's checks passed it."""
    if instances < 1:
        raise MossEdgeError(f"--instances must be at least 1, got {instances}")
    artifact = Artifact.load(artifact_dir)
    manifest = artifact.manifest
    tensorrt = gpu and "tensorrt" in manifest.get("backends", [])
    limits = ShapeLimits(**manifest["engine_plan"]["limits"]) if "engine_plan" in manifest else ShapeLimits()
    trt_cache = (trt_cache or Path(out).resolve() / "trt_cache")
    with staged_dir(out) as tmp:
        for graph in GRAPHS:
            version = tmp / MODELS[graph] / "1"
            version.mkdir(parents=True)
            for f in manifest["graphs"][graph]["files"]:
                shutil.copy(artifact.root / f, version / f)
            profiles = trt_profiles(graph, artifact.dims, limits) if tensorrt else None
            (tmp / MODELS[graph] / "config.pbtxt").write_text(
                graph_config(graph, manifest["graphs"][graph], gpu, instances, profiles, trt_cache))
        version = tmp / BLS_MODEL / "1"
        version.mkdir(parents=True)
        shutil.copy(MODEL_PY, version / "model.py")
        shutil.copy(artifact.root / "manifest.json", version / "manifest.json")
        for f in manifest.get("tokenizer_files", {}):
            shutil.copy(artifact.root / f, version / f)
        (tmp / BLS_MODEL / "config.pbtxt").write_text(python_model_config(BLS_MODEL, instances))
        (tmp / "README.md").write_text(
            f"Triton model repository for {artifact.root.name} (moss-edge triton-repo): send requests to "
            f"`{BLS_MODEL}`; it calls {', '.join(MODELS.values())}. The Python backend needs "
            f"`pip install moss-audio-edge` in Triton's Python. Graph models on the {'GPU' if gpu else 'CPU'}"
            f"{', TensorRT accelerated' if tensorrt else ''}.\n" + json.dumps({"artifact": str(artifact.root)}) + "\n")
    return Path(out)
