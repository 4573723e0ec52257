"""The dynamic-INT8 format gives the same accuracy on every CPU kernel ONNX Runtime may pick.

x86 kernels without VNNI add u8 x s8 products in int16 pairs and saturate; the emulation in
quantize/dynamic_int8.py computes exactly that on any machine, so these tests judge the format,
not the CPU they happen to run on."""

import json
import logging
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
from moss_edge.quantize.conv_im2col import convolutions_as_matmuls
from moss_edge.quantize.dynamic_int8 import INT16_MAX, emulate_pair_saturation, quantize_dynamic_int8, worst_pair_sum
from moss_edge.quantize.graph import read_initializer
from moss_edge.quantize.kernels import cpu_kernels
from moss_edge.runtime.audio import chunk_mels, load_audio, log_mel

CLIPS = ("speech_en_10s.flac", "speech_ko_18s.flac", "dialogue_zh_12s.flac")


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _feeds(chunk_frames: int):
    for clip in CLIPS:
        batch = chunk_mels([log_mel(load_audio(bundled_audio(clip)))], chunk_frames)
        yield {"mel": batch.mel, "frames": batch.frames}


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def encoders(fixture_artifact, tmp_path_factory):
    """The fixture's fp32 encoder, ours in dynamic INT8, and the full-range s8 format we used before."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = tmp_path_factory.mktemp("int8")
    fp32 = fixture_artifact / "encoder.onnx"
    record = quantize_dynamic_int8(onnx.load(str(fp32), load_external_data=False),
                                   lambda init: read_initializer(init, fixture_artifact), root / "encoder-7bit.onnx")
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(fp32), str(root / "encoder-full.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    # ONNX Runtime's own quantizer with 7-bit weights, on the same im2col graph: the oracle for ours
    im2col = onnx.load(str(fp32))
    convolutions_as_matmuls(im2col)
    onnx.save(im2col, str(root / "encoder-im2col.onnx"))
    quantize_dynamic(str(root / "encoder-im2col.onnx"), str(root / "encoder-ort-7bit.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, reduce_range=True, op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": True})
    frames = json.loads((fixture_artifact / "manifest.json").read_text())["model"]["chunk_frames"]
    return {"fp32": fp32, "7bit": root / "encoder-7bit.onnx", "ort-7bit": root / "encoder-ort-7bit.onnx",
            "full": root / "encoder-full.onnx", "record": record, "frames": frames, "root": root}


def test_our_dynamic_int8_is_onnxruntimes_quantizer_without_its_fp32_files(encoders):
    """Written weight by weight from any reader (a checkpoint's shards too), yet the same
    integers and scales as ONNX Runtime's quantizer and the same fused kernels."""
    ours = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(encoders["7bit"])).graph.initializer}
    theirs = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(encoders["ort-7bit"])).graph.initializer}
    quantized = [n for n in theirs if n.endswith(("_quantized", "_scale")) and "weight" in n]
    assert len(quantized) >= 20 and all(np.array_equal(ours[n], theirs[n]) for n in quantized)
    feeds = next(_feeds(encoders["frames"]))
    for a, b in zip(_run(onnx.load(str(encoders["7bit"])), feeds), _run(onnx.load(str(encoders["ort-7bit"])), feeds)):
        np.testing.assert_array_equal(a, b)
    assert cpu_kernels(encoders["7bit"]) == cpu_kernels(encoders["ort-7bit"])


def test_int8_weights_cannot_saturate_int16_pairs(encoders):
    assert encoders["record"]["worst_u8s8_pair_sum"] == worst_pair_sum(encoders["7bit"]) <= INT16_MAX
    assert worst_pair_sum(encoders["full"]) > INT16_MAX  # the old format could


def test_int8_encoder_accurate_on_cpus_without_vnni(encoders):
    """Cosine against fp32 on real speech with the saturating kernel emulated: >= 0.995 for our
    format; the full-range format fails the same test (0.96 measured), so it is a real check."""
    fp32 = onnx.load(str(encoders["fp32"]))
    ours = emulate_pair_saturation(onnx.load(str(encoders["7bit"])), encoders["root"])
    full = emulate_pair_saturation(onnx.load(str(encoders["full"])), encoders["root"])
    worst_ours, worst_full = 1.0, 1.0
    for feeds in _feeds(encoders["frames"]):
        ref = _run(fp32, feeds)
        worst_ours = min(worst_ours, *(_cosine(o, r) for o, r in zip(_run(ours, feeds), ref)))
        worst_full = min(worst_full, *(_cosine(o, r) for o, r in zip(_run(full, feeds), ref)))
    assert worst_ours >= 0.995
    assert worst_full < 0.995


def test_emulation_equals_ours_where_nothing_saturates(encoders):
    model = onnx.load(str(encoders["7bit"]))
    feeds = next(_feeds(encoders["frames"]))
    for a, b in zip(_run(emulate_pair_saturation(model, encoders["root"]), feeds), _run(model, feeds)):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64", reason="needs qemu-x86_64 (apt install qemu-user) on x86-64")
def test_emulation_matches_a_real_avx2_kernel(encoders, tmp_path):
    """ONNX Runtime under qemu -cpu Haswell (AVX2, no VNNI, no AVX-512) runs the real saturating
    kernel: the emulation must reproduce it, for the full-range format where it matters."""
    feeds = next(_feeds(encoders["frames"]))
    np.savez(tmp_path / "feeds.npz", **feeds)
    script = (f"import numpy as np, onnxruntime as ort\n"
              f"f = dict(np.load({str(tmp_path / 'feeds.npz')!r}))\n"
              f"s = ort.InferenceSession({str(encoders['full'])!r}, providers=['CPUExecutionProvider'])\n"
              f"np.save({str(tmp_path / 'avx2.npy')!r}, s.run(None, f)[0])\n")
    subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", script], check=True, capture_output=True, timeout=600)
    avx2 = np.load(tmp_path / "avx2.npy")
    emulated = _run(emulate_pair_saturation(onnx.load(str(encoders["full"])), encoders["root"]), feeds)[0]
    fp32 = _run(onnx.load(str(encoders["fp32"])), feeds)[0]
    assert _cosine(emulated, avx2) > 0.9999  # the same numbers, up to fp32 rounding elsewhere in the graph
    assert _cosine(avx2, fp32) < 0.99  # and the kernel did saturate
