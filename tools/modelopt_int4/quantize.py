"""Quantize every MatMul weight of an ONNX model with NVIDIA ModelOpt's INT4 weight-only RTN ("rtn_dq").

Run with the ModelOpt environment (tools/modelopt_int4/make_env.sh), not the project's .venv:

    .modelopt-venv/bin/python tools/modelopt_int4/quantize.py IN.onnx OUT.onnx [--block 128] [--no-check]

CPU only. rtn_dq is plain round-to-nearest over blocks of the weight's K axis, then
DequantizeLinear -> MatMul ("dq_only": no QuantizeLinear on activations). It never runs the model:
the random calibration inputs modelopt makes for itself are not fed to any session, and
calibration_eps=["cpu"] keeps it off CUDA/TensorRT anyway. CUDA_VISIBLE_DEVICES is emptied so that
cupy (if someone installs it) cannot take the GPU path either; without cupy modelopt uses numpy.

Afterwards (unless --no-check) the original and the quantized model are run once each on ONNX Runtime's
CPU execution provider with random inputs (dynamic batch -> 1, other dynamic dims -> 4, integer inputs
zeros), and the largest output difference is printed: a proof that the quantized graph loads and runs.
"""

import argparse
import os
import sys
import tempfile

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before modelopt imports (cupy / torch.cuda)

import numpy as np
import onnx
import onnxruntime as ort


def quantize(src: str, dst: str, block: int) -> None:
    from modelopt.onnx.quantization import quantize as mo_quantize

    mo_quantize(
        onnx_path=os.path.abspath(src),
        quantize_mode="int4",
        calibration_method="rtn_dq",
        calibration_eps=["cpu"],
        block_size=block,
        nodes_to_exclude=[],  # every MatMul (int4.quantize's own default would skip "/lm_head")
        output_path=os.path.abspath(dst),  # intermediates go next to it; modelopt deletes them
        log_level="WARNING",
    )


def random_feeds(model_path: str) -> dict[str, np.ndarray]:
    """Inputs for one CPU run: float inputs random, integer inputs zero, dynamic dims small."""
    model = onnx.load(model_path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in initializers:  # old-IR models list initializers as inputs too
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (1 if i == 0 else 4)
                 for i, d in enumerate(t.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def run_cpu(model_path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="fp16 ONNX model, MatMul weights as [K, N] initializers")
    ap.add_argument("dst", help="where to write the INT4 model")
    ap.add_argument("--block", type=int, default=128, help="INT4 block size along K (default 128)")
    ap.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime CPU run")
    args = ap.parse_args()

    quantize(args.src, args.dst, args.block)
    print(f"quantize.py: wrote {args.dst} (modelopt int4 rtn_dq, block {args.block})")
    if not args.no_check:
        feeds = random_feeds(args.src)
        ref, got = run_cpu(args.src, feeds), run_cpu(args.dst, feeds)
        for r, g in zip(ref, got):
            r, g = r.astype(np.float32), g.astype(np.float32)
            rel = np.abs(g - r).max() / max(np.abs(r).max(), 1e-6)
            print(f"quantize.py: CPU run ok: output {list(g.shape)} {got[0].dtype}, "
                  f"max|int4 - fp16| / max|fp16| = {rel:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
