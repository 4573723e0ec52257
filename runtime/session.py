"""ONNX Runtime sessions on a chosen execution provider."""

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import Dims, concrete_shapes, graph_spec

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


TRT_WORKSPACE = 2 << 30  # TensorRT's scratch memory for its kernels, at most


@dataclass
class ShapeLimits:
    """The largest inputs a TensorRT engine is built for (TensorRT needs shape ranges up front)."""

    max_chunks: int = 64  # encoder chunks per call (the runtime sends conv_chunksize at most)
    max_prompt: int = 2048  # prompt tokens per prefill run (longer prompts are prefilled in pieces)
    max_context: int = 4096  # prompt + generated tokens


def profile_sizes(graph: str, d: Dims, limits: ShapeLimits) -> tuple[dict[str, int], ...]:
    """The dynamic axes of one graph (runtime/graphs.py) at the profile's min, opt and max."""
    if graph == "encoder":
        return ({"chunks": 1, "frames": 8}, {"chunks": 8, "frames": d.chunk_frames},
                {"chunks": limits.max_chunks, "frames": d.chunk_frames})
    if graph == "adapter":
        return {"tokens": 1}, {"tokens": 400}, {"tokens": limits.max_chunks * d.chunk_frames // 8}
    return ({"batch": 1, "seq": 1, "past": 0}, {"batch": 1, "seq": 1, "past": 512},
            {"batch": 1, "seq": limits.max_prompt, "past": limits.max_context})


def trt_profiles(graph: str, d: Dims, limits: ShapeLimits) -> dict[str, str]:
    """TensorRT optimization profiles (min / opt / max shapes) for one graph of an artifact."""
    def spec(shapes: dict[str, tuple]) -> str:
        return ",".join(f"{name}:{'x'.join(str(n) for n in dims)}" for name, dims in shapes.items())

    inputs = graph_spec(graph, d).inputs
    lo, opt, hi = (spec(concrete_shapes(inputs, sizes)) for sizes in profile_sizes(graph, d, limits))
    return {"trt_profile_min_shapes": lo, "trt_profile_opt_shapes": opt, "trt_profile_max_shapes": hi}


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
    options = {"trt_fp16_enable": False, "trt_max_workspace_size": TRT_WORKSPACE}
    if cache_dir is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
    options.update(profiles or {})
    return [(PROVIDERS["tensorrt"][0], options), *PROVIDERS["tensorrt"][1:]]


LARGE_BLOCK = 4 << 20  # bytes: a layer's weight matrix and a prefill's activations are larger
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (macOS, musl)
    _LIBC = None


def return_large_blocks_to_system() -> None:
    """Have glibc map every allocation of LARGE_BLOCK bytes or more on its own and unmap it when
    freed, for the whole process. By default glibc raises that threshold each time such a block
    is freed, so once ONNX Runtime has repacked a graph's weights (freeing the originals) the
    next blocks come from the heap and stay there after they are freed: a 4B INT4 artifact of
    3.8 GiB then peaked at 5.0-6.2 GiB of RSS, and at 4.5 GiB with the threshold fixed (4.2 GiB
    with shrinking_arena too). No-op outside glibc."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)


def release_freed_memory() -> None:
    """Hand freed heap memory below LARGE_BLOCK back to the system (malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def shrinking_arena() -> ort.RunOptions:
    """Run options that return ONNX Runtime's CPU arena to the system when the run ends: for the
    runs made once per request (the last encoder chunk, the adapter, the prefill), whose
    activations would otherwise stay reserved beside the weights (0.36 GiB after a 30 s encode
    at 4B widths)."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def make_session(path: Path, provider: str = "cpu", threads: int | None = None,
                 cache_dir: Path | None = None, profiles: dict[str, str] | None = None) -> ort.InferenceSession:
    return_large_blocks_to_system()
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


def as_declared(feeds: dict, types: dict) -> dict:
    """feeds with each float array in the numpy type `types` gives its input (the graph's: an
    fp16 graph takes fp16), the others as they are."""
    return {name: value.astype(types[name], copy=False) if name in types and value.dtype.kind == "f" else value
            for name, value in feeds.items()}


def run_typed(session: ort.InferenceSession, feeds: dict, options: ort.RunOptions | None = None) -> list:
    """session.run with float inputs in the types the graph declares and float outputs returned
    as fp32, which is what the runtime's numpy side holds."""
    declared = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
    return [out.astype(np.float32, copy=False) if out.dtype == np.float16 else out
            for out in session.run(None, as_declared(feeds, declared), options)]


def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), or a large number if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50
