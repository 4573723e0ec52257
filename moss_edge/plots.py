"""PNG charts for the bench and parity reports (matplotlib, drawn off-screen)."""

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bench_chart(result: dict, path: Path) -> Path:
    """Bars per backend: encoder s, prefill ms and decode ms/token (extrapolated when available)."""
    plt = _pyplot()
    table = result.get("extrapolated") or {b: r[min(r)] for b, r in result["runs"].items()}
    backends = list(table)
    metrics = (("encoder_s", "encoder (s, 30 s audio)"), ("prefill_ms", "prefill (ms)"),
               ("decode_ms_per_token", "decode (ms / token)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for ax, (key, title) in zip(axes, metrics):
        values = [table[b][key] for b in backends]
        ax.bar(range(len(backends)), values, color=["#999999" if b.startswith("torch") else "#3b7dd8" for b in backends])
        ax.set_xticks(range(len(backends)), backends, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    depth = "extrapolated to full depth" if "extrapolated" in result else f"{min(result['depths'])} layers"
    fig.suptitle(f"MOSS-Audio {result['preset']} widths, {depth}, {result['settings']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parity_chart(report: dict, path: Path) -> Path:
    """Per-step KL and top-1 agreement, and per-graph-output cosine."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = report["steps"]
    left.semilogy([s["step"] for s in steps], [max(s["kl"], 1e-12) for s in steps], marker="o", ms=3, label="KL")
    misses = [s["step"] for s in steps if not s["top1_agree"]]
    for m in misses:
        left.axvline(m, color="red", alpha=0.3)
    left.set_xlabel("decode step (red: top-1 differs)")
    left.set_ylabel("KL(reference || artifact)")
    names = [f"{g}.{o}" for g, outs in report["graphs"].items() for o in outs]
    gaps = [max(1 - m["cosine"], 1e-12) for outs in report["graphs"].values() for m in outs.values()]
    right.barh(names, gaps, color="#3b7dd8")
    right.set_xscale("log")
    right.set_xlabel("1 - cosine with the reference")
    fig.suptitle(f"parity: {Path(report['artifact']).name} ({report['summary']['precision']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def full_depth_chart(systems: dict[str, dict], full_depth: int, prompt_tokens: int, title: str, path: Path) -> Path:
    """Two panels, decode ms/token and prefill s at full depth, one bar per system (the
    benchmarks' decoder and peer comparisons)."""
    plt = _pyplot()
    names = list(systems)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], f"decode_ms_at_{full_depth}", "decode ms/token"),
                           (axes[1], f"prefill_s_at_{full_depth}", f"prefill s ({prompt_tokens} tokens)")):
        values = [systems[n][key] for n in names]
        ax.bar(names, values, color=["#888888", "#2a7ab0"][: len(names)])
        ax.set_title(f"{label}, {full_depth} layers (extrapolated)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}" if v >= 10 else f"{v:.2f}", ha="center", va="bottom")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
