"""int8 KV: x = s * q, q in [-127, 127], s = max|x| / 127 per (token, kv head), round to nearest even."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codec import row_scales
from ..kv import KVFormat


@dataclass(frozen=True)
class Int8KV(KVFormat):
    def encode_rows(self, x):
        x = np.asarray(x, dtype=np.float32)
        scale, inv = row_scales(x, self.qmax)
        return np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8), scale

    def tir_encode(self, y):
        from ....tvm_compat import compiler  # noqa: PLC0415

        T = compiler().T
        return T.Cast("int8", T.max(T.min(T.nearbyint(y), T.float32(127)), T.float32(-127)))  # RNE, as numpy and CUDA


FORMATS = (Int8KV("int8", "int8", 127.0, cuda_code="kiln::kKvInt8"),)
