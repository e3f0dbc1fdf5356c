"""The GGUF header (llama.cpp's format), parsed and validated before anything is allocated.

`read_gguf_header(path)` parses the header itself with `struct`. Every count,
length, type id and offset is checked against the file before anything is
allocated (THREATS 15: llama.cpp's own GGUF parser had repeated overflow CVEs).
`meta(header, key, kind, ...)` reads one metadata value with its type checked.

`gguf.GGUFReader` is not used at runtime: it trusts the header it reads (a
string length or tensor count of 2^64-1 reaches numpy unchecked) and builds
one numpy object per array element (seconds for a 49k-token vocabulary). The
`gguf` package still supplies the type tables and `gguf.quants.dequantize`.

File layout (little-endian; str = u64 byte length + UTF-8 bytes):

    "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv      x (key str, value type u32, value)
    n_tensors x (name str, n_dims u32, dims u64[n_dims] (fastest axis first),
                 type u32, offset u64 (from the data start))
    zero padding to `general.alignment` (default 32) | tensor data
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import KilnError, ModelFormatError

SUPPORTED_VERSIONS = (2, 3)
# Limits far above any real model (a 405B model has ~1.1k tensors and ~40 keys;
# vocabularies stay under 4M tokens) and low enough that a hostile header
# cannot make us allocate much more memory than the file's own size.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_NAME = 4096  # bytes in a key or tensor name
MAX_STRING = 1 << 20  # bytes in a string value
MAX_TEMPLATE = 16 << 20  # bytes in a chat template (they can be long)
MAX_ARRAY = 10_000_000  # elements in a numeric array
MAX_STRING_ARRAY = 1 << 22  # elements in a string array (tokens, merges)
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40  # elements in one tensor

_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_NP_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
               7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}  # fmt: skip


# --- header ----------------------------------------------------------------
@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the header describes it, already bounds-checked."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy (row-major) order: GGUF dims reversed, [out, in] for matrices
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data, validated.

    metadata: key -> int | float | bool | str | list[str] | np.ndarray (numeric arrays).
    value_types: key -> GGUF value type id (arrays: 9).
    """

    version: int
    metadata: dict[str, Any]
    value_types: dict[str, int]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int
    file_size: int


class _Cursor:
    """Bounds-checked reads from the mapped file; every failure names the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, msg: str):
        raise ModelFormatError(f"{self.path}: {msg}")

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size} (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str, limit: int) -> str:
        n = self.unpack("<Q", f"length of {what}")
        if n > limit:
            self.fail(f"{what} claims {n} bytes (limit {limit})")
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def value(self, vtype: int, key: str):
        if vtype in _SCALAR_FMT:
            v = self.unpack(_SCALAR_FMT[vtype], f"value of {key}")
            if vtype == _BOOL:
                if v > 1:
                    self.fail(f"metadata {key}: bool byte is {v}, expected 0 or 1")
                v = bool(v)
            return v
        if vtype == _STRING:
            return self.string(f"value of {key}", MAX_TEMPLATE if key.startswith("tokenizer.chat_template") else MAX_STRING)
        if vtype != _ARRAY:
            self.fail(f"metadata {key} has unknown value type id {vtype}")
        itype = self.unpack("<I", f"element type of {key}")
        n = self.unpack("<Q", f"length of {key}")
        if itype == _STRING:
            if n > MAX_STRING_ARRAY:
                self.fail(f"metadata {key} claims {n} strings (limit {MAX_STRING_ARRAY})")
            if n * 8 > self.size - self.pos:
                self.fail(f"metadata {key} claims {n} strings but the file ends at byte {self.size} (truncated?)")
            return [self.string(f"{key}[{i}]", MAX_STRING) for i in range(n)]
        if itype not in _NP_DTYPE:
            kind = "nested arrays are not supported" if itype == _ARRAY else f"unknown element type id {itype}"
            self.fail(f"metadata {key}: {kind}")
        if n > MAX_ARRAY:
            self.fail(f"metadata {key} claims {n} elements (limit {MAX_ARRAY})")
        dtype = np.dtype(_NP_DTYPE[itype])
        start = self.take(n * dtype.itemsize, f"value of {key}")
        arr = np.frombuffer(self.buf[start : start + n * dtype.itemsize], dtype=dtype)
        if itype == _BOOL:
            if (arr > 1).any():
                self.fail(f"metadata {key}: bool array holds bytes other than 0 and 1")
            arr = arr.astype(bool)
        return arr


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse and validate a GGUF header; ModelFormatError names the file and the key or tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 24:
                raise ModelFormatError(f"{path}: {size} bytes is too small to be a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(_Cursor(buf, path))
    except KilnError:
        raise
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read: {e.strerror or e}") from e


def _parse_header(c: _Cursor) -> GGUFHeader:
    if c.buf[:4] != b"GGUF":
        c.fail(f"not a GGUF file (magic {bytes(c.buf[:4])!r}, expected b'GGUF')")
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file? only little-endian GGUF is supported)" if version & 0xFFFF == 0 else ""
        c.fail(f"GGUF version {version} is not supported{hint}; supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata key count")
    if n_tensors > MAX_TENSORS:
        c.fail(f"header claims {n_tensors} tensors (limit {MAX_TENSORS})")
    if n_kv > MAX_KV:
        c.fail(f"header claims {n_kv} metadata keys (limit {MAX_KV})")

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", MAX_NAME)
        if key in metadata:
            c.fail(f"duplicate metadata key {key}")
        vtype = c.unpack("<I", f"value type of {key}")
        metadata[key] = c.value(vtype, key)
        value_types[key] = vtype

    alignment = 32
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if value_types["general.alignment"] != 4:
            c.fail(f"metadata general.alignment has type {_TYPE_NAMES.get(value_types['general.alignment'])}, expected uint32")
        if alignment <= 0 or alignment & (alignment - 1):
            c.fail(f"metadata general.alignment = {alignment} is not a power of two")

    raw = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}", MAX_NAME)
        n_dims = c.unpack("<I", f"dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = [c.unpack("<Q", f"dimension {d} of tensor {name}") for d in range(n_dims)]
        type_id = c.unpack("<I", f"type of tensor {name}")
        offset = c.unpack("<Q", f"data offset of tensor {name}")
        raw.append((name, dims, type_id, offset))

    data_start = -(-c.pos // alignment) * alignment
    tensors, seen, expected = [], set(), 0
    for name, dims, type_id, offset in raw:
        if name in seen:
            c.fail(f"duplicate tensor {name}")
        seen.add(name)
        n_elements = math.prod(dims)
        if min(dims) < 1 or n_elements > MAX_ELEMENTS:
            c.fail(f"tensor {name} has shape {dims} (each dimension must be >= 1, at most {MAX_ELEMENTS} elements)")
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            c.fail(f"tensor {name} has unknown type id {type_id}")
        if dims[0] % block:
            c.fail(f"tensor {name}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
        nbytes = n_elements // block * type_size
        # llama.cpp's rule: tensors are contiguous in header order, each padded to
        # the alignment. It rules out overlaps, gaps and offsets past the end at once.
        if offset != expected:
            c.fail(f"tensor {name} has data offset {offset}, expected {expected} "
                   f"(tensor data must be contiguous in header order, aligned to {alignment})")  # fmt: skip
        end = data_start + offset + nbytes
        if end > c.size:
            c.fail(f"tensor {name} needs bytes {data_start + offset}..{end} but the file has {c.size} bytes (truncated)")
        expected += -(-nbytes // alignment) * alignment
        tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes))
    if tensors and c.size > data_start + expected:
        c.fail(f"{c.size - data_start - expected} unexpected bytes after the last tensor's data")
    return GGUFHeader(version, metadata, value_types, tensors, alignment, data_start, c.size)


# --- typed metadata ------------------------------------------------------------
REQUIRED = object()
_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "strings": lambda v: isinstance(v, list),
    "ints": lambda v: isinstance(v, np.ndarray) and v.dtype.kind in "iu",
}


def meta(header: GGUFHeader, key: str, kind: str, path: Path, default: Any = REQUIRED) -> Any:
    """header.metadata[key] checked to be of `kind` (a key of _KINDS); `default` when absent, else a missing key fails."""
    if key not in header.metadata:
        if default is REQUIRED:
            raise ModelFormatError(f"{path}: missing metadata key {key}")
        return default
    v = header.metadata[key]
    if not _KINDS[kind](v):
        got = _TYPE_NAMES.get(header.value_types[key], "?")
        raise ModelFormatError(f"{path}: metadata {key} has type {got}, expected {kind}")
    if kind == "float":
        # float32 metadata as its shortest decimal: rms_norm_eps 1e-05, not 9.999999747378752e-06
        return float(str(np.float32(v))) if header.value_types[key] == 6 else float(v)
    return v
