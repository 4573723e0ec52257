"""`moss-edge serve`: an artifact behind Triton Inference Server, through PyTriton (the `serve`
extra; the wheel carries the server binary and runs on CPU).

Two Triton models, each with N instances (one Pipeline each: a pipeline answers one request at
a time):
  moss_audio         audio + prompt + options -> text, thinking, generated_tokens, prompt_tokens, stop_reason
  moss_audio_stream  the same inputs -> text pieces as they are generated (decoupled)

Inputs (no batch dimension; give one audio form and one prompt form):
  audio BYTES [1] (a wav/flac/ogg/mp3 file) | samples FP32 [-1] + sample_rate INT32 [1]
  prompt BYTES [1] (text, through the chat template) | prompt_ids INT64 [-1]
  options BYTES [1], optional: JSON with max_new_tokens, temperature, top_k, top_p, seed
"""

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.sampling import SamplingOptions

MODEL, STREAM_MODEL = "moss_audio", "moss_audio_stream"
OPTIONS = [f.name for f in fields(SamplingOptions)]


def request_arguments(request) -> tuple:
    """(audio, prompt, SamplingOptions) of one Triton request (a mapping of input name -> array),
    or MossEdgeError saying what is wrong with it."""
    has = {name for name in ("audio", "samples", "sample_rate", "prompt", "prompt_ids", "options") if name in request}
    if "audio" in has:
        audio = bytes(request["audio"].reshape(-1)[0])
    elif {"samples", "sample_rate"} <= has:
        audio = (np.asarray(request["samples"], np.float32).reshape(-1), int(np.asarray(request["sample_rate"]).reshape(-1)[0]))
    else:
        raise MossEdgeError("no audio: send `audio` (the bytes of a wav/flac/ogg/mp3 file) or `samples` with `sample_rate`")
    if "prompt" in has:
        prompt = bytes(request["prompt"].reshape(-1)[0]).decode("utf-8", errors="replace")
    elif "prompt_ids" in has:
        prompt = [int(t) for t in np.asarray(request["prompt_ids"]).reshape(-1)]
    else:
        raise MossEdgeError("no prompt: send `prompt` (text) or `prompt_ids`")
    options = {}
    if "options" in has:
        try:
            options = json.loads(bytes(request["options"].reshape(-1)[0]))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MossEdgeError(f"options must be a JSON object: {err}") from None
        if not isinstance(options, dict):
            raise MossEdgeError(f"options must be a JSON object such as {{\"max_new_tokens\": 64}}, not {options!r}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise MossEdgeError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTIONS)}")
    opts = SamplingOptions(**options)
    opts.check()
    return audio, prompt, opts


class Answerer:
    """One instance of moss_audio: its own Pipeline."""

    def __init__(self, artifact: Path, threads: int):
        from moss_edge.runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(artifact, threads=threads)

    def __call__(self, requests):
        out = []
        for request in requests:
            audio, prompt, opts = request_arguments(request)
            r = self.pipe.generate(audio, prompt, opts)
            out.append({"text": np.array([r.text.encode()], np.bytes_), "thinking": np.array([r.thinking.encode()], np.bytes_),
                        "generated_tokens": np.array([len(r.tokens)], np.int64),
                        "prompt_tokens": np.array([r.prompt_tokens], np.int64),
                        "stop_reason": np.array([r.stop_reason.encode()], np.bytes_)})
        return out


class Streamer(Answerer):
    """One instance of moss_audio_stream: text pieces as they are generated."""

    def __call__(self, requests):
        for request in requests:
            audio, prompt, opts = request_arguments(request)
            for piece in self.pipe.stream(audio, prompt, opts):
                yield [{"text": np.array([piece.encode()], np.bytes_)}]


def _python_library_path() -> None:
    """Triton's Python-backend stub links libpython; make it the interpreter's own (a pyenv or
    conda Python beside an older system libpython otherwise breaks the stub at start)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and any(Path(libdir).glob("libpython3*.so*")):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)


def serve(artifact: Path, instances: int, threads: int | None, host: str, http_port: int, grpc_port: int,
          metrics_port: int, log=print) -> None:
    """Run Triton with both models until SIGTERM or SIGINT."""
    try:
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise MossEdgeError("serving needs PyTriton: pip install 'moss-audio-edge[serve]'") from None
    from moss_edge.runtime.session import available_cores

    if instances < 1:
        raise MossEdgeError(f"--instances must be at least 1, got {instances}")
    threads = threads or max(1, available_cores() // instances)
    _python_library_path()
    inputs = [Tensor(name="audio", shape=(1,), dtype=np.bytes_, optional=True),
              Tensor(name="samples", shape=(-1,), dtype=np.float32, optional=True),
              Tensor(name="sample_rate", shape=(1,), dtype=np.int32, optional=True),
              Tensor(name="prompt", shape=(1,), dtype=np.bytes_, optional=True),
              Tensor(name="prompt_ids", shape=(-1,), dtype=np.int64, optional=True),
              Tensor(name="options", shape=(1,), dtype=np.bytes_, optional=True)]
    outputs = [Tensor(name="text", shape=(1,), dtype=np.bytes_), Tensor(name="thinking", shape=(1,), dtype=np.bytes_),
               Tensor(name="generated_tokens", shape=(1,), dtype=np.int64),
               Tensor(name="prompt_tokens", shape=(1,), dtype=np.int64),
               Tensor(name="stop_reason", shape=(1,), dtype=np.bytes_)]
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_port=metrics_port, exit_timeout_secs=10)
    with Triton(config=config) as triton:
        triton.bind(model_name=MODEL, infer_func=[Answerer(artifact, threads) for _ in range(instances)],
                    inputs=inputs, outputs=outputs, config=ModelConfig(batching=False), strict=True)
        triton.bind(model_name=STREAM_MODEL, infer_func=[Streamer(artifact, threads) for _ in range(instances)],
                    inputs=inputs, outputs=outputs[:1], config=ModelConfig(batching=False, decoupled=True), strict=True)
        signal.signal(signal.SIGTERM, lambda *_: triton.stop())
        log(f"serving {artifact} as {MODEL} and {STREAM_MODEL}, {instances} instance(s) x {threads} thread(s): "
            f"HTTP {host}:{http_port}, gRPC {host}:{grpc_port}, metrics :{metrics_port}")
        triton.serve()


def launch(artifact: Path, instances: int = 1, timeout_s: float = 180) -> tuple[subprocess.Popen, dict[str, str]]:
    """`moss-edge serve` in a child process on free local ports, returned once both models are
    ready: (process, {"http": host:port, "grpc": host:port, "metrics": host:port})."""
    import tritonclient.http as http

    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    log = tempfile.TemporaryFile("w+")  # not a pipe: a server nobody reads would block on a full one
    proc = subprocess.Popen([sys.executable, "-m", "moss_edge.cli", "serve", str(artifact), "--instances", str(instances),
                             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    urls = {name: f"127.0.0.1:{port}" for name, port in zip(("http", "grpc", "metrics"), ports)}
    client = http.InferenceServerClient(urls["http"])
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if client.is_model_ready(MODEL) and client.is_model_ready(STREAM_MODEL):
                return proc, urls
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    proc.kill()
    log.seek(0)
    raise MossEdgeError(f"moss-edge serve did not come up in {timeout_s:.0f} s:\n{log.read()[-3000:]}")
