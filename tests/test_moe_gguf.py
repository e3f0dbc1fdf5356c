"""GGUF mixtures of experts (issue 13, milestone 2): tiny transformers Mixtral and
Qwen3-MoE written as llama.cpp lays them out (llama arch with `llama.expert_*`
and stacked `ffn_*_exps`; qwen3moe), compiled, and compared with transformers
on the same weights: float GGUFs at 1e-4; quantized expert blocks (Q8_0 / Q4_1)
imported as they are into q8 / q4g32 and compared with transformers running the
GGUF's own dequantized values, also at 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import compile_artifact, hf_greedy, hf_logits, random_ids, rel_err, slow_except
from helpers.tiny_gguf import write_moe

ARCHS = ("mixtral_q", "qwen3_moe_q")
SEQ_LEN = 37
LOGITS_RTOL = 1e-4
# everything but the experts stays float (so the GGUF's expert blocks are all that is quantized)
EXPERTS_ONLY = [f"{r}=none" for r in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed")]
DIRECT = {"Q8_0": "q8", "Q4_1": "q4g32", "Q4_0": "q4g32"}  # GGUF block type -> the kiln format it imports into


def _with(model, values: dict):
    """A copy of a transformers model with some parameters replaced (name -> float32 array)."""
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415

    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, v in values.items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    return m


@pytest.mark.slow  # the inner loop reads a qwen3moe GGUF in the next test
@pytest.mark.parametrize("arch", ARCHS)
def test_float_gguf_matches_transformers(arch, hf_model, tmp_path):
    """F32 stacks: logits at 37 positions and 24 greedy tokens equal transformers'
    (llama arch: q/k rows un-permuted; qwen3moe: q/k norms, expert width from
    expert_feed_forward_length, renormalisation from expert_weights_norm)."""
    from kiln.frontends.readers import open_checkpoint  # noqa: PLC0415
    from kiln.runtime import SamplingParams, load  # noqa: PLC0415

    path = tmp_path / f"{arch}.gguf"
    write_moe(path, hf_model(arch), tokenizer=False)
    config = open_checkpoint(path).config
    assert config["architectures"] == [hf_model(arch).config.architectures[0]] and config["num_local_experts"] > 1
    session = load(compile_artifact(path, tmp_path / "m.kiln"))
    ids = random_ids(SEQ_LEN)
    err = rel_err(session.logits(ids), hf_logits(hf_model(arch), ids))
    assert err < LOGITS_RTOL, f"{arch}: relative logits error {err:.2e}"
    prompt = random_ids(5, seed=7)
    res = session.generate(prompt, max_new_tokens=24, sampling=SamplingParams(temperature=0), ignore_eos=True)
    assert res.tokens == hf_greedy(hf_model(arch), prompt, 24)


@pytest.mark.parametrize(("arch", "qtype"), slow_except([(a, q) for a in ARCHS for q in DIRECT], ("qwen3_moe_q", "Q4_1")))
def test_quantized_expert_blocks_import_as_they_are(arch, qtype, hf_model, tmp_path):
    """Q8_0 / Q4_1 / Q4_0 expert stacks become q8 / q4g32 arrays block for block (gate and
    up joined within each expert, no float detour: manifest `direct`), and the artifact
    computes what transformers computes with the GGUF's dequantized experts."""
    from kiln.runtime import load  # noqa: PLC0415

    path = tmp_path / f"{arch}.gguf"
    values = write_moe(path, hf_model(arch), expert_type=Q[qtype], tokenizer=False)
    quant = DIRECT[qtype]
    art = compile_artifact(path, tmp_path / "q.kiln", quant=quant, keep=EXPERTS_ONLY)
    manifest = json.loads((art / "manifest.json").read_text())
    layers = hf_model(arch).config.num_hidden_layers
    assert manifest["quant"]["matrices"] == {"direct": 2 * layers, "requantized": 0}
    ref = _with(hf_model(arch), values)
    ids = random_ids(SEQ_LEN, seed=5)
    want = hf_logits(ref, ids)
    session = load(art)
    for path_name, got in (("prefill", session.logits(ids)), ("decode", session.decode_logits(ids))):
        err = rel_err(got, want)
        assert err < LOGITS_RTOL, f"{arch} {qtype}: {path_name} logits error {err:.2e} against the GGUF's values"
    assert rel_err(hf_logits(hf_model(arch), ids), want) > 100 * LOGITS_RTOL  # the blocks really are lossy


@pytest.mark.slow
def test_quality_gate_measures_an_moe_artifact(hf_model, tmp_path):
    """--quant on an MoE GGUF with a tokenizer: the gate builds the float32 and the
    quantized CPU variants, runs both over the built-in text and records mean KLD /
    top-1 in the manifest; --max-kld under that fails and writes nothing."""
    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.errors import CompileError  # noqa: PLC0415

    path = tmp_path / "m.gguf"
    write_moe(path, hf_model("qwen3_moe_q"))
    compile_model(path, tmp_path / "q.kiln", target="llvm", dtype="float32", quant="q4g128", max_kld=10.0)
    quality = json.loads((tmp_path / "q.kiln" / "manifest.json").read_text())["quant"]["quality"]
    assert quality["tokens"] >= 512 and 0 < quality["mean_kld"] < 10 and 0 < quality["top1_agreement"] < 1, quality
    with pytest.raises(CompileError, match=r"mean KLD 0\.\d+ over \d+ tokens of built-in English text is over --max-kld 1e-06"):
        compile_model(path, tmp_path / "gate.kiln", target="llvm", dtype="float32", quant="q4g128", max_kld=1e-6)
    assert not (tmp_path / "gate.kiln").exists()


@pytest.mark.parametrize(("key", "value", "match"), [("expert_shared_count", 2, "2 shared experts"),
                                                     ("expert_gating_func", 2, "expert_gating_func 2 is not supported")])
def test_moe_gguf_kiln_cannot_run_is_refused_by_name(key, value, match, hf_model, tmp_path):
    """DeepSeek-style shared experts and sigmoid gating are refused when the file is
    opened (naming the key), not compiled into a model that computes something else."""
    import gguf  # noqa: PLC0415

    from kiln.errors import UnsupportedModelError  # noqa: PLC0415
    from kiln.frontends.readers import open_checkpoint  # noqa: PLC0415

    path = tmp_path / "m.gguf"
    write_moe(path, hf_model("qwen3_moe_q"), tokenizer=False, extra={f"qwen3moe.{key}": (value, gguf.GGUFValueType.UINT32)})
    with pytest.raises(UnsupportedModelError, match=match):
        open_checkpoint(path)
