"""The paged KV cache objects of kiln artifacts, CPU and CUDA.

The cache itself (page allocation, sequence bookkeeping, RoPE on append) is
TVM's C++ `PagedAttentionKVCache` in the runtime library: only the kernels it
calls are compiled into the artifact. These build the same argument list as
TVM's `TIRPagedKVCache` with some kernels swapped for kiln's:
  CPU:  decode and ragged prefill attention (attention_cpu.py); the rarely hot
        ones (prefill against earlier pages when a prompt is longer than one
        prefill chunk, tree attention, sliding window, page copies) stay TVM's.
  CUDA: split-KV decode attention and tensor-core ragged prefill attention
        (attention_cuda.py); the rest is TVM's GPU kernels.
"""

from __future__ import annotations

from .cpu_isa import vector_lanes
from ...tvm_compat import compiler
from ...errors import CompileError
from .attention_cpu import paged_decode_attention_cpu, ragged_prefill_attention_cpu
from .attention_window_cpu import paged_prefill_window_attention_cpu
from .rope_cpu import rope_split_cpu, rope_supported
from .attention_cuda import cuda_decode_supported, paged_decode_attention_cuda, ragged_prefill_attention_cuda, ragged_prefill_supported

_t = compiler()
_kv = _t.kv_cache
rx = _t.relax
nn = _t.nn


class _KilnPagedKVCache(_kv.PagedKVCache):  # pylint: disable=too-few-public-methods
    """TVM's C++ paged KV cache (MHA, RoPE applied on append) with the kernel
    table built here. The slots every target shares are filled in __init__;
    `_kernels` (per target) fills the rest."""

    def __init__(self, *, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window,
                 num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int, head_dim: int,
                 rope_scale: float, rope_theta: float, rope_scaling: dict, dtype: str, target, name: str = "paged_kv_cache",
                 kernel_page_size: int = 16, rope_mode=_kv.RopeMode.NORMAL, layer_kinds=None, window: int = 1024):
        # page_size is a runtime shape (the runtime passes the manifest's); kiln's decode
        # kernels are specialised for the compile-time page size the manifest records
        bb = rx.BlockBuilder.current()
        h_kv, h_q, d = num_key_value_heads, num_attention_heads, head_dim
        rope_scaling = _kv._prepare_yarn_rope_scaling(rope_scaling, rope_theta)

        def tir(fn, name_):
            return rx.Tuple([_t.tvm.ir.StringImm("tirx"), bb.add_func(fn, name_)])

        k = self._kernels(bb, tir, h_kv=h_kv, h_q=h_q, d=d, dtype=dtype, rope_scaling=rope_scaling, target=target,
                          page_size=kernel_page_size)
        # layer_kinds ("mha" | "mha_sliding" per layer): sliding layers attend to their last `window`
        # tokens through the two sliding slots (CPU only: attention_window_cpu.py, docs/DESIGN.md)
        kinds = [_kv.AttnKind.MHA_SLIDING if kind == "mha_sliding" else _kv.AttnKind.MHA for kind in layer_kinds or ["mha"] * num_hidden_layers]
        sliding = _kv.AttnKind.MHA_SLIDING in kinds
        if sliding:
            k.update(self._window_kernels(bb, tir, h_kv=h_kv, h_q=h_q, d=d, dtype=dtype, rope_scaling=rope_scaling,
                                          page_size=kernel_page_size, window=window))
        args = [
            rx.ShapeExpr([max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window, window]),
            rx.ShapeExpr([0, num_hidden_layers]),
            rx.prim_value(h_q),
            rx.prim_value(h_kv),
            rx.prim_value(d),
            rx.prim_value(d),
            rx.ShapeExpr([int(kind) for kind in kinds]),
            rx.prim_value(False),  # disaggregation
            rx.prim_value(int(rope_mode)),  # NONE: the layers apply RoPE themselves
            rx.prim_value(rope_scale),
            rx.prim_value(rope_theta),
            rx.prim_value(0),  # rope_ext_factors
            rx.op.zeros((), dtype),
            bb.add_func(_kv._kv_cache_transpose_append(h_kv, d, dtype, page_size=kernel_page_size), "kv_cache_transpose_append"),
            bb.add_func(_kv._kv_cache_transpose_append_mla(d, dtype, page_size=kernel_page_size), "kv_cache_transpose_append_mla"),
            k["ragged_prefill"],
            k["paged_prefill"],
            k["decode"],
            k["prefill_sliding"] if sliding else rx.Tuple([]),  # sliding-window layers' prefill against earlier pages
            k["decode_sliding"] if sliding else rx.Tuple([]),  # and decode
            k["tree_paged"],
            k["tree"],
            rx.Tuple([]),  # MLA prefill
            rx.Tuple([k["merge_state"]]),
            bb.add_func(self._rope_kernel(rope_theta, rope_scale, d, h_q, h_kv, dtype, rope_scaling), "tir_split_rotary"),
            k["copy_page"],
            bb.add_func(_kv._kv_cache_debug_get_kv(num_hidden_layers, h_kv, d, dtype), "kv_cache_debug_get_kv"),
            k["compact_copy"],
        ]
        super().__init__(_expr=rx.call_pure_packed("vm.builtin.paged_attention_kv_cache_create", *args, ty_args=rx.AnyType()), _name=name)

    def _kernels(self, bb, tir, *, h_kv, h_q, d, dtype, rope_scaling, target, page_size) -> dict:
        raise NotImplementedError

    def _rope_kernel(self, theta, scale, d, h_q, h_kv, dtype, rope_scaling):
        """The RoPE-on-append kernel (split fused qkv, rotate q and k): TVM's."""
        return _kv.llama_rope_with_position_map(theta, scale, d, h_q, h_kv, dtype, rope_scaling, d)

    def _window_kernels(self, bb, tir, *, h_kv, h_q, d, dtype, rope_scaling, page_size, window) -> dict:
        raise CompileError("sliding-window attention kernels exist for CPU targets only")


class CpuPagedKVCache(_KilnPagedKVCache):  # pylint: disable=too-few-public-methods
    """kiln's CPU decode and ragged prefill attention; TVM's CPU kernels for the rest."""

    def _kernels(self, bb, tir, *, h_kv, h_q, d, dtype, rope_scaling, target, page_size) -> dict:
        lanes = vector_lanes(target)
        return {
            "ragged_prefill": tir(ragged_prefill_attention_cpu(h_kv, h_q, d, dtype, lanes), "ragged_prefill_attention_cpu"),
            "paged_prefill": tir(_kv._attention_prefill_cpu(h_kv, h_q, d, dtype, False, rope_scaling, page_size=page_size), "tir_attention_prefill_cpu"),
            "decode": tir(paged_decode_attention_cpu(h_kv, h_q, d, dtype, lanes, page_size=page_size), "paged_decode_attention_cpu"),
            # Tree attention (speculative decoding) is not offered: empty slots,
            # as TVM does for MLA. Its TVM CPU kernel, merely present in the
            # library, made the prefill GEMMs 2.5x slower (73 -> 29 GFLOP/s,
            # found by bisecting the module's functions).
            "tree_paged": rx.Tuple([]),
            "tree": rx.Tuple([]),
            "merge_state": bb.add_func(_kv._merge_state_inplace_cpu(dtype), "tir_attention_merge_state_cpu"),
            "copy_page": bb.add_func(_kv._copy_single_page_cpu(h_kv, page_size, d, dtype), "kv_cache_copy_single_page_cpu"),
            "compact_copy": bb.add_func(_kv._compact_kv_copy_cpu(h_kv, d, dtype, page_size=page_size), "kv_cache_compact_kv_copy_cpu"),
        }


    def _rope_kernel(self, theta, scale, d, h_q, h_kv, dtype, rope_scaling):
        # cos / sin once per (token, dimension) for all heads (rope_cpu.py); gptj / longrope: TVM's
        if rope_supported(rope_scaling):
            return rope_split_cpu(theta, scale, d, h_q, h_kv, dtype, rope_scaling, d)
        return super()._rope_kernel(theta, scale, d, h_q, h_kv, dtype, rope_scaling)

    def _window_kernels(self, bb, tir, *, h_kv, h_q, d, dtype, rope_scaling, page_size, window) -> dict:
        # TVM's sliding decode is right (its window comes from the cache's page lists); its paged
        # prefill writes NaN once a chunk starts past the window: kiln's (attention_window_cpu.py)
        return {
            "prefill_sliding": tir(paged_prefill_window_attention_cpu(h_kv, h_q, d, dtype, window, page_size), "paged_prefill_window_attention_cpu"),
            "decode_sliding": tir(_kv._attention_decode_cpu(h_kv, h_q, d, dtype, True, rope_scaling, page_size=page_size), "tir_attention_decode_cpu_sliding_window"),
        }


class CudaPagedKVCache(_KilnPagedKVCache):  # pylint: disable=too-few-public-methods
    """kiln's split-KV decode and tensor-core ragged prefill attention where they
    apply (head dims, dtypes); TVM's GPU kernels for the rest."""

    def _kernels(self, bb, tir, *, h_kv, h_q, d, dtype, rope_scaling, target, page_size) -> dict:
        if cuda_decode_supported(d, dtype):
            decode = tir(paged_decode_attention_cuda(h_kv, h_q, d, dtype, page_size=page_size), "kiln_paged_decode_attention")
        else:  # head dims the split-KV kernel's lane mapping does not cover (e.g. 80, 96): TVM's kernel
            decode = tir(_kv._attention_decode(h_kv, h_q, d, dtype, False, rope_scaling, target, page_size=page_size), "tir_attention_decode")
        if ragged_prefill_supported(d, dtype):
            ragged = tir(ragged_prefill_attention_cuda(h_kv, h_q, d, dtype), "kiln_ragged_prefill_attention")
        else:  # fp32 or other head dims: TVM's kernel
            ragged = tir(_kv._attention_prefill_ragged(h_kv, h_q, d, d, dtype, rope_scaling, target), "tir_attention_prefill_ragged")
        return {
            "ragged_prefill": ragged,
            "paged_prefill": tir(_kv._attention_prefill(h_kv, h_q, d, dtype, False, rope_scaling, target, page_size=page_size), "tir_attention_prefill"),
            "decode": decode,
            # tree attention (speculative decoding) is not offered, as on CPU: kiln never
            # calls it, and TVM's paged tree kernel is fixed to 16-token pages
            "tree_paged": rx.Tuple([]),
            "tree": rx.Tuple([]),
            "merge_state": bb.add_func(_kv._merge_state_inplace(h_q, d, dtype, target, "tir_attention_merge_state"), "tir_attention_merge_state"),
            "copy_page": bb.add_func(_kv._copy_single_page(h_kv, page_size, d, dtype, target), "kv_cache_copy_single_page"),
            "compact_copy": bb.add_func(_kv._compact_kv_copy(h_kv, d, dtype, target, page_size=page_size), "kv_cache_compact_kv_copy"),
        }
