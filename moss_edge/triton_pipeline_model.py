"""The model.py of `moss-edge serve`'s two models (copied there; it runs inside Triton's Python
backend, nowhere else). Each instance holds a Pipeline and answers one request at a time:
moss_audio with the whole answer, moss_audio_stream (decoupled) with text pieces as they come."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from moss_edge.runtime.pipeline import Pipeline
from moss_edge.serve import answer_arrays, given_inputs, request_arguments, triton_error


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.pipe = Pipeline.load(parameters["artifact"], threads=int(parameters["threads"]))

    def execute(self, requests):
        if not self.decoupled:
            return [self._answer(request) for request in requests]
        for request in requests:
            self._stream(request)
        return None

    def _answer(self, request):
        try:
            audio, prompt, opts = request_arguments(given_inputs(pb_utils, request))
            r = self.pipe.generate(audio, prompt, opts)
        except Exception as err:  # every request gets an answer; what kind, triton_error decides
            return pb_utils.InferenceResponse(error=triton_error(pb_utils, err, self.name))
        arrays = answer_arrays(r.text, r.thinking, len(r.tokens), r.prompt_tokens, r.stop_reason)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, v) for n, v in arrays.items()])

    def _stream(self, request):
        sender = request.get_response_sender()
        try:
            audio, prompt, opts = request_arguments(given_inputs(pb_utils, request))
            for piece in self.pipe.stream(audio, prompt, opts):
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("text", np.array([piece.encode()], np.object_))]))
        except Exception as err:
            sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, err, self.name)),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
