"""Writing artifacts and checkpoints: staged folders, graph entries, the manifest.

Export and quantize (and the checkpoint writers) write through here; the device runtime only
reads (runtime/artifact.py). onnx is imported here, never on the device path.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx

from moss_edge.runtime.artifact import sha256_file
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.prompt import TokenIds


def _io(values) -> list[dict]:
    return [{"name": v.name, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]


def graph_entry(root: Path, name: str, precision: str, proto: onnx.ModelProto | None = None,
                hashed: dict[str, str] | None = None) -> dict:
    """Manifest entry of root/name.onnx (proto: that graph already parsed, without its weights):
    its files with sha256 (external data too), opset, IO. hashed (file -> sha256) carries the
    hashes of the entries already made, so a file two graphs share is read once."""
    path = root / f"{name}.onnx"
    proto = proto or onnx.load(str(path), load_external_data=False)
    files = [path.name]
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in files:
                files.append(entry.value)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    hashed = {} if hashed is None else hashed
    for f in files:
        if f not in hashed:
            hashed[f] = sha256_file(root / f)
    return {"file": path.name, "files": {f: hashed[f] for f in files}, "precision": precision,
            "opset": opset, "inputs": _io(proto.graph.input), "outputs": _io(proto.graph.output)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_staging(parent: Path) -> list[Path]:
    """Remove the staging folders that killed runs left in parent (their process is gone)."""
    removed = []
    for tmp in parent.glob(".*.staging-*-*"):
        pid = tmp.name.rsplit(".staging-", 1)[1].split("-", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def check_output(out: Path) -> None:
    """Refuse an output that exists or cannot be written, before any work is done."""
    out = Path(out)
    if out.exists():
        raise MossEdgeError(f"{out} already exists; choose another output path or remove it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        raise MossEdgeError(f"cannot write {out}: {err.strerror} ({err.filename}); choose a folder you can write to") from None


@contextmanager
def staged_dir(out: Path):
    """A temporary folder beside out that becomes out in one rename when the block succeeds and
    is removed when it fails, so a half-written artifact or checkpoint is never left at out.
    Its name carries the process id, so a later run removes what a killed one left."""
    out = Path(out)
    check_output(out)
    remove_dead_staging(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            raise MossEdgeError(f"{out} appeared while this run was writing it; this run's result was removed")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(out: Path, config: dict, shards: list[list[str]], tensor, ids: TokenIds,
                     write_tokenizer, extra_files: dict[str, dict] | None = None) -> Path:
    """A Hugging Face layout checkpoint, staged: the weights (model.safetensors, or shards and
    their index), config.json, the tokenizer (write_tokenizer(folder)), processor_config.json
    (audio ids, time markers) and generation_config.json (stop ids). tensor(name) gives each
    weight when its shard is written, so a shard at a time is in memory."""
    from safetensors.torch import save_file

    with staged_dir(out) as tmp:
        weight_map = {}
        for i, names in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: tensor(name) for name in names}, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(tmp)
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": ids.stop[-1], "eos_token_id": ids.stop}, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps(
            {"audio_token_id": ids.audio_token, "audio_start_id": ids.audio_start, "audio_end_id": ids.audio_end,
             "enable_time_marker": ids.time_markers}, indent=2))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
    return out


def write_manifest(root: Path, manifest: dict) -> None:
    """manifest.json of the artifact being written; export and quantize write it last, without
    `unfinished`, once the artifact is verified."""
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
