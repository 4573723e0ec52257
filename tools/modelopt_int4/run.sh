#!/usr/bin/env bash
# Quantize IN.onnx with NVIDIA ModelOpt's INT4 weight-only RTN (rtn_dq, CPU) and record the
# DequantizeLinear/MatMul pattern it emits as JSON, to compare with our own INT4 graphs.
#
# Usage: tools/modelopt_int4/run.sh IN.onnx OUT.json [--block N]
#   - makes .modelopt-venv (make_env.sh) if it is missing or was left half made;
#   - quantizes with it into a temporary folder (deleted afterwards);
#   - describes the result with the project's own .venv: python -m moss_edge.export.int4_pattern.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 IN.onnx OUT.json [--block N]" >&2
    exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
IN="$(realpath "$1")"
OUT="$(realpath -m "$2")"
shift 2

[[ -f "$ROOT/.modelopt-venv/.ready" ]] || "$HERE/make_env.sh"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
QUANT="$TMP/$(basename "${IN%.onnx}").modelopt-int4.onnx"

"$ROOT/.modelopt-venv/bin/python" "$HERE/quantize.py" "$IN" "$QUANT" "$@"
"$ROOT/.venv/bin/python" -m moss_edge.export.int4_pattern "$QUANT" --source modelopt --out "$OUT"
echo "run.sh: wrote $OUT"
