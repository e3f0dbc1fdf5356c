"""A validating reader of the safetensors format.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
(``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {str: str}}``),
then the data section, which the tensors' byte ranges must tile exactly.

Model files come from strangers (THREATS 1-7), so everything the header
claims is checked against the file before any of it is allocated: the header
is capped at 100 MB, offsets start at 0 and are contiguous, non-overlapping
and cover the whole data section, shape x dtype size equals the byte span with
Python-int arithmetic, and every error is a ModelFormatError that names the
file and the tensor or field. Tensors are read one at a time into fresh arrays.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import ModelFormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the reference implementation allows
MAX_JSON_DEPTH = 64  # a real header is 3 deep; json.loads recurses per level
MAX_NDIM = 32
MAX_ELEMENTS = 1 << 62  # checked with Python ints, so nothing downstream can overflow

# safetensors dtype code -> (numpy dtype, bytes per element). Little-endian by spec.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype(ml_dtypes.bfloat16), 2),
    "F64": (np.dtype("<f8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
    "F8_E4M3": (np.dtype(ml_dtypes.float8_e4m3fn), 1),  # DeepSeek-V3's block-scaled weights (frontends/hf.py)
}
FLOAT_DTYPES = ("F32", "F16", "BF16")

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENERS = (ord("{"), ord("["))
_CLOSERS = (ord("}"), ord("]"))


def json_depth(raw: bytes) -> int:
    """Deepest nesting of objects/arrays in JSON text, without parsing it.

    Brackets inside strings do not count. A quote opens or closes a string
    unless an odd run of backslashes precedes it. Vectorised in 1 MiB chunks
    (state carried across them) so a 100 MB header costs about a second.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit; skip the scan
    data = np.frombuffer(raw, dtype=np.uint8)
    deepest = level = quotes = 0
    last_plain = -1  # index of the last byte that was not a backslash
    step = 1 << 20
    for base in range(0, len(data), step):
        c = data[base : base + step]
        pos = np.arange(base, base + len(c), dtype=np.int64)
        plain = np.maximum.accumulate(np.where(c != _BACKSLASH, pos, last_plain))
        before = np.empty_like(plain)  # last non-backslash strictly before each byte
        before[0] = last_plain
        before[1:] = plain[:-1]
        escaped = ((pos - 1 - before) & 1).astype(bool)
        quote_count = np.cumsum((c == _QUOTE) & ~escaped, dtype=np.int64) + quotes
        outside = (quote_count & 1) == 0
        delta = np.zeros(len(c), dtype=np.int64)
        for o in _OPENERS:
            delta += c == o
        for o in _CLOSERS:
            delta -= c == o
        levels = np.cumsum(delta * outside, dtype=np.int64) + level
        deepest = max(deepest, int(levels.max()))
        level, quotes, last_plain = int(levels[-1]), int(quote_count[-1]), int(plain[-1])
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes, file: str, what: str, *, object_pairs_hook=None, encoding: str = "utf-8") -> Any:
    """Decode and parse untrusted JSON: strict UTF-8, depth-limited, no NaN/Infinity.

    `what` names the part of the file in messages ("header", "config").
    """
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{file}: {what} is not valid UTF-8 (byte {e.start})") from None
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ModelFormatError(f"{file}: {what} JSON is nested {depth} levels deep (limit {MAX_JSON_DEPTH})")
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_constant=_reject_constant)
    except RecursionError:
        raise ModelFormatError(f"{file}: {what} JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, over-long integers, NaN
        raise ModelFormatError(f"{file}: {what} is not valid JSON: {e}") from None


def open_regular_file(path: Path, file: str):
    """Open `path` for reading; refuse directories, FIFOs and devices without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise ModelFormatError(f"{file}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFormatError(f"{file}: not a regular file")
        return os.fdopen(fd, "rb", buffering=0), st.st_size
    except BaseException:
        os.close(fd)
        raise


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs, so duplicate keys stay visible."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """One validated .safetensors file; tensors are read lazily into fresh arrays.

    names: tensor names in header order. metadata: the `__metadata__` strings.
    dtype(name) -> "F32" | "BF16" | ...; shape(name) -> tuple; load(name) -> np.ndarray.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file_label = str(self.path)
        self._lock = threading.Lock()
        self._fh, size = open_regular_file(self.path, self._file_label)
        try:
            self._parse(size)
        except BaseException:
            self._fh.close()
            raise

    # --- header -------------------------------------------------------------
    def _err(self, msg: str) -> ModelFormatError:
        return ModelFormatError(f"{self._file_label}: {msg}")

    def _read_exact(self, n: int, offset: int) -> bytes:
        self._fh.seek(offset)
        chunks, left = [], n
        while left:
            b = self._fh.read(left)
            if not b:
                raise self._err(f"file is truncated: wanted {n} bytes at offset {offset}, got {n - left}")
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)

    def _parse(self, size: int) -> None:
        if size < 8:
            raise self._err(f"file is {size} bytes, too small for a safetensors header (needs at least 8)")
        (n,) = np.frombuffer(self._read_exact(8, 0), dtype="<u8").tolist()
        if n > MAX_HEADER_BYTES:
            raise self._err(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise self._err(f"header length {n} is larger than the file ({size} bytes): the file is truncated or not safetensors")
        if n < 2:
            raise self._err(f"header length {n} is too small for a JSON object")
        header = parse_json(self._read_exact(n, 8), self._file_label, "header", object_pairs_hook=_Pairs)
        if not isinstance(header, _Pairs):
            raise self._err(f"header top level must be a JSON object, got {type(header).__name__}")

        self._data_start = 8 + n
        data_size = size - self._data_start
        self.metadata: dict[str, str] = {}
        self._info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        seen_metadata = False
        for name, entry in header:
            if name == "__metadata__":
                if seen_metadata:
                    raise self._err("duplicate key '__metadata__' in header")
                seen_metadata = True
                self.metadata = self._metadata(entry)
                continue
            if name in self._info:
                raise self._err(f"duplicate tensor name {name!r} in header")
            self._info[name] = self._entry(name, entry, data_size)
        self.names: list[str] = list(self._info)
        self._check_layout(data_size)

    def _metadata(self, raw: Any) -> dict[str, str]:
        if not isinstance(raw, _Pairs):
            raise self._err(f"field '__metadata__' must be an object of strings, got {type(raw).__name__}")
        out: dict[str, str] = {}
        for k, v in raw:
            if not isinstance(v, str):
                raise self._err(f"field '__metadata__.{k}' must be a string, got {type(v).__name__}")
            if k in out:
                raise self._err(f"duplicate key '__metadata__.{k}' in header")
            out[k] = v
        return out

    def _entry(self, name: str, raw: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
        t = f"tensor {name!r}"
        if not isinstance(raw, _Pairs):
            raise self._err(f"{t}: entry must be an object with dtype, shape, data_offsets; got {type(raw).__name__}")
        fields: dict[str, Any] = {}
        for k, v in raw:
            if k in fields:
                raise self._err(f"{t}: duplicate field '{k}'")
            fields[k] = v
        for k in ("dtype", "shape", "data_offsets"):
            if k not in fields:
                raise self._err(f"{t}: missing field '{k}'")

        dtype = fields["dtype"]
        if not isinstance(dtype, str):
            raise self._err(f"{t}: field 'dtype' must be a string, got {dtype!r}")
        if dtype not in DTYPES:
            raise self._err(f"tensor {name} has dtype {dtype}, supported: {', '.join(DTYPES)}")

        shape = fields["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._err(f"{t}: field 'shape' must be a list of non-negative integers, got {shape!r}"[:500])
        if len(shape) > MAX_NDIM:
            raise self._err(f"{t}: shape has {len(shape)} dimensions (limit {MAX_NDIM})")
        count = 1
        for d in shape:
            count *= d
            if count > MAX_ELEMENTS:
                raise self._err(f"{t}: shape {shape} overflows: more than 2^62 elements")

        offsets = fields["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
            raise self._err(f"{t}: field 'data_offsets' must be [start, end] with non-negative integers, got {offsets!r}"[:500])
        start, end = offsets
        if end < start:
            raise self._err(f"{t}: data_offsets [{start}, {end}] end before they start")
        if end > data_size:
            raise self._err(
                f"{t}: data_offsets [{start}, {end}] run past the end of the data section ({data_size} bytes): "
                "the file is truncated or the offsets are corrupt"
            )
        nbytes = count * DTYPES[dtype][1]
        if nbytes != end - start:
            raise self._err(f"{t}: shape {shape} x {dtype} is {nbytes} bytes but data_offsets [{start}, {end}] span {end - start}")
        return dtype, tuple(shape), start, end

    def _check_layout(self, data_size: int) -> None:
        """The byte ranges must tile [0, data_size) exactly: no gap, overlap or tail."""
        pos, prev = 0, None
        for name, (_, _, start, end) in sorted(self._info.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if start != pos:
                if prev is None:
                    raise self._err(f"tensor {name!r}: first data offset is {start}, must be 0")
                kind = "overlap" if start < pos else "leave a gap between them"
                raise self._err(f"tensors {prev!r} and {name!r}: data_offsets {kind} (previous ends at {pos}, next starts at {start})")
            pos, prev = end, name
        if pos != data_size:
            raise self._err(f"{data_size - pos} trailing bytes after the last tensor (data section is {data_size} bytes, tensors cover {pos})")

    # --- access -------------------------------------------------------------
    def _get(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        try:
            return self._info[name]
        except KeyError:
            raise self._err(f"no tensor named {name!r}") from None

    def dtype(self, name: str) -> str:
        return self._get(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get(name)[1]

    def nbytes(self, name: str) -> int:
        _, _, start, end = self._get(name)
        return end - start

    def load(self, name: str) -> np.ndarray:
        """Read one tensor into a fresh array of its stored dtype (BF16 -> ml_dtypes.bfloat16)."""
        dtype, shape, start, end = self._get(name)
        np_dtype = np.dtype("u1") if dtype == "BOOL" else DTYPES[dtype][0]
        arr = np.empty(shape, dtype=np_dtype)
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        with self._lock:
            if self._fh.closed:
                raise self._err("file is closed")
            self._fh.seek(self._data_start + start)
            got = 0
            while got < end - start:
                n = self._fh.readinto(buf[got:])
                if not n:
                    raise self._err(f"tensor {name!r}: file is truncated (it changed after it was opened?)")
                got += n
        if dtype == "BOOL":
            return arr != 0  # any non-zero byte is True; never an invalid numpy bool
        return arr

    def close(self) -> None:
        with self._lock:
            self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self._file_label!r}, {len(self.names)} tensors)"
