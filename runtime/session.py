"""ONNX Runtime sessions on a chosen execution provider."""

import os
from dataclasses import dataclass
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


@dataclass
class ShapeLimits:
    """The largest inputs a TensorRT engine is built for (TensorRT needs shape ranges up front)."""

    max_chunks: int = 64  # encoder chunks per call (the runtime sends conv_chunksize at most)
    max_prompt: int = 2048  # prompt tokens in one prefill
    max_context: int = 4096  # prompt + generated tokens


def trt_profiles(graph: str, model: dict, limits: ShapeLimits) -> dict[str, str]:
    """TensorRT optimization profiles (min / opt / max shapes) for one graph of an artifact."""
    def spec(shapes: dict[str, tuple]) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())

    h, k, kv, hd, taps = (model["hidden_size"], model["num_deepstack"], model["num_key_value_heads"], model["head_dim"],
                          model["num_taps"])
    frames = model["chunk_frames"]
    if graph == "encoder":
        lo = {"mel": (1, 128, 8), "frames": (1,)}
        opt = {"mel": (8, 128, frames), "frames": (8,)}
        hi = {"mel": (limits.max_chunks, 128, frames), "frames": (limits.max_chunks,)}
    elif graph == "adapter":
        d, most = model["audio_dim"], limits.max_chunks * frames // 8
        lo = {"audio_tokens": (1, d), "taps": (taps, 1, d)}
        opt = {"audio_tokens": (400, d), "taps": (taps, 400, d)}
        hi = {"audio_tokens": (most, d), "taps": (taps, most, d)}
    else:
        def decoder(seq: int, past: int) -> dict[str, tuple]:
            shapes = {"input_ids": (1, seq), "position_ids": (1, seq), "audio_embeds": (1, seq, h),
                      "deepstack_embeds": (k, 1, seq, h)}
            for i in range(model["num_hidden_layers"]):
                shapes[f"past_key_{i}"] = shapes[f"past_value_{i}"] = (1, kv, past, hd)
            return shapes
        lo, opt, hi = decoder(1, 0), decoder(1, 512), decoder(limits.max_prompt, limits.max_context)
    return {"trt_profile_min_shapes": spec(lo), "trt_profile_opt_shapes": spec(opt), "trt_profile_max_shapes": spec(hi)}


def provider_list(provider: str, cache_dir: Path | None = None, profiles: dict[str, str] | None = None) -> list:
    if provider not in PROVIDERS:
        raise MossEdgeError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider][0]
    if wanted not in ort.get_available_providers():
        raise MossEdgeError(
            f"{wanted} is not available in this onnxruntime build ({', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu (or JetPack's onnxruntime build) for cuda/tensorrt, or use --provider cpu"
        )
    return tensorrt_options(cache_dir, profiles) if provider == "tensorrt" else list(PROVIDERS[provider])


def tensorrt_options(cache_dir: Path | None, profiles: dict[str, str] | None) -> list:
    """TensorRT EP settings: engines and timing caches kept beside the artifact (building an
    engine takes minutes on a Jetson), fp16 off so the artifact's precision is what runs,
    shape profiles from the artifact's sizes."""
    options = {"trt_fp16_enable": False, "trt_max_workspace_size": 2 << 30}
    if cache_dir is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
    options.update(profiles or {})
    return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]


def make_session(path: Path, provider: str = "cpu", threads: int | None = None,
                 cache_dir: Path | None = None, profiles: dict[str, str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=provider_list(provider, cache_dir, profiles))
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as err:
        raise MossEdgeError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None
