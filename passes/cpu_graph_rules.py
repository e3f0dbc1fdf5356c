"""CPU schedule rules for general graphs (ONNX, issue 18), tried after kiln's
and dlight's CPU rules (PipelineOptions.extra_rules; only compiler/onnx_build.py
passes them, so LLM libraries are unchanged).

CpuSpatialReduction: a reduction block (convolution, pooling, a batched
matmul such as attention's scores) with spatial prologues (padding) and an
injective epilogue (bias, activation). TVM's default loops for these are
serial, with the reduction innermost: a ResNet-50 at 224x224 ran 25x slower
than onnxruntime. Here: prologues inlined into their consumer; the reduction
loops moved inside the spatial ones except the innermost spatial loop (so
one output row is accumulated while the reduction runs: for NCHW
convolutions the row along w), that row vectorised when its extent divides
by the vector lanes (or half, down to 4), TILE rows of the first spatial
loop (output channels) accumulated together, the outer spatial loops fused
and run in parallel, the epilogue computed per parallel task.
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .cpu_rules import _open
from .kernels.cpu_isa import vector_lanes


TILE = 4


def _open_inlined(func, target):
    """cpu_rules._open with the contiguous spatial blocks (padding, casts) inlined into their consumers."""
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial  # noqa: PLC0415

    opened = _open(func, target)
    if opened is None:
        return None
    try:
        infos = try_inline_contiguous_spatial(*opened)
    except Exception:  # noqa: BLE001
        return None
    return None if infos is None else (opened[0], infos)


class CpuSpatialReduction:
    def apply(self, func, target, _tunable=False):
        t = compiler()
        opened = _open_inlined(func, target)
        if opened is None:
            return None
        sch, infos = opened
        if not 1 <= len(infos) <= 2 or not infos[0].is_reduction():
            return None
        if len(infos) == 2 and not infos[1].is_injective():
            return None
        main = infos[0]
        spatial = [it.loop_rv for it in main.iters if it.kind == "S"]
        reduce = [it.loop_rv for it in main.iters if it.kind == "R"]
        if not spatial or not reduce or len(spatial) + len(reduce) != len(main.iters):
            return None
        block = main.block_rv
        try:
            inner = spatial[-1]
            outer = spatial[:-1]
            tile = []
            first = sch.get(outer[0]).extent if len(outer) >= 2 else None
            if isinstance(first, t.tirx.IntImm) and int(first) % TILE == 0 and int(first) > TILE:
                # TILE outputs of the first spatial loop (a convolution's output channels) per
                # pass over the reduction: each input row loaded is used TILE times
                o, i = sch.split(outer[0], [None, TILE])
                outer, tile = [o, *outer[1:]], [i]
            sch.reorder(*outer, *reduce, *tile, inner)
            if tile:
                sch.unroll(tile[0])
            if outer:
                par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
                if len(infos) == 2:
                    sch.reverse_compute_at(infos[1].block_rv, par)
                sch.parallel(par)
            init = sch.decompose_reduction(block, reduce[0])
            extent = sch.get(inner).extent
            lanes = vector_lanes(target)
            while lanes > 4 and isinstance(extent, t.tirx.IntImm) and int(extent) % lanes:
                lanes //= 2  # 28-wide rows (ResNet's 28x28 maps): 4 lanes
            if isinstance(extent, t.tirx.IntImm) and int(extent) % lanes == 0 and int(extent) >= lanes:
                for loop in (inner, sch.get_loops(init)[-1]):
                    _, vec = sch.split(loop, [None, lanes])
                    try:
                        sch.vectorize(vec)
                    except Exception:  # noqa: BLE001 - some bodies (a padded read's if_then_else) do not vectorise: keep the loop
                        pass
        except Exception:  # noqa: BLE001 - ScheduleError: leave the function to TVM's default loops
            return None
        return sch


class CpuRowwise:
    """Row-wise functions of several blocks (softmax: max, sum of exp, divide; GELU's erf chains after
    a reduction; layer norms over a graph's [batch, heads, seq, k] rows): every block computed under the
    last block's outer loops fused into one parallel loop, one row per task, the last block's row
    vectorised when its extent divides by the vector lanes. Without it such functions fell to
    CpuInlineElementwise, which leaves reductions as TVM's serial loops: BERT-base's 12 attention
    softmaxes took 17.7 ms of a 230 ms run on one thread of two."""

    def apply(self, func, target, _tunable=False):
        for partials in (True, False):
            opened = _open_inlined(func, target)
            if opened is None:
                return None
            sch, infos = opened
            if len(infos) < 2 or not any(i.is_reduction() for i in infos) or infos[-1].is_reduction():
                return None
            try:
                return self._schedule(sch, infos, target, partials)
            except Exception:  # noqa: BLE001 - ScheduleError: the blocks do not share their rows (or rfactor refused one)
                continue
        return None

    @staticmethod
    def _schedule(sch, infos, target, partials: bool):
        """partials: each reduction whose innermost loop is a reduction of a static extent that divides by
        the vector lanes (twice at least) is split into `lanes` partial results (rfactor) accumulated in
        vector registers, then summed: TVM's loop kept one scalar accumulator, so the exp polynomial of
        BERT-base's softmax sums ran one value at a time (1.18 -> 0.81 ms a call, session 20)."""
        t = compiler()
        lanes = vector_lanes(target)
        blocks, rfs = [], []
        for info in infos[:-1]:
            if partials and info.is_reduction():
                inner = sch.get_loops(info.block_rv)[-1]
                extent = sch.get(inner).extent
                if isinstance(extent, t.tirx.IntImm) and int(extent) % lanes == 0 and int(extent) >= 2 * lanes:
                    _, part = sch.split(inner, [None, lanes])
                    rfs.append(sch.rfactor(part, factor_axis=0))  # [lanes, ...] partials, then their reduction
                    blocks.append(rfs[-1])
            blocks.append(info.block_rv)
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        if len(loops) < 2:
            raise ValueError("one loop")
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        for block in reversed(blocks):
            sch.compute_at(block, outer, preserve_unit_loops=True)
        sch.parallel(outer)
        for rf in rfs:  # under the row loop: (lanes, unit loops..., k / lanes) -> (k / lanes, ..., lanes), lanes vectorised
            ls = sch.get_loops(rf)
            sch.reorder(ls[-1], ls[1])
            sch.vectorize(sch.get_loops(rf)[-1])
        inner = sch.get_loops(last)[-1]
        extent = sch.get(inner).extent
        if isinstance(extent, t.tirx.IntImm) and int(extent) % lanes == 0:
            _, vec = sch.split(inner, [None, lanes])
            try:
                sch.vectorize(vec)
            except Exception:  # noqa: BLE001 - a body that does not vectorise keeps its loop
                pass
        return sch


def graph_rules() -> list:
    return [CpuSpatialReduction(), CpuRowwise()]
