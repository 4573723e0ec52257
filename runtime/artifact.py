"""An artifact directory: ONNX graphs, tokenizer files and manifest.json describing them.

The manifest records each graph's files with sha256, precision, opset and IO; the runtime
checks them at load so a damaged or mixed-up artifact fails with a clear message. Writing
artifacts is export's job (export/writer.py): nothing here writes.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.graphs import GRAPHS, Dims
from moss_edge.runtime.onnx_files import external_data_locations
from moss_edge.runtime.prompt import TokenIds, check_token_ids

FORMAT = "moss-edge-artifact"
FORMAT_VERSION = 2  # 2: tokenizer files hashed, unfinished (staging) manifests marked


def inside(root: Path, name: str) -> Path:
    """root/name, or an error when it resolves outside root: an artifact only reads its own files."""
    path = root / str(name)
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise MossEdgeError(f"{name!r} is outside the artifact: it resolves outside its folder {root}, and an "
                            "artifact only reads its own files") from None
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Artifact:
    root: Path
    manifest: dict

    @classmethod
    def load(cls, root: str | Path, check_hashes: bool = True, unfinished_ok: bool = False) -> "Artifact":
        """Read and check an artifact. unfinished_ok lets export/quantize verify the artifact
        they are still writing; everyone else is refused a folder an interrupted run left."""
        root = Path(root)
        if not root.is_dir():
            raise MossEdgeError(f"artifact not found: {root} (make one with `moss-edge export CHECKPOINT -o {root}`)")
        path = root / "manifest.json"
        if not path.is_file():
            raise MossEdgeError(f"{root} has no manifest.json; is it a moss-edge artifact?")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MossEdgeError(f"{path} is corrupted (not valid JSON: {err}); export the artifact again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise MossEdgeError(f"{path} is not a moss-edge manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise MossEdgeError(
                f"{root} has artifact format version {manifest.get('format_version')}; this runtime reads "
                f"version {FORMAT_VERSION}: export it again with this version of moss-edge"
            )
        if manifest.get("unfinished") and not unfinished_ok:
            raise MossEdgeError(f"{root} is an unfinished artifact ({manifest['unfinished']}): the run that wrote it "
                                "was interrupted before it was verified; make it again")
        for key in ("graphs", "model", "token_ids"):
            if not isinstance(manifest.get(key), dict):
                raise MossEdgeError(f"{path} has no {key!r} section; export the artifact again")
        missing = [g for g in GRAPHS if not isinstance(manifest["graphs"].get(g), dict)]
        if missing:
            raise MossEdgeError(f"{path} names no {', '.join(missing)} graph")
        artifact = cls(root, manifest)
        artifact.check_files(check_hashes)
        check_token_ids(artifact.token_ids, artifact.dims.vocab_size, f"{path} was edited or damaged: export the "
                        "artifact again (with the ids the checkpoint was trained with)")
        return artifact

    def file(self, name: str) -> Path:
        """A file the manifest names, refused unless it is inside the artifact."""
        return inside(self.root, name)

    def check_files(self, check_hashes: bool) -> None:
        named = [(file, digest, "tokenizer") for file, digest in self.tokenizer_files.items()]
        reference = self.manifest.get("reference")
        if reference:  # the recorded answers verify checks against: hashed like every other file
            named.append((reference.get("file", ""), reference.get("sha256", ""), "recorded reference answers"))
        for name, graph in self.manifest["graphs"].items():
            if graph.get("file") not in graph.get("files", {}):
                raise MossEdgeError(f"{self.root}/manifest.json: the {name} graph's file is not among its hashed files")
            named += [(file, digest, f"{name} graph") for file, digest in graph["files"].items()]
        hashed: dict[str, str] = {}  # graphs can share a file (decoder_ort reads decoder.onnx.data): hash it once
        for file, digest, what in named:
            path = self.file(file)
            if not path.is_file():
                raise MossEdgeError(f"artifact {self.root} is missing {file} ({what})")
            if check_hashes and file not in hashed:
                hashed[file] = sha256_file(path)
            if check_hashes and hashed[file] != digest:
                raise MossEdgeError(
                    f"{path} does not match its sha256 in manifest.json: the file was changed or "
                    "damaged; export or copy the artifact again"
                )
        for name, graph in self.manifest["graphs"].items():
            # ONNX Runtime before 1.24 follows any external-data path: only the graph's own hashed files
            for location in external_data_locations(self.file(graph["file"])):
                if location not in graph["files"]:
                    raise MossEdgeError(f"{self.root / graph['file']} points at external data {location!r}, which is not "
                                        "one of the artifact's own files; an artifact only reads its own files")

    @property
    def tokenizer_files(self) -> dict[str, str]:
        """Tokenizer file name -> sha256."""
        files = self.manifest.get("tokenizer_files", {})
        if not isinstance(files, dict):
            raise MossEdgeError(f"{self.root}/manifest.json: tokenizer_files must map names to sha256s")
        return files

    def decoder_for(self, provider: str) -> str:
        """The decoder graph a provider runs: the manifest's choice, else the portable one."""
        name = self.manifest.get("decoders", {}).get(provider, "decoder")
        if name not in self.manifest["graphs"]:
            raise MossEdgeError(f"{self.root}/manifest.json chooses decoder {name!r} for {provider}, which it does not "
                                "list; export the artifact again")
        return name

    def unsupported(self, graph: str) -> str | None:
        """Why the onnxruntime installed here cannot run `graph` (its manifest entry names the
        release it needs: an int8 KV cache needs a recent one), or None."""
        import onnxruntime

        needed = self.manifest["graphs"][graph].get("onnxruntime")
        if needed is None or release(onnxruntime.__version__) >= release(needed.removeprefix(">=")):
            return None
        return f"{graph} needs onnxruntime {needed}, this is {onnxruntime.__version__}"

    def graph_path(self, name: str) -> Path:
        return self.file(self.manifest["graphs"][name]["file"])

    @property
    def failed_parity(self) -> bool:
        """True when the artifact's own parity check (export or quantize) failed."""
        return self.manifest.get("parity", {}).get("passed") is False

    @property
    def token_ids(self) -> TokenIds:
        try:
            return TokenIds(**self.manifest["token_ids"])
        except TypeError as err:
            raise MossEdgeError(f"{self.root}/manifest.json: token_ids are malformed ({err}); export the artifact again") from None

    @property
    def dims(self) -> Dims:
        """The sizes the graphs were built with (the graph contract's Dims)."""
        return Dims.from_manifest(self.manifest["model"])


def release(version: str) -> tuple[int, ...]:
    """"1.27.0" -> (1, 27, 0); a local or pre-release suffix ("1.28.0.dev2", "1.27.1+cu12") is ignored."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


# the input that carries each graph's activations (its type is the graph's compute type)
ACTIVATION_INPUT = {"encoder": "mel", "adapter": "audio_tokens"}


def fp16_graphs(manifest: dict) -> list[str]:
    """The artifact's graphs that compute in fp16 (their activation input is fp16)."""
    return [name for name, entry in manifest["graphs"].items()
            if any(i["name"] == ACTIVATION_INPUT.get(name, "audio_embeds") and i["dtype"] == "float16"
                   for i in entry["inputs"])]


def summarize_kept(kept: dict[str, dict[str, dict]]) -> list[str]:
    """One line per graph and reason: how many weights (parameters) stay more precise."""
    lines = []
    for graph, weights in kept.items():
        groups: dict[tuple[str, str], list[int]] = {}
        for w in weights.values():
            groups.setdefault((w["precision"], w["reason"]), []).append(w["parameters"])
        for (precision, reason), sizes in groups.items():
            lines.append(f"{graph}: {len(sizes)} weight(s), {sum(sizes) / 1e6:.2f} M parameters kept {precision}: {reason}")
    return lines


def promoted_lines(promoted: dict[str, dict], rounds: list[dict] | None = None) -> list[str]:
    """One line per graph: what --keep-until-pass kept more precise, the bytes it added, and the
    graph's worst cosine before its first round and after its last."""
    lines = []
    for graph, weights in promoted.items():
        moves = sorted({f"{w['before']} -> {w['after']}" for w in weights.values()})
        added = sum(w["bytes_added"] for w in weights.values())
        mine = [r for r in rounds or [] if r["graph"] == graph]
        change = (f", worst cosine {mine[0]['worst_cosine_before']:.6f} -> {mine[-1]['worst_cosine_after']:.6f} "
                  f"in {len(mine)} round(s)" if mine else "")
        lines.append(f"{graph}: {len(weights)} weight(s) one step more precise ({', '.join(moves)}), "
                     f"+{added / 2**20:.2f} MiB{change}")
    return lines
