"""Export the reference model as three ONNX graphs and write an artifact directory.

The graphs' inputs and outputs are the contract in runtime/graphs.py. One decoder graph serves prefill and decode; DeepStack and audio embeddings are inputs that are
zero off the audio positions (and in decode steps), so there is no control flow in the graph.
"""

import contextlib
import io
import logging
import math
import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from safetensors import safe_open
from torch import nn

from moss_edge import __version__
from moss_edge.export.checkpoint import check_checkpoint, checkpoint_hash, read_token_ids, tensor_files
from moss_edge.export.config import dims_of, load_config
from moss_edge.export.model import MossAudio
from moss_edge.export.backend_check import deployment_entries
from moss_edge.export.ort_decoder import write_ort_decoder
from moss_edge.export.writer import check_output, graph_entry, staged_dir, write_manifest
from moss_edge.runtime.artifact import FORMAT, FORMAT_VERSION, sha256_file
from moss_edge.runtime.graphs import GRAPHS, ORT_DECODER, graph_spec
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.prompt import TextTokenizer, TokenIds, check_token_ids

OPSET = 21
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


class EncoderGraph(nn.Module):
    def __init__(self, model: MossAudio):
        super().__init__()
        self.model = model

    def forward(self, mel, frames):
        return self.model.audio_encoder(mel, frames)


class AdapterGraph(nn.Module):
    def __init__(self, model: MossAudio):
        super().__init__()
        self.model = model

    def forward(self, audio_tokens, taps):
        return self.model.adapt(audio_tokens, taps)


class DecoderGraph(nn.Module):
    def __init__(self, model: MossAudio, audio_token: int):
        super().__init__()
        self.model = model
        self.audio_token = audio_token

    def forward(self, input_ids, position_ids, audio_embeds, deepstack_embeds, past):
        lm = self.model.language_model
        embeds = lm.embed_tokens(input_ids)
        embeds = torch.where((input_ids == self.audio_token)[..., None], audio_embeds, embeds)
        hidden, keys, values = lm(embeds, position_ids, list(past[0::2]), list(past[1::2]), deepstack_embeds)
        logits = self.model.lm_head(hidden[:, -1])
        return (logits, *[t for kv in zip(keys, values) for t in kv])


class ExportLinear(nn.Module):
    """x @ weight_t + bias with the weight stored [in, out]: the graph gets a plain MatMul on an
    initializer (the pattern quantizers and TensorRT look for) and no Transpose to fold."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(_placeholder((linear.in_features, linear.out_features)), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(_placeholder(tuple(linear.bias.shape)), requires_grad=False)

    def forward(self, x):
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def _placeholder(shape: tuple[int, ...]) -> torch.Tensor:
    """A weight of the right shape that costs one row: the graph is traced with these and the real
    values are streamed from the checkpoint into the ONNX file afterwards. Rows are random so that
    no two placeholders are equal (the exporter merges identical initializers)."""
    return torch.randn(shape[-1]).expand(shape)


def skeleton_model(cfg) -> MossAudio:
    """The model with placeholder weights (and real buffers), for tracing at any size."""
    with torch.device("meta"):
        model = MossAudio(cfg)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, ExportLinear(child))
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(module, name, nn.Parameter(_placeholder(tuple(param.shape)), requires_grad=False))
    model.compute_buffers()
    return model.eval()


# External-data location of a weight a graph leaves in the checkpoint (an export for a recipe):
# the quantizer reads it from the shards (CheckpointWeights.array). The file itself is empty, so
# that the folder is a well-formed artifact whose graphs no session can run by mistake.
IN_CHECKPOINT = "weights-in-checkpoint"


class CheckpointWeights:
    """Initializer values read lazily, one tensor at a time, from the checkpoint's files."""

    def __init__(self, checkpoint_dir: Path, model: MossAudio | None = None):
        self.files = tensor_files(checkpoint_dir)
        self.buffers = {name: b for name, b in model.named_buffers()} if model is not None else {}

    def source(self, name: str) -> tuple[str, bool] | None:
        """(checkpoint tensor, transposed) behind initializer `name` ('model.' + module path)."""
        name = name.removeprefix("model.")
        transpose = name.endswith(".weight_t")
        source = name.removesuffix("_t") if transpose else name
        return (source, transpose) if source in self.files else None

    def array(self, name: str) -> np.ndarray:
        """The fp32 value of initializer `name`, as the graph uses it ([in, out] for MatMul weights)."""
        source, transpose = self.source(name)
        with safe_open(str(self.files[source]), framework="pt") as f:
            tensor = f.get_tensor(source)
        tensor = tensor.t() if transpose else tensor
        # one fp32 copy, converted and transposed in one pass (an 8B lm_head is 2.5 GB in fp32)
        return torch.empty(tensor.shape, dtype=torch.float32).copy_(tensor).numpy()

    def lazy(self, name: str, value, in_checkpoint: bool = False) -> ir.TensorProtocol | None:
        """The value of initializer `name`, or None if it is not a weight. in_checkpoint: a
        reference the quantizer resolves, instead of the data."""
        key = name.removeprefix("model.")
        if key in self.buffers:
            return ir.tensor(self.buffers[key].numpy())
        if self.source(name) is None:
            return None
        if in_checkpoint:
            return ir.ExternalTensor(IN_CHECKPOINT, 0, 4 * math.prod(value.shape.numpy()), ir.DataType.FLOAT,
                                     shape=value.shape, name=value.name)
        return ir.LazyTensor(lambda: ir.tensor(self.array(name)), dtype=ir.DataType.FLOAT, shape=value.shape,
                             name=value.name)


def _export(module: nn.Module, args: tuple, dynamic_shapes, inputs: list[str], outputs: list[str],
            path: Path, opset: int, weights: CheckpointWeights, in_checkpoint: bool = False) -> None:
    chatter = io.StringIO()  # the exporter prints its progress; show it only if it fails
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamic_shapes=dynamic_shapes, input_names=inputs,
                                        output_names=outputs, opset_version=opset, dynamo=True, verbose=False)
    except Exception:
        print(chatter.getvalue())
        raise
    total = 0
    for name, value in program.model.graph.initializers.items():
        lazy = weights.lazy(name, value, in_checkpoint)
        if lazy is None:
            if value.const_value is not None and value.const_value.nbytes > 4096:
                raise RuntimeError(f"exporter produced a large initializer {name} not found in the checkpoint")
            continue
        value.const_value = lazy
        total += lazy.nbytes
    if in_checkpoint:
        ir.save(program.model, str(path))  # the references as they are: nothing is read or written
        return
    # protobuf caps a file at 2 GB: big graphs keep their weights in one external file, and so does
    # the decoder at any size, so that decoder_ort.onnx reads the same bytes
    external = f"{path.name}.data" if total > 1 << 30 or path.stem == "decoder" else None
    ir.save(program.model, str(path), external_data=external)


def dynamic_shapes(tensors, bounds: dict[str, int]) -> list[dict]:
    """torch.export dynamic axes of each input, one Dim per axis name of the graph contract."""
    dims = {}
    for t in tensors:
        for axis in t.shape:
            if isinstance(axis, str) and axis not in dims:
                dims[axis] = torch.export.Dim(axis, max=bounds[axis]) if axis in bounds else torch.export.Dim(axis)
    return [{i: dims[a] for i, a in enumerate(t.shape) if isinstance(a, str)} for t in tensors]


def export_graphs(checkpoint_dir: Path, cfg, audio_token: int, out: Path, opset: int = OPSET, log=print,
                  in_checkpoint: bool = False) -> None:
    """Trace the three graphs on a placeholder model, then stream the checkpoint's weights in
    (in_checkpoint: leave them there, as references): memory stays at a few tensors whatever
    the model size. Names and dynamic axes come from the graph contract (runtime/graphs.py)."""
    model = skeleton_model(cfg)
    weights = CheckpointWeights(checkpoint_dir, model)
    a, lang, d = cfg.audio, cfg.language, dims_of(cfg)
    specs = {g: graph_spec(g, d) for g in GRAPHS}

    def export(graph: str, module: nn.Module, args: tuple, shapes) -> None:
        spec = specs[graph]
        _export(module, args, shapes, [t.name for t in spec.inputs], [t.name for t in spec.outputs],
                out / f"{graph}.onnx", opset, weights, in_checkpoint)

    log("  [1/3] encoder")
    export("encoder", EncoderGraph(model),
           (torch.randn(2, a.num_mel_bins, a.chunk_frames), torch.tensor([a.chunk_frames, 200])),
           tuple(dynamic_shapes(specs["encoder"].inputs, {"frames": a.chunk_frames})))
    log("  [2/3] adapter")
    export("adapter", AdapterGraph(model), (torch.randn(7, a.output_dim), torch.randn(d.num_taps, 7, a.output_dim)),
           tuple(dynamic_shapes(specs["adapter"].inputs, {})))
    log(f"  [3/3] decoder ({lang.num_hidden_layers} layers)")
    h = lang.hidden_size
    past = tuple(torch.zeros(2, lang.num_key_value_heads, 3, lang.head_dim) for _ in range(2 * lang.num_hidden_layers))
    args = (torch.zeros(2, 5, dtype=torch.long), torch.arange(5).repeat(2, 1), torch.zeros(2, 5, h),
            torch.zeros(cfg.num_deepstack, 2, 5, h), past)
    shapes = dynamic_shapes(specs["decoder"].inputs, {})
    export("decoder", DecoderGraph(model, audio_token), args, (*shapes[:4], tuple(shapes[4:])))


def export_artifact(checkpoint_dir: str | Path, out_dir: str | Path, opset: int = OPSET, verify_steps: int = 16,
                    token_ids: TokenIds | None = None, log=print, in_checkpoint: bool = False,
                    verify_audio: list[str] | None = None) -> Path:
    """Checkpoint -> fp32 artifact, with the parity report against the PyTorch model inside.

    token_ids overrides what the checkpoint's processor/generation configs say. in_checkpoint:
    the graphs only, their weights left in the checkpoint for the quantizer to read (the source
    of `quantize.artifact.export_quantized`); no ORT decoder, no parity check."""
    from moss_edge.export.card import write_card
    from moss_edge.export.verify import Verifier, keep_recording

    checkpoint_dir, out = Path(checkpoint_dir), Path(out_dir)
    if opset not in (21, 23):
        raise MossEdgeError(f"opset {opset} is not supported: 21 (runs everywhere) or 23 (fused attention, ORT CPU)")
    check_output(out)
    cfg = load_config(checkpoint_dir)
    ids = token_ids or read_token_ids(checkpoint_dir)
    check_token_ids(ids, cfg.language.vocab_size, "The checkpoint has no processor_config.json naming them (or names "
                    "wrong ones): pass the ids it was trained with")
    check_checkpoint(checkpoint_dir)  # a missing or mis-shaped tensor fails now, not after the tracing
    if any((checkpoint_dir / f).is_file() for f in TOKENIZER_FILES[:3]):
        TextTokenizer.from_dir(checkpoint_dir)  # an unreadable tokenizer fails now too
    with staged_dir(out) as tmp:
        log("exporting encoder, adapter and decoder to ONNX")
        export_graphs(checkpoint_dir, cfg, ids.audio_token, tmp, opset, log, in_checkpoint)
        if in_checkpoint:
            (tmp / IN_CHECKPOINT).touch()
        ort_decoder = None
        if not in_checkpoint:
            log("  the decoder for ONNX Runtime's CPU provider (contrib ops, the same weights)")
            ort_decoder = write_ort_decoder(tmp, onnx.load(str(tmp / "decoder.onnx"), load_external_data=False),
                                            dims_of(cfg), cfg.language, ids.audio_token)
        tokenizer_files = {}
        for f in TOKENIZER_FILES:
            if (checkpoint_dir / f).is_file():
                shutil.copy(checkpoint_dir / f, tmp / f)
                tokenizer_files[f] = sha256_file(tmp / f)
        hashed = {}  # decoder and decoder_ort share decoder.onnx.data: hashed once
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"moss-audio-edge {__version__}",
            "source": {"checkpoint": str(checkpoint_dir.resolve()), "sha256": checkpoint_hash(checkpoint_dir)},
            "config": cfg.to_hf_dict(), "model": asdict(dims_of(cfg)),
            "graphs": {g: graph_entry(tmp, g, "fp32", hashed=hashed) for g in GRAPHS},
            "token_ids": vars(ids), "tokenizer_files": tokenizer_files, "backends": [],
            "unfinished": "export: parity not checked yet",
        }
        if ort_decoder is not None:
            manifest["graphs"][ORT_DECODER] = graph_entry(tmp, ORT_DECODER, "fp32", ort_decoder, hashed)
            manifest["decoders"] = {"cpu": ORT_DECODER}
        if not in_checkpoint:  # the quantized artifact made from graphs left in the checkpoint checks its own
            manifest.update(deployment_entries(tmp, manifest))
        write_manifest(tmp, manifest)
        report = None
        if in_checkpoint:
            manifest["weights_in_checkpoint"] = True
            manifest["parity"] = {"skipped": "the weights are in the checkpoint: the quantized artifact is verified"}
        elif verify_steps == 0:
            manifest["parity"] = {"skipped": "export was asked not to verify (--no-verify)"}
        else:
            log("checking parity against the PyTorch model")
            verifier = Verifier(checkpoint_dir, verify_audio, steps=verify_steps)
            try:
                report = verifier(tmp)
            except MossEdgeError as err:  # too big to check here: the quantized artifacts are verified
                manifest["parity"] = {"skipped": str(err)}
                log(f"parity check skipped: {err}")
            else:
                keep_recording(tmp, verifier.recording(tmp), manifest)
                report["artifact"] = str(out)  # checked in the staging folder, reported where it will live
                manifest["parity"] = report["summary"]
                (tmp / "parity.json").write_text(json.dumps(report, indent=2))
                manifest["parity_report"] = "parity.json"
        del manifest["unfinished"]
        if not in_checkpoint:
            write_card(tmp, manifest, report, str(out))
        write_manifest(tmp, manifest)  # the last file written
    return out
