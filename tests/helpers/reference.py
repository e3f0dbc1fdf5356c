"""transformers as the reference: load a checkpoint, its logits, greedy tokens; the error measure;
a model whose weights are a quantized artifact's (dequantized_hf)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_hf_model(path: Path):
    """The transformers model for a checkpoint dir, float32, eager attention and
    experts (transformers 5 otherwise runs MoE experts through torch's grouped_mm,
    which refuses expert widths whose rows are not 16-byte multiples on CPU)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                              experts_implementation="eager")
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens from transformers, never stopping early at EOS.

    EOS is switched off on the model's own generation config: generate() merges
    that config into any one passed in, and `min_new_tokens` would instead
    *suppress* EOS, changing the tokens rather than just the stopping.
    """
    import torch  # noqa: PLC0415

    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False, max_new_tokens=n
        )
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == n, f"transformers stopped after {len(tokens)} of {n} tokens"
    return tokens


def random_ids(n: int, vocab: int = 211, seed: int = 1234) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """transformers' float32 logits  # [len(ids), vocab] for one sequence."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the tolerance tables' measure."""
    return float(np.abs(got - want).max() / np.abs(want).max())


# transformers parameter -> kiln quantization plan role (passes/quant/plan.py); None: never quantized
_HF_ROLES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
             "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def _hf_role(name: str, ndim: int) -> str | None:
    if ndim == 3:  # transformers 5's fused experts: mlp.experts.gate_up_proj [E, 2F, D], down_proj [E, D, F]
        return {"gate_up_proj": "expert_gate_up", "down_proj": "expert_down"}[name.rsplit(".", 1)[1]]
    if ndim != 2 or name.endswith("mlp.gate.weight"):  # norms; an MoE router stays float
        return None
    if "embed_tokens" in name:
        return "embed"
    return "lm_head" if name.startswith("lm_head") else _HF_ROLES[name.split(".")[-2]]


def dequantized_hf(model, plan):
    """A copy of `model` whose matrices are what a kiln artifact quantized with
    `plan` (passes.quant.QuantPlan) computes with: each quantized, then decoded."""
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415

    tied = bool(model.config.tie_word_embeddings)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            role = _hf_role(name, p.ndim)
            fmt = plan.matrix_format(role, p.shape[-1], tied) if role else None
            if fmt is not None:
                w = p.float().numpy()
                p.copy_(torch.from_numpy(fmt.dequantize_stacked(fmt.quantize_stacked(w), w.shape)))
    return m
