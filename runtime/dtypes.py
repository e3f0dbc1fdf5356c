"""The dtype names manifests use, and what each is elsewhere: numpy dtype,
safetensors code, bytes per element. One table for the compiler (which writes
weights) and the runtime (which reads them)."""

from __future__ import annotations

import numpy as np

from ..errors import KilnError

# manifest dtype -> safetensors dtype code
SAFETENSORS_CODES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16",
    "int32": "I32", "uint32": "U32", "int64": "I64",
}

# Dtypes numpy lacks -> bytes per element. ml_dtypes provides them; it is
# imported only when such an array is made, so a float16/float32 artifact runs
# where ml_dtypes is not installed (an offline bundle).
ML_DTYPES_SIZES = {"bfloat16": 2}


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a manifest dtype name (bfloat16 through ml_dtypes)."""
    if name not in ML_DTYPES_SIZES:
        return np.dtype(name)
    try:
        import ml_dtypes  # noqa: PLC0415
    except ImportError:
        raise KilnError(f"{name} tensors need the Python package ml_dtypes (pip install ml_dtypes)") from None
    return np.dtype(getattr(ml_dtypes, name))


def itemsize(name: str) -> int:
    if name in ML_DTYPES_SIZES:
        return ML_DTYPES_SIZES[name]
    return np.dtype(name).itemsize
