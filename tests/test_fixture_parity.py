"""Parity of our front end, prompt builder and PyTorch model with the upstream recording."""

import numpy as np
import pytest

from conftest import rel_err
from moss_edge.export.checkpoint import load_model
from moss_edge.export.reference import ReferencePipeline
from moss_edge.runtime.audio import load_audio, log_mel
from moss_edge.runtime.prompt import expand_audio_spans
from moss_edge.runtime.generation import generate_tokens
from moss_edge.runtime.sampling import SamplingOptions


@pytest.fixture(scope="module")
def run(upstream):
    # the fixture's custom ids (it ships no processor_config.json)
    pipe = ReferencePipeline(load_model(upstream["checkpoint"]), upstream["ids"])
    wave = load_audio(upstream["audio"])
    return pipe, log_mel(wave), pipe.encode([wave])


def test_waveform_and_mel(upstream, run):
    ref = upstream["npz"]
    assert np.array_equal(load_audio(upstream["audio"]), ref["waveform"])
    _, mel, _ = run
    assert mel.shape == ref["input_features"].shape
    assert np.abs(mel - ref["input_features"]).max() < 1e-4


def test_input_ids_with_time_markers(upstream, run):
    ref_ids = upstream["npz"]["input_ids"].tolist()
    ids = upstream["ids"]
    start, end = ref_ids.index(ids.audio_start), ref_ids.index(ids.audio_end)
    collapsed = ref_ids[: start + 1] + ref_ids[end:]
    _, _, audio = run
    assert audio.clip_tokens == [125]
    assert expand_audio_spans(collapsed, audio.clip_tokens, ids) == ref_ids


def test_encoder_taps_adapter_mergers(upstream, run):
    ref = upstream["npz"]
    _, _, audio = run
    assert rel_err(audio.tokens, ref["encoder_last_hidden_state"]) < 1e-4
    assert rel_err(audio.embeds, ref["adapter_audio_embeds"]) < 1e-4
    for k in range(3):
        assert rel_err(audio.taps[k], ref[f"encoder_tap_{k}"]) < 1e-4
        assert rel_err(audio.deepstack[k], ref[f"deepstack_embeds_{k}"]) < 1e-4


def test_prefill_logits(upstream, run):
    pipe, _, audio = run
    logits, _ = pipe.forward(upstream["npz"]["input_ids"].tolist(), audio, all_logits=True)
    assert rel_err(logits, upstream["npz"]["prefill_logits_all"]) < 1e-4


def test_greedy_tokens_with_kv_cache(upstream, run):
    pipe, _, audio = run
    tokens = list(generate_tokens(pipe, upstream["npz"]["input_ids"].tolist(), audio, SamplingOptions(max_new_tokens=24)))
    assert tokens == upstream["json"]["greedy_new_ids"]
