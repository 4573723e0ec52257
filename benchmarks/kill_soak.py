"""kill -9 `moss-edge export` and `moss-edge quantize` at random moments and check what is left.

Usage: python benchmarks/kill_soak.py WORKDIR [--runs 20] -> JSON on stdout. After every kill,
each folder in WORKDIR must be either a complete verified artifact at its target, or a staging
folder that refuses to load; the next run must remove the staging folders of dead runs.
"""

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from moss_edge.export.synthetic import preset, write_synthetic_checkpoint
from moss_edge.export.writer import staged_dir
from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.errors import MossEdgeError


def classify(work: Path) -> dict:
    counts = {"complete": 0, "staging_refused": 0, "staging_without_manifest": 0, "loadable_unverified": 0}
    for folder in work.iterdir():
        if folder.name in ("ckpt", "fp32", "cache"):
            continue
        try:
            artifact = Artifact.load(folder)
        except MossEdgeError:
            counts["staging_refused" if (folder / "manifest.json").is_file() else "staging_without_manifest"] += 1
            continue
        ok = folder.name[0] != "." and artifact.manifest.get("parity", {}).get("passed")
        counts["complete" if ok else "loadable_unverified"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    if not ckpt.exists():
        write_synthetic_checkpoint(ckpt, preset("tiny"), dtype="fp32")
    cli = [sys.executable, "-m", "moss_edge.cli"]
    if not (work / "fp32").exists():
        subprocess.run(cli + ["export", str(ckpt), "-o", str(work / "fp32"), "--steps", "4"], check=True,
                       capture_output=True)
    rng = random.Random(0)
    runs = []
    for i in range(args.runs):
        for command in (["export", str(ckpt), "--steps", "4"],
                        ["quantize", str(work / "fp32"), "--recipe", "int4-awq", "--steps", "4", "--task-examples", "0",
                         "--cache-dir", str(work / "cache")]):
            delay = rng.uniform(0.5, 30.0 if command[0] == "export" else 14.0)  # past each one's usual length
            proc = subprocess.Popen(cli + command + ["-o", str(work / f"{command[0]}-{i}")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            start = time.perf_counter()
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            runs.append({"command": command[0], "delay_s": round(delay, 2), "killed": proc.returncode == -9,
                         "ran_s": round(time.perf_counter() - start, 2), **classify(work)})
    before = classify(work)
    with staged_dir(work / "next"):
        pass
    left = [p.name for p in work.iterdir() if p.name.startswith(".")]
    print(json.dumps({"runs": runs, "after_all_kills": before, "staging_left_after_next_run": left,
                      "loadable_unverified_ever": max(r["loadable_unverified"] for r in runs)}, indent=1))


if __name__ == "__main__":
    main()
