"""Does TensorRT keep our INT4 weight-only layers in 4 bits, and does the scale dtype matter?

Our Jetson artifacts store each decoder weight as an INT4 initializer [K, N] (symmetric, no zero
point) and scales [K/128, N] feeding `DequantizeLinear(axis=0, block_size=128)` (opset 21), whose
output is MatMul's B. This script builds one such layer, y = x @ W (W 4096 x 12288 by default), in
three variants and builds a TensorRT engine of each with FP16 and INT4 enabled (as
`trtexec --fp16 --int4` does):

    int4-fp16   INT4 weights, fp16 scales and activations (what NVIDIA's ModelOpt writes)
    int4-fp32   INT4 weights, fp32 scales and activations (TensorRT's parser gives a DQ the dtype
                of its scales: are the weights then held dequantized, in fp32?)
    fp16-dense  the same weights dequantized to fp16: the baseline

For each it reports the engine size against the INT4 and fp16 sizes of W (an engine well under
the fp16 size kept the weights in 4 bits, i.e. fused DQ into an INT4 GEMM), the tactics of the
GEMM layers, the 1-row (decode) latency against the dense baseline, and the output's error
against numpy. On the device (Jetson, or any NVIDIA GPU with the `tensorrt` package):

    python benchmarks/trt_int4_layer.py --out trt-int4-layer.json

Timings need torch or cupy with CUDA; without either, sizes and tactics are still reported.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moss_edge.quantize.weights import pack_int4  # ONNX's INT4 layout, as our artifacts store it

VARIANTS = {"int4-fp16": np.float16, "int4-fp32": np.float32, "fp16-dense": np.float16}
FUSED_BELOW = 0.4  # engine / fp16 bytes: INT4 weights are ~0.26x, dequantized fp16 1x, fp32 2x
NO_TRT = "TensorRT is not installed (pip install tensorrt-cu12, or JetPack's python3-libnvinfer): nothing to measure here"


def quantized_weight(k: int, n: int, block: int, seed: int = 0):
    """Random W [K, N] quantized symmetric per block of `block` rows: (q int8 in [-8, 7], scale fp32)."""
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block {block}")
    w = np.random.default_rng(seed).standard_normal((k, n), dtype=np.float32) * 0.02
    blocks = w.reshape(k // block, block, n)
    scale = (np.abs(blocks).max(axis=1) / 7).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8).reshape(k, n)
    return q, scale


def layer_graph(variant: str, k: int, n: int, block: int) -> onnx.ModelProto:
    """y = x @ W with x [1, seq, K]: W an INT4 DequantizeLinear (int4-*) or a dense fp16 initializer."""
    dtype = VARIANTS[variant]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    q, scale = quantized_weight(k, n, block)
    if variant == "fp16-dense":
        w = (q.reshape(k // block, block, n) * scale[:, None, :]).reshape(k, n)
        inits, nodes = [numpy_helper.from_array(w.astype(np.float16), "w")], []
    else:
        inits = [helper.make_tensor("w_q", TensorProto.INT4, [k, n], vals=pack_int4(q), raw=True),
                 numpy_helper.from_array(scale.astype(dtype), "w_scale")]
        nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dequantize", axis=0, block_size=block)]
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"))
    graph = helper.make_graph(nodes, variant, [helper.make_tensor_value_info("x", elem, [1, "seq", k])],
                              [helper.make_tensor_value_info("y", elem, [1, "seq", n])], inits)
    # IR 10 is opset 21's: TensorRT 10.3's parser (JetPack 6) refuses newer IR versions
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def dequantized_weight(model: onnx.ModelProto) -> np.ndarray:
    """W as the graph defines it, in float64 (the reference for the engines' outputs)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if "w" in inits:
        return inits["w"].astype(np.float64)
    q, scale = inits["w_q"].astype(np.float64), inits["w_scale"].astype(np.float64)
    return q * np.repeat(scale, q.shape[0] // scale.shape[0], axis=0)


def weight_bytes(k: int, n: int, block: int) -> dict:
    return {"int4_bytes": k * n // 2 + (k // block) * n * 2, "fp16_bytes": 2 * k * n}  # fp16 scales


def verdict(engine_bytes: int, k: int, n: int, block: int) -> str:
    ratio = engine_bytes / weight_bytes(k, n, block)["fp16_bytes"]
    if ratio < FUSED_BELOW:
        return "weights kept INT4 (fused)"
    return "weights held dequantized (fp16)" if ratio < 1.5 else "weights held dequantized (fp32)"


def report_lines(results: list[dict]) -> list[str]:
    """A table of the variants, then each one's GEMM tactics or its build error."""
    dense = next((r.get("latency_ms") for r in results if r["variant"] == "fp16-dense"), None)
    lines = [f"{'variant':<11} {'engine MB':>9} {'/INT4':>6} {'/fp16':>6}  {'verdict':<32} "
             f"{'ms, 1 row':>9} {'vs fp16':>8} {'rel err':>8}"]
    for r in results:
        if r.get("engine_bytes") is None:
            lines.append(f"{r['variant']:<11} {'-':>9} {'-':>6} {'-':>6}  {'build failed':<32}")
            continue
        ms = r.get("latency_ms")
        speed = f"{ms / dense:.2f}x" if ms and dense else "-"
        err = f"{r['max_rel_err']:.1e}" if r.get("max_rel_err") is not None else "-"
        lines.append(f"{r['variant']:<11} {r['engine_bytes'] / 1e6:>9.1f} {r['engine_bytes'] / r['int4_bytes']:>6.2f} "
                     f"{r['engine_bytes'] / r['fp16_bytes']:>6.2f}  {r['verdict']:<32} "
                     f"{f'{ms:.3f}' if ms else '-':>9} {speed:>8} {err:>8}")
    for r in results:
        lines += [f"{r['variant']}: {r['error']}"] if r.get("error") else [f"{r['variant']}: {t}" for t in r.get("kernels", [])]
    return lines


def gemm_tactics(info: dict) -> list[str]:
    """The layers of the engine information that mention int4 / gemm / matmul, with their tactics."""
    out = []
    for layer in info.get("Layers", []):
        if any(word in json.dumps(layer).lower() for word in ("int4", "gemm", "gemv", "matmul")):
            name = layer if isinstance(layer, str) else f"{layer.get('LayerType')} {layer.get('Name')}: {layer.get('TacticName')}"
            out.append(name)
    return out


def make_logger(trt):
    class Logger(trt.ILogger):
        """Keeps the builder's errors (e.g. Orin's refusal of NVIDIA/TensorRT#4832) for the report."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            levels = trt.ILogger.Severity
            if severity in (levels.INTERNAL_ERROR, levels.ERROR, levels.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)
                self.errors += [msg] if severity != levels.WARNING else []

    return Logger()


def build(trt, builder, logger, path: Path, k: int, batch: int):
    """(serialized engine or None, error message or None, the flags set)."""
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        return None, "parse failed: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)), []
    config = builder.create_builder_config()
    # FP16 and INT4 as `trtexec --fp16 --int4`; BuilderFlag.INT4 is missing from some 10.x builds.
    # Weight streaming is left off: it needs a strongly typed network and moves weights to host memory.
    flags = [f for f in ("FP16", "INT4") if hasattr(trt.BuilderFlag, f)]
    for f in flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # tactic names in the inspector
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 1, k), (1, 1, k), (1, batch, k))  # optimized for 1-token decode
    config.add_optimization_profile(profile)
    logger.errors.clear()
    plan = builder.build_serialized_network(network, config)
    return plan, None if plan is not None else "build failed: " + ("; ".join(logger.errors) or "no engine"), flags


def gpu_arrays():
    """(library, GPU name) for the timings' CUDA buffers and events: torch first, then cupy."""
    try:
        import torch
        if torch.cuda.is_available():
            return "torch", torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import cupy
        return "cupy", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # not installed, or no CUDA device for it
        return None, None


def run_engine(trt, engine, x: np.ndarray, lib: str, runs: int = 50, warmup: int = 10):
    """(median ms of `runs` executions timed by CUDA events, the output on the host)."""
    ctx = engine.create_execution_context()
    ctx.set_input_shape("x", x.shape)
    y = np.empty(tuple(ctx.get_tensor_shape("y")), trt.nptype(engine.get_tensor_dtype("y")))
    if lib == "torch":
        import torch
        dx, dy, stream = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda(), torch.cuda.Stream()
        torch.cuda.synchronize()  # the copies ran on the default stream, the engine runs on `stream`
        ptr, handle, event = (lambda a: a.data_ptr()), stream.cuda_stream, (lambda: torch.cuda.Event(enable_timing=True))
        elapsed, to_host = (lambda s, e: s.elapsed_time(e)), (lambda a: a.cpu().numpy())
    else:
        import cupy
        dx, dy, stream = cupy.asarray(x), cupy.asarray(y), cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.Device().synchronize()
        ptr, handle, event = (lambda a: a.data.ptr), stream.ptr, cupy.cuda.Event
        elapsed, to_host = cupy.cuda.get_elapsed_time, cupy.asnumpy
    ctx.set_tensor_address("x", ptr(dx))
    ctx.set_tensor_address("y", ptr(dy))
    times = []
    for i in range(warmup + runs):
        start, end = event(), event()
        start.record(stream)
        ctx.execute_async_v3(handle)
        end.record(stream)
        end.synchronize()
        if i >= warmup:
            times.append(elapsed(start, end))
    return float(np.median(times)), to_host(dy)


def measure(trt, builder, logger, variant: str, path: Path, args, lib) -> dict:
    result = {"variant": variant, **weight_bytes(args.k, args.n, args.block)}
    plan, error, result["flags"] = build(trt, builder, logger, path, args.k, args.batch)
    if error:
        return {**result, "engine_bytes": None, "error": error}
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    result.update(engine_bytes=plan.nbytes, verdict=verdict(plan.nbytes, args.k, args.n, args.block),
                  kernels=gemm_tactics(info), layers=info.get("Layers", []))
    if lib:
        x_dtype = trt.nptype(engine.get_tensor_dtype("x"))
        x = np.random.default_rng(1).standard_normal((1, 1, args.k)).astype(x_dtype)
        result["latency_ms"], y = run_engine(trt, engine, x, lib)
        ref = x.astype(np.float64)[0] @ dequantized_weight(onnx.load(str(path)))
        result["max_rel_err"] = float(np.abs(y.astype(np.float64)[0] - ref).max() / np.abs(ref).max())
    return result


def write_graphs(directory: Path, args) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {v: directory / f"layer-{v}-{args.k}x{args.n}.onnx" for v in VARIANTS}
    for variant, path in paths.items():
        onnx.save(layer_graph(variant, args.k, args.n, args.block), str(path))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4096, help="input width (rows of W)")
    p.add_argument("--n", type=int, default=12288, help="output width (columns of W)")
    p.add_argument("--block", type=int, default=128, help="rows of W per scale")
    p.add_argument("--batch", type=int, default=64, help="most rows of x in the profile (timings are at 1 row)")
    p.add_argument("--graphs-dir", type=Path, help="keep the ONNX graphs here")
    p.add_argument("--out", type=Path, default=Path("trt-int4-layer.json"))
    args = p.parse_args(argv)
    try:
        import tensorrt as trt
    except ImportError:
        if args.graphs_dir:
            write_graphs(args.graphs_dir, args)
        print(f"{NO_TRT}; the graphs were written to {args.graphs_dir}" if args.graphs_dir
              else f"{NO_TRT}; pass --graphs-dir DIR to write the graphs")
        return 2
    logger, why = make_logger(trt), "no builder"
    try:
        builder = trt.Builder(logger)  # CUDA is initialized here: None or an exception without a GPU
    except Exception as e:
        builder, why = None, str(e)
    if builder is None:
        print(f"no CUDA GPU usable by TensorRT {trt.__version__} ({why}): nothing to measure here")
        return 2
    lib, device = gpu_arrays()
    if lib is None:
        print("neither torch nor cupy has CUDA here: engine sizes and tactics only, no timings", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_graphs(args.graphs_dir or Path(tmp), args)
        results = [measure(trt, builder, logger, v, path, args, lib) for v, path in paths.items()]
    print("\n".join(report_lines(results)))
    meta = {"tensorrt": trt.__version__, "device": device, "timing": lib, **vars(args), "out": str(args.out),
            "graphs_dir": args.graphs_dir and str(args.graphs_dir)}
    args.out.write_text(json.dumps({**meta, "variants": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
