"""q4g32 / q4g128: int4 with a minimum, fp16 scale and minimum per 32 / 128
weights: w = s * q + m, q in [0, 15], packed 8 per uint32 (codec.pack_nibbles).
5 / 4.25 bits/weight.

Why a minimum (zero point): a group's weights are rarely centred, and a
symmetric code wastes half a bit on the empty side; with 128-wide groups the
outliers set the range, and the minimum halves the step for the common
one-sided case. Measured against llama.cpp's symmetric Q4_0 in BENCHMARKS.md.
GGUF Q4_0 and Q4_1 blocks import into q4g32 exactly (frontends/gguf_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codec import pack_nibbles, round_f16, tir_nibble, unpack_nibbles
from ..weights import WeightFormat


@dataclass(frozen=True)
class AsymmetricInt4(WeightFormat):
    def parts(self, shape):
        n, k = shape
        g = self.group_for(k)
        return {"q": ((n, k // 8), "uint32"), "s": ((n, k // g), "float16"), "z": ((n, k // g), "float16")}

    def quantize(self, w, refine: int = 4):
        """Start from [min, max] over 15 steps, then `refine` rounds of
        alternating least squares per group (codes for the current scale and
        minimum; then the scale and minimum minimising the squared error for
        those codes, rounded to fp16), kept only where the error went down."""
        w = np.asarray(w, dtype=np.float32)
        n, k = w.shape
        g = self.group_for(k)
        wg = w.reshape(n, k // g, g).astype(np.float64)
        z = round_f16(wg.min(axis=2))
        s = round_f16((wg.max(axis=2) - z) / 15.0)
        q, err = _codes(wg, s, z)
        for _ in range(refine):
            qq = q.astype(np.float64)
            # least squares for w ~ s q + z over the group (2x2 normal equations)
            sq, sqq, sw, sqw = qq.sum(axis=2), (qq * qq).sum(axis=2), wg.sum(axis=2), (qq * wg).sum(axis=2)
            det = g * sqq - sq * sq
            ok = det > 0
            s_new = round_f16(np.where(ok, (g * sqw - sq * sw) / np.where(ok, det, 1), s))
            z_new = round_f16(np.where(ok, (sw - s_new.astype(np.float64) * sq) / g, z))
            q_new, err_new = _codes(wg, s_new, z_new)
            better = err_new < err
            s, z, err = np.where(better, s_new, s), np.where(better, z_new, z), np.where(better, err_new, err)
            q = np.where(better[..., None], q_new, q)
        return {"q": pack_nibbles(q.reshape(n, k)), "s": s.astype(np.float16), "z": z.astype(np.float16)}

    def dequantize(self, parts, shape):
        g = self.group_for(shape[1])
        codes = unpack_nibbles(parts["q"]).astype(np.float32)
        return codes * np.repeat(parts["s"].astype(np.float32), g, axis=1) + np.repeat(parts["z"].astype(np.float32), g, axis=1)

    def te_weight(self, group, q, s, z=None):
        return lambda n, k: tir_nibble(q, n, k).astype("float32") * s[n, k // group].astype("float32") + z[n, k // group].astype("float32")


def _codes(wg, s, z):
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)[..., None]
    q = np.clip(np.rint((wg - z[..., None]) * inv), 0, 15)
    return q, ((wg - (q * s[..., None] + z[..., None])) ** 2).sum(axis=2)


FORMATS = (
    AsymmetricInt4("q4g32", bits=4, group=32, zero=True, cuda_code="4", rank=1),
    AsymmetricInt4("q4g128", bits=4, group=128, zero=True, cuda_code="4", rank=2),
)
