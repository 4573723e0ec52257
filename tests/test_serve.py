"""`moss-edge serve`: the packaged model's INT4 artifact behind Triton Inference Server, called
as clients call it (tritonclient over HTTP and gRPC, and plain HTTP). Needs the `serve` extra
(nvidia-pytriton: the server binary and tritonclient)."""

import json
import re
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the serve extra (nvidia-pytriton) is not installed")
import tritonclient.grpc as grpc  # noqa: E402  (installed with PyTriton)
import tritonclient.http as http  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from moss_edge import bundled_audio  # noqa: E402
from moss_edge.runtime.errors import MossEdgeError  # noqa: E402
from moss_edge.runtime.pipeline import Pipeline  # noqa: E402

QUESTIONS = ["List the events with their start times.", "How many events are there?", "When does the first event start?",
             "What happens at second 3?"]
CLIPS = ["speech_en_10s.flac", "speech_zh_4s.flac", "dialogue_zh_12s.flac", "speech_ko_18s.flac"]


@pytest.fixture(scope="module")
def packaged_int4(packaged_artifacts):
    return packaged_artifacts["int4"]


@pytest.fixture(scope="module")
def server(packaged_int4):
    from moss_edge.serve import launch

    proc, urls = launch(packaged_int4, instances=2, extra=("--max-queue", "20"))  # the 20 concurrent requests below
    yield {"proc": proc, **urls}
    if proc.poll() is None:
        proc.kill()


def test_concurrent_requests_get_what_generate_gives(server, packaged_int4):
    pipe = Pipeline.load(packaged_int4)
    clips = {name: open(bundled_audio(name), "rb").read() for name in CLIPS}
    cases = [(CLIPS[i % 4], QUESTIONS[(i // 4) % 4]) for i in range(20)]

    def ask(case):
        client = http.InferenceServerClient(server["http"])
        r = client.infer("moss_audio", _request(http, {"audio": clips[case[0]], "prompt": case[1], "options": {"max_new_tokens": 24}}))
        return r.as_numpy("text")[0].decode(), int(r.as_numpy("generated_tokens")[0]), int(r.as_numpy("prompt_tokens")[0])

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, cases))
    for (clip, question), (text, generated, prompt_tokens) in zip(cases, answers):
        want = pipe.generate(bundled_audio(clip), question, max_new_tokens=24)
        assert (text, generated, prompt_tokens) == (want.text, len(want.tokens), want.prompt_tokens)


def test_a_streamed_answer_over_grpc(server, packaged_int4):
    want = Pipeline.load(packaged_int4).generate(bundled_audio(CLIPS[2]), QUESTIONS[0], max_new_tokens=24).text
    pieces, done = [], []

    def received(result, error):
        if error is not None:
            done.append(error)
        else:
            pieces.append(result.as_numpy("text")[0].decode())

    client = grpc.InferenceServerClient(server["grpc"])
    client.start_stream(callback=received)
    client.async_stream_infer("moss_audio_stream", _request(grpc, {"audio": open(bundled_audio(CLIPS[2]), "rb").read(),
                                                             "prompt": QUESTIONS[0], "options": {"max_new_tokens": 24}}))
    client.stop_stream()  # waits for the stream's responses
    assert not done and len(pieces) > 1 and "".join(pieces) == want


BAD_REQUESTS = [  # (what is sent, the start of our answer)
    ({"prompt": "What is said?"}, "no audio: send `audio`"),
    ({"clip": True, "prompt": "What is said?", "options": {"temperature": -3}}, "temperature must be a finite number >= 0"),
    ({"samples": np.full(16000, 1e9, np.float32), "prompt": "What is said?"}, "audio samples reach 1000000000"),
    ({"audio": b"not audio at all", "prompt": "What is said?"}, "cannot decode the audio bytes (Format not recognised)"),
    ({"clip": True, "prompt": "What is said?", "options": {"beams": 4}}, "unknown option(s) beams"),
    ({"clip": True, "samples": np.zeros(16000, np.float32), "prompt": "What is said?"}, "send the audio one way"),
]


def _request(module, case: dict) -> list:
    """Triton inputs of a BAD_REQUESTS case."""
    made = []

    def add(name, datatype, value):
        x = module.InferInput(name, list(value.shape), datatype)
        x.set_data_from_numpy(value)
        made.append(x)

    if case.get("clip"):
        add("audio", "BYTES", np.array([open(bundled_audio(), "rb").read()], np.object_))
    if "audio" in case:
        add("audio", "BYTES", np.array([case["audio"]], np.object_))
    if "samples" in case:
        add("samples", "FP32", case["samples"])
        add("sample_rate", "INT32", np.array([16000], np.int32))
    add("prompt", "BYTES", np.array([case["prompt"].encode()], np.object_))
    if "options" in case:
        add("options", "BYTES", np.array([json.dumps(case["options"]).encode()], np.object_))
    return made


def _ours_alone(message: str, want: str) -> None:
    """message is our one line: nothing of the server's insides."""
    assert message.startswith(want), message
    assert "\n" not in message and "Traceback" not in message and 'File "' not in message, message
    assert not re.search(r"(^|[\s'\"(])/[\w.-]+/|\.py\b|site-packages", message), message  # no absolute path


def test_a_clients_mistake_is_invalid_argument_with_our_message_alone(server):
    http_client, grpc_client = http.InferenceServerClient(server["http"]), grpc.InferenceServerClient(server["grpc"])
    for case, want in BAD_REQUESTS:
        for client, module, status in ((http_client, http, "400"), (grpc_client, grpc, "StatusCode.INVALID_ARGUMENT")):
            with pytest.raises(InferenceServerException) as raised:
                client.infer("moss_audio", _request(module, case))
            assert raised.value.status() == status, (case, raised.value)
            _ours_alone(raised.value.message(), want)
    r = http_client.infer("moss_audio", _request(http, {"clip": True, "prompt": "What is said?", "options": {"max_new_tokens": 4}}))
    assert int(r.as_numpy("generated_tokens")[0]) >= 1  # and the server keeps serving


def test_a_streamed_requests_mistake_is_our_message_alone(server):
    for case, want in BAD_REQUESTS:  # gRPC: the stream protocol carries the message, no status code
        got = []
        client = grpc.InferenceServerClient(server["grpc"])
        client.start_stream(callback=lambda result, error: got.append((result, error)))
        client.async_stream_infer("moss_audio_stream", _request(grpc, case))
        client.stop_stream()
        assert len(got) == 1 and got[0][0] is None, got
        _ours_alone(got[0][1].message(), want)
    # HTTP (the generate extension, as server-sent events): 400 with the message
    body = json.dumps({"sample_rate": 16000, "prompt": "What is said?"}).encode()
    request = urllib.request.Request(f"http://{server['http']}/v2/models/moss_audio_stream/generate_stream", data=body)
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 400
    event = raised.value.read().decode()
    assert event.startswith("data: ")
    _ours_alone(json.loads(event[len("data: "):])["error"], "no audio: send `audio`")


def test_a_server_fault_is_internal_with_a_reference_and_the_traceback_only_in_the_log():
    from moss_edge.serve import triton_error

    logged = []

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code):
            self.message, self.code = message, code

    pb_utils = SimpleNamespace(TritonError=TritonError, Logger=SimpleNamespace(log_error=logged.append))
    try:
        np.zeros(3)[5]
    except IndexError as err:
        answer = triton_error(pb_utils, err, "moss_audio")
    assert answer.code == "INTERNAL" and "index 5" not in answer.message and "Traceback" not in answer.message
    reference = answer.message.rsplit(" ", 1)[-1]
    assert len(logged) == 1 and reference in logged[0] and "IndexError: index 5" in logged[0] and "test_serve.py" in logged[0]
    answer = triton_error(pb_utils, MossEdgeError("no audio:\n  send some"), "moss_audio")
    assert (answer.code, answer.message) == ("INVALID_ARG", "no audio: send some") and len(logged) == 1


def test_a_burst_past_the_queue_is_refused_at_once_as_unavailable(packaged_int4):
    """One instance, two waiting places, 10 ms of waiting at most: of a burst of 8, the one
    running answers, the two queued wait past 10 ms (a request runs longer) and the rest find
    the queue full; HTTP says 503, gRPC UNAVAILABLE."""
    from moss_edge.serve import launch

    proc, urls = launch(packaged_int4, instances=1, extra=("--max-queue", "2", "--queue-timeout", "0.01"))
    try:
        start = threading.Barrier(8)

        def ask(i):
            module = (http, grpc)[i % 2]
            client = module.InferenceServerClient(urls[module.__name__.rsplit(".", 1)[-1]])
            inputs = _request(module, {"clip": True, "prompt": QUESTIONS[0], "options": {"max_new_tokens": 24}})
            start.wait(timeout=60)
            try:
                client.infer("moss_audio", inputs)
                return module, "ok", ""
            except InferenceServerException as err:
                return module, err.status(), err.message()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        refused = [(m, status, message) for m, status, message in answers if status != "ok"]
        assert len(refused) < 8 and {status for m, status, _ in refused} <= {"503", "StatusCode.UNAVAILABLE"}
        assert all(status == ("503" if m is http else "StatusCode.UNAVAILABLE") for m, status, _ in refused)
        reasons = [message.split("] ")[-1] for _, _, message in refused]
        assert "Exceeds maximum queue size" in reasons and "Request timeout expired" in reasons, reasons
        r = http.InferenceServerClient(urls["http"]).infer("moss_audio", _request(http, {"clip": True, "prompt": "Hi"}))
        assert r.as_numpy("stop_reason")[0]  # served again once the burst is over
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_sigterm_stops_the_server(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
