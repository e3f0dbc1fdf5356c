"""kiln's quantized paged KV cache, graph side (`--kv-dtype int8|fp8`).

The cache is three explicit tensors of prefill/decode instead of TVM's C++
cache object (which holds K/V in the activations' dtype only):

    kv_meta    # [1 + pages] int32: position of this call's first token, then the page table
    kv_pages   # [layers, num_pages, 2, kv_heads, page_size, head_dim]  codes
    kv_scales  # [layers, num_pages, 2, kv_heads, page_size]            float32

The runtime owns page allocation and sequence lengths (runtime/kv_cache.py,
QuantKVCache) and passes the page table each call. Per layer the graph applies RoPE to q
and k (a TE op reading the position from kv_meta), quantizes k and v into
their pages in place (`call_tir_inplace`; the updated cache is threaded from
layer to layer, so the order is data flow), then attends over the pages.
The kernels take the layer as a scalar: one function per kind serves every
layer. Layout and codec: passes/quant/kv.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..quant import KVFormat
from .cpu_isa import vector_lanes
from ...tvm_compat import compiler

_t = compiler()
nn = _t.nn
op = _t.op


@dataclass
class QuantKV:
    """What the model needs to build its graph with a quantized cache: the
    format, the page size the kernels are built for, and the kernels of the
    current target (filled on first use)."""

    fmt: KVFormat
    page_size: int
    target_kind: str  # "llvm" | "cuda"
    _funcs: dict = field(default_factory=dict, repr=False)

    def spec(self, config) -> dict:
        """The export spec of the three cache tensors."""
        c = config
        shape = [c.num_hidden_layers, "num_pages", 2, c.num_key_value_heads, self.page_size]
        return {
            "kv_cache": _t.spec.Tensor(["meta_len"], "int32"),
            "kv_pages": _t.spec.Tensor([*shape, c.head_dim], self.fmt.code_dtype),
            "kv_scales": _t.spec.Tensor(shape, "float32"),
        }

    @property
    def batch_rows(self) -> bool:
        """Kernels for decode_batch (one token of each of several sequences) exist: CPU only so far."""
        return self.target_kind == "llvm"

    def kernels(self, *, kv_heads: int, q_heads: int, head_dim: int, dtype: str, sm_scale: float, rows: bool = False):
        key = (kv_heads, q_heads, head_dim, dtype, sm_scale, rows)
        if key not in self._funcs:
            if self.target_kind == "cuda":
                from .kv_quant_cuda import kv_append_cuda, kv_attention_cuda  # noqa: PLC0415

                if rows:
                    raise NotImplementedError("decode_batch over kiln's quantized KV cache has no CUDA kernels yet")
                self._funcs[key] = (kv_append_cuda(kv_heads, head_dim, self.page_size, self.fmt, dtype),
                                    kv_attention_cuda(kv_heads, q_heads, head_dim, self.page_size, self.fmt, dtype, sm_scale))
            else:
                from .kv_quant_cpu import kv_append_cpu, kv_attention_cpu  # noqa: PLC0415

                lanes = vector_lanes(_t.Target.current())
                self._funcs[key] = (kv_append_cpu(kv_heads, head_dim, self.page_size, self.fmt, dtype, rows=rows),
                                    kv_attention_cpu(kv_heads, q_heads, head_dim, self.page_size, self.fmt, dtype, sm_scale, lanes, rows=rows))
        return self._funcs[key]

    def bind(self, meta, pages, scales, **rope) -> "QuantKVAttention":
        return QuantKVAttention(self, meta, pages, scales, **rope)


def rope_table(meta, seq_len, head_dim: int, *, rope_theta: float, rope_scale: float, rope_scaling: dict, rows: bool = False):
    """cos and sin of every (position meta[0] + i, feature) of this call:
    [2, s, head_dim] float32, computed once per forward and read by every
    layer's RoPE (TVM's frequency rules, llama3/yarn scaling included).
    rows (decode_batch): entry i is sequence i's one token, at position meta[1 + i]."""
    te, tir = _t.te, _t.tirx
    freq = _t.rope.switch_rope_freq_func(rope_scaling)

    def compute(mt):
        def body(c, i, d):
            at = mt[1 + i.astype("int32")] if rows else mt[0] + i.astype("int32")
            pos = at.astype("float32") * tir.const(rope_scale, "float32")
            cos, sin, var_map = freq(pos, d, head_dim, rope_theta, "float32")
            expr = tir.Select(c == 0, cos, sin)
            for var, value in var_map.items():
                expr = tir.Let(var, value, expr)
            return expr

        return te.compute((2, seq_len, head_dim), body, name="rope_table")

    return op.tensor_expr_op(compute, "rope_table", [meta])


def rope(x, table, name: str, rows: bool = False):
    """Rotate-half RoPE of x  # [1, s, heads, head_dim] with rope_table's cos/sin (rows: x  # [n, 1, heads,
    head_dim], table entry b for row b)."""
    te, tir = _t.te, _t.tirx

    def compute(xt, tab):
        half = int(xt.shape[3]) // 2

        def body(b, s, h, d):
            e = b if rows else s
            other = tir.if_then_else(d < half, -xt[b, s, h, d + half], xt[b, s, h, d - half]).astype("float32")
            return (tab[0, e, d] * xt[b, s, h, d].astype("float32") + tab[1, e, d] * other).astype(xt.dtype)

        return te.compute(xt.shape, body, name=name)

    return op.tensor_expr_op(compute, name, [x, table])


class QuantKVAttention:
    """Stands where TVM's cache object stands in the layers (the same
    `attention_with_fused_qkv`), for one prefill or decode call."""

    def __init__(self, qkv: QuantKV, meta, pages, scales, **rope_args):
        self.q = qkv
        self.meta, self.pages, self.scales = meta, pages, scales
        self.rope = rope_args
        self.table = None  # rope_table of this call, made by the first layer

    def attention_with_fused_qkv(self, layer_id: int, qkv, num_qo_heads: int, sm_scale: float):
        """qkv  # [1, s, q_heads + 2 kv_heads, head_dim] -> attention output  # [1, s, q_heads, head_dim];
        or decode_batch's [n, 1, ...] (one token of each of n sequences, the ragged meta)."""
        tir = _t.tirx
        b, s, fused, d = qkv.shape
        rows = not (isinstance(b, int) and b == 1)
        hk = (fused - num_qo_heads) // 2
        append, attention = self.q.kernels(kv_heads=hk, q_heads=num_qo_heads, head_dim=int(d), dtype=qkv.dtype, sm_scale=sm_scale,
                                           rows=rows)
        q, k, v = op.split(qkv, [num_qo_heads, num_qo_heads + hk], axis=2)
        if self.table is None:
            self.table = rope_table(self.meta, b if rows else s, int(d), rows=rows, **self.rope)
        q = rope(q, self.table, "rope_q", rows=rows)
        k = rope(k, self.table, "rope_k", rows=rows)
        layer = tir.IntImm("int64", layer_id)
        self.pages, self.scales = op.tensor_ir_inplace_op(
            append, "kv_append", [k, v, self.meta, self.pages, self.scales, layer], [3, 4],
            [nn.Tensor.placeholder(self.pages.shape, self.pages.dtype), nn.Tensor.placeholder(self.scales.shape, "float32")])
        return op.tensor_ir_op(attention, "kv_attention", [q, self.meta, self.pages, self.scales, layer],
                               nn.Tensor.placeholder((b, s, num_qo_heads, d), qkv.dtype))
