"""The device-side pipeline: audio -> encoder -> adapter -> prompt -> decoder loop, on ONNX Runtime."""

import copy
import io
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.audio import (SAMPLE_RATE, EncoderBatch, chunk_mels, clip_token_count, decode_failure, load_audio, log_mel,
                                     prepare_waveform)
from moss_edge.runtime.cpu import cpu_features, integer_dot_product
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.generation import Result, generate_tokens, place_audio, result, stream_text
from moss_edge.runtime.decoders import decoder_runner
from moss_edge.runtime.graphs import ORT_DECODER, graph_spec, mismatches
from moss_edge.runtime.inference import AudioFeatures
from moss_edge.runtime.prompt import TextTokenizer, prompt_ids
from moss_edge.runtime.sampling import SamplingOptions
from moss_edge.runtime.session import (PROVIDERS, ShapeLimits, available_memory, make_session, run_typed, shrinking_arena,
                                      trt_profiles)

AudioInput = str | Path | bytes | tuple[np.ndarray, int] | np.ndarray


class ParityWarning(UserWarning):
    """Loading an artifact whose parity check against the PyTorch model failed."""



def to_waveform(audio: AudioInput) -> np.ndarray:
    """A path, encoded bytes, (samples, rate), or samples already at 16 kHz -> mono 16 kHz."""
    if isinstance(audio, (str, Path)):
        return load_audio(audio)
    if isinstance(audio, bytes):
        try:
            samples, rate = sf.read(io.BytesIO(audio), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as err:
            raise MossEdgeError(f"cannot decode the audio bytes ({decode_failure(err)}); give wav, flac, ogg or mp3 data") from None
        return prepare_waveform(samples, rate)
    if isinstance(audio, tuple) and len(audio) == 2:
        return prepare_waveform(audio[0], audio[1])
    if isinstance(audio, np.ndarray):
        return prepare_waveform(audio, SAMPLE_RATE)
    if isinstance(audio, (int, float, np.number)):
        raise MossEdgeError("audio is a number: a Python list of samples is read as a list of clips; pass the "
                            "samples as a numpy array (16 kHz) or as (samples, sample_rate)")
    raise MossEdgeError(f"audio must be a path, bytes, (samples, rate) or a 16 kHz array; got {type(audio).__name__}")


def check_graph_io(artifact: Artifact, name: str, session) -> None:
    """The loaded graph has the inputs the graph contract gives for the manifest's sizes: a graph
    swapped for another one, or a manifest edited to other sizes, fails here with a message."""
    problems = mismatches(graph_spec(name, artifact.dims), {i.name: i.shape for i in session.get_inputs()})
    if problems:
        raise MossEdgeError(f"{artifact.graph_path(name)} is not the {name} graph its manifest describes "
                            f"({'; '.join(problems[:4])}); export the artifact again")


def encode_chunks(batch: EncoderBatch, encoder, adapter, per_run: int) -> AudioFeatures:
    """The encoder over the batch's chunks, per_run at a time, then the adapter over their valid
    tokens. encoder(feeds, last_run) and adapter(feeds) return their graph's outputs in order."""
    tokens, taps = [], []
    for start in range(0, len(batch.frames), per_run):
        t, p = encoder({"mel": batch.mel[start : start + per_run], "frames": batch.frames[start : start + per_run]},
                       start + per_run >= len(batch.frames))
        valid = np.arange(t.shape[1])[None, :] < batch.tokens[start : start + per_run, None]
        tokens.append(t[valid])
        taps.append(p[:, valid])
    tokens, taps = np.concatenate(tokens), np.concatenate(taps, axis=1)
    embeds, deepstack = adapter({"audio_tokens": tokens, "taps": taps})
    return AudioFeatures(tokens, taps, embeds, deepstack, batch.clip_tokens)


def installed_tensorrt() -> tuple[int, int] | None:
    """The TensorRT Python package's version (JetPack installs it beside the library), if any."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tuple(int(p) for p in tensorrt.__version__.split(".")[:2])


def check_tensorrt_version(checks: dict, installed: tuple[int, int] | None) -> None:
    """Refuse a TensorRT older than every TensorRT version the artifact's checks passed (an
    opset-23 artifact on JetPack 6's 10.3, say) before any engine build starts."""
    passed = [tuple(int(p) for p in name.split("-")[1].split(".")) for name, r in checks.items()
              if name.startswith("tensorrt-") and r["passed"]]
    if installed is None or not passed or installed >= min(passed):
        return
    raise MossEdgeError(f"this artifact's graphs pass TensorRT {'.'.join(map(str, min(passed)))} and later "
                        f"(moss-edge check); this device has TensorRT {'.'.join(map(str, installed))}. Export with "
                        "--opset 21 and quantize with --recipe int4-trt for JetPack 6")


PREFILL_PATHS = ("auto", "int8", "decoder")


def choose_prefill(artifact: Artifact, provider: str, decoder: str, asked: str, features: set[str]) -> tuple[str, str]:
    """(the prompt path, why): "int8", the artifact's prompt graph on the integer GEMM, or
    "decoder", the token graph. auto takes int8 where the artifact has a prompt graph for this
    provider and decoder and the CPU has integer dot-product or matrix instructions."""
    if asked not in PREFILL_PATHS:
        raise MossEdgeError(f"prefill must be one of {', '.join(PREFILL_PATHS)}, got {asked!r}")
    chosen = artifact.manifest.get("prefill", {})
    graph = chosen.get(provider) if isinstance(chosen, dict) else None
    if not isinstance(chosen, dict) or (graph is not None and graph not in artifact.manifest["graphs"]):
        raise MossEdgeError(f"{artifact.root}/manifest.json chooses a prompt graph ({chosen!r}) that it does not list; "
                            "export the artifact again")
    if asked == "decoder":
        return "decoder", "asked for"
    if graph is None or decoder != ORT_DECODER:
        if asked == "int8":
            raise MossEdgeError(f"{artifact.root} has no INT8 prompt graph for the {decoder} decoder on {provider}; "
                                "quantize with a recipe whose decoder has \"prefill\": \"int8\" (the int4 and int4-awq "
                                "presets do) and run on the cpu provider, or use prefill auto")
        return "decoder", "the artifact has no prompt graph for this decoder and provider"
    if asked == "int8":
        return "int8", "asked for"
    units = integer_dot_product(features)
    if not units:
        return "decoder", "this CPU has no integer dot-product or matrix instructions"
    return "int8", f"this CPU has {', '.join(units)}"


class Pipeline:
    """A loaded artifact: generate/stream for applications, and the Inference interface
    (encode, prefill, step; runtime/inference.py) for the tools that drive models directly.
    One request at a time: the decoder's KV cache is per pipeline, so concurrent calls are
    serialised by a lock, and wait for it at most wait_s seconds; load one Pipeline per worker
    for parallelism."""

    wait_s = 600.0  # a 10 min recording's prompt takes minutes on a small CPU: longer than that is a stuck holder

    def __init__(self, artifact: Artifact, provider: str = "cpu", threads: int | None = None,
                 limits: ShapeLimits | None = None, with_decoder: bool = True, decoder: str | None = None,
                 prefill: str = "auto"):
        backends = artifact.manifest.get("backends", list(PROVIDERS))
        if provider not in backends:
            precisions = {g: e["precision"] for g, e in artifact.manifest["graphs"].items()}
            raise MossEdgeError(f"artifact {artifact.root} ({precisions}) does not run on {provider}; it runs on "
                                f"{', '.join(backends)} (`moss-edge check {artifact.root}` says node by node why). "
                                "For TensorRT/CUDA quantize with --recipe int4-trt")
        if provider == "tensorrt":
            check_tensorrt_version(artifact.manifest.get("checks", {}), installed_tensorrt())
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise MossEdgeError(f"threads must be a whole number >= 1 (or left out for all cores), got {threads!r}")
        if artifact.failed_parity:
            warnings.warn(f"artifact {artifact.root} FAILED its parity check ({'; '.join(artifact.manifest['parity']['failures'])}); "
                          "its answers may be wrong: quantize again with --keep-until-pass or a more precise recipe",
                          ParityWarning, stacklevel=3)
        self.artifact = artifact
        self.ids = artifact.token_ids
        self.dims = artifact.dims
        cache = artifact.root / "trt_cache"
        # TensorRT builds for the profiles the manifest's engine plan was made for (a Jetson's)
        planned = artifact.manifest.get("engine_plan", {}).get("limits") if provider == "tensorrt" else None
        self.limits = limits or (ShapeLimits(**planned) if planned else ShapeLimits())
        # TensorRT engines are built for contexts up to the profile's maximum
        self.context_limit = min(self.dims.max_positions, self.limits.max_context) if provider == "tensorrt" \
            else self.dims.max_positions

        def session(graph):
            profiles = trt_profiles(graph, self.dims, self.limits) if provider == "tensorrt" else None
            return make_session(artifact.graph_path(graph), provider, threads, cache, profiles)

        self._session = session
        self.encoder, self.adapter = session("encoder"), session("adapter")
        # An encoder run's activations on the CPU: about 150 fp32 tensors of [chunk tokens, d_model]
        # per chunk (4B widths: 8 chunks per run peaked 620 MB above 4 per run)
        self.encoder_chunk_bytes = 150 * 4 * (self.dims.chunk_frames // 2) * self.dims.audio_dim
        check_graph_io(artifact, "encoder", self.encoder)
        check_graph_io(artifact, "adapter", self.adapter)
        # audio-only users (calibration) skip the decoder: at 4B in fp32 it is the bulk of the memory
        self.decoder = None
        # the decoder this provider runs (the manifest's choice), or the one asked for (verify checks each)
        self.decoder_graph = decoder or artifact.decoder_for(provider)
        if self.decoder_graph not in artifact.manifest["graphs"]:
            raise MossEdgeError(f"{artifact.root} has no {self.decoder_graph!r} graph; it has "
                                f"{', '.join(artifact.manifest['graphs'])}")
        too_old = artifact.unsupported(self.decoder_graph)
        if too_old and decoder:
            raise MossEdgeError(f"{too_old}: upgrade onnxruntime, or run the portable decoder (decoder 'decoder')")
        if too_old:  # the portable decoder runs on every release this package supports, more slowly
            warnings.warn(f"{too_old}: running the portable decoder instead (an fp32 KV cache, slower on long "
                          "audio); upgrade onnxruntime for the faster one", stacklevel=3)
            self.decoder_graph = "decoder"
        self.prefill_path, self.prefill_reason = choose_prefill(artifact, provider, self.decoder_graph, prefill,
                                                                cpu_features())
        self.provider = provider
        if with_decoder:
            self.decoder = self._decoder_runner(self.decoder_graph, self.prefill_path)
        self.tokenizer = TextTokenizer.from_dir(artifact.root) if artifact.tokenizer_files else None
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside generate/stream, to catch re-entry

    def _decoder_runner(self, graph: str, prefill_path: str):
        """The runner for one of the artifact's decoders, with the prompt graph's session when
        the prompt path is int8 (both graphs' weights are then in memory)."""
        loaded = self._session(graph)
        check_graph_io(self.artifact, graph, loaded)
        prompt = None
        if prefill_path == "int8":
            prompt_graph = self.artifact.manifest["prefill"][self.provider]
            prompt = self._session(prompt_graph)
            check_graph_io(self.artifact, prompt_graph, prompt)
        return decoder_runner(graph, loaded, self.dims, self.limits.max_prompt, prompt)

    @property
    def settings(self) -> dict:
        """How this pipeline runs, for logs and reports: each session's providers with their
        options (TensorRT profiles and engine cache included), threads, shape limits, decoder."""
        sessions = {"encoder": self.encoder, "adapter": self.adapter}
        if self.decoder is not None:
            sessions[self.decoder_graph] = self.decoder.session
            if self.prefill_path == "int8":
                sessions[self.artifact.manifest["prefill"][self.provider]] = self.decoder.prompt_session
        return {"decoder": self.decoder_graph, "prefill": {"path": self.prefill_path, "why": self.prefill_reason},
                "limits": vars(self.limits),
                "chunks_per_encoder_run": self.chunks_per_run(self.dims.conv_chunksize),
                "sessions": {g: {"providers": s.get_providers(), "provider_options": s.get_provider_options(),
                                 "intra_op_threads": s.get_session_options().intra_op_num_threads}
                             for g, s in sessions.items()}}

    def using_decoder(self, graph: str, prefill: str = "decoder") -> "Pipeline":
        """This pipeline with another of the artifact's decoders (verify checks each) and prompt
        path, sharing the encoder and adapter sessions; the decoder it is made from can be
        dropped first, so that one decoder's weights are in memory at a time."""
        if graph not in self.artifact.manifest["graphs"]:
            raise MossEdgeError(f"{self.artifact.root} has no {graph!r} graph")
        other = copy.copy(self)
        other.prefill_path, other.prefill_reason = choose_prefill(self.artifact, self.provider, graph, prefill, set())
        other.decoder_graph, other.decoder = graph, self._decoder_runner(graph, other.prefill_path)
        other._lock, other._owner = threading.Lock(), None
        return other

    def check(self) -> dict:
        """This pipeline, as loaded (provider, decoder, prompt path), against the PyTorch model's
        answers the artifact carries (runtime/parity.py): the report `verify` prints, with
        report["summary"]["passed"]; for a product to run at start-up. Needs no PyTorch."""
        from moss_edge.runtime.parity import check_pipeline, recorded

        if self.decoder is None:
            raise MossEdgeError("this pipeline was loaded without its decoder (with_decoder=False); load it whole to check it")
        with self._serving():
            report = check_pipeline(self, recorded(self.artifact), itself=True)
        report["reference"] = "recorded answers of the fp32 PyTorch model"
        return report

    def open_stream(self, prompt: str | list[int], rate: int = SAMPLE_RATE, exact: bool = False,
                    deepstack: bool = True):
        """A live request (runtime/streaming.py): feed() audio as it arrives, then finish().
        The pipeline serves this stream only until it is finished or closed."""
        from moss_edge.runtime.streaming import AudioStream

        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise MossEdgeError(f"rate must be a positive whole number of samples per second, got {rate!r}")
        self._acquire()
        try:
            return AudioStream(self, prompt, int(rate), exact, deepstack)
        except BaseException:
            self._release()
            raise

    def _acquire(self) -> None:
        if self._owner == threading.get_ident():
            raise MossEdgeError("this thread has an unfinished stream() or open_stream() on this pipeline: read it to "
                                "the end, finish it or call .close() on it before starting another request")
        if not self._lock.acquire(timeout=self.wait_s):
            holder = next((t for t in threading.enumerate() if t.ident == self._owner), None)
            who = (f"thread {holder.name!r}" if holder else f"thread {self._owner}, which has ended without closing its "
                   "stream, whose stream object is still referenced")
            raise MossEdgeError(f"this pipeline has been busy for {self.wait_s:.0f} s with a request of {who}; a stream "
                                "holds the pipeline until it is finished or closed. Load one Pipeline per worker to "
                                "serve requests in parallel (Pipeline.wait_s sets this wait)")
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    @contextmanager
    def _serving(self):
        """One request at a time. The same thread asking again while its own stream is still
        open would wait on itself forever: that is refused instead."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    @classmethod
    def load(cls, artifact_dir: str | Path, provider: str = "cpu", threads: int | None = None,
             check_hashes: bool = True, limits: ShapeLimits | None = None, with_decoder: bool = True,
             unfinished_ok: bool = False, decoder: str | None = None, prefill: str = "auto") -> "Pipeline":
        return cls(Artifact.load(artifact_dir, check_hashes, unfinished_ok), provider, threads, limits, with_decoder,
                   decoder, prefill)

    def encode(self, clips: list[AudioInput]) -> AudioFeatures:
        """Clips (paths, bytes, (samples, rate) or 16 kHz arrays) -> their audio features."""
        if not clips:
            raise MossEdgeError("give at least one audio clip")
        return self._encode_waveforms([to_waveform(c) for c in clips])

    def _encode_waveforms(self, waveforms: list[np.ndarray]) -> AudioFeatures:
        return self._encode_batch(chunk_mels([log_mel(w) for w in waveforms], self.dims.chunk_frames))

    def _encode_batch(self, batch: EncoderBatch, last: bool = True) -> AudioFeatures:
        # the arena serves the next chunk, then is returned after the last one and the adapter
        # (last=False: kept for a stream's next chunk)
        release = shrinking_arena if last else lambda: None
        return encode_chunks(batch, lambda feeds, final: run_typed(self.encoder, feeds, release() if final else None),
                             lambda feeds: run_typed(self.adapter, feeds, release()), self.chunks_per_run(len(batch.frames)))

    # Encoder chunks per run on the CPU, where memory allows. 4B widths, the encoder's 32 layers,
    # 10 min of audio (150 chunks), 2 threads, AMX: 103 ms a chunk one per run, 84 two, 76 four,
    # 80 eight; peak RSS 80 MB above one per run with four, 700 MB with eight.
    CPU_CHUNKS_PER_RUN = 4

    def chunks_per_run(self, chunks: int) -> int:
        """How many of `chunks` encoder chunks go into one run: GPUs take the model's
        conv_chunksize, as upstream batches them; the CPU up to CPU_CHUNKS_PER_RUN, one at a time
        where the memory available is under twice what the larger run needs."""
        if self.provider != "cpu":
            return self.dims.conv_chunksize
        per_run = min(self.CPU_CHUNKS_PER_RUN, chunks)
        return per_run if 2 * per_run * self.encoder_chunk_bytes < available_memory() else 1

    def prompt_ids(self, prompt: str | list[int], clip_tokens: list[int]) -> list[int]:
        return prompt_ids(prompt, clip_tokens, self.tokenizer, self.ids, self.dims.vocab_size)

    def _request(self, audio: AudioInput | list[AudioInput], prompt: str | list[int]) -> tuple[list[np.ndarray], list[int]]:
        """Waveforms and prompt ids, with the prompt's length checked before any encoding."""
        clips = audio if isinstance(audio, list) else [audio]
        if not clips:
            raise MossEdgeError("give at least one audio clip")
        waveforms = [to_waveform(c) for c in clips]
        clip_tokens = [clip_token_count(len(w), self.dims.chunk_frames) for w in waveforms]
        ids = self.prompt_ids(prompt, clip_tokens)
        limit = self.context_limit
        if len(ids) >= limit:
            seconds = sum(len(w) for w in waveforms) / SAMPLE_RATE
            text = len(self.prompt_ids(prompt, [0] * len(clips)))  # the prompt without audio positions
            fit = max(0.0, (limit - 1 - text) * seconds / (len(ids) - text))
            raise MossEdgeError(f"the prompt is {len(ids)} tokens ({seconds:.0f} s of audio) but the model takes "
                                f"{limit} positions{' (the TensorRT profile: ShapeLimits.max_context)' if limit < self.dims.max_positions else ''}: about {fit:.0f} s of audio fit with this question; "
                                "shorten the audio or ask about parts of it")
        return waveforms, ids

    def _room(self, ids: list[int], opts: SamplingOptions) -> SamplingOptions:
        """The options with max_new_tokens cut to the positions left after the prompt."""
        opts.check()
        room = self.context_limit - len(ids)
        return replace(opts, max_new_tokens=room) if room < opts.max_new_tokens else opts

    def prefill(self, prompt_ids: list[int], audio: AudioFeatures, deepstack: bool = True) -> np.ndarray:
        """Run the prompt; returns the last position's logits and leaves the cache filled.
        deepstack=False leaves the DeepStack injection out (an ablation)."""
        embeds = place_audio(prompt_ids, self.ids.audio_token, audio.embeds)
        injected = place_audio(prompt_ids, self.ids.audio_token, audio.deepstack)
        return self.decoder.prefill(prompt_ids, embeds, injected if deepstack else np.zeros_like(injected))

    def step(self, token: int) -> np.ndarray:
        """Feed one token after the cached positions; its logits."""
        return self.decoder.step(token)

    def _tokens(self, prompt_ids, features, opts, timings) -> Iterator[int]:
        """generate_tokens, timed: the prefill ends when the first token is out (one sampling later)."""
        start = time.perf_counter()
        first, n = None, 0
        for n, token in enumerate(generate_tokens(self, prompt_ids, features, opts), 1):
            first = first or time.perf_counter()
            yield token
        timings["prefill_s"] = (first or time.perf_counter()) - start
        if n > 1:
            timings["decode_ms_per_token"] = (time.perf_counter() - first) * 1000 / (n - 1)

    def stream(self, audio: AudioInput | list[AudioInput], prompt: str | list[int],
               opts: SamplingOptions | None = None, **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated."""
        with self._serving():
            waveforms, ids = self._request(audio, prompt)
            opts = self._room(ids, opts or SamplingOptions(**sampling))
            features = self._encode_waveforms(waveforms)
            yield from stream_text(self._decode, self._tokens(ids, features, opts, {}))

    def generate(self, audio: AudioInput | list[AudioInput], prompt: str | list[int],
                 opts: SamplingOptions | None = None, **sampling) -> Result:
        with self._serving():
            timings = {}
            start = time.perf_counter()
            asked = opts or SamplingOptions(**sampling)
            waveforms, ids = self._request(audio, prompt)
            opts = self._room(ids, asked)
            features = self._encode_waveforms(waveforms)
            timings["encode_s"] = time.perf_counter() - start
            tokens = list(self._tokens(ids, features, opts, timings))
            return result(self._decode(tokens), tokens, len(ids), opts, asked, timings)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens) if self.tokenizer else ""
