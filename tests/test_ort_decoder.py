"""The contrib-op decoder (decoder_ort.onnx): the same model as the portable decoder, on the
same bytes, with its KV cache written in place."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import onnx

from conftest import rel_err
from moss_edge.quantize.artifact import quantize_artifact
from moss_edge.quantize.recipe import load_recipe
from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.decoders import BufferedDecoderRunner
from moss_edge.runtime.graphs import ORT_DECODER, PREFILL_DECODER, graph_spec
from moss_edge.runtime.pipeline import Pipeline


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _decode(pipe, prompt, features, steps):
    """Prefill and `steps` greedy steps; the logits of each."""
    logits = [pipe.prefill(prompt, features)]
    for _ in range(steps):
        logits.append(pipe.step(int(np.argmax(logits[-1]))))
    return logits


def test_cpu_runs_the_contrib_decoder_with_the_portable_ones_results(fixture_artifact, upstream):
    manifest = _manifest(fixture_artifact)
    assert manifest["decoders"] == {"cpu": ORT_DECODER}
    entry = manifest["graphs"][ORT_DECODER]
    assert [(i["name"], tuple(i["shape"])) for i in entry["inputs"]] == \
           [(t.name, t.shape) for t in graph_spec(ORT_DECODER, Artifact.load(fixture_artifact).dims).inputs]
    # one copy of the weights on disk: both graphs point into the portable decoder's data file
    assert set(entry["files"]) == {"decoder_ort.onnx", "decoder.onnx.data"}
    assert entry["files"]["decoder.onnx.data"] == manifest["graphs"]["decoder"]["files"]["decoder.onnx.data"]
    graph = onnx.load(str(fixture_artifact / "decoder_ort.onnx"), load_external_data=False)
    assert {t.name for t in graph.graph.initializer if len(t.raw_data) > 4096} == {"rope_cos", "rope_sin"}

    ort_pipe, portable = Pipeline.load(fixture_artifact), Pipeline.load(fixture_artifact, decoder="decoder")
    assert (ort_pipe.decoder_graph, portable.decoder_graph) == (ORT_DECODER, "decoder")
    assert isinstance(ort_pipe.decoder, BufferedDecoderRunner)
    ort_pipe.decoder.HEADROOM = 8  # so that 40 steps grow the cache buffers several times
    ids = upstream["ids"]
    features = ort_pipe.encode([upstream["audio"]])
    prompt = ort_pipe.prompt_ids([ids.audio_start, ids.audio_end], features.clip_tokens)
    got, want = _decode(ort_pipe, prompt, features, 40), _decode(portable, prompt, features, 40)
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-4
    assert ort_pipe.decoder.buffers[0].shape()[2] > len(prompt) + 8  # it did grow
    # the ablation reaches both: DeepStack off changes the logits the same way
    off = ort_pipe.prefill(prompt, features, deepstack=False)
    assert rel_err(off, portable.prefill(prompt, features, deepstack=False)) < 1e-4 and rel_err(off, got[0]) > 1e-3


def test_quantized_artifacts_carry_the_contrib_decoder_and_verify_both(fixture_artifact, tmp_path):
    out = quantize_artifact(fixture_artifact, tmp_path / "int4", load_recipe("int4-awq"), cache_dir=tmp_path / "cache",
                            log=lambda m: None)
    manifest = out.manifest
    assert manifest["decoders"] == {"cpu": ORT_DECODER} and manifest["graphs"][ORT_DECODER]["precision"] == "int4"
    assert manifest["quantization"]["ort_cpu_kernels"][ORT_DECODER]["MatMulNBits"] > 0  # still fused at load
    report = out.report  # both decoders, and decoder_ort's tokens after the INT8 prompt graph's prefill
    assert set(report["end_to_end_by_decoder"]) == {ORT_DECODER, "decoder", PREFILL_DECODER}
    assert {"decoder", ORT_DECODER, PREFILL_DECODER} <= set(report["graphs"]) and report["summary"]["decoder"] == ORT_DECODER
    # the same DequantizeLinear weights and AWQ input scales as the portable graph, not a copy
    graph = onnx.load(str(out.path / "decoder_ort.onnx"), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"} and any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)


def test_head_sizes_groupqueryattention_cannot_take_keep_the_portable_decoder(synthetic_artifact):
    manifest = _manifest(synthetic_artifact)  # the synthetic preset's head_dim is 24, not a multiple of 16
    assert "decoders" not in manifest and ORT_DECODER not in manifest["graphs"]
    assert Pipeline.load(synthetic_artifact).decoder_graph == "decoder"


def test_long_prompts_are_prefilled_in_pieces_with_the_same_result(fixture_artifact, upstream):
    from moss_edge.runtime.decoders import decoder_runner, prefill_pieces

    assert prefill_pieces(10, 4) == [(0, 4), (4, 8), (8, 10)] and prefill_pieces(3, 8) == [(0, 3)]
    pipe = Pipeline.load(fixture_artifact)
    ids = upstream["ids"]
    features = pipe.encode([upstream["audio"]])
    prompt = pipe.prompt_ids([ids.audio_start, ids.audio_end], features.clip_tokens)
    for graph in (ORT_DECODER, "decoder"):
        whole = pipe.using_decoder(graph)
        pieces = copy.copy(whole)
        pieces.decoder = decoder_runner(graph, whole.decoder.session, whole.dims, prefill_chunk=7)
        assert len(prompt) > 3 * 7
        got, want = _decode(pieces, prompt, features, 4), _decode(whole, prompt, features, 4)
        assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-4, graph
        assert pieces.decoder.length == whole.decoder.length == len(prompt) + 4


def test_gpu_sessions_keep_the_kv_cache_on_the_device():
    from moss_edge.runtime.decoders import output_devices

    class Stub:  # what output_devices reads of an onnxruntime session
        def __init__(self, provider):
            self.provider = provider

        def get_providers(self):
            return [self.provider, "CPUExecutionProvider"]

        def get_outputs(self):
            return [SimpleNamespace(name=n) for n in ("logits", "present_key_0", "present_value_0")]

    for provider, cache in (("CUDAExecutionProvider", "cuda"), ("TensorrtExecutionProvider", "cuda"),
                            ("CPUExecutionProvider", "cpu")):
        assert output_devices(Stub(provider)) == {"logits": "cpu", "present_key_0": cache, "present_value_0": cache}
