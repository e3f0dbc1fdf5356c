"""fp8: e4m3 codes (uint8; codec.py), one fp32 scale per row (output channel):
w = s * e4m3(q), the row maximum mapped to 448, each weight rounded to the
nearest e4m3 value (the KV cache's row codec, formats/kv_fp8.py). 8 bits/weight.
A floating grid keeps 3 mantissa bits at every magnitude, so searching for a
better scale helps little. Decoded with integer arithmetic on the float bits
everywhere (the CPU has no fp8; on CUDA it is the same expression in the GEMV)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codec import FP8_MAX, FP8_NAN_CODES, fp8_decode, fp8_encode, row_scales, tir_fp8_decode
from ..weights import WeightFormat


def encode_rows_fp8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] float -> (e4m3 codes [..., n], fp32 scales [...]): each row's maximum maps to 448."""
    x = np.asarray(x, dtype=np.float32)
    scale, inv = row_scales(x, FP8_MAX)
    return fp8_encode(x * inv[..., None]), scale


@dataclass(frozen=True)
class RowScaledFp8(WeightFormat):
    def parts(self, shape):
        n, k = shape
        return {"q": ((n, k), "uint8"), "s": ((n, 1), "float32")}

    def quantize(self, w, refine: int = 4):
        codes, scales = encode_rows_fp8(w)
        return {"q": codes, "s": scales[:, None]}

    def dequantize(self, parts, shape):
        return fp8_decode(parts["q"]) * parts["s"].astype(np.float32)

    def te_weight(self, group, q, s, z=None):
        return lambda n, k: tir_fp8_decode(q[n, k]) * s[n, k // group].astype("float32")


FORMATS = (RowScaledFp8("fp8", bits=8, group=0, cuda_code="f8", invalid_codes=FP8_NAN_CODES, rank=3, float8=True),)
