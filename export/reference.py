"""The PyTorch reference behind the Inference interface: what every exported or quantized
graph is compared with."""

from pathlib import Path

import numpy as np
import torch

from moss_edge.export.checkpoint import load_model, read_token_ids
from moss_edge.export.config import dims_of
from moss_edge.export.model import MossAudio
from moss_edge.runtime.audio import chunk_mels, log_mel
from moss_edge.runtime.generation import place_audio
from moss_edge.runtime.inference import AudioFeatures
from moss_edge.runtime.prompt import TokenIds


class ReferencePipeline:
    def __init__(self, model: MossAudio, ids: TokenIds):
        self.model = model
        self.ids = ids
        self.dims = dims_of(model.cfg)
        self.dtype = model.lm_head.weight.dtype
        self.past = None

    @classmethod
    def load(cls, checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> "ReferencePipeline":
        return cls(load_model(checkpoint_dir, dtype), read_token_ids(checkpoint_dir))

    @torch.inference_mode()
    def encode(self, waveforms: list[np.ndarray]) -> AudioFeatures:
        batch = chunk_mels([log_mel(w) for w in waveforms], self.dims.chunk_frames)
        features = self.model.encode_audio(torch.from_numpy(batch.mel).to(self.dtype), torch.from_numpy(batch.frames),
                                           torch.from_numpy(batch.tokens))
        return AudioFeatures(*(t.float().numpy() for t in features), batch.clip_tokens)

    def prefill(self, prompt_ids: list[int], audio: AudioFeatures, deepstack: bool = True) -> np.ndarray:
        logits, self.past = self.forward(prompt_ids, audio, deepstack=deepstack)
        return logits

    def step(self, token: int) -> np.ndarray:
        logits, self.past = self.forward([token], None, self.past)
        return logits

    @torch.inference_mode()
    def forward(self, prompt_ids: list[int], audio: AudioFeatures | None, past=None, all_logits=False,
                deepstack: bool = True):
        """Run the decoder over prompt_ids after `past` (keys, values); returns logits
        ([S, vocab] or [vocab] for the last position) and the grown cache."""
        lm = self.model.language_model
        ids = torch.tensor([prompt_ids])
        embeds = lm.embed_tokens(ids)
        injected = torch.zeros((self.dims.num_deepstack, 1, len(prompt_ids), embeds.shape[-1]), dtype=self.dtype)
        if audio is not None:
            embeds[0] = torch.where(ids[0, :, None] == self.ids.audio_token,
                                    torch.from_numpy(place_audio(prompt_ids, self.ids.audio_token, audio.embeds)).to(self.dtype),
                                    embeds[0])
            if deepstack:
                injected[:, 0] = torch.from_numpy(place_audio(prompt_ids, self.ids.audio_token, audio.deepstack))
        keys, values = past if past is not None else (self.model.empty_cache(1, self.dtype), self.model.empty_cache(1, self.dtype))
        start = keys[0].shape[2]
        positions = torch.arange(start, start + len(prompt_ids))[None]
        hidden, keys, values = lm(embeds, positions, keys, values, injected)
        logits = self.model.lm_head(hidden[0] if all_logits else hidden[0, -1])
        return logits.float().numpy(), (keys, values)
