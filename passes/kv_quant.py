"""KV-cache formats (`--kv-dtype`) and their numpy reference codec.

TVM's C++ paged KV cache keeps K/V in the activations' dtype only (its
scratch buffers are views of the page dtype), so quantized K/V live in kiln's
own cache: pages and scales are explicit tensors of the prefill/decode
functions, quantized on append and read by kiln's attention kernels
(passes/kernels/kv_quant_*.py). Layouts:

    pages   # [layers, num_pages, 2 (k, v), kv_heads, page_size, head_dim]  codes
    scales  # [layers, num_pages, 2 (k, v), kv_heads, page_size]              float32

Both formats scale per (token, kv head) -- one fp32 per head_dim codes, 3%
more bytes at head_dim 128 -- from the row's own maximum, computed on append:
  int8  x = s * q, q in [-127, 127], s = max|x| / 127, round to nearest;
  fp8   x = s * e4m3(q), s = max|x| / 448: e4m3 (4 exponent bits, bias 7,
        3 mantissa bits, no infinities; 448 is its largest finite value),
        round to nearest even, values under 2^-6 (after scaling: under
        max|x| / 28672) flushed to zero instead of kept as subnormals.
Why per token, not one static scale per head (a calibrated range): a row's
own maximum never saturates, needs no calibration run to ship, and costs one
float per row; a static scale either clips K's outlier channels or wastes the
range on every other token.

The fp8 code is encoded and decoded with integer arithmetic on the float32
bits (the same on every target, so CPU and GPU caches agree bit for bit):
  decode  bits = (code & 0x7F) << 20 | (code & 0x80) << 24, + 120 << 23 unless 0
  encode  round the float32 mantissa to 3 bits (RNE on the bits), re-bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CompileError
from ..runtime.dtypes import itemsize, numpy_dtype

FP8_MAX = 448.0
FP8_MIN_NORMAL = 2.0**-6


@dataclass(frozen=True)
class KVFormat:
    name: str  # --kv-dtype code, recorded in the manifest
    code_dtype: str  # page element dtype
    qmax: float  # largest code magnitude: the row maximum maps to it (0: a float format, stored as is, scale 1)

    def bytes_per_row(self, head_dim: int) -> int:
        """Bytes one (token, kv head) row of K or V takes: codes + its fp32 scale."""
        return head_dim * itemsize(self.code_dtype) + 4

    @property
    def scaled(self) -> bool:
        return self.qmax > 0


KV_FORMATS = {"int8": KVFormat("int8", "int8", 127.0), "fp8": KVFormat("fp8", "uint8", FP8_MAX)}
# 16-bit float K/V in kiln's cache, for CPU artifacts (activations fp32, which is
# what TVM's cache would hold): stored as is with a unit scale (4 bytes per row
# unused, kept so one layout and one set of kernels serve every format)
FLOAT_KV_FORMATS = {"float16": KVFormat("float16", "float16", 0.0), "bfloat16": KVFormat("bfloat16", "bfloat16", 0.0)}
KV_DTYPES = ("float32", "float16", "bfloat16", *KV_FORMATS)


def kv_format(name: str | None, activations: str = "float32") -> KVFormat | None:
    """The kiln-cache format for --kv-dtype NAME when activations are in
    `activations`; None when TVM's cache holds it (the activations' own dtype)."""
    if name is None or name == activations:
        return None
    if name in KV_FORMATS:
        return KV_FORMATS[name]
    if name in FLOAT_KV_FORMATS and activations == "float32":
        return FLOAT_KV_FORMATS[name]
    if name in KV_DTYPES:
        raise CompileError(f"--kv-dtype {name}: a float KV cache has the activations' dtype ({activations}) here; "
                           "quantized: int8 or fp8 (16-bit float caches are for CPU targets)")
    raise CompileError(f"--kv-dtype {name!r} is not supported; supported: {', '.join(KV_DTYPES)}")


def fp8_encode(y: np.ndarray) -> np.ndarray:
    """float32 values with |y| <= 448 -> e4m3 codes (uint8), as the kernels do."""
    y = np.asarray(y, dtype=np.float32)
    bits = y.view(np.uint32)
    mag = (np.abs(y).view(np.uint32)).astype(np.int64)
    r = mag + 0x7FFFF + ((mag >> 20) & 1)
    code = np.clip((r >> 20) - (120 << 3), 0, 0x7E)
    code = np.where(np.abs(y) < FP8_MIN_NORMAL, 0, code)
    return (code | ((bits >> 31).astype(np.int64) << 7)).astype(np.uint8)


def fp8_decode(code: np.ndarray) -> np.ndarray:
    c = np.asarray(code, dtype=np.uint32)
    mag = c & 0x7F
    bits = np.where(mag == 0, 0, (mag << 20) + (120 << 23)) | ((c & 0x80) << 24)
    return bits.astype(np.uint32).view(np.float32)


def encode_rows(x: np.ndarray, fmt: KVFormat) -> tuple[np.ndarray, np.ndarray]:
    """x  # [..., head_dim] float -> (codes [..., head_dim], scales [...] float32)."""
    x = np.asarray(x, dtype=np.float32)
    if not fmt.scaled:
        return x.astype(numpy_dtype(fmt.code_dtype)), np.ones(x.shape[:-1], np.float32)
    amax = np.abs(x).max(axis=-1)
    scale = (amax / np.float32(fmt.qmax)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(fmt.qmax) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    y = x * inv[..., None]
    if fmt.name == "int8":
        codes = np.clip(np.rint(y), -127, 127).astype(np.int8)
    else:
        codes = fp8_encode(y)
    return codes, scale


def decode_rows(codes: np.ndarray, scales: np.ndarray, fmt: KVFormat) -> np.ndarray:
    vals = codes.astype(np.float32) if fmt.name != "fp8" else fp8_decode(codes)
    return vals * scales[..., None]

