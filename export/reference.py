"""The PyTorch reference pipeline: what every exported or quantized graph is compared with."""

from pathlib import Path

import numpy as np
import torch

from moss_edge.export.checkpoint import load_model
from moss_edge.export.model import MossAudio
from moss_edge.runtime.audio import EncoderBatch, chunk_mels
from moss_edge.runtime.generation import generate_tokens, place_audio
from moss_edge.runtime.pipeline import AudioFeatures
from moss_edge.runtime.prompt import TokenIds, read_token_ids
from moss_edge.runtime.sampling import SamplingOptions


class ReferencePipeline:
    def __init__(self, model: MossAudio, ids: TokenIds):
        self.model = model
        self.ids = ids
        self.dtype = model.lm_head.weight.dtype

    @classmethod
    def load(cls, checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> "ReferencePipeline":
        return cls(load_model(checkpoint_dir, dtype), read_token_ids(checkpoint_dir))

    @torch.inference_mode()
    def encode(self, mels: list[np.ndarray]) -> AudioFeatures:
        batch: EncoderBatch = chunk_mels(mels, self.model.cfg.audio.chunk_frames)
        tokens, taps = self.model.audio_encoder(torch.from_numpy(batch.mel).to(self.dtype), torch.from_numpy(batch.frames))
        valid = torch.arange(tokens.shape[1])[None, :] < torch.from_numpy(batch.tokens)[:, None]
        tokens, taps = tokens[valid], taps[:, valid]
        embeds, deepstack = self.model.adapt(tokens, taps)
        f32 = lambda t: t.float().numpy()  # noqa: E731
        return AudioFeatures(f32(tokens), f32(taps), f32(embeds), f32(deepstack), batch.clip_tokens)

    @torch.inference_mode()
    def forward(self, prompt_ids: list[int], audio: AudioFeatures | None, past=None, all_logits=False):
        """Run the decoder over prompt_ids after `past` (keys, values); returns logits
        ([S, vocab] or [vocab] for the last position) and the grown cache."""
        lm = self.model.language_model
        ids = torch.tensor([prompt_ids])
        embeds = lm.embed_tokens(ids)
        k = self.model.cfg.num_deepstack
        deepstack = torch.zeros((k, 1, len(prompt_ids), embeds.shape[-1]), dtype=self.dtype)
        if audio is not None:
            embeds[0] = torch.where(ids[0, :, None] == self.ids.audio_token,
                                    torch.from_numpy(place_audio(prompt_ids, self.ids.audio_token, audio.embeds)).to(self.dtype),
                                    embeds[0])
            deepstack[:, 0] = torch.from_numpy(place_audio(prompt_ids, self.ids.audio_token, audio.deepstack))
        keys, values = past if past is not None else (self.model.empty_cache(1, self.dtype), self.model.empty_cache(1, self.dtype))
        start = keys[0].shape[2]
        positions = torch.arange(start, start + len(prompt_ids))[None]
        hidden, keys, values = lm(embeds, positions, keys, values, deepstack)
        logits = self.model.lm_head(hidden[0] if all_logits else hidden[0, -1])
        return logits.float().numpy(), (keys, values)

    def generate(self, prompt_ids: list[int], audio: AudioFeatures | None, opts: SamplingOptions):
        """Yield generated ids (with the KV cache)."""
        state = {}

        def prefill():
            logits, state["past"] = self.forward(prompt_ids, audio)
            return logits

        def step(token):
            logits, state["past"] = self.forward([token], None, state["past"])
            return logits

        return generate_tokens(prefill, step, opts, self.ids.stop)
