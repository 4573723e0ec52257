"""GPU backends: settings and shape profiles are checked here; runs happen where the hardware is."""

import json
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.pipeline import Pipeline
from moss_edge.runtime.graphs import GRAPHS, Dims, graph_spec, mismatches
from moss_edge.runtime.session import ShapeLimits, provider_list, tensorrt_options, trt_profiles


def _parse(spec: str) -> dict[str, list[int]]:
    return {name: [int(d) for d in dims.split("x")] for name, dims in (item.split(":") for item in spec.split(","))}


def test_trt_profiles_cover_every_input_within_limits(synthetic_artifact):
    manifest = json.loads((synthetic_artifact / "manifest.json").read_text())
    limits = ShapeLimits(max_chunks=16, max_prompt=600, max_context=1000)
    for graph in ("encoder", "adapter", "decoder"):
        profiles = trt_profiles(graph, Dims.from_manifest(manifest["model"]), limits)
        lo, opt, hi = (_parse(profiles[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
        inputs = manifest["graphs"][graph]["inputs"]
        assert set(lo) == set(opt) == set(hi) == {i["name"] for i in inputs}
        for spec in inputs:
            name = spec["name"]
            assert len(lo[name]) == len(spec["shape"])
            for d, (a, b, c) in enumerate(zip(lo[name], opt[name], hi[name])):
                assert a <= b <= c
                if isinstance(spec["shape"][d], int) and spec["shape"][d] > 0:  # static dims stay exact
                    assert a == b == c == spec["shape"][d]
    decoder = _parse(trt_profiles("decoder", Dims.from_manifest(manifest["model"]), limits)["trt_profile_max_shapes"])
    assert decoder["input_ids"] == [1, 600] and decoder["past_key_0"][2] == 1000


def test_tensorrt_settings(tmp_path):
    (name, options), *rest = tensorrt_options(tmp_path, {"trt_profile_min_shapes": "x:1"})
    assert name == "TensorrtExecutionProvider" and rest == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_fp16_enable"] is False and options["trt_profile_min_shapes"] == "x:1"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is present here")
def test_missing_gpu_provider_is_a_clear_error(synthetic_artifact):
    with pytest.raises(MossEdgeError, match="not available in this onnxruntime build"):
        Pipeline.load(synthetic_artifact, provider="cuda")
    with pytest.raises(MossEdgeError, match="unknown provider"):
        provider_list("npu")


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a GPU")
def test_cuda_matches_cpu(synthetic_artifact, upstream):
    cpu, cuda = Pipeline.load(synthetic_artifact), Pipeline.load(synthetic_artifact, provider="cuda")
    features = cpu.encode([upstream["audio"]])
    prompt = cpu.prompt_ids("Describe the audio.", features.clip_tokens)
    a, b = cpu.prefill(prompt, features), cuda.prefill(prompt, cuda.encode([upstream["audio"]]))
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-3


def test_exported_graphs_follow_the_graph_contract(synthetic_artifact):
    """Export takes names and dynamic axes from runtime/graphs.py, and the manifest's sizes fix
    the rest: the recorded inputs equal the contract exactly, outputs up to derived axes."""
    manifest = json.loads((synthetic_artifact / "manifest.json").read_text())
    dims = Dims.from_manifest(manifest["model"])
    for name in GRAPHS:
        spec, recorded = graph_spec(name, dims), manifest["graphs"][name]
        assert [(i["name"], tuple(i["shape"])) for i in recorded["inputs"]] == [(t.name, t.shape) for t in spec.inputs]
        assert [o["name"] for o in recorded["outputs"]] == [t.name for t in spec.outputs]
        for output, wanted in zip(recorded["outputs"], spec.outputs):
            assert [a if isinstance(w, int) else "dynamic" for a, w in zip(output["shape"], wanted.shape, strict=True)] == \
                   [w if isinstance(w, int) else "dynamic" for w in wanted.shape], output["name"]
    wrong = graph_spec("decoder", replace(dims, hidden_size=dims.hidden_size + 1))
    shapes = {i["name"]: i["shape"] for i in manifest["graphs"]["decoder"]["inputs"]}
    assert mismatches(wrong, shapes) == [f"audio_embeds dim 2 is {dims.hidden_size}, the manifest says {dims.hidden_size + 1}",
                                         f"deepstack_embeds dim 3 is {dims.hidden_size}, the manifest says {dims.hidden_size + 1}"]
    fewer = graph_spec("decoder", replace(dims, num_hidden_layers=dims.num_hidden_layers - 1))
    assert mismatches(fewer, shapes)[-1].startswith("inputs past_key_") and len(mismatches(fewer, shapes)) == 1
