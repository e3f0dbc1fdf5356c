"""GGUF tensor data: quantized blocks dequantized to float32, or taken block
for block into the kiln weight format with exactly the same grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFormatError
from ..passes.quant.codec import pack_nibbles
from .gguf_header import GGUFTensorInfo

_dequantizable: dict[GGMLQuantizationType, bool] = {}


def can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether `gguf.quants` can dequantize this block type (asked once, on one zero block)."""
    if qtype not in _dequantizable:
        block, type_size = GGML_QUANT_SIZES[qtype]
        try:
            quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
            _dequantizable[qtype] = True
        except Exception:  # noqa: BLE001 - NotImplementedError, or anything else: not usable
            _dequantizable[qtype] = False
    return _dequantizable[qtype]


def dequantize(data: np.ndarray, t: GGUFTensorInfo, path: Path) -> np.ndarray:
    """One tensor's raw bytes (uint8 [nbytes]) -> float32 [*t.shape] (F32/F16/BF16 exactly)."""
    block, type_size = GGML_QUANT_SIZES[t.qtype]
    byte_shape = (*t.shape[:-1], t.shape[-1] // block * type_size)
    try:
        arr = quants.dequantize(data.reshape(byte_shape), t.qtype)
    except Exception as e:
        raise ModelFormatError(f"{path}: tensor {t.name}: cannot dequantize {t.qtype.name}: {e}") from e
    if arr.shape != t.shape:
        raise ModelFormatError(f"{path}: tensor {t.name}: dequantized to shape {list(arr.shape)}, expected {list(t.shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


# GGUF block type -> the kiln weight format with exactly its grid (passes/quant/formats/)
DIRECT_IMPORTS = {("Q4_1", "q4g32"), ("Q4_0", "q4g32"), ("Q8_0", "q8"), ("Q5_0", "q8"), ("Q4_K", "q4k")}


FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


def holding_format(qtypes: set[str]) -> str | None:
    """--quant gguf (passes/quant/plan.py): the kiln weight format a matrix stored in these block
    types is kept in -- the one that holds all of them exactly (DIRECT_IMPORTS), else q8 (Q6_K,
    Q5_K, Q5_1, ...: no kiln format holds them; at 8 bits per 32 their values move by under half a
    code step of theirs); None (float) when any of them is float."""
    if qtypes & FLOAT_TYPES or not qtypes:
        return None
    held = {fmt for qt, fmt in DIRECT_IMPORTS if qt in qtypes}
    every = all(any(qt == q for q, _ in DIRECT_IMPORTS) for qt in qtypes)
    return held.pop() if every and len(held) == 1 else "q8"


def blocks_to_kiln(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Raw GGUF blocks of an [N, K] tensor -> kiln's arrays, no float detour.
    Q4_1 block (20 bytes): d fp16, m fp16, 16 bytes whose low nibbles are
    elements 0..15 and high nibbles 16..31; x = d q + m.
    Q4_0 block (18 bytes): d fp16, 16 bytes of nibbles as Q4_1; x = d (q - 8),
    i.e. q4g32 with minimum -8 d (exact in fp16: a power-of-two multiple).
    Q8_0 block (34 bytes): d fp16, 32 int8; x = d q.
    Q5_0 block (22 bytes): d fp16, 4 bytes holding element j's fifth bit at bit j, 16 bytes
    of low nibbles as Q4_0; x = d (q - 16): q8's int8 codes in [-16, 15] with the same d.
    Q4_K block of 256 (144 bytes): d fp16, dmin fp16, 12 bytes packing eight 6-bit scales and
    eight 6-bit minima (llama.cpp's get_scale_min_k4), 128 bytes of codes: 64-value chunk c
    holds bytes 32c..32c+31, low nibbles sub-block 2c, high nibbles 2c+1; x = (d sc) q - (dmin m):
    q4k with its super-block of 256, sc as the scale code, -m as the minimum code, dmin as m.
    (Q6_K fits no kiln format exactly: its 6-bit codes are re-quantized.)"""
    n, k = shape
    if qtype == "Q4_0":
        b = data.reshape(n, k // 32, 18)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        codes = np.concatenate([b[..., 2:18] & 0x0F, b[..., 2:18] >> 4], axis=-1).reshape(n, k)
        return {"q": pack_nibbles(codes), "s": d, "z": (d * np.float16(-8)).astype(np.float16)}
    if qtype == "Q4_1":
        b = data.reshape(n, k // 32, 20)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        m = b[..., 2:4].copy().view(np.float16)[..., 0]
        qs = b[..., 4:20]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
        return {"q": pack_nibbles(codes), "s": d, "z": m}
    if qtype == "Q8_0":
        b = data.reshape(n, k // 32, 34)
        return {"q": b[..., 2:34].copy().view(np.int8).reshape(n, k), "s": b[..., 0:2].copy().view(np.float16)[..., 0]}
    if qtype == "Q5_0":
        b = data.reshape(n, k // 32, 22)
        high = (b[..., 2:6].copy().view("<u4")[..., 0:1] >> np.arange(32, dtype=np.uint32)) & 1  # [n, k / 32, 32]
        low = np.concatenate([b[..., 6:22] & 0x0F, b[..., 6:22] >> 4], axis=-1)
        codes = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 16
        return {"q": codes.astype(np.int8).reshape(n, k), "s": b[..., 0:2].copy().view(np.float16)[..., 0]}
    if qtype == "Q4_K":
        b = data.reshape(n, k // 256, 144)
        d, dmin = b[..., 0:2].copy().view(np.float16)[..., 0], b[..., 2:4].copy().view(np.float16)[..., 0]
        sc, mn = _k4_scales(b[..., 4:16])  # [n, k / 256, 8] each
        qs = b[..., 16:144].reshape(n, k // 256, 4, 32)  # chunk c: 32 bytes
        codes = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [n, blocks, chunk, low / high, 32]
        return {"q": pack_nibbles(codes.reshape(n, k)), "s": sc.reshape(n, k // 32).astype(np.uint8),
                "z": (-mn.astype(np.int16)).reshape(n, k // 32).astype(np.int8), "d": d, "m": dmin}
    raise ValueError(f"no direct import for {qtype}")


def _k4_scales(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes [..., 12] -> (scales, minima) [..., 8], 6 bits each: sub-blocks 0-3 in
    the low 6 bits of bytes 0-3 / 4-7; 4-7 from the nibbles of bytes 8-11 plus the top 2 bits of
    bytes 0-3 / 4-7."""
    q = q.astype(np.uint8)
    lo_s, lo_m = q[..., 0:4] & 63, q[..., 4:8] & 63
    hi_s = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    hi_m = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return np.concatenate([lo_s, hi_s], axis=-1), np.concatenate([lo_m, hi_m], axis=-1)
