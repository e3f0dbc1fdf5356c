"""GGUF metadata -> an HF-style config dict (the keys `ModelConfig.from_dict` reads)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError
from .gguf_header import REQUIRED, GGUFHeader, GGUFTensorInfo, meta


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float, path: Path) -> dict | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor.

    llama.cpp's convert turns (factor, low_freq_factor, high_freq_factor,
    original context) into one factor per rotary frequency and drops the
    parameters. Every Llama 3.x model uses low 1, high 4, original 8192 with
    factor 8 or 32: recompute with those and accept only an exact match.
    """
    f = np.asarray(factors, np.float64).reshape(-1)
    if f.shape != (head_dim // 2,):
        raise ModelFormatError(f"{path}: tensor rope_freqs.weight has {f.size} values, expected head_dim/2 = {head_dim // 2}")
    if np.all(f == 1.0):
        return None
    cand = {"rope_type": "llama3", "factor": float(f.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}  # fmt: skip
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    old, lo, hi, factor = 8192, 1.0, 4.0, cand["factor"]
    smooth = (old / wavelen - lo) / (hi - lo)
    want = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(want, f, rtol=1e-4, atol=0):
        raise UnsupportedModelError(f"{path}: tensor rope_freqs.weight does not match llama3 rope scaling "
                                    f"(low 1, high 4, original context 8192); other rope frequency factors are not supported")  # fmt: skip
    return cand


def _rope_scaling(header: GGUFHeader, arch: str, path: Path) -> dict | None:
    kind = meta(header, f"{arch}.rope.scaling.type", "str", path, "none")
    factor = meta(header, f"{arch}.rope.scaling.factor", "float", path, None)
    if kind == "none" and factor is None:
        legacy = meta(header, f"{arch}.rope.scale_linear", "float", path, None)
        if legacy is not None and legacy != 1.0:
            return {"rope_type": "linear", "factor": legacy}
        return None
    if kind == "none":
        return None
    out = {"rope_type": kind, "factor": factor}
    orig = meta(header, f"{arch}.rope.scaling.original_context_length", "int", path, None)
    if orig is not None:
        out["original_max_position_embeddings"] = orig
    return out  # ModelConfig.from_dict rejects kinds kiln does not run (yarn, longrope)


def build_config(header: GGUFHeader, arch: str, hf_arch: str, names: dict[str, GGUFTensorInfo], path: Path) -> dict:
    def key(k, kind, default=REQUIRED):
        return meta(header, f"{arch}.{k}", kind, path, default)

    heads = key("attention.head_count", "int")
    attention = _ATTENTION.get(arch, _head_dim)(key, heads, names, path)
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    embd = names.get("model.embed_tokens.weight")
    vocab = key("vocab_size", "int", None)
    if vocab is None:
        vocab = embd.shape[0] if embd is not None else len(tokens) if isinstance(tokens, list) else None
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": arch,
        "hidden_size": key("embedding_length", "int"),
        "intermediate_size": key("feed_forward_length", "int"),
        "num_hidden_layers": key("block_count", "int"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", "int", heads),
        "vocab_size": vocab,
        "max_position_embeddings": key("context_length", "int"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", "float"),
        "rope_theta": key("rope.freq_base", "float", 10000.0),
        "rope_scaling": _rope_scaling(header, arch, path),
        "tie_word_embeddings": "lm_head.weight" not in names,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in names,
        "torch_dtype": "float32",
    }
    cfg.update(attention)
    cfg.update(_EXPERTS.get(arch, _moe_config)(key, cfg, names, path))
    cfg.update(_ARCH_CONFIG.get(arch, lambda key, cfg: {})(key, cfg))
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = meta(header, f"tokenizer.ggml.{gguf_key}", "int", path, None)
        if value is not None:
            cfg[hf_key] = value
    extra_eos = extra_eos_ids(header, path, cfg.get("eos_token_id"))
    if extra_eos:
        cfg["eos_token_id"] = [cfg["eos_token_id"], *extra_eos] if "eos_token_id" in cfg else extra_eos
    return cfg


def _head_dim(key, heads: int, names: dict[str, GGUFTensorInfo], path: Path) -> dict:
    """{"head_dim"} from key_length (else rope.dimension_count); a value length or rotary
    width other than the head's is refused."""
    key_len, value_len = key("attention.key_length", "int", None), key("attention.value_length", "int", None)
    rope_dim = key("rope.dimension_count", "int", None)
    head_dim = key_len if key_len is not None else rope_dim
    if value_len is not None and head_dim is not None and value_len != head_dim:
        raise UnsupportedModelError(f"{path}: attention key length {head_dim} differs from value length {value_len}")
    if rope_dim is not None and head_dim is not None and rope_dim != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim {head_dim}) are not supported")
    return {} if head_dim is None else {"head_dim": head_dim}


def _moe_config(key, cfg: dict, names: dict[str, GGUFTensorInfo], path: Path) -> dict:
    """The HF mixture-of-experts keys from `{arch}.expert_*` (none for a dense model).

    Expert width: `expert_feed_forward_length` (qwen3moe), else `feed_forward_length`
    (llama-arch Mixtral). Top-k weights renormalised unless `expert_weights_norm`
    says false (llama.cpp renormalises for both architectures). Layers without a
    router tensor keep a dense MLP (mlp_only_layers). Shared experts and other
    gating functions (DeepSeek, Qwen2-MoE) are refused by name."""
    experts = key("expert_count", "int", 0)
    if not experts:
        return {}
    shared = key("expert_shared_count", "int", 0)
    if shared:
        raise UnsupportedModelError(f"{path}: {shared} shared experts (expert_shared_count) are not supported yet")
    gating = key("expert_gating_func", "int", 1)
    if gating != 1:  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE: 1 softmax, 2 sigmoid
        raise UnsupportedModelError(f"{path}: expert_gating_func {gating} is not supported (only 1, softmax)")
    layers = cfg["num_hidden_layers"] if isinstance(cfg["num_hidden_layers"], int) else 0
    return {
        "num_local_experts": experts,
        "num_experts_per_tok": key("expert_used_count", "int"),
        "moe_intermediate_size": key("expert_feed_forward_length", "int", cfg["intermediate_size"]),
        "norm_topk_prob": key("expert_weights_norm", "bool", True),
        "mlp_only_layers": [i for i in range(layers) if f"model.layers.{i}.mlp.gate.weight" not in names],
    }


def _gemma3_config(key, cfg: dict) -> dict:
    """What llama.cpp's gemma3 graph fixes rather than stores: every 6th layer full, the
    others sliding with RoPE base 10000; the score scale 1/sqrt(head_dim) (27B, 62 layers:
    1/sqrt(hidden / heads), HF's query_pre_attn_scalar 168)."""
    layers, head_dim = cfg["num_hidden_layers"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {
        "sliding_window": key("attention.sliding_window", "int"),
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        "rope_local_base_freq": key("rope.freq_base_swa", "float", 10000.0),
        "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
    }


def _phi3_config(key, cfg: dict) -> dict:
    """Phi-3's window (mini-4k: 2047); its LongRoPE factors are tensors (gguf_reader reads them)."""
    window = key("attention.sliding_window", "int", None)
    return {} if window is None else {"sliding_window": window}


def longrope_scaling(short: np.ndarray, long: np.ndarray, header: GGUFHeader, arch: str, path: Path) -> dict:
    """HF's longrope rope_scaling from llama.cpp's rope_factors_short / _long tensors and metadata."""
    orig = meta(header, f"{arch}.rope.scaling.original_context_length", "int", path, None)
    if orig is None:
        raise ModelFormatError(f"{path}: rope_factors tensors without {arch}.rope.scaling.original_context_length")
    out = {"rope_type": "longrope", "short_factor": [float(v) for v in np.asarray(short).reshape(-1)],
           "long_factor": [float(v) for v in np.asarray(long).reshape(-1)], "original_max_position_embeddings": orig}
    attn = meta(header, f"{arch}.rope.scaling.attn_factor", "float", path, None)
    if attn is not None:
        out["attention_factor"] = attn
    return out


def _mla_dims(key, heads: int, names: dict[str, GGUFTensorInfo], path: Path) -> dict:
    """DeepSeek's multi-head latent attention sizes (HF's keys). Files converted since llama.cpp's
    MLA support (2025-04) describe the latent as one MQA head (key_length = kv_lora_rank + rope,
    value_length = kv_lora_rank, head_count_kv 1) and give the per-head sizes in key_length_mla /
    value_length_mla; older files give them in key_length / value_length. HF's config keeps a
    K/V head per query head, and head_dim = the rotary width (transformers' DeepseekV2/V3Config)."""
    rope = key("rope.dimension_count", "int")
    mla = key("attention.key_length_mla", "int", None) is not None
    sfx = "_mla" if mla else ""
    qk, v = key(f"attention.key_length{sfx}", "int"), key(f"attention.value_length{sfx}", "int")
    if qk <= rope:
        raise ModelFormatError(f"{path}: deepseek2.attention.key_length{sfx} {qk} must exceed deepseek2.rope.dimension_count {rope} "
                               f"(nope + rope dims per head)")
    q_lora = key("attention.q_lora_rank", "int", 0)
    if not q_lora and "model.layers.0.self_attn.q_a_proj.weight" in names:
        raise ModelFormatError(f"{path}: tensor blk.0.attn_q_a.weight needs metadata key deepseek2.attention.q_lora_rank, which is missing or 0")
    return {"kv_lora_rank": key("attention.kv_lora_rank", "int"), "q_lora_rank": q_lora or None, "qk_nope_head_dim": qk - rope,
            "qk_rope_head_dim": rope, "v_head_dim": v, "head_dim": rope, "num_key_value_heads": heads}


def _deepseek2_experts(key, cfg: dict, names: dict[str, GGUFTensorInfo], path: Path) -> dict:
    """DeepSeek's router and experts as HF's DeepseekV2/V3 config keys; the gating function picks
    the family: 2 (sigmoid) -> DeepseekV3ForCausalLM (noaux_tc: the choice made on the scores plus
    exp_probs_b), 1 or absent (llama.cpp's reading of V2 files written before the key) -> V2.

    Expert groups: `expert_group_count` / `expert_group_used_count` (llama.cpp's convert writes
    them from n_group / topk_group since 2025-10). A file without them gets no group limit, as
    llama.cpp runs it (older V3 / R1 files: top-k over all experts). A GGUF cannot say how a group
    is scored: V3 sums its best two (HF and llama.cpp agree); for softmax V2 files this takes
    HF's group_limited_greedy (a group's best expert), the rule of the model such a file was
    converted from, where llama.cpp scores V2's groups by their best two as well. Weights: x
    expert_weights_scale (absent: 1), renormalised when expert_weights_norm (absent: false, as
    llama.cpp reads it); V2 never renormalises (transformers), so a softmax file asking for it is refused."""
    experts = key("expert_count", "int", 0)
    if not experts:
        return {}
    gating = key("expert_gating_func", "int", 1)  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE: 1 softmax, 2 sigmoid
    if gating not in (1, 2):
        raise UnsupportedModelError(f"{path}: deepseek2.expert_gating_func {gating} is not supported (1 softmax: V2, 2 sigmoid: V3)")
    v3 = gating == 2
    norm = key("expert_weights_norm", "bool", False)
    if not v3:
        bias = next((n for n in names if n.endswith(".mlp.gate.e_score_correction_bias")), None)
        if bias is not None:
            raise UnsupportedModelError(f"{path}: tensor {names[bias].name} (a V3 router bias) with softmax gating is not supported")
        if norm:
            raise UnsupportedModelError(f"{path}: deepseek2.expert_weights_norm true with softmax gating is not supported "
                                        f"(DeepSeek-V2 does not renormalise)")
    groups = key("expert_group_count", "int", 0)
    used = key("expert_group_used_count", "int") if groups > 1 else 1
    return {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "n_routed_experts": experts,
        "num_experts_per_tok": key("expert_used_count", "int"),
        "moe_intermediate_size": key("expert_feed_forward_length", "int"),
        "n_shared_experts": key("expert_shared_count", "int", 0),
        "first_k_dense_replace": key("leading_dense_block_count", "int", 0),
        "routed_scaling_factor": key("expert_weights_scale", "float", 1.0),
        "norm_topk_prob": norm,
        "scoring_func": "sigmoid" if v3 else "softmax",
        "topk_method": "noaux_tc" if v3 else "group_limited_greedy" if groups > 1 else "greedy",
        "n_group": max(groups, 1),
        "topk_group": used,
    }


def _deepseek2_config(key, cfg: dict) -> dict:
    """DeepSeek's YaRN: llama.cpp's convert stores 0.1 x mscale_all_dim as yarn_log_multiplier and
    its graph scales the softmax by mscale(factor, mscale_all_dim)^2 with the rotation's own factor
    1, which is HF's when mscale = mscale_all_dim (every DeepSeek release: V2 0.707, V3 1)."""
    rs = cfg["rope_scaling"]
    if not rs or rs["rope_type"] != "yarn":
        return {}
    # float32 in the file: back to the decimal the converter started from (6 significant digits)
    m = float(f"{key('rope.scaling.yarn_log_multiplier', 'float') / 0.1:.6g}")
    return {"rope_scaling": {**rs, "mscale": m, "mscale_all_dim": m, "beta_fast": key("rope.scaling.yarn_beta_fast", "float", 32.0),
                             "beta_slow": key("rope.scaling.yarn_beta_slow", "float", 1.0)}}


# GGUF architecture -> how it states head sizes, experts, and its keys beyond the common ones
_ATTENTION = {"deepseek2": _mla_dims}
_EXPERTS = {"deepseek2": _deepseek2_experts}
_ARCH_CONFIG = {"gemma3": _gemma3_config, "phi3": _phi3_config, "deepseek2": _deepseek2_config}


def extra_eos_ids(header: GGUFHeader, path: Path, eos: int | None) -> list[int]:
    """End-of-turn / end-of-message ids that also stop generation (Llama 3's <|eot_id|>)."""
    out = []
    for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta(header, k, "int", path, None)
        if v is not None and v != eos and v not in out:
            out.append(v)
    return out
