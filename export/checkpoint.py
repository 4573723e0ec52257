"""Read a MOSS-Audio checkpoint (Hugging Face layout, safetensors, one file or shards).

Memory-frugal: the model is built on the meta device and each tensor is read from the
memory-mapped file and converted one at a time, so at most one full copy of the weights
(in the target dtype) plus one tensor is ever held.
"""

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moss_edge.export.config import load_config
from moss_edge.export.model import MossAudio
from moss_edge.runtime.artifact import sha256_file
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.prompt import SPECIAL_TOKENS, TokenIds, read_json_object
from moss_edge.runtime.session import release_freed_memory

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def checkpoint_hash(checkpoint_dir: str | Path) -> str:
    """sha256 over config.json and the weight files, in name order."""
    checkpoint_dir = Path(checkpoint_dir)
    digest = hashlib.sha256()
    for path in [checkpoint_dir / "config.json", *sorted(set(tensor_files(checkpoint_dir).values()))]:
        digest.update(path.name.encode())
        digest.update(remembered_sha256(path).encode())
    return digest.hexdigest()


def remembered_sha256(path: Path) -> str:
    """A file's sha256, remembered by path, size and modification time in the user's cache:
    reading a 4B checkpoint takes about a minute, and export, quantize and verify each need its
    hash. A file that changes gets a new size or time and is read again."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = Path(os.environ.get("MOSS_EDGE_CACHE", Path.home() / ".cache" / "moss-edge")) / "file-hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        # files that are gone are forgotten, so the cache does not grow with every deleted folder
        known = {k: v for k, v in known.items() if Path(k.rsplit(":", 2)[0]).exists()}
        known[key] = sha256_file(path)
        try:  # a cache that cannot be written only costs the reading next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            tmp.rename(cache)
        except OSError:
            pass
    return known[key]


def tensor_files(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    root = Path(checkpoint_dir)
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise MossEdgeError(f"{index_file} is not a valid shard index ({err})") from None
        files = {name: root / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise MossEdgeError(f"shard(s) named in {index_file.name} are missing: {', '.join(absent)}")
        return files
    singles = sorted(root.glob("*.safetensors"))
    if len(singles) != 1:
        raise MossEdgeError(
            f"{root} has {len(singles)} .safetensors files and no model.safetensors.index.json; "
            "expected one model.safetensors or an index with shards"
        )
    try:
        with safe_open(str(singles[0]), framework="pt") as f:
            return {name: singles[0] for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise MossEdgeError(f"cannot read {singles[0]}: {err}") from None


def _check_names_and_shapes(model: nn.Module, files: dict[str, Path]) -> None:
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = sorted(expected.keys() - files.keys())
    unexpected = sorted(files.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    by_file = defaultdict(list)
    for name in expected.keys() & files.keys():
        by_file[files[name]].append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                held = set(f.keys())
                for name in names:
                    if name not in held:
                        problems.append(f"{name} is named in the shard index but absent from {file.name}")
                        continue
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        problems.append(f"{name} has shape {list(shape)}, config.json implies {list(expected[name])}")
        except (SafetensorError, OSError) as err:
            raise MossEdgeError(f"cannot read {file}: {err}") from None
    if problems:
        raise MossEdgeError("checkpoint does not match its config.json: " + "; ".join(problems))


def check_checkpoint(checkpoint_dir: str | Path) -> None:
    """Every tensor the config implies is present with its shape (headers only: seconds even at
    8B), so a broken checkpoint fails before an export starts, whatever else is asked."""
    with torch.device("meta"):
        model = MossAudio(load_config(checkpoint_dir))
    _check_names_and_shapes(model, tensor_files(checkpoint_dir))


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype | None = None, piecewise: bool = False) -> MossAudio:
    """Load the reference model; dtype None keeps each tensor's stored dtype.

    piecewise: the layers, embedding, lm_head, adapter and mergers stay unloaded and each is
    read from the shards just before it runs and dropped after it, so a model of any size runs
    in the memory of its largest piece (slower: every decode step reads every piece again)."""
    cfg = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = MossAudio(cfg)
    files = tensor_files(checkpoint_dir)
    _check_names_and_shapes(model, files)
    deferred = dict(piecewise_modules(model)) if piecewise else {}
    resident = [n for n in files if not any(n.startswith(prefix + ".") for prefix in deferred)]
    _load(model, files, resident, dtype)
    for prefix, module in deferred.items():
        names = [f"{prefix}.{n}" for n, _ in module.named_parameters()]
        module.register_forward_pre_hook(lambda m, args, names=names: _load(model, files, names, dtype))
        module.register_forward_hook(lambda m, args, out, names=names: _unload(model, names))
    model.compute_buffers()
    model.piecewise = piecewise
    return model.eval()


def piecewise_modules(model: MossAudio) -> list[tuple[str, nn.Module]]:
    """The modules a piecewise model loads one at a time: all but the small encoder stem and
    norms, so that between calls it holds almost nothing (it shares the machine with the
    quantizer and the artifact's sessions)."""
    return [(n, m) for n, m in model.named_modules()
            if n in ("audio_adapter", "language_model.embed_tokens", "lm_head")
            or n.rpartition(".")[0] in ("audio_encoder.layers", "language_model.layers", "deepstack_audio_merger_list")]


def _load(model: nn.Module, files: dict[str, Path], names: list[str], dtype: torch.dtype | None) -> None:
    by_file = defaultdict(list)
    for name in names:
        by_file[files[name]].append(name)
    for file, held in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in held:
                tensor = f.get_tensor(name)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


def _unload(model: nn.Module, names: list[str]) -> None:
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, nn.Parameter(torch.empty_like(getattr(module, attr), device="meta"), requires_grad=False))
    # Layer-sized tensors (tens of MB) come from glibc's heap; loading and dropping them layer
    # after layer left it holding 2 GB of freed memory after one 4B encode and two prefills.
    release_freed_memory()


def reference_whole(cfg, artifact_bytes: int, available: int) -> bool:
    """Whether verify holds the fp32 reference whole: when it takes less than half the available
    memory with the artifact (room for the graphs' sessions); else it loads it piecewise."""
    return reference_bytes(cfg, piecewise=False) + artifact_bytes < 0.5 * available


def reference_bytes(cfg, piecewise: bool) -> int:
    """fp32 bytes a reference model holds at once: all of it, or (piecewise) what stays resident
    plus the largest module loaded at a time."""
    with torch.device("meta"):
        model = MossAudio(cfg)
    total = 4 * sum(p.numel() for p in model.parameters())
    if not piecewise:
        return total
    sizes = [4 * sum(p.numel() for p in m.parameters()) for _, m in piecewise_modules(model)]
    return total - sum(sizes) + max(sizes)


AUDIO_TOKENS = {role: SPECIAL_TOKENS[role] for role in ("audio_token", "audio_start", "audio_end")}


def _added_tokens(root: Path) -> dict[str, int]:
    """Special-token text -> id from tokenizer.json / tokenizer_config.json, if present."""
    out = {t["content"]: int(t["id"]) for t in read_json_object(root / "tokenizer.json").get("added_tokens", [])
           if isinstance(t, dict) and "content" in t and "id" in t}
    for i, t in read_json_object(root / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        if isinstance(t, dict) and "content" in t:
            out.setdefault(t["content"], int(i))
    return out


def read_token_ids(checkpoint_dir: str | Path) -> TokenIds:
    """Ids from whatever the checkpoint holds, in this order: processor_config.json, config.json
    (`audio_token_id`, ...), the tokenizer's added tokens (<|AUDIO|>, ...), generation_config.json
    for the stop ids; upstream's defaults for what none of them names."""
    root = Path(checkpoint_dir)
    ids = TokenIds()
    proc, config, added = read_json_object(root / "processor_config.json"), read_json_object(root / "config.json"), _added_tokens(root)
    for name, text in AUDIO_TOKENS.items():
        key = f"{name}_id"
        value = proc.get(key, config.get(key, added.get(text, getattr(ids, name))))
        setattr(ids, name, int(value))
    ids.time_markers = bool(proc.get("enable_time_marker", ids.time_markers))
    if "digit_token_ids" in proc:
        ids.digits = [int(proc["digit_token_ids"][str(d)]) for d in range(10)]
    gen = read_json_object(root / "generation_config.json")
    if "eos_token_id" in gen:
        # Qwen's bos is <|endoftext|>, which also ends a generation.
        stop = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
        stop += [gen["bos_token_id"]] if "bos_token_id" in gen else []
        ids.stop = list(dict.fromkeys(int(t) for t in stop))
    return ids
