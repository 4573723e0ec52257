"""`moss-edge eval-many`: artifacts answered over many clips with Ray Data (the `scale` extra):
one actor pool per artifact, one Pipeline per actor, on a local Ray or a cluster (`address`).

Items: a folder of audio files (each asked `prompt`), or a JSONL file of
{"audio": path, "prompt": text, "expected": text (optional)}; relative paths are taken from the
JSONL file's folder. Out: results.jsonl (one line per artifact and item) and summary.json (per
artifact: clips/s, exact match with `expected` where given, agreement with the first artifact).
"""

import json
import time
from pathlib import Path

from moss_edge.runtime.errors import MossEdgeError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def read_items(source: Path, prompt: str | None) -> list[dict]:
    if source.is_dir():
        if not prompt:
            raise MossEdgeError(f"{source} is a folder of clips: give the question to ask each with --prompt")
        items = [{"audio": str(p), "prompt": prompt} for p in sorted(source.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES]
    elif source.is_file():
        items = []
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise MossEdgeError(f"{source} line {number} is not JSON: {err}") from None
            if not isinstance(item, dict) or "audio" not in item or not (item.get("prompt") or prompt):
                raise MossEdgeError(f"{source} line {number}: need {{\"audio\": path, \"prompt\": text}} (or --prompt)")
            audio = Path(item["audio"])
            items.append({"audio": str(audio if audio.is_absolute() else source.parent / audio),
                          "prompt": item.get("prompt") or prompt, **({"expected": item["expected"]} if "expected" in item else {})})
    else:
        raise MossEdgeError(f"{source} not found: give a folder of clips or a JSONL list")
    if not items:
        raise MossEdgeError(f"{source} holds no clips ({', '.join(AUDIO_SUFFIXES)})")
    missing = [i["audio"] for i in items if not Path(i["audio"]).is_file()]
    if missing:
        raise MossEdgeError(f"{len(missing)} clip(s) not found, e.g. {missing[0]}")
    return [{"index": n, **item} for n, item in enumerate(items)]


class Answerer:
    """A Ray actor: one Pipeline, answering a batch of items."""

    def __init__(self, artifact: str, threads: int, max_new_tokens: int):
        from moss_edge.runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(artifact, threads=threads)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict) -> dict:
        answers, tokens = [], []
        for audio, prompt in zip(batch["audio"], batch["prompt"]):
            r = self.pipe.generate(str(audio), str(prompt), max_new_tokens=self.max_new_tokens)
            answers.append(r.text)
            tokens.append(len(r.tokens))
        return {"index": batch["index"], "answer": answers, "generated_tokens": tokens}


def evaluate_many(artifacts: list[Path], items: list[dict], out: Path, actors: int = 2, address: str | None = None,
                  max_new_tokens: int = 64, log=print) -> dict:
    try:
        import ray
    except ImportError:
        raise MossEdgeError("eval-many needs Ray: pip install 'moss-audio-edge[scale]'") from None
    from moss_edge.runtime.session import available_cores
    from moss_edge.sound_events.task import normalise

    if actors < 1:
        raise MossEdgeError(f"--actors must be at least 1, got {actors}")
    out.mkdir(parents=True, exist_ok=True)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else available_cores(), include_dashboard=False,
                 log_to_driver=False)
    threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)
    dataset = ray.data.from_items(items)
    answers, summary = {}, {}
    try:
        for artifact in artifacts:
            start = time.perf_counter()
            rows = dataset.map_batches(Answerer, fn_constructor_args=(str(artifact), threads, max_new_tokens),
                                       concurrency=actors, batch_size=1, num_cpus=threads).take_all()
            seconds = time.perf_counter() - start
            answers[str(artifact)] = {int(r["index"]): (str(r["answer"]), int(r["generated_tokens"])) for r in rows}
            summary[str(artifact)] = {"clips": len(rows), "seconds": seconds, "clips_per_s": len(rows) / seconds}
            log(f"{artifact}: {len(rows)} clips in {seconds:.1f} s with {actors} actor(s) x {threads} thread(s)")
    finally:
        if started_here:
            ray.shutdown()
    reference = answers[str(artifacts[0])]
    with open(out / "results.jsonl", "w") as f:
        for artifact, by_index in answers.items():
            for item in items:
                answer, generated = by_index[item["index"]]
                f.write(json.dumps({"artifact": artifact, **item, "answer": answer, "generated_tokens": generated}) + "\n")
    for artifact, by_index in answers.items():
        s = summary[artifact]
        s["agreement_with_first"] = sum(by_index[i][0] == reference[i][0] for i in reference) / len(reference)
        expected = [item for item in items if "expected" in item]
        if expected:
            s["exact_match"] = sum(normalise(by_index[i["index"]][0]) == normalise(i["expected"]) for i in expected) / len(expected)
    result = {"actors": actors, "threads_per_actor": threads, "max_new_tokens": max_new_tokens, "artifacts": summary}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result
