"""The external-data files an ONNX graph names, read from its protobuf without the onnx package.

The device runtime has onnxruntime only, and ONNX Runtime before 1.24 follows any external-data
location, `../../etc/passwd` included. Reading the few fields that hold locations is enough to
refuse such a graph before ONNX Runtime opens it.
"""

import mmap
from pathlib import Path

from moss_edge.runtime.errors import MossEdgeError

# protobuf field numbers (onnx.proto): where tensors, and so external-data entries, can sit
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE = 5
ATTRIBUTE_TENSOR, ATTRIBUTE_GRAPH, ATTRIBUTE_TENSORS, ATTRIBUTE_GRAPHS = 5, 6, 10, 11
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_EXTERNAL_DATA = 13
ENTRY_KEY, ENTRY_VALUE = 1, 2


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, payload start, payload end) of each length-delimited field of the message
    at buf[start:end]; other fields are skipped. Offsets only: nothing is copied."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        kind = tag & 7
        if kind == 0:
            _, pos = _varint(buf, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            size, pos = _varint(buf, pos)
            yield tag >> 3, pos, pos + size
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {kind}")


def _tensor_locations(buf, start: int, end: int, out: set[str]) -> None:
    for number, a, b in _fields(buf, start, end):
        if number == TENSOR_EXTERNAL_DATA:
            parts = {n: bytes(buf[x:y]) for n, x, y in _fields(buf, a, b)}
            if parts.get(ENTRY_KEY) == b"location":
                out.add(parts.get(ENTRY_VALUE, b"").decode("utf-8", "replace"))


def _graph_locations(buf, start: int, end: int, out: set[str]) -> None:
    for number, a, b in _fields(buf, start, end):
        if number == GRAPH_INITIALIZER:
            _tensor_locations(buf, a, b, out)
        elif number == GRAPH_SPARSE_INITIALIZER:
            for part, x, y in _fields(buf, a, b):
                if part in (SPARSE_VALUES, SPARSE_INDICES):
                    _tensor_locations(buf, x, y, out)
        elif number == GRAPH_NODE:
            for field, x, y in _fields(buf, a, b):
                if field != NODE_ATTRIBUTE:
                    continue
                for kind, i, j in _fields(buf, x, y):
                    if kind in (ATTRIBUTE_TENSOR, ATTRIBUTE_TENSORS):
                        _tensor_locations(buf, i, j, out)
                    elif kind in (ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS):
                        _graph_locations(buf, i, j, out)


def external_data_locations(path: Path) -> set[str]:
    """Every external-data `location` the graph file at path names."""
    out: set[str] = set()
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if not size:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                for number, a, b in _fields(data, 0, size):
                    if number == MODEL_GRAPH:
                        _graph_locations(data, a, b, out)
            except (ValueError, IndexError):
                raise MossEdgeError(f"{path} is not a readable ONNX file (damaged or truncated); export or copy "
                                    "the artifact again") from None
    return out
