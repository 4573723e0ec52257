#!/usr/bin/env bash
# Creates (or refreshes) /work/main/.modelopt-venv: a separate virtual environment holding NVIDIA
# ModelOpt's ONNX INT4 quantizer (nvidia-modelopt, modelopt.onnx.quantization), CPU only.
#
# Why its own environment: modelopt's `[onnx]` extra pins onnx~=1.21 and onnxruntime-gpu~=1.24
# (plus cupy-cuda12x), which clash with the project's own pins (onnxruntime 1.32 CPU in .venv).
# So we install modelopt WITHOUT the extra, plus only the modules its ONNX quantizer imports,
# pinned to the versions its extra names (onnxruntime as the CPU build of the same 1.24 line).
# torch is a hard dependency of nvidia-modelopt: it is pinned to the CPU build (2.13.0+cpu), never
# left unpinned (an unpinned torch pulls multi-GB CUDA wheels). No cupy: int4.py then falls back to
# numpy ("slower INT4 ONNX quantization using numpy"), which is what we want on a CPU machine.
#
# Usage: tools/modelopt_int4/make_env.sh [--recreate]     (idempotent; a re-run is a quick no-op)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.modelopt-venv"
PY="${PYTHON:-python3}"

die() { echo "make_env.sh: ERROR: $*" >&2; exit 1; }

if [[ "${1:-}" == "--recreate" ]]; then rm -rf "$VENV"; fi

rm -f "$VENV/.ready"  # written again only when everything below succeeded (run.sh checks it)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "make_env.sh: creating $VENV with $($PY --version 2>&1)"
    "$PY" -m venv "$VENV" || die "could not create the venv with $PY (need Python 3.10-3.14 with venv)"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# 1. torch, CPU build. "+cpu" makes sure no CUDA wheel can be chosen: it comes from a local
#    wheelhouse (pip find-links) if there is one, else from PyTorch's CPU index.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null \
        || "${PIP[@]}" "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu \
               --extra-index-url https://pypi.org/simple \
        || die "could not install torch==2.13.0+cpu (neither a local wheel nor the PyTorch CPU index)"
fi

# 2. modelopt without [onnx], plus what modelopt.onnx.quantization imports (versions per its extra).
"${PIP[@]}" \
    "nvidia-modelopt==0.47.0" \
    "torch==2.13.0+cpu" \
    "onnx~=1.21.0" \
    "onnxruntime~=1.24.2" \
    "onnx-graphsurgeon>=0.6.1" \
    "onnxconverter-common~=1.16.0" \
    "onnxslim>=0.1.76" \
    "ml_dtypes" \
    "lief" \
    "onnxscript" \
    "cppimport" \
    || die "pip could not install nvidia-modelopt 0.47.0 and its ONNX dependencies into $VENV"

# 3. Smoke test: the quantizer must import. Importing its C++ round-and-pack extension also builds it
#    now (cppimport + g++, ~10 s, once) instead of in the first quantization; without a compiler
#    modelopt falls back to its slower Python packing, which gives the same bytes.
"$VENV/bin/python" - <<'PY' || die "modelopt.onnx.quantization does not import in $VENV (see above)"
import modelopt, onnx, onnxruntime as ort
from modelopt.onnx.quantization import quantize  # noqa: F401
from modelopt.onnx.quantization.extensions import round_and_pack_ext  # noqa: F401
print(f"make_env.sh: ok: nvidia-modelopt {modelopt.__version__}, onnx {onnx.__version__}, "
      f"onnxruntime {ort.__version__} {ort.get_available_providers()}")
PY
touch "$VENV/.ready"
