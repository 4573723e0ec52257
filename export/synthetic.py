"""Random MOSS-Audio checkpoints in the real Hugging Face layout, at any size.

Weights are scaled by 1/sqrt(fan_in) so activations stay O(1) through every layer; each
tensor has its own seed, so the values do not depend on sharding. A byte-level tokenizer
with the chat and audio special tokens is written beside them.
"""

import math
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from moss_edge.export.checkpoint import DTYPES
from moss_edge.export.config import AudioConfig, LanguageConfig, MossAudioConfig
from moss_edge.export.model import MossAudio
from moss_edge.export.writer import write_checkpoint
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.prompt import SPECIAL_TOKENS, TokenIds

# Upstream's special-token ids; a small vocabulary moves them just below its end.
QWEN_SPECIALS = {SPECIAL_TOKENS[role]: i for role, i in (
    ("end_of_text", 151643), ("turn_start", 151644), ("turn_end", 151645), ("audio_token", 151654),
    ("think", 151667), ("end_think", 151668), ("audio_start", 151669), ("audio_end", 151670))}


def preset(name: str, encoder_layers: int | None = None, decoder_layers: int | None = None) -> MossAudioConfig:
    """'tiny' for tests, '4b' / '8b' for the released widths (layer counts overridable)."""
    if name == "tiny":
        cfg = MossAudioConfig(
            audio=AudioConfig(d_model=64, output_dim=48, encoder_layers=4, encoder_attention_heads=4,
                              encoder_ffn_dim=128, downsample_hidden_size=8,
                              deepstack_encoder_layer_indexes=[0, 1, 2]),
            language=LanguageConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                    vocab_size=1024, max_position_embeddings=8192),
            adapter_hidden_size=96, deepstack_num_inject_layers=2)
    elif name in ("4b", "8b"):
        wide = name == "8b"
        cfg = MossAudioConfig(
            audio=AudioConfig(),
            language=LanguageConfig(hidden_size=4096 if wide else 2560,
                                    intermediate_size=12288 if wide else 9728),
            adapter_hidden_size=8192, deepstack_num_inject_layers=3)
    else:
        raise MossEdgeError(f"unknown preset {name!r}; choose tiny, 4b or 8b")
    if encoder_layers is not None:
        # the taps keep their relative depth (8, 16, 24 of 32 -> 1, 2, 3 of 4): a shallow model has
        # the full one's DeepStack mergers wherever its depth allows, so their cost is timed
        full = cfg.audio.encoder_layers
        taps = sorted({i * encoder_layers // full for i in cfg.audio.deepstack_encoder_layer_indexes})
        cfg.audio = replace(cfg.audio, encoder_layers=encoder_layers, deepstack_encoder_layer_indexes=taps)
    if decoder_layers is not None:
        cfg.language = replace(cfg.language, num_hidden_layers=decoder_layers)
        if cfg.deepstack_num_inject_layers is not None:
            cfg.deepstack_num_inject_layers = min(cfg.deepstack_num_inject_layers, decoder_layers)
    return cfg


def special_token_ids(vocab_size: int) -> dict[str, int]:
    if vocab_size > max(QWEN_SPECIALS.values()):
        return dict(QWEN_SPECIALS)
    first = vocab_size - 24
    return {tok: first + i for i, tok in enumerate(QWEN_SPECIALS)}


def _init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if leaf == "bias":
        return 0.02 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) / fan_in**0.5


def _byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet in its usual order: printable bytes keep their code point
    (so '0'..'9' get ids 15..24, as the time markers expect), the rest move above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _filler_word(i: int) -> str:
    """A unique pronounceable word with a leading space ('Ġ'), so random output reads as words."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pu"]
    return "Ġ" + "".join(syllables[int(d)] for d in str(i))


def write_tokenizer(out_dir: Path, vocab_size: int) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = special_token_ids(vocab_size)
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    by_id = {i: tok for tok, i in specials.items()}
    for i in range(256, max(specials.values()) + 1):
        vocab[by_id.get(i, _filler_word(i))] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=t not in ("<think>", "</think>")) for t in specials])
    tok.save(str(out_dir / "tokenizer.json"))
    return specials


def write_synthetic_checkpoint(out_dir: str | Path, cfg: MossAudioConfig, dtype: str = "bf16",
                               seed: int = 0, shard_mb: int = 2000) -> Path:
    """Write config, weights (sharded above shard_mb), tokenizer and processor files; atomic."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in MossAudio(cfg).named_parameters()}
    shards, size = [[]], 0
    for name, shape in shapes.items():
        if size >= shard_mb * 2**20:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += math.prod(shape) * DTYPES[dtype].itemsize
    config = cfg.to_hf_dict()
    config["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    specials = special_token_ids(cfg.language.vocab_size)
    role = {text: role for role, text in SPECIAL_TOKENS.items()}
    by_role = {role[text]: i for text, i in specials.items()}
    ids = TokenIds(audio_token=by_role["audio_token"], audio_start=by_role["audio_start"], audio_end=by_role["audio_end"],
                   stop=[by_role["turn_end"], by_role["end_of_text"]])
    return write_checkpoint(Path(out_dir), config, shards, lambda name: _init(name, shapes[name], seed).to(DTYPES[dtype]),
                            ids, lambda folder: write_tokenizer(folder, cfg.language.vocab_size))
