"""The TensorRT engine memory plan of the `int4-trt` recipe at the released 4B and 8B configs on
Jetson Orin NX 16GB and AGX Orin 64GB (export/engine_plan.py), from the configs alone: graph
sizes as the preflight estimates them, the profiles the manifest would name (10 minutes of
audio in one context). An estimate: nothing here has run on a Jetson.

    python benchmarks/engine_plan.py   # writes benchmarks/engine-plan.json and .png
"""

import json
from dataclasses import asdict
from pathlib import Path

from moss_edge.export.config import dims_of
from moss_edge.export.engine_plan import GIB, DEVICES, SYSTEM_RESERVE, jetson_limits, plan
from moss_edge.export.synthetic import preset
from moss_edge.quantize.preflight import graph_bytes, meta_model
from moss_edge.quantize.recipe import PRESETS
from moss_edge.runtime.graphs import graph_spec

RECIPE = "int4-trt"


def plan_for(name: str) -> dict:
    cfg = preset(name)
    dims = dims_of(cfg)
    decoder = PRESETS[RECIPE]().graphs["decoder"]
    half_cache, half = decoder.kv_cache == "fp16", decoder.dtype == "fp16"  # fp16 activations: half the activation bytes
    decoder_io = [{"name": t.name, "dtype": "float16" if t.dtype == "float32" and (half or (half_cache and t.name.startswith("past_")))
                   else t.dtype} for t in graph_spec("decoder", dims).inputs]
    manifest = {"model": asdict(dims), "config": cfg.to_hf_dict(), "graphs": {"decoder": {"inputs": decoder_io}}}
    return asdict(plan(manifest, graph_bytes(meta_model(cfg), PRESETS[RECIPE]()), jetson_limits(dims)))


def chart(plans: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ["weights", "kv_cache", "activations", "workspace", "runtime"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, p) in enumerate(plans.items()):
        values = [sum(p["weights"].values()), p["kv_cache"], p["activations"], p["workspace"], p["runtime"]]
        bottom = 0.0
        for part, v in zip(parts, values):
            ax.bar(i, v / GIB, bottom=bottom, color=f"C{parts.index(part)}", label=part if i == 0 else None)
            bottom += v / GIB
    for device, size in DEVICES.items():
        if size - SYSTEM_RESERVE > 20 * GIB:  # the AGX Orin's 60 GiB, off the chart: the title says it
            continue
        ax.axhline((size - SYSTEM_RESERVE) / GIB, linestyle="--", color="gray")
        ax.text(len(plans) - 0.5, (size - SYSTEM_RESERVE) / GIB, f" {device} (minus system)", va="bottom", fontsize=8)
    ax.set_xticks(range(len(plans)), [f"MOSS-Audio-{n.upper()} {RECIPE}" for n in plans])
    ax.set_ylabel("GiB")
    ax.set_ylim(0, 20)
    ax.set_title("TensorRT engine plan, 10 min of audio in context (estimate; AGX Orin 64GB: 59.9 GiB)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    plans = {name: plan_for(name) for name in ("4b", "8b")}
    out = Path(__file__).parent / "engine-plan.json"
    out.write_text(json.dumps({"recipe": RECIPE, "plans": plans}, indent=2))
    chart(plans, out.with_suffix(".png"))
    for name, p in plans.items():
        fits = ", ".join(f"{d}: {'fits' if f['fits'] else 'does not fit'} ({f['free_after'] / GIB:+.1f} GiB)"
                         for d, f in p["fits"].items())
        print(f"{name}: total {p['total'] / GIB:.2f} GiB, build {p['first_build_peak'] / GIB:.2f} GiB; {fits}")


if __name__ == "__main__":
    main()
