"""GGUF checkpoints (llama.cpp's format): validated first, then read lazily.

`open_gguf(path)` validates the whole header first (gguf_header), maps
llama.cpp tensor names back to HF names and undoes llama.cpp's q/k row
permutation (gguf_names), so `DecoderLM.convert_hf` serves a GGUF like any HF
checkpoint. The config (gguf_config) and the tokenizer (gguf_tokenizer) are
rebuilt from the metadata; tensors are dequantized, or imported block for
block into a kiln weight format (gguf_blocks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES

from ..errors import KilnError, ModelFormatError, UnsupportedModelError
from .checkpoint import Checkpoint
from .config import ModelConfig
from .gguf_blocks import DIRECT_IMPORTS, blocks_to_kiln, can_dequantize, dequantize
from .gguf_config import build_config, llama3_rope_scaling, longrope_scaling
from .gguf_header import GGUFTensorInfo, meta, read_gguf_header
from .gguf_names import ARCHITECTURES, SKIPPED, hf_tensor_name, unpermute_qk
from .gguf_tokenizer import build_tokenizer


def open_gguf(path: Path) -> Checkpoint:
    """Open a `.gguf` file as a Checkpoint with HF tensor names and an HF-style config.

    The header is validated in full first; `load(name)` then reads one tensor,
    dequantizes it to float32 [out, in] (F32/F16/BF16 exactly) and undoes
    llama.cpp's q/k permutation. Errors are ModelFormatError or
    UnsupportedModelError, and their message starts with the file path.
    """
    path = Path(path)
    try:
        return _open_gguf(path)
    except KilnError:
        raise
    except Exception as e:  # a gap in the checks above must still name the file
        raise ModelFormatError(f"{path}: cannot read GGUF: {type(e).__name__}: {e}") from e


def _open_gguf(path: Path) -> Checkpoint:
    header = read_gguf_header(path)
    arch = meta(header, "general.architecture", "str", path)
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    spec = ARCHITECTURES[arch]

    by_hf: dict[str, GGUFTensorInfo] = {}
    skipped: dict[str, GGUFTensorInfo] = {}
    unknown = []
    for t in header.tensors:
        if t.name in SKIPPED:
            skipped[t.name] = t
            continue
        hf = hf_tensor_name(t.name, arch)
        if hf is None:
            unknown.append(t.name)
            continue
        if hf in by_hf:
            raise ModelFormatError(f"{path}: tensors {by_hf[hf].name} and {t.name} both map to {hf}")
        by_hf[hf] = t
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ModelFormatError(f"{path}: unknown tensors {', '.join(unknown[:5])}{more} for GGUF architecture {arch}")
    unsupported = sorted({t.qtype.name for t in header.tensors if not can_dequantize(t.qtype)})
    if unsupported:
        bad = next(t for t in header.tensors if t.qtype.name in unsupported)
        ok = sorted(q.name for q in GGML_QUANT_SIZES if can_dequantize(q))
        raise UnsupportedModelError(f"{path}: tensor {bad.name} has type {bad.qtype.name}, supported: {', '.join(ok)}")

    hf_arch = spec.hf_moe_architecture if meta(header, f"{arch}.expert_count", "int", path, 0) else spec.hf_architecture
    if hf_arch is None:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} with experts is not supported; "
                                    f"mixtures of experts: {', '.join(a for a, s in ARCHITECTURES.items() if s.hf_moe_architecture)}")
    config = build_config(header, arch, hf_arch, by_hf, path)
    model_config = ModelConfig.from_dict(config, str(path))  # validated now: errors come early and name the file
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads

    def read_raw(t: GGUFTensorInfo) -> np.ndarray:
        data = np.empty(t.nbytes, np.uint8)
        with open(path, "rb") as f:
            f.seek(t.offset)
            got = f.readinto(data)
        if got != t.nbytes:
            raise ModelFormatError(f"{path}: tensor {t.name}: file ended after {got} of {t.nbytes} bytes (changed since it was opened?)")
        return data

    def unpermute(name: str, t: GGUFTensorInfo, arr: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's q/k row order (on floats, or on codes and scales alike)."""
        if not (spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))):
            return arr
        n = heads if ".q_proj." in name else kv_heads
        if arr.shape[0] % (2 * n):
            raise ModelFormatError(f"{path}: tensor {t.name} has {arr.shape[0]} rows, not a multiple of 2 x {n} heads")
        return np.ascontiguousarray(unpermute_qk(arr, n))

    def read(t: GGUFTensorInfo) -> np.ndarray:
        return dequantize(read_raw(t), t, path)

    def load(name: str) -> np.ndarray:
        try:
            return _load(name)
        except KilnError:
            raise
        except Exception as e:
            raise ModelFormatError(f"{path}: tensor {name}: {type(e).__name__}: {e}") from e

    def _load(name: str) -> np.ndarray:
        t = by_hf.get(name)
        if t is None:
            raise ModelFormatError(f"{path}: no tensor {name}")
        if spec.norm_shift and name.endswith("norm.weight"):
            return read(t) - np.float32(spec.norm_shift)  # back to HF's weights (as transformers' GGUF loader does)
        return unpermute(name, t, read(t))

    def load_quantized(name: str, fmt: str) -> dict | None:
        """Q4_1 / Q4_0 -> q4g32 and Q8_0 -> q8 block for block (the same grids:
        scale and minimum per 32 / scale per 32, fp16), with the q/k row order undone
        on the codes; a stack of experts [E, N, K] keeps its leading axis in every
        array. None for any other pairing (the caller re-quantizes)."""
        t = by_hf.get(name)
        if t is None or len(t.shape) not in (2, 3) or (t.qtype.name, fmt) not in DIRECT_IMPORTS:
            return None
        rows = (int(np.prod(t.shape[:-1])), t.shape[-1])
        parts = blocks_to_kiln(read_raw(t), t.qtype.name, rows)
        return {k: unpermute(name, t, v.reshape(*t.shape[:-1], v.shape[-1])) for k, v in parts.items()}

    if "rope_freqs.weight" in skipped:
        config["gguf_skipped_tensors"] = sorted(skipped)
        if config["rope_scaling"] is not None:
            raise UnsupportedModelError(f"{path}: both rope scaling metadata and a rope_freqs tensor are present")
        factors = read(skipped["rope_freqs.weight"])
        config["rope_scaling"] = llama3_rope_scaling(factors, model_config.head_dim, model_config.rope_theta, path)
        model_config = ModelConfig.from_dict(config, str(path))
    if "rope_factors_short.weight" in skipped or "rope_factors_long.weight" in skipped:
        if not {"rope_factors_short.weight", "rope_factors_long.weight"} <= set(skipped):
            raise ModelFormatError(f"{path}: only one of rope_factors_short / rope_factors_long is present")
        config["gguf_skipped_tensors"] = sorted(skipped)
        config["rope_scaling"] = longrope_scaling(read(skipped["rope_factors_short.weight"]), read(skipped["rope_factors_long.weight"]),
                                                  header, arch, path)
        model_config = ModelConfig.from_dict(config, str(path))
    tokenizer = build_tokenizer(header, model_config.vocab_size, path)
    return Checkpoint(
        config=config,
        tensor_names=list(by_hf),
        load=load,
        tokenizer=tokenizer,
        source=str(path),
        format="gguf",
        tensor_dtypes={hf: t.qtype.name for hf, t in by_hf.items()},
        load_quantized=load_quantized,
    )
