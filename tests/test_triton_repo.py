"""`moss-edge triton-repo` (issue 17): the repository's configs parse as Triton model configs
and match the manifest, and its Python-backend model, run here against a stand-in for Triton's
BLS calls (ONNX Runtime sessions on the repository's own graph files), answers as
Pipeline.generate does with the same decoder."""

import importlib.util
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("tritonclient", reason="the serve extra (tritonclient, with PyTriton) is not installed")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from moss_edge import bundled_audio  # noqa: E402
from moss_edge.cli import main  # noqa: E402
from moss_edge.quantize.artifact import quantize_artifact  # noqa: E402
from moss_edge.quantize.half_emulation import cpu_view, emulated  # noqa: E402
from moss_edge.quantize.recipe import PRESETS  # noqa: E402
from moss_edge.runtime.pipeline import Pipeline  # noqa: E402
from moss_edge.triton_repo import BLS_MODEL, MODELS  # noqa: E402

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


@pytest.fixture(scope="module")
def trt_artifact(synthetic_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "int4-trt"
    return quantize_artifact(synthetic_artifact, out, PRESETS["int4-trt"](), verify=False, log=lambda m: None).path


def _config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_configs_match_the_manifest(trt_artifact, synthetic_artifact, tmp_path):
    import json

    manifest = json.loads((trt_artifact / "manifest.json").read_text())
    assert main(["triton-repo", str(trt_artifact), "-o", str(tmp_path / "gpu"), "--gpu"]) == 0
    for graph, model in MODELS.items():
        config = _config(tmp_path / "gpu" / model / "config.pbtxt")
        entry = manifest["graphs"][graph]
        for want, got in ((entry["inputs"], config.input), (entry["outputs"], config.output)):
            assert [(t["name"], DTYPES[t["dtype"]], [d if isinstance(d, int) else -1 for d in t["shape"]]) for t in want] \
                == [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in got]
        assert config.backend == "onnxruntime" and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert trt.name == "tensorrt" and "trt_profile_max_shapes" in trt.parameters  # the check passed TensorRT
        assert all((tmp_path / "gpu" / model / "1" / f).is_file() for f in entry["files"])
    bls = _config(tmp_path / "gpu" / BLS_MODEL / "config.pbtxt")
    assert bls.backend == "python" and {t.name for t in bls.input} == {"audio", "samples", "sample_rate", "prompt",
                                                                       "prompt_ids", "options"}
    # a CPU-only artifact on CPU instances: no accelerator
    assert main(["triton-repo", str(synthetic_artifact), "-o", str(tmp_path / "cpu")]) == 0
    cpu = _config(tmp_path / "cpu" / "moss_decoder" / "config.pbtxt")
    assert not cpu.optimization.execution_accelerators.gpu_execution_accelerator
    assert cpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert main(["triton-repo", str(synthetic_artifact), "-o", str(tmp_path / "cpu")]) == 2  # exists: refused


def _fake_triton(repo):
    """triton_python_backend_utils as model.py uses it, with BLS calls run by ONNX Runtime: the
    fp16 graphs as their emulated fp32 twins (no fp16 CPU kernels), fed what model.py sends."""
    sessions = {}
    for graph, model in MODELS.items():
        path = repo / model / "1" / f"{graph}.onnx"
        onnx.save(emulated(onnx.load(str(path), load_external_data=False)), str(path))
        sessions[model] = ort.InferenceSession(str(path))

    class Tensor:
        def __init__(self, name, value):
            self._name, self._value = name, value

        def name(self):
            return self._name

        def as_numpy(self):
            return self._value

    class Response:
        def __init__(self, output_tensors=None, error=None):
            self.outputs, self.error_value = output_tensors, error

        def has_error(self):
            return self.error_value is not None

        def error(self):
            return self.error_value

        def output_tensors(self):
            return self.outputs

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            self.model, self.names, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            sent.update({(self.model, n): str(v.dtype) for n, v in feeds.items()})
            declared = {i.name: i.type for i in sessions[self.model].get_inputs()}
            values = sessions[self.model].run(self.names, {n: v.astype(np.float32) if declared[n] == "tensor(float)" else v
                                                           for n, v in feeds.items()})
            return Response([Tensor(n, v) for n, v in zip(self.names, values)])

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code):
            self._message, self.code = message, code

        def message(self):
            return self._message

    sent = {}  # (model, input) -> the dtype model.py sent
    module = types.ModuleType("triton_python_backend_utils")
    module.sent = sent
    module.Tensor, module.InferenceRequest, module.InferenceResponse, module.TritonError = \
        Tensor, InferenceRequest, Response, TritonError
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    module.Logger = types.SimpleNamespace(log_error=print)
    return module


def test_the_bls_model_answers_as_the_pipeline_does(trt_artifact, tmp_path, monkeypatch):
    assert main(["triton-repo", str(trt_artifact), "-o", str(tmp_path / "repo")]) == 0
    repo = tmp_path / "repo"
    fake = _fake_triton(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("moss_audio_model", repo / BLS_MODEL / "1" / "model.py")
    model_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_py)
    model = model_py.TritonPythonModel()
    model.initialize({"model_repository": str(repo / BLS_MODEL), "model_version": "1"})

    def request(**inputs):
        return {name: fake.Tensor(name, value) for name, value in inputs.items()}

    clip = open(bundled_audio("speech_zh_4s.flac"), "rb").read()
    good = request(audio=np.array([clip], np.object_), prompt=np.array([b"What is said?"], np.object_),
                   options=np.array([b'{"max_new_tokens": 6}'], np.object_))
    bad = request(prompt=np.array([b"What is said?"], np.object_))
    answered, refused = model.execute([good, bad])
    out = {t.name(): t.as_numpy() for t in answered.output_tensors()}
    with cpu_view(trt_artifact) as view:  # the same emulated graphs, run by the pipeline
        want = Pipeline.load(view, decoder="decoder").generate(bundled_audio("speech_zh_4s.flac"), "What is said?",
                                                               max_new_tokens=6)
    assert out["text"][0].decode() == want.text and int(out["generated_tokens"][0]) == len(want.tokens)
    assert int(out["prompt_tokens"][0]) == want.prompt_tokens
    # model.py sends each graph the types its config (the manifest) declares: fp16 activations and cache
    assert fake.sent[("moss_encoder", "mel")] == fake.sent[("moss_decoder", "past_key_0")] == "float16"
    assert refused.has_error() and "no audio" in refused.error().message() and refused.error().code == "INVALID_ARG"
