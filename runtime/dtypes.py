"""The dtype names manifests use, and what each is elsewhere: numpy dtype,
safetensors code, bytes per element. One table for the compiler (which writes
weights) and the runtime (which reads them)."""

from __future__ import annotations

import ml_dtypes  # numpy has no bfloat16
import numpy as np

# manifest dtype -> safetensors dtype code
SAFETENSORS_CODES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16",
    "int32": "I32", "uint32": "U32", "int64": "I64",
}


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a manifest dtype name (bfloat16 through ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def itemsize(name: str) -> int:
    return numpy_dtype(name).itemsize
