"""Qwen3: the Llama graph with RMSNorm on each query and key head before RoPE,
and an explicit head_dim (q_size may differ from hidden_size)."""

from __future__ import annotations

import dataclasses

from . import register
from .layers import RMSNorm, head_rms_norm
from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, c, dtype: str):
        super().__init__(c, dtype)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)

    def qkv(self, x):
        c = self.c
        return head_rms_norm(super().qkv(x), self.q_norm.weight, self.k_norm.weight, c.num_attention_heads, c.num_key_value_heads,
                             c.rms_norm_eps)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


@register("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer

    @classmethod
    def adapt_config(cls, config):
        # attention_bias covers q, k, v and o (as in Llama); the MLP never has one.
        return dataclasses.replace(config, mlp_bias=False)

    @classmethod
    def layer_param_shapes(cls, c):
        shapes = super().layer_param_shapes(c)
        shapes.update({"attn.q_norm.weight": (c.head_dim,), "attn.k_norm.weight": (c.head_dim,)})
        return shapes

    @classmethod
    def hf_layer_sources(cls, c):
        sources = super().hf_layer_sources(c)
        sources.update({"attn.q_norm.weight": ("self_attn.q_norm.weight",), "attn.k_norm.weight": ("self_attn.k_norm.weight",)})
        return sources
