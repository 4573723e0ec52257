"""The decode loop and incremental detokenization, shared by every backend: a backend is
anything with the Inference interface (runtime/inference.py)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.inference import AudioFeatures, Inference
from moss_edge.runtime.sampling import SamplingOptions, next_token, split_thinking


@dataclass
class Result:
    text: str
    thinking: str
    tokens: list[int]
    prompt_tokens: int
    timings: dict = field(default_factory=dict)
    stop_reason: str = ""  # "stop token", "max_new_tokens" or "context limit"


def result(text: str, tokens: list[int], prompt_tokens: int, opts: SamplingOptions, asked: SamplingOptions,
           timings: dict) -> Result:
    """A generation's Result; opts is `asked` with max_new_tokens cut to the context left."""
    thinking, answer = split_thinking(text)
    reason = ("stop token" if len(tokens) < opts.max_new_tokens else
              "context limit" if opts.max_new_tokens < asked.max_new_tokens else "max_new_tokens")
    return Result(answer, thinking, tokens, prompt_tokens, timings, reason)


def generate_tokens(model: Inference, prompt_ids: list[int], audio: AudioFeatures, opts: SamplingOptions,
                    stop_ids: list[int] | None = None, deepstack: bool = True) -> Iterator[int]:
    """Yield generated ids until a stop id (not yielded; the model's own when None) or
    max_new_tokens."""
    opts.check()
    stop_ids = model.ids.stop if stop_ids is None else stop_ids
    rng = np.random.default_rng(opts.seed)
    logits = model.prefill(prompt_ids, audio, deepstack)
    for i in range(opts.max_new_tokens):
        token = next_token(logits, opts, rng)
        if token in stop_ids:
            return
        yield token
        if i + 1 < opts.max_new_tokens:
            logits = model.step(token)


def stream_text(decode: Callable[[list[int]], str], tokens: Iterator[int]) -> Iterator[str]:
    """Turn a stream of ids into text pieces; holds back pieces that end inside a UTF-8 character."""
    ids: list[int] = []
    emitted = ""
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]
            emitted = text
    text = decode(ids)
    if text != emitted and text.startswith(emitted):
        yield text[len(emitted):]


def place_audio(prompt_ids: np.ndarray, audio_token: int, rows: np.ndarray) -> np.ndarray:
    """[..., n, h] rows for the audio tokens -> [..., S, h] with the rows at the audio
    positions of the prompt (in order) and zeros elsewhere."""
    mask = np.asarray(prompt_ids) == audio_token
    if int(mask.sum()) != rows.shape[-2]:
        raise MossEdgeError(f"prompt has {int(mask.sum())} audio positions but {rows.shape[-2]} audio tokens were encoded")
    out = np.zeros((*rows.shape[:-2], len(prompt_ids), rows.shape[-1]), rows.dtype)
    out[..., mask, :] = rows
    return out
