"""Audio that is answered while it arrives: each 4 s encoder chunk is encoded and prefilled into
the KV cache as soon as its samples are in, so that when the speaker stops only the last partial
chunk and the question are left to run.

    with pipe.open_stream("What happens?") as live:
        for block in microphone():       # any block size, at the stream's sample rate
            live.feed(block)
        result = live.finish()           # or: for piece in live.finish_stream(): ...

The one place a stream cannot compute what the offline path computes is Whisper's log-mel
floor, 8 (80 dB) below the clip's loudest value, which a stream does not know yet. Chunks are
floored at the running maximum instead. exact=True makes the result the offline one: at
finish(), the chunks whose values the final floor would change are encoded again, and the
cache is rolled back to the first of them (often none: the floor only moves when the loudest
moment comes later, and only matters where a chunk holds values 80 dB below it).
With 16 kHz input, exact mode is the offline computation done in pieces (prefill logits within
1e-4, the same tokens); other rates are resampled block by block (soxr's streaming resampler),
which differs from resampling the whole clip in the last bits.
"""

import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import soxr

from moss_edge.runtime.audio import (HOP_LENGTH, N_FFT, SAMPLE_RATE, EncoderBatch, floor_and_scale, log10_mel,
                                     log10_mel_frames, num_audio_tokens, prepare_waveform)
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.generation import Result, generate_tokens, place_audio, result, stream_text
from moss_edge.runtime.inference import AudioFeatures
from moss_edge.runtime.prompt import audio_span
from moss_edge.runtime.sampling import SamplingOptions


@dataclass
class _Chunk:
    mel: np.ndarray  # [128, frames] log10 mel power, before the floor
    floor_peak: float  # the maximum its floor was taken from
    start: int  # the cache length before its ids
    tokens: int  # audio tokens after it (all chunks so far)


@dataclass
class _Samples:
    """The 16 kHz signal so far, reflect-padded at the start as log_mel pads the whole clip."""

    data: np.ndarray = field(default_factory=lambda: np.zeros(N_FFT // 2, np.float64))
    length: int = 0  # samples of signal (the padded buffer holds N_FFT // 2 more at the front)

    def append(self, x: np.ndarray) -> None:
        grown = self.length + len(x)
        if N_FFT // 2 + grown > len(self.data):
            data = np.zeros(max(2 * len(self.data), N_FFT // 2 + grown, 1 << 16), np.float64)
            data[: N_FFT // 2 + self.length] = self.data[: N_FFT // 2 + self.length]
            self.data = data
        self.data[N_FFT // 2 + self.length : N_FFT // 2 + grown] = x
        self.length = grown

    def signal(self) -> np.ndarray:
        return self.data[N_FFT // 2 : N_FFT // 2 + self.length]

    def windows(self, first: int, count: int) -> np.ndarray:
        """[count, N_FFT] windows of frames first.. (their samples must be in)."""
        pad = N_FFT // 2
        self.data[:pad] = self.data[pad + 1 : 2 * pad + 1][::-1]  # np.pad(mode="reflect") at the start
        view = np.lib.stride_tricks.sliding_window_view(self.data[: pad + self.length], N_FFT)
        return view[first * HOP_LENGTH : (first + count) * HOP_LENGTH : HOP_LENGTH]

    def complete_frames(self) -> int:
        """Frames whose window lies inside the signal (no reflection at the end needed)."""
        return max(0, (self.length + N_FFT // 2 - N_FFT) // HOP_LENGTH + 1) if self.length > N_FFT else 0


class _Prefilled:
    """What generate_tokens drives once a stream is finished: its prefill is done already."""

    def __init__(self, pipe, logits: np.ndarray):
        self.ids, self.dims, self.step, self._logits = pipe.ids, pipe.dims, pipe.step, logits

    def prefill(self, prompt_ids, audio, deepstack=True) -> np.ndarray:
        return self._logits


class AudioStream:
    """Made by Pipeline.open_stream; holds the pipeline (its KV cache) until finish or close."""

    def __init__(self, pipe, prompt: str | list[int], rate: int, exact: bool, deepstack: bool):
        self.pipe, self.exact, self.deepstack = pipe, exact, deepstack
        self.rate = rate
        self._resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                                                   quality="HQ")
        if not isinstance(prompt, str) and list(prompt).count(pipe.ids.audio_start) != 1:
            raise MossEdgeError("a streamed prompt holds exactly one audio clip (one audio_start ... audio_end span)")
        ids = pipe.prompt_ids(prompt, [0])  # the prompt with an empty audio span, split around it
        split = ids.index(pipe.ids.audio_start) + 1
        self.prefix, self.suffix = ids[:split], ids[split:]
        self.samples = _Samples()
        self.chunks: list[_Chunk] = []
        self.peak = -np.inf
        self.finished = self.closed = False
        self.reencoded = 0  # chunks exact mode encoded again at finish
        self.spent = {"encode_s": 0.0, "prefill_s": 0.0}  # since the stream opened; from finish, at finish
        pipe.decoder.truncate(0)
        self.logits = self._extend(self.prefix, None, last=False)
        # the last step: a stream dropped without close() (user code that raised) gives the
        # pipeline back when it is collected, so no other caller waits on it for good
        self._give_back = weakref.finalize(self, pipe._release)

    def feed(self, samples: np.ndarray) -> None:
        """Audio as it arrives ([n] or [n, channels] floats at the stream's rate); every chunk
        completed by it is encoded and prefilled before this returns."""
        if self.finished:
            raise MossEdgeError("this stream is finished; open another one")
        samples = np.asarray(samples)
        if samples.size == 0:
            return
        # checked and mixed to mono as a whole clip is; resampled block by block
        x = prepare_waveform(samples, SAMPLE_RATE)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x)
        self.samples.append(x)
        self._encode_ready()

    def _encode_ready(self) -> None:
        frames = self.pipe.dims.chunk_frames
        done = sum(c.mel.shape[1] for c in self.chunks)
        while self.samples.complete_frames() - done >= frames:
            self._add_chunk(log10_mel(self.samples.windows(done, frames)))
            done += frames

    def _add_chunk(self, mel: np.ndarray) -> None:
        self.peak = max(self.peak, float(mel.max()))
        before = self.chunks[-1].tokens if self.chunks else 0
        self._check_room(before + num_audio_tokens(mel.shape[1]))
        chunk = _Chunk(mel, self.peak, self.pipe.decoder.length, before + num_audio_tokens(mel.shape[1]))
        self.chunks.append(chunk)
        self.logits = self._prefill_chunk(chunk, before, [], last=False)

    def _prefill_chunk(self, chunk: _Chunk, before: int, then: list[int], last: bool) -> np.ndarray:
        """Encode one chunk (padded as the offline path pads it), prefill its span of the prompt
        (audio tokens and the time markers inside it) and `then`. ONNX Runtime's arenas are kept
        between chunks (a cold arena cost each chunk ~0.1 s at 4B widths) and returned with the
        `last` runs, those of finish."""
        n = chunk.mel.shape[1]
        width = self.pipe.dims.chunk_frames if len(self.chunks) > 1 else n  # offline pads to the longest chunk
        mel = np.zeros((1, chunk.mel.shape[0], width), np.float32)
        mel[0, :, :n] = floor_and_scale(chunk.mel, chunk.floor_peak)
        tokens = chunk.tokens - before
        start = time.perf_counter()
        audio = self.pipe._encode_batch(EncoderBatch(mel, np.array([n], np.int64), np.array([tokens], np.int64), [tokens]),
                                        last)
        self.spent["encode_s"] += time.perf_counter() - start
        return self._extend(audio_span(chunk.tokens, self.pipe.ids)[len(audio_span(before, self.pipe.ids)):] + then, audio,
                            last)

    def _extend(self, ids: list[int], audio: AudioFeatures | None, last: bool) -> np.ndarray:
        """Prefill ids after the cached positions, audio's rows at their audio positions."""
        dims, audio_token = self.pipe.dims, self.pipe.ids.audio_token
        embeds = np.zeros((0, dims.hidden_size), np.float32) if audio is None else audio.embeds
        deepstack = np.zeros((dims.num_deepstack, 0, dims.hidden_size), np.float32) if audio is None else audio.deepstack
        injected = place_audio(ids, audio_token, deepstack)
        start = time.perf_counter()
        logits = self.pipe.decoder.extend(ids, place_audio(ids, audio_token, embeds),
                                          injected if self.deepstack else np.zeros_like(injected), last)
        self.spent["prefill_s"] += time.perf_counter() - start
        return logits

    def finish_logits(self) -> tuple[list[int], np.ndarray]:
        """The rest of the audio and the prompt after it: the whole prompt's ids and the logits
        of its last position."""
        if self.finished:
            raise MossEdgeError("this stream is finished; open another one")
        self.finished = True
        self.spent = dict.fromkeys(self.spent, 0.0)
        if self._resampler is not None:
            self.samples.append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        n = self.samples.length
        if n < HOP_LENGTH:
            raise MossEdgeError(f"the stream holds {n} samples at 16 kHz; at least {HOP_LENGTH} (10 ms) are needed")
        frames = self.pipe.dims.chunk_frames
        done = sum(c.mel.shape[1] for c in self.chunks)
        tail = self._tail_mel(done)
        rest = [tail[:, s : s + frames] for s in range(0, tail.shape[1], frames)]
        self.peak = max([self.peak, *[float(m.max()) for m in rest]])  # the clip's maximum now
        if self.exact:
            self._redo_changed(self.peak)
        self._check_room((self.chunks[-1].tokens if self.chunks else 0) + sum(num_audio_tokens(m.shape[1]) for m in rest))
        for i, mel in enumerate(rest):
            before = self.chunks[-1].tokens if self.chunks else 0
            chunk = _Chunk(mel, self.peak, self.pipe.decoder.length, before + num_audio_tokens(mel.shape[1]))
            self.chunks.append(chunk)
            final = i == len(rest) - 1
            self.logits = self._prefill_chunk(chunk, before, self.suffix if final else [], final)
        if not rest:
            self.logits = self._extend(self.suffix, None, last=True)
        total = self.chunks[-1].tokens
        return self.prefix + audio_span(total, self.pipe.ids) + self.suffix, self.logits

    def _check_room(self, audio_tokens: int) -> None:
        positions = len(self.prefix) + len(audio_span(audio_tokens, self.pipe.ids)) + len(self.suffix)
        if positions >= self.pipe.context_limit:
            raise MossEdgeError(f"the streamed audio ({self.samples.length / SAMPLE_RATE:.0f} s so far) and the prompt "
                                f"take {positions} positions; the model takes {self.pipe.context_limit}: finish the "
                                "stream earlier and open another for the rest")

    def finish(self, opts: SamplingOptions | None = None, **sampling) -> Result:
        """Encode and prefill what is left, then generate, as Pipeline.generate does;
        timings["end_of_audio_to_first_token_s"] is what a live listener waits."""
        try:
            start = time.perf_counter()
            asked = opts or SamplingOptions(**sampling)
            asked.check()
            ids, logits = self.finish_logits()
            opts = self.pipe._room(ids, asked)
            tokens, first = [], None
            for token in generate_tokens(_Prefilled(self.pipe, logits), ids, None, opts):
                first = first or time.perf_counter()
                tokens.append(token)
            first = first or time.perf_counter()
            # where the wait went: the encoder and adapter, the decoder (the rest: mel, sampling)
            timings = {"end_of_audio_to_first_token_s": first - start,
                       **{f"end_of_audio_{k}": v for k, v in self.spent.items()}}
            if len(tokens) > 1:
                timings["decode_ms_per_token"] = (time.perf_counter() - first) * 1000 / (len(tokens) - 1)
            return result(self.pipe._decode(tokens), tokens, len(ids), opts, asked, timings)
        finally:
            self.close()

    def finish_stream(self, opts: SamplingOptions | None = None, **sampling) -> Iterator[str]:
        """finish(), yielding text pieces as they are generated."""
        try:
            asked = opts or SamplingOptions(**sampling)
            asked.check()
            ids, logits = self.finish_logits()
            tokens = generate_tokens(_Prefilled(self.pipe, logits), ids, None, self.pipe._room(ids, asked))
            yield from stream_text(self.pipe._decode, tokens)
        finally:
            self.close()

    def close(self) -> None:
        """Give the pipeline back (finish does); what was prefilled is dropped."""
        if not self.closed:
            self.closed = self.finished = True
            self._give_back()

    def __enter__(self) -> "AudioStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tail_mel(self, done: int) -> np.ndarray:
        """The frames after the first `done`, as log_mel computes them for the whole clip (the
        last ones reach into its reflected end)."""
        x = self.samples.signal()
        if done == 0:
            return log10_mel_frames(x)
        pad = N_FFT // 2
        padded = np.concatenate([x[done * HOP_LENGTH - pad :], x[-2 : -pad - 2 : -1]])
        windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][: len(x) // HOP_LENGTH - done]
        return log10_mel(windows) if len(windows) else np.zeros((self.chunks[0].mel.shape[0], 0))

    def _redo_changed(self, peak: float) -> None:
        """Exact mode: from the first chunk the final floor changes, encode and prefill again."""
        self.peak = peak
        changed = next((i for i, c in enumerate(self.chunks) if c.floor_peak < peak and c.mel.min() < peak - 8.0), None)
        if changed is None:
            return
        redo = self.chunks[changed:]
        del self.chunks[changed:]
        self.pipe.decoder.truncate(redo[0].start)
        self.reencoded = len(redo)
        for chunk in redo:
            before = self.chunks[-1].tokens if self.chunks else 0
            chunk.floor_peak, chunk.start = peak, self.pipe.decoder.length
            self.chunks.append(chunk)
            self.logits = self._prefill_chunk(chunk, before, [], last=False)
