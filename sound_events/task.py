"""A time-aware sound-event task: clips of synthetic events in noise, questions, answers.

Deterministic by seed (numpy only). The answers need the audio (which events), the DeepStack
path and the time markers (when): a model that does well here exercises all three.
"""

from dataclasses import dataclass

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from moss_edge.runtime.audio import SAMPLE_RATE
from moss_edge.runtime.prompt import SPECIAL_TOKENS

SR = SAMPLE_RATE
CLASSES = ("low tone", "mid tone", "high tone", "rising sweep", "falling sweep", "noise burst", "click train", "chord")
TASKS = ("list", "when", "count", "at")
MAX_EVENTS = 4
SYSTEM = "You are a helpful assistant."
SPECIALS = tuple(SPECIAL_TOKENS[role] for role in ("end_of_text", "turn_start", "turn_end", "audio_token", "audio_start",
                                                   "audio_end"))


@dataclass
class Event:
    start: float
    seconds: float
    label: str


@dataclass
class Example:
    wave: np.ndarray
    events: list[Event]
    task: str
    question: str
    answer: str


def event_wave(label: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    if label in ("low tone", "mid tone", "high tone"):
        x = np.sin(2 * np.pi * {"low tone": 300, "mid tone": 1000, "high tone": 3000}[label] * t)
    elif label in ("rising sweep", "falling sweep"):
        f0, f1 = (400, 3000) if label == "rising sweep" else (3000, 400)
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    elif label == "noise burst":
        x = rng.normal(0, 0.5, t.size)
    elif label == "click train":
        x = np.zeros(t.size)
        click = np.exp(-np.arange(64) / 8) * np.sign(np.sin(np.arange(64)))
        for start in range(0, t.size - 64, SR // 20):
            x[start : start + 64] += click
    else:  # chord
        x = 0.5 * (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 660 * t))
    ramp = np.minimum(1, np.minimum(np.arange(t.size), np.arange(t.size)[::-1]) / (0.02 * SR))
    return rng.uniform(0.3, 0.6) * x * ramp


def make_clip(rng: np.random.Generator, length: float | None = None) -> tuple[np.ndarray, list[Event]]:
    """4-16 s (or `length`) with 1-4 events (starts on a 0.5 s grid, 0.3-2 s long, partial overlaps
    allowed) in background noise at 5-30 dB SNR. Clips start at 4 s so every prompt has a full
    chunk, which is how the encoder pads them at inference too. An event never overlaps one of
    its own class (two equal tones would sum into one sound with no audible second start)."""
    length = round(float(rng.uniform(4, 16)), 1) if length is None else length
    starts = rng.choice(np.arange(0, length - 0.3, 0.5), size=int(rng.integers(1, MAX_EVENTS + 1)), replace=False)
    events: list[Event] = []
    wave = np.zeros(int(length * SR))
    for start in sorted(float(s) for s in starts):
        seconds = round(float(min(rng.uniform(0.3, 2.0), length - start)), 2)
        free = [c for c in CLASSES if all(e.label != c or e.start + e.seconds + 0.25 <= start for e in events)]
        label = free[int(rng.integers(len(free)))]
        x = event_wave(label, seconds, rng)
        wave[int(start * SR) : int(start * SR) + x.size] += x
        events.append(Event(start, seconds, label))
    signal = np.sqrt(np.mean(wave**2)) + 1e-9
    noise = rng.normal(0, 1, wave.size) * signal / 10 ** (rng.uniform(5, 30) / 20)
    return (wave + noise).astype(np.float32), events


def _time(seconds: float) -> str:
    return f"{seconds:.1f}"


def ask(task: str, wave: np.ndarray, events: list[Event], rng: np.random.Generator) -> tuple[str, str]:
    """One question about a clip and its answer."""
    if task == "list":
        return "List the events in order with their start times.", ", ".join(f"{_time(e.start)} {e.label}" for e in events)
    if task == "when":
        event = events[int(rng.integers(len(events)))]
        first = next(e for e in events if e.label == event.label)
        return f"When does the {event.label} start?", _time(first.start)
    if task == "count":
        return "How many events are there?", str(len(events))
    second = int(rng.integers(0, int(len(wave) / SR)))
    active = [e.label for e in events if e.start <= second < e.start + e.seconds]
    return f"What happens at second {second}?", ", ".join(dict.fromkeys(active)) or "nothing"


def training_questions(wave: np.ndarray, events: list[Event], rng: np.random.Generator) -> list[tuple[str, str]]:
    """The questions a training clip is asked: the list (the richest answer), the count, and
    two each of "when" and "at" second."""
    return [ask(task, wave, events, rng) for task in ("list", "count", "when", "when", "at", "at")]


def make_example(rng: np.random.Generator, task: str | None = None) -> Example:
    wave, events = make_clip(rng)
    task = task or TASKS[int(rng.integers(len(TASKS)))]
    return Example(wave, events, task, *ask(task, wave, events, rng))


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(),
    ])


def build_tokenizer() -> Tokenizer:
    """A word-level vocabulary of everything the task says, digits at ids 15-24 (what the
    time markers use), special tokens last."""
    texts = ["system\nYou are a helpful assistant.", "\n", "user\n", "assistant\n", "nothing", "second",
             "List the events in order with their start times.", "How many events are there?",
             "What happens at second 10?", *[f"When does the {c} start?" for c in CLASSES], ", ".join(CLASSES),
             "0 1 2 3 4 5 6 7 8 9 ."]
    pieces = []
    pre = _pre_tokenizer()
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in pieces and piece not in "0123456789":
                pieces.append(piece)
    vocab = {"<unk>": 0}
    others = iter(pieces)
    for i in range(1, 15):
        vocab[next(others)] = i
    vocab.update({str(d): 15 + d for d in range(10)})
    for piece in others:
        vocab[piece] = len(vocab)
    for special in SPECIALS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return tok


def normalise(text: str) -> str:
    """Answer text compared as words: spaces around digits and punctuation do not count."""
    out = text.replace(" .", ".").replace(". ", ".").replace(" ,", ",").strip()
    while "  " in out:
        out = out.replace("  ", " ")
    for d in "0123456789":
        out = out.replace(f"{d} ", f"{d}\0").replace(f" {d}", f"\0{d}")
    return out.replace("\0", "")
