"""The decoder loops' state: a decoder graph run on ONNX Runtime with its KV cache kept as
ONNX Runtime values between calls (IO binding), so the cache never round-trips through numpy.

DecoderRunner runs the portable decoder (past in, grown present out); BufferedDecoderRunner
runs the contrib-op decoder, whose cache is written in place. Both: prefill(ids, audio rows,
DeepStack rows) then step(token), each returning the last position's logits.
"""

import numpy as np
import onnxruntime as ort

from moss_edge.runtime.graphs import ORT_DECODER, Dims, buffered_decoder_feeds, cache_names, decoder_feeds, empty_cache
from moss_edge.runtime.session import shrinking_arena


class DecoderRunner:
    """Runs decoder.onnx with its KV cache kept as ONNX Runtime values between steps
    (IO binding), so the cache never round-trips through numpy."""

    def __init__(self, session, dims: Dims):
        self.session = session
        self.dims = dims
        self.output_names = [o.name for o in session.get_outputs()]
        types = {i.name: i.type for i in session.get_inputs()}
        self.cache_dtype = np.float16 if "float16" in types[cache_names(dims, "past")[0]] else np.float32
        self.embed_dtype = np.float16 if "float16" in types["audio_embeds"] else np.float32
        self.past = None
        self.length = 0
        self.step_audio = np.zeros((1, 1, dims.hidden_size), self.embed_dtype)
        self.step_deepstack = np.zeros((dims.num_deepstack, 1, 1, dims.hidden_size), self.embed_dtype)

    def _run(self, ids: np.ndarray, audio: np.ndarray, deepstack: np.ndarray, past: list,
             options: ort.RunOptions | None = None) -> np.ndarray:
        binding = self.session.io_binding()
        for name, value in decoder_feeds(self.dims, ids, self.length, audio, deepstack, past).items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, options)
        outputs = binding.get_outputs()
        self.past = outputs[1:]
        self.length += ids.shape[1]
        return outputs[0].numpy()[0]

    def prefill(self, prompt_ids: list[int], audio: np.ndarray, deepstack: np.ndarray) -> np.ndarray:
        self.length = 0
        empty = [empty_cache(self.dims, self.cache_dtype)] * (2 * self.dims.num_hidden_layers)
        return self._run(np.array([prompt_ids], np.int64), audio[None].astype(self.embed_dtype),
                         deepstack[:, None].astype(self.embed_dtype), empty, shrinking_arena())

    def step(self, token: int) -> np.ndarray:
        return self._run(np.array([[token]], np.int64), self.step_audio, self.step_deepstack, self.past)


class BufferedDecoderRunner:
    """Runs decoder_ort.onnx: each layer's KV cache is one buffer, bound as both past and present,
    that GroupQueryAttention writes in place: nothing is copied per step. The buffers hold the
    prompt and HEADROOM more positions, and double (up to the model's limit) when full."""

    HEADROOM = 256

    def __init__(self, session, dims: Dims):
        self.session = session
        self.dims = dims
        self.buffers: list[ort.OrtValue] = []
        self.length = 0
        self.step_audio = np.zeros((1, 1, dims.hidden_size), np.float32)
        self.step_deepstack = np.zeros((dims.num_deepstack, 1, 1, dims.hidden_size), np.float32)

    def _reserve(self, needed: int) -> None:
        capacity = self.buffers[0].shape()[2] if self.buffers else 0
        if needed <= capacity:
            return
        capacity = min(self.dims.max_positions, max(needed + self.HEADROOM, 2 * capacity))
        shape = (1, self.dims.num_key_value_heads, capacity, self.dims.head_dim)
        grown = []
        for old in self.buffers or [None] * (2 * self.dims.num_hidden_layers):
            values = np.zeros(shape, np.float32)
            if old is not None and self.length:
                values[:, :, : self.length] = old.numpy()[:, :, : self.length]
            grown.append(ort.OrtValue.ortvalue_from_numpy(values))
        self.buffers = grown

    def _run(self, ids: np.ndarray, audio: np.ndarray, deepstack: np.ndarray,
             options: ort.RunOptions | None = None) -> np.ndarray:
        self._reserve(self.length + ids.shape[1])
        binding = self.session.io_binding()
        for name, value in buffered_decoder_feeds(ids, self.length, audio, deepstack).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu")
        for past, present, buffer in zip(cache_names(self.dims, "past"), cache_names(self.dims, "present"), self.buffers):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        self.session.run_with_iobinding(binding, options)
        self.length += ids.shape[1]
        return binding.get_outputs()[0].numpy()[0]

    def prefill(self, prompt_ids: list[int], audio: np.ndarray, deepstack: np.ndarray) -> np.ndarray:
        self.length = 0
        return self._run(np.array([prompt_ids], np.int64), audio[None].astype(np.float32),
                         deepstack[:, None].astype(np.float32), shrinking_arena())

    def step(self, token: int) -> np.ndarray:
        return self._run(np.array([[token]], np.int64), self.step_audio, self.step_deepstack)


def decoder_runner(graph: str, session, dims: Dims):
    """The runner for a decoder graph: in-place cache buffers for decoder_ort, past/present otherwise."""
    return (BufferedDecoderRunner if graph == ORT_DECODER else DecoderRunner)(session, dims)
