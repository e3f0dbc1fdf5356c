"""Model configuration: one frozen dataclass built by one `from_dict`.

HF configs spell the same thing several ways (n_head / num_attention_heads, ...);
`ModelConfig.from_dict` normalises them here, once, validates every value a
stranger could make hostile, and keeps the keys it does not know in `extra`
so nothing is silently dropped from view.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ModelFormatError, UnsupportedModelError

# Generous limits: bigger than any real model, small enough that nothing
# derived from them can overflow or allocate absurd memory before weights load.
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 17
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 22  # 4M tokens
MAX_EXPERTS = 1 << 12

_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
    "rms_norm_eps": ("rms_norm_eps", "layer_norm_epsilon", "norm_eps"),
}
_KNOWN = {
    "architectures", "vocab_size", "head_dim", "rope_theta", "rope_scaling", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "sliding_window", "use_sliding_window", "max_window_layers", "model_type", "hidden_act",
    "transformers_version", "initializer_range", "use_cache", "attention_dropout", "pretraining_tp", "embd_pdrop", "resid_pdrop",
    "rope_parameters", "layer_types", "rope_local_base_freq", "original_max_position_embeddings", "partial_rotary_factor",
    # mixture of experts: normalised below, or training-only (aux loss, router noise, router logits output)
    "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "router_jitter_noise", "output_router_logits",
    # DeepSeek (multi-head latent attention, shared experts): normalised below; the routing keys
    # (topk_method, n_group, ...) stay in `extra` for the family (frontends/models/deepseek.py)
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_head_dim",
    "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq", "aux_loss_alpha", "seq_aux", "ep_size",
}
_ROPE_TYPES = ("default", "llama3", "linear", "longrope", "yarn")  # longrope, yarn: families that apply RoPE in the graph
LAYER_TYPES = ("full_attention", "sliding_attention")


def _field(cfg: dict, name: str, file: str, *, default: Any = None, required: bool = True) -> Any:
    for key in _ALIASES.get(name, (name,)):
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    if required and default is None:
        raise ModelFormatError(f"{file}: missing required field '{name}'")
    return default


def _int(value: Any, name: str, file: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ModelFormatError(f"{file}: field '{name}' must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ModelFormatError(f"{file}: field '{name}' = {value} is outside [{lo}, {hi}]")
    return value


def _float(value: Any, name: str, file: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"{file}: field '{name}' must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ModelFormatError(f"{file}: field '{name}' = {value} is not a finite number in [{lo}, {hi}]")
    return value


def _rope_scaling(raw: Any, file: str, original_context: Any = None) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{file}: field 'rope_scaling' must be an object or null, got {type(raw).__name__}")
    kind = raw.get("rope_type", raw.get("type", "default"))
    kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
    if kind not in _ROPE_TYPES:
        raise UnsupportedModelError(f"{file}: rope_scaling type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if kind == "default":
        return None
    out: dict[str, Any] = {"rope_type": kind}
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            f = raw.get(key)
            if not isinstance(f, list) or not f:
                raise ModelFormatError(f"{file}: rope_scaling.{key} must be a non-empty list of numbers")
            out[key] = [_float(v, f"rope_scaling.{key}", file, 1e-6, 1e6) for v in f]
        orig = raw.get("original_max_position_embeddings", original_context)
        out["original_max_position_embeddings"] = _int(orig, "original_max_position_embeddings", file, 1, MAX_CONTEXT)
        for key in ("factor", "attention_factor"):
            if raw.get(key) is not None:
                out[key] = _float(raw[key], f"rope_scaling.{key}", file, 1e-6, 1e6)
        return out
    out["factor"] = _float(raw.get("factor"), "rope_scaling.factor", file, 1e-6, 1e6)
    if kind == "yarn":  # transformers' _compute_yarn_parameters (DeepSeek's mscale / mscale_all_dim included)
        orig = raw.get("original_max_position_embeddings", original_context)
        if orig is None:
            raise ModelFormatError(f"{file}: rope_scaling type 'yarn' needs original_max_position_embeddings")
        out["original_max_position_embeddings"] = _int(orig, "rope_scaling.original_max_position_embeddings", file, 1, MAX_CONTEXT)
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
            out[key] = _float(raw.get(key) or default, f"rope_scaling.{key}", file, 1e-6, 1e6)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if raw.get(key) is not None:
                out[key] = _float(raw[key], f"rope_scaling.{key}", file, 0.0, 1e6)
        out["truncate"] = _bool(raw.get("truncate", True), "rope_scaling.truncate", file)
        return out
    if kind == "llama3":
        out["low_freq_factor"] = _float(raw.get("low_freq_factor"), "rope_scaling.low_freq_factor", file, 1e-6, 1e6)
        out["high_freq_factor"] = _float(raw.get("high_freq_factor"), "rope_scaling.high_freq_factor", file, 1e-6, 1e6)
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ModelFormatError(f"{file}: rope_scaling.high_freq_factor must exceed low_freq_factor")
        out["original_max_position_embeddings"] = _int(
            raw.get("original_max_position_embeddings"), "rope_scaling.original_max_position_embeddings", file, 1, MAX_CONTEXT
        )
    return out


def _token_ids(raw: Any, name: str, file: str, vocab: int) -> tuple[int, ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    return tuple(_int(v, name, file, 0, vocab - 1) for v in items)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer's shape, normalised and validated."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on the q, k and v projections
    attention_out_bias: bool = False  # bias on the o projection (HF Llama/Qwen3: same flag as q, k, v)
    mlp_bias: bool = False  # bias on gate, up and down projections
    sliding_window: int | None = None
    # per layer "full_attention" | "sliding_attention" (empty: every layer alike); sliding
    # layers use the window and, where set, their own RoPE base (Gemma 3's local layers)
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source_dtype: str = "float32"
    # mixture of experts (0 experts: a dense model). Which layers are sparse:
    # `is_moe_layer`; norm_topk_prob None = the config does not say (the family decides)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's FFN width
    norm_topk_prob: bool | None = None
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # multi-head latent attention (DeepSeek-V2/V3; kv_lora_rank 0: not MLA): queries through a
    # rank-q_lora_rank bottleneck (0: one q_proj), keys and values from one cached latent row of
    # kv_lora_rank + qk_rope_head_dim per token; n_shared_experts always-on experts beside the routed
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_shared_experts: int = 0
    # shards the graph is split into (frontends/models/sharding.py shard_config sets it on a
    # shard's config; a checkpoint's config is always 1)
    tensor_parallel: int = 1
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: Any, file: str = "config.json") -> "ModelConfig":
        """Validate an HF-style config dict; raise ModelFormatError naming the field."""
        if not isinstance(cfg, dict):
            raise ModelFormatError(f"{file}: top level must be a JSON object")
        archs = cfg.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ModelFormatError(f"{file}: field 'architectures' must be a non-empty list of strings")
        hidden = _int(_field(cfg, "hidden_size", file), "hidden_size", file, 1, MAX_HIDDEN)
        heads = _int(_field(cfg, "num_attention_heads", file), "num_attention_heads", file, 1, MAX_HEADS)
        kv_heads = _int(_field(cfg, "num_key_value_heads", file, default=heads), "num_key_value_heads", file, 1, heads)
        if heads % kv_heads:
            raise ModelFormatError(f"{file}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        head_dim_raw = cfg.get("head_dim")
        if head_dim_raw is None:
            if hidden % heads:
                raise ModelFormatError(f"{file}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) and no head_dim is given")
            head_dim_raw = hidden // heads
        head_dim = _int(head_dim_raw, "head_dim", file, 2, MAX_HEAD_DIM)
        if head_dim % 2:
            raise ModelFormatError(f"{file}: head_dim ({head_dim}) must be even for rotary embeddings")
        vocab = _int(_field(cfg, "vocab_size", file), "vocab_size", file, 1, MAX_VOCAB)
        rope_params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        local_rope = {}
        if isinstance(rope_params.get("full_attention"), dict):
            # transformers 5 writes one set of RoPE parameters per layer type (Gemma 3)
            local_rope = rope_params.get("sliding_attention") or {}
            rope_params = rope_params["full_attention"]
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_local = cfg.get("rope_local_base_freq", local_rope.get("rope_theta"))
        if cfg.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedModelError(f"{file}: partial rotary embeddings (partial_rotary_factor < 1) are not supported")
        if local_rope.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"{file}: RoPE scaling on sliding-window layers ({local_rope['rope_type']}) is not supported")
        rope_scaling_raw = cfg.get("rope_scaling")
        if rope_scaling_raw is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling_raw = rope_params
        sliding = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:
            sliding = None
        eos = _token_ids(cfg.get("eos_token_id"), "eos_token_id", file, vocab)
        bos = _token_ids(cfg.get("bos_token_id"), "bos_token_id", file, vocab)
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        if dtype not in ("float32", "float16", "bfloat16"):
            dtype = "float32"
        known = set(_KNOWN).union(*_ALIASES.values())
        layers = _int(_field(cfg, "num_hidden_layers", file), "num_hidden_layers", file, 1, MAX_LAYERS)
        inter = _int(_field(cfg, "intermediate_size", file), "intermediate_size", file, 1, MAX_HIDDEN * 8)
        return cls(
            architecture=archs[0],
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            max_position_embeddings=_int(_field(cfg, "max_position_embeddings", file, default=4096), "max_position_embeddings", file, 1, MAX_CONTEXT),
            rms_norm_eps=_float(_field(cfg, "rms_norm_eps", file, default=1e-6), "rms_norm_eps", file, 1e-12, 1.0),
            rope_theta=_float(rope_theta, "rope_theta", file, 1.0, 1e12),
            rope_scaling=_rope_scaling(rope_scaling_raw, file, cfg.get("original_max_position_embeddings")),
            tie_word_embeddings=_bool(cfg.get("tie_word_embeddings", False), "tie_word_embeddings", file),
            attention_bias=_bool(cfg.get("attention_bias", False), "attention_bias", file),
            attention_out_bias=_bool(cfg.get("attention_bias", False), "attention_bias", file),
            mlp_bias=_bool(cfg.get("mlp_bias", False), "mlp_bias", file),
            sliding_window=None if sliding is None else _int(sliding, "sliding_window", file, 1, MAX_CONTEXT),
            layer_types=_layer_types(cfg.get("layer_types"), file, layers),
            rope_local_theta=None if rope_local is None else _float(rope_local, "rope_local_base_freq", file, 1.0, 1e12),
            bos_token_id=bos[0] if bos else None,
            eos_token_ids=eos,
            source_dtype=dtype,
            **_moe_fields(cfg, file, layers, inter),
            **_mla_fields(cfg, file, heads, hidden),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def active_params(self, total: int) -> int:
        """Of `total` parameters, those one token reads: all but the experts it does not pick."""
        sparse = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        unpicked = self.num_experts - self.num_experts_per_tok
        return total - sparse * unpicked * 3 * self.moe_intermediate_size * self.hidden_size

    def is_moe_layer(self, i: int) -> bool:
        """Layer i's MLP is a mixture of experts (transformers' Qwen3-MoE rule; Mixtral: every layer)."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0


def _moe_fields(cfg: dict, file: str, layers: int, inter: int) -> dict:
    """The mixture-of-experts keys (Mixtral: num_local_experts; Qwen3-MoE: num_experts, which
    transformers 5 also writes as num_local_experts)."""
    experts = next((cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if cfg.get(k) is not None), None)
    if experts is None or experts == 0:
        return {}
    experts = _int(experts, "num_experts", file, 1, MAX_EXPERTS)
    top_k = _int(cfg.get("num_experts_per_tok"), "num_experts_per_tok", file, 1, experts)
    norm = cfg.get("norm_topk_prob")
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list):
        raise ModelFormatError(f"{file}: field 'mlp_only_layers' must be a list of layer indices, got {only!r}")
    if cfg.get("first_k_dense_replace") is not None:  # DeepSeek: the first k layers keep a dense MLP
        only = [*only, *range(_int(cfg["first_k_dense_replace"], "first_k_dense_replace", file, 0, layers))]
    if cfg.get("moe_layer_freq", 1) != 1:
        raise UnsupportedModelError(f"{file}: moe_layer_freq {cfg['moe_layer_freq']!r} is not supported (DeepSeek models use 1)")
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": _int(cfg.get("moe_intermediate_size", inter), "moe_intermediate_size", file, 1, MAX_HIDDEN * 8),
        "norm_topk_prob": None if norm is None else _bool(norm, "norm_topk_prob", file),
        "decoder_sparse_step": _int(cfg.get("decoder_sparse_step", 1), "decoder_sparse_step", file, 1, MAX_LAYERS),
        "mlp_only_layers": tuple(sorted({_int(i, "mlp_only_layers", file, 0, layers - 1) for i in only})),
    }


def _mla_fields(cfg: dict, file: str, heads: int, hidden: int) -> dict:
    """DeepSeek's multi-head latent attention dims (none without kv_lora_rank) and shared experts."""
    if cfg.get("kv_lora_rank") is None:
        return {}
    dims = {k: _int(_field(cfg, k, file), k, file, 1, MAX_HIDDEN) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
    if dims["qk_rope_head_dim"] % 2:
        raise ModelFormatError(f"{file}: qk_rope_head_dim ({dims['qk_rope_head_dim']}) must be even for rotary embeddings")
    q_lora = cfg.get("q_lora_rank")
    return {**dims, "q_lora_rank": 0 if q_lora is None else _int(q_lora, "q_lora_rank", file, 1, MAX_HIDDEN),
            "n_shared_experts": _int(cfg.get("n_shared_experts") or 0, "n_shared_experts", file, 0, MAX_EXPERTS)}


def _layer_types(raw: Any, file: str, layers: int) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) != layers or any(t not in LAYER_TYPES for t in raw):
        raise ModelFormatError(f"{file}: field 'layer_types' must list {layers} of {', '.join(LAYER_TYPES)}")
    return tuple(raw)


def _bool(value: Any, name: str, file: str) -> bool:
    if not isinstance(value, bool):
        raise ModelFormatError(f"{file}: field '{name}' must be true or false, got {value!r}")
    return value
