"""The Triton Inference Server binary that the nvidia-pytriton wheel carries (the serve extra),
run as a child process over a model repository of Python-backend models.

`moss-edge serve` writes its own Python-backend models instead of binding functions through
PyTriton: PyTriton answers every exception of a bound function with INTERNAL (HTTP 500) and the
Python traceback, and a client's mistake must be INVALID_ARG (HTTP 400) with one line of ours.
"""

import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from moss_edge.runtime.errors import MossEdgeError

NEEDS = "serving needs the Triton server that nvidia-pytriton carries: pip install 'moss-audio-edge[serve]'"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class BundledServer:
    binary: Path
    python_backend: Path  # libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # the Python backend's stub, built for this interpreter's version
    libs: Path  # the shared libraries the wheel bundles for the binary

    @classmethod
    def find(cls) -> "BundledServer":
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise MossEdgeError(NEEDS)
        package = Path(spec.origin).parent
        dist = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        libs = package.parent / "nvidia_pytriton.libs"  # an installed wheel; an editable checkout keeps them in dist
        server = cls(binary=dist / "bin" / "tritonserver", python_backend=dist / "backends" / "python",
                     stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                     libs=libs if libs.is_dir() else dist / "external_libs")
        missing = [str(p) for p in (server.binary, server.python_backend / "libtriton_python.so", server.stub, server.libs)
                   if not p.exists()]
        if missing:
            raise MossEdgeError(f"the nvidia-pytriton install lacks {', '.join(missing)} (a Python {version} stub is "
                                f"needed); reinstall it: pip install --force-reinstall 'moss-audio-edge[serve]'")
        return server

    def backends(self, workspace: Path) -> Path:
        """A backend directory in workspace: the Python backend with this interpreter's stub beside it,
        where the server looks for it."""
        python = workspace / "backends" / "python"
        python.mkdir(parents=True)
        for f in self.python_backend.iterdir():
            if f.is_file():
                (python / f.name).symlink_to(f)
        shutil.copy(self.stub, python / self.stub.name)
        return workspace / "backends"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub embeds libpython: the interpreter's own (a pyenv or conda Python beside an older
        # system libpython breaks the stub at start), and it finds its prefix, hence this
        # environment's site-packages, through the first python3 on PATH.
        libdir = sysconfig.get_config_var("LIBDIR")
        paths = [str(self.libs), libdir if libdir and any(Path(libdir).glob("libpython3*.so*")) else None,
                 env.get("LD_LIBRARY_PATH")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
        return env

    def start(self, repository: Path, backends: Path, arguments: list[str]) -> subprocess.Popen:
        """The server over repository, its log on this process's stdout and stderr; it is sent SIGTERM
        if this process dies first, so no server outlives its `moss-edge serve`."""
        command = [str(self.binary), f"--model-repository={repository}", f"--backend-directory={backends}",
                   f"--backend-config=python,shm-region-prefix-name=moss_edge_{os.getpid()}_",
                   "--log-info=false", "--exit-timeout-secs=10", "--allow-gpu-metrics=false",
                   "--pinned-memory-pool-byte-size=0", *arguments]
        return subprocess.Popen(command, env=self.environment(), preexec_fn=_terminate_with_parent)


def _terminate_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
