"""The CPU encoder takes several chunks per run on long audio when memory allows, one otherwise,
and the features are those of one chunk per run."""

import numpy as np

from moss_edge import bundled_audio
from moss_edge.runtime import pipeline as pipeline_module
from moss_edge.runtime.pipeline import Pipeline, to_waveform


def _long_clip() -> np.ndarray:
    return np.concatenate([to_waveform(bundled_audio(n)) for n in ("speech_ko_18s.flac", "dialogue_zh_12s.flac")])


def test_chunks_per_run_follow_the_clip_and_the_memory(packaged_artifacts, monkeypatch):
    pipe = Pipeline.load(packaged_artifacts["fp32"], threads=1, with_decoder=False)
    assert pipe.chunks_per_run(1) == 1 and pipe.chunks_per_run(3) == 3
    assert pipe.chunks_per_run(150) == Pipeline.CPU_CHUNKS_PER_RUN
    short = 2 * Pipeline.CPU_CHUNKS_PER_RUN * pipe.encoder_chunk_bytes  # under what the rule asks for
    monkeypatch.setattr(pipeline_module, "available_memory", lambda: short - 1)
    assert pipe.chunks_per_run(150) == 1
    monkeypatch.setattr(pipeline_module, "available_memory", lambda: short + 1)
    assert pipe.chunks_per_run(150) == Pipeline.CPU_CHUNKS_PER_RUN


def _encoded(pipe: Pipeline, clip: np.ndarray, per_run: int | None):
    """The features, with per_run chunks per encoder run (None: the pipeline's choice), and the
    chunks each run took."""
    calls, run = [], pipe.encoder.run
    pipe.encoder.run = lambda *a, **k: calls.append(a[1]["mel"].shape[0]) or run(*a, **k)
    if per_run is not None:
        pipe.chunks_per_run = lambda chunks: per_run
    try:
        return pipe.encode([clip]), calls
    finally:
        pipe.encoder.run = run


def test_batched_chunks_give_the_features_of_one_chunk_per_run(packaged_artifacts):
    """fp32: the same numbers. Dynamic INT8 quantizes a run's activations with one scale, so a
    run of several chunks rounds differently, as close to the fp32 model as one chunk per run."""
    clip = _long_clip()
    fp32 = Pipeline.load(packaged_artifacts["fp32"], threads=1, with_decoder=False)
    batched, calls = _encoded(fp32, clip, None)
    assert max(calls) == Pipeline.CPU_CHUNKS_PER_RUN and len(calls) < sum(calls)
    one, calls = _encoded(fp32, clip, 1)
    assert set(calls) == {1}
    for a, b in ((batched.embeds, one.embeds), (batched.deepstack, one.deepstack)):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5 * np.abs(b).max()

    def cosine(a, b):
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    int8 = Pipeline.load(packaged_artifacts["int4"], threads=1, with_decoder=False)  # its encoder is dynamic INT8
    (int8_batched, _), (int8_one, _) = _encoded(int8, clip, None), _encoded(int8, clip, 1)
    for got, ref in (("embeds", "embeds"), ("deepstack", "deepstack")):
        near = cosine(getattr(int8_one, got), getattr(one, ref))
        assert cosine(getattr(int8_batched, got), getattr(one, ref)) >= min(near - 1e-4, 0.9995), got
