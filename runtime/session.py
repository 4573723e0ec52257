"""ONNX Runtime sessions on a chosen execution provider."""

import os
from pathlib import Path

import onnxruntime as ort

from moss_edge.runtime.errors import MossEdgeError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def provider_list(provider: str, cache_dir: Path | None = None) -> list:
    if provider not in PROVIDERS:
        raise MossEdgeError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider][0]
    if wanted not in ort.get_available_providers():
        raise MossEdgeError(
            f"{wanted} is not available in this onnxruntime build ({', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu (or JetPack's onnxruntime build) for cuda/tensorrt, or use --provider cpu"
        )
    providers: list = list(PROVIDERS[provider])
    if provider == "tensorrt" and cache_dir is not None:
        # Building a TensorRT engine takes minutes on a Jetson: keep it beside the artifact.
        providers[0] = ("TensorrtExecutionProvider", {
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True, "trt_fp16_enable": False,
        })
    return providers


def make_session(path: Path, provider: str = "cpu", threads: int | None = None,
                 cache_dir: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=provider_list(provider, cache_dir))
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as err:
        raise MossEdgeError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None
