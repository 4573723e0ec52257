"""Audio fed while it arrives (Pipeline.open_stream): the same prompt as the offline path, chunk
by chunk, for any block size; exact mode gives the offline result, the causal mel floor comes
close to it."""

import json
import threading

import numpy as np
import pytest

from conftest import rel_err
from moss_edge.runtime.audio import SAMPLE_RATE, prepare_waveform
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(fixture_artifact):
    return Pipeline.load(fixture_artifact)


def _prompt(pipe):
    return [pipe.ids.audio_start, pipe.ids.audio_end]


def _offline(pipe, wave):
    """The offline prompt ids and its prefill logits."""
    features = pipe.encode([wave])
    ids = pipe.prompt_ids(_prompt(pipe), features.clip_tokens)
    return ids, pipe.prefill(ids, features)


def _streamed(pipe, wave, block, exact, rate=SAMPLE_RATE):
    live = pipe.open_stream(_prompt(pipe), rate=rate, exact=exact)
    try:
        for start in range(0, len(wave), block):
            live.feed(wave[start : start + block])
        ids, logits = live.finish_logits()
        return ids, logits, live.reencoded
    finally:
        live.close()


def _speech_like(seconds, loud_from=None, seed=0):
    """Noise with a quiet stretch (values far below the loudest) and a loud part from loud_from s."""
    rng = np.random.default_rng(seed)
    wave = 0.01 * rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    wave[: SAMPLE_RATE // 2] *= 1e-4  # 80 dB quieter: what the mel floor raises
    if loud_from is not None:
        wave[int(loud_from * SAMPLE_RATE):] *= 20
    return wave


# clip lengths ending on a chunk (4 s) and a time marker (2 s) boundary, inside both, and shorter than a chunk
@pytest.mark.parametrize("seconds", [0.5, 2.0, 4.0, 6.01, 8.0, 12.345])
def test_exact_mode_is_the_offline_prefill_for_any_block_size(pipe, seconds):
    wave = _speech_like(seconds, loud_from=seconds * 0.7)
    ids, logits = _offline(pipe, wave)
    for block in (1000, 7919, 64040, len(wave)):
        got_ids, got, _ = _streamed(pipe, wave, block, exact=True)
        assert got_ids == ids, (seconds, block)  # audio tokens and time markers where the offline prompt has them
        assert rel_err(got, logits) < 1e-4, (seconds, block)


def test_the_causal_floor_is_close_and_exact_mode_reencodes_what_it_changes(pipe):
    wave = _speech_like(12.0, loud_from=9.0)  # the loudest moment comes in the last chunk
    ids, logits = _offline(pipe, wave)
    causal_ids, causal, _ = _streamed(pipe, wave, 4000, exact=False)
    exact_ids, exact, reencoded = _streamed(pipe, wave, 4000, exact=True)
    assert causal_ids == exact_ids == ids
    assert reencoded >= 1 and rel_err(exact, logits) < 1e-4
    cosine = float(np.dot(causal, logits) / np.linalg.norm(causal) / np.linalg.norm(logits))
    assert rel_err(causal, logits) > 1e-4 and cosine > 0.99  # a different floor for the early chunks, measured
    # a clip whose loudest moment comes first never moves the floor: nothing to encode again
    steady = _speech_like(12.0)
    steady[int(0.6 * SAMPLE_RATE) : int(0.7 * SAMPLE_RATE)] *= 30  # the loudest moment, in the first chunk
    _, _, none = _streamed(pipe, steady, 4000, exact=True)
    assert none == 0


def test_other_rates_are_resampled_as_they_arrive(pipe):
    wave16 = _speech_like(9.3, loud_from=1.0)
    t = np.arange(int(9.3 * 44100)) / 44100
    wave44 = np.interp(t, np.arange(len(wave16)) / SAMPLE_RATE, wave16).astype(np.float32)
    features = pipe.encode([(wave44, 44100)])
    ids = pipe.prompt_ids(_prompt(pipe), features.clip_tokens)
    logits = pipe.prefill(ids, features)
    got_ids, got, _ = _streamed(pipe, wave44, 4410, exact=True, rate=44100)
    assert got_ids == ids
    cosine = float(np.dot(got, logits) / np.linalg.norm(got) / np.linalg.norm(logits))
    assert cosine > 0.999


@pytest.mark.parametrize("text_first", [False, True])  # the question after the audio, or before it
def test_generation_after_a_stream_matches_generate(pipe, text_first):
    wave = _speech_like(6.5, loud_from=2.0)
    text = pipe.ids.digits[:3]
    prompt = text + _prompt(pipe) if text_first else _prompt(pipe) + text
    offline = pipe.generate(wave, prompt, max_new_tokens=8)
    with pipe.open_stream(prompt, exact=True) as live:
        for start in range(0, len(wave), 3200):
            live.feed(wave[start : start + 3200])
        streamed = live.finish(max_new_tokens=8)
    assert streamed.tokens == offline.tokens and streamed.prompt_tokens == offline.prompt_tokens
    t = streamed.timings  # the wait, and the encoder's and the decoder's part of it
    assert 0 < t["end_of_audio_encode_s"] and 0 < t["end_of_audio_prefill_s"]
    assert t["end_of_audio_encode_s"] + t["end_of_audio_prefill_s"] < t["end_of_audio_to_first_token_s"]
    assert pipe.generate(wave, prompt, max_new_tokens=2).tokens == offline.tokens[:2]  # released


def test_stream_misuse_is_refused_and_the_pipeline_released(pipe):
    live = pipe.open_stream(_prompt(pipe))
    with pytest.raises(MossEdgeError, match="unfinished stream"):
        pipe.generate(_speech_like(1.0), _prompt(pipe), max_new_tokens=1)  # the same thread, while it is open
    others = []
    thread = threading.Thread(target=lambda: others.append(pipe.generate(_speech_like(1.0), _prompt(pipe),
                                                                          max_new_tokens=1)))
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # another thread waits for the stream
    live.feed(np.zeros(100, np.float32))
    with pytest.raises(MossEdgeError, match="at least 160"):
        live.finish()
    thread.join(30)
    assert others and not thread.is_alive()  # finish released the pipeline, even failing
    with pytest.raises(MossEdgeError, match="finished"):
        live.feed(np.zeros(10, np.float32))
    with pytest.raises(MossEdgeError, match="positive whole number"):
        pipe.open_stream(_prompt(pipe), rate=0)
    with pytest.raises(MossEdgeError, match="exactly one audio clip"):
        pipe.open_stream([pipe.ids.audio_start, pipe.ids.audio_end] * 2)
    with pipe.open_stream(_prompt(pipe)) as again:  # the failed opens left the pipeline free
        again.feed(prepare_waveform(np.zeros(3200, np.float32), SAMPLE_RATE))


def test_cli_feeds_a_file_as_a_live_source(synthetic_artifact, capsys):
    from moss_edge import bundled_audio
    from moss_edge.cli import main

    args = ["run", str(synthetic_artifact), "--audio", bundled_audio("speech_ko_18s.flac"), "--prompt", "What is said?",
            "--max-new-tokens", "4", "--json"]
    assert main(args) == 0
    offline = json.loads(capsys.readouterr().out)
    assert main([*args, "--stream-input", "--exact"]) == 0
    captured = capsys.readouterr()
    live = json.loads(captured.out)
    assert live["tokens"] == offline["tokens"] and live["prompt_tokens"] == offline["prompt_tokens"]
    assert "end of audio -> first token" in captured.err and live["timings"]["end_of_audio_to_first_token_s"] > 0
    assert main(["run", str(synthetic_artifact), "--audio", bundled_audio(), "--prompt", "x", "--exact"]) == 2
    assert "options of --stream-input" in capsys.readouterr().err


def test_bench_reports_the_streamed_wait(tmp_path):
    from moss_edge.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--depths", "1,2", "--workdir", str(tmp_path / "w"), "-o", str(out),
                 "--audio-seconds", "9", "--decode-tokens", "2", "--recipes", "int4"]) == 0
    result = json.loads(out.read_text())
    for backend, by_depth in result["runs"].items():
        waits = [r.get("streamed_end_of_audio_to_first_token_s") for r in by_depth.values()]
        assert all(w is None for w in waits) if backend.startswith("torch") else all(w > 0 for w in waits), backend
    for r in result["runs"]["ort-int4"].values():  # the encoder's and the decoder's part of the wait
        assert 0 < r["streamed_encode_s"] and 0 < r["streamed_prefill_s"]
        assert r["streamed_encode_s"] + r["streamed_prefill_s"] <= r["streamed_end_of_audio_to_first_token_s"]
    assert result["extrapolated"]["ort-int4"]["streamed_end_of_audio_to_first_token_s"] > 0
