"""Llama (2, 3, 3.1/3.2 with llama3 rope scaling, tied or untied embeddings;
`attention_bias` puts a bias on q, k, v and o, `mlp_bias` on gate, up and down).

The reference decoder the other families specialise:
    h   = x + attn(attn_norm(x))
    out = h + mlp(ffn_norm(h))
with grouped-query attention over a paged KV cache (RoPE applied on append)
and a SwiGLU MLP. QKV and gate/up projections are single matmuls: their
weights were concatenated at conversion time.
"""

from __future__ import annotations

from . import register
from .decoder import DecoderLM
from .layers import Linear, RMSNorm, all_reduce, nn, op, rope


class LlamaAttention(nn.Module):
    def __init__(self, c, dtype: str):
        self.c = c
        self.qkv_proj = Linear(c.hidden_size, c.q_size + 2 * c.kv_size, dtype, bias=c.attention_bias, role="qkv_proj")
        self.o_proj = Linear(c.q_size, c.hidden_size, dtype, bias=c.attention_out_bias, role="o_proj")
        self.sm_scale = c.head_dim**-0.5
        # RoPE in the graph (layers.rope) where a family sets these -- Gemma 3's per-layer bases,
        # LongRoPE -- with the cache's own RoPE off (DecoderLM.rope_in_graph); None: the cache's
        self.inv_freq, self.mscale = None, 1.0

    def qkv(self, x):
        """x [b, s, hidden] -> qkv [b, s, q_heads + 2 * kv_heads, head_dim]."""
        c = self.c
        b, s, _ = x.shape
        heads = c.num_attention_heads + 2 * c.num_key_value_heads
        return op.reshape(self.qkv_proj(x), (b, s, heads, c.head_dim))

    def rotate(self, qkv, positions):
        """qkv with q and k rotated at positions  # [b * s] int32 (the cache's query positions)."""
        c = self.c
        q, k, v = op.split(qkv, [c.num_attention_heads, c.num_attention_heads + c.num_key_value_heads], axis=2)
        q, k = (rope(t, positions, self.inv_freq, self.mscale, name=f"rope_{n}") for t, n in ((q, "q"), (k, "k")))
        return op.concat([q, k, v], dim=2)

    def forward(self, x, kv_cache, layer_id: int):
        c = self.c
        b, s, _ = x.shape
        qkv = self.qkv(x)
        if self.inv_freq is not None:
            qkv = self.rotate(qkv, kv_cache.get_query_positions(b * s))
        attn = kv_cache.attention_with_fused_qkv(layer_id, qkv, c.num_attention_heads, sm_scale=self.sm_scale)
        return all_reduce(self.o_proj(op.reshape(attn, (b, s, c.q_size))), c.tensor_parallel)  # heads are split over shards


class LlamaMLP(nn.Module):
    def __init__(self, c, dtype: str):
        self.inter = c.intermediate_size
        self.shards = c.tensor_parallel
        self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size, dtype, bias=c.mlp_bias, role="gate_up_proj")
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, dtype, bias=c.mlp_bias, role="down_proj")

    def act(self, gate):
        return op.silu(gate)  # SwiGLU (Gemma: GeGLU)

    def forward(self, x):
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return all_reduce(self.down_proj(self.act(gate) * up), self.shards)  # FFN columns are split over shards


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, c, dtype: str):
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.attn = self.attention_cls(c, dtype)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(c, dtype)

    def forward(self, x, kv_cache, layer_id: int):
        h = x + self.attn(self.attn_norm(x), kv_cache, layer_id)
        return h + self.mlp(self.ffn_norm(h))


@register("LlamaForCausalLM")
class LlamaForCausalLM(DecoderLM):
    layer_cls = LlamaDecoderLayer
