"""`moss-edge serve`: an artifact behind Triton Inference Server (the server binary that the
nvidia-pytriton wheel carries, CPU; see triton_server.py), as two Python-backend models whose
instances each hold a Pipeline and answer one request at a time:
  moss_audio         audio + prompt + options -> text, thinking, generated_tokens, prompt_tokens, stop_reason
  moss_audio_stream  the same inputs -> text pieces as they are generated (decoupled)

Inputs (no batch dimension; give one audio form and one prompt form):
  audio BYTES [1] (a wav/flac/ogg/mp3 file) | samples FP32 [-1] + sample_rate INT32 [1]
  prompt BYTES [1] (text, through the chat template) | prompt_ids INT64 [-1]
  options BYTES [1], optional: JSON with max_new_tokens, temperature, top_k, top_p, seed

A request's own mistake (a MossEdgeError) is answered INVALID_ARG (HTTP 400) with its message;
anything else INTERNAL (HTTP 500) with a reference, the traceback going to the server's log only.
Each model queues at most max_queue requests beyond those running, each for at most
queue_timeout_s; a request past either limit is answered UNAVAILABLE (HTTP 503).
"""

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from dataclasses import fields
from pathlib import Path

import numpy as np

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.sampling import SamplingOptions

MODEL, STREAM_MODEL = "moss_audio", "moss_audio_stream"
OPTIONS = [f.name for f in fields(SamplingOptions)]
REQUEST_INPUTS = (("audio", "TYPE_STRING", "1"), ("samples", "TYPE_FP32", "-1"), ("sample_rate", "TYPE_INT32", "1"),
                  ("prompt", "TYPE_STRING", "1"), ("prompt_ids", "TYPE_INT64", "-1"), ("options", "TYPE_STRING", "1"))
ANSWER_OUTPUTS = (("text", "TYPE_STRING"), ("thinking", "TYPE_STRING"), ("generated_tokens", "TYPE_INT64"),
                  ("prompt_tokens", "TYPE_INT64"), ("stop_reason", "TYPE_STRING"))
MODEL_PY = Path(__file__).parent / "triton_pipeline_model.py"
MAX_QUEUE, QUEUE_TIMEOUT_S = 8, 60.0


def request_arguments(request) -> tuple:
    """(audio, prompt, SamplingOptions) of one Triton request (a mapping of input name -> array),
    or MossEdgeError saying what is wrong with it."""
    has = {name for name, _, _ in REQUEST_INPUTS if name in request}
    if "audio" in has and has & {"samples", "sample_rate"}:
        raise MossEdgeError("send the audio one way: `audio` (file bytes) or `samples` with `sample_rate`, not both")
    if {"prompt", "prompt_ids"} <= has:
        raise MossEdgeError("send the prompt one way: `prompt` (text) or `prompt_ids`, not both")
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


def given_inputs(pb_utils, request) -> dict[str, np.ndarray]:
    """The inputs a Python-backend request carries, by name."""
    return {name: t.as_numpy() for name, _, _ in REQUEST_INPUTS
            if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None}


def answer_arrays(text: str, thinking: str, generated: int, prompt_tokens: int, stop_reason: str) -> dict[str, np.ndarray]:
    """moss_audio's outputs, by name."""
    return {"text": np.array([text.encode()], np.object_), "thinking": np.array([thinking.encode()], np.object_),
            "generated_tokens": np.array([generated], np.int64), "prompt_tokens": np.array([prompt_tokens], np.int64),
            "stop_reason": np.array([stop_reason.encode()], np.object_)}


def triton_error(pb_utils, err: Exception, model: str):
    """What a request that raised err is answered with: the request's own mistake as INVALID_ARG
    with our message; anything else as INTERNAL with a reference to the traceback, which is
    logged on the server (it names the server's files: no client sees it)."""
    if isinstance(err, MossEdgeError):
        return pb_utils.TritonError(" ".join(str(err).split()), pb_utils.TritonError.INVALID_ARG)
    reference = uuid.uuid4().hex[:12]
    pb_utils.Logger.log_error(f"{model}: request {reference} failed:\n"
                              + "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return pb_utils.TritonError(f"internal error in {model}; the server's log has it under {reference}",
                                pb_utils.TritonError.INTERNAL)


def python_model_config(name: str, instances: int, decoupled: bool = False, queue: tuple[int, float] | None = None,
                        parameters: dict[str, str] | None = None) -> str:
    """config.pbtxt of a Python-backend model with the request interface above; queue: (max
    requests waiting, seconds each may wait), past which Triton refuses a request."""
    ins = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] optional: true }}' for n, t, d in REQUEST_INPUTS)
    outputs = ANSWER_OUTPUTS[:1] if decoupled else ANSWER_OUTPUTS
    outs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] }}' for n, t in outputs)
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0", "input [", ins, "]", "output [", outs, "]",
             f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]"]
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    if queue is not None:
        size, wait_s = queue
        lines.append(f"dynamic_batching {{ default_queue_policy {{ max_queue_size: {size} timeout_action: REJECT "
                     f"default_timeout_microseconds: {round(wait_s * 1e6)} allow_timeout_override: true }} }}")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}')
    return "\n".join(lines) + "\n"


def write_models(repository: Path, artifact: Path, instances: int, threads: int, max_queue: int,
                 queue_timeout_s: float) -> Path:
    """The repository of moss_audio and moss_audio_stream over artifact."""
    for name, decoupled in ((MODEL, False), (STREAM_MODEL, True)):
        version = repository / name / "1"
        version.mkdir(parents=True)
        (version / "model.py").write_text(MODEL_PY.read_text())
        (repository / name / "config.pbtxt").write_text(python_model_config(
            name, instances, decoupled, (max_queue, queue_timeout_s),
            {"artifact": str(Path(artifact).resolve()), "threads": str(threads)}))
    return repository


def _ready(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def serve(artifact: Path, instances: int, threads: int | None, host: str, http_port: int, grpc_port: int,
          metrics_port: int, max_queue: int = MAX_QUEUE, queue_timeout_s: float = QUEUE_TIMEOUT_S, log=print) -> int:
    """Run Triton with both models until SIGTERM or SIGINT; the server's exit status."""
    from moss_edge.runtime.session import available_cores
    from moss_edge.triton_server import BundledServer

    if instances < 1:
        raise MossEdgeError(f"--instances must be at least 1, got {instances}")
    if max_queue < 1:  # Triton reads 0 as no limit
        raise MossEdgeError(f"--max-queue must be at least 1, got {max_queue}")
    if not queue_timeout_s > 0:
        raise MossEdgeError(f"--queue-timeout must be a positive number of seconds, got {queue_timeout_s}")
    server = BundledServer.find()
    threads = threads or max(1, available_cores() // instances)
    with tempfile.TemporaryDirectory(prefix="moss-edge-serve-") as workspace:
        workspace = Path(workspace)
        repository = write_models(workspace / "models", artifact, instances, threads, max_queue, queue_timeout_s)
        proc = server.start(repository, server.backends(workspace),
                            [f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
                             f"--grpc-port={grpc_port}", f"--metrics-address={host}", f"--metrics-port={metrics_port}"])
        stopping = []

        def stop(signum, _frame):
            stopping.append(signum)
            proc.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while proc.poll() is None and not _ready(f"{'127.0.0.1' if host == '0.0.0.0' else host}:{http_port}"):
                time.sleep(0.5)
            if proc.poll() is None:
                log(f"serving {artifact} as {MODEL} and {STREAM_MODEL}, {instances} instance(s) x {threads} thread(s), "
                    f"queue {max_queue} x {queue_timeout_s:g} s: HTTP {host}:{http_port}, gRPC {host}:{grpc_port}, "
                    f"metrics :{metrics_port}")
            code = proc.wait()
        finally:
            if proc.poll() is None:  # an error here: the server does not outlive us
                proc.terminate()
                proc.wait(timeout=30)
            for s, handler in previous.items():
                signal.signal(s, handler)
    if code != 0 and not stopping:
        raise MossEdgeError(f"the Triton server stopped with status {code}; its log above says why (a port in use, "
                            "a model that did not load)")
    return 0


def launch(artifact: Path, instances: int = 1, timeout_s: float = 180,
           extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, dict[str, str]]:
    """`moss-edge serve` in a child process on free local ports, returned once both models are
    ready: (process, {"http": host:port, "grpc": host:port, "metrics": host:port}). extra: more
    `serve` arguments."""
    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    log = tempfile.TemporaryFile("w+")  # not a pipe: a server nobody reads would block on a full one
    proc = subprocess.Popen([sys.executable, "-m", "moss_edge.cli", "serve", str(artifact), "--instances", str(instances),
                             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                             *extra], stdout=log, stderr=subprocess.STDOUT, text=True)
    urls = {name: f"127.0.0.1:{port}" for name, port in zip(("http", "grpc", "metrics"), ports)}
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if _ready(urls["http"]):
            return proc, urls
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    log.seek(0)
    raise MossEdgeError(f"moss-edge serve did not come up in {timeout_s:.0f} s:\n{log.read()[-3000:]}")
