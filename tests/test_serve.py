"""`moss-edge serve` (issue 17): the packaged model's INT4 artifact behind Triton Inference
Server through PyTriton, called as clients call it. Needs the `serve` extra (PyTriton)."""

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the serve extra (nvidia-pytriton) is not installed")
import tritonclient.grpc as grpc  # noqa: E402  (installed with PyTriton)
import tritonclient.http as http  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from moss_edge import bundled_audio  # noqa: E402
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

    proc, urls = launch(packaged_int4, instances=2)
    yield {"proc": proc, **urls}
    if proc.poll() is None:
        proc.kill()


def _inputs(module, clip: bytes | None, prompt: str, options: dict | None):
    made = []
    for name, value in (("audio", clip), ("prompt", prompt.encode()),
                        ("options", None if options is None else json.dumps(options).encode())):
        if value is not None:
            x = module.InferInput(name, [1], "BYTES")
            x.set_data_from_numpy(np.array([value], dtype=np.object_))
            made.append(x)
    return made


def test_concurrent_requests_get_what_generate_gives(server, packaged_int4):
    pipe = Pipeline.load(packaged_int4)
    clips = {name: open(bundled_audio(name), "rb").read() for name in CLIPS}
    cases = [(CLIPS[i % 4], QUESTIONS[(i // 4) % 4]) for i in range(20)]

    def ask(case):
        client = http.InferenceServerClient(server["http"])
        r = client.infer("moss_audio", _inputs(http, clips[case[0]], case[1], {"max_new_tokens": 24}))
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
    client.async_stream_infer("moss_audio_stream", _inputs(grpc, open(bundled_audio(CLIPS[2]), "rb").read(), QUESTIONS[0],
                                                            {"max_new_tokens": 24}))
    client.stop_stream()  # waits for the stream's responses
    assert not done and len(pieces) > 1 and "".join(pieces) == want


def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(server):
    client = http.InferenceServerClient(server["http"])
    clip = open(bundled_audio(), "rb").read()
    for inputs, message in ((_inputs(http, None, "What is said?", None), "no audio"),
                            (_inputs(http, b"not audio at all", "What is said?", None), "cannot decode the audio bytes"),
                            (_inputs(http, clip, "What is said?", {"beams": 4}), "unknown option(s) beams")):
        with pytest.raises(InferenceServerException, match=message.replace("(", r"\(").replace(")", r"\)")):
            client.infer("moss_audio", inputs)
    r = client.infer("moss_audio", _inputs(http, clip, "What is said?", {"max_new_tokens": 4}))
    assert int(r.as_numpy("generated_tokens")[0]) >= 1


def test_sigterm_stops_the_server(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
