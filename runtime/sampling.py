"""Choosing the next token from logits (numpy), and splitting a Thinking model's answer."""

from dataclasses import dataclass

import numpy as np

from moss_edge.runtime.errors import MossEdgeError


@dataclass
class SamplingOptions:
    """temperature 0 means greedy (the default: reproducible). Upstream samples with
    temperature 1.0, top_k 50."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        def whole(name, value, least):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise MossEdgeError(f"{name} must be a whole number >= {least}, got {value!r}")

        whole("max_new_tokens", self.max_new_tokens, 1)
        whole("top_k", self.top_k, 0)
        if self.seed is not None:
            whole("seed", self.seed, 0)
        if not (isinstance(self.temperature, (int, float)) and np.isfinite(self.temperature) and self.temperature >= 0):
            raise MossEdgeError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise MossEdgeError(f"top_p must be in (0, 1], got {self.top_p!r}")


def next_token(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator) -> int:
    """logits [vocab] -> token id."""
    logits = np.asarray(logits, np.float64).reshape(-1)
    if opts.temperature == 0:
        return int(np.argmax(logits))
    logits = logits / opts.temperature
    if 0 < opts.top_k < logits.size:
        kth = np.partition(logits, -opts.top_k)[-opts.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if opts.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, opts.top_p)) + 1]  # smallest set reaching top_p
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))


def split_thinking(text: str) -> tuple[str, str]:
    """'<think>reasoning</think>answer' -> ('reasoning', 'answer'); no think block -> ('', text)."""
    start, end = text.find("<think>"), text.find("</think>")
    if end == -1:
        return "", text.strip()
    thinking = text[start + len("<think>") if start != -1 and start < end else 0 : end]
    return thinking.strip(), text[end + len("</think>") :].strip()
