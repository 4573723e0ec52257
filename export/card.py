"""The artifact's card: a README.md in its folder, written by export and quantize from the
manifest and the parity report, in the form artifacts are published in on model hubs."""

from pathlib import Path

from moss_edge.export.backend_check import summary_lines
from moss_edge.export.engine_plan import EnginePlan, plan_lines
from moss_edge.runtime.parity import report_markdown

CARD = "README.md"


def _sizes(root: Path, manifest: dict) -> list[str]:
    counted, rows = set(), []
    for name, entry in manifest["graphs"].items():
        mib = sum((root / f).stat().st_size for f in entry["files"] if f not in counted) / 2**20
        counted.update(entry["files"])
        rows.append(f"| {name} | {entry['precision']} | {mib:.1f} |")
    return rows


def write_card(root: Path, manifest: dict, report: dict | None, name: str) -> None:
    """root/README.md for the artifact that will live at `name`."""
    source, quantization = manifest["source"], manifest.get("quantization", {})
    recipe = quantization.get("recipe", {}).get("name", "fp32 (export)")
    provider = next((p for p in ("cpu", "tensorrt", "cuda") if p in manifest.get("backends", [])), "cpu")
    lines = [f"# {Path(name).name}", "",
             f"MOSS-Audio for edge devices, made by {manifest['created_by']}: recipe `{recipe}`, from the checkpoint "
             f"`{Path(source['checkpoint']).name}` (sha256 `{source['sha256'][:16]}...`).", "",
             "```bash", "# with moss-audio-edge installed on the device (the runtime needs no PyTorch)",
             f"moss-edge verify {Path(name).name} --provider {provider}   # the model's recorded answers, on this machine",
             f"moss-edge run {Path(name).name} --provider {provider} --audio clip.wav --prompt \"What happens in the audio?\"",
             "```", "", "| graph | precision | MiB |", "|---|---|---|", *_sizes(root, manifest), "",
             f"Runs on: {', '.join(manifest.get('backends', [])) or 'not checked'}.", ""]
    if report is not None and "graphs" in report:  # a full report (a custom verify may give its summary only)
        lines += ["## Parity with the fp32 PyTorch model", "", *report_markdown(report).splitlines()[2:], ""]
    elif "parity" in manifest:
        parity = manifest["parity"]
        said = parity.get("skipped") or ("passed" if parity.get("passed") else "FAILED: see parity.json")
        lines += [f"Parity with the fp32 PyTorch model: {said}", ""]
    if manifest.get("checks"):
        lines += ["## Targets (`moss-edge check`)", "", "```", *summary_lines({t: {**r, "findings": []} for t, r in
                                                                            manifest["checks"].items()}), "```", ""]
    if "engine_plan" in manifest:
        lines += ["## Jetson memory plan (an estimate)", "", "```", *plan_lines(EnginePlan(**manifest["engine_plan"])),
                  "```", ""]
    (root / CARD).write_text("\n".join(lines))
