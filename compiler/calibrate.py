"""--calibrate: the activation energy each projection's input columns carry on the calibration
text, for quantizers that weigh their rounding error by it (q4k: passes/quant/formats/q4k.py,
llama.cpp's importance matrix idea).

The float32 model is built for this CPU by the same stages as any artifact, with every float
projection's input passed through an observer (passes/observe_projection_inputs.py), and run
over the text in windows from an empty cache (prefill). The observer adds sum over tokens of
x^2 per input column to the param it feeds: importance[param]  # [K] float64. A fused param
(qkv_proj, gate_up_proj) has one input, so one vector.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..errors import CompileError
from .artifact import ArtifactWriter
from .manifest import make_manifest
from .progress import Progress
from .quality import MAX_CALIB_TOKENS, WINDOW, cpu_variant, read_calibration
from .stages import build_stages


def collect_importance(m, opts, progress: Progress) -> dict[str, np.ndarray]:
    """float param name -> sum of squared activations per input column over the calibration text."""
    from ..passes.observe_projection_inputs import OBSERVER  # noqa: PLC0415
    from ..runtime import load  # noqa: PLC0415
    from ..tvm_compat import compiler  # noqa: PLC0415

    if m.ck.tokenizer is None:
        raise CompileError(f"--calibrate: {m.ck.source} has no tokenizer to read the calibration text with")
    if m.tp > 1:
        raise CompileError("--calibrate: not with --tensor-parallel yet (a shard's columns are not the whole model's)")
    text = read_calibration(opts.calib_text)
    progress("calibrate: build float32 with observed projection inputs")
    sums: dict[int, np.ndarray] = {}

    def observe(x, index):  # index: a shape (i,), the param's place in packed_params
        i = int(index[0])
        a = x.numpy()
        a = a.reshape(-1, a.shape[-1]).astype(np.float64)
        sums[i] = (a * a).sum(axis=0) + sums.get(i, 0.0)
        return x

    t = compiler()
    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp:
        mv = cpu_variant(m, lossy=False)
        path = Path(tmp) / "calib.kiln"
        with ArtifactWriter(path) as w:
            built = build_stages(mv, w, page_size=opts.page_size, no_weights=False, cuda=opts.cuda, cpu_intdot=False, dump_ir=None,
                                 observe=True, progress=progress.live_only())
            w.commit(make_manifest(mv, page_size=opts.page_size, no_weights=False, built=built, quality=None))
        names = [p["name"] for p in built.params]
        t.tvm.register_global_func(OBSERVER, observe, override=True)
        try:
            session = load(path)
            ids = session.encode_prompt(text)[:MAX_CALIB_TOKENS]
            if len(ids) < 64:
                raise CompileError(f"--calib-text {opts.calib_text}: {len(ids)} tokens; at least 64 are needed")
            window = min(WINDOW, session.max_seq_len)
            starts = range(0, len(ids), window)
            for n, s in enumerate(starts):
                session.logits(ids[s:s + window])
                progress.count("calibration windows", n + 1, len(starts))
            del session
        finally:
            t.tvm.register_global_func(OBSERVER, lambda x, index: x, override=True)  # nothing holds on to this build's sums
    out = {names[i]: v for i, v in sums.items()}
    progress(f"calibrate: activation energy of {len(out)} projection inputs over {len(ids)} tokens")
    return out
