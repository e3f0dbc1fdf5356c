"""Prefill GEMM on tensor cores for CUDA: TIR wrappers around
kernels/cuda/gemm.cuh (the pass passes/cuda_projections.py, CudaProjections, puts them
in the prefill graph in place of kiln's NT_matmul kernels).

    gemm(a, W)         a  # [1, M, K] (the prompt chunk) or [M, 1, K] (decode_batch: one token of
                       each of M sequences) -- M contiguous rows either way; W  # [N, K] -> like a, N wide
    gemm_residual(a, W, r)  -> r + a @ W^T
    gemm_rows(a, W[, r])    decode_batch's a  # [B, 1, K]: kernels/cuda/gemm_rows.cuh (the weight
                            on the MMA's 16-row side), out in the weights' dtype or fp32 (the
                            LM head); three kernels by B

Why: TVM 0.27's dlight Matmul rule tensorizes only fp16 (and that segfaults on
Llama-3-8B shapes), so bf16 prefill GEMMs ran on CUDA cores at ~29 TFLOP/s
(ncu: 1.0 s of a 1.44 s 2048-token prefill of Llama-3-8B).
"""

from __future__ import annotations

from ...tvm_compat import compiler
from .attention_cuda import C_TYPES
from .gemv_cuda import QGEMV_CODES  # code kind -> the CODE / BITS template value of both quantized kernels

_t = compiler()
T = _t.T

BM, BN = 128, 256
THREADS = 256
SMEM_BYTES = 3 * (BM + BN) * (32 + 8) * 2  # kiln::GEMM_SMEM_BYTES (3 stages)


def gemm_supported(K: int, dtype: str) -> bool:
    return dtype in ("bfloat16", "float16") and K % 32 == 0


WG_SMEM_BYTES = 4 * (BM + BN) * 64 * 2 + 1024  # kiln::GEMM_WG_SMEM_BYTES (gemm_wg.cuh: 4 stages of 64-wide K steps)
# kiln::gemm_ws (gemm_wg.cuh: the same tile and ring fed by TMA from a producer warp): threads, dynamic shared
# memory (ring, alignment, mbarriers, two tensor maps) and global scratch per block for its tensor maps
# (+ 128: the maps' alignment; + 2 x 256 floats: a tile's weight-row scales, two tiles in turn)
WS_THREADS, WS_SMEM_BYTES, WS_TMAP_BYTES = 288, WG_SMEM_BYTES + 16 * 4 + 128 + 256 + 2 * 256 * 4, 256


def _callee(K: int, dtype: str, residual: bool, wgmma: bool) -> tuple[str, int, int]:
    """(device function, dynamic shared memory bytes, threads): gemm_ws (Hopper's wgmma fed by TMA; the same
    128 x 256 tiles, one more warp, and tensor-map scratch as its last argument) where the artifact is built
    for sm_90 alone and K % 64 == 0, else gemm_tn (WMMA)."""
    res = "true" if residual else "false"
    if wgmma and K % 64 == 0:
        return f"kiln::gemm_ws<{C_TYPES[dtype]}, {res}>", WS_SMEM_BYTES, WS_THREADS
    return f"kiln::gemm_tn<{C_TYPES[dtype]}, {res}>", SMEM_BYTES, THREADS


PROMPT_SPLIT_M = 256  # wgmma: prompts of at most this many rows take gemm_rows_wg's split K (H200, 8B: 6144 x 4096 at 128 rows 31 us against 48)


# gemm_ws is persistent: at most one block per SM of an H100 / H200 SXM; on a GPU with fewer SMs the blocks past
# its SM-id count (%nsmid) leave at once and the others walk the tiles in steps of that count, so no second wave of
# whole blocks follows (kernels/cuda/gemm_wg.cuh gemm_ws).
WS_BLOCKS = 132


def _persistent_grid(tiles):
    """min(tiles, WS_BLOCKS): the persistent kernels' 1-D grid."""
    return T.min(tiles, WS_BLOCKS)


def _persistent_launch(fn: str, N: int, K: int):
    """gemm_ws's persistent launch over M rows: a 1-D grid of min(tiles, WS_BLOCKS) blocks of WS_THREADS, its
    tensor-map scratch after the shared memory. launch(lead, y, M, tail): lead the arguments before y (pointers),
    tail those after the scratch (e4m3's row scales, or none)."""
    nb = (N + BN - 1) // BN

    @T.macro
    def launch(lead, y, M, tail):
        tm = T.alloc_buffer((WS_BLOCKS * WS_TMAP_BYTES,), "uint8")
        for bx in T.thread_binding(_persistent_grid((M + BM - 1) // BM * nb), thread="blockIdx.x"):
            for tx in T.thread_binding(WS_THREADS, thread="threadIdx.x"):
                smem = T.alloc_buffer((WS_SMEM_BYTES,), "uint8", scope="shared.dyn")
                T.evaluate(T.call_extern("void", fn, *lead, T.address_of(y[0, 0, 0]), T.Cast("int32", M), N, K, smem.access_ptr("rw"),
                                         tm.access_ptr("rw"), *tail))

    return launch


def _tile_launch(fn: str, N: int, K: int, smem_bytes: int, threads: int = THREADS):
    """The 128 x 256 tile kernels over M contiguous rows (gemm_tn / gemm_wg and their quantized twins): grid
    (ceil(N / 256), ceil(M / 128)). launch(ins, y, M): ins the kernel's inputs before y (a, the weight's arrays,
    r). threads == WS_THREADS: gemm_ws, persistent (_persistent_launch)."""
    nb = (N + BN - 1) // BN

    @T.macro
    def tiles(ins, y, M):
        for by in T.thread_binding((M + BM - 1) // BM, thread="blockIdx.y"):
            for bx in T.thread_binding(nb, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    smem = T.alloc_buffer((smem_bytes,), "uint8", scope="shared.dyn")
                    T.evaluate(T.call_extern("void", fn, *_addresses(*ins), T.address_of(y[0, 0, 0]), T.Cast("int32", M), N, K,
                                             smem.access_ptr("rw")))

    persistent = _persistent_launch(fn, N, K)

    @T.macro
    def ws(ins, y, M):
        persistent(_addresses(*ins), y, M, ())

    return ws if threads == WS_THREADS else tiles


def _prompt_launch(tiles, split_k, split: bool):
    """A prompt GEMM over M contiguous rows: the tile kernel; with `split` (wgmma, K in more than one range),
    short prompts (M <= PROMPT_SPLIT_M: 16-24 tiles for N = 4096 / 6144, a sixth of the chip) take the
    row kernel's split of K instead (split_k: gemm_rows_wg[_q] + the ordered reduction).
    launch(ins, rr, y, M) as _split_k_launch's."""

    @T.macro
    def launch(ins, rr, y, M):
        if split:
            if M <= PROMPT_SPLIT_M:
                split_k(ins, rr, y, M)
            else:
                tiles(ins, y, M)
        else:
            tiles(ins, y, M)

    return launch


def _gemm_launch(K: int, N: int, dtype: str, residual: bool, wgmma: bool):
    fn, smem_bytes, threads = _callee(K, dtype, residual, wgmma)
    split = wgmma and K % 64 == 0 and rows_wg_ksplit(N, K) > 1
    return _prompt_launch(_tile_launch(fn, N, K, smem_bytes, threads), _rows_wg_launch(N, K, dtype, dtype, residual), split)


def gemm(K: int, N: int, dtype: str, wgmma: bool = False):
    launch = _gemm_launch(K, N, dtype, False, wgmma)

    @T.prim_func
    def kiln_gemm(var_a: T.handle, w: T.Buffer((N, K), dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        S = T.int64()
        a = T.match_buffer(var_a, (B, S, K), dtype)
        y = T.match_buffer(var_y, (B, S, N), dtype)
        launch((a, w, y), y, y, B * S)  # r: not read (no residual); y's address in its place

    return kiln_gemm


def gemm_residual(K: int, N: int, dtype: str, wgmma: bool = False):
    launch = _gemm_launch(K, N, dtype, True, wgmma)

    @T.prim_func
    def kiln_gemm_residual(var_a: T.handle, w: T.Buffer((N, K), dtype), var_r: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        S = T.int64()
        a = T.match_buffer(var_a, (B, S, K), dtype)
        r = T.match_buffer(var_r, (B, S, N), dtype)
        y = T.match_buffer(var_y, (B, S, N), dtype)
        launch((a, w, r), r, y, B * S)

    return kiln_gemm_residual


ROWS_N, ROWS_M, ROWS_THREADS = 32, 64, 256  # kiln::GROWS_N, GROWS_M, GROWS_WARPS * 32
ROWS_RED_FLOATS = 8 * 4 * 4 * 32  # kiln::GROWS_RED_FLOATS
BIG_W, BIG_T, BIG_BK = 128, 128, 64  # kiln::GBIG_W, GBIG_T, GBIG_BK
BIG_SMEM_BYTES = 3 * (BIG_W + BIG_T) * BIG_BK * 2  # kiln::GBIG_SMEM_BYTES (96 KB)
ROWS_SMALL_B, ROWS_BIG_B = 8, 64  # B <= 8: one token tile per block; B > 64: the multistage GEMM
ROWS_WG_B = 8  # with wgmma the large-B kernel takes over above 8 (H200, 8B bf16 step: B = 16 8.25 ms on the middle kernel, B = 17 6.61 on wgmma)


def rows_ksplit(N: int, K: int) -> int:
    """K ranges of gemm_rows_big for an N x K weight: enough blocks to fill an H100/H200
    (~120+ for 128 tokens) -- 4 for N = 4096 or 6144, 1 for the large N. Fixed per
    matrix, so a token's result does not depend on B."""
    tiles, ks = -(-N // BIG_W), 1
    while tiles * ks < 120 and ks < 8 and K % (BIG_BK * ks * 2) == 0:
        ks *= 2
    return ks


def rows_wg_ksplit(N: int, K: int, sms: int = 132) -> int:
    """K ranges of gemm_rows_wg (256-row tiles of the weight) for an N x K weight: the most
    (a power of two, <= 8, dividing K into 64-wide steps) that keep the blocks within one wave
    of an H100/H200's 132 SMs -- 8 for N = 4096, 4 for 6144, 1 for the large N (whose tiles
    fill the chip already; more ranges would only add fp32 partials). Fixed per matrix, so a
    token's result does not depend on B."""
    tiles, ks = -(-N // 256), 1
    while ks < 8 and tiles * ks * 2 <= sms and K % (BIG_BK * ks * 2) == 0:
        ks *= 2
    return ks


def _addresses(*bufs):
    """The first element's address of each buffer (T.call_extern arguments); a pointer expression (a scratch
    buffer's access_ptr) passes as it is."""
    return [T.address_of(b[tuple(0 for _ in b.shape)]) if hasattr(b, "shape") else b for b in bufs]


def _split_k_launch(fn: str, reduce: str, N: int, K: int, ks: int, smem_bytes: int, tile_n: int, tile_t: int, n_on_x: bool,
                    threads: int = ROWS_THREADS):
    """A row kernel with K cut into ks ranges over grid.z (kernels/cuda/gemm_rows.cuh gemm_rows_big, gemm_wg.cuh
    gemm_rows_ws / gemm_rows_wg_q) over M contiguous rows, and with several ranges the ordered reduction of the
    fp32 partials. launch(ins, rr, y, M): ins the kernel's inputs before y (a and the weight's arrays, + r), rr
    what the reduction reads as the residual (not read without one). threads == WS_THREADS (gemm_rows_ws): the
    kernel also takes its tensor-map scratch."""
    tma = threads == WS_THREADS

    @T.macro
    def launch(ins, rr, y, M):
        ws = T.alloc_buffer((ks * M * N if ks > 1 else 1,), "float32")  # split-K partials [ks, M, N]
        tm = T.alloc_buffer((ks * ((M + tile_t - 1) // tile_t) * ((N + tile_n - 1) // tile_n) * WS_TMAP_BYTES if tma else 1,), "uint8")
        for bz in T.thread_binding(ks, thread="blockIdx.z"):
            for by in T.thread_binding((M + tile_t - 1) // tile_t if n_on_x else (N + tile_n - 1) // tile_n, thread="blockIdx.y"):
                for bx in T.thread_binding((N + tile_n - 1) // tile_n if n_on_x else (M + tile_t - 1) // tile_t, thread="blockIdx.x"):
                    for tx in T.thread_binding(threads, thread="threadIdx.x"):
                        smem = T.alloc_buffer((smem_bytes,), "uint8", scope="shared.dyn")
                        T.evaluate(T.call_extern("void", fn, *_addresses(*ins), T.address_of(y[0, 0, 0]), ws.access_ptr("rw"),
                                                 T.Cast("int32", M), N, K, ks, smem.access_ptr("rw"), *([tm.access_ptr("rw")] if tma else [])))
        if ks > 1:
            for bx in T.thread_binding((M * N + 255) // 256, thread="blockIdx.x"):
                for tx in T.thread_binding(256, thread="threadIdx.x"):
                    T.evaluate(T.call_extern("void", reduce, ws.access_ptr("rw"), T.address_of(rr[0, 0, 0]), T.address_of(y[0, 0, 0]),
                                             T.Cast("int32", M), N, ks))

    return launch


WS_MIN_ROWS = 64  # gemm_rows_ws above this many rows, gemm_rows_wg up to it (H200, 8B bf16: bit-equal; TMA's ring 3-9% faster from 128 rows, 0-11% slower at 16-64)


def _rows_wg_launch(N: int, K: int, dtype: str, out_dtype: str, residual: bool):
    """Tiles of 256 weight rows x 128 tokens with gemm_rows_wg's fixed split of K, over M contiguous rows (decode_batch's
    [B, 1, K] or a short prompt's [1, S, K]): gemm_rows_ws (fed by TMA) above WS_MIN_ROWS rows, gemm_rows_wg (cp.async)
    up to it -- the same sums bit for bit. launch((a, w, r), r, y, M)."""
    ct, co, res = C_TYPES[dtype], C_TYPES[out_dtype], "true" if residual else "false"
    reduce, ks = f"kiln::gemm_rows_big_reduce<{ct}, {co}, {res}>", rows_wg_ksplit(N, K)
    wg = _split_k_launch(f"kiln::gemm_rows_wg<{ct}, {co}, {res}>", reduce, N, K, ks, WG_SMEM_BYTES, 256, 128, True)
    ws = _split_k_launch(f"kiln::gemm_rows_ws<{ct}, {co}, {res}>", reduce, N, K, ks, WS_SMEM_BYTES, 256, 128, True, WS_THREADS)

    @T.macro
    def launch(ins, rr, y, M):
        if M <= WS_MIN_ROWS:
            wg(ins, rr, y, M)
        else:
            ws(ins, rr, y, M)

    return launch


def _rows_wg_q_launch(N: int, K: int, dtype: str, out_dtype: str, code: str, group: int):
    """gemm_rows_wg_q (codes q, scales s, minima z -- s again where the format has none) with its fixed
    split of K: launch((a, q, s, z), a, y, M)."""
    ct, co = C_TYPES[dtype], C_TYPES[out_dtype]
    return _split_k_launch(f"kiln::gemm_rows_wg_q<{ct}, {co}, {QGEMV_CODES[code]}, {group}>", f"kiln::gemm_rows_big_reduce<{ct}, {co}, false>",
                           N, K, rows_wg_ksplit(N, K), WG_SMEM_BYTES, 256, 128, True)


# --- e4m3 activations on fp8 tensor cores (gemm_wg.cuh quant_rows_e4m3, gemm_ws_f8, gemm_rows_ws_f8) -----------
# fp8 weights on Hopper: each call quantizes its activation rows to e4m3 (one fp32 scale per token) and runs the GEMM
# on fp8 wgmma -- twice bf16's tensor-core rate and no widening of the codes (H200, benchmarks/kernels/gemm_f8_check.cu:
# prompts 1.45-3.4x today's dequant + bf16 GEMM, decode_batch rows at B = 128 1.3-2.9x gemm_rows_wg_q).
F8_BK = 128  # codes per K step of the fp8 kernels
QROWS_THREADS = 256  # kiln::QROWS_THREADS


def f8_wgmma_supported(K: int) -> bool:
    return K % F8_BK == 0


def f8_tensor_cores(K: int, wgmma: bool, f8_act: bool) -> bool:
    """Whether an e4m3 weight's GEMMs (prompts, decode_batch above 8 rows) run on fp8 wgmma with e4m3 activations:
    Hopper kernels, not turned off (KILN_CUDA_FP8_ACT=0), and K in whole 128-code steps."""
    return wgmma and f8_act and f8_wgmma_supported(K)


def rows_f8_ksplit(N: int, K: int) -> int:
    """K ranges of gemm_rows_ws_f8: gemm_rows_wg's choice, halved until each range is whole 128-code steps."""
    ks = rows_wg_ksplit(N, K)
    while ks > 1 and K % (F8_BK * ks):
        ks //= 2
    return ks


def _f8_activations(K: int, dtype: str):
    """quant(a, M) -> (codes, scales): scratch for M rows of e4m3 codes and their per-token scales, filled by
    kiln::quant_rows_e4m3 (one block per row, the row held in registers: CPT chunks of 8 per thread). The scratch
    pointers are access_ptrs (the whole buffers are used)."""
    fn = f"kiln::quant_rows_e4m3<{C_TYPES[dtype]}, {-(-K // (8 * QROWS_THREADS))}>"

    @T.macro
    def quant(a, aq, sa, M):
        for bx in T.thread_binding(M, thread="blockIdx.x"):
            for tx in T.thread_binding(QROWS_THREADS, thread="threadIdx.x"):
                T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0, 0]), aq.access_ptr("w"), sa.access_ptr("w"), T.Cast("int32", M), K))

    return quant


def _rows_f8_launch(N: int, K: int, dtype: str, out_dtype: str, residual: bool = False):
    """decode_batch rows (or a short prompt) over e4m3 weights on fp8 wgmma: quant_rows_e4m3, then gemm_rows_ws_f8 with
    its fixed split of K (a token's result depends on K and the split alone, not on B) and the ordered reduction
    (+ r). launch((a, q, s[, r]), rr, y, M): the row kernels' launch signature (rr unused: r is ins[3])."""
    ct, co, res = C_TYPES[dtype], C_TYPES[out_dtype], "true" if residual else "false"
    quant = _f8_activations(K, dtype)
    rows = _split_k_launch(f"kiln::gemm_rows_ws_f8<{ct}, {co}, {res}>", f"kiln::gemm_rows_big_reduce<{ct}, {co}, {res}>", N, K,
                           rows_f8_ksplit(N, K), WS_SMEM_BYTES, 256, 128, True, WS_THREADS)

    @T.macro
    def launch(ins, rr, y, M):
        aq = T.alloc_buffer((M * K,), "uint8")
        sa = T.alloc_buffer((M,), "float32")
        quant(ins[0], aq, sa, M)
        # gemm_rows_ws_f8(Aq, SA, W, S, R, ...): without a residual R is not read (a in its place)
        r = ins[3] if residual else ins[0]
        rows((aq.access_ptr("r"), sa.access_ptr("r"), ins[1], ins[2], r), r, y, M)

    return launch


def _gemm_f8_launch(N: int, K: int, dtype: str, residual: bool = False):
    """Long prompts over e4m3 weights: quant_rows_e4m3, then the persistent gemm_ws_f8 (+ r). launch((a, q, s[, r]), y, M)."""
    quant = _f8_activations(K, dtype)
    gemm_launch = _persistent_launch(f"kiln::gemm_ws_f8<{C_TYPES[dtype]}, {'true' if residual else 'false'}>", N, K)

    @T.macro
    def launch(ins, y, M):
        aq = T.alloc_buffer((M * K,), "uint8")
        sa = T.alloc_buffer((M,), "float32")
        quant(ins[0], aq, sa, M)
        # gemm_ws_f8(Aq, SA, Bq, S, R, C, ...): without a residual R is not read (y's address in its place)
        gemm_launch([aq.access_ptr("r"), sa.access_ptr("r"), *_addresses(ins[1], ins[2], ins[3] if residual else y)], y, M, ())

    return launch


def qgemm_f8_residual(K: int, N: int, dtype: str):
    """y  # [1, M, N] = r + a  # [1, M, K] @ dequant(q, s)^T for e4m3 weights on Hopper (f8_wgmma_supported(K)): a
    prompt's o / down projection with the residual add in the GEMM's epilogue (an fp8 artifact's 2048-token prompt
    on the 8B shape spent 1.66 ms in 64 separate adds). Up to PROMPT_SPLIT_M rows the split-K rows kernel, above it
    the persistent one, as qgemm."""
    rows_f8, gemm_f8 = _rows_f8_launch(N, K, dtype, dtype, residual=True), _gemm_f8_launch(N, K, dtype, residual=True)

    @T.prim_func
    def kiln_qgemm_f8_residual(var_a: T.handle, q: T.Buffer((N, K), "uint8"), s: T.Buffer((N, 1), "float32"), var_r: T.handle,
                               var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        M = T.int64()
        a = T.match_buffer(var_a, (1, M, K), dtype)
        r = T.match_buffer(var_r, (1, M, N), dtype)
        y = T.match_buffer(var_y, (1, M, N), dtype)
        if M <= PROMPT_SPLIT_M:
            rows_f8((a, q, s, r), r, y, M)
        else:
            gemm_f8((a, q, s, r), y, M)

    return kiln_qgemm_f8_residual


def _rows_tiles(N: int, K: int):
    """The launch of kiln::gemm_rows (the small- and middle-B kernels): blocks_m x ceil(N / 32)
    blocks of 256 threads with their 8 KB reduction buffer. w: the weight or its codes; s: the
    codes' row scales (the weight again when it has none); r: the residual (a when none)."""
    nb = (N + ROWS_N - 1) // ROWS_N

    @T.macro
    def tiles(fn, a, w, s, r, y, B, blocks_m):
        for by in T.thread_binding(nb, thread="blockIdx.y"):
            for bx in T.thread_binding(blocks_m, thread="blockIdx.x"):
                for tx in T.thread_binding(ROWS_THREADS, thread="threadIdx.x"):
                    red = T.alloc_buffer((ROWS_RED_FLOATS,), "float32", scope="shared")
                    T.evaluate(T.call_extern("void", fn, T.address_of(a[0, 0, 0]), T.address_of(w[0, 0]), T.address_of(s[0, 0]),
                                             T.address_of(r[0, 0, 0]), T.address_of(y[0, 0, 0]), T.Cast("int32", B), N, K,
                                             red.access_ptr("rw")))

    return tiles


def _rows_dispatch(tiles, small: str, mid: str, mid_max: int, big):
    """decode_batch's kernel by B: `small` (one token tile) for B <= 8, `mid` up to mid_max, `big` (a split-K
    launch) above; big None: mid for every B > 8; mid_max <= 8: no middle range. Only the ranges used are
    in the function (a wgmma kernel's shared memory would not launch on other GPUs).
    launch(a, w, s, r, y, B, ins, rr): tiles' arguments, then big's inputs and what its reduction reads as r."""

    @T.macro
    def launch(a, w, s, r, y, B, ins, rr):
        if B <= ROWS_SMALL_B:
            tiles(small, a, w, s, r, y, B, 1)
        else:
            if big is None:
                tiles(mid, a, w, s, r, y, B, (B + ROWS_M - 1) // ROWS_M)
            elif mid_max <= ROWS_SMALL_B:
                big(ins, rr, y, B)
            else:
                if B <= mid_max:
                    tiles(mid, a, w, s, r, y, B, (B + ROWS_M - 1) // ROWS_M)
                else:
                    big(ins, rr, y, B)

    return launch


def gemm_rows(K: int, N: int, dtype: str, residual: bool = False, out_dtype: str | None = None, wgmma: bool = False):
    """y  # [B, 1, N] (out_dtype: dtype or float32) = a  # [B, 1, K] @ W  # [N, K]^T (+ r  # [B, 1, N]),
    B symbolic: one token of each of B sequences (decode_batch). Three kernels, picked on the
    host by B (kernels/cuda/gemm_rows.cuh): B <= 8 one token tile per block (fewer registers);
    up to 64 up to eight; above, the multistage GEMM with a fixed split of K. Within each
    range a token's result does not depend on B (the first two are even bit-equal). wgmma (an
    artifact for sm_90 alone, K % 64 == 0): the large-B kernel is gemm_rows_wg (Hopper's warpgroup
    MMA, kernels/cuda/gemm_wg.cuh) with its own fixed split of K."""
    out_dtype = out_dtype or dtype
    res = "true" if residual else "false"
    ct, co = C_TYPES[dtype], C_TYPES[out_dtype]
    small, mid = (f"kiln::gemm_rows<{ct}, {co}, {res}, {tt}>" for tt in (1, 8))
    reduce = f"kiln::gemm_rows_big_reduce<{ct}, {co}, {res}>"
    wgmma = wgmma and K % BIG_BK == 0
    # wgmma: gemm_rows_wg, tiles of 256 weight rows x 128 tokens (_rows_wg_launch); else gemm_rows_big, 128 x 128
    big, ks = f"kiln::gemm_rows_big<{ct}, {co}, {res}>", rows_wg_ksplit(N, K) if wgmma else rows_ksplit(N, K)
    # the middle kernel takes every B > 8 where the big one cannot split K or N is small (a few
    # blocks walking all of K one after another: N = 77 took 81 us against 12 on the H200)
    mid_max = (ROWS_WG_B if wgmma else ROWS_BIG_B) if K % (BIG_BK * ks) == 0 and N >= 1024 else 1 << 30

    tiles = _rows_tiles(N, K)

    big_launch = _rows_wg_launch(N, K, dtype, out_dtype, residual) if wgmma else _split_k_launch(
        big, reduce, N, K, ks, BIG_SMEM_BYTES, BIG_W, BIG_T, False)
    launch = _rows_dispatch(tiles, small, mid, mid_max, big_launch)

    if residual:
        @T.prim_func
        def kiln_gemm_rows_residual(var_a: T.handle, w: T.Buffer((N, K), dtype), var_r: T.handle, var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            B = T.int64()
            a = T.match_buffer(var_a, (B, 1, K), dtype)
            r = T.match_buffer(var_r, (B, 1, N), dtype)
            y = T.match_buffer(var_y, (B, 1, N), out_dtype)
            launch(a, w, w, r, y, B, (a, w, r), r)

        return kiln_gemm_rows_residual

    @T.prim_func
    def kiln_gemm_rows(var_a: T.handle, w: T.Buffer((N, K), dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        a = T.match_buffer(var_a, (B, 1, K), dtype)
        y = T.match_buffer(var_y, (B, 1, N), out_dtype)
        launch(a, w, w, a, y, B, (a, w, a), a)  # r: not read (RESIDUAL is false); a's address in its place

    return kiln_gemm_rows


ROWS_QCODES = ("f8",)  # quantized code kinds with a row kernel (gemm_rows over e4m3 codes)


def gemm_rows_q(K: int, N: int, dtype: str, code: str, out_dtype: str | None = None, wgmma: bool = False, f8_act: bool = True):
    """decode_batch's projection over quantized weights: y  # [B, 1, N] = a  # [B, 1, K] @ dequant(q, s)^T,
    B symbolic. fp8 ("f8": e4m3 codes q  # [N, K] uint8, per-row fp32 scales s  # [N, 1]) only:
    the codes widen exactly to 16 bits in registers and the scale multiplies the row's sum
    (kernels/cuda/gemm_rows.cuh). Small and middle kernels by B; on Hopper gemm_rows_wg_q above 64 rows."""
    if code not in ROWS_QCODES:
        raise ValueError(f"no row kernel for code kind {code!r}")
    out_dtype = out_dtype or dtype
    ct, co = C_TYPES[dtype], C_TYPES[out_dtype]
    small, mid = (f"kiln::gemm_rows<{ct}, {co}, false, {tt}, uint8_t>" for tt in (1, 8))
    tiles = _rows_tiles(N, K)
    # Hopper, above 8 rows: e4m3 activations on fp8 wgmma (_rows_f8_launch; H200, 8B shapes at B = 128: a layer ~196 us
    # against gemm_rows_wg_q's ~407 -- codes decoded into bf16 tiles -- and the middle kernel's ~396; weight-bound, so
    # about as fast at B = 16 as at 65: `kiln serve` at 32 / 64 streams ran below bf16's on the middle kernel)
    if f8_tensor_cores(K, wgmma, f8_act) and N >= 1024:
        big, mid_max = _rows_f8_launch(N, K, dtype, out_dtype), ROWS_WG_B
    else:  # bf16 activations (K in 64-wide steps only, or KILN_CUDA_FP8_ACT=0): codes decoded into bf16 wgmma tiles above 64 rows
        big, mid_max = _rows_wg_q_launch(N, K, dtype, out_dtype, code, 8) if wgmma and K % BIG_BK == 0 and N >= 1024 else None, ROWS_BIG_B
    launch = _rows_dispatch(tiles, small, mid, mid_max, big)

    @T.prim_func
    def kiln_gemm_rows_f8(var_a: T.handle, q: T.Buffer((N, K), "uint8"), s: T.Buffer((N, 1), "float32"), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B = T.int64()
        a = T.match_buffer(var_a, (B, 1, K), dtype)
        y = T.match_buffer(var_y, (B, 1, N), out_dtype)
        launch(a, q, s, a, y, B, (a, q, s, s), a)  # (e4m3: no minima; the scales stand in)

    return kiln_gemm_rows_f8


# --- quantized weights (gemm.cuh gemm_tn_q) ---------------------------------------
QSMEM_BYTES = 3 * (BM * (32 + 8) * 2 + BN * 32) + BN * (32 + 8) * 2  # kiln::QGEMM_SMEM_BYTES


def qgemm_supported(K: int, group: int, code: str, dtype: str) -> bool:
    return dtype in ("bfloat16", "float16") and code in QGEMV_CODES and K % 32 == 0 and group % 32 == 0 and K % group == 0


DEQUANT_BLOCKS = 4 * WS_BLOCKS  # dequant_weight's grid (grid-stride over 8-value chunks)


def _dequant_gemm_launch(N: int, K: int, group: int, code: str, dtype: str):
    """Long prompts over a quantized weight on Hopper: the weight widened to dtype once per call (kiln::dequant_weight
    into an N x K scratch, the values gemm_wg_q's tiles hold), then the persistent bf16 gemm_ws (e4m3: with the row
    scales on the sums) -- bit-equal to gemm_wg_q and 1.4-2.7x faster from 512 rows on the H200 (benchmarks/NOTES.md,
    session 20). launch((a, q, s, z), y, M)."""
    ct, cq = C_TYPES[dtype], QGEMV_CODES[code]
    dq = f"kiln::dequant_weight<{ct}, {cq}, {group}>"
    gemm_launch = _persistent_launch(f"kiln::gemm_ws<{ct}, false, {9 if code == 'f8' else 0}>", N, K)

    @T.macro
    def launch(ins, y, M):
        wd = T.alloc_buffer((N, K), dtype)
        for bx in T.thread_binding(DEQUANT_BLOCKS, thread="blockIdx.x"):
            for tx in T.thread_binding(256, thread="threadIdx.x"):
                # access_ptr, not address_of: the whole buffer is written (an address_of(wd[0, 0]) let TVM compact it to one element)
                T.evaluate(T.call_extern("void", dq, *_addresses(*ins[1:]), wd.access_ptr("w"), N, K))
        # r: y's address (no residual); e4m3's row scales after the scratch
        gemm_launch([*_addresses(ins[0]), wd.access_ptr("r"), T.address_of(y[0, 0, 0])], y, M, _addresses(ins[2]) if code == "f8" else [])

    return launch


def qgemm(K: int, N: int, group: int, code: str, dtype: str, wgmma: bool = False, f8_act: bool = True):
    """y  # [1, M, N] = a  # [1, M, K] @ dequant(q, s[, z])^T on tensor cores, M symbolic
    (prefill). Same arguments as the NT_qmatmul TE kernel it replaces. Hopper: up to PROMPT_SPLIT_M rows
    gemm_wg_q (codes decoded in its tiles; K split over blocks where that fills the chip), above it the weight
    widened once and the bf16 kernel (_dequant_gemm_launch)."""
    ng = K // group
    ct, cq = C_TYPES[dtype], QGEMV_CODES[code]
    wg = wgmma and K % 64 == 0
    if wg:  # Hopper: codes decoded into the wgmma tiles (kernels/cuda/gemm_wg.cuh)
        fn, smem_bytes = f"kiln::gemm_wg_q<{ct}, {cq}, {group}>", WG_SMEM_BYTES
    else:
        fn, smem_bytes = f"kiln::gemm_tn_q<{ct}, {cq}, {group}>", QSMEM_BYTES
    split = wg and rows_wg_ksplit(N, K) > 1  # short prompts on Hopper: K split over blocks
    if code == "f8" and f8_tensor_cores(K, wgmma, f8_act):  # e4m3 activations on fp8 wgmma, short and long prompts
        short, long = _rows_f8_launch(N, K, dtype, dtype), _gemm_f8_launch(N, K, dtype)
    else:
        short = _prompt_launch(_tile_launch(fn, N, K, smem_bytes), _rows_wg_q_launch(N, K, dtype, dtype, code, group), split)
        long = _dequant_gemm_launch(N, K, group, code, dtype) if wg else None

    @T.macro
    def short_or_long(ins, rr, y, M):
        if M <= PROMPT_SPLIT_M:
            short(ins, rr, y, M)
        else:
            long(ins, y, M)

    launch = short if long is None else short_or_long

    q_shape, q_dtype = ((N, K // 8), "uint32") if code == "4" else ((N, K), "uint8" if code == "f8" else "int8")
    s_dtype = "float32" if code == "f8" else "float16"

    if code == "4":
        @T.prim_func
        def kiln_qgemm4(var_a: T.handle, q: T.Buffer(q_shape, q_dtype), s: T.Buffer((N, ng), s_dtype), z: T.Buffer((N, ng), "float16"),
                        var_y: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            M = T.int64()
            a = T.match_buffer(var_a, (1, M, K), dtype)
            y = T.match_buffer(var_y, (1, M, N), dtype)
            launch((a, q, s, z), a, y, M)

        return kiln_qgemm4

    @T.prim_func
    def kiln_qgemm8(var_a: T.handle, q: T.Buffer(q_shape, q_dtype), s: T.Buffer((N, ng), s_dtype), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        M = T.int64()
        a = T.match_buffer(var_a, (1, M, K), dtype)
        y = T.match_buffer(var_y, (1, M, N), dtype)
        launch((a, q, s, s), a, y, M)  # z: unused

    return kiln_qgemm8
