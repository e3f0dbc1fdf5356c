"""Mixture-of-experts kernels for CUDA: TIR wrappers around kernels/cuda/moe.cuh and
qmoe.cuh (the pass passes/cuda_experts.py, CudaExperts, puts them in the graph in place
of frontends/models/moe.py's TE kernels).

    topk_softmax(logits)                      -> (ids, weights)  one warp per token
    expert_gate_up_silu(x, W, ids)            -> a [T, k, F] = silu(gate) * up of the chosen experts
    expert_down(a, W, ids, weights[, r])      -> y [T, D] = sum_j weights_j W_{ids_j} a_j (+ r)
    qexpert_gate_up_silu / qexpert_down       the same over a quantized stack (q, s[, z])
    expert_route(ids)                         -> (offsets, rows, pos): a prompt's pairs grouped by expert
    expert_gemm / expert_qgemm(a, W, offsets) -> each group's rows times its expert (tensor cores)
    expert_combine(z, pos, weights)           -> y [T, D], back in token order, weighted, fp32 sums

The token count T is symbolic in each (decode: 1; decode_batch: B; a prompt: its length).
"""

from __future__ import annotations

from ...tvm_compat import compiler
from .attention_cuda import C_TYPES

_t = compiler()
T = _t.T

TOPK_WARPS = 4
NUM_WARPS = 4
GATE_UP_ROWS = 4  # outputs per block of the gate/up GEMV (ROWS gate + ROWS up rows)
DOWN_ROWS = 2  # output rows per block of the down GEMV (2 and 1: 261 tok/s, 4: 260, on Qwen3-30B-A3B; more blocks)
MAX_EXPERTS = 1024


def topk_supported(n_exp: int, k: int) -> bool:
    return 1 <= k <= n_exp <= MAX_EXPERTS


def experts_supported(K: int, dtype: str) -> bool:
    """A weight row (K values) must be whole 16-byte units."""
    return dtype in C_TYPES and K % (16 // (4 if dtype == "float32" else 2)) == 0


def topk_softmax(n_exp: int, k: int, renormalize: bool):
    fn = f"kiln::topk_softmax<{n_exp}, {k}, {'true' if renormalize else 'false'}>"

    @T.prim_func(check_well_formed=False)  # the root block (below) around thread bindings
    def kiln_topk_softmax(var_lg: T.handle, var_ids: T.handle, var_w: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})  # 8: opaque, never fused
        n = T.int64()
        lg = T.match_buffer(var_lg, (n, n_exp), "float32")
        ids = T.match_buffer(var_ids, (n, k), "int32")
        w = T.match_buffer(var_w, (n, k), "float32")
        # a root block: relax.build asks every one-input call_tir callee whether it is a reshape
        # (RewriteDataflowReshape), and that analysis needs one
        with T.sblock("root"):
            for bx in T.thread_binding((n + TOPK_WARPS - 1) // TOPK_WARPS, thread="blockIdx.x"):
                for tx in T.thread_binding(TOPK_WARPS * 32, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(lg[0, 0]), T.address_of(ids[0, 0]), T.address_of(w[0, 0]),
                                             T.Cast("int32", n)))

    return kiln_topk_softmax


def expert_gate_up_silu(n_exp: int, F: int, D: int, k: int, dtype: str):
    fn = f"kiln::expert_gate_up_silu<{C_TYPES[dtype]}, {D}, {k}, {NUM_WARPS}, {GATE_UP_ROWS}>"
    nb = (F + GATE_UP_ROWS - 1) // GATE_UP_ROWS

    @T.prim_func
    def kiln_expert_gate_up_silu(var_x: T.handle, w: T.Buffer((n_exp, 2 * F, D), dtype), var_ids: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(var_x, (n, D), dtype)
        ids = T.match_buffer(var_ids, (n, k), "int32")
        y = T.match_buffer(var_y, (n, k, F), dtype)
        for by in T.thread_binding(n * k, thread="blockIdx.y"):
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0]), T.address_of(w[0, 0, 0]), T.address_of(ids[0, 0]),
                                             T.address_of(y[0, 0, 0]), F, n_exp))

    return kiln_expert_gate_up_silu


def expert_down(n_exp: int, D: int, F: int, k: int, dtype: str, residual: bool = False):
    fn = f"kiln::expert_down<{C_TYPES[dtype]}, {F}, {k}, {NUM_WARPS}, {DOWN_ROWS}, {'true' if residual else 'false'}>"
    nb = (D + DOWN_ROWS - 1) // DOWN_ROWS

    @T.macro
    def launch(a, w, ids, wts, r, y, n):
        for by in T.thread_binding(n, thread="blockIdx.y"):
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0, 0]), T.address_of(w[0, 0, 0]), T.address_of(ids[0, 0]),
                                             T.address_of(wts[0, 0]), T.address_of(r[0, 0]), T.address_of(y[0, 0]), D, n_exp))

    if residual:
        @T.prim_func
        def kiln_expert_down_residual(var_a: T.handle, w: T.Buffer((n_exp, D, F), dtype), var_ids: T.handle, var_wts: T.handle,
                                      var_r: T.handle, var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            n = T.int64()
            a = T.match_buffer(var_a, (n, k, F), dtype)
            ids = T.match_buffer(var_ids, (n, k), "int32")
            wts = T.match_buffer(var_wts, (n, k), "float32")
            r = T.match_buffer(var_r, (n, D), dtype)
            y = T.match_buffer(var_y, (n, D), dtype)
            launch(a, w, ids, wts, r, y, n)

        return kiln_expert_down_residual

    @T.prim_func
    def kiln_expert_down(var_a: T.handle, w: T.Buffer((n_exp, D, F), dtype), var_ids: T.handle, var_wts: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        a = T.match_buffer(var_a, (n, k, F), dtype)
        ids = T.match_buffer(var_ids, (n, k), "int32")
        wts = T.match_buffer(var_wts, (n, k), "float32")
        y = T.match_buffer(var_y, (n, D), dtype)
        launch(a, w, ids, wts, y, y, n)

    return kiln_expert_down


# --- prompts: group by expert, tensor-core GEMM per group --------------------------------
def grouped_supported(n_exp: int, D: int, F: int, dtype: str) -> bool:
    """gemm.cuh's tiles: 16-bit, K a multiple of 32 (both GEMMs); the counts fit in shared memory."""
    return dtype in ("bfloat16", "float16") and D % 32 == 0 and F % 32 == 0 and n_exp <= MAX_EXPERTS


def expert_route(n_exp: int, k: int):
    """ids [n, k] -> offsets [E + 1], rows [n k], pos [n k] (moe.cuh expert_route)."""
    fn = f"kiln::expert_route<{n_exp}, {k}>"

    @T.prim_func(check_well_formed=False)  # a root block: see topk_softmax
    def kiln_expert_route(var_ids: T.handle, offsets: T.Buffer((n_exp + 1,), "int32"), var_rows: T.handle, var_pos: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        m = T.int64()
        ids = T.match_buffer(var_ids, (n, k), "int32")
        rows = T.match_buffer(var_rows, (m,), "int32")
        pos = T.match_buffer(var_pos, (m,), "int32")
        with T.sblock("root"):
            for bx in T.thread_binding(1, thread="blockIdx.x"):
                for tx in T.thread_binding(1024, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(ids[0, 0]), T.address_of(offsets[0]), T.address_of(rows[0]),
                                             T.address_of(pos[0]), T.Cast("int32", n)))

    return kiln_expert_route


def expert_gemm(n_exp: int, N: int, K: int, k: int, dtype: str, wgmma: bool = False):
    """a [m, K] (rows grouped by expert; m = tokens x k), W [E, N, K], offsets [E + 1] -> c [m, N].
    wgmma (an artifact for sm_90 alone, K % 64 == 0): the tile on Hopper's warpgroup MMA."""
    from .gemm_cuda import BM, BN, SMEM_BYTES, THREADS, WG_SMEM_BYTES  # noqa: PLC0415  (gemm.cuh's tile)

    wg = wgmma and K % 64 == 0
    fn = f"kiln::expert_gemm<{C_TYPES[dtype]}, {'true' if wg else 'false'}>"
    smem_bytes = WG_SMEM_BYTES if wg else SMEM_BYTES

    @T.prim_func
    def kiln_expert_gemm(var_a: T.handle, w: T.Buffer((n_exp, N, K), dtype), offsets: T.Buffer((n_exp + 1,), "int32"), var_c: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        a = T.match_buffer(var_a, (m, K), dtype)
        c = T.match_buffer(var_c, (m, N), dtype)
        for bz in T.thread_binding(n_exp, thread="blockIdx.z"):
            for by in T.thread_binding((m // k + BM - 1) // BM, thread="blockIdx.y"):  # a group holds at most one row per token
                for bx in T.thread_binding((N + BN - 1) // BN, thread="blockIdx.x"):
                    for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                        smem = T.alloc_buffer((smem_bytes,), "uint8", scope="shared.dyn")
                        T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0]), T.address_of(w[0, 0, 0]), T.address_of(offsets[0]),
                                                 T.address_of(c[0, 0]), N, K, smem.access_ptr("rw")))

    return kiln_expert_gemm


def expert_combine(D: int, k: int, dtype: str):
    """z [m, D] (grouped), pos [m], weights [n, k] fp32 -> y [n, D] = sum_j w_j z[pos[t k + j]]."""
    fn = f"kiln::expert_combine<{C_TYPES[dtype]}, {D}, {k}>"

    @T.prim_func
    def kiln_expert_combine(var_z: T.handle, var_pos: T.handle, var_w: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        m = T.int64()
        z = T.match_buffer(var_z, (m, D), dtype)
        pos = T.match_buffer(var_pos, (m,), "int32")
        w = T.match_buffer(var_w, (n, k), "float32")
        y = T.match_buffer(var_y, (n, D), dtype)
        for bx in T.thread_binding(n, thread="blockIdx.x"):
            for tx in T.thread_binding(128, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(z[0, 0]), T.address_of(pos[0]), T.address_of(w[0, 0]),
                                         T.address_of(y[0, 0])))

    return kiln_expert_combine


# --- quantized expert stacks (kernels/cuda/qmoe.cuh; code kinds as qgemv: "4", "8", "f8") -------
def q_experts_supported(K: int, group: int, code: str, dtype: str) -> bool:
    from .gemv_cuda import qgemv_supported  # noqa: PLC0415  (the same 16-byte units inside groups)

    return qgemv_supported(K, group, code, dtype)


def _q_arrays(code: str, n_exp: int, N: int, K: int, group: int):
    """(codes, scales, minima) buffer (shape, dtype) of a stack [E, N, K] in code kind `code`. Formats
    without minima take their scales again in the minima's place (the kernels never read them):
    one signature serves every format, and passes/cuda_experts.py passes (q, s, s) for them."""
    if code == "4":
        return ((n_exp, N, K // 8), "uint32"), ((n_exp, N, K // group), "float16"), ((n_exp, N, K // group), "float16")
    scales = ((n_exp, N, K // group), "float16") if code == "8" else ((n_exp, N, 1), "float32")  # f8: one fp32 scale per row
    return ((n_exp, N, K), "int8" if code == "8" else "uint8"), scales, scales


def qexpert_gate_up_silu(n_exp: int, F: int, D: int, k: int, dtype: str, code: str, group: int):
    from .gemv_cuda import QGEMV_CODES  # noqa: PLC0415

    fn = f"kiln::qexpert_gate_up_silu<{C_TYPES[dtype]}, {QGEMV_CODES[code]}, {D}, {group}, {k}, {NUM_WARPS}, {GATE_UP_ROWS}>"
    nb = (F + GATE_UP_ROWS - 1) // GATE_UP_ROWS
    (qs, qd), (ss, sd), (zs, zd) = _q_arrays(code, n_exp, 2 * F, D, group)

    @T.prim_func
    def kiln_qexpert_gate_up_silu(var_x: T.handle, q: T.Buffer(qs, qd), s: T.Buffer(ss, sd), z: T.Buffer(zs, zd), var_ids: T.handle,
                                  var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(var_x, (n, D), dtype)
        ids = T.match_buffer(var_ids, (n, k), "int32")
        y = T.match_buffer(var_y, (n, k, F), dtype)
        for by in T.thread_binding(n * k, thread="blockIdx.y"):
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(x[0, 0]), T.address_of(q[0, 0, 0]), T.address_of(s[0, 0, 0]),
                                             T.address_of(z[0, 0, 0]), T.address_of(ids[0, 0]), T.address_of(y[0, 0, 0]), F, n_exp))

    return kiln_qexpert_gate_up_silu


def qexpert_down(n_exp: int, D: int, F: int, k: int, dtype: str, code: str, group: int, residual: bool = False):
    from .gemv_cuda import QGEMV_CODES  # noqa: PLC0415

    fn = (f"kiln::qexpert_down<{C_TYPES[dtype]}, {QGEMV_CODES[code]}, {F}, {group}, {k}, {NUM_WARPS}, {DOWN_ROWS}, "
          f"{'true' if residual else 'false'}>")
    nb = (D + DOWN_ROWS - 1) // DOWN_ROWS
    (qs, qd), (ss, sd), (zs, zd) = _q_arrays(code, n_exp, D, F, group)

    @T.macro
    def launch(a, q, s, z, ids, wts, r, y, n):
        for by in T.thread_binding(n, thread="blockIdx.y"):
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(NUM_WARPS * 32, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0, 0]), T.address_of(q[0, 0, 0]), T.address_of(s[0, 0, 0]),
                                             T.address_of(z[0, 0, 0]), T.address_of(ids[0, 0]), T.address_of(wts[0, 0]),
                                             T.address_of(r[0, 0]), T.address_of(y[0, 0]), D, n_exp))

    if residual:
        @T.prim_func
        def kiln_qexpert_down_residual(var_a: T.handle, q: T.Buffer(qs, qd), s: T.Buffer(ss, sd), z: T.Buffer(zs, zd),
                                       var_ids: T.handle, var_wts: T.handle, var_r: T.handle, var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            n = T.int64()
            a = T.match_buffer(var_a, (n, k, F), dtype)
            ids = T.match_buffer(var_ids, (n, k), "int32")
            wts = T.match_buffer(var_wts, (n, k), "float32")
            r = T.match_buffer(var_r, (n, D), dtype)
            y = T.match_buffer(var_y, (n, D), dtype)
            launch(a, q, s, z, ids, wts, r, y, n)

        return kiln_qexpert_down_residual

    @T.prim_func
    def kiln_qexpert_down(var_a: T.handle, q: T.Buffer(qs, qd), s: T.Buffer(ss, sd), z: T.Buffer(zs, zd), var_ids: T.handle,
                          var_wts: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        a = T.match_buffer(var_a, (n, k, F), dtype)
        ids = T.match_buffer(var_ids, (n, k), "int32")
        wts = T.match_buffer(var_wts, (n, k), "float32")
        y = T.match_buffer(var_y, (n, D), dtype)
        launch(a, q, s, z, ids, wts, y, y, n)

    return kiln_qexpert_down


def grouped_q_supported(n_exp: int, K: int, group: int, code: str, dtype: str) -> bool:
    from .gemm_cuda import qgemm_supported  # noqa: PLC0415  (gemm.cuh's quantized tile)

    return n_exp <= MAX_EXPERTS and qgemm_supported(K, group, code, dtype)


def expert_qgemm(n_exp: int, N: int, K: int, k: int, dtype: str, code: str, group: int, wgmma: bool = False):
    """As expert_gemm over a quantized stack [E, N, K] (the format's arrays q, s, z: see _q_arrays)."""
    from .gemm_cuda import BM, BN, QSMEM_BYTES, THREADS, WG_SMEM_BYTES  # noqa: PLC0415
    from .gemv_cuda import QGEMV_CODES  # noqa: PLC0415

    wg = wgmma and K % 64 == 0
    fn = f"kiln::expert_qgemm<{C_TYPES[dtype]}, {QGEMV_CODES[code]}, {group}, {'true' if wg else 'false'}>"
    smem_bytes = WG_SMEM_BYTES if wg else QSMEM_BYTES
    (qs, qd), (ss, sd), (zs, zd) = _q_arrays(code, n_exp, N, K, group)

    @T.prim_func
    def kiln_expert_qgemm(var_a: T.handle, q: T.Buffer(qs, qd), s: T.Buffer(ss, sd), z: T.Buffer(zs, zd),
                          offsets: T.Buffer((n_exp + 1,), "int32"), var_c: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        m = T.int64()
        a = T.match_buffer(var_a, (m, K), dtype)
        c = T.match_buffer(var_c, (m, N), dtype)
        for bz in T.thread_binding(n_exp, thread="blockIdx.z"):
            for by in T.thread_binding((m // k + BM - 1) // BM, thread="blockIdx.y"):
                for bx in T.thread_binding((N + BN - 1) // BN, thread="blockIdx.x"):
                    for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                        smem = T.alloc_buffer((smem_bytes,), "uint8", scope="shared.dyn")
                        T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0]), T.address_of(q[0, 0, 0]), T.address_of(s[0, 0, 0]),
                                                 T.address_of(z[0, 0, 0]), T.address_of(offsets[0]), T.address_of(c[0, 0]), N, K,
                                                 smem.access_ptr("rw")))

    return kiln_expert_qgemm
