"""Held-out evaluation of the sound-event model: any checkpoint (PyTorch) or artifact (ONNX
Runtime), exact match per task and per class, and the artifact-vs-reference report that verify
adds for artifacts of this model."""

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from moss_edge.runtime.audio import SAMPLE_RATE
from moss_edge.runtime.generation import generate_tokens
from moss_edge.runtime.inference import Inference
from moss_edge.runtime.prompt import TextTokenizer, chat_prompt_ids
from moss_edge.runtime.sampling import SamplingOptions
from moss_edge.sound_events.task import SYSTEM, TASKS, build_tokenizer, make_example, normalise


def evaluate(answer, n: int = 300, seed: int = 1234) -> dict:
    """answer(example) -> text. Exact match per task, start-time accuracy ("when" task), and
    per-class accuracy of the event list ("list" task: each event's label and start)."""
    rng = np.random.default_rng(seed)
    per_task, per_class = defaultdict(list), defaultdict(list)
    for i in range(n):
        example = make_example(rng, TASKS[i % len(TASKS)])
        got = normalise(answer(example))
        per_task[example.task].append(got == normalise(example.answer))
        if example.task == "list":
            listed = got.split(",")
            for j, event in enumerate(example.events):
                per_class[event.label].append(j < len(listed) and listed[j] == normalise(f"{event.start:.1f} {event.label}"))
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"n": n, "seed": seed, "exact_match": mean([x for v in per_task.values() for x in v]),
            "event_list_exact_match": mean(per_task["list"]), "start_time_accuracy": mean(per_task["when"]),
            "per_task": {t: mean(v) for t, v in per_task.items()}, "per_class": {c: mean(v) for c, v in sorted(per_class.items())}}


def answerer(model: Inference, tok: TextTokenizer, deepstack: bool = True, time_markers: bool = True,
             max_new_tokens: int = 48):
    """example -> answer text, greedy, from any model (ONNX Runtime artifact or PyTorch
    reference); deepstack=False and time_markers=False are the ablations."""
    opts = SamplingOptions(max_new_tokens=max_new_tokens)
    ids = replace(model.ids, time_markers=time_markers)

    def answer(example):
        features = model.encode([example.wave])
        prompt = chat_prompt_ids(tok, example.question, features.clip_tokens, ids, SYSTEM)
        return tok.decode(list(generate_tokens(model, prompt, features, opts, deepstack=deepstack)))
    return answer


def streaming_answerer(pipe, tok: TextTokenizer, exact: bool = False, block_seconds: float = 0.25,
                       max_new_tokens: int = 48):
    """example -> answer text, greedy, with the clip fed to Pipeline.open_stream in blocks of
    block_seconds, as a live source would (ONNX Runtime artifacts only)."""
    opts = SamplingOptions(max_new_tokens=max_new_tokens)
    block = max(1, int(block_seconds * SAMPLE_RATE))

    def answer(example):
        prompt = chat_prompt_ids(tok, example.question, [0], pipe.ids, SYSTEM)
        with pipe.open_stream(prompt, exact=exact) as live:
            for start in range(0, len(example.wave), block):
                live.feed(example.wave[start : start + block])
            return tok.decode(live.finish(opts).tokens)
    return answer


def model_and_tokenizer(path: str | Path) -> tuple[Inference, TextTokenizer]:
    """A checkpoint (PyTorch reference, fp32) or an artifact (ONNX Runtime), and its tokenizer."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from moss_edge.runtime.pipeline import Pipeline

        pipe = Pipeline.load(path)
        return pipe, pipe.tokenizer
    import torch

    from moss_edge.export.reference import ReferencePipeline

    return ReferencePipeline.load(path, torch.float32), TextTokenizer.from_dir(path)


def task_accuracy(pipe, reference, n: int = 100) -> dict | None:
    """The sound-event evaluation of an artifact next to its fp32 PyTorch reference, or None when
    the artifact does not come from the sound-event model (judged by its tokenizer)."""
    from moss_edge.export.reference import ReferencePipeline

    if pipe.tokenizer is None or pipe.tokenizer.tokenizer.get_vocab() != build_tokenizer().get_vocab():
        return None
    art = evaluate(answerer(pipe, pipe.tokenizer), n)
    ref = evaluate(answerer(ReferencePipeline(reference, pipe.ids), pipe.tokenizer), n)
    return {"n": n, "artifact": art, "reference": ref,
            "exact_match_drop": ref["exact_match"] - art["exact_match"],
            "event_list_drop": ref["event_list_exact_match"] - art["event_list_exact_match"]}


def task_report(n: int):
    """verify's evaluation callback: task accuracy on n held-out examples, artifact and
    reference (None for n <= 0, and a no-op for artifacts of other models)."""
    return (lambda pipe, reference: task_accuracy(pipe, reference, n)) if n > 0 else None
