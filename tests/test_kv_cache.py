"""The int8 KV cache of the CPU decoders (quantize/kv_cache.py): its graph form, its accuracy
against the fp32 cache on a long prompt, and the runtime on onnxruntime releases without it."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from moss_edge import bundled_audio
from moss_edge.quantize.kv_cache import HEADROOM, LEVELS, cache_ranges
from moss_edge.quantize.recipe import load_recipe
from moss_edge.runtime.artifact import Artifact, release
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import ORT_DECODER, PREFILL_DECODER, cache_names
from moss_edge.runtime.pipeline import Pipeline, to_waveform
from moss_edge.runtime.prompt import TextTokenizer


@pytest.fixture(scope="module")
def caches(packaged_artifacts, tmp_path_factory):
    """The packaged model quantized int4-awq (fp32 cache) and the same recipe with an int8 cache."""
    from moss_edge.quantize.artifact import quantize_artifact

    spec = tmp_path_factory.mktemp("recipe") / "int8-cache.json"
    recipe = load_recipe("int4-awq").to_dict()
    recipe["decoder"]["kv_cache"] = "int8"
    spec.write_text(json.dumps({**recipe, "name": "int4-awq-int8-cache"}))
    int8_cache = quantize_artifact(packaged_artifacts["fp32"], tmp_path_factory.mktemp("int8cache") / "art",
                                   load_recipe(str(spec)), verify=False, log=lambda m: None).path
    return {"int8": int8_cache, "fp32": packaged_artifacts["int4"]}


def test_kv_cache_int8_is_a_setting_of_a_cpu_decoder(tmp_path):
    def refused(decoder: dict, graph: str = "decoder") -> str:
        spec = tmp_path / "r.json"
        spec.write_text(json.dumps({graph: decoder}))
        with pytest.raises(MossEdgeError) as err:
            load_recipe(str(spec))
        return str(err.value)

    assert "kv_cache fp16" in refused({"precision": "int4", "dtype": "fp16", "kv_cache": "int8", "embedding": "fp16"})
    assert "weight-only" in refused({"precision": "int8-dynamic", "kv_cache": "int8"})
    assert "decoder setting" in refused({"precision": "int8-dynamic", "kv_cache": "int8"}, "encoder")
    assert "fp32, fp16 or int8" in refused({"precision": "int4", "kv_cache": "int4"})
    # the int4 presets keep fp32 (docs/quantization.md, "The KV cache": int8 pays on long recordings only)
    assert load_recipe("int4").graphs["decoder"].kv_cache == "fp32"
    assert load_recipe("int4-long").graphs["decoder"].kv_cache == "int8"
    assert load_recipe("int4-long").graphs["decoder"].prefill == "int8"
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps({"decoder": {"precision": "int4", "prefill": "int8", "kv_cache": "int8"}}))
    assert load_recipe(str(spec)).graphs["decoder"].kv_cache == "int8"


def test_the_cpu_decoders_cache_is_int8_with_scales_covering_the_calibrated_range(caches, tmp_path):
    art = Artifact.load(caches["int8"])
    m, d = art.manifest, art.dims
    assert m["quantization"]["kv_cache"]["dtype"] == "int8" and m["quantization"]["kv_cache"]["calibration_samples"] >= 1
    past = cache_names(d, "past")[0]
    for name in (ORT_DECODER, PREFILL_DECODER):
        entry = m["graphs"][name]
        assert entry["onnxruntime"] == ">=1.27"
        assert {i["name"]: i["dtype"] for i in entry["inputs"]}[past] == "int8"
    assert {i["name"]: i["dtype"] for i in m["graphs"]["decoder"]["inputs"]}[past] == "float32"  # the portable one
    # the token graph's attention keeps the cache in int8 itself, with one step per KV head and channel
    graphs = [onnx.load(str(art.graph_path(n)), load_external_data=False) for n in (ORT_DECODER, PREFILL_DECODER)]
    scales = [{i.name: numpy_helper.to_array(i) for i in g.graph.initializer if i.name.startswith("kv_cache_")} for g in graphs]
    assert len(scales[0]) == 2 * d.num_hidden_layers
    for node in (n for n in graphs[0].graph.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: a for a in node.attribute}
        assert attrs["kv_cache_bit_width"].i == 8 and attrs["k_quant_type"].s == b"PER_CHANNEL"
        assert node.input[12].startswith("kv_cache_key_scale_") and node.input[13].startswith("kv_cache_value_scale_")
    # the prompt graph's attends in fp32 to the cast window of the buffer, in units of the same steps:
    # queries times the key steps, new keys and values divided by theirs, the output times the value
    # steps; the piece's rows rounded together and scattered into the buffer
    made_by = {o: n for n in graphs[1].graph.node for o in n.output}
    window_end = "kv_cache_total"
    for layer in range(d.num_hidden_layers):
        key_step, value_step = (scales[0][f"kv_cache_{kind}_scale_{layer}"][0, :, 0] for kind in ("key", "value"))
        output = made_by[f"attention_{layer}"]
        attention = made_by[output.input[0]]
        assert attention.op_type == "GroupQueryAttention" and len(attention.input) == 9
        assert "kv_cache_bit_width" not in {a.name for a in attention.attribute}
        group = next(a.i for a in attention.attribute if a.name == "num_heads") // d.num_key_value_heads
        expected = {attention.input[0]: ("Mul", np.repeat(key_step, group, axis=0)),
                    attention.input[1]: ("Div", key_step), attention.input[2]: ("Div", value_step),
                    attention.output[0]: ("Mul", np.repeat(value_step, group, axis=0))}
        for name, (op, step) in expected.items():
            node = output if name == attention.output[0] else made_by[name]
            assert node.op_type == op
            np.testing.assert_array_equal(scales[1][node.input[1]], step.reshape(-1))
        written = []
        for slot in (3, 4):
            past, present = cache_names(d, "past")[2 * layer + slot - 3], cache_names(d, "present")[2 * layer + slot - 3]
            cast = made_by[attention.input[slot]]
            window = made_by[cast.input[0]]
            assert cast.op_type == "Cast" and window.op_type == "Slice"
            assert window.input[:3] == [past, "kv_cache_zero", window_end]
            scatter = made_by[present]
            assert scatter.op_type == "ScatterND" and scatter.input[0] == past
            split = made_by[scatter.input[2]]
            quantized = made_by[split.input[0]]
            assert split.op_type == "Split" and quantized.op_type == "QuantizeLinear"
            rows = made_by[quantized.input[0]]
            assert rows.op_type == "Concat" and made_by[rows.input[slot - 3]].input[0] == attention.output[slot - 2]
            written.append(quantized.output[0])
        assert written[0] == written[1]
        # the next layer's window is measured from the rows this one wrote, so each layer's runs in its turn
        if layer + 1 < d.num_hidden_layers:
            end = made_by[f"kv_cache_{layer + 1}_window_end"]
            assert end.op_type == "Add" and made_by[made_by[end.input[1]].input[0]].input[0] == written[0]
            window_end = end.output[0]

    # recomputed on the fp32-cache twin (the same weights): HEADROOM times each channel's calibrated
    # range, and a held-out clip's values within reach
    from moss_edge.calibration.dataset import CalibrationSample, build_samples, find_audio

    twin, source = tmp_path / "twin", Artifact.load(caches["fp32"])
    twin.mkdir()
    for f in {f for g in ("encoder", "adapter", ORT_DECODER) for f in source.manifest["graphs"][g]["files"]}:
        (twin / f).symlink_to(source.root / f)
    samples = build_samples(find_audio(None), count=m["quantization"]["recipe"]["calibration_samples"])
    tokenizer = TextTokenizer.from_dir(source.root) if source.tokenizer_files else None
    keys, values = cache_ranges(twin, d, art.token_ids, tokenizer, samples)
    for layer in range(d.num_hidden_layers):
        for kind, ranges in (("key", keys), ("value", values)):
            scale = scales[0][f"kv_cache_{kind}_scale_{layer}"][0, :, 0]
            np.testing.assert_allclose(scale, np.maximum(HEADROOM * ranges[layer] / LEVELS, np.finfo(np.float32).tiny),
                                       rtol=1e-5)
    held_out = CalibrationSample(bundled_audio("speech_en_10s.flac"), 0.0, 10.0, "What happens in the audio?")
    keys, values = cache_ranges(twin, d, art.token_ids, tokenizer, [held_out])
    for layer in range(d.num_hidden_layers):
        for kind, ranges in (("key", keys), ("value", values)):
            assert (ranges[layer] <= scales[0][f"kv_cache_{kind}_scale_{layer}"][0, :, 0] * LEVELS).all(), (kind, layer)


def test_onnxruntime_holds_one_layers_fp32_window_at_a_time(caches, tmp_path):
    """In the order ONNX Runtime runs the prompt graph, each layer casts its window after the
    previous layer's attention and rounds its new rows before the next layer's: the fp32 copies
    of the cache never pile up (they did, one per layer, before the windows were chained)."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    art = Artifact.load(caches["int8"])
    onnxruntime.InferenceSession(str(art.graph_path(PREFILL_DECODER)), options, providers=["CPUExecutionProvider"])
    ran = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node
    attention = [i for i, n in enumerate(ran) if n.op_type == "GroupQueryAttention"]
    at = {o: i for i, n in enumerate(ran) for o in n.output}
    assert len(attention) == art.dims.num_hidden_layers > 1
    for layer in range(1, art.dims.num_hidden_layers):
        for kind in ("key", "value"):
            assert attention[layer - 1] < at[f"past_{kind}_{layer}_steps"] < attention[layer]
        assert attention[layer - 1] < at[f"kv_cache_{layer - 1}_new_int8"] < attention[layer]


def _long_prompt(pipe: Pipeline):
    """About 45 s of the bundled speech, one clip: over 500 cached positions."""
    wave = np.concatenate([to_waveform(bundled_audio(n)) for n in ("speech_ko_18s.flac", "dialogue_zh_12s.flac",
                                                                   "speech_en_10s.flac", "speech_zh_4s.flac")])
    features = pipe.encode([wave])
    return features, pipe.prompt_ids("Transcribe the audio.", features.clip_tokens)


def test_the_int8_cache_answers_as_the_fp32_cache_does_on_a_long_prompt(caches):
    """Teacher-forced on the fp32 cache's greedy tokens: prompt and 32 steps, both prompt paths."""
    for prefill in ("int8", "decoder"):
        fp32, int8 = (Pipeline.load(caches[k], threads=1, prefill=prefill) for k in ("fp32", "int8"))
        assert int8.decoder.cache_dtype == np.int8 and fp32.decoder.cache_dtype == np.float32
        features, ids = _long_prompt(fp32)
        assert len(ids) > 500
        ref, got = [fp32.prefill(ids, features)], [int8.prefill(ids, features)]
        assert int8.decoder.buffers[0].data_type() == "tensor(int8)"
        for _ in range(32):
            token = int(np.argmax(ref[-1]))
            ref.append(fp32.step(token))
            got.append(int8.step(token))
        ref, got = np.array(ref, np.float64), np.array(got, np.float64)
        p = np.exp(ref - ref.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        log_q = got - got.max(1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
        kl = (p * (np.log(p) - log_q)).sum(1)
        assert kl.mean() < 2e-3, (prefill, kl.mean())
        assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.95, prefill


def test_an_onnxruntime_without_the_int8_cache_runs_the_portable_decoder(caches, monkeypatch):
    assert release("1.27.0") >= release("1.27") > release("1.26.3") and release("1.28.0.dev20260101") == (1, 28, 0)
    assert release("1.27.1+cu12") == (1, 27, 1)
    monkeypatch.setattr(onnxruntime, "__version__", "1.26.0")
    art = Artifact.load(caches["int8"])
    assert "needs onnxruntime >=1.27, this is 1.26.0" in art.unsupported(ORT_DECODER)
    assert art.unsupported("decoder") is None
    with pytest.warns(UserWarning, match="running the portable decoder instead"):
        pipe = Pipeline.load(caches["int8"], threads=1)
    assert pipe.decoder_graph == "decoder" and pipe.prefill_path == "decoder"
    assert pipe.generate(bundled_audio("speech_zh_4s.flac"), "What happens?", max_new_tokens=4).tokens
    with pytest.raises(MossEdgeError, match="upgrade onnxruntime"):
        Pipeline.load(caches["int8"], threads=1, decoder=ORT_DECODER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from moss_edge.runtime.parity import decoders_to_check

        assert {g for g, _, _ in decoders_to_check(Pipeline.load(caches["int8"], with_decoder=False))} == {"decoder"}


def test_info_says_how_the_cache_is_kept(caches, capsys, monkeypatch):
    from moss_edge.cli import main

    main(["info", str(caches["int8"])])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KV cache"))
    assert "int8 in decoder_ort, decoder_prefill" in line and "per channel" in line and ">=1.27" in line
    monkeypatch.setattr(onnxruntime, "__version__", "1.20.1")
    main(["info", str(caches["int8"])])
    assert "the runtime runs the portable decoder" in capsys.readouterr().out
    main(["info", str(caches["fp32"])])
    assert "KV cache" not in capsys.readouterr().out
