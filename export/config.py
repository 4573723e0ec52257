"""MOSS-Audio config.json as typed dataclasses, with upstream defaults for missing keys."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import Dims


@dataclass
class AudioConfig:
    d_model: int = 1280
    output_dim: int = 1280
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    downsample_hidden_size: int = 480
    layer_norm_eps: float = 1e-5
    max_source_positions: int = 1500
    n_window: int = 200  # a chunk is 2 * n_window mel frames
    conv_chunksize: int = 64  # chunks per encoder mini-batch upstream; does not change results
    deepstack_encoder_layer_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    @property
    def has_out_proj(self) -> bool:
        return self.output_dim != self.d_model


@dataclass
class LanguageConfig:
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960


@dataclass
class MossAudioConfig:
    audio: AudioConfig
    language: LanguageConfig
    adapter_hidden_size: int = 8192
    deepstack_num_inject_layers: int | None = None
    tie_word_embeddings: bool = False

    @property
    def num_deepstack(self) -> int:
        """Mergers / injected layers: taps, capped by deepstack_num_inject_layers."""
        k = len(self.audio.deepstack_encoder_layer_indexes)
        if self.deepstack_num_inject_layers is not None:
            k = min(k, int(self.deepstack_num_inject_layers))
        return k

    def to_hf_dict(self) -> dict:
        """config.json content in the upstream layout."""
        language = asdict(self.language)
        language.update(model_type="qwen3", attention_bias=False, hidden_act="silu",
                        tie_word_embeddings=self.tie_word_embeddings)
        audio = asdict(self.audio)
        audio.update(activation_function="gelu", downsample_rate=8)
        return {
            "model_type": "moss_audio",
            "architectures": ["MossAudioModel"],
            "audio_config": audio,
            "language_config": language,
            "adapter_hidden_size": self.adapter_hidden_size,
            "deepstack_num_inject_layers": self.deepstack_num_inject_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.language.vocab_size,
        }


def _typed(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _pick(cls, values, where: str):
    """Build a dataclass from the keys it knows (other upstream keys are ignored), each value
    of the type the field declares."""
    if not isinstance(values, dict):
        raise MossEdgeError(f"{where} in config.json must be an object, not {type(values).__name__}")
    kinds = {f.name: f.type if f.type in (int, float) else list for f in fields(cls)}
    picked = {k: v for k, v in values.items() if k in kinds and not (k == "head_dim" and v is None)}
    for key, value in picked.items():
        if not _typed(value, kinds[key]):
            raise MossEdgeError(f"{where}.{key} in config.json is {value!r}; it must be "
                                f"{'a whole number' if kinds[key] is int else 'a number' if kinds[key] is float else 'a list of whole numbers'}")
    return cls(**picked)


def parse_config(raw: dict) -> MossAudioConfig:
    if not isinstance(raw, dict):
        raise MossEdgeError(f"config.json must hold a JSON object, not a {type(raw).__name__}")
    if raw.get("model_type") != "moss_audio":
        raise MossEdgeError(
            f"config.json has model_type {raw.get('model_type')!r}; expected 'moss_audio' "
            "(a MOSS-Audio checkpoint in Hugging Face layout)"
        )
    audio = _pick(AudioConfig, raw.get("audio_config") or {}, "audio_config")
    language = _pick(LanguageConfig, raw.get("language_config") or {}, "language_config")
    if (raw.get("language_config") or {}).get("head_dim", 0) is None:
        language.head_dim = language.hidden_size // max(language.num_attention_heads, 1)
    _check_sizes(audio, language)
    tie = bool(raw.get("tie_word_embeddings", False))
    if tie:
        raise MossEdgeError("tie_word_embeddings=true is not a MOSS-Audio layout this tool supports")
    inject = raw.get("deepstack_num_inject_layers")
    if inject is not None and not (_typed(inject, int) and inject >= 0):
        raise MossEdgeError(f"deepstack_num_inject_layers in config.json is {inject!r}; it must be null or a whole "
                            "number >= 0")
    adapter = raw.get("adapter_hidden_size", 8192)
    if not (_typed(adapter, int) and adapter > 0):
        raise MossEdgeError(f"adapter_hidden_size in config.json is {adapter!r}; it must be a whole number > 0")
    cfg = MossAudioConfig(audio=audio, language=language, adapter_hidden_size=adapter, deepstack_num_inject_layers=inject)
    if cfg.num_deepstack > language.num_hidden_layers:
        raise MossEdgeError("more DeepStack injections than decoder layers in config.json")
    bad = [i for i in audio.deepstack_encoder_layer_indexes if not 0 <= i < audio.encoder_layers]
    if bad:
        raise MossEdgeError(f"deepstack_encoder_layer_indexes {bad} outside 0..{audio.encoder_layers - 1}")
    return cfg


def _check_sizes(audio: AudioConfig, language: LanguageConfig) -> None:
    """Sizes that cannot make a model fail here, not as a tracing error deep in the exporter."""
    for where, cfg in (("audio_config", audio), ("language_config", language)):
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise MossEdgeError(f"{where}.{f.name} in config.json is {value}; it must be > 0")
    if audio.d_model % audio.encoder_attention_heads:
        raise MossEdgeError(f"audio_config: d_model {audio.d_model} is not divisible by encoder_attention_heads "
                            f"{audio.encoder_attention_heads}")
    if language.num_attention_heads % language.num_key_value_heads:
        raise MossEdgeError(f"language_config: num_attention_heads {language.num_attention_heads} is not a multiple "
                            f"of num_key_value_heads {language.num_key_value_heads}")
    if language.head_dim % 2:
        raise MossEdgeError(f"language_config: head_dim {language.head_dim} must be even (rotary embeddings)")


def load_config(checkpoint_dir: str | Path) -> MossAudioConfig:
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise MossEdgeError(f"checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MossEdgeError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MossEdgeError(f"{config_file} is not valid JSON: {err}") from None
    return parse_config(raw)


def dims_of(cfg) -> Dims:
    """The graph contract's sizes of a checkpoint config (the manifest's "model" entry)."""
    lang, a = cfg.language, cfg.audio
    return Dims(hidden_size=lang.hidden_size, num_hidden_layers=lang.num_hidden_layers,
                num_key_value_heads=lang.num_key_value_heads, head_dim=lang.head_dim, vocab_size=lang.vocab_size,
                num_deepstack=cfg.num_deepstack, num_taps=len(a.deepstack_encoder_layer_indexes),
                chunk_frames=a.chunk_frames, conv_chunksize=a.conv_chunksize, audio_dim=a.output_dim,
                max_positions=lang.max_position_embeddings)
