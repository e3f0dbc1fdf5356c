"""What a KV-cache format is (`--kv-dtype`): one object per format in
passes/quant/formats/kv_*.py.

TVM's C++ paged KV cache keeps K/V in the activations' dtype only (its
scratch buffers are views of the page dtype), so other formats live in kiln's
own cache: pages and scales are explicit tensors of the prefill/decode
functions, quantized on append and read by kiln's attention kernels
(passes/kernels/kv_quant_*.py). Layouts:

    pages   # [layers, num_pages, 2 (k, v), kv_heads, page_size, head_dim]  codes
    scales  # [layers, num_pages, 2 (k, v), kv_heads, page_size]              float32

Scaled formats keep one fp32 scale per (token, kv head) -- 3% more bytes at
head_dim 128 -- from the row's own maximum, computed on append. Why per
token, not one static scale per head (a calibrated range): a row's own
maximum never saturates, needs no calibration run to ship, and costs one float
per row; a static scale either clips K's outlier channels or wastes the range
on every other token. Float formats (16-bit K/V on CPU) store values as they
are with a unit scale, so one layout and one set of kernels serve them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...runtime.dtypes import itemsize, numpy_dtype


@dataclass(frozen=True)
class KVFormat:
    name: str  # --kv-dtype code, recorded in the manifest
    code_dtype: str  # page element dtype
    qmax: float  # largest code magnitude: the row maximum maps to it (0: a float format, scale 1)
    cuda_code: str | None = None  # kiln's CUDA KV template kind (cuda/kv_quant.cuh); None: CPU only

    @property
    def scaled(self) -> bool:
        return self.qmax > 0

    def bytes_per_row(self, head_dim: int) -> int:
        """Bytes one (token, kv head) row of K or V takes: codes + its fp32 scale."""
        return head_dim * itemsize(self.code_dtype) + 4

    def encode_rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x  # [..., head_dim] float -> (codes [..., head_dim], scales [...] float32)."""
        x = np.asarray(x, dtype=np.float32)
        return x.astype(numpy_dtype(self.code_dtype)), np.ones(x.shape[:-1], np.float32)

    def decode_rows(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        return codes.astype(np.float32) * scales[..., None]

    def tir_encode(self, y):
        """float32 y (already divided by the row scale) -> a code of code_dtype."""
        from ...tvm_compat import compiler  # noqa: PLC0415

        return compiler().T.Cast(self.code_dtype, y)

    def tir_decode(self, code):
        """A code -> its float32 value (before the row scale)."""
        from ...tvm_compat import compiler  # noqa: PLC0415

        return compiler().T.Cast("float32", code)
