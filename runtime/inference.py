"""One interface for running a model, whatever runs it.

The ONNX Runtime pipeline (runtime/pipeline.py) and the PyTorch reference (export/reference.py)
both implement it; generation, verify, bench, calibration and the task evaluation drive
models through it only. Ablations are options of the calls, never edits to the model.
"""

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moss_edge.runtime.graphs import Dims
from moss_edge.runtime.prompt import TokenIds


@dataclass
class AudioFeatures:
    tokens: np.ndarray  # [n, audio_dim] encoder output, valid tokens of all chunks in order
    taps: np.ndarray  # [n_taps, n, audio_dim]
    embeds: np.ndarray  # [n, hidden] adapter output
    deepstack: np.ndarray  # [K, n, hidden] merger outputs
    clip_tokens: list[int]


class Inference(Protocol):
    ids: TokenIds
    dims: Dims

    def encode(self, waveforms: list[np.ndarray]) -> AudioFeatures:
        """16 kHz mono clips -> their audio features, clip after clip."""

    def prefill(self, prompt_ids: list[int], audio: AudioFeatures, deepstack: bool = True) -> np.ndarray:
        """Run the prompt from an empty cache; the last position's logits. deepstack=False
        leaves the DeepStack injection out (an ablation)."""

    def step(self, token: int) -> np.ndarray:
        """Feed one token after the cached positions; its logits."""
