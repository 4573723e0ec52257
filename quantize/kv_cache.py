"""An 8-bit KV cache for the CPU decoders (decoder_ort and its prompt graph decoder_prefill).

Every generated token reads the whole cache: at 4B widths and 10 minutes of audio (8,365
positions) an fp32 cache is 2.5 GB, more bytes than the INT4 weights. ONNX Runtime's CPU
GroupQueryAttention (1.27 and later) keeps the cache in int8 with fixed per-channel scales
([1, kv_heads, 1, head_dim], inputs 12 and 13 of the node): it quantizes each new key and value
as round(x / scale) and dequantizes inside the attention. At 8,192 cached positions one layer's
step took 6.6 ms against 17.2 ms in fp32 and 27.6 ms with an fp16 cache (one thread, AMX CPU).

The scales are fixed, so they are calibrated: the calibration set is prefilled through the
decoder as written (its own weights, fp32 cache), and each channel's scale covers HEADROOM times
the largest value it held: other audio reaches past the calibration set's range, and a clipped
value costs more than a coarser step. On the packaged model (a held-out clip and a short one, 25
teacher-forced positions each), mean KL to the fp32 cache was 1.1e-3 with the range as
calibrated, 2.6e-4 at 1.25 times it, 2.1e-4 at 1.5, 1.5e-4 at 2 and 1.5e-3 at 3.

Keys are cached after the rotary embedding, which turns each pair of channels (i, i + head_dim/2)
by a position's angle: a channel's key can reach the pair's length at some position, so keys are
scaled by the largest pair length, the same for both channels of a pair.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from moss_edge.calibration.dataset import CalibrationSample
from moss_edge.runtime.audio import chunk_mels, log_mel
from moss_edge.runtime.decoders import BufferedDecoderRunner
from moss_edge.runtime.generation import place_audio
from moss_edge.runtime.graphs import ORT_DECODER, Dims, cache_names
from moss_edge.runtime.pipeline import encode_chunks
from moss_edge.runtime.prompt import TextTokenizer, TokenIds, prompt_ids
from moss_edge.runtime.session import make_session, run_typed

# the onnxruntime release whose CPU GroupQueryAttention first runs an int8 cache (1.26 has the
# attributes but fails at run time)
MIN_ONNXRUNTIME = "1.27"
LEVELS = 127  # symmetric: round(x / scale) in [-127, 127] for every calibrated value
HEADROOM = 2.0
FORMAT = {"dtype": "int8", "scales": f"per channel [1, kv_heads, 1, head_dim], fixed: {HEADROOM} x the calibrated range",
          "keys": "scaled by each rotary pair's largest length", "onnxruntime": f">={MIN_ONNXRUNTIME}"}


def cache_ranges(folder: Path, dims: Dims, ids: TokenIds, tokenizer: TextTokenizer | None,
                 samples: list[CalibrationSample]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, KV head and channel, the largest |value| the fp32-cache decoder_ort in `folder`
    caches over the samples' prompts (keys: the rotary pair's length): two [layers, kv, head_dim]
    arrays. The audio goes through the folder's encoder and adapter, as written."""
    encoder, adapter = make_session(folder / "encoder.onnx"), make_session(folder / "adapter.onnx")
    runner = BufferedDecoderRunner(make_session(folder / f"{ORT_DECODER}.onnx"), dims)
    shape = (dims.num_hidden_layers, dims.num_key_value_heads, dims.head_dim)
    keys, values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    half = dims.head_dim // 2
    for sample in samples:
        batch = chunk_mels([log_mel(sample.waveform())], dims.chunk_frames)
        features = encode_chunks(batch, lambda feeds, last: run_typed(encoder, feeds),
                                 lambda feeds: run_typed(adapter, feeds), 1)
        prompt = sample.prompt if tokenizer else [ids.audio_start, ids.audio_end]
        prompt = prompt_ids(prompt, features.clip_tokens, tokenizer, ids, dims.vocab_size)
        marked = np.array(prompt)
        runner.prefill(prompt, place_audio(marked, ids.audio_token, features.embeds),
                       place_audio(marked, ids.audio_token, features.deepstack))
        for layer in range(dims.num_hidden_layers):
            k = runner.buffers[2 * layer].numpy()[0, :, : runner.length]  # [kv, positions, head_dim]
            v = runner.buffers[2 * layer + 1].numpy()[0, :, : runner.length]
            pair = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).max(axis=1)
            keys[layer] = np.maximum(keys[layer], np.concatenate([pair, pair], axis=-1))
            values[layer] = np.maximum(values[layer], np.abs(v).max(axis=1))
    return keys, values


def int8_cache(model: onnx.ModelProto, dims: Dims, keys: np.ndarray, values: np.ndarray, prompt_graph: bool) -> None:
    """Make the cache of a decoder_ort-form graph (in place) int8, with per-channel scales from
    the ranges `keys` and `values` [layers, kv, head_dim]: the token graph's attention reads and
    writes the int8 cache itself; the prompt graph's (prompt_graph=True) attends in fp32 on it
    (_attention_in_steps)."""
    graph = model.graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if len(attention) != dims.num_hidden_layers:
        raise ValueError(f"{graph.name}: {len(attention)} GroupQueryAttention nodes for {dims.num_hidden_layers} layers")
    nodes, layer = _piece_positions(graph, dims) if prompt_graph else [], -1
    written = None  # the rows the previous layer wrote
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        layer += 1
        key_step, value_step = _step(keys[layer]), _step(values[layer])
        if prompt_graph:
            added, written = _attention_in_steps(graph, node, layer, key_step, value_step, written)
            nodes += added
        else:
            nodes.append(_attention_in_int8(graph, node, layer, key_step, value_step))
    del graph.node[:]
    graph.node.extend(nodes)
    cache = set(cache_names(dims, "past") + cache_names(dims, "present"))
    for info in [*graph.input, *graph.output]:
        if info.name in cache:
            info.type.tensor_type.elem_type = TensorProto.INT8


def _step(ranges: np.ndarray) -> np.ndarray:
    """The quantization step (scale) of each channel: LEVELS steps cover HEADROOM times its range
    (a channel that never held a value still needs a step)."""
    return np.maximum(HEADROOM * ranges / LEVELS, np.finfo(np.float32).tiny).astype(np.float32)


def _attention_in_int8(graph: onnx.GraphProto, node: onnx.NodeProto, layer: int, key_step: np.ndarray,
                       value_step: np.ndarray) -> onnx.NodeProto:
    """The token graph's attention: ONNX Runtime quantizes each new key and value as
    round(x / step) and dequantizes inside the attention (steps as inputs 12 and 13, [1, kv, 1,
    head_dim])."""
    names = []
    for kind, step in (("key", key_step), ("value", value_step)):
        names.append(f"kv_cache_{kind}_scale_{layer}")
        graph.initializer.append(numpy_helper.from_array(step[None, :, None, :], names[-1]))
    del node.input[9:]
    node.input.extend(["", "", "", *names])  # position_ids, attention_bias, head_sink unused
    node.attribute.extend([onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                           onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                           onnx.helper.make_attribute("kv_cache_bit_width", 8)])
    return node


def _attention_in_steps(graph: onnx.GraphProto, node: onnx.NodeProto, layer: int, key_step: np.ndarray,
                        value_step: np.ndarray, previous: str | None) -> tuple[list[onnx.NodeProto], str]:
    """The prompt graph's attention over the int8 cache, in fp32, in units of each channel's step:
    its nodes, and the name of the piece's rows it writes (int8 [2, kv, piece, head_dim]).

    ONNX Runtime's int8 attention computes one query position at a time, which a prompt cannot
    afford (4B widths, 8,192 cached positions, one thread: 5.5 ms per position against 1.2 ms in
    fp32; a 10 min prompt 430 s instead of 131 s at full depth). So the buffer's window (the
    cached positions and the piece's room) is cast to fp32 as it is: counts of steps. Queries
    multiplied by the key steps score against those as against the dequantized keys (a rotary
    pair's two channels share a step, so the rotation commutes with it); the piece's new keys
    and values are divided by their steps to join the cache in its units, and the output is
    multiplied by the value steps. No Mul over the window, and the window has the present's
    shape, so ONNX Runtime may give the attention that copy as its present to write the piece
    into in place: 4 layers, 256 positions after 8,192, the attention took 671 ms against 727 ms
    on a window of the cached positions alone (636 ms on an fp32 cache). The piece's rows are
    then rounded to int8 together and scattered into the buffer, which the runner binds as both
    input and output.

    The window is measured from the rows the previous layer wrote (`previous`): ONNX Runtime
    orders nodes by their inputs, and without that it cast every layer's window before the first
    attention and rounded every piece after the last, holding all those fp32 copies at once (10
    min of audio at 4B widths: 63 MB more per layer)."""
    heads = next(a.i for a in node.attribute if a.name == "num_heads")
    group = heads // key_step.shape[0]  # query heads per KV head, adjacent
    name = f"kv_cache_{layer}"
    constants = {f"{name}_query_scale": np.repeat(key_step, group, axis=0), f"{name}_key_step": key_step,
                 f"{name}_value_step": value_step, f"{name}_output_scale": np.repeat(value_step, group, axis=0)}
    graph.initializer.extend(numpy_helper.from_array(c.reshape(-1), n) for n, c in constants.items())
    query, key, value = node.input[:3]
    (past_key, past_value), (present_key, present_value) = node.input[3:5], node.output[1:3]
    window_end = "kv_cache_total"
    nodes = []
    if previous is not None:
        window_end = f"{name}_window_end"
        nodes += [_node("Shape", [previous], f"{name}_previous_shape"),
                  _node("Gather", [f"{name}_previous_shape", "kv_cache_axis"], f"{name}_previous_rows"),
                  _node("Add", ["kv_cache_cached", f"{name}_previous_rows"], window_end)]
    nodes += [_node("Mul", [query, f"{name}_query_scale"], f"{name}_query"),
              _node("Div", [key, f"{name}_key_step"], f"{name}_key"),
              _node("Div", [value, f"{name}_value_step"], f"{name}_value")]
    for past in (past_key, past_value):
        nodes += [_node("Slice", [past, "kv_cache_zero", window_end, "kv_cache_axis"], f"{past}_window"),
                  _node("Cast", [f"{past}_window"], f"{past}_steps", to=TensorProto.FLOAT)]
    output = node.output[0]
    node.input[:5] = [f"{name}_query", f"{name}_key", f"{name}_value", f"{past_key}_steps", f"{past_value}_steps"]
    node.output[:3] = [f"{name}_attention", f"{present_key}_steps", f"{present_value}_steps"]
    rows = [f"{present}_new" for present in (present_key, present_value)]
    after = [_node("Mul", [f"{name}_attention", f"{name}_output_scale"], output),
             *(_node("Slice", [f"{present}_steps", "kv_cache_cached", "kv_cache_total", "kv_cache_axis"], row)
               for present, row in zip((present_key, present_value), rows)),
             _node("Concat", rows, f"{name}_new_rows", axis=0),
             _node("QuantizeLinear", [f"{name}_new_rows", "kv_cache_unit_scale", "kv_cache_zero_point"], f"{name}_new_int8"),
             onnx.helper.make_node("Split", [f"{name}_new_int8", "kv_cache_pair"],
                                   [f"{present_key}_int8", f"{present_value}_int8"], name=f"{name}_split", axis=0),
             *(_node("ScatterND", [past, "kv_cache_piece_where", f"{present}_int8"], present)
               for past, present in ((past_key, present_key), (past_value, present_value)))]
    return [*nodes, node, *after], f"{name}_new_int8"


def _node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return onnx.helper.make_node(op, inputs, [output], name=output, **attrs)


def _piece_positions(graph: onnx.GraphProto, dims: Dims) -> list[onnx.NodeProto]:
    """The nodes, and their constants, that every layer of the prompt graph shares: the number of
    cached positions before the piece and after it ([1] each) and where the piece's rows go in a
    buffer (ScatterND's [1, kv_heads, piece, 3] indices: batch, head, position; a row of
    head_dim values each, copied whole), from input_ids [1, piece] and total_sequence_length []."""
    graph.initializer.extend([numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in (
        ("kv_cache_unit_scale", 1, np.float32), ("kv_cache_zero_point", 0, np.int8), ("kv_cache_zero", [0], np.int64),
        ("kv_cache_axis", [2], np.int64), ("kv_cache_one", [1], np.int64), ("kv_cache_step", 1, np.int64),
        ("kv_cache_column", [1, 1, -1, 1], np.int64), ("kv_cache_pair", [1, 1], np.int64),
        ("kv_cache_heads", [1, dims.num_key_value_heads], np.int64),
        ("kv_cache_head_index", np.arange(dims.num_key_value_heads).reshape(1, -1, 1, 1), np.int64),
        ("kv_cache_batch_index", np.zeros((1, 1, 1, 1)), np.int64))])
    return [_node("Shape", ["input_ids"], "kv_cache_ids_shape"),
            _node("Gather", ["kv_cache_ids_shape", "kv_cache_one"], "kv_cache_piece"),
            _node("Cast", ["total_sequence_length"], "kv_cache_total_scalar", to=TensorProto.INT64),
            _node("Reshape", ["kv_cache_total_scalar", "kv_cache_one"], "kv_cache_total"),
            _node("Sub", ["kv_cache_total", "kv_cache_piece"], "kv_cache_cached"),
            _node("Squeeze", ["kv_cache_cached"], "kv_cache_cached_scalar"),
            _node("Range", ["kv_cache_cached_scalar", "kv_cache_total_scalar", "kv_cache_step"], "kv_cache_range"),
            _node("Reshape", ["kv_cache_range", "kv_cache_column"], "kv_cache_piece_positions"),
            _node("Concat", ["kv_cache_heads", "kv_cache_piece", "kv_cache_one"], "kv_cache_piece_shape", axis=0),
            *(_node("Expand", [index, "kv_cache_piece_shape"], f"{index}_expanded")
              for index in ("kv_cache_batch_index", "kv_cache_head_index", "kv_cache_piece_positions")),
            _node("Concat", ["kv_cache_batch_index_expanded", "kv_cache_head_index_expanded",
                             "kv_cache_piece_positions_expanded"], "kv_cache_piece_where", axis=3)]
