"""The preflight memory estimate of `export --recipe` against the peak RSS it measures, at 4B
widths: for each preset, synthetic checkpoints with 2, 4 and 8 layers (encoder and decoder), the
whole command run in a fresh process (export, calibration, quantization, the parity check with
its reference and every decoder session) and its peak RSS read from the kernel (wait4). At these
depths verify holds the fp32 reference whole; at full depth (36 decoder, 32 encoder layers) it
loads it piecewise, so those runs are their own rows (--full PRESET: a 9 GB checkpoint, ~10 min).

    python benchmarks/memory_estimate.py --workdir /tmp/mem -o benchmarks/memory-estimate.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

PRESETS = ("int4", "int4-awq", "int4-trt")
LAYERS = (2, 4, 8)


def measured_peak(command: list[str], log: Path) -> int:
    """Peak RSS in bytes of `command`, a fresh process (Linux: ru_maxrss in KiB); its output to `log`."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # 1: written, parity failed (random weights may): still a full run
        raise RuntimeError(f"{' '.join(command)} exited {code}: {log.read_text()[-2000:]}")
    return usage.ru_maxrss * 1024


def main() -> int:
    from moss_edge.bench import cpu_flags
    from moss_edge.export.synthetic import preset, write_synthetic_checkpoint
    from moss_edge.quantize.preflight import estimate
    from moss_edge.quantize.recipe import load_recipe
    from moss_edge.runtime.session import available_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--reuse", type=Path, help="an earlier run's JSON: its measured peaks are kept (estimates are redone)")
    ap.add_argument("--again", action="append", default=[], help="PRESET:LAYERS measured anew despite --reuse")
    ap.add_argument("--full", action="append", default=[], choices=PRESETS,
                    help="also measure this preset at full depth (36 + 32 layers: ~10 min and 9 GB of checkpoint)")
    args = ap.parse_args()
    earlier = json.loads(args.reuse.read_text()) if args.reuse else {"rows": [], "full_depth": []}
    kept = {(r["preset"], r["layers"]): r["measured"] for r in earlier["rows"]}
    kept.update({(r["preset"], "full"): r["measured"] for r in earlier["full_depth"] if "measured" in r})
    for item in args.again:
        name, layers = item.split(":")
        kept.pop((name, int(layers)), None)
    args.workdir.mkdir(parents=True, exist_ok=True)
    available = available_memory()  # the estimate's reference choice (whole or piecewise) depends on it
    rows = []
    for layers in LAYERS:
        cfg = preset("4b", encoder_layers=layers, decoder_layers=layers)
        checkpoint = args.workdir / f"4b-{layers}l"
        if not checkpoint.exists() and any((name, layers) not in kept for name in PRESETS):
            write_synthetic_checkpoint(checkpoint, cfg, dtype="bf16")
        for name in PRESETS:
            out = args.workdir / f"{name}-{layers}l"
            shutil.rmtree(out, ignore_errors=True)
            peak = kept.get((name, layers)) or measured_peak(
                [sys.executable, "-m", "moss_edge.cli", "export", str(checkpoint), "-o", str(out), "--recipe", name,
                 "--steps", "4", "--task-examples", "0"], out.with_suffix(".log"))
            row = {"preset": name, "layers": layers, "estimate": estimate(cfg, load_recipe(name), available).memory_bytes,
                   "measured": peak}
            row["ratio"] = row["measured"] / row["estimate"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    # full depth: the reference is loaded piecewise there (it is whole at these depths), so the
    # peaks above do not extrapolate to it; measured where asked (--full)
    full = []
    for name in PRESETS:
        row = {"preset": name, "estimate": estimate(preset("4b"), load_recipe(name), available).memory_bytes}
        if (name, "full") in kept or name in args.full:
            checkpoint, out = args.workdir / "4b-full", args.workdir / f"{name}-full"
            if (name, "full") not in kept and not checkpoint.exists():
                write_synthetic_checkpoint(checkpoint, preset("4b"), dtype="bf16")
            row["measured"] = kept.get((name, "full")) or measured_peak(
                [sys.executable, "-m", "moss_edge.cli", "export", str(checkpoint), "-o", str(out), "--recipe", name,
                 "--steps", "4", "--task-examples", "0"], out.with_suffix(".log"))
            shutil.rmtree(out, ignore_errors=True)
        full.append(row)
    result = {"cpu_flags": cpu_flags(), "widths": "4B", "available_bytes": available,
              "how": __doc__.split("\n\n")[0].replace("\n", " "),
              "rows": rows, "full_depth": full}
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.output.with_suffix(".png"))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels, estimates, measured = [], [], []
    for r in result["rows"]:
        labels.append(f"{r['preset']}\n{r['layers']} layers")
        estimates.append(r["estimate"] / 2**30)
        measured.append(r["measured"] / 2**30)

    for r in result["full_depth"]:
        if "measured" in r:
            labels.append(f"{r['preset']}\nfull depth")
            estimates.append(r["estimate"] / 2**30)
            measured.append(r["measured"] / 2**30)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, estimates, 0.4, label="preflight estimate")
    ax.bar(x + 0.2, measured, 0.4, label="measured peak RSS")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    ax.set_title(f"export --recipe at 4B widths: estimate against measured [CPU: {result['cpu_flags']}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
