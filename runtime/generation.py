"""The decode loop and incremental detokenization, shared by every backend.

A backend supplies two functions: `prefill()` runs the prompt and returns the last logits;
`step(token)` feeds one token and returns its logits. Everything else lives here.
"""

from collections.abc import Callable, Iterator

import numpy as np

from moss_edge.runtime.sampling import SamplingOptions, next_token


def generate_tokens(prefill: Callable[[], np.ndarray], step: Callable[[int], np.ndarray],
                    opts: SamplingOptions, stop_ids: list[int]) -> Iterator[int]:
    """Yield generated ids until a stop id (not yielded) or max_new_tokens."""
    opts.check()
    rng = np.random.default_rng(opts.seed)
    logits = prefill()
    for i in range(opts.max_new_tokens):
        token = next_token(logits, opts, rng)
        if token in stop_ids:
            return
        yield token
        if i + 1 < opts.max_new_tokens:
            logits = step(token)


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
        raise ValueError(f"prompt has {int(mask.sum())} audio positions but {rows.shape[-2]} audio tokens were encoded")
    out = np.zeros((*rows.shape[:-2], len(prompt_ids), rows.shape[-1]), rows.dtype)
    out[..., mask, :] = rows
    return out
