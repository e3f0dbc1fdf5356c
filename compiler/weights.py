"""Stream params into a safetensors file: header first (from the known specs),
then one tensor at a time, so peak memory is one tensor, not the model."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from ..runtime.dtypes import SAFETENSORS_CODES, numpy_dtype
from .artifact import HashingWriter


def write_safetensors(
    out: HashingWriter,
    order: list[str],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    produce: Callable[[str], np.ndarray],
    progress: Callable[[int, int], None] | None = None,
    fmt: str = "kiln",
) -> dict:
    """Write params in `order`, each converted to its dtype in `dtypes`; returns the file's hash info.
    progress(done, total) after each tensor. fmt: the header's metadata format
    ("kiln" in artifacts; transformers reads only "pt")."""
    header: dict = {"__metadata__": {"format": fmt}}
    offset = 0
    for name in order:
        nbytes = int(np.prod(shapes[name], dtype=np.int64)) * numpy_dtype(dtypes[name]).itemsize
        header[name] = {"dtype": SAFETENSORS_CODES[dtypes[name]], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    out.write(len(raw).to_bytes(8, "little"))
    out.write(raw)
    try:
        for i, name in enumerate(order):
            arr = produce(name)
            if tuple(arr.shape) != tuple(shapes[name]):
                raise ValueError(f"param {name}: produced shape {list(arr.shape)}, expected {list(shapes[name])}")
            arr = np.ascontiguousarray(arr.astype(numpy_dtype(dtypes[name]), copy=False))
            out.write(arr.reshape(-1).view(np.uint8))
            if progress:
                progress(i + 1, len(order))
    except BaseException:
        out.f.close()
        raise
    return out.close()
