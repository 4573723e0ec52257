"""Prompt building: the chat template, audio spans with time markers, the tokenizer.

A clip of N audio tokens (12.5 per second) becomes `audio_bos, A.., marker, A.., audio_eos`,
where a marker is the digit tokens of the second (2, 4, 6, ...) placed after every 25 tokens.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers import AddedToken

from moss_edge.runtime.audio import TOKENS_PER_SECOND
from moss_edge.runtime.errors import MossEdgeError

MARKER_EVERY_SECONDS = 2
# The special tokens of the chat template and the audio spans, by role (Qwen3 / MOSS-Audio text).
SPECIAL_TOKENS = {"end_of_text": "<|endoftext|>", "turn_start": "<|im_start|>", "turn_end": "<|im_end|>",
                  "audio_token": "<|AUDIO|>", "think": "<think>", "end_think": "</think>",
                  "audio_start": "<|audio_bos|>", "audio_end": "<|audio_eos|>"}
AUDIO_PLACEHOLDER = "".join(SPECIAL_TOKENS[k] for k in ("audio_start", "audio_token", "audio_end"))
DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen2/Qwen3 pre-tokenizer split, used when a checkpoint ships vocab.json + merges.txt only.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class TokenIds:
    """The ids the runtime needs; upstream defaults, overridden by the checkpoint's files."""

    audio_token: int = 151654
    audio_start: int = 151669
    audio_end: int = 151670
    stop: list[int] = field(default_factory=lambda: [151645, 151643])
    digits: list[int] = field(default_factory=lambda: list(range(15, 25)))
    time_markers: bool = True


def check_token_ids(ids: TokenIds, vocab_size: int, remedy: str) -> None:
    """Every id the runtime feeds must index the embedding table: say which one does not, the
    flag that sets it at export, and `remedy` (what to do where the ids came from)."""
    named = [("audio_token", ids.audio_token, "--audio-token-id"), ("audio_start", ids.audio_start, "--audio-start-id"),
             ("audio_end", ids.audio_end, "--audio-end-id"), *[(f"digit {d}", t, "--digit-ids") for d, t in enumerate(ids.digits)],
             *[("stop", t, "eos_token_id in generation_config.json") for t in ids.stop]]
    bad = [f"{what} = {value} (set it with {flag})" for what, value, flag in named
           if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size]
    if bad:
        raise MossEdgeError(f"token ids outside the vocabulary of {vocab_size}: {'; '.join(bad)}. {remedy}")
    if len({ids.audio_token, ids.audio_start, ids.audio_end}) < 3:
        raise MossEdgeError(f"the audio token, audio start and audio end ids must differ; got {ids.audio_token}, "
                            f"{ids.audio_start}, {ids.audio_end}. {remedy}")


def read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MossEdgeError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise MossEdgeError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def audio_span(n_tokens: int, ids: TokenIds) -> list[int]:
    """The ids between audio_bos and audio_eos for a clip of n_tokens audio tokens."""
    if not ids.time_markers:
        return [ids.audio_token] * n_tokens
    per_marker = int(TOKENS_PER_SECOND * MARKER_EVERY_SECONDS)
    out, used = [], 0
    for second in range(MARKER_EVERY_SECONDS, int(n_tokens / TOKENS_PER_SECOND) + 1, MARKER_EVERY_SECONDS):
        upto = second // MARKER_EVERY_SECONDS * per_marker
        out += [ids.audio_token] * (upto - used)
        used = upto
        out += [ids.digits[int(d)] for d in str(second)]
    return out + [ids.audio_token] * (n_tokens - used)


def expand_audio_spans(prompt_ids: list[int], clip_tokens: list[int], ids: TokenIds) -> list[int]:
    """Replace the content of each audio_bos ... audio_eos span with the clip's audio span.

    A prompt given as explicit ids marks each clip with audio_bos, audio_eos (anything between
    them is replaced), one span per clip in order.
    """
    out, clip = [], 0
    i = 0
    while i < len(prompt_ids):
        tok = prompt_ids[i]
        if tok != ids.audio_start:
            if tok == ids.audio_end:
                raise MossEdgeError(f"prompt ids have audio_end ({ids.audio_end}) without audio_start at {i}")
            out.append(tok)
            i += 1
            continue
        try:
            end = prompt_ids.index(ids.audio_end, i + 1)
        except ValueError:
            raise MossEdgeError(f"prompt ids open an audio span at {i} ({ids.audio_start}) and never close it") from None
        if clip >= len(clip_tokens):
            raise MossEdgeError(f"prompt has more audio spans than the {len(clip_tokens)} clip(s) given")
        out += [ids.audio_start, *audio_span(clip_tokens[clip], ids), ids.audio_end]
        clip += 1
        i = end + 1
    if clip != len(clip_tokens):
        raise MossEdgeError(f"prompt has {clip} audio span(s) but {len(clip_tokens)} clip(s) were given")
    return out


class TextTokenizer:
    """The checkpoint's tokenizer through the `tokenizers` library (no transformers)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, root: str | Path) -> "TextTokenizer":
        root = Path(root)
        try:
            if (root / "tokenizer.json").is_file():
                return cls(Tokenizer.from_file(str(root / "tokenizer.json")))
            if (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
                return cls(_tokenizer_from_vocab_merges(root))
        except Exception as err:  # the tokenizers library raises plain Exceptions for unreadable files
            if isinstance(err, MossEdgeError):
                raise
            raise MossEdgeError(f"the tokenizer in {root} cannot be read ({str(err).splitlines()[0][:200]}); "
                                "copy the checkpoint's tokenizer files again") from None
        raise MossEdgeError(
            f"{root} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
            "give the prompt as token ids instead"
        )

    def encode(self, text: str, control_tokens: bool = True) -> list[int]:
        """control_tokens=False reads `<|im_end|>` and the like as plain text: what a user
        types must not be able to close its own turn or open another."""
        self.tokenizer.encode_special_tokens = not control_tokens
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = False

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)


def _tokenizer_from_vocab_merges(root: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(root / "vocab.json"), str(root / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    config = read_json_object(root / "tokenizer_config.json")
    added = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
    tok.add_special_tokens([AddedToken(v["content"], special=True) for _, v in added if v.get("special", True)])
    return tok


def chat_prompt_ids(tokenizer: TextTokenizer, question: str, clip_tokens: list[int], ids: TokenIds,
                    system: str = DEFAULT_SYSTEM) -> list[int]:
    """Token ids of the upstream chat prompt with one audio span per clip.

    If the question holds `<|audio_bos|><|AUDIO|><|audio_eos|>` placeholders (one per clip),
    the spans go there; otherwise all clips go before the question, as upstream does.
    """
    if AUDIO_PLACEHOLDER not in question:
        question = AUDIO_PLACEHOLDER * len(clip_tokens) + ("\n" if clip_tokens else "") + question
    prompt = tokenizer.encode("<|im_start|>system\n") + tokenizer.encode(system, control_tokens=False)
    prompt += tokenizer.encode("<|im_end|>\n<|im_start|>user\n")
    for i, piece in enumerate(question.split(AUDIO_PLACEHOLDER)):
        if i:
            prompt += [ids.audio_start, ids.audio_end]
        if piece:
            prompt += tokenizer.encode(piece, control_tokens=False)
    prompt += tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
    return expand_audio_spans(prompt, clip_tokens, ids)


def prompt_ids(prompt: str | list[int], clip_tokens: list[int], tokenizer: TextTokenizer | None, ids: TokenIds,
               vocab_size: int) -> list[int]:
    """A request's prompt ids. Text goes through the chat template; a list of ids marks each
    clip with audio_bos, audio_eos and is expanded as is (custom templates, exact tests)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise MossEdgeError("this artifact has no tokenizer; give the prompt as token ids")
        return chat_prompt_ids(tokenizer, prompt, clip_tokens, ids)
    if not isinstance(prompt, (list, tuple, np.ndarray)):
        raise MossEdgeError(f"a prompt is text or a list of token ids, not {type(prompt).__name__}")
    for i, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise MossEdgeError(f"prompt id {i} is {t!r}, not an integer")
        if not 0 <= t < vocab_size:
            raise MossEdgeError(f"prompt id {i} is {t}, outside the vocabulary (0 to {vocab_size - 1})")
        if t == ids.audio_token:
            raise MossEdgeError(f"prompt id {i} is the audio token ({t}), which the runtime places itself: mark "
                                f"each clip with audio_start ({ids.audio_start}), audio_end ({ids.audio_end})")
    return expand_audio_spans([int(t) for t in prompt], clip_tokens, ids)
