"""Phi-3: the Llama graph, whose checkpoints already store q/k/v and gate/up
fused (`qkv_proj`, `gate_up_proj`: the rows in kiln's order, so they are taken
as they are). LongRoPE (`rope_scaling` longrope / su) is applied in the graph
with its short factors and attention factor; the context is capped at
`original_max_position_embeddings`, the length up to which transformers uses
the short factors (beyond it transformers re-rotates every position with the
long ones, which a KV cache cannot follow)."""

from __future__ import annotations

import dataclasses
import math

from ...errors import ModelFormatError, UnsupportedModelError
from . import register
from .layers import rope_inv_freq
from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Phi3Attention(LlamaAttention):
    def __init__(self, c, dtype: str):
        super().__init__(c, dtype)
        s = c.rope_scaling or {}
        if s.get("rope_type") == "longrope":  # else plain RoPE: the cache applies it on append
            self.inv_freq = rope_inv_freq(c.rope_theta, c.head_dim, s["short_factor"])
            self.mscale = s["attention_factor"]


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Phi3Attention


@register("Phi3ForCausalLM")
class Phi3ForCausalLM(LlamaForCausalLM):
    layer_cls = Phi3DecoderLayer

    @property
    def rope_in_graph(self) -> bool:
        return (self.config.rope_scaling or {}).get("rope_type") == "longrope"

    @classmethod
    def adapt_config(cls, config):
        act = config.extra.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{config.architecture}: hidden_act {act!r} is not supported (silu)")
        config = dataclasses.replace(config, attention_bias=False, attention_out_bias=False, mlp_bias=False)
        s = config.rope_scaling
        if not s or s["rope_type"] != "longrope":
            return config
        half = config.head_dim // 2
        if len(s["short_factor"]) != half or len(s["long_factor"]) != half:
            raise ModelFormatError(f"{config.architecture}: rope_scaling short_factor and long_factor need head_dim / 2 = {half} values")
        orig = s["original_max_position_embeddings"]
        factor = s.get("factor", config.max_position_embeddings / orig)  # transformers' default, from the full context
        mscale = s.get("attention_factor", 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))
        return dataclasses.replace(config, rope_scaling={**s, "attention_factor": mscale},
                                   max_position_embeddings=min(config.max_position_embeddings, orig))

    @classmethod
    def hf_layer_sources(cls, c):
        sources = super().hf_layer_sources(c)
        sources.update({"attn.qkv_proj.weight": ("self_attn.qkv_proj.weight",), "mlp.gate_up_proj.weight": ("mlp.gate_up_proj.weight",)})
        return sources
