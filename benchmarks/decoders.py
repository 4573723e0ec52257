"""The portable decoder against the contrib-op decoder (decoder_ort.onnx) of the same artifacts.

At real widths and several depths (e.g. 2, 4 and 8 decoder layers of MOSS-Audio-4B), each decoder
prefills a 419-token prompt and decodes 32 tokens after it; rounds alternate the decoders and
the fastest of each is kept (shared machines add noise, never speed). A least-squares line
through the depths gives the per-layer cost, extrapolated to full depth. One extra profiled run per decoder says where the prefill's and a decode
step's time goes, by op type.

    python benchmarks/decoders.py A-2l-int4 A-4l-int4 A-8l-int4 --full-depth 36 -o benchmarks/decoders-4b-int4.json
"""

import argparse
import json
import platform
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moss_edge.bench import cpu_flags, decoder_times, fastest_alternating, fit_depths
from moss_edge.plots import full_depth_chart
from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.decoders import decoder_runner
from moss_edge.runtime.graphs import ORT_DECODER
from moss_edge.runtime.session import PROVIDERS

PROMPT, STEPS, DECODERS = 419, 32, ("decoder", ORT_DECODER)
IDS = [int(i) for i in np.random.default_rng(0).integers(100, 1000, PROMPT)]


def runner(artifact: Artifact, decoder: str, threads: int, profile: Path | None = None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, str(profile)
    session = ort.InferenceSession(str(artifact.graph_path(decoder)), opts, providers=PROVIDERS["cpu"])
    return decoder_runner(decoder, session, artifact.dims)


def profile(artifact: Artifact, decoder: str, threads: int, folder: Path) -> dict[str, dict[str, float]]:
    """Microseconds by op type, from ONNX Runtime's profiler: the prefill, and the mean decode step."""
    run = runner(artifact, decoder, threads, folder / decoder)
    decoder_times(run, artifact.dims, IDS, STEPS)
    trace = json.loads(Path(run.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")
    out = {"prefill": defaultdict(float), "decode_step": defaultdict(float)}
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            run_index = next((i for i, (a, b) in enumerate(runs) if a <= e["ts"] < b), None)
            if run_index == 0:
                out["prefill"][e["args"]["op_name"]] += e["dur"]
            elif run_index is not None:
                out["decode_step"][e["args"]["op_name"]] += e["dur"] / (len(runs) - 1)
    return {k: {op: round(us) for op, us in sorted(v.items(), key=lambda kv: -kv[1])} for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="the same model at two or more decoder depths")
    parser.add_argument("--full-depth", type=int, default=36)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    artifacts = [Artifact.load(a, check_hashes=False) for a in args.artifacts]
    depths = [a.dims.num_hidden_layers for a in artifacts]
    runs = {(i, d): runner(a, d, args.threads) for i, a in enumerate(artifacts) for d in DECODERS}
    best = fastest_alternating({key: partial(decoder_times, run, artifacts[key[0]].dims, IDS, STEPS)
                                for key, run in runs.items()}, args.rounds)
    result = {"cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "threads": args.threads,
              "prompt_tokens": PROMPT, "decode_tokens": STEPS, "rounds": args.rounds, "depths": depths,
              "precision": artifacts[0].manifest["graphs"]["decoder"]["precision"],
              "decoders": {d: fit_depths({n: best[(i, d)] for i, n in enumerate(depths)}, args.full_depth)
                           for d in DECODERS}}
    out = Path(args.output)
    result["profile_us"] = {d: profile(artifacts[-1], d, args.threads, out.parent) for d in DECODERS}
    for f in out.parent.glob("decoder*_20*.json"):  # the profiler's raw traces
        f.unlink()
    out.write_text(json.dumps(result, indent=2))
    title = f"{result['precision']} decoders, {result['threads']} threads"
    full_depth_chart(result["decoders"], args.full_depth, result["prompt_tokens"], title, out.with_suffix(".png"))
    print(json.dumps({d: {k: v for k, v in r.items() if k != "measured"} for d, r in result["decoders"].items()}, indent=1))


if __name__ == "__main__":
    main()
