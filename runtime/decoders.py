"""The decoder loops' state: a decoder graph run on ONNX Runtime with its KV cache kept as
ONNX Runtime values between calls (IO binding), so the cache never round-trips through numpy.

DecoderRunner runs the portable decoder (past in, grown present out); BufferedDecoderRunner
runs the contrib-op decoder, whose cache is written in place, and, given the prompt graph
(decoder_prefill), runs prompts through it on the same buffers. Both:
prefill(ids, audio rows, DeepStack rows) then step(token), each returning the last position's
logits. A prompt longer than `prefill_chunk` is prefilled in pieces: the attention scores of one
piece against the cache, not of the whole prompt against itself, bound the memory (and
TensorRT's profiles).
"""

from functools import partial

import numpy as np
import onnxruntime as ort

from moss_edge.runtime.graphs import CUDA_DECODER, ORT_DECODER, Dims, buffered_decoder_feeds, cache_names, decoder_feeds, empty_cache
from moss_edge.runtime.session import ShapeLimits, shrinking_arena

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def output_devices(session) -> dict[str, str]:
    """Where the decoder's outputs are bound: the logits on the host (sampling reads them), the
    present KV cache where the session runs, so on a GPU it never crosses to the host between
    steps (it is bound again as the next step's past)."""
    cache = "cuda" if session.get_providers()[0] in GPU_PROVIDERS else "cpu"
    return {o.name: "cpu" if o.name == "logits" else cache for o in session.get_outputs()}


def prefill_pieces(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `chunk` prompt positions covering n."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


class _Runner:
    """What both runners share: the prompt run in pieces after the cached positions, and one
    token per step. Each runner has _run(ids, audio, deepstack, options) and truncate(length)."""

    def __init__(self, session, dims: Dims, prefill_chunk: int):
        self.session = session
        self.dims = dims
        self.prefill_chunk = prefill_chunk
        # the types the graph declares: an fp16 graph takes fp16 activations and cache; an fp32
        # one may keep its cache alone in fp16, or (decoder_ort) in int8
        types = {i.name: i.type for i in session.get_inputs()}
        self.embed_dtype = ORT_TYPES[types["audio_embeds"]]
        self.cache_dtype = ORT_TYPES[types[cache_names(dims, "past")[0]]]
        self.length = 0
        self.step_audio = np.zeros((1, 1, dims.hidden_size), self.embed_dtype)
        self.step_deepstack = np.zeros((dims.num_deepstack, 1, 1, dims.hidden_size), self.embed_dtype)

    def prefill(self, prompt_ids: list[int], audio: np.ndarray, deepstack: np.ndarray) -> np.ndarray:
        self.truncate(0)
        return self.extend(prompt_ids, audio, deepstack)

    def extend(self, ids: list[int], audio: np.ndarray, deepstack: np.ndarray, last: bool = True) -> np.ndarray:
        """Run `ids` (audio [s, H], DeepStack [K, s, H] rows) after the cached positions, in
        pieces of at most prefill_chunk; the last position's logits. last=False keeps ONNX
        Runtime's arena for a run that follows soon (a stream's next chunk): a cold arena costs
        that run its page faults again."""
        return self._in_pieces(ids, audio, deepstack, last, self.prefill_chunk, self._run)

    def _in_pieces(self, ids: list[int], audio: np.ndarray, deepstack: np.ndarray, last: bool, piece: int, run) -> np.ndarray:
        """run(ids, audio, deepstack, options) over pieces of at most `piece` positions."""
        ids, audio, deepstack = np.array([ids], np.int64), audio.astype(self.embed_dtype), deepstack.astype(self.embed_dtype)
        pieces = prefill_pieces(ids.shape[1], piece)
        for start, end in pieces:
            logits = run(ids[:, start:end], audio[None, start:end], deepstack[:, None, start:end],
                         shrinking_arena() if last and end == pieces[-1][1] else None)
        return logits

    def step(self, token: int) -> np.ndarray:
        return self._run(np.array([[token]], np.int64), self.step_audio, self.step_deepstack)


class DecoderRunner(_Runner):
    """Runs decoder.onnx with its KV cache kept as ONNX Runtime values between steps
    (IO binding), so the cache never round-trips through numpy."""

    def __init__(self, session, dims: Dims, prefill_chunk: int = ShapeLimits.max_prompt):
        super().__init__(session, dims, prefill_chunk)
        self.devices = output_devices(session)
        self.past = None

    def _run(self, ids: np.ndarray, audio: np.ndarray, deepstack: np.ndarray,
             options: ort.RunOptions | None = None) -> np.ndarray:
        binding = self.session.io_binding()
        for name, value in decoder_feeds(self.dims, ids, self.length, audio, deepstack, self.past).items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name, device in self.devices.items():
            binding.bind_output(name, device)
        self.session.run_with_iobinding(binding, options)
        outputs = binding.get_outputs()
        self.past = outputs[1:]
        self.length += ids.shape[1]
        return outputs[0].numpy()[0]

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions (0: an empty cache)."""
        if length == 0:
            self.past = [empty_cache(self.dims, self.cache_dtype)] * (2 * self.dims.num_hidden_layers)
        elif length < self.length:
            self.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(p.numpy()[:, :, :length]))
                         for p in self.past]
        self.length = min(length, self.length)


class BufferedDecoderRunner(_Runner):
    """Runs decoder_ort.onnx: each layer's KV cache is one buffer, bound as both past and present,
    that GroupQueryAttention writes in place: nothing is copied per step. The buffers hold the
    prompt and HEADROOM more positions, and double (up to the model's limit) when full.

    prompt_session (decoder_prefill.onnx: the same inputs and outputs) runs every run of at least
    MIN_PROMPT_POSITIONS positions, in pieces of PROMPT_PIECE (INT8_CACHE_PROMPT_PIECE for an int8
    cache), on the same buffers; decoder_ort runs shorter ones and every token."""

    HEADROOM = 256
    # Below this many positions the INT4 token graph is as fast: a few rows are memory-bound, and
    # its weights are half the bytes. At 4B widths, 4 layers, 2 threads, AMX, INT4 against INT8:
    # 2 positions 31 against 33 ms, 4 positions 35 against 34, 8 positions 42 against 36.
    MIN_PROMPT_POSITIONS = 8
    # Positions per prompt-graph run. Each piece attends to the cache before it and to itself,
    # so smaller pieces skip more of the causal mask's zeros, down to where the GEMMs lose
    # efficiency: at 4B widths, 2 threads, AMX, 4 layers, 2000 positions took 1.64 s in pieces of
    # 256, 1.74 s of 512 and 1.90 s of 2048; 419 positions 0.32 s in pieces of 256, 0.35 s whole.
    PROMPT_PIECE = 256
    # An int8 cache's prompt graph casts each layer's cached positions to fp32 once per piece, so
    # fewer, longer pieces pay: 10 min of audio (4B widths, 4 layers, 2 threads, AMX) took 17.8 s
    # in pieces of 256, 16.0 s of 512 and 15.9 s of 1024; 512 peaked 100 MB above 256.
    INT8_CACHE_PROMPT_PIECE = 512

    def __init__(self, session, dims: Dims, prefill_chunk: int = ShapeLimits.max_prompt, prompt_session=None):
        super().__init__(session, dims, prefill_chunk)
        self.prompt_session = prompt_session
        self.buffers: list[ort.OrtValue] = []
        # the cache lives where the session runs (decoder_cuda's on the GPU, in fp16)
        self.device = "cuda" if session.get_providers()[0] in GPU_PROVIDERS else "cpu"

    def _reserve(self, needed: int) -> None:
        capacity = self.buffers[0].shape()[2] if self.buffers else 0
        if needed <= capacity:
            return
        capacity = min(self.dims.max_positions, max(needed + self.HEADROOM, 2 * capacity))
        shape = (1, self.dims.num_key_value_heads, capacity, self.dims.head_dim)
        grown = []
        for old in self.buffers or [None] * (2 * self.dims.num_hidden_layers):
            values = np.zeros(shape, self.cache_dtype)
            if old is not None and self.length:
                values[:, :, : self.length] = old.numpy()[:, :, : self.length]
            grown.append(ort.OrtValue.ortvalue_from_numpy(values, self.device))
        self.buffers = grown

    def _run(self, ids: np.ndarray, audio: np.ndarray, deepstack: np.ndarray,
             options: ort.RunOptions | None = None, session=None) -> np.ndarray:
        """One run of `session` (the token graph when None) after the cached positions."""
        self._reserve(self.length + ids.shape[1])
        session = session or self.session
        binding = session.io_binding()
        for name, value in buffered_decoder_feeds(ids, self.length, audio, deepstack).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu")
        for past, present, buffer in zip(cache_names(self.dims, "past"), cache_names(self.dims, "present"), self.buffers):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        session.run_with_iobinding(binding, options)
        self.length += ids.shape[1]
        return binding.get_outputs()[0].numpy()[0]

    def extend(self, ids: list[int], audio: np.ndarray, deepstack: np.ndarray, last: bool = True) -> np.ndarray:
        self._reserve(self.length + len(ids))  # once for the whole prompt, not piece by piece
        if self.prompt_session is None or len(ids) < self.MIN_PROMPT_POSITIONS:
            return super().extend(ids, audio, deepstack, last)
        piece = self.INT8_CACHE_PROMPT_PIECE if self.cache_dtype == np.int8 else self.PROMPT_PIECE
        return self._in_pieces(ids, audio, deepstack, last, min(piece, self.prefill_chunk),
                               partial(self._run, session=self.prompt_session))

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions: later ones are overwritten as the cache grows again."""
        self.length = min(length, self.length)


def decoder_runner(graph: str, session, dims: Dims, prefill_chunk: int = ShapeLimits.max_prompt, prompt_session=None):
    """The runner for a decoder graph: in-place cache buffers for decoder_ort and decoder_cuda (with the prompt
    graph's session, if given), past/present otherwise."""
    if graph in (ORT_DECODER, CUDA_DECODER):
        return BufferedDecoderRunner(session, dims, prefill_chunk, prompt_session)
    return DecoderRunner(session, dims, prefill_chunk)
