"""CPU schedule rules (our own, where dlight's CPU rules are weak).

dlight's CPU GEMV reaches 3.4 GB/s on SmolLM2's lm_head (49152 x 576 fp32, 2
threads, znver3) — 8% of the ~40 GB/s the two cores can read. Decode is a
chain of GEMVs, so that number is the decode speed. The rules here are
matched by loop/buffer structure (via dlight's analysis), never by name.

CpuGemv (decode): y[b, n] = sum_k x[b, k] * W[n, k] (+ epilogue), b = 1 or a batch
  (decode_batch; the b loop inside the row loop, so W is streamed once per step)
  - rows n split into tasks of `rows` rows, parallel over tasks;
  - k split into (k_outer, lanes*accumulators); rfactor on the inner part so
    each row keeps `accumulators` vector registers of partial sums
    (independent FMA chains hide FMA latency), vectorised over `lanes`:
    32 partial sums per row (8 lanes x 4 on AVX2, 16 x 2 on AVX-512);
  - the partial sums live in a local buffer (registers), reduced once per row;
  - an injective epilogue (residual add) is computed per row right after.

CpuExpertGemv (mixture of experts): the same row dot products where the
weight rows are gathered through expert ids read from a buffer (W[ids[t, j], n, k]).
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .kernels.cpu_isa import vector_lanes


def cpu_rules() -> list:
    """Ordered: the first rule that fits a function schedules it."""
    return [CpuGemv(), CpuMatmul(), CpuExpertGemv(), CpuInlineElementwise()]


def _open(func, target):
    """(schedule, normalised block infos) for an llvm PrimFunc, else None."""
    t = compiler()
    from tvm import s_tir  # noqa: PLC0415  (compiler() imported the full TVM)
    from tvm.s_tir.dlight.analysis import normalize_prim_func  # noqa: PLC0415

    if not isinstance(func, t.tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return None if infos is None else (sch, infos)


def _main_and_epilogue(infos):
    """(main reduction block, injective epilogue or None), or None if it is not that shape."""
    if len(infos) not in (1, 2):
        return None
    epilogue = infos[1] if len(infos) == 2 else None
    if epilogue is not None and not epilogue.is_injective():
        return None
    return infos[0], epilogue


def reduction_tile(k: int, lanes: int, accumulators: int) -> tuple[int, int]:
    """(vector width, accumulators) for a k-long dot product: the widest vector
    (lanes, then halves down to scalar) and the most accumulators (then 2, 1)
    whose product divides k at least twice. The split k loop then never has
    extent 1, which TVM simplifies away under rfactor ("loops are not in a
    chain"): K=64 at 16 lanes x 4 accumulators did. A K that only a narrower
    vector divides (K=40 at 16 lanes) gets 8-lane vectors, not a refusal; an
    odd K runs scalar but correct ((1, 1)). (0, 0) only when k < 2."""
    vec = lanes
    while vec >= 1:
        for acc in dict.fromkeys((accumulators, 2, 1)):
            if k % (vec * acc) == 0 and k // (vec * acc) >= 2:
                return vec, acc
        vec //= 2
    return 0, 0


def column_tile(n: int, lanes: int, preferred: int) -> int:
    """Output columns per register tile: `preferred` (a multiple of lanes), then
    lanes, then narrower vectors down to 1, the first that divides n."""
    return next(c for c in (preferred, lanes, *(lanes >> s for s in range(1, lanes.bit_length()))) if c >= 1 and n % c == 0)


def _int_extent(sch, loop) -> int | None:
    t = compiler()
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, t.tirx.IntImm) else None


def _halving_sums(sch, wb) -> list:
    """Replace the write-back's serial sum of a row's partial sums by halving
    steps (partials[i] + partials[i + half], vector adds) down to 2 values:
    rfactor the write-back over the lower half, again and again. Returns the
    new blocks, producers first (still at the root): rf -> parts[0] -> ... -> wb."""
    parts = []
    while True:
        ri = sch.get_loops(wb)[3]
        ext = _int_extent(sch, ri)
        if ext is None or ext <= 2 or ext % 2:
            return parts
        _, lo = sch.split(ri, [2, ext // 2])
        part = sch.rfactor(lo, 0)
        sch.set_scope(part, 0, "local")
        parts.append(part)


def _region_buffer(region):
    """The buffer a block's read region is of (`source` in TVM 0.27, `buffer` before)."""
    return region.source if hasattr(region, "source") else region.buffer


def _batched_gemv_loops(sch, main):
    """(batch, n, k) loops of y[b, 0, n] = sum_k x[b, 0, k] * W(n, k), x [B, 1, K]
    with B symbolic or > 1 (one token of each of B sequences: decode_batch), W read
    through indices of n and k only and x through b and k only, loops in that
    order; else None."""
    t = compiler()
    if [str(i.kind) for i in main.iters] != ["S", "S", "R"]:
        return None
    block = sch.get(main.block_rv)
    loops = sch.get_loops(main.block_rv)
    if len(loops) != 3 or len(block.reads) != 2:
        return None
    b_var, n_var, k_var = (iv.var for iv in block.iter_vars)

    def uses(region) -> set:
        names = set()
        for rng in region.region:
            names |= {v.name for v in t.tirx.analysis.undefined_vars(rng.min)}
        return names

    a, w = (uses(r) for r in block.reads)
    x_buf = _region_buffer(block.reads[0])
    b, n, k = b_var.name, n_var.name, k_var.name
    if n in a:
        a, w = w, a
        x_buf = _region_buffer(block.reads[1])
    if not (k in a and k in w and n in w and w <= {n, k} and b in a and a <= {b, k}):
        return None
    # rows of independent sequences, x [B, 1, K]; a prompt's rows, x [1, s, K], are a GEMM (CpuMatmul)
    shape = [int(d) if isinstance(d, t.tirx.IntImm) else None for d in x_buf.shape]
    if len(shape) != 3 or shape[1] != 1 or shape[0] == 1:
        return None
    return tuple(loops)


class CpuGemv:
    """Decode GEMV: one output row per dot product, vectorised reduction, parallel rows."""

    PARTIALS = 32  # vector lanes x accumulators per row; see apply

    def __init__(self, rows_per_task: int = 16, accumulators: int | None = None, max_lanes: int | None = None, tree: bool | None = None):
        self.rows = rows_per_task
        # the write-back of a row's partial sums: halving vector adds (tree) or one serial chain.
        # None: tree up to 8 lanes (AVX2: decode_batch B=8 +8%, B=1 level), serial on AVX-512
        # (the tree cost the DRAM-bound lm_head 13-20% on the Xeon); benchmarks/NOTES.md
        self.tree = tree
        self.acc = accumulators  # None: PARTIALS // lanes (4 on AVX2, 2 on AVX-512)
        self.max_lanes = max_lanes  # narrower vectors than the target's widest (experiments)

    def apply(self, func, target, _tunable=False):
        from tvm.s_tir.dlight.analysis.gemv import is_gemv, normalize  # noqa: PLC0415
        from tvm.s_tir.dlight.base import try_inline_contiguous_spatial  # noqa: PLC0415

        opened = _open(func, target)
        if opened is None:
            return None
        sch, infos = opened
        infos = try_inline_contiguous_spatial(sch, infos)
        parts = None if infos is None else _main_and_epilogue(infos)
        if parts is None:
            return None
        main, epilogue = parts
        if len(main.iters) not in (2, 3):
            return None
        block = main.block_rv
        if is_gemv(sch, main) is None:
            # dlight's analysis takes no symbolic batch: decode_batch's [B, 1, K] x [N, K]
            loops = _batched_gemv_loops(sch, main)
            if loops is None:
                return None
            batch, s, r = loops
            c = sch.add_unit_loop(block)
        elif normalize(sch, main) is not True:  # only inner (contiguous-k) reduction
            return None
        batch, s, r, c = sch.get_loops(block)
        if _int_extent(sch, c) not in (None, 1):
            # packed 4-bit weights: normalize splits k by the 8 codes of a uint32 word
            # (q[n, k // 8]); one reduction loop again, the codes vectorise with the lanes
            r = sch.fuse(r, c)
            c = sch.add_unit_loop(block)
            batch, s, r, c = sch.get_loops(block)
        k = _int_extent(sch, r)
        n = _int_extent(sch, s)
        if k is None or n is None or _int_extent(sch, c) != 1:
            return None
        # batched decode (decode_batch: [B, 1, K] x [N, K], B symbolic): the batch loop
        # goes inside the row loop, so a task streams its rows of W from memory once
        # (the other rows b read them from L1) and every (b, n) is reduced exactly as
        # the B = 1 GEMV reduces n: a sequence's logits never depend on its batch
        batched = _int_extent(sch, batch) != 1
        # The rfactor write-back sums each row's lanes x accumulators partial sums one
        # by one, so more partials cost more than the independent FMA chains gain
        # once the loop is memory-bound: 32 per row measured best or level on an
        # AVX-512 Xeon (16 lanes: 2 accumulators beat 4 by 5-50% on fp16, up to 13% on
        # fp32 weights streamed from DRAM) and on AVX2 (8 lanes x 4, the v1 choice).
        # benchmarks/cpu_gemv_variants.py, benchmarks/NOTES.md.
        widest = min(vector_lanes(target), self.max_lanes or 64)
        lanes, acc = reduction_tile(k, widest, self.acc or max(1, min(4, self.PARTIALS // widest)))
        if lanes == 0:
            return None
        inner = lanes * acc
        rows = self.rows if n % self.rows == 0 else next(d for d in (8, 4, 2, 1) if n % d == 0)
        so, si = sch.split(s, [None, rows])
        if inner == 1:  # odd K: a serial dot per row (rfactor over a unit loop does not schedule)
            if batched:
                sch.reorder(so, si, batch)
            if epilogue is not None:
                sch.reverse_compute_at(epilogue.block_rv, batch if batched else si)
            sch.parallel(so)
            return sch
        ro, ri = sch.split(r, [None, inner])
        rf = sch.rfactor(ri, 0)
        # rf block loops: batch, so, si, ro, ri, c ; write-back block: batch, so, si, ri, c
        rf_loops = sch.get_loops(rf)
        if batched:
            sch.reorder(rf_loops[1], rf_loops[2], rf_loops[0], rf_loops[3], rf_loops[4])
        else:
            sch.reorder(rf_loops[1], rf_loops[2], rf_loops[3], rf_loops[4])
        sch.set_scope(rf, 0, "local")
        wb = sch.get_consumers(rf)[0]
        if batched:  # write-back: so, si, batch, ri, c
            wb_loops = sch.get_loops(wb)
            sch.reorder(wb_loops[1], wb_loops[2], wb_loops[0])
        tree = self.tree if self.tree is not None else widest <= 8
        parts = _halving_sums(sch, wb) if tree else []
        for p in reversed(parts):  # consumers first: each lands under the row loop before its consumer
            sch.compute_at(p, sch.get_loops(wb)[2])
        sch.compute_at(rf, sch.get_loops(wb)[2])
        for p in parts:  # each part adds two halves of the partial sums: vector adds
            lo_l, hi_l = sch.get_loops(p)[-2:]  # (the half, spatial; which half, reduced)
            sch.reorder(hi_l, lo_l)
            sch.vectorize(lo_l)
            sch.unroll(hi_l)
        # after compute_at the rf block sits under (so, si) with loops (ri, ro)
        ri_loop, ro_loop = sch.get_loops(rf)[-2:]
        acc_loop, lane_loop = sch.split(ri_loop, [None, lanes])
        sch.reorder(ro_loop, acc_loop, lane_loop)
        sch.vectorize(lane_loop)
        sch.unroll(acc_loop)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue.block_rv, sch.get_loops(wb)[2])
        sch.parallel(so)
        init = sch.decompose_reduction(rf, ro_loop)
        sch.vectorize(sch.get_loops(init)[-1])
        for p in parts:
            sch.vectorize(sch.get_loops(sch.decompose_reduction(p, sch.get_loops(p)[-2]))[-1])
        return sch


def _loads(expr) -> bool:
    """expr reads a buffer (TVM 0.27's Python has no TIR expression visitor)."""
    compiler()
    from tvm.ir.expr import Expr, TensorLoad  # noqa: PLC0415  (TIR's BufferLoad in TVM 0.27)

    if isinstance(expr, TensorLoad):
        return True
    kids = [getattr(expr, f) for f in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(expr, f)]
    kids += list(getattr(expr, "args", None) or [])
    return any(isinstance(c, Expr) and _loads(c) for c in kids)


def _gathers(block) -> bool:
    """A read of the block is indexed by a value loaded from a buffer (W[ids[t, j], ...])."""
    return any(_loads(rng.min) for region in block.reads for rng in region.region)


class CpuExpertGemv:
    """Expert GEMVs: y[s..., n] = sum_{r..., k} f(...) * W[ids[...], n, k], one
    reduction block whose weight rows are gathered through expert ids (MoE:
    frontends/models/moe.py expert_matmul / expert_down), any number of tokens.

    First schedule, correct and simple (benchmarks/NOTES.md says what comes
    next): output rows split into tasks of up to 16 rows, parallel over
    (tokens x experts x row tasks); each row's contiguous k loop is a vector
    dot product (rfactor into lanes x accumulators partial sums, as CpuGemv);
    an odd k runs a serial dot. Rows of the same expert are re-read for each
    token that picked it (prefill: no grouping of tokens by expert yet)."""

    def apply(self, func, target, _tunable=False):
        opened = _open(func, target)
        if opened is None:
            return None
        sch, infos = opened
        if len(infos) != 1 or not infos[0].is_reduction():
            return None
        block = infos[0].block_rv
        if not _gathers(sch.get(block)):
            return None
        kinds = "".join(i.kind for i in infos[0].iters)
        n_s = len(kinds.rstrip("R"))
        if n_s == 0 or "R" in kinds[:n_s]:
            return None
        loops = sch.get_loops(block)
        n, k = _int_extent(sch, loops[n_s - 1]), _int_extent(sch, loops[-1])
        if n is None or k is None:
            return None
        lanes, acc = reduction_tile(k, vector_lanes(target), 4)
        inner = lanes * acc
        rows = next(d for d in (16, 8, 4, 2, 1) if n % d == 0)
        try:
            so, si = sch.split(loops[n_s - 1], [None, rows])
            outer = [*loops[: n_s - 1], so]
            if inner <= 1:  # odd or tiny k: a serial dot per row
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else so)
                return sch
            ko, ki = sch.split(loops[-1], [None, inner])
            rf = sch.rfactor(ki, 0)
            sch.set_scope(rf, 0, "local")
            wb = sch.get_consumers(rf)[0]
            sch.compute_at(rf, sch.get_loops(wb)[n_s])  # under the row loop si
            # rf loops under si: (ki, other reductions..., ko) -> (others..., ko, acc, lane)
            rf_loops = sch.get_loops(rf)[n_s + 1 :]
            ki_loop, rest = rf_loops[0], rf_loops[1:]
            acc_loop, lane_loop = sch.split(ki_loop, [None, lanes])
            sch.reorder(*rest, acc_loop, lane_loop)
            sch.vectorize(lane_loop)
            sch.unroll(acc_loop)
            wb_outer = sch.get_loops(wb)[:n_s]
            sch.parallel(sch.fuse(*wb_outer) if len(wb_outer) > 1 else wb_outer[0])
            init = sch.decompose_reduction(rf, rest[0])
            sch.vectorize(sch.get_loops(init)[-1])
        except Exception:  # noqa: BLE001 - ScheduleError: the rule does not fit
            return None
        return sch


class CpuMatmul:
    """Prefill GEMM C[m, n] = sum_k A[m, k] * W[n, k] (+ epilogue), m symbolic (or static, at least 2).

    BLIS-style micro-kernel: an m_tile x n_tile block of C lives in vector
    registers (cache_write to a local buffer, n vectorised, m unrolled) while
    k runs the full depth; each step broadcasts m_tile values of A and loads
    n_tile/lanes vectors of W. W is [n, k] (the layout decode streams), so each
    parallel task first packs its n_tile rows of W to [k, n_tile] (contiguous
    vector loads). m is padded to the tile (pad_einsum), never predicated.
    A quantized W (a dequantize block in front) is decoded in that packing step.
    AVX2 (16 ymm): 6 x 16 -> 12 accumulators + 2 W vectors + 1 broadcast.
    gate_up 3072x576, M=128, znver3: 63 GFLOP/s (v1, rfactor dot-product
    tiles with a horizontal sum per output: 45).
    """

    def apply(self, func, target, _tunable=False):
        opened = _open(func, target)
        if opened is None:
            return None
        infos = opened[1]
        # a quantized weight: an injective dequantize block producing W first
        prologue = infos[0] if len(infos) >= 2 and infos[0].is_injective() and infos[1].is_reduction() else None
        parts = _main_and_epilogue(infos[1:] if prologue is not None else infos)
        if parts is None:
            return None
        sch, (main, _epilogue) = opened[0], parts  # the epilogue stays its own loop nest
        if "".join(i.kind for i in main.iters) not in ("SSSR", "SSR") or not main.is_reduction():
            return None
        block = main.block_rv
        if len(sch.get(block).reads) != 2:
            return None
        loops = sch.get_loops(block)
        exts = [_int_extent(sch, lp) for lp in loops]
        if len(loops) == 4 and exts[0] != 1:
            return None
        m_ext, n_ext, k_ext = exts[-3:]
        if (m_ext is not None and m_ext < 2) or n_ext is None or k_ext is None:
            return None  # m: the symbolic token dim, or static rows (ONNX graphs with pinned shapes); n and k static
        lanes = vector_lanes(target)
        mt = 8 if lanes >= 16 else 6
        nt = column_tile(n_ext, lanes, 2 * lanes)
        try:
            sch.pad_einsum(block, [1] * (len(loops) - 3) + [mt, 1, 1])
            m, n, k = sch.get_loops(block)[-3:]
            no, ni = sch.split(n, [None, nt])
            mo, mi = sch.split(m, [None, mt])
            sch.reorder(no, mo, k, mi, ni)
            acc = sch.cache_write(block, 0, "local")
            sch.reverse_compute_at(acc, mo)
            packed = sch.cache_read(block, 1, "global")
            sch.compute_at(packed, no)
            if prologue is not None:
                # decode the codes while packing each task's n_tile rows: the whole
                # dequantized matrix never exists, each weight is decoded once per call
                sch.compute_inline(prologue.block_rv)
            sch.transform_layout(block, ("read", 1), lambda nn_, kk: (kk, nn_))
            sch.vectorize(ni)
            sch.unroll(mi)
            sch.parallel(no)
            init = sch.decompose_reduction(block, k)
            sch.vectorize(sch.get_loops(init)[-1])
            sch.vectorize(sch.get_loops(acc)[-1])
        except Exception:  # noqa: BLE001 - ScheduleError: the rule does not fit
            return None
        return sch


class CpuInlineElementwise:
    """Everything else (norms, activations, reshapes): inline every injective
    block into its consumer so the function is one or two loop nests with no
    intermediate buffers. dlight's CPU Reduction rule made SmolLM2's decode
    RMSNorm take 0.37 ms (576 elements) through workspace allocations;
    inlined it is ~1 us. Small reductions run serially: at decode sizes a
    parallel region costs more than the work."""

    def apply(self, func, target, _tunable=False):
        from tvm.s_tir.dlight.base import try_inline  # noqa: PLC0415

        opened = _open(func, target)
        if opened is None:
            return None
        sch, infos = opened
        try:
            infos = try_inline(sch, infos)
        except Exception:  # noqa: BLE001
            return None
        if infos is not None and len(infos) == 1 and infos[0].is_injective():
            self._parallel_vectorize(sch, infos[0].block_rv, vector_lanes(target))
        return sch

    @staticmethod
    def _parallel_vectorize(sch, block, lanes: int) -> None:
        """One injective loop nest (SwiGLU, casts, adds over [tokens, n]):
        vectorise the contiguous inner loop, parallelise the outer ones.
        SmolLM2 prefill SwiGLU (128 x 1536): 1.4 ms serial scalar."""
        loops = sch.get_loops(block)
        if not loops:  # a scalar (ONNX graphs compute some): nothing to split
            return
        inner = _int_extent(sch, loops[-1])
        if inner is None or inner % lanes:
            return
        try:
            _, vec = sch.split(loops[-1], [None, lanes])
            sch.vectorize(vec)
            outer = sch.get_loops(block)[:-1]
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        except Exception:  # noqa: BLE001 - leave it serial rather than fail
            pass
