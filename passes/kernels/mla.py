"""kiln's latent KV cache for multi-head latent attention (DeepSeek-V2/V3), graph side.

Like the quantized cache (kv_quant.py) it is three explicit tensors of
prefill/decode, with one latent row per token per layer instead of per-head K and V:

    kv_meta    # [1 + pages] int32: position of this call's first token, then the page table
    kv_pages   # [layers, num_pages, page_size, kv_lora_rank + qk_rope_head_dim]  codes
    kv_scales  # [layers, num_pages, page_size]                                   float32

The runtime owns pages and lengths (runtime/kv_cache.py QuantKVCache, with the
latent layout); the layers call `latent_attention`, which appends the call's rows
in place (`call_tir_inplace`, the cache threaded from layer to layer) and attends
over the pages in the latent space. Kernels: mla_cpu.py (CPU), mla_cuda.py (CUDA v1,
CUDA cores, rows in the activations' dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import CompileError
from ..quant import KVFormat
from .cpu_isa import vector_lanes
from ...tvm_compat import compiler

_t = compiler()
nn = _t.nn
op = _t.op


def latent_width(config) -> int:
    """Columns of one cached row: the compressed KV (kv_lora_rank) and the shared rotated key."""
    return config.kv_lora_rank + config.qk_rope_head_dim


def latent_format(fmt: KVFormat | None, compute: str) -> KVFormat:
    """The latent cache's format: --kv-dtype's, or rows as they are in the activations' dtype."""
    return fmt if fmt is not None else KVFormat(compute, compute, 0.0)


@dataclass
class LatentKV:
    """The latent cache of one build: its format (a float format of the activations'
    dtype, or --kv-dtype's), the page size the kernels are built for, the target kind."""

    fmt: KVFormat
    page_size: int
    target_kind: str  # "llvm" | "cuda"
    _funcs: dict = field(default_factory=dict, repr=False)

    def spec(self, config) -> dict:
        shape = [config.num_hidden_layers, "num_pages", self.page_size]
        return {
            "kv_cache": _t.spec.Tensor(["meta_len"], "int32"),
            "kv_pages": _t.spec.Tensor([*shape, latent_width(config)], self.fmt.code_dtype),
            "kv_scales": _t.spec.Tensor(shape, "float32"),
        }

    def kernels(self, *, q_heads: int, width: int, v_dim: int, dtype: str, sm_scale: float):
        key = (q_heads, width, v_dim, dtype, sm_scale)
        if key not in self._funcs:
            if self.target_kind == "cuda":
                if self.fmt.code_dtype != dtype:
                    raise CompileError(f"a {self.fmt.name} latent KV cache is CPU-only for now; on CUDA the latent rows have the activations' dtype")
                from .mla_cuda import mla_append_cuda, mla_attention_cuda  # noqa: PLC0415

                self._funcs[key] = (mla_append_cuda(width, self.page_size, dtype),
                                    mla_attention_cuda(q_heads, width, v_dim, self.page_size, dtype, sm_scale))
            else:
                from .mla_cpu import mla_append_cpu, mla_attention_cpu  # noqa: PLC0415

                lanes = vector_lanes(_t.Target.current())
                self._funcs[key] = (mla_append_cpu(width, self.page_size, self.fmt, dtype),
                                    mla_attention_cpu(q_heads, width, v_dim, self.page_size, self.fmt, dtype, sm_scale, lanes))
        return self._funcs[key]

    def head_matmul(self, x, w, transposed: bool):
        """x  # [b, s, heads, k] times each head's matrix of w  # [heads, k, n] (transposed: [heads, n, k])
        -> [b, s, heads, n] in x's dtype: MLA's W_UK absorbed into the query, W_UV after attention.
        kiln's kernels on both targets (mla_cpu.py, cuda/mla.cuh): Relax's batched matmul was left
        unscheduled on CPU (8x under bandwidth) and dlight's GEMV rule asserts on it on CUDA."""
        b, s, heads, k = x.shape
        n = int(w.shape[1] if transposed else w.shape[2])
        key = ("head_matmul", int(heads), int(k), n, transposed, x.dtype, w.dtype)
        name = "mla_expand_v" if transposed else "mla_absorb_q"
        if key not in self._funcs:  # one PrimFunc per shape, shared by the layers
            if self.target_kind == "cuda":
                from .mla_cuda import head_matmul_cuda  # noqa: PLC0415

                fn = head_matmul_cuda(int(heads), int(k), n, transposed, x.dtype, w.dtype)
            else:
                from .mla_cpu import head_matmul_cpu  # noqa: PLC0415

                fn = head_matmul_cpu(int(heads), int(k), n, transposed, x.dtype, w.dtype, vector_lanes(_t.Target.current()))
            self._funcs[key] = fn.with_attr("global_symbol", name)
        return op.tensor_ir_op(self._funcs[key], name, [x, w], nn.Tensor.placeholder((b, s, heads, n), x.dtype))

    def bind(self, meta, pages, scales, **_rope) -> "LatentAttention":
        return LatentAttention(self, meta, pages, scales)


class LatentAttention:
    """What the MLA layers call in place of TVM's cache object, for one prefill or decode call."""

    def __init__(self, kv: LatentKV, meta, pages, scales):
        self.kv = kv
        self.meta, self.pages, self.scales = meta, pages, scales
        self._positions = None

    def get_query_positions(self, n):
        """Positions of this call's n tokens  # [n] int32: meta[0] + i (one op per call, shared by the layers)."""
        if self._positions is None:
            te = _t.te

            def compute(mt):
                return te.compute((n,), lambda i: mt[0] + i.astype("int32"), name="positions")

            self._positions = op.tensor_expr_op(compute, "query_positions", [self.meta])
        return self._positions

    def head_matmul(self, x, w, transposed: bool):
        return self.kv.head_matmul(x, w, transposed)

    def latent_attention(self, layer_id: int, q, latent, sm_scale: float, v_dim: int):
        """q  # [1, s, heads, W] absorbed query, latent  # [1, s, W] this call's rows
        -> softmax(q . rows * sm_scale) @ rows[:, :v_dim]  # [1, s, heads, v_dim], rows
        being every cached row up to each token's position (this call's appended first)."""
        b, s, heads, width = q.shape
        append, attention = self.kv.kernels(q_heads=int(heads), width=int(width), v_dim=v_dim, dtype=q.dtype, sm_scale=sm_scale)
        layer = _t.tirx.IntImm("int64", layer_id)
        self.pages, self.scales = op.tensor_ir_inplace_op(
            append, "mla_append", [latent, self.meta, self.pages, self.scales, layer], [2, 3],
            [nn.Tensor.placeholder(self.pages.shape, self.pages.dtype), nn.Tensor.placeholder(self.scales.shape, "float32")])
        return op.tensor_ir_op(attention, "mla_attention", [q, self.meta, self.pages, self.scales, layer],
                               nn.Tensor.placeholder((b, s, heads, v_dim), q.dtype))
