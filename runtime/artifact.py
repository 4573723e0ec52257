"""An artifact directory: ONNX graphs, tokenizer files and manifest.json describing them.

The manifest records each graph's files with sha256, precision, opset and IO; the runtime
checks them at load so a damaged or mixed-up artifact fails with a clear message.
"""

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.onnx_files import external_data_locations
from moss_edge.runtime.prompt import TokenIds

FORMAT = "moss-edge-artifact"
FORMAT_VERSION = 2  # 2: tokenizer files hashed, unfinished (staging) manifests marked
GRAPHS = ("encoder", "adapter", "decoder")


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
        return artifact

    def file(self, name: str) -> Path:
        """A file the manifest names, refused unless it is a plain file inside the artifact."""
        path = self.root / str(name)
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            raise MossEdgeError(f"{self.root}/manifest.json names {name!r}, which is outside the artifact; "
                                "an artifact only reads its own files") from None
        return path

    def check_files(self, check_hashes: bool) -> None:
        named = [(file, digest, f"{name} graph") for name, graph in self.manifest["graphs"].items()
                 for file, digest in dict(graph.get("files", {})).items()]
        named += [(file, digest, "tokenizer") for file, digest in self.tokenizer_files.items()]
        for name, graph in self.manifest["graphs"].items():
            if graph.get("file") not in graph.get("files", {}):
                raise MossEdgeError(f"{self.root}/manifest.json: the {name} graph's file is not among its hashed files")
        for file, digest, what in named:
            path = self.file(file)
            if not path.is_file():
                raise MossEdgeError(f"artifact {self.root} is missing {file} ({what})")
            if check_hashes and sha256_file(path) != digest:
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

    def graph_path(self, name: str) -> Path:
        return self.file(self.manifest["graphs"][name]["file"])

    @property
    def failed_parity(self) -> bool:
        """True when the artifact's own parity check (export or quantize) failed."""
        return self.manifest.get("parity", {}).get("passed") is False

    @property
    def token_ids(self) -> TokenIds:
        return TokenIds(**self.manifest["token_ids"])

    @property
    def model(self) -> dict:
        """Sizes the runtime needs: hidden, layers, kv heads, head_dim, deepstack, chunk frames."""
        return self.manifest["model"]


# Writing artifacts (export and quantize; onnx is imported only here, not on the device path).

def _io(values) -> list[dict]:
    import onnx

    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}
    return [{"name": v.name, "dtype": names.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]


def graph_entry(root: Path, name: str, precision: str) -> dict:
    """Manifest entry of root/name.onnx: its files with sha256 (external data too), opset, IO."""
    import onnx

    path = root / f"{name}.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    files = [path.name]
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in files:
                files.append(entry.value)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"file": path.name, "files": {f: sha256_file(root / f) for f in files}, "precision": precision,
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
        raise FileExistsError(f"{out} already exists")
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
            raise FileExistsError(f"{out} already exists")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
