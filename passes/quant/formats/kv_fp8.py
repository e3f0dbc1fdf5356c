"""fp8 KV: x = s * e4m3(q), s = max|x| / 448 per (token, kv head); the e4m3
code (codec.py) rounds to nearest even and flushes values under 2^-6 (after
scaling: under max|x| / 28672) to zero instead of keeping subnormals."""

from __future__ import annotations

from dataclasses import dataclass

from ..codec import FP8_MAX, fp8_decode, tir_fp8_decode, tir_fp8_encode
from ..kv import KVFormat
from .fp8 import encode_rows_fp8


@dataclass(frozen=True)
class Fp8KV(KVFormat):
    def encode_rows(self, x):
        return encode_rows_fp8(x)

    def decode_rows(self, codes, scales):
        return fp8_decode(codes) * scales[..., None]

    def tir_encode(self, y):
        return tir_fp8_encode(y)

    def tir_decode(self, code):
        return tir_fp8_decode(code)


FORMATS = (Fp8KV("fp8", "uint8", FP8_MAX, cuda_code="kiln::kKvFp8"),)
