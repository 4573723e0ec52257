"""Requests/s and latency of `moss-edge serve` under load: 1, 2 and 4 concurrent HTTP clients
against 1 and 2 instances, one artifact, one clip and question per request (greedy, 24 new
tokens); then bursts of 4x what the server holds (instances + --max-queue) sent at once: how
many are answered, how many refused (HTTP 503) and how fast each kind comes back. Needs the
serve extra.

    python benchmarks/serve_load.py ARTIFACT [--requests 24]   # writes benchmarks/serve-load.json + .png
"""

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.http as http

from moss_edge import bundled_audio
from moss_edge.bench import cpu_flags
from tritonclient.utils import InferenceServerException

from moss_edge.serve import MAX_QUEUE, launch

QUESTION = "List the events with their start times."
BURST_ROUNDS = 3


def _inputs(clip: bytes) -> list:
    inputs = []
    for name, value in (("audio", clip), ("prompt", QUESTION.encode()), ("options", b'{"max_new_tokens": 24}')):
        x = http.InferInput(name, [1], "BYTES")
        x.set_data_from_numpy(np.array([value], dtype=np.object_))
        inputs.append(x)
    return inputs


def load(url: str, clients: int, requests: int, clip: bytes) -> dict:
    def one(_):
        client, inputs = http.InferenceServerClient(url), _inputs(clip)
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


def burst(url: str, size: int, clip: bytes) -> dict:
    """size requests released together; each one's outcome and latency."""
    start = threading.Barrier(size)

    def one(_):
        client, inputs = http.InferenceServerClient(url, concurrency=1, network_timeout=600), _inputs(clip)
        start.wait(timeout=60)
        t = time.perf_counter()
        try:
            client.infer("moss_audio", inputs)
            outcome = "answered"
        except InferenceServerException as err:
            outcome = f"{err.status()} {err.message().split('] ')[-1]}"
        return outcome, time.perf_counter() - t

    with ThreadPoolExecutor(size) as pool:
        outcomes = list(pool.map(one, range(size)))
    answered = [t for o, t in outcomes if o == "answered"]
    refused = [t for o, t in outcomes if o != "answered"]
    reasons = {}
    for o, _ in outcomes:
        if o != "answered":
            reasons[o] = reasons.get(o, 0) + 1
    return {"sent": size, "answered": len(answered), "refused": len(refused), "refusals": reasons,
            "answered_p50_ms": 1000 * float(np.percentile(answered, 50)) if answered else None,
            "answered_p95_ms": 1000 * float(np.percentile(answered, 95)) if answered else None,
            "refused_max_ms": 1000 * max(refused) if refused else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "serve-load.json")
    args = parser.parse_args()
    clip = Path(bundled_audio()).read_bytes()
    results, bursts = {}, {}
    for instances in (1, 2):
        proc, urls = launch(args.artifact, instances)
        url = urls["http"]
        try:
            results[instances] = {clients: load(url, clients, args.requests, clip) for clients in (1, 2, 4)}
            size = 4 * (instances + MAX_QUEUE)
            bursts[instances] = [burst(url, size, clip) for _ in range(BURST_ROUNDS)]
        finally:
            proc.terminate()
            proc.wait(60)
    cpu = cpu_flags()
    args.out.write_text(json.dumps({"artifact": str(args.artifact), "cpu": cpu, "requests": args.requests,
                                    "max_queue": MAX_QUEUE, "results": results, "bursts": bursts}, indent=2))
    chart(results, bursts, cpu, args.out.with_suffix(".png"))
    print(json.dumps({"results": results, "bursts": bursts}, indent=2))


def chart(results: dict, bursts: dict, cpu: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.5))
    for instances, by_clients in results.items():
        clients = list(by_clients)
        ax1.plot(clients, [by_clients[c]["requests_per_s"] for c in clients], marker="o", label=f"{instances} instance(s)")
        ax2.plot(clients, [by_clients[c]["p95_ms"] for c in clients], marker="o", label=f"{instances} instance(s)")
    ax1.set(xlabel="concurrent clients", ylabel="requests/s")
    ax2.set(xlabel="concurrent clients", ylabel="p95 latency (ms)")
    ax1.legend()
    for i, (instances, rounds) in enumerate(bursts.items()):
        for j, r in enumerate(rounds):
            x = i * (len(rounds) + 1) + j
            ax3.bar(x, r["answered"], color="#3b7dd8", label="answered" if x == 0 else None)
            ax3.bar(x, r["refused"], bottom=r["answered"], color="#d8703b", label="refused (503)" if x == 0 else None)
        p95 = [r["answered_p95_ms"] / 1000 for r in rounds]
        ax3.text(i * (len(rounds) + 1) + (len(rounds) - 1) / 2, rounds[0]["sent"],
                 f"answered p95 {min(p95):.1f}-{max(p95):.1f} s\nrefused within {max(r['refused_max_ms'] for r in rounds):.0f} ms",
                 ha="center", va="bottom", fontsize=7)
    ax3.set_xticks([i * (BURST_ROUNDS + 1) + 1 for i in range(len(bursts))], [f"{n} instance(s)" for n in bursts])
    ax3.set(ylabel="requests in one burst", title=f"bursts of 4 x (instances + queue {MAX_QUEUE})")
    ax3.set_ylim(top=max(r["sent"] for rounds in bursts.values() for r in rounds) * 1.25)
    ax3.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"moss-edge serve, packaged model INT4, 10 s clip, 24 tokens [{cpu}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
