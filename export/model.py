"""The MOSS-Audio model in plain PyTorch: audio encoder, adapter, DeepStack mergers, Qwen3 decoder.

Module names match the Hugging Face checkpoint, so weights load without renaming. Everything
that will be exported takes and returns plain tensors (KV cache included) and has no
data-dependent Python control flow; DeepStack is an explicit input added after layer k.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from moss_edge.export.config import AudioConfig, LanguageConfig, MossAudioConfig


def downsampled_length(frames: torch.Tensor) -> torch.Tensor:
    """Length after the three stride-2 convolutions of the encoder stem."""
    for _ in range(3):
        frames = torch.div(frames - 1, 2, rounding_mode="floor") + 1
    return frames


def sinusoid_positions(length: int, dim: int) -> torch.Tensor:
    inv = torch.exp(-math.log(10000.0) / (dim // 2 - 1) * torch.arange(dim // 2).float())
    t = torch.arange(length).float()[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class GatedMLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim_in, hidden, bias=False)
        self.up_proj = nn.Linear(dim_in, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim_out, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, key_bias):
        n, t, d = x.shape
        hd = d // self.heads
        q, k, v = (p(x).view(n, t, self.heads, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = (q @ k.transpose(-1, -2)) * hd**-0.5 + key_bias[:, None, None, :]
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(n, t, d))


class EncoderLayer(nn.Module):
    """Whisper pre-LN layer with exact-erf GELU."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = EncoderAttention(cfg.d_model, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x, key_bias):
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_bias)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.downsample_hidden_size
        self.conv1 = nn.Conv2d(1, c, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        mel_out = cfg.num_mel_bins
        for _ in range(3):
            mel_out = (mel_out - 1) // 2 + 1
        self.stem_proj = nn.Linear(c * mel_out, cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        if cfg.has_out_proj:
            self.out_proj = nn.Linear(cfg.d_model, cfg.output_dim, bias=False)
        self.register_buffer(
            "positions", sinusoid_positions(cfg.max_source_positions, cfg.d_model), persistent=False
        )

    def project(self, x):
        return self.out_proj(x) if self.cfg.has_out_proj else x

    def forward(self, mel: torch.Tensor, frames: torch.Tensor):
        """mel [n, mels, T] chunks padded to T, frames [n] valid frames.

        Returns tokens [n, T', out] and taps [n_taps, n, T', out]; rows past each chunk's
        valid length are padding. The padded frames go through the convolutions as zeros,
        exactly as upstream, because that padding leaks into the valid tokens.
        """
        x = F.gelu(self.conv1(mel.unsqueeze(1)))
        x = F.gelu(self.conv2(x))
        x = F.gelu(self.conv3(x))
        n, c, f, t = x.shape
        x = self.stem_proj(x.permute(0, 3, 1, 2).reshape(n, t, c * f))
        x = x + self.positions[:t].to(x.dtype)
        valid = torch.arange(t, device=mel.device)[None, :] < downsampled_length(frames)[:, None]
        key_bias = torch.where(valid, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        taps = []
        for i, layer in enumerate(self.layers):
            x = layer(x, key_bias)
            if i in self.cfg.deepstack_encoder_layer_indexes:
                taps.append(self.project(x))
        tokens = self.project(self.layer_norm(x))
        return tokens, torch.stack(taps) if taps else tokens.new_zeros((0, *tokens.shape))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # one op (opset 23 RMSNormalization); older opsets get it decomposed by the exporter
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_inv_freq(cfg: LanguageConfig) -> torch.Tensor:
    return 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class DecoderAttention(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask_bias, past_k, past_v):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        # one op with grouped KV heads (opset 23 Attention); decomposed for older opsets
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias.to(q.dtype), scale=self.head_dim**-0.5,
                                             enable_gqa=True)
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(out), k, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x, cos, sin, mask_bias, past_k, past_v):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask_bias, past_k, past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LanguageModel(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, embeds, position_ids, past_keys, past_values, deepstack):
        """embeds [b, s, h], position_ids [b, s], past_* lists of [b, kv, p, d],
        deepstack [k, b, s, h] (zeros off the audio positions, and in decode steps).
        Returns the final-normed hidden states and the grown caches."""
        s = embeds.shape[1]
        p = past_keys[0].shape[2]
        freqs = position_ids[:, :, None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = angles.cos().to(embeds.dtype), angles.sin().to(embeds.dtype)
        query_pos = torch.arange(s, device=embeds.device)[:, None] + p
        key_pos = torch.arange(p + s, device=embeds.device)[None, :]
        mask_bias = torch.where(key_pos <= query_pos, 0.0, torch.finfo(torch.float32).min)
        x = embeds
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask_bias, past_keys[i], past_values[i])
            keys.append(k)
            values.append(v)
            if i < deepstack.shape[0]:
                x = x + deepstack[i]
        return self.norm(x), keys, values


class MossAudio(nn.Module):
    def __init__(self, cfg: MossAudioConfig):
        super().__init__()
        self.cfg = cfg
        a, lang = cfg.audio, cfg.language
        self.audio_encoder = AudioEncoder(a)
        self.language_model = LanguageModel(lang)
        self.audio_adapter = GatedMLP(a.output_dim, cfg.adapter_hidden_size, lang.hidden_size)
        self.deepstack_audio_merger_list = nn.ModuleList(
            GatedMLP(a.output_dim, cfg.adapter_hidden_size, lang.hidden_size) for _ in range(cfg.num_deepstack)
        )
        self.lm_head = nn.Linear(lang.hidden_size, lang.vocab_size, bias=False)

    def encode_audio(self, mel, frames, valid_tokens):
        """Encoder chunks -> (tokens, taps) of each chunk's valid rows in order, then the adapter:
        (tokens, taps, embeds, deepstack). Inference and training both run audio through here."""
        tokens, taps = self.audio_encoder(mel, frames)
        valid = torch.arange(tokens.shape[1])[None, :] < valid_tokens[:, None]
        tokens, taps = tokens[valid], taps[:, valid]
        return (tokens, taps, *self.adapt(tokens, taps))

    def adapt(self, tokens, taps):
        """Encoder tokens and taps -> audio embeddings and the K DeepStack embeddings."""
        merged = [m(taps[k]) for k, m in enumerate(self.deepstack_audio_merger_list)]
        stacked = torch.stack(merged) if merged else tokens.new_zeros((0, *tokens.shape[:-1], self.cfg.language.hidden_size))
        return self.audio_adapter(tokens), stacked

    def empty_cache(self, batch: int = 1, dtype=None):
        lang = self.cfg.language
        dtype = dtype or self.lm_head.weight.dtype
        shape = (batch, lang.num_key_value_heads, 0, lang.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(lang.num_hidden_layers)]

    def compute_buffers(self):
        """(Re)build the non-persistent buffers, e.g. after building the model on the meta device."""
        enc, lm = self.audio_encoder, self.language_model
        enc.positions = sinusoid_positions(self.cfg.audio.max_source_positions, self.cfg.audio.d_model)
        lm.inv_freq = rope_inv_freq(self.cfg.language)
