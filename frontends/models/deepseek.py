"""DeepSeek-V2 / V3: multi-head latent attention (MLA) and DeepSeek's MoE block.

MLA, as transformers' DeepseekV2/V3Attention computes it, written in the
latent space ("absorbed"): per token one row is cached per layer,

    latent = [RMSNorm(c_kv), rope(k_pe)]     # [kv_lora_rank + qk_rope_head_dim]
             from kv_a_proj(x) = [c_kv, k_pe]

and kv_b_proj  # [heads * (nope + v), kv_lora] splits per head into W_UK
[nope, kv_lora] and W_UV [v, kv_lora] (params attn.w_uk, attn.w_uv: one batched matmul each). Since k_nope = W_UK c_kv and v = W_UV c_kv,

    q . k   = (W_UK^T q_nope) . c_kv + q_pe . k_pe   = q_abs . latent
    softmax(..) @ v = W_UV (softmax(..) @ c_kv)

so attention runs over the latent rows themselves (one row read serves every
head; kiln's latent cache, passes/kernels/mla.py) and W_UV is applied after
it. The query is q_proj(x) (V2-Lite) or q_b_proj(RMSNorm(q_a_proj(x)))
(q LoRA). DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...; the
rope rows of q_proj / q_b_proj and kv_a_proj are permuted at conversion into
the rotate-half layout (evens then odds), which leaves every q_pe . k_pe
unchanged and lets layers.rope rotate them. YaRN scaling (DeepSeek's long
context) gives the frequencies, the cos/sin factor and, through
mscale_all_dim, a larger softmax scale, all computed here as transformers does.

MLP: dense SwiGLU for the first `first_k_dense_replace` layers, then
DeepSeekMoE (frontends/models/moe.py: routed experts picked by V2's softmax
greedy / group_limited_greedy or V3's noaux_tc, plus shared experts). V3's
multi-token-prediction layers (model.layers.{num_hidden_layers}...) are
read past, not rejected: kiln decodes one token per step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...errors import ModelFormatError, UnsupportedModelError
from . import register
from .layers import Linear, RMSNorm, _precision, nn, op, rope, rope_inv_freq
from .llama import LlamaDecoderLayer, LlamaForCausalLM
from .moe import DeepSeekMoE, DeepSeekRouting, MoEFamily


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_rope(theta: float, dim: int, rs: dict) -> tuple[np.ndarray, float]:
    """transformers' _compute_yarn_parameters: (inv_freq  # [dim / 2] float32, cos/sin factor)."""
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]
    attn = rs.get("attention_factor")
    if attn is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rs["beta_fast"]), correction_dim(rs["beta_slow"])
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (transformers: prevents a division by zero)
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolate = np.float32(1) - ramp
    inv = (np.float32(1) / (np.float32(factor) * pos_freqs)) * (1 - extrapolate) + (np.float32(1) / pos_freqs) * extrapolate
    return inv.astype(np.float32), float(attn)


class MLAttention(nn.Module):
    def __init__(self, c, dtype):
        p = _precision(dtype)
        self.c = c
        heads, nope, rope_dim, lat, v = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
        q_out = heads * (nope + rope_dim)
        if c.q_lora_rank:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, dtype, bias=c.attention_bias, role="qkv_proj")
            self.q_a_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype)
            self.q_b_proj = Linear(c.q_lora_rank, q_out, dtype, role="qkv_proj")
        else:
            self.q_proj = Linear(c.hidden_size, q_out, dtype, role="qkv_proj")
        self.kv_a_proj = Linear(c.hidden_size, lat + rope_dim, dtype, bias=c.attention_bias, role="qkv_proj")
        self.kv_a_norm = RMSNorm(lat, c.rms_norm_eps, dtype)
        # kv_b_proj per head: W_UK [nope, kv_lora] (absorbed into the query), W_UV [v, kv_lora] (after attention)
        self.w_uk = nn.Parameter((heads, nope, lat), p.storage)
        self.w_uv = nn.Parameter((heads, v, lat), p.storage)
        self.o_proj = Linear(heads * v, c.hidden_size, dtype, bias=c.attention_bias, role="o_proj")
        rs = c.rope_scaling or {}
        self.sm_scale = (nope + rope_dim) ** -0.5
        if rs.get("rope_type") == "yarn":
            self.inv_freq, self.mscale = yarn_rope(c.rope_theta, rope_dim, rs)
            if rs.get("mscale_all_dim"):
                self.sm_scale *= _yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
        else:
            self.inv_freq, self.mscale = rope_inv_freq(c.rope_theta, rope_dim), 1.0

    def forward(self, x, kv_cache, layer_id: int):
        c = self.c
        b, s, _ = x.shape
        heads, nope, rope_dim, lat, v = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if c.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = op.split(op.reshape(q, (b, s, heads, nope + rope_dim)), [nope], axis=3)
        c_kv, k_pe = op.split(self.kv_a_proj(x), [lat], axis=2)
        positions = kv_cache.get_query_positions(b * s)
        q_pe = rope(q_pe, positions, self.inv_freq, self.mscale, name="rope_q")
        k_pe = rope(op.reshape(k_pe, (b, s, 1, rope_dim)), positions, self.inv_freq, self.mscale, name="rope_k")
        query = op.concat([kv_cache.head_matmul(q_nope, self.w_uk, transposed=False), q_pe], dim=3)
        latent = op.concat([self.kv_a_norm(c_kv), op.reshape(k_pe, (b, s, rope_dim))], dim=2)
        o = kv_cache.latent_attention(layer_id, query, latent, self.sm_scale, lat)  # [b, s, heads, kv_lora]
        o = kv_cache.head_matmul(o, self.w_uv, transposed=True)
        return self.o_proj(op.reshape(o, (b, s, heads * v)))


class DeepseekDecoderLayer(LlamaDecoderLayer):
    attention_cls = MLAttention


@register("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
class DeepseekForCausalLM(MoEFamily, LlamaForCausalLM):
    layer_cls = DeepseekDecoderLayer
    rope_in_graph = True  # q_pe / k_pe rotated by the layers (only the rope dims rotate)
    latent_cache = True  # kiln's latent cache (passes/kernels/mla.py), never TVM's per-head one
    yarn_rope = True

    def make_layer(self, config, dtype, i: int):
        layer = self.layer_cls(config, dtype)
        if config.is_moe_layer(i):
            layer.mlp = DeepSeekMoE(config, dtype, self.routing(config), config.n_shared_experts)
        return layer

    @staticmethod
    def routing(c) -> DeepSeekRouting:
        v3 = c.architecture == "DeepseekV3ForCausalLM"
        return DeepSeekRouting.from_hf({**c.extra, "model_type": "deepseek_v3" if v3 else "deepseek_v2", "norm_topk_prob": c.norm_topk_prob})

    @classmethod
    def adapt_config(cls, config):
        c = config
        name = f"{c.architecture} config"
        if not c.kv_lora_rank:
            raise ModelFormatError(f"{name}: kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim are required")
        kind = (c.rope_scaling or {}).get("rope_type", "default")
        if kind not in ("default", "yarn"):
            raise UnsupportedModelError(f"{name}: rope_scaling {kind!r} is not supported for DeepSeek (supported: default, yarn)")
        interleave = c.extra.get("rope_interleave", True)
        if not isinstance(interleave, bool):
            raise ModelFormatError(f"{name}: field 'rope_interleave' must be true or false, got {interleave!r}")
        scoring = "sigmoid" if c.architecture == "DeepseekV3ForCausalLM" else "softmax"
        if c.extra.get("scoring_func", scoring) != scoring:
            raise UnsupportedModelError(f"{name}: scoring_func {c.extra['scoring_func']!r} is not supported for {c.architecture} ({scoring})")
        c = dataclasses.replace(c, norm_topk_prob=bool(c.norm_topk_prob), mlp_bias=False)
        if c.num_experts:
            r = cls.routing(c)
            if c.num_experts % r.n_group or not 1 <= r.topk_group <= r.n_group:
                raise ModelFormatError(f"{name}: n_group {r.n_group} must divide the {c.num_experts} experts and topk_group "
                                       f"{r.topk_group} be in [1, n_group]")
            if c.num_experts_per_tok > r.topk_group * (c.num_experts // r.n_group):
                raise ModelFormatError(f"{name}: num_experts_per_tok {c.num_experts_per_tok} exceeds the experts of {r.topk_group} groups")
        return c

    @classmethod
    def layer_param_shapes(cls, c):
        heads, nope, rope_dim, lat, v = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
        d, q_out = c.hidden_size, heads * (nope + rope_dim)
        shapes = {"attn_norm.weight": (d,), "ffn_norm.weight": (d,),
                  "attn.kv_a_proj.weight": (lat + rope_dim, d), "attn.kv_a_norm.weight": (lat,),
                  "attn.w_uk": (heads, nope, lat), "attn.w_uv": (heads, v, lat), "attn.o_proj.weight": (d, heads * v),
                  "mlp.gate_up_proj.weight": (2 * c.intermediate_size, d), "mlp.down_proj.weight": (d, c.intermediate_size)}
        if c.q_lora_rank:
            shapes.update({"attn.q_a_proj.weight": (c.q_lora_rank, d), "attn.q_a_norm.weight": (c.q_lora_rank,),
                           "attn.q_b_proj.weight": (q_out, c.q_lora_rank)})
        else:
            shapes["attn.q_proj.weight"] = (q_out, d)
        if c.attention_bias:
            shapes.update({"attn.kv_a_proj.bias": (lat + rope_dim,), "attn.o_proj.bias": (d,)}
                          | ({"attn.q_a_proj.bias": (c.q_lora_rank,)} if c.q_lora_rank else {}))
        return shapes

    @classmethod
    def hf_layer_sources(cls, c):
        a = "self_attn"
        sources = {"attn_norm.weight": ("input_layernorm.weight",), "ffn_norm.weight": ("post_attention_layernorm.weight",),
                   "attn.kv_a_proj.weight": (f"{a}.kv_a_proj_with_mqa.weight",), "attn.kv_a_norm.weight": (f"{a}.kv_a_layernorm.weight",),
                   "attn.w_uk": (f"{a}.kv_b_proj.weight",), "attn.w_uv": (f"{a}.kv_b_proj.weight",), "attn.o_proj.weight": (f"{a}.o_proj.weight",),
                   "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.down_proj.weight": ("mlp.down_proj.weight",)}
        if c.q_lora_rank:
            sources.update({"attn.q_a_proj.weight": (f"{a}.q_a_proj.weight",), "attn.q_a_norm.weight": (f"{a}.q_a_layernorm.weight",),
                            "attn.q_b_proj.weight": (f"{a}.q_b_proj.weight",)})
        else:
            sources["attn.q_proj.weight"] = (f"{a}.q_proj.weight",)
        if c.attention_bias:
            sources.update({"attn.kv_a_proj.bias": (f"{a}.kv_a_proj_with_mqa.bias",), "attn.o_proj.bias": (f"{a}.o_proj.bias",)}
                           | ({"attn.q_a_proj.bias": (f"{a}.q_a_proj.bias",)} if c.q_lora_rank else {}))
        return sources

    @classmethod
    def layer_param_shapes_at(cls, c, i):
        shapes = super().layer_param_shapes_at(c, i)
        if not c.is_moe_layer(i):
            return shapes
        shared = c.n_shared_experts * c.moe_intermediate_size
        if shared:
            shapes.update({"mlp.shared_experts.gate_up_proj.weight": (2 * shared, c.hidden_size),
                           "mlp.shared_experts.down_proj.weight": (c.hidden_size, shared)})
        if cls.routing(c).bias:
            shapes["mlp.e_score_correction_bias"] = (c.num_experts,)
        return shapes

    @classmethod
    def hf_layer_sources_at(cls, c, i):
        sources = super().hf_layer_sources_at(c, i)
        if not c.is_moe_layer(i):
            return sources
        if c.n_shared_experts:
            sources.update({"mlp.shared_experts.gate_up_proj.weight": ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
                            "mlp.shared_experts.down_proj.weight": ("mlp.shared_experts.down_proj.weight",)})
        if cls.routing(c).bias:
            sources["mlp.e_score_correction_bias"] = ("mlp.gate.e_score_correction_bias",)
        return sources

    @classmethod
    def hf_sources_for(cls, c, names):
        sources = super().hf_sources_for(c, names)
        for i in range(c.num_hidden_layers):  # transformers 5's fused stacks spell shared experts the same way
            if c.is_moe_layer(i) and c.n_shared_experts and f"model.layers.{i}.mlp.shared_experts.gate_up_proj" in names:
                sources[f"layers.{i}.mlp.shared_experts.gate_up_proj.weight"] = (f"model.layers.{i}.mlp.shared_experts.gate_up_proj",)
            a = f"model.layers.{i}.self_attn"
            if f"{a}.k_b_proj.weight" in names or f"{a}.v_b_proj.weight" in names:  # llama.cpp's kv_b halves (gguf_names.py)
                sources.update({f"layers.{i}.attn.w_uk": (f"{a}.k_b_proj.weight",), f"layers.{i}.attn.w_uv": (f"{a}.v_b_proj.weight",)})
        return sources

    @classmethod
    def reordered_params(cls, c):
        if not _interleaved(c):
            return set()
        q = "q_b_proj" if c.q_lora_rank else "q_proj"
        return {f"layers.{i}.attn.{p}.weight" for i in range(c.num_hidden_layers) for p in (q, "kv_a_proj")}

    @classmethod
    def convert_hf(cls, config, names, load, file):
        """Multi-token-prediction layers past num_hidden_layers are read past; the rope rows
        of the query and of kv_a_proj move from interleaved pairs to rotate-half order."""
        c = config
        mtp = [n for n in names if _layer_index(n) is not None and _layer_index(n) >= c.num_hidden_layers]
        thunks = super().convert_hf(c, [n for n in names if n not in set(mtp)], _k_b_untransposed(load), file)
        nope, rope_dim, lat = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
        sources = cls.hf_sources_for(c, set(names))
        for i in range(c.num_hidden_layers):  # kv_b_proj [heads (nope + v), kv_lora] -> per head W_UK, W_UV
            src = sources[f"layers.{i}.attn.w_uk"][0]
            if not src.endswith(".kv_b_proj.weight"):  # llama.cpp's halves, taken as they are (_k_b_untransposed)
                continue
            thunks[f"layers.{i}.attn.w_uk"] = _kv_b_part(load, src, file, c, 0, nope)
            thunks[f"layers.{i}.attn.w_uv"] = _kv_b_part(load, src, file, c, nope, nope + c.v_head_dim)
        order = np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])
        reordered = cls.reordered_params(c)
        for name in reordered | {n.replace(".weight", ".bias") for n in reordered if ".kv_a_proj." in n and c.attention_bias}:
            if ".kv_a_proj." in name:  # one group: the latent's rows, then its rope rows
                thunks[name] = _permute_rows(thunks[name], 1, lat + rope_dim, lat + order)
            else:  # per head: nope rows, then rope rows
                thunks[name] = _permute_rows(thunks[name], c.num_attention_heads, nope + rope_dim, nope + order)
        return thunks


def _kv_b_part(load, src: str, file: str, c, lo: int, hi: int):
    """Rows lo..hi of each head's block of kv_b_proj  # [heads * (nope + v), kv_lora] -> [heads, hi - lo, kv_lora]."""
    def part():
        arr = load(src)
        want = (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        if arr.shape != want:
            raise ModelFormatError(f"{file}: tensor {src} has shape {list(arr.shape)}, expected {list(want)} from config.json")
        return np.ascontiguousarray(arr.reshape(c.num_attention_heads, -1, c.kv_lora_rank)[:, lo:hi])

    return part


def _interleaved(c) -> bool:
    """DeepSeek's RoPE pairs are interleaved (V2 always; V3 unless rope_interleave is false)."""
    return c.architecture != "DeepseekV3ForCausalLM" or c.extra.get("rope_interleave", True)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def _k_b_untransposed(load):
    """GGUFs converted since llama.cpp's MLA support (2025-04) hold kv_b_proj split per head:
    k_b_proj  # [heads, kv_lora, nope] (W_UK transposed), read back as w_uk  # [heads, nope, kv_lora],
    and v_b_proj  # [heads, v, kv_lora], which is w_uv as it is."""
    def read(name: str) -> np.ndarray:
        arr = load(name)
        return np.ascontiguousarray(arr.swapaxes(1, 2)) if name.endswith(".k_b_proj.weight") and arr.ndim == 3 else arr

    return read


def _permute_rows(thunk, groups: int, rows: int, rope_rows: np.ndarray):
    """Rows [g * rows + rope_rows[j]] move to [g * rows + rows - len + j] in every group."""
    def permuted():
        arr = thunk()
        grouped = arr.reshape(groups, rows, *arr.shape[1:]).copy()
        grouped[:, rows - len(rope_rows):] = grouped[:, rope_rows]
        return grouped.reshape(arr.shape)

    return permuted


__all__ = ["DeepseekForCausalLM", "yarn_rope"]
