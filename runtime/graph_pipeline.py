"""The model driven through calls to its three graphs (encoder, adapter, portable decoder) run
elsewhere: in a Triton model repository, the Python-backend model calls them as BLS requests
(moss_edge/triton_repo.py). One Inference (runtime/inference.py) over `run(graph, feeds) ->
outputs`; the KV cache goes out and comes back with every call, as the portable decoder's
past and present.
"""

from collections.abc import Callable

import numpy as np

from moss_edge.runtime.audio import chunk_mels, log_mel
from moss_edge.runtime.generation import place_audio
from moss_edge.runtime.graphs import Dims, cache_names, decoder_feeds, empty_cache, graph_spec
from moss_edge.runtime.inference import AudioFeatures
from moss_edge.runtime.pipeline import encode_chunks
from moss_edge.runtime.prompt import TokenIds
from moss_edge.runtime.session import as_declared


class GraphPipeline:
    """float_inputs: per graph, the numpy type of each float input as the manifest records it (an
    fp16 graph takes fp16); the rest of the pipeline holds fp32."""

    def __init__(self, run: Callable[[str, dict], dict], dims: Dims, ids: TokenIds, float_inputs: dict[str, dict]):
        self.dims, self.ids, self.float_inputs = dims, ids, float_inputs
        self._run = run
        self.cache_dtype = float_inputs["decoder"][cache_names(dims, "past")[0]]
        self.past: list = []
        self.length = 0

    @classmethod
    def float_inputs_of(cls, manifest: dict) -> dict[str, dict]:
        return {g: {i["name"]: np.dtype(i["dtype"]) for i in manifest["graphs"][g]["inputs"]
                    if i["dtype"] in ("float32", "float16")} for g in ("encoder", "adapter", "decoder")}

    def run(self, graph: str, feeds: dict) -> dict:
        out = self._run(graph, as_declared(feeds, self.float_inputs[graph]))
        return {n: v.astype(np.float32) if v.dtype == np.float16 and not n.startswith("present_") else v
                for n, v in out.items()}

    def encode(self, waveforms: list[np.ndarray]) -> AudioFeatures:
        """One encoder call per chunk (as the CPU pipeline runs them), then the adapter."""
        batch = chunk_mels([log_mel(w) for w in waveforms], self.dims.chunk_frames)
        return encode_chunks(batch, lambda feeds, last: self._outputs("encoder", feeds),
                             lambda feeds: self._outputs("adapter", feeds), per_run=1)

    def _outputs(self, graph: str, feeds: dict) -> list[np.ndarray]:
        out = self.run(graph, feeds)
        return [out[t.name] for t in graph_spec(graph, self.dims).outputs]

    def _decode(self, ids: np.ndarray, audio: np.ndarray, deepstack: np.ndarray) -> np.ndarray:
        out = self.run("decoder", decoder_feeds(self.dims, ids, self.length, audio, deepstack, self.past))
        self.past = [out[name] for name in cache_names(self.dims, "present")]
        self.length += ids.shape[1]
        return out["logits"][0]

    def prefill(self, prompt_ids: list[int], audio: AudioFeatures, deepstack: bool = True) -> np.ndarray:
        self.length = 0
        self.past = [empty_cache(self.dims, self.cache_dtype)] * (2 * self.dims.num_hidden_layers)
        embeds = place_audio(prompt_ids, self.ids.audio_token, audio.embeds).astype(np.float32)
        injected = place_audio(prompt_ids, self.ids.audio_token, audio.deepstack).astype(np.float32)
        return self._decode(np.array([prompt_ids], np.int64), embeds[None],
                            (injected if deepstack else np.zeros_like(injected))[:, None])

    def step(self, token: int) -> np.ndarray:
        h, k = self.dims.hidden_size, self.dims.num_deepstack
        return self._decode(np.array([[token]], np.int64), np.zeros((1, 1, h), np.float32),
                            np.zeros((k, 1, 1, h), np.float32))
