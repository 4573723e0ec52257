"""The `moss_audio` model of a repository written by `moss-edge triton-repo` (copied there as
model.py; it runs inside Triton's Python backend, nowhere else): audio + prompt -> text, the
three graphs called as BLS requests."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from moss_edge.runtime.audio import clip_token_count
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.generation import generate_tokens, result
from moss_edge.runtime.graph_pipeline import GraphPipeline
from moss_edge.runtime.graphs import Dims, graph_spec
from moss_edge.runtime.pipeline import to_waveform
from moss_edge.runtime.prompt import TextTokenizer, TokenIds, prompt_ids
from moss_edge.serve import MODEL, answer_arrays, given_inputs, request_arguments, triton_error

MODELS = {"encoder": "moss_encoder", "adapter": "moss_adapter", "decoder": "moss_decoder"}


class TritonPythonModel:
    def initialize(self, args):
        root = Path(args["model_repository"]) / args["model_version"]
        manifest = json.loads((root / "manifest.json").read_text())
        self.dims = Dims.from_manifest(manifest["model"])
        self.ids = TokenIds(**manifest["token_ids"])
        self.tokenizer = TextTokenizer.from_dir(root) if manifest.get("tokenizer_files") else None
        self.outputs = {g: [t.name for t in graph_spec(g, self.dims).outputs] for g in MODELS}
        self.model = GraphPipeline(self._call, self.dims, self.ids, GraphPipeline.float_inputs_of(manifest))

    def _call(self, graph: str, feeds: dict) -> dict:
        request = pb_utils.InferenceRequest(model_name=MODELS[graph], requested_output_names=self.outputs[graph],
                                            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value))
                                                    for name, value in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{MODELS[graph]}: {response.error().message()}")  # the server's fault, not the request's
        return {t.name(): t.as_numpy() for t in response.output_tensors()}

    def _answer(self, request) -> list:
        audio, prompt, opts = request_arguments(given_inputs(pb_utils, request))
        waveform = to_waveform(audio)
        clip_tokens = [clip_token_count(len(waveform), self.dims.chunk_frames)]
        ids = prompt_ids(prompt, clip_tokens, self.tokenizer, self.ids, self.dims.vocab_size)
        room = self.dims.max_positions - len(ids)
        if room < 1:
            raise MossEdgeError(f"the prompt is {len(ids)} positions; the model takes {self.dims.max_positions}: "
                                "shorten the audio or the question")
        asked, opts = opts, replace(opts, max_new_tokens=min(room, opts.max_new_tokens))
        tokens = list(generate_tokens(self.model, ids, self.model.encode([waveform]), opts))
        r = result(self.tokenizer.decode(tokens) if self.tokenizer else "", tokens, len(ids), opts, asked, {})
        arrays = answer_arrays(r.text, r.thinking, len(tokens), len(ids), r.stop_reason)
        return [pb_utils.Tensor(name, value) for name, value in arrays.items()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._answer(request)))
            except Exception as err:  # every request gets an answer; what kind, triton_error decides
                responses.append(pb_utils.InferenceResponse(error=triton_error(pb_utils, err, MODEL)))
        return responses
