"""Quantized experts (issue 13, milestone 2): tiny Mixtral / Qwen3-MoE whose
stacked experts are stored in each kiln weight format, against transformers
running the *same* dequantized weights (a wrong nibble, scale, minimum or
expert offset fails at ~1e-4, whatever the format's own error), and against
the float artifact by KL divergence and top-1 agreement (what each format
costs). The kernels' numpy twins are in test_moe.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import compile_artifact, dequantized_hf, hf_greedy, hf_logits, random_ids, rel_err

from kiln.passes.quant import WEIGHT_FORMATS, QuantPlan

ARCHS = ("mixtral_q", "qwen3_moe_q")
SEQ_LEN = 37
LOGITS_RTOL = 1e-4  # against the dequantized reference: the kernels' arithmetic only
# what quantized experts cost on the tiny models (every other matrix float: --keep ROLE=none;
# 256 random tokens in windows of 64, against the float32 artifact). Measured 2026-12-01
# (benchmarks/NOTES.md "Quantized experts"): mean KLD / top-1
#   mixtral_q    q8 0.00018 / 0.996  fp8 0.0048 / 0.898  q4g32 0.016 / 0.727  q4g128 0.018 / 0.676
#   qwen3_moe_q  q8 0.00019 / 0.980  fp8 0.0012 / 0.934  q4g32 0.008 / 0.789  q4g128 0.011 / 0.812
KLD_BARS = {"q8": 1e-3, "fp8": 1e-2, "q4g32": 0.04, "q4k": 0.04, "q4g128": 0.04}
TOP1_BARS = {"q8": 0.95, "fp8": 0.85, "q4g32": 0.65, "q4k": 0.65, "q4g128": 0.6}
EXPERTS_ONLY = [f"{r}=none" for r in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed")]

def _expert_params(manifest) -> dict[str, str]:
    return {p["name"]: p["quant"] for p in manifest["params"] if ".mlp.experts." in p["name"]}


@pytest.mark.slow  # the inner loop runs quantized experts end to end in test_moe_gguf.py (q4g32 from Q4_1 blocks)
@pytest.mark.parametrize(("arch", "quant"), [(a, q) for a in ARCHS for q in WEIGHT_FORMATS])
def test_quantized_experts_match_dequantized_transformers(arch, quant, tiny_checkpoint, hf_model, tmp_path):
    """Every expert matrix quantized (no stack left float), the router float;
    prefill and decode logits equal transformers' on the dequantized weights,
    and 16 greedy tokens too. The attention projections and the head (rows of 64: the CPU
    integer-dot kernels would take them, with their activation rounding) stay on the
    float-activation kernels: what is compared here is the experts' arithmetic."""
    from kiln.runtime import SamplingParams, load  # noqa: PLC0415

    art = compile_artifact(tiny_checkpoint(arch), tmp_path / "q.kiln", quant=quant, cpu_intdot=False)
    manifest = json.loads((art / "manifest.json").read_text())
    experts = _expert_params(manifest)
    assert experts and set(experts.values()) == {quant}, experts
    assert {p["quant"] for p in manifest["params"] if p["name"].endswith(".mlp.gate.weight")} == {"none"}
    ref = dequantized_hf(hf_model(arch), QuantPlan.parse(quant))
    ids = random_ids(SEQ_LEN, seed=3)
    want = hf_logits(ref, ids)
    session = load(art)
    err = rel_err(session.logits(ids), want)
    assert err < LOGITS_RTOL, f"{arch} {quant}: relative logits error {err:.2e} against the dequantized reference"
    # the quantization really changed the model (the reference is not the float one)
    assert np.abs(hf_logits(hf_model(arch), ids) - want).max() > 10 * err * np.abs(want).max()
    dec = rel_err(session.decode_logits(ids), want)  # the decode path: one token per call
    assert dec < LOGITS_RTOL, f"{arch} {quant}: decode logits error {dec:.2e}"
    prompt = ids[:5]
    res = session.generate(prompt, max_new_tokens=16, sampling=SamplingParams(temperature=0), ignore_eos=True)
    assert res.tokens == hf_greedy(ref, prompt, 16)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_experts_quality_against_the_float_artifact(arch, tiny_checkpoint, compiled, tmp_path):
    """Mean KLD and top-1 agreement of each format for the experts alone against the
    float32 artifact (runtime/quality.py, as `kiln eval --ref` and the compile's
    quality gate measure): within the bars, and ordered as the formats' precision."""
    from helpers import MemoLogits, compile_artifacts  # noqa: PLC0415

    from kiln.runtime import load  # noqa: PLC0415
    from kiln.runtime.quality import compare_sessions  # noqa: PLC0415

    compile_artifacts([(tiny_checkpoint(arch), tmp_path / f"{q}.kiln", {"quant": q, "keep": EXPERTS_ONLY}) for q in WEIGHT_FORMATS])
    ref = MemoLogits(load(compiled(arch)))
    ids = random_ids(256, seed=11)
    got = {}
    for q in WEIGHT_FORMATS:
        assert set(_expert_params(json.loads((tmp_path / f"{q}.kiln" / "manifest.json").read_text())).values()) == {q}
        r = compare_sessions(load(tmp_path / f"{q}.kiln"), ref, ids, window=64)
        got[q] = (r["mean_kld"], r["top1_agreement"])
    for q, (kld, top1) in got.items():
        assert 0 < kld <= KLD_BARS[q] and top1 >= TOP1_BARS[q], f"{arch} {q}: mean KLD {kld:.5f}, top-1 {top1:.3f}"
    kld = {q: v[0] for q, v in got.items()}
    assert kld["q8"] < kld["fp8"] < kld["q4g32"] <= kld["q4g128"], kld
    assert kld["fp8"] < kld["q4k"] <= kld["q4g128"], kld  # the 32-grid under 8-bit codes (measured 0.0164 / 0.0091 vs q4g128 0.0183 / 0.0113)
