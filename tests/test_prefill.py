"""The prompt graph (decoder_prefill.onnx): prompts on the CPU's integer GEMM, tokens on INT4,
one KV cache between them."""

import copy
import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from moss_edge import bundled_audio
from moss_edge.quantize.dynamic_int8 import INT16_MAX, emulate_pair_saturation
from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.decoders import BufferedDecoderRunner
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import ORT_DECODER, PREFILL_DECODER, graph_spec
from moss_edge.runtime.pipeline import Pipeline, choose_prefill
from moss_edge.runtime.session import make_session

CLIPS = ("speech_en_10s.flac", "dialogue_zh_12s.flac")
SEEDS = (9, 21, 33)  # held-out sound-event examples: the packaged model's own task


def _cosine(a, b) -> float:
    """0 where either side is all zeros (a row quantized away entirely)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms else 0.0


def _kl(ref, got) -> float:
    lp, lq = (np.asarray(z, np.float64) - np.max(z) for z in (ref, got))
    lp, lq = lp - np.log(np.exp(lp).sum()), lq - np.log(np.exp(lq).sum())
    return float(np.sum(np.exp(lp) * (lp - lq)))


@pytest.fixture(scope="module")
def int4(packaged_artifacts):
    return packaged_artifacts["int4"]


@pytest.fixture(scope="module")
def prompts(packaged_artifacts):
    """Audio features (from the fp32 artifact) and prompts, the same inputs for every path: the
    packaged model's task (sound events and its questions about them), then real recordings."""
    from moss_edge.sound_events.task import make_example

    fp32 = Pipeline.load(packaged_artifacts["fp32"])
    examples = [make_example(np.random.default_rng(seed), "list") for seed in SEEDS]
    out = []
    for wave, question in [(e.wave, e.question) for e in examples] + [(bundled_audio(c), "Describe the audio.") for c in CLIPS]:
        features = fp32.encode([wave])
        out.append((fp32.prompt_ids(question, features.clip_tokens), features))
    return out


def test_the_int4_presets_write_a_prompt_graph_in_the_cpu_independent_int8_format(int4):
    manifest = json.loads((int4 / "manifest.json").read_text())
    assert manifest["prefill"] == {"cpu": PREFILL_DECODER}
    entry = manifest["graphs"][PREFILL_DECODER]
    dims = Artifact.load(int4).dims
    spec = graph_spec(PREFILL_DECODER, dims)
    assert [o["name"] for o in entry["outputs"]] == [t.name for t in spec.outputs] == \
           [t.name for t in graph_spec(ORT_DECODER, dims).outputs]  # the token graph's, logits included
    # its own INT8 weights, and the token graph's file for what both read (the table, the norms, the lm_head)
    assert set(entry["files"]) == {"decoder_prefill.onnx", "decoder_prefill.onnx.data", "decoder.onnx.data"}
    graph = onnx.load(str(int4 / "decoder_prefill.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    integer = [n for n in graph.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(integer) == 7 * dims.num_hidden_layers  # every layer's seven; the lm_head stays the token graph's
    for node in integer:
        w = weights[node.input[1]]
        assert w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 64
    record = manifest["quantization"]["prefill"]
    assert record["int8_weights"] == len(integer) and record["worst_u8s8_pair_sum"] <= INT16_MAX
    kernels = manifest["quantization"]["ort_cpu_kernels"][PREFILL_DECODER]
    assert kernels["MatMulInteger"] == len(integer) and kernels["MatMulNBits"] == 1  # the lm_head
    assert kernels["dequantized_weights"] == kernels["fp32_weight_matmuls"] == 0
    assert manifest["checks"]["ort-cpu"]["passed"] and PREFILL_DECODER in manifest["checks"]["ort-cpu"]["graphs"]


def test_the_prompt_path_is_chosen_from_the_cpu_and_the_artifact(int4, packaged_artifacts):
    artifact = Artifact.load(int4)
    assert choose_prefill(artifact, "cpu", ORT_DECODER, "auto", {"avx2", "amx_int8"}) == ("int8", "this CPU has amx_int8")
    assert choose_prefill(artifact, "cpu", ORT_DECODER, "auto", {"asimd", "asimddp"})[0] == "int8"  # ARM64 dot products
    assert choose_prefill(artifact, "cpu", ORT_DECODER, "auto", {"avx2", "fma"})[0] == "decoder"  # vpmaddubsw only
    assert choose_prefill(artifact, "cpu", ORT_DECODER, "int8", set()) == ("int8", "asked for")
    assert choose_prefill(artifact, "cpu", ORT_DECODER, "decoder", {"amx_int8"}) == ("decoder", "asked for")
    assert choose_prefill(artifact, "cpu", "decoder", "auto", {"amx_int8"})[0] == "decoder"  # the portable decoder has none
    fp32 = Artifact.load(packaged_artifacts["fp32"])
    assert choose_prefill(fp32, "cpu", ORT_DECODER, "auto", {"amx_int8"})[0] == "decoder"
    with pytest.raises(MossEdgeError, match="no INT8 prompt graph.*prefill"):
        choose_prefill(fp32, "cpu", ORT_DECODER, "int8", {"amx_int8"})
    with pytest.raises(MossEdgeError, match="prefill must be one of auto, int8, decoder"):
        choose_prefill(artifact, "cpu", ORT_DECODER, "fast", set())
    edited = Artifact(artifact.root, {**artifact.manifest, "prefill": {"cpu": "decoder_gone"}})
    with pytest.raises(MossEdgeError, match="chooses a prompt graph .* that it does not list"):
        choose_prefill(edited, "cpu", ORT_DECODER, "decoder", set())
    pipe = Pipeline.load(int4, prefill="int8")
    assert pipe.settings["prefill"] == {"path": "int8", "why": "asked for"}
    assert set(pipe.settings["sessions"]) == {"encoder", "adapter", ORT_DECODER, PREFILL_DECODER}
    assert PREFILL_DECODER not in Pipeline.load(int4, prefill="decoder").settings["sessions"]


def test_int8_prompts_agree_with_the_fp32_model_as_closely_as_int4_prompts(packaged_artifacts, int4, prompts):
    """Last-position logits against the fp32 export (itself within 1e-6 of PyTorch), and the
    answer decoded greedily on from the cache the prompt graph wrote: the fp32 answer on the
    model's own task (the recordings are speech, which it was not trained on: logits only)."""
    fp32, q8, q4 = (Pipeline.load(packaged_artifacts["fp32"]), Pipeline.load(int4, prefill="int8"),
                    Pipeline.load(int4, prefill="decoder"))
    for n, (prompt, features) in enumerate(prompts):
        assert len(prompt) > BufferedDecoderRunner.MIN_PROMPT_POSITIONS
        ref, via_int8, via_int4 = (p.prefill(prompt, features) for p in (fp32, q8, q4))
        assert _cosine(via_int8, ref) > 0.99 and _kl(ref, via_int8) < 0.05
        assert _kl(ref, via_int8) < 2 * _kl(ref, via_int4) + 1e-3
        if n >= len(SEEDS):
            continue
        tokens = {}
        for name, pipe, logits in (("fp32", fp32, ref), ("int8", q8, via_int8)):
            tokens[name] = []
            for _ in range(12):
                tokens[name].append(int(np.argmax(logits)))
                logits = pipe.step(tokens[name][-1])
        assert tokens["int8"] == tokens["fp32"]


def test_the_token_graph_continues_the_cache_the_prompt_graph_wrote(int4, prompts):
    prompt, features = prompts[0]
    q8, q4 = Pipeline.load(int4, prefill="int8"), Pipeline.load(int4, prefill="decoder")
    runs = []
    session = q8.decoder.prompt_session

    class Counting:  # what the runner calls of the prompt graph's session
        def io_binding(self):
            return session.io_binding()

        def run_with_iobinding(self, binding, options=None):
            runs.append(1)
            return session.run_with_iobinding(binding, options)

    q8.decoder.prompt_session = Counting()
    q8.prefill(prompt, features)
    q4.prefill(prompt, features)
    assert len(runs) == -(-len(prompt) // BufferedDecoderRunner.PROMPT_PIECE) and q8.decoder.length == len(prompt)
    for a, b in zip(q8.decoder.buffers, q4.decoder.buffers):  # every layer's keys and values, every position
        assert _cosine(a.numpy()[:, :, : len(prompt)], b.numpy()[:, :, : len(prompt)]) > 0.995
    # a short run (a stream's last words, a turn of chat) stays on the token graph
    runs.clear()
    short = BufferedDecoderRunner.MIN_PROMPT_POSITIONS - 1
    zeros = np.zeros((short, q8.dims.hidden_size), np.float32)
    q8.decoder.extend(list(range(10, 10 + short)), zeros, np.zeros((q8.dims.num_deepstack, short, q8.dims.hidden_size),
                                                                       np.float32))
    assert runs == [] and q8.decoder.length == len(prompt) + short


def test_one_outlying_position_does_not_cost_the_others_their_precision(int4, tmp_path):
    """Activations are quantized per position: a row 1000 times larger than the rest (as Qwen3's
    attention-sink positions are) leaves the other rows' integers alone. One of the prompt
    graph's matmuls, cut out of it, against the exact product; quantizing the same rows per
    tensor instead (one scale for all) loses the other rows."""
    model = onnx.load(str(int4 / "decoder_prefill.onnx"))
    made = {o: n for n in model.graph.node for o in n.output}
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    product = next(n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat")
    rescale = next(n for n in model.graph.node if n.op_type == "Mul" and product.output[0] in n.input)
    x = made[made[product.input[0]].input[0]].input[0]  # QuantizeLinear <- Div(x, row scale)
    nodes, wanted = {}, [rescale.output[0]]
    while wanted:  # the nodes between x and the rescaled product
        node = made.get(wanted.pop())
        if node is not None and node.output[0] != x and node.output[0] not in nodes:
            nodes[node.output[0]] = node
            wanted += list(node.input)
    order = [n for n in model.graph.node if n.output[0] in nodes]
    used = {i for n in order for i in n.input}
    part = onnx.helper.make_model(onnx.helper.make_graph(
        order, "one_matmul", [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info(rescale.output[0], onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items() if k in used]), opset_imports=model.opset_import)
    w = weights[product.input[1]].astype(np.float64) * weights[product.input[3]]
    rows = np.random.default_rng(0).standard_normal((1, 40, w.shape[0])).astype(np.float32)
    rows[0, 0] *= 1000
    got = ort.InferenceSession(part.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {x: rows})[0]
    exact = rows.astype(np.float64) @ w
    worst = min(_cosine(got[0, i], exact[0, i]) for i in range(1, rows.shape[1]))
    lo, hi = float(rows.min()), float(rows.max())  # one scale for the tensor, as DynamicQuantizeLinear takes
    scale = (max(hi, 0) - min(lo, 0)) / 255
    per_tensor = (np.clip(np.rint(rows / scale) + np.rint(-min(lo, 0) / scale), 0, 255) - np.rint(-min(lo, 0) / scale)) * scale
    worst_per_tensor = min(_cosine(per_tensor[0, i] @ w, exact[0, i]) for i in range(1, rows.shape[1]))
    assert worst > 0.999 and worst_per_tensor < 0.9


@pytest.fixture(scope="module")
def emulated(int4, tmp_path_factory):
    """A copy of the artifact whose prompt graph computes what AVX2 kernels without VNNI compute."""
    root = tmp_path_factory.mktemp("emulated") / "int4"
    shutil.copytree(int4, root)
    model = emulate_pair_saturation(onnx.load(str(root / "decoder_prefill.onnx"), load_external_data=False), root)
    onnx.save(model, str(root / "decoder_prefill_emulated.onnx"))
    return root


def test_prompt_graph_computes_the_same_on_cpus_without_vnni(emulated, prompts):
    """7-bit weights times activations in [1, 255]: no int16 pair saturates, so the emulated
    saturating kernel and this CPU's kernel give the same cache and logits."""
    prompt, features = prompts[0]
    native = Pipeline.load(emulated, prefill="int8", check_hashes=False)
    saturating = Pipeline.load(emulated, prefill="int8", check_hashes=False)
    saturating.decoder.prompt_session = make_session(emulated / "decoder_prefill_emulated.onnx")
    a, b = native.prefill(prompt, features), saturating.prefill(prompt, features)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    for x, y in zip(native.decoder.buffers, saturating.decoder.buffers):
        assert np.abs(x.numpy() - y.numpy()).max() <= 1e-4 * max(np.abs(x.numpy()).max(), 1e-6)


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64", reason="needs qemu-x86_64 (apt install qemu-user) on x86-64")
def test_prompt_graph_on_a_real_avx2_kernel(int4, prompts, tmp_path):
    """ONNX Runtime under qemu -cpu Haswell (AVX2, no VNNI, no AVX-512) prefills with the prompt
    graph: the same logits as this CPU's kernels."""
    prompt, features = prompts[0]
    np.savez(tmp_path / "in.npz", embeds=features.embeds, deepstack=features.deepstack, taps=features.taps,
             tokens=features.tokens, prompt=np.array(prompt), clip_tokens=np.array(features.clip_tokens))
    script = ("import numpy as np\n"
              "from moss_edge.runtime.inference import AudioFeatures\n"
              "from moss_edge.runtime.pipeline import Pipeline\n"
              f"f = np.load({str(tmp_path / 'in.npz')!r})\n"
              "a = AudioFeatures(f['tokens'], f['taps'], f['embeds'], f['deepstack'], [int(c) for c in f['clip_tokens']])\n"
              f"pipe = Pipeline.load({str(int4)!r}, prefill='int8', threads=1)\n"
              f"np.save({str(tmp_path / 'avx2.npy')!r}, pipe.prefill([int(i) for i in f['prompt']], a))\n")
    subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", script], check=True, capture_output=True, timeout=900)
    native = Pipeline.load(int4, prefill="int8", threads=1).prefill(prompt, features)
    assert _cosine(np.load(tmp_path / "avx2.npy"), native) > 0.99999


def test_run_says_which_prompt_path_ran_and_refuses_one_the_artifact_lacks(int4, packaged_artifacts):
    def moss(*args):
        return subprocess.run([sys.executable, "-m", "moss_edge.cli", *map(str, args)], capture_output=True, text=True)

    common = ("--audio", bundled_audio(CLIPS[0]), "--prompt", "Describe the audio.", "--max-new-tokens", "3", "--json")
    for path in ("int8", "decoder"):
        out = moss("run", int4, *common, "--prefill", path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["settings"]["prefill"] == {"path": path, "why": "asked for"}
    out = moss("run", packaged_artifacts["fp32"], *common, "--prefill", "int8")
    assert out.returncode == 2 and "no INT8 prompt graph" in out.stderr and "Traceback" not in out.stderr
