"""The contract of the graphs: their sizes, and per graph its inputs and outputs.

Export names and dynamic axes, TensorRT shape profiles, the decoder's feeds (runtime and
calibration) and the load-time check of an artifact against its manifest all read it here.

encoder   mel [chunks, mels, frames], frames [chunks] -> audio_tokens [chunks, tokens, D],
          taps [n_taps, chunks, tokens, D]  (rows past a chunk's valid tokens are padding)
adapter   audio_tokens [n, D], taps [n_taps, n, D] -> audio_embeds [n, H], deepstack_embeds [K, n, H]
decoder   input_ids, position_ids [batch, seq], audio_embeds [batch, seq, H],
          deepstack_embeds [K, batch, seq, H], past_key_i / past_value_i [batch, kv, past, hd]
          -> logits [batch, vocab] (last position), present_key_i / present_value_i [batch, kv, past + seq, hd]
decoder_ort  the same model for ONNX Runtime's CPU provider (export/ort_decoder.py): batch 1, no
          position_ids; the cache inputs are buffers of `capacity` positions that the outputs
          alias (fp32, or int8 with per-channel scales: quantize/kv_cache.py), seqlens_k [1] and
          total_sequence_length [] say how much of them is valid
decoder_prefill  decoder_ort's inputs and outputs: the prompt path on the CPU's integer GEMM (INT8
          weights, activations quantized per row); quantize writes it when the recipe asks for it,
          and the runtime runs prompts through it and tokens through decoder_ort, on the same
          cache buffers
decoder_cuda  decoder_ort's inputs and outputs in fp16 (the logits fp32), for ONNX Runtime CUDA:
          written with an fp16 decoder (quantize/half.py)
"""

from dataclasses import dataclass, fields

import numpy as np

from moss_edge.runtime.audio import N_MELS
from moss_edge.runtime.errors import MossEdgeError

GRAPHS = ("encoder", "adapter", "decoder")
# The decoder built from ONNX Runtime's contrib ops (export/ort_decoder.py), beside the portable
# one; the manifest's "decoders" says which provider runs it.
ORT_DECODER = "decoder_ort"
PREFILL_DECODER = "decoder_prefill"
# decoder_ort's twin for ONNX Runtime's CUDA provider: fp16, INT4 weights run by MatMulNBits
CUDA_DECODER = "decoder_cuda"


@dataclass(frozen=True)
class Dims:
    """The sizes the graphs are built with; the manifest's "model" entry, key for key."""

    hidden_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_deepstack: int
    num_taps: int
    chunk_frames: int
    conv_chunksize: int
    audio_dim: int
    max_positions: int

    @classmethod
    def from_manifest(cls, model: dict) -> "Dims":
        missing = [f.name for f in fields(cls) if f.name not in model]
        if missing:
            raise MossEdgeError(f"the manifest's model sizes lack {', '.join(missing)}; export the artifact again")
        return cls(**{f.name: int(model[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int | str, ...]  # a str is a dynamic axis, named alike wherever it must agree
    dtype: str = "float32"


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


def cache_names(d: Dims, prefix: str) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (prefix "past" or "present")."""
    return [f"{prefix}_{kind}_{i}" for i in range(d.num_hidden_layers) for kind in ("key", "value")]


def graph_spec(name: str, d: Dims) -> GraphSpec:
    if name == "encoder":
        return GraphSpec(
            (Tensor("mel", ("chunks", N_MELS, "frames")), Tensor("frames", ("chunks",), "int64")),
            (Tensor("audio_tokens", ("chunks", "chunk_tokens", d.audio_dim)),
             Tensor("taps", (d.num_taps, "chunks", "chunk_tokens", d.audio_dim))))
    if name == "adapter":
        return GraphSpec(
            (Tensor("audio_tokens", ("tokens", d.audio_dim)), Tensor("taps", (d.num_taps, "tokens", d.audio_dim))),
            (Tensor("audio_embeds", ("tokens", d.hidden_size)),
             Tensor("deepstack_embeds", (d.num_deepstack, "tokens", d.hidden_size))))
    if name == "decoder":
        cache = ("batch", d.num_key_value_heads, "past", d.head_dim)
        grown = ("batch", d.num_key_value_heads, "past_and_seq", d.head_dim)
        return GraphSpec(
            (Tensor("input_ids", ("batch", "seq"), "int64"), Tensor("position_ids", ("batch", "seq"), "int64"),
             Tensor("audio_embeds", ("batch", "seq", d.hidden_size)),
             Tensor("deepstack_embeds", (d.num_deepstack, "batch", "seq", d.hidden_size)),
             *[Tensor(n, cache) for n in cache_names(d, "past")]),
            (Tensor("logits", ("batch", d.vocab_size)), *[Tensor(n, grown) for n in cache_names(d, "present")]))
    if name in (ORT_DECODER, PREFILL_DECODER, CUDA_DECODER):  # the KV cache is a buffer of `capacity` positions, valid up to the cached length
        buffer = (1, d.num_key_value_heads, "capacity", d.head_dim)
        return GraphSpec(
            (Tensor("input_ids", (1, "seq"), "int64"), Tensor("audio_embeds", (1, "seq", d.hidden_size)),
             Tensor("deepstack_embeds", (d.num_deepstack, 1, "seq", d.hidden_size)),
             *[Tensor(n, buffer) for n in cache_names(d, "past")],
             Tensor("seqlens_k", (1,), "int32"), Tensor("total_sequence_length", (), "int32")),
            (Tensor("logits", (1, d.vocab_size)), *[Tensor(n, buffer) for n in cache_names(d, "present")]))
    raise MossEdgeError(f"unknown graph {name!r}; the graphs are {', '.join((*GRAPHS, ORT_DECODER, PREFILL_DECODER, CUDA_DECODER))}")


def concrete_shapes(tensors: tuple[Tensor, ...], sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape with its dynamic axes set from sizes (e.g. one TensorRT profile)."""
    return {t.name: tuple(sizes[a] if isinstance(a, str) else a for a in t.shape) for t in tensors}


def mismatches(spec: GraphSpec, session_inputs: dict[str, list]) -> list[str]:
    """How a loaded graph's inputs (name -> shape as ONNX Runtime reports it) differ from the spec."""
    problems = [f"no input {t.name!r}" for t in spec.inputs if t.name not in session_inputs]
    for t in spec.inputs:
        shape = session_inputs.get(t.name)
        if shape is None:
            continue
        if len(shape) != len(t.shape):
            problems.append(f"{t.name} has {len(shape)} dims, not {len(t.shape)}")
            continue
        problems += [f"{t.name} dim {axis} is {got}, the manifest says {want}"
                     for axis, (got, want) in enumerate(zip(shape, t.shape))
                     if isinstance(want, int) and isinstance(got, int) and got != want]
    extra = sorted(set(session_inputs) - {t.name for t in spec.inputs})
    if extra:
        problems.append(f"inputs {', '.join(extra[:3])} that the manifest's sizes do not have")
    return problems


def empty_cache(d: Dims, dtype=np.float32) -> np.ndarray:
    """A KV cache entry holding no positions yet."""
    return np.zeros((1, d.num_key_value_heads, 0, d.head_dim), dtype)


def buffered_decoder_feeds(ids: np.ndarray, start: int, audio: np.ndarray, deepstack: np.ndarray) -> dict:
    """The ORT decoder's inputs besides its cache buffers, for `ids` [1, s] after `start` cached positions."""
    total = start + ids.shape[1]
    return {"input_ids": ids, "audio_embeds": audio, "deepstack_embeds": deepstack,
            "seqlens_k": np.array([total - 1], np.int32), "total_sequence_length": np.array(total, np.int32)}


def decoder_feeds(d: Dims, ids: np.ndarray, start: int, audio: np.ndarray, deepstack: np.ndarray,
                  past: list) -> dict:
    """The decoder's inputs for `ids` [1, s] placed after `start` cached positions; audio
    [1, s, H] and deepstack [K, 1, s, H] are zero off the audio positions; past holds one
    value per cache input (arrays or ONNX Runtime values)."""
    positions = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]
    return {"input_ids": ids, "position_ids": positions, "audio_embeds": audio, "deepstack_embeds": deepstack,
            **dict(zip(cache_names(d, "past"), past, strict=True))}
