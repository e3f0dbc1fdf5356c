"""Gemma 3 (text): the Qwen3 attention (q/k RMSNorm per head) with

    h   = x + post_attn_norm(attn(attn_norm(x)))
    out = h + post_ffn_norm(mlp(ffn_norm(h)))

a GeGLU MLP (gelu, tanh approximation), embeddings scaled by sqrt(hidden),
scores scaled by query_pre_attn_scalar^-1/2, and two kinds of layers
(`layer_types`): sliding-window layers with RoPE base rope_local_base_freq and
full layers with rope_theta (and rope_scaling, if set). RoPE is applied in the
graph (the cache has one base); the window is the cache's per-layer sliding kind
on CPU (DecoderLM.layer_kinds), a cap on the context elsewhere (compiler.build).
Gemma's norms scale by (1 + w): the +1 is folded into the weights at conversion time.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...errors import UnsupportedModelError
from . import register
from .layers import RMSNorm, nn, op, rope_inv_freq
from .llama import LlamaMLP
from .qwen3 import Qwen3Attention, Qwen3ForCausalLM


class Gemma3Attention(Qwen3Attention):
    def __init__(self, c, dtype: str, sliding: bool):
        super().__init__(c, dtype)
        scaling = dict(c.rope_scaling or {})
        factor = scaling["factor"] if scaling and not sliding else None  # linear scaling: full layers only
        self.inv_freq = rope_inv_freq(c.rope_local_theta if sliding else c.rope_theta, c.head_dim, factor)
        self.sm_scale = float(c.extra.get("query_pre_attn_scalar", c.head_dim)) ** -0.5


class GemmaMLP(LlamaMLP):
    def act(self, gate):
        return op.gelu(gate, approximate="tanh")


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, c, dtype: str, sliding: bool):
        eps = c.rms_norm_eps
        self.attn_norm = RMSNorm(c.hidden_size, eps, dtype)
        self.attn = Gemma3Attention(c, dtype, sliding)
        self.post_attn_norm = RMSNorm(c.hidden_size, eps, dtype)
        self.ffn_norm = RMSNorm(c.hidden_size, eps, dtype)
        self.mlp = GemmaMLP(c, dtype)
        self.post_ffn_norm = RMSNorm(c.hidden_size, eps, dtype)

    def forward(self, x, kv_cache, layer_id: int):
        h = x + self.post_attn_norm(self.attn(self.attn_norm(x), kv_cache, layer_id))
        return h + self.post_ffn_norm(self.mlp(self.ffn_norm(h)))


@register("Gemma3ForCausalLM")
class Gemma3ForCausalLM(Qwen3ForCausalLM):
    rope_in_graph = True

    def make_layer(self, config, dtype, i: int):
        return Gemma3DecoderLayer(config, dtype, sliding=config.layer_types[i] == "sliding_attention")

    def embed(self, input_ids):
        # transformers multiplies by sqrt(hidden) rounded to the embedding's dtype
        scale = float(np.asarray(self.config.hidden_size**0.5, np.float32).astype(_np_dtype(self.dtype)))
        return super().embed(input_ids) * scale

    @classmethod
    def adapt_config(cls, config):
        x = config.extra
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if x.get(key) is not None:
                raise UnsupportedModelError(f"{config.architecture}: {key} is not supported yet")
        if x.get("use_bidirectional_attention"):
            raise UnsupportedModelError(f"{config.architecture}: bidirectional attention (embedding models) is not supported")
        act = x.get("hidden_activation") or x.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"{config.architecture}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
        if config.rope_scaling is not None and config.rope_scaling["rope_type"] != "linear":
            raise UnsupportedModelError(f"{config.architecture}: rope_scaling {config.rope_scaling['rope_type']!r} is not supported (linear)")
        types = config.layer_types
        if not types:  # configs older than transformers' layer_types: every sliding_window_pattern-th layer is full
            every = int(x.get("sliding_window_pattern", x.get("_sliding_window_pattern", 6)))
            types = tuple("full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(config.num_hidden_layers))
        return dataclasses.replace(config, layer_types=types, rope_local_theta=config.rope_local_theta or 10000.0,
                                   attention_bias=False, attention_out_bias=False, mlp_bias=False)

    @classmethod
    def layer_param_shapes(cls, c):
        shapes = super().layer_param_shapes(c)
        shapes.update({"post_attn_norm.weight": (c.hidden_size,), "post_ffn_norm.weight": (c.hidden_size,)})
        return shapes

    @classmethod
    def hf_layer_sources(cls, c):
        sources = super().hf_layer_sources(c)
        sources.update({"post_attn_norm.weight": ("post_attention_layernorm.weight",),
                        "ffn_norm.weight": ("pre_feedforward_layernorm.weight",),
                        "post_ffn_norm.weight": ("post_feedforward_layernorm.weight",)})
        return sources

    @classmethod
    def convert_param(cls, name, thunk):
        if not name.endswith("norm.weight"):
            return thunk
        return lambda: thunk().astype(np.float32) + np.float32(1.0)  # (1 + w), in float32 as transformers computes it


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return ml_dtypes.bfloat16
    return np.dtype(dtype)
