"""What a TensorRT deployment of an artifact needs in memory on a Jetson, estimated from the
manifest before anything is copied to the device: engine weights, the KV cache and the largest
activations at the shape profiles' maximum, TensorRT's workspace and the runtime itself. Jetson
memory is shared by the CPU and the GPU, so everything counts against one total.

Assumptions (none of this has run on a Jetson yet): engines keep each weight at the artifact's
precision (the runtime builds with fp16 off), INT4 weights with fp32 scales possibly at fp32; after the first build ONNX Runtime keeps no host
copy of the weights the engine took, so that build peaks at about one more copy of them; the
portable decoder holds its past and its grown present cache at once."""

from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from moss_edge.runtime.audio import SAMPLE_RATE, clip_token_count
from moss_edge.runtime.graphs import CUDA_DECODER, ORT_DECODER, PREFILL_DECODER, Dims
from moss_edge.runtime.prompt import MARKER_EVERY_SECONDS
from moss_edge.runtime.session import TRT_WORKSPACE, ShapeLimits

GIB = 2**30
# total memory, and what JetPack (headless), the carve-outs and the CUDA / TensorRT libraries
# leave of it: JetPack 6 reports about 15.3 GiB on an Orin NX 16GB, the CUDA context with
# TensorRT's kernels takes about 1 GiB more
DEVICES = {"orin-nx-16gb": 15.3 * GIB, "agx-orin-64gb": 61.4 * GIB}
SYSTEM_RESERVE = 1.5 * GIB  # the OS, at least
RUNTIME_FIXED = 1.0 * GIB  # CUDA context, TensorRT and cuDNN kernels
TEXT_AND_ANSWER = 512  # positions for the question, chat template and answer beside the audio
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# the profiles for a Jetson: 10 minutes of audio in one context, the prompt prefilled 512
# positions at a time so that one piece's attention scores against the cache stay small
JETSON_AUDIO_SECONDS = 600


def context_for_audio(seconds: float, d: Dims) -> int:
    """Positions a prompt with `seconds` of audio takes: audio tokens, time markers (a two-digit
    second count every MARKER_EVERY_SECONDS, up to four digits), question and answer."""
    tokens = clip_token_count(int(seconds * SAMPLE_RATE), d.chunk_frames)
    markers = sum(len(str(s)) for s in range(MARKER_EVERY_SECONDS, int(seconds) + 1, MARKER_EVERY_SECONDS))
    return tokens + markers + TEXT_AND_ANSWER


def jetson_limits(d: Dims, seconds: float = JETSON_AUDIO_SECONDS) -> ShapeLimits:
    context = min(d.max_positions, -(-context_for_audio(seconds, d) // 256) * 256)
    return ShapeLimits(max_chunks=d.conv_chunksize, max_prompt=min(512, context), max_context=context)


@dataclass
class EnginePlan:
    limits: dict
    weights: dict  # graph -> bytes
    kv_cache: int
    activations: int  # the largest of the graphs' (they run one after another)
    workspace: int
    runtime: int
    total: int  # steady state: what the pipeline holds while answering
    first_build_peak: int  # total + the host copy of the weights while engines are built
    fits: dict  # device -> {"free_after": bytes, "fits": bool, "build_fits": bool}


def artifact_plan(root: Path, manifest: dict) -> EnginePlan:
    """The plan for an artifact on disk, at the Jetson profiles. INT4 weights with fp32 scales
    count at fp32 as well (an engine may hold them dequantized: backend_check's int4-fp32-activations)."""
    from moss_edge.export.backend_check import held_dequantized_bytes

    sizes = {g: sum((root / f).stat().st_size for f in e["files"])
             + held_dequantized_bytes(onnx.load(str(root / e["file"]), load_external_data=False))
             for g, e in manifest["graphs"].items()}
    return plan(manifest, sizes, jetson_limits(Dims.from_manifest(manifest["model"])))


def plan(manifest: dict, graph_bytes: dict[str, int], limits: ShapeLimits, workspace: int = TRT_WORKSPACE) -> EnginePlan:
    """The estimate for the graphs TensorRT runs (encoder, adapter, portable decoder); graph_bytes
    are each graph's files on disk."""
    d = Dims.from_manifest(manifest["model"])
    lang, audio = manifest["config"]["language_config"], manifest["config"]["audio_config"]
    cache_type = next(i["dtype"] for i in manifest["graphs"]["decoder"]["inputs"] if i["name"] == "past_key_0")
    act = DTYPE_BYTES[next(i["dtype"] for i in manifest["graphs"]["decoder"]["inputs"] if i["name"] == "audio_embeds")]
    # the ONNX Runtime graphs (CPU, CUDA) are not TensorRT's
    weights = {g: b for g, b in graph_bytes.items() if g not in (ORT_DECODER, PREFILL_DECODER, CUDA_DECODER)}
    per_position = 2 * d.num_hidden_layers * d.num_key_value_heads * d.head_dim * DTYPE_BYTES[cache_type]
    kv = 2 * per_position * limits.max_context  # past in, present (past + piece) out
    piece = limits.max_prompt
    decoder_act = act * (2 * lang["num_attention_heads"] * piece * limits.max_context  # scores, probabilities
                         + 3 * piece * lang["intermediate_size"] + 8 * piece * d.hidden_size)
    encoder_tokens = limits.max_chunks * d.chunk_frames
    encoder_act = act * (4 * encoder_tokens * audio["downsample_hidden_size"] // 2
                         + 3 * encoder_tokens // 8 * audio["encoder_ffn_dim"])
    activations = max(decoder_act, encoder_act)
    total = sum(weights.values()) + kv + activations + workspace + RUNTIME_FIXED
    build = total + sum(weights.values())
    fits = {name: {"free_after": int(size - SYSTEM_RESERVE - total), "fits": size - SYSTEM_RESERVE >= total,
                   "build_fits": size - SYSTEM_RESERVE >= build} for name, size in DEVICES.items()}
    return EnginePlan(asdict(limits), weights, kv, activations, workspace, int(RUNTIME_FIXED), int(total), int(build),
                      fits)


def plan_lines(p: EnginePlan) -> list[str]:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    lines = [f"TensorRT engine plan at max_context {p.limits['max_context']}, prefill pieces of {p.limits['max_prompt']}:",
             "  weights " + ", ".join(f"{k} {g(v)}" for k, v in p.weights.items())
             + f"; KV cache {g(p.kv_cache)}; activations {g(p.activations)}; workspace {g(p.workspace)}; "
               f"runtime {g(p.runtime)}",
             f"  total {g(p.total)} (first engine build about {g(p.first_build_peak)})"]
    for device, f in p.fits.items():
        verdict = "fits" if f["fits"] else "does NOT fit"
        build = "" if f["build_fits"] or not f["fits"] else "; build the engines once with swap on, or on a larger Orin"
        lines.append(f"  {device}: {verdict} ({g(abs(f['free_after']))} {'left' if f['fits'] else 'short'}){build}")
    return lines
