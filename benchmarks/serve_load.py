"""Requests/s and latency of `moss-edge serve` under load: 1, 2 and 4 concurrent HTTP clients
against 1 and 2 instances, one artifact, one clip and question per request (greedy, 24 new
tokens). Needs the serve extra.

    python benchmarks/serve_load.py ARTIFACT [--requests 24]   # writes benchmarks/serve-load.json + .png
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.http as http

from moss_edge import bundled_audio
from moss_edge.bench import cpu_flags
from moss_edge.serve import launch

QUESTION = "List the events with their start times."


def load(url: str, clients: int, requests: int, clip: bytes) -> dict:
    def one(_):
        client = http.InferenceServerClient(url)
        inputs = []
        for name, value in (("audio", clip), ("prompt", QUESTION.encode()), ("options", b'{"max_new_tokens": 24}')):
            x = http.InferInput(name, [1], "BYTES")
            x.set_data_from_numpy(np.array([value], dtype=np.object_))
            inputs.append(x)
        t = time.perf_counter()
        client.infer("moss_audio", inputs)
        return time.perf_counter() - t

    one(0)  # warm
    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - start_time
    return {"requests_per_s": requests / wall, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p95_ms": 1000 * float(np.percentile(latencies, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "serve-load.json")
    args = parser.parse_args()
    clip = Path(bundled_audio()).read_bytes()
    results = {}
    for instances in (1, 2):
        proc, urls = launch(args.artifact, instances)
        url = urls["http"]
        try:
            results[instances] = {clients: load(url, clients, args.requests, clip) for clients in (1, 2, 4)}
        finally:
            proc.terminate()
            proc.wait(60)
    cpu = cpu_flags()
    args.out.write_text(json.dumps({"artifact": str(args.artifact), "cpu": cpu, "requests": args.requests,
                                    "results": results}, indent=2))
    chart(results, cpu, args.out.with_suffix(".png"))
    print(json.dumps(results, indent=2))


def chart(results: dict, cpu: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for instances, by_clients in results.items():
        clients = list(by_clients)
        ax1.plot(clients, [by_clients[c]["requests_per_s"] for c in clients], marker="o", label=f"{instances} instance(s)")
        ax2.plot(clients, [by_clients[c]["p95_ms"] for c in clients], marker="o", label=f"{instances} instance(s)")
    ax1.set(xlabel="concurrent clients", ylabel="requests/s")
    ax2.set(xlabel="concurrent clients", ylabel="p95 latency (ms)")
    ax1.legend()
    fig.suptitle(f"moss-edge serve, packaged model INT4, 10 s clip, 24 tokens [{cpu}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
